"""Assembling the report: per-leaf rows, the worst entries, kinks, diagnosis, warnings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jgradcheck._src import diagnose, numerics
from jgradcheck._src.engine import Engine
from jgradcheck._src.estimate import Coords
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport, LeafValues


def _entries(path: str, shape, c: Coords, g: np.ndarray, which: Sequence[int] | np.ndarray) -> list[Entry]:
    out = []
    for j in which:
        index = tuple(int(i) for i in np.unravel_index(int(c.idx[j]), shape)) if shape else ()
        out.append(
            Entry(
                path,
                index,
                float(g[j]),
                float(c.numerical[j]),
                float(c.tol[j]),
                str(c.status[j]),
                float(c.left[j]),
                float(c.right[j]),
            )
        )
    return out


def leaf_devs(engine: Engine) -> tuple[str, ...]:
    return tuple(f"{d.platform}:{d.id}" for d in engine.devices)


def build_report(
    problem, grads, per_leaf, warnings, slopes, opts, mode_note, engine, top_k, seconds
) -> GradCheckReport:
    rows: list[LeafReport] = []
    all_entries: list[tuple] = []
    kinks: list[Entry] = []
    factors: list[float | None] = []
    ys_parts: list[np.ndarray] = []
    ns_parts: list[np.ndarray] = []
    values: list[LeafValues | None] = []  # every compared entry, for report.plot()
    for i, (path, f) in enumerate(zip(problem.paths, problem.floats)):
        res = per_leaf[i]
        shape = tuple(f.shape)
        g = grads[i]
        slope = None if slopes is None else slopes[i]
        if res.coords is None:  # screened and passed: directions only
            ys_parts.append(res.dir_yours)
            ns_parts.append(res.dir_numerical)
            rows.append(
                LeafReport(
                    path,
                    shape,
                    problem.orig_dtypes[i],
                    res.difference,
                    passed=True,
                    checked=res.n_dirs,
                    how="screened",
                    n_failed=0,
                    n_kinks=0,
                    worst=None,
                    resolution=res.resolution,
                    taylor_slope=slope,
                )
            )
            factors.append(None)
            values.append(None)
            continue
        c = res.coords
        gi = g[c.idx]
        values.append(
            LeafValues(
                np.asarray(c.idx, np.int64).copy(),
                np.asarray(gi, np.float64).copy(),
                np.asarray(c.numerical, np.float64).copy(),
                np.asarray(c.tol, np.float64).copy(),
                problem.host(i).astype(np.float64)[c.idx],
                np.asarray(c.status).astype(str),
            )
        )
        finite = np.isfinite(c.numerical)
        kink = c.status == "kink"
        compared = finite & ~kink  # kinks are judged by their slopes, not by this difference
        ys_parts.append(gi[compared])
        ns_parts.append(c.numerical[compared])
        fails = np.flatnonzero(c.status == "fail")
        unverifiable = np.flatnonzero(c.status == "nan")
        kink_idx = np.flatnonzero(kink)
        # How far outside its tolerance each entry is: kinks rank last, unverifiable first.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.abs(gi - c.numerical) / np.where(c.tol > 0, c.tol, np.inf)
        ratio = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf)
        ratio[kink] = -1.0
        worst_j = int(np.argmax(ratio)) if ratio.size and ratio.max() >= 0 else None
        leaf_worst = _entries(path, shape, c, gi, [worst_j])[0] if worst_j is not None else None
        all_entries.append((ratio, path, shape, c, gi))
        kinks += _entries(path, shape, c, gi, kink_idx)
        passed = fails.size == 0 and unverifiable.size == 0 and res.extra_failures == 0
        diag = None
        fac = None
        if not passed:
            full = c.idx.size == f.size
            theta = problem.host(i).astype(np.float64)[c.idx]
            sel = compared
            diag = diagnose.describe_leaf(
                gi[sel],
                c.numerical[sel],
                theta[sel],
                shape if full else (),
                int(np.sum(c.status[sel] == "fail")),
                path=path,
            )
            fac = diagnose.fitted_factor(gi[sel], c.numerical[sel])
            if unverifiable.size:
                note = f"J is NaN/Inf at θ ± h for {unverifiable.size} entries: they could not be checked"
                diag = (diag + "; " if diag else "") + note
            if res.note:
                diag = (diag + "; " if diag else "") + res.note
        factors.append(fac if not passed else None)
        scale = float(np.sqrt(np.mean(c.numerical[finite] ** 2))) if finite.any() else 0.0
        resolution = float(np.median(c.tol)) / scale if scale > 0 else math.inf
        rows.append(
            LeafReport(
                path,
                shape,
                problem.orig_dtypes[i],
                numerics.relative_difference(c.numerical[compared], gi[compared]),
                passed,
                int(c.idx.size),
                res.how,
                int(fails.size) + int(unverifiable.size) + res.extra_failures,
                int(kink_idx.size),
                leaf_worst,
                resolution,
                diag,
                slope,
            )
        )
    for row in rows:
        if row.passed and row.resolution > 1e-2:
            warnings.append(
                f"{row.path}: finite differences in {problem.precision} can only see errors above "
                f"{row.resolution:.0%} of its gradient here (entries near zero or noisy J); "
                + ("run with x64=True" if "off" in problem.precision else "the pass means no large error")
                + "."
            )
    # The classic relative difference over everything compared: entries, and screened leaves' directions.
    ys = np.concatenate(ys_parts) if ys_parts else np.zeros(0)
    ns = np.concatenate(ns_parts) if ns_parts else np.zeros(0)
    difference = numerics.relative_difference(ns, ys)
    if not np.all(np.isfinite(ys)):
        difference = math.nan
    # k worst entries over all of θ, ranked by how far outside their tolerance they are.
    cand = []
    for ratio, path, shape, c, gi in all_entries:
        top = [j for j in np.argsort(-ratio)[:top_k] if ratio[j] >= 0]
        cand += [(float(ratio[j]), e) for j, e in zip(top, _entries(path, shape, c, gi, top))]
    cand.sort(key=lambda t: -t[0])
    worst = tuple(e for _, e in cand[:top_k])
    passed = all(r.passed for r in rows)
    failing = [f for f, r in zip(factors, rows) if not r.passed]
    cross = diagnose.common_factor(failing, problem.batch_sizes) if len(failing) == len(rows) else None
    return GradCheckReport(
        passed,
        difference,
        Grade.of(difference),
        tuple(rows),
        worst,
        tuple(kinks),
        cross,
        tuple(warnings),
        problem.precision,
        opts.method if opts.eps is None else f"{opts.method} (eps = {opts.eps:g})",
        mode_note,
        engine.evaluations,
        leaf_devs(engine),
        seconds,
        entry_values=tuple(values),
    )
