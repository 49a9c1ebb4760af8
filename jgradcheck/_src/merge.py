"""One report from several scalar checks of the same parameters (projections, modes, orders)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jgradcheck._src.numerics import RESOLUTION_BOUND
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport


def _ratio(e: Entry) -> float:
    """How far outside its tolerance an entry is (kinks last, unverifiable first)."""
    if e.status == "kink":
        return -1.0
    if not (e.error_estimate > 0) or not math.isfinite(e.abs_error):
        return math.inf
    return e.abs_error / e.error_estimate


# A leaf seen by several checks shows its worst row: a failure, then an inconclusive one, then ok.
_RANK = {"fail": 2, "inconclusive": 1, "ok": 0}


def _worse(a: LeafReport, b: LeafReport) -> LeafReport:
    """The row to show for a leaf seen by two checks: the worse status, then the larger difference."""
    ra, rb = _RANK.get(a.status, 2), _RANK.get(b.status, 2)
    if ra != rb:
        return a if ra > rb else b
    return b if (b.difference > a.difference or math.isnan(b.difference)) else a


def _prefixed(e: Entry, prefix: str) -> Entry:
    return dataclasses.replace(e, path=prefix + e.path)


def _judge_zeros(rows: dict[str, LeafReport]) -> dict[str, LeafReport]:
    """A derivative that is 0 to within its error bound (tanh'' at 0: an exact 0 against round-off)
    is judged against the scale of the other derivatives in the same check, not its own.

    Why: relative to its own scale (the round-off itself) no bound is fine enough; relative to the
    function's other derivatives (the first derivative, the other outputs) the same bound says
    that an error of 1% of their size would have been seen. Where every derivative is that small
    (sin'(π/2) alone), there is nothing to be relative to and the row stays inconclusive.
    """
    others = [r.scale for r in rows.values() if not r.zero and math.isfinite(r.scale) and r.scale > 0]
    if not others:
        return rows
    scale = max(others)
    out = {}
    for path, row in rows.items():
        if row.zero and row.status == "inconclusive" and row.n_failed == 0 and row.scale < scale:
            resolution = row.resolution * row.scale / scale
            if resolution <= RESOLUTION_BOUND:
                # The classic difference, relative to the same scale: ‖numerical − yours‖ over it.
                gap = row.worst.abs_error if row.worst is not None else 0.0
                row = dataclasses.replace(
                    row,
                    difference=min(row.difference, gap / scale) if math.isfinite(gap) else row.difference,
                    status="ok",
                    passed=True,
                    resolution=resolution,
                    scale=scale,
                    n_unresolved=0,
                    note=f"0 to within {resolution:.1e} of the scale of the other derivatives checked",
                )
        out[path] = row
    return out


def merge_reports(
    reports: Sequence[GradCheckReport], prefixes: Sequence[str] | None = None, top_k: int = 10
) -> GradCheckReport:
    """Merges checks: with ``prefixes``, each check keeps its own rows (paths prefixed, e.g.
    ``rev:x``); without, the checks are of the same leaves and each leaf shows its worst row.

    The merged difference is the largest of the checks' (the classic number of the worst view).
    """
    if len(reports) == 1 and not prefixes:
        return reports[0]
    rows: dict[str, LeafReport] = {}
    worst: list[Entry] = []
    kinks: dict[tuple[str, tuple[int, ...]], Entry] = {}
    warnings: dict[str, None] = {}
    for k, r in enumerate(reports):
        prefix = prefixes[k] if prefixes else ""
        for row in r.leaves:
            row = dataclasses.replace(
                row, path=prefix + row.path, worst=None if row.worst is None else _prefixed(row.worst, prefix)
            )
            rows[row.path] = _worse(rows[row.path], row) if row.path in rows else row
        worst += [_prefixed(e, prefix) for e in r.worst]
        for e in r.kinks:
            e = _prefixed(e, prefix)
            kinks.setdefault((e.path, e.index), e)
        warnings.update(dict.fromkeys(r.warnings))
    before = dict(rows)
    rows = _judge_zeros(rows)
    worst.sort(key=lambda e: -_ratio(e))
    seen: set[tuple[str, tuple[int, ...], str | None]] = set()
    unique = []
    for e in worst:
        key = (e.path, e.index, e.output)
        if key not in seen:
            seen.add(key)
            unique.append(e)

    def _difference(k: int, r: GradCheckReport) -> float:
        # A check with a row judged against the others' scale: its rows' differences, as judged.
        paths = [(prefixes[k] if prefixes else "") + row.path for row in r.leaves]
        if any(rows[p] is not before.get(p) and rows[p].zero for p in paths):
            return max((rows[p].difference for p in paths), key=lambda d: (math.isnan(d), d))
        return r.difference

    difference = max((_difference(k, r) for k, r in enumerate(reports)), key=lambda d: (math.isnan(d), d))
    diagnoses = list(dict.fromkeys(r.diagnosis for r in reports if r.diagnosis))
    first = reports[0]
    return GradCheckReport(
        passed=all(row.passed for row in rows.values()),
        difference=difference,
        grade=Grade.of(difference),
        leaves=tuple(rows.values()),
        worst=tuple(unique[:top_k]),
        kinks=tuple(kinks.values()),
        diagnosis="; ".join(diagnoses) or None,
        warnings=tuple(warnings),
        precision=first.precision,
        method=first.method,
        mode=first.mode,
        evaluations=sum(r.evaluations for r in reports),
        devices=first.devices,
        seconds=sum(r.seconds for r in reports),
        what=first.what,
        evaluated=" | ".join(dict.fromkeys(r.evaluated for r in reports if r.evaluated)),
    )
