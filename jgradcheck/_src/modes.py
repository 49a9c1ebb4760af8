"""Modes: every entry (full), a sample per leaf, or random-direction screening then a search."""

from __future__ import annotations

import math

import numpy as np

from jgradcheck._src import numerics, screen
from jgradcheck._src.engine import Progress
from jgradcheck._src.options import show_progress
from jgradcheck._src.schedule import check_leaves


def run_mode(mode, engine, problem, yours, noise, opts, sample_size, n_dirs, seed, progress, n):
    """Per-leaf results for ``mode`` in ("full", "sample", "screen"); ``yours`` is a ``Yours``."""
    sizes = [int(f.size) for f in problem.floats]
    per_entry = len(numerics.STENCILS[opts.method][0])
    if mode == "full":
        total = per_entry * n
    elif mode == "sample":
        total = per_entry * sum(min(s, sample_size) for s in sizes)
    else:
        total = 4 * n_dirs * len(sizes)
    bar = Progress(total, show_progress(progress, total))  # total: evaluations of J
    results: dict[int, screen.LeafResult] = {}
    if mode in ("full", "sample"):
        sel = {}
        for i, size in enumerate(sizes):
            if mode == "full" or size <= sample_size:
                sel[i] = np.arange(size)
            else:
                sel[i] = np.sort(screen.leaf_rng(problem.paths[i], seed).choice(size, sample_size, replace=False))
        coords = check_leaves(engine, problem, sel, yours, noise, opts, bar)
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
    out = [results[i] for i in range(len(sizes))]
    bar.close()
    return out
