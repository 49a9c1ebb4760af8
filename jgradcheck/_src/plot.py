"""One picture of a report: which leaves are wrong, and how.

Top: one row per leaf, its relative difference on a log axis over the classic bands of the
gradient-checking recipe (≈1e-7 great, ≈1e-5 double-check, ≥1e-3 bug), with the smallest error
the check could see in that leaf (its resolution) beside it. Below: for each failing leaf,
yours against numerical, entry by entry. Right entries sit on the diagonal; a constant factor
is a line of another slope (2 for a doubled gradient, −1 for a flipped sign), a missing or
extra term moves points off the diagonal by a shift; kinks (non-differentiable points) are
marked. matplotlib is optional (``pip install "jgradcheck[plot]"``) and the user's pyplot state
is never touched: the figure is a plain ``matplotlib.figure.Figure`` drawn with the Agg canvas.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from jgradcheck._src import diagnose, numerics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from jgradcheck._src.report import Entry, GradCheckReport, LeafReport, LeafValues

MSG_NO_MATPLOTLIB = (
    'report.plot() needs matplotlib, which is not installed. Install it with: pip install "jgradcheck[plot]" '
    "(or pip install matplotlib)."
)

# The classic scale's reference points, drawn as lines; the bands follow the report's own grades.
SCALE_LINES = ((1e-7, "1e-7 great"), (1e-5, "1e-5 double-check"), (1e-3, "1e-3 bug"))
# Left end of the difference axis: exact agreement (difference 0) is drawn here.
FLOOR = 1e-16
# At most this many leaves get a row (failing ones first); at most this many failing leaves a panel.
MAX_ROWS = 40
MAX_PANELS = 3
# At most this many points per scatter (a deterministic subset of larger leaves; failures kept).
MAX_POINTS = 20_000

GREEN, ORANGE, RED, GREY = "#2e7d32", "#ef6c00", "#c62828", "#757575"


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or a clear ImportError naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MSG_NO_MATPLOTLIB) from e
    return Figure, FigureCanvasAgg


def plot_report(report: GradCheckReport, path: str | os.PathLike[str] | None = None) -> Figure:
    """Draws ``report`` as a figure; saves it to ``path`` (PNG, SVG, PDF by extension) if given.

    Args:
      report: what :func:`jgradcheck.check_grad` returned.
      path: where to save the figure, or None.

    Returns:
      A ``matplotlib.figure.Figure`` (not registered with pyplot: show it in a notebook by
      leaving it as a cell's value, or save it with ``fig.savefig``).

    Raises:
      ImportError: matplotlib is not installed (``pip install "jgradcheck[plot]"``).
    """
    figure_cls, canvas_cls = _matplotlib()
    failing = [leaf for leaf in report.leaves if not leaf.passed]
    rows = _rows(report)
    shown = failing[:MAX_PANELS]
    # Per failing leaf: yours vs numerical, and (when the parameter values are known) the
    # discrepancy against θ, where a missing L2 term is a straight line. Passing: one scatter.
    panels: list[tuple[str, LeafReport | None]] = []
    for leaf in shown:
        panels.append(("scatter", leaf))
        if _leaf_values(report, leaf) is not None:
            panels.append(("residual", leaf))
    if not panels:
        panels = [("scatter", None)]
    top_h = 1.2 + 0.34 * len(rows)
    bottom_h = 4.6
    fig = figure_cls(figsize=(max(11.0, 4.2 * len(panels)), top_h + bottom_h + 0.9), layout="constrained")
    canvas_cls(fig)
    fig.suptitle(_title(report), fontsize=12, fontweight="bold", color=GREEN if report.passed else RED)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[top_h, bottom_h])
    _leaf_axis(fig.add_subplot(grid[0, :]), report, rows)
    for k, (kind, which) in enumerate(panels):
        ax = fig.add_subplot(grid[1, k])
        if kind == "scatter":
            _entry_axis(ax, report, which)
        else:
            assert which is not None
            _residual_axis(ax, report, which)
    if len(failing) > MAX_PANELS:
        more = ", ".join(leaf.path for leaf in failing[MAX_PANELS:])
        fig.text(0.99, 0.005, _short(f"also failing (see str(report)): {more}", 120), ha="right", color=RED)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _title(report: GradCheckReport) -> str:
    head = report.summary().replace("jgradcheck: ", "")
    return f"{head}\nrelative difference {_num(report.difference)}: {_grade_words(report.difference)}"


def _grade_words(d: float) -> str:
    if not math.isfinite(d) or d >= numerics.GRADE_BUG:
        return "a bug (classic scale: >= 1e-3)"
    if d < numerics.GRADE_GREAT:
        return "great (classic scale: ~1e-7)"
    return "double-check (classic scale: ~1e-5)"


def _num(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _short(text: str, width: int) -> str:
    return textwrap.shorten(text, width, placeholder="...")


def _rows(report: GradCheckReport) -> list[LeafReport]:
    """Leaves shown, in tree order: all failing ones, then passing ones up to ``MAX_ROWS``."""
    leaves = list(report.leaves)
    if len(leaves) <= MAX_ROWS:
        return leaves
    keep = {id(leaf) for leaf in leaves if not leaf.passed}
    for leaf in leaves:
        if len(keep) >= MAX_ROWS:
            break
        keep.add(id(leaf))
    return [leaf for leaf in leaves if id(leaf) in keep]


def _leaf_axis(ax: Any, report: GradCheckReport, rows: list[LeafReport]) -> None:
    """Per leaf: its difference over the classic bands, and its resolution."""
    from matplotlib.lines import Line2D

    lo, hi = FLOOR, 10.0
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    bands = (
        (lo, numerics.GRADE_GREAT, GREEN, "great (~1e-7)"),
        (numerics.GRADE_GREAT, numerics.GRADE_BUG, ORANGE, "double-check (~1e-5)"),
        (numerics.GRADE_BUG, hi, RED, "bug (>= 1e-3)"),
    )
    for a, b, color, label in bands:
        ax.axvspan(a, b, color=color, alpha=0.12, lw=0)
        ax.text(
            math.sqrt(a * b) if a > lo else b / 30,
            1.0,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center" if a > lo else "right",
            va="bottom",
            fontsize=9,
            color=color,
            fontweight="bold",
        )
    for x, _ in SCALE_LINES:
        ax.axvline(x, color=GREY, lw=0.8, ls=":")
    n = len(rows)
    ys = np.arange(n)[::-1]
    for y, leaf in zip(ys, rows):
        d = leaf.difference
        x = hi / 2 if not math.isfinite(d) else min(max(d, lo), hi)
        if math.isfinite(leaf.resolution) and leaf.resolution > 0:
            r = min(max(leaf.resolution, lo), hi)
            ax.plot([lo, r], [y, y], color=GREY, lw=6, alpha=0.25, solid_capstyle="butt")
            ax.plot([r], [y], marker="|", ms=14, mew=2, color=GREY)
        if leaf.passed:
            ax.plot([x], [y], marker="o", ms=9, color=GREEN)
        else:
            ax.plot([x], [y], marker="X", ms=13, color=RED)
            note = f"FAIL: {leaf.n_failed} of {leaf.checked} entries" if leaf.how != "screened" else "FAIL"
            if leaf.diagnosis:
                note += " - " + _short(leaf.diagnosis, 75)
            left = x > 1e-8  # text on the side with room
            ax.annotate(
                note,
                (x, y),
                xytext=(-12 if left else 12, 0),
                textcoords="offset points",
                ha="right" if left else "left",
                va="center",
                fontsize=8.5,
                color=RED,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
            )
        if not math.isfinite(d):
            ax.annotate("nan", (x, y), xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{leaf.path}  {leaf.shape}" for leaf in rows])
    for label, leaf in zip(ax.get_yticklabels(), rows):
        if not leaf.passed:
            label.set_color(RED)
            label.set_fontweight("bold")
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("relative difference per leaf:  |numerical - yours| / (|numerical| + |yours|)")
    handles = [
        Line2D([], [], marker="o", ls="", color=GREEN, ms=8, label="leaf passes"),
        Line2D([], [], marker="X", ls="", color=RED, ms=9, label="leaf fails"),
        Line2D([], [], color=GREY, lw=6, alpha=0.35, label="grey tick: smallest error this check can see in the leaf"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    hidden = len(report.leaves) - n
    if hidden:
        ax.set_title(f"({hidden} more passing leaves not shown)", loc="left", fontsize=8, color=GREY)


def _leaf_values(report: GradCheckReport, leaf: LeafReport) -> LeafValues | None:
    data = getattr(report, "entry_values", None)
    if data is None:
        return None
    for row, v in zip(report.leaves, data):
        if row.path == leaf.path:
            return v
    return None


def _values(report: GradCheckReport, leaf: LeafReport | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(yours, numerical, status) of ``leaf`` (all leaves if None), and what they are."""
    data = getattr(report, "entry_values", None)
    if data is not None:
        picked = [v for row, v in zip(report.leaves, data) if v is not None and (leaf is None or row.path == leaf.path)]
        if picked:
            y = np.concatenate([np.asarray(v.yours, np.float64) for v in picked])
            n = np.concatenate([np.asarray(v.numerical, np.float64) for v in picked])
            st = np.concatenate([np.asarray(v.status).astype(str) for v in picked])
            return y, n, st, f"{y.size} entries"
    entries: list[Entry] = [e for e in report.worst if leaf is None or e.path == leaf.path]
    if leaf is not None and leaf.worst is not None and all(e.name != leaf.worst.name for e in entries):
        entries.append(leaf.worst)
    entries += [e for e in report.kinks if (leaf is None or e.path == leaf.path) and e not in entries]
    y = np.array([e.yours for e in entries], np.float64)
    n = np.array([e.numerical for e in entries], np.float64)
    st = np.array([e.status for e in entries], dtype=str)
    return y, n, st, f"the report's {len(entries)} worst entries"


def _thin(keep: np.ndarray, size: int) -> np.ndarray:
    """Indices to draw: every entry in ``keep`` (up to ``MAX_POINTS``), the rest thinned evenly."""
    idx = np.arange(size)
    if size <= MAX_POINTS:
        return idx
    rest = idx[~keep]
    step = max(1, rest.size // MAX_POINTS)
    return np.sort(np.concatenate([idx[keep][:MAX_POINTS], rest[::step]]))


def _square(ax: Any, vals: np.ndarray) -> float:
    vals = vals[np.isfinite(vals)]
    m = float(np.max(np.abs(vals))) if vals.size else 1.0
    m = 1.1 * (m if m > 0 else 1.0)
    ax.set_xlim(-m, m)
    ax.set_ylim(-m, m)
    ax.set_aspect("equal", adjustable="box")
    ax.axhline(0, color=GREY, lw=0.5)
    ax.axvline(0, color=GREY, lw=0.5)
    return m


def _points(ax: Any, x: np.ndarray, y: np.ndarray, st: np.ndarray) -> None:
    """Entries coloured by verdict: agrees, fails, kink (accepted), unverifiable."""
    size = 10 if x.size > 300 else 24
    for status, color, marker, label in (
        ("ok", GREEN, "o", "agrees"),
        ("fail", RED, "o", "fails"),
        ("kink", ORANGE, "^", "kink (accepted)"),
        ("nan", GREY, "s", "J not finite at θ ± h"),
    ):
        sel = st == status
        if sel.any():
            ax.scatter(
                x[sel],
                y[sel],
                s=size if status != "kink" else 50,
                color=color,
                marker=marker,
                alpha=0.75,
                lw=0,
                label=f"{label} ({int(sel.sum())})",
            )


def _entry_axis(ax: Any, report: GradCheckReport, leaf: LeafReport | None) -> None:
    """Yours against numerical, entry by entry: one failing leaf, or every leaf of a passing report."""
    y, n, st, what = _values(report, leaf)
    finite = np.isfinite(y) & np.isfinite(n)
    sel = _thin(st[finite] == "fail", int(finite.sum()))
    y, n, st = y[finite][sel], n[finite][sel], st[finite][sel]
    m = _square(ax, np.concatenate([y, n]))
    ax.plot([-m, m], [-m, m], color=GREY, ls="--", lw=1, label="yours = numerical: right")
    _points(ax, n, y, st)
    line = _shape_of(n, y)
    if line is not None:
        a, b, label = line
        ax.plot([-m, m], [a * -m + b, a * m + b], color=RED, lw=1.2, alpha=0.7, label=label)
    ax.set_xlabel("numerical (finite differences)")
    ax.set_ylabel("yours")
    if leaf is None:
        ax.set_title(f"yours vs numerical, all leaves ({what})", fontsize=10)
    else:
        ax.set_title(f"{leaf.path}: yours vs numerical ({what})", fontsize=10, color=RED)
    ax.legend(loc="upper left", fontsize=7.5, framealpha=0.9)


def _shape_of(n: np.ndarray, y: np.ndarray) -> tuple[float, float, str] | None:
    """The line the discrepancy follows, when one explains it: a factor, or a constant shift."""
    diff = y - n
    if diff.size < 2 or float(np.linalg.norm(diff)) == 0:
        return None
    c = diagnose.fitted_factor(y, n)
    if c is not None and abs(c - 1) > diagnose.NEAR:
        return c, 0.0, f"yours ≈ {c:.3g} × numerical (slope {c:.3g})"
    shift = float(np.mean(diff))
    if shift != 0 and float(np.std(diff)) <= diagnose.FIT * abs(shift):
        return 1.0, shift, f"yours ≈ numerical {'+' if shift > 0 else '-'} {abs(shift):.3g} (a shift)"
    return None


def _residual_axis(ax: Any, report: GradCheckReport, leaf: LeafReport) -> None:
    """yours − numerical against the parameter θ: a missing (or extra) L2 term is a line through 0."""
    v = _leaf_values(report, leaf)
    assert v is not None
    theta = np.asarray(v.parameter, np.float64)
    diff = np.asarray(v.yours, np.float64) - np.asarray(v.numerical, np.float64)
    st = np.asarray(v.status).astype(str)
    finite = np.isfinite(theta) & np.isfinite(diff)
    sel = _thin(st[finite] == "fail", int(finite.sum()))
    theta, diff, st = theta[finite][sel], diff[finite][sel], st[finite][sel]
    ax.axhline(0, color=GREY, ls="--", lw=1, label="yours - numerical = 0: right")
    ax.axvline(0, color=GREY, lw=0.5)
    _points(ax, theta, diff, st)
    tt = float(theta @ theta)
    if tt > 0 and diff.size >= 2:
        s = float(theta @ diff) / tt
        if float(np.linalg.norm(diff - s * theta)) <= diagnose.FIT * float(np.linalg.norm(diff)):
            xs = np.array([theta.min(), theta.max()])
            word = "missing" if s < 0 else "extra"
            ax.plot(
                xs, s * xs, color=RED, lw=1.2, alpha=0.7, label=f"≈ {s:.3g} × θ: {word} L2 term, λ/m ≈ {abs(s):.3g}"
            )
    ax.set_xlabel("parameter value θ")
    ax.set_ylabel("yours - numerical")
    ax.set_title(f"{leaf.path}: the discrepancy against θ", fontsize=10, color=RED)
    ax.legend(loc="upper left", fontsize=7.5, framealpha=0.9)
