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

from jgradcheck._src import estimate, numerics, precision

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
    dir_yours: np.ndarray | None = None  # screened leaves: yoursᵀd and numerical per direction
    dir_numerical: np.ndarray | None = None
    dir_tol: np.ndarray | None = None  # ... and each direction's error bound


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


def _lines(engine, problem, leaf: int, dirs: list[np.ndarray], ts: np.ndarray):
    """J(θ + t d) for every direction in ``dirs`` (flat, inside one leaf) and every t, in one
    call through the program of the leaf's group, and the displacements Δ(t) actually taken
    (exact: see ``_direction``).

    Returns values (num_dirs, len(ts)) and, per direction and t, Δ(t) as (support, values).
    """
    group = problem.group_of(leaf)
    sizes = [int(problem.floats[i].size) for i in group]
    start = sum(sizes[: group.index(leaf)])
    stack = np.zeros((len(dirs), sum(sizes)))
    for k, d in enumerate(dirs):
        stack[k, start : start + d.size] = d
    all_ts = np.tile(ts, len(dirs))
    which = np.repeat(np.arange(len(dirs)), len(ts))
    values = engine.line_costs(group, stack, all_ts, which).reshape(len(dirs), len(ts))
    base = problem.host(leaf)
    dtype = base.dtype
    deltas = []
    for d in dirs:
        support = np.flatnonzero(d)
        b, ds = base[support], d[support].astype(dtype)
        deltas.append(
            [(support, (b + np.asarray(t, dtype) * ds).astype(np.float64) - b.astype(np.float64)) for t in ts]
        )
    return values, deltas


def _step(problem, leaf: int) -> float:
    """∛eps of the narrowest float on the leaf's path to J (``precision.path_precision``)."""
    eps = max(numerics.machine_eps(problem.dtype), precision.path_precision(problem).eps[leaf])
    return float(_pow2(np.array(eps ** (1 / 3))))


def _judge(engine, problem, leaf, g, g_eps, noise, opts, dirs):
    """(yours, numerical, tolerance) per direction in ``dirs`` (inside one leaf), one batched call.

    For each direction d: yoursᵀΔ against (J(θ+Δ(h)) − J(θ+Δ(−h))) / 2h, Richardson-improved
    with 2h, judged against the finite-difference error estimate: round-off from the noise of
    J, truncation from |D(h) − D(2h)| / 3, and your gradient's own rounding.
    """
    h = _step(problem, leaf)
    ts = np.array([h, -h, 2 * h, -2 * h])
    values, deltas = _lines(engine, problem, leaf, dirs, ts)
    # The same floors as entry by entry (estimate.check_entries): J's grid in the dtype it is
    # computed in along this leaf's path, and your gradient's measured rounding in its own dtype.
    path_eps = precision.path_precision(problem).eps[leaf]
    measured = precision.entry_grad_rounding(problem, (leaf,), np.zeros(1, np.int64), np.array([g_eps]))[0]
    ys, ns, tols = [], [], []
    for d, v, dl in zip(dirs, values, deltas):
        n_h = (v[0] - v[1]) / (2 * h)
        n_2h = (v[2] - v[3]) / (4 * h)
        numerical = (4 * n_h - n_2h) / 3
        nz = float(estimate.quantum_floor(noise, np.array(path_eps), problem.j0, v))
        roundoff = nz * numerics.roundoff_factor("central4") / h
        trunc = abs(n_h - n_2h) / 3
        (sup, dp), (_, dm) = dl[0], dl[1]
        floor = (
            max(
                float(numerics.grad_rounding(np.abs(g[sup]) @ np.abs(d[sup]), g_eps, 0.0)),
                measured * float(np.sum(np.abs(d[sup]))),
            )
            + opts.atol
            + opts.rtol * abs(numerical)
        )
        ys.append(float(g[sup] @ (dp - dm)) / (2 * h))
        ns.append(numerical)
        tols.append(opts.safety * (roundoff + trunc) + floor)
    ys_a, ns_a, tols_a = np.array(ys), np.array(ns), np.array(tols)
    off = np.flatnonzero(~(np.abs(ys_a - ns_a) <= tols_a))
    if off.size:  # as entry by entry: a float64 gradient near 0 is defined only to its terms' rounding
        check = precision.measured_check_rounding(problem)[leaf]
        for k in off:
            sup = deltas[k][0][0]
            tols_a[k] += check * float(np.sum(np.abs(dirs[k][sup])))
    return ys_a, ns_a, tols_a


def directional_test(engine, problem, leaf, g, g_eps, noise, opts, n_dirs, seed):
    """Screens one leaf with ``n_dirs`` random directions (drawn from a stream set by its path).

    Returns:
      (number of failing directions, yours, numerical, tolerances), one entry per direction.
    """
    theta = problem.host(leaf).astype(np.float64)
    rng = leaf_rng(problem.paths[leaf], seed)
    dirs = [_direction(theta, np.arange(theta.size), rng) for _ in range(n_dirs)]
    ys, ns, tols = _judge(engine, problem, leaf, g, g_eps, noise, opts, dirs)
    return int(np.sum(~(np.abs(ys - ns) <= tols))), ys, ns, tols


# Bisection gives up when this many disjoint groups still fail: the error is spread out.
SPREAD = 8


def bisect(engine, problem, leaf, g, g_eps, noise, opts, seed) -> tuple[np.ndarray, int]:
    """Entries in small groups that still fail when a failing leaf is split in halves.

    Each level tests all halves of the failing groups with one random direction each (one
    batched call per level); it stops at groups of ``GROUP_MIN`` entries, after
    ``BISECT_BUDGET`` tests, or when more than ``SPREAD`` groups fail (errors everywhere).
    """
    size = int(problem.floats[leaf].size)
    level, tests, found = [np.arange(size)], 0, []
    depth = 0
    while level and tests < BISECT_BUDGET and len(level) <= SPREAD:
        depth += 1
        small = [grp for grp in level if grp.size <= GROUP_MIN]
        found += small
        halves = [h for grp in level if grp.size > GROUP_MIN for h in np.array_split(grp, 2)]
        if not halves:
            level = []
            break
        theta = problem.host(leaf).astype(np.float64)
        rng = leaf_rng(problem.paths[leaf], seed, 1000 + depth)
        dirs = [_direction(theta, hv, rng) for hv in halves]
        ys, ns, tols = _judge(engine, problem, leaf, g, g_eps, noise, opts, dirs)
        tests += len(halves)
        level = [hv for hv, bad in zip(halves, ~(np.abs(ys - ns) <= tols)) if bad]
    if len(level) <= SPREAD:
        found += [grp for grp in level if grp.size <= GROUP_MIN]
    idx = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return idx, tests


def taylor_slopes(engine, problem, grads, noise, seed) -> list[float]:
    """Fitted slope of log|J(θ+td) − J(θ) − t yoursᵀd| against log t, per leaf.

    Why: for a correct gradient the remainder is O(t²) (slope 2), for a wrong one O(t)
    (slope 1), whatever the step; points below the noise of J are dropped.
    """
    ts = 2.0**-3 * 4.0 ** -np.arange(8)
    out = []
    for i in range(len(problem.floats)):
        theta = problem.host(i).astype(np.float64)
        d = _direction(theta, np.arange(theta.size), leaf_rng(problem.paths[i], seed, 7))
        values, deltas = _lines(engine, problem, i, [d], ts)
        r = np.array([abs(v - problem.j0 - float(grads[i][sup] @ dl)) for v, (sup, dl) in zip(values[0], deltas[0])])
        ok = r > 100 * noise
        if ok.sum() < 3:
            out.append(math.nan)
            continue
        slope = np.polyfit(np.log(ts[ok]), np.log(r[ok]), 1)[0]
        out.append(float(slope))
    return out
