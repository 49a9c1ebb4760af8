"""Modes for large models: sampled entries, random-direction screening, bisection, Taylor test.

Screening compares directional derivatives: for a random Rademacher direction d inside one
leaf, (J(θ+hd) − J(θ−hd)) / 2h against yoursᵀd, judged against the same finite-difference
error estimate as single entries (not a fixed tolerance: that is how torch's fast_mode misses
a few wrong entries, pytorch/pytorch#57166). Each leaf's random stream is seeded by its path,
so adding a leaf never changes the other leaves' directions. A leaf that fails is searched by
bisection (halves tested with fresh directions) down to small groups, which are then checked
entry by entry, together with a random sample of its entries.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from jgradcheck._src import numerics
from jgradcheck._src.engine import Progress

# Leaves up to this size that fail screening are checked entry by entry in full.
LOCATE_FULL_MAX = 4096
# Bisection stops splitting groups at this size and checks their entries one by one.
GROUP_MIN = 32
# At most this many bisection tests (4 cost evaluations each) per failing leaf.
BISECT_BUDGET = 96
# Entries sampled at random in a failing leaf besides those bisection found.
LOCATE_SAMPLE = 64


@dataclasses.dataclass
class LeafResult:
    coords: object | None  # check._Coords, or None when only screened
    how: str
    n_dirs: int = 0
    difference: float = 0.0
    resolution: float = 0.0
    extra_failures: int = 0
    note: str | None = None


def leaf_rng(path: str, seed: int, salt: int = 0) -> np.random.Generator:
    """A random stream that depends on the leaf's path only (plus seed and a salt)."""
    return np.random.default_rng([zlib.crc32(path.encode()), seed, salt])


def _pow2(x: np.ndarray) -> np.ndarray:
    return np.exp2(np.round(np.log2(x)))


def _direction(theta: np.ndarray, subset: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rademacher signs on ``subset``, scaled by max(1, |θ|)/√|subset| and rounded to powers of two.

    Why powers of two: t·d is then exact, so θ + t·d rounds the same on device and host, and
    the displacement actually taken is known exactly.
    """
    d = np.zeros_like(theta)
    scale = _pow2(np.maximum(1.0, np.abs(theta[subset])) / math.sqrt(subset.size))
    d[subset] = rng.choice([-1.0, 1.0], size=subset.size) * scale
    return d


def _line(engine, problem, leaf: int, d: np.ndarray, ts: np.ndarray):
    """J(θ + t d) for d inside one leaf, and the displacements Δ(t) actually taken."""
    direction = [np.zeros((1, *f.shape)) for f in problem.floats]
    f = problem.floats[leaf]
    direction[leaf] = d.reshape((1, *f.shape))
    values = engine.line_costs(direction, ts)
    base = np.asarray(f).ravel()
    dtype = base.dtype
    deltas = [
        ((base + (np.asarray(t, dtype) * d.astype(dtype))).astype(dtype)).astype(np.float64) - base.astype(np.float64)
        for t in ts
    ]
    return values, deltas


def _directional(engine, problem, leaf, g, g_eps, noise, opts, d):
    """(yours, numerical, tolerance) for the directional derivative along d."""
    h = float(_pow2(np.array(numerics.machine_eps(problem.dtype) ** (1 / 3))))
    ts = np.array([h, -h, 2 * h, -2 * h])
    v, deltas = _line(engine, problem, leaf, d, ts)
    yours = float(g @ (deltas[0] - deltas[1])) / (2 * h)
    n_h = (v[0] - v[1]) / (2 * h)
    n_2h = (v[2] - v[3]) / (4 * h)
    numerical = (4 * n_h - n_2h) / 3
    roundoff = noise * numerics.roundoff_factor("central4") / h
    trunc = abs(n_h - n_2h) / 3
    floor = numerics.GRAD_ULPS * g_eps * float(np.abs(g) @ np.abs(d)) + opts.atol + opts.rtol * abs(numerical)
    return yours, numerical, opts.safety * (roundoff + trunc) + floor


def directional_test(engine, problem, leaf, g, g_eps, noise, opts, n_dirs, seed, subset=None, salt=0):
    """Screens one leaf (or a subset of its entries) with ``n_dirs`` random directions."""
    theta = np.asarray(problem.floats[leaf], np.float64).ravel()
    subset = np.arange(theta.size) if subset is None else subset
    rng = leaf_rng(problem.paths[leaf], seed, salt)
    rows = [
        _directional(engine, problem, leaf, g, g_eps, noise, opts, _direction(theta, subset, rng))
        for _ in range(n_dirs)
    ]
    ys, ns, tols = (np.array(x) for x in zip(*rows))
    fails = int(np.sum(~(np.abs(ys - ns) <= tols)))
    return fails, ys, ns, tols


def _bisect(engine, problem, leaf, g, g_eps, noise, opts, seed) -> tuple[np.ndarray, int]:
    """Entries in small groups that still fail when a failing leaf is split in halves."""
    size = int(problem.floats[leaf].size)
    queue = [np.arange(size)]
    found, tests, salt = [], 0, 1
    while queue and tests < BISECT_BUDGET:
        group = queue.pop(0)
        if group.size <= GROUP_MIN:
            found.append(group)
            continue
        for half in np.array_split(group, 2):
            salt += 1
            tests += 1
            fails, *_ = directional_test(engine, problem, leaf, g, g_eps, noise, opts, 1, seed, half, salt)
            if fails:
                queue.append(half)
    found += [q for q in queue if q.size <= GROUP_MIN]
    idx = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return idx, tests


def run_mode(mode, engine, problem, grads, g_eps, noise, opts, sample_size, n_dirs, seed, progress, n):
    """Per-leaf results for ``mode`` in ("full", "sample", "screen")."""
    from jgradcheck._src.check import _show, check_leaves

    sizes = [int(f.size) for f in problem.floats]
    per_entry = len(numerics.STENCILS[opts.method][0])
    if mode == "full":
        total = per_entry * n
    elif mode == "sample":
        total = per_entry * sum(min(s, sample_size) for s in sizes)
    else:
        total = 4 * n_dirs * len(sizes)
    bar = Progress(total, _show(progress, total // 2))
    results: dict[int, LeafResult] = {}
    if mode in ("full", "sample"):
        sel = {}
        for i, size in enumerate(sizes):
            if mode == "full" or size <= sample_size:
                sel[i] = np.arange(size)
            else:
                sel[i] = np.sort(leaf_rng(problem.paths[i], seed).choice(size, sample_size, replace=False))
        coords = check_leaves(engine, problem, sel, grads, g_eps, noise, opts, bar)
        for i, size in enumerate(sizes):
            results[i] = LeafResult(coords[i], "entries" if sel[i].size == size else "sampled")
    else:
        to_locate: dict[int, np.ndarray] = {}
        notes: dict[int, tuple[str, int]] = {}
        for i, size in enumerate(sizes):
            g = grads[i]
            fails, ys, ns, tols = directional_test(engine, problem, i, g, g_eps[i], noise, opts, n_dirs, seed)
            bar.update(4 * n_dirs)
            rms = float(np.sqrt(np.mean(ns**2)))
            resolution = float(np.median(tols)) / rms if rms > 0 else math.inf
            if not fails:
                results[i] = LeafResult(None, "screened", n_dirs, numerics.relative_difference(ns, ys), resolution)
                continue
            note = f"failed {fails}/{n_dirs} random directions"
            if size <= LOCATE_FULL_MAX:
                to_locate[i] = np.arange(size)
            else:
                found, tests = _bisect(engine, problem, i, g, g_eps[i], noise, opts, seed)
                sample = leaf_rng(problem.paths[i], seed, 10**6).choice(size, min(size, LOCATE_SAMPLE), replace=False)
                to_locate[i] = np.unique(np.concatenate([found, sample]).astype(np.int64))
                note += (
                    f"; bisection ({tests} tests) narrowed it to {found.size} entries"
                    if found.size
                    else f"; bisection ({tests} tests): the error is spread over the leaf"
                )
            notes[i] = (note, fails)
        coords = check_leaves(engine, problem, to_locate, grads, g_eps, noise, opts, bar)
        for i, c in coords.items():
            note, fails = notes[i]
            n_bad = int(np.sum(c.status == "fail"))
            how = "entries" if c.idx.size == sizes[i] else "sampled"
            results[i] = LeafResult(c, how, n_dirs, extra_failures=0 if n_bad else fails, note=note)
    out = [results[i] for i in range(len(sizes))]
    bar.close()
    return out


def taylor_slopes(engine, problem, grads, noise, seed) -> list[float]:
    """Fitted slope of log|J(θ+td) − J(θ) − t yoursᵀd| against log t, per leaf.

    Why: for a correct gradient the remainder is O(t²) (slope 2), for a wrong one O(t)
    (slope 1), whatever the step; points below the noise of J are dropped.
    """
    ts = 2.0**-3 * 4.0 ** -np.arange(8)
    out = []
    for i, f in enumerate(problem.floats):
        theta = np.asarray(f, np.float64).ravel()
        d = _direction(theta, np.arange(theta.size), leaf_rng(problem.paths[i], seed, 7))
        values, deltas = _line(engine, problem, i, d, ts)
        r = np.array([abs(v - problem.j0 - float(grads[i] @ dl)) for v, dl in zip(values, deltas)])
        ok = r > 100 * noise
        if ok.sum() < 3:
            out.append(math.nan)
            continue
        slope = np.polyfit(np.log(ts[ok]), np.log(r[ok]), 1)[0]
        out.append(float(slope))
    return out
