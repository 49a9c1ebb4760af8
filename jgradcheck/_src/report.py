"""The report: immutable values whose ``__str__`` is a table a person reads at a glance.

Every value shown is labelled: ``yours`` is the user's gradient, ``numerical`` the
finite-difference estimate.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import TYPE_CHECKING

import numpy as np

from jgradcheck._src import numerics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class Grade(enum.Enum):
    """The classic gradient-checking recipe's graded scale for the relative difference; each member carries its message."""

    GREAT = "great (classic scale: ~1e-7)"
    DOUBLE_CHECK = "double-check (classic scale: ~1e-5)"
    BUG = "bug (classic scale: >= 1e-3)"

    @classmethod
    def of(cls, difference: float) -> Grade:
        if not math.isfinite(difference) or difference >= numerics.GRADE_BUG:
            return cls.BUG
        if difference < numerics.GRADE_GREAT:
            return cls.GREAT
        return cls.DOUBLE_CHECK


@dataclasses.dataclass(frozen=True)
class Entry:
    """One coordinate of θ, mapped back to its leaf.

    Attributes:
      path: the leaf's path, e.g. ``W2`` or ``layers[0].w``.
      index: the index inside that leaf.
      yours: your gradient's value.
      numerical: the finite-difference estimate.
      error_estimate: the estimated error of ``numerical`` (noise + truncation, times the safety
        factor, plus your gradient's own rounding); the entry fails when |yours − numerical|
        exceeds it.
      status: ``"fail"``, ``"kink"`` (non-differentiable point; yours lies between the one-sided
        slopes ``left`` and ``right``), ``"inconclusive"`` (within a tolerance too coarse to
        see a 1% error), ``"nan"`` (J is NaN/Inf at every step tried) or ``"ok"``.
      left: the slope on the left of θ (kinks at θ, or closer to θ than the step).
      right: the slope on the right of θ (kinks at θ, or closer to θ than the step).
      how: how the entry was judged when the first step would not do: ``"smaller step"``,
        ``"larger step"`` (J's rounding hid the change over the first step),
        ``"one-sided"`` (a domain edge), ``"kink nearby"`` (a kink closer to θ than the first
        step: judged with steps that stay on one side of it), or ``""``.
      output: for a Jacobian entry (vector checks), the output it is the derivative of, e.g.
        ``out[2, 1]``; ``yours`` and ``numerical`` are then ∂output/∂input.
    """

    path: str
    index: tuple[int, ...]
    yours: float
    numerical: float
    error_estimate: float
    status: str
    left: float = math.nan
    right: float = math.nan
    how: str = ""
    output: str | None = None

    @property
    def abs_error(self) -> float:
        return abs(self.yours - self.numerical)

    @property
    def name(self) -> str:
        return f"{self.path}[{', '.join(map(str, self.index))}]" if self.index else self.path

    def __str__(self) -> str:
        name = self.name if self.output is None else f"d {self.output} / d {self.name}"
        s = f"{name}: yours {_fmt(self.yours)}  numerical {_fmt(self.numerical)}"
        if self.status == "kink":
            return s + f"  kink: slope {_fmt(self.left)} on the left, {_fmt(self.right)} on the right"
        if self.error_estimate > 0 and math.isfinite(self.abs_error):
            s += f"  {self.abs_error / self.error_estimate:.1e} × tolerance"
        if self.how == "kink nearby":
            s += f"  near a kink: slopes {_fmt(self.left)} left, {_fmt(self.right)} right"
        elif self.how == "one-sided":
            s += "  (one-sided: J is NaN/Inf on the other side)"
        return s


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One row per floating parameter leaf.

    Attributes:
      path: readable leaf path (``W2``, ``layers[0].w``, ``enc.b``).
      shape: the leaf's shape.
      dtype: the leaf's dtype as you passed it.
      difference: the classic relative difference over this leaf's checked entries.
      passed: ``status == "ok"``.
      checked: how many entries were compared entry by entry.
      how: ``"entries"`` (every entry), ``"sampled"`` (a random subset), or ``"screened"`` (random
        directions only: its entries were not compared one by one).
      n_failed: failing entries (or failing directions when screened).
      n_kinks: entries on a kink, accepted.
      worst: the entry (or direction) furthest outside its tolerance; None if nothing checked.
      resolution: the smallest relative error this check can see in this leaf (the largest
        finite-difference error estimate of a passing entry over the leaf's gradient scale);
        above 1e-2 the leaf is inconclusive.
      diagnosis: what the discrepancy looks like, in plain words (failing leaves only).
      taylor_slope: fitted slope of the Taylor remainder, if requested (≈2 correct, ≈1 wrong).
      status: ``"ok"``, ``"fail"`` (an entry disagrees beyond its error estimate),
        ``"inconclusive"`` (no entry failed, but some could not be resolved to 1% of the
        gradient: low precision, noise, steps that do not converge, NaN/Inf; see ``note``), or
        ``"not checked"`` (left out by ``only=``: not perturbed, yours not compared).
      n_unresolved: entries that passed too coarsely to count, or could not be evaluated.
      note: how entries were judged when the first step would not do, and for an inconclusive
        leaf, the resolution reached and what to do.
      scale: the gradient scale ``resolution`` is relative to (root-mean-square of the leaf's
        derivatives, yours or numerical, whichever is larger).
      zero: every derivative compared, yours and numerical, is 0 to within its error bound.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    difference: float
    passed: bool
    checked: int
    how: str
    n_failed: int
    n_kinks: int
    worst: Entry | None
    resolution: float
    diagnosis: str | None = None
    taylor_slope: float | None = None
    status: str = "ok"
    n_unresolved: int = 0
    note: str | None = None
    scale: float = 0.0
    zero: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class LeafValues:
    """Every entry of one leaf that was compared one by one: what :meth:`GradCheckReport.plot` draws.

    Attributes:
      index: flat indices into the leaf (``np.unravel_index(index, shape)`` gives positions).
      yours: your gradient there.
      numerical: the finite-difference estimate.
      error_estimate: the estimated error of ``numerical``; an entry fails beyond it.
      parameter: the parameter's value θ at those entries.
      status: ``"ok"``, ``"fail"``, ``"kink"`` or ``"nan"`` per entry (as in :class:`Entry`).
    """

    index: np.ndarray
    yours: np.ndarray
    numerical: np.ndarray
    error_estimate: np.ndarray
    parameter: np.ndarray
    status: np.ndarray


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """What ``check_grad`` found. ``str(report)`` renders the table.

    Attributes:
      passed: every checked entry of your gradient agrees with the numerical one within its
        estimated finite-difference error, and that error is small enough to see a 1% mistake
        (kinks accepted when yours lies between the slopes). False when a leaf failed, and
        also when one is inconclusive (see ``status``).
      difference: the classic ‖numerical − yours‖₂ / (‖numerical‖₂ + ‖yours‖₂) over checked θ.
      grade: the classic graded verdict on ``difference``.
      leaves: one row per floating leaf, in tree order.
      worst: the k entries furthest outside their tolerance, over all of θ.
      kinks: entries found on a kink (non-differentiable points).
      diagnosis: a finding that spans leaves (e.g. a missing 1/m), or None.
      warnings: things you should know (stop_gradient, low float32 resolution, NaNs, ...).
      precision: the dtype the check ran in, and whether it was promoted.
      method: the finite-difference stencil.
      mode: ``"full"``, ``"screen"`` or ``"sample"``, and why if chosen automatically.
      evaluations: cost-function evaluations made.
      devices: devices the perturbations ran on.
      seconds: wall time of the check, compilation included.
      what: what was checked: ``"your gradient"``, ``"your VJP"``, ``"your JVP"``,
        ``"your Hessian-vector product"``, or ``"JAX's derivative of f"`` (check_rules).
      jacobian: for vector checks, the disagreeing Jacobian entries with their input leaf and
        index and their output leaf and index (``Entry.output``).
      evaluated: how the perturbed costs were evaluated, by leaf: as changes only (the delta
        interpreter), the whole cost re-evaluated (where a change is dense through J), and how
        many evaluations were skipped at entries J never reads (embedding rows no token selects).
      entry_values: per leaf (in ``leaves`` order), its :class:`LeafValues` (every entry compared
        one by one), or None for a leaf that was only screened; None when the check did not
        record them. Drawn by :meth:`plot`; not part of equality or ``repr``.
    """

    passed: bool
    difference: float
    grade: Grade
    leaves: tuple[LeafReport, ...]
    worst: tuple[Entry, ...]
    kinks: tuple[Entry, ...]
    diagnosis: str | None
    warnings: tuple[str, ...]
    precision: str
    method: str
    mode: str
    evaluations: int
    devices: tuple[str, ...]
    seconds: float
    what: str = "your gradient"
    jacobian: tuple[Entry, ...] = ()
    evaluated: str = ""
    entry_values: tuple[LeafValues | None, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def failed_leaves(self) -> tuple[LeafReport, ...]:
        """Leaves where yours disagrees with the numerical gradient (not the inconclusive ones)."""
        return tuple(leaf for leaf in self.leaves if leaf.status == "fail")

    @property
    def inconclusive_leaves(self) -> tuple[LeafReport, ...]:
        """Leaves the check could not resolve finely enough to pass (see each ``note``)."""
        return tuple(leaf for leaf in self.leaves if leaf.status == "inconclusive")

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` (some leaf disagrees) or ``"inconclusive"`` (none
        disagrees, but some leaf could not be resolved: ``passed`` is False)."""
        if self.passed:
            return "passed"
        return "failed" if self.failed_leaves else "inconclusive"

    @property
    def inconclusive(self) -> bool:
        return self.status == "inconclusive"

    @property
    def not_checked(self) -> tuple[str, ...]:
        """The floating leaves ``only=`` left out: not perturbed, yours not compared there."""
        return tuple(leaf.path for leaf in self.leaves if leaf.status == "not checked")

    def leaf(self, path: str) -> LeafReport:
        """The row for ``path`` (e.g. ``"W2"``)."""
        for row in self.leaves:
            if row.path == path:
                return row
        raise KeyError(f"no floating leaf {path!r}; leaves are {[r.path for r in self.leaves]}")

    def plot(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """A figure of this report: which leaves are wrong, and how (needs matplotlib).

        Top: each leaf's difference on a log axis over the classic 1e-7 / 1e-5 / 1e-3 scale,
        beside the smallest error the check could see there. Below, for each failing leaf:
        yours against numerical per entry (the diagonal when right; slope 2 or -1, or a
        shift, when it is a factor, a sign or a missing term), kinks marked.

        Args:
          path: also save the figure there (the extension picks the format, e.g. ``check.png``).

        Returns:
          A ``matplotlib.figure.Figure``; pyplot's state is not touched.

        Raises:
          ImportError: matplotlib is missing; ``pip install "jgradcheck[plot]"``.
        """
        from jgradcheck._src.plot import plot_report

        return plot_report(self, path)

    def __bool__(self) -> bool:
        raise TypeError(
            "A GradCheckReport has no truth value; use report.passed, or "
            "jgradcheck.assert_grad_correct(...) to raise on failure."
        )

    def summary(self) -> str:
        unresolved = ", ".join(leaf.path for leaf in self.inconclusive_leaves)
        if self.passed:
            return f"jgradcheck: PASSED - {self.what} matches the numerical one"
        if self.failed_leaves:
            bad = ", ".join(leaf.path for leaf in self.failed_leaves)
            head = f"jgradcheck: FAILED - {self.what} disagrees with the numerical one in {bad}"
            return head + (f" (and {unresolved} could not be resolved)" if unresolved else "")
        return (
            f"jgradcheck: INCONCLUSIVE - finite differences in {self.precision} could not resolve "
            f"{unresolved} finely enough to see a 1% error: this is not a pass"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        lines.append(
            f"  difference ‖numerical - yours‖ / (‖numerical‖ + ‖yours‖) = {self.difference:.2e}: {self.grade.value}"
        )
        if self.passed and self.grade is not Grade.GREAT:
            lines.append(
                "  (every entry agrees within its finite-difference error estimate; the classic fixed "
                "scale does not know that error)"
            )
        lines += _wrap(f"ran in {self.precision}, {self.method} differences, mode {self.mode}")
        lines.append(f"  {self.evaluations:,} cost evaluations on {', '.join(self.devices)} in {self.seconds:.2f} s")
        if self.evaluated:
            lines += _wrap(f"evaluated: {self.evaluated}")
        if self.not_checked:
            lines += _wrap(f"not checked (left out by only=, not perturbed): {', '.join(self.not_checked)}")
        lines.append("")
        table, long = _leaf_table(self.leaves)
        lines.extend(table)
        if long:
            lines += [""] + [w for path, text in long for w in _wrap(f"{path}: {text}")]
        notes = [leaf for leaf in self.leaves if leaf.note]
        if notes:
            lines += [""] + [w for leaf in notes for w in _wrap(f"{leaf.path}: {leaf.note}")]
        if self.diagnosis:
            lines += [""] + _wrap(f"diagnosis: {self.diagnosis}")
        failing = [e for e in self.worst if e.status == "fail"]
        if failing and not all(e.output is not None for e in failing):
            if self.what == "your gradient":
                head = "  worst entries (yours = your gradient, numerical = finite differences):"
            else:  # vector checks: each input entry's derivative of the outputs summed with random weights
                head = (
                    f"  worst input entries (yours = {self.what}, numerical = finite differences;\n"
                    "  each the derivative of the outputs summed with random weights, see report.mode):"
                )
            lines += ["", head]
            lines += [f"    {e}" for e in failing]
        if self.jacobian:
            lines += ["", "  disagreeing Jacobian entries (d output / d input; yours vs numerical finite differences):"]
            lines += [f"    {e}" for e in self.jacobian]
        if self.kinks:
            lines += [""] + _wrap(
                f"kinks: {len(self.kinks)} (points where J has no derivative, at θ or closer to it than "
                "the step; accepted where yours lies between the slopes on the left and on the right)"
            )
            lines += [f"    {e}" for e in self.kinks[:5]]
        if self.warnings:
            lines += [""] + [w for text in self.warnings for w in _wrap(f"warning: {text}")]
        return "\n".join(lines)


# A diagnosis longer than this is written below the table, not in its row.
SHORT_DIAGNOSIS = 48


def _wrap(text: str) -> list[str]:
    """One prose line of the report, indented by two.

    Not wrapped: a phrase of a note or warning stays on one line, where a search finds it.
    """
    return ["  " + text]


def _fmt(x: float) -> str:
    return f"{x:.4e}" if math.isfinite(x) else str(x)


def _leaf_table(leaves: tuple[LeafReport, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """The table's lines, and the (path, diagnosis) too long for a row (written below it)."""
    header = (
        "leaf",
        "shape",
        "dtype",
        "difference",
        "status",
        "checked",
        "worst entry",
        "yours",
        "numerical",
        "diagnosis",
    )
    rows = []
    long: list[tuple[str, str]] = []
    for leaf in leaves:
        status = {"ok": "ok", "fail": "FAIL"}.get(leaf.status, leaf.status)
        if leaf.n_failed:
            status += f" ({leaf.n_failed})"
        elif leaf.status == "inconclusive" and leaf.n_unresolved:
            status += f" ({leaf.n_unresolved})"
        if leaf.n_kinks:
            status += f" +{leaf.n_kinks} kink"
        w = leaf.worst
        where = (
            ""
            if w is None
            else (f"[{', '.join(map(str, w.index))}]" if w.index else ("dir" if leaf.how == "screened" else "[]"))
        )
        checked = f"{leaf.checked}/{leaf.size}" if leaf.how != "screened" else f"{leaf.checked} dirs"
        if leaf.status == "not checked":
            checked = "-"
        diag = leaf.diagnosis or ""
        if leaf.taylor_slope is not None:
            diag = (diag + "; " if diag else "") + f"Taylor slope {leaf.taylor_slope:.2f}"
        if len(diag) > SHORT_DIAGNOSIS:
            long.append((leaf.path, diag))
            diag = "(below)"
        rows.append(
            (
                leaf.path,
                str(leaf.shape),
                leaf.dtype,
                f"{leaf.difference:.2e}" if leaf.status != "not checked" else "-",
                status,
                checked,
                where,
                "" if w is None else _fmt(w.yours),
                "" if w is None else _fmt(w.numerical),
                diag,
            )
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    out = []
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)]
        out.append(("  " + "  ".join(cells) + "  " + r[-1]).rstrip())
    return out, long
