"""Modes: every entry (full), a sample per leaf, or random-direction screening then a search."""

from __future__ import annotations

import math
import sys

import numpy as np

from jgradcheck._src import numerics, screen
from jgradcheck._src.engine import Progress
from jgradcheck._src.options import show_progress
from jgradcheck._src.progress import duration
from jgradcheck._src.schedule import Budget, check_leaves

MSG_OVER_BUDGET = (
    "jgradcheck: a full check of all {n:,} entries is projected to take more than time_budget={budget:g} s "
    "({elapsed} in, {done:,} of {planned:,} evaluations done): screening instead (random directions per "
    "leaf, then a search for the wrong entries of any leaf that fails). Pass mode='full' to check every "
    "entry, or a larger time_budget."
)


def over_budget_note(n: int, budget: Budget) -> str:
    """The report's mode note when ``mode="auto"`` gave up a full check for screening."""
    return (
        f"screen (auto: a full check of {n:,} entries was projected over time_budget {budget.seconds:g} s "
        f"after {budget.done:,} of {budget.planned:,} evaluations; mode='full' checks every entry)"
    )


def tell_over_budget(n: int, budget: Budget, progress: bool | None) -> None:
    """Says on stderr that the check screens instead (unless ``progress=False``: silence asked)."""
    if progress is False:
        return
    words = MSG_OVER_BUDGET.format(
        n=n, budget=budget.seconds, elapsed=duration(budget.elapsed), done=budget.done, planned=budget.planned
    )
    sys.stderr.write(words + "\n")
    sys.stderr.flush()


def run_mode(mode, engine, problem, yours, noise, opts, sample_size, n_dirs, seed, progress, n, budget=None):
    """Per-leaf results for ``mode`` in ("full", "sample", "screen"); ``yours`` is a ``Yours``.

    A ``budget`` (full mode only) stops the check with ``schedule.Cancelled`` once it is projected
    to run over (see ``schedule.Budget``).
    """
    sizes = [int(f.size) for f in problem.floats]
    per_entry = len(numerics.STENCILS[opts.method][0])
    if mode == "full":
        total = per_entry * n
    elif mode == "sample":
        total = per_entry * sum(min(s, sample_size) for s in sizes)
    else:
        total = 4 * n_dirs * len(sizes)
    bar = Progress(total, **show_progress(progress, total))  # total: evaluations of J
    try:
        out = _run(mode, engine, problem, yours, noise, opts, sample_size, n_dirs, seed, sizes, bar, budget)
    except BaseException:
        bar.close(stopped=True)
        raise
    bar.close()
    return out


def _run(mode, engine, problem, yours, noise, opts, sample_size, n_dirs, seed, sizes, bar, budget):
    results: dict[int, screen.LeafResult] = {}
    if mode in ("full", "sample"):
        sel = {}
        for i, size in enumerate(sizes):
            if mode == "full" or size <= sample_size:
                sel[i] = np.arange(size)
            else:
                sel[i] = np.sort(screen.leaf_rng(problem.paths[i], seed).choice(size, sample_size, replace=False))
        coords = check_leaves(engine, problem, sel, yours, noise, opts, bar, budget if mode == "full" else None)
        for i, size in enumerate(sizes):
            results[i] = screen.LeafResult(coords[i], "entries" if sel[i].size == size else "sampled")
    else:
        grads, g_eps = yours.get()
        to_locate: dict[int, np.ndarray] = {}
        notes: dict[int, tuple[str, int]] = {}
        for i, size in enumerate(sizes):
            g = grads[i]
            fails, ys, ns, tols = screen.directional_test(engine, problem, i, g, g_eps[i], noise, opts, n_dirs, seed)
            bar.update(4 * n_dirs)
            rms = float(np.sqrt(np.mean(ns**2)))
            resolution = float(np.median(tols)) / rms if rms > 0 else math.inf
            if not fails:
                results[i] = screen.LeafResult(
                    None,
                    "screened",
                    n_dirs,
                    numerics.relative_difference(ns, ys),
                    resolution,
                    dir_yours=ys,
                    dir_numerical=ns,
                    dir_tol=np.asarray(tols, np.float64),
                )
                continue
            note = f"failed {fails} of {numerics.plural(n_dirs, 'random direction')}"
            if size <= screen.LOCATE_FULL_MAX:
                to_locate[i] = np.arange(size)
            else:
                found, tests = screen.bisect(engine, problem, i, g, g_eps[i], noise, opts, seed)
                sample = screen.leaf_rng(problem.paths[i], seed, 10**6).choice(
                    size, min(size, screen.LOCATE_SAMPLE), replace=False
                )
                to_locate[i] = np.unique(np.concatenate([found, sample]).astype(np.int64))
                runs = numerics.plural(tests, "test")
                note += (
                    f"; bisection ({runs}) narrowed it to {numerics.plural(int(found.size), 'entry', 'entries')}"
                    if found.size
                    else f"; bisection ({runs}): the error is spread over the leaf"
                )
            notes[i] = (note, fails)
        coords = check_leaves(engine, problem, to_locate, yours, noise, opts, bar)
        for i, c in coords.items():
            note, fails = notes[i]
            n_bad = int(np.sum(c.status == "fail"))
            how = "entries" if c.idx.size == sizes[i] else "sampled"
            results[i] = screen.LeafResult(c, how, n_dirs, extra_failures=0 if n_bad else fails, note=note)
    return [results[i] for i in range(len(sizes))]
