"""Estimates and verdicts: central differences per entry, their error bounds, kinks.

``check_entries`` evaluates the stencil at the chosen entries of one group of leaves, estimates
the finite-difference error (round-off from J's noise, truncation from a second step 2h for
suspects), judges yours against it, and tells kinks (one-sided slopes that do not agree) from
bugs. ``schedule.check_leaves`` runs the groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jgradcheck._src import numerics, precision
from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.options import Options
from jgradcheck._src.probe import NoiseBox, probe_entries
from jgradcheck._src.problem import Problem

MSG_STEP_LOST = (
    "the step h = {h:g} is lost in {dtype} at {entry} = {theta:g}: θ + h and θ - h round to the "
    "same number, so the finite difference there is 0/0 ({count} entries like this). Use the "
    "default step (eps=None), which scales with |θ|, or a larger eps, or x64=True."
)


@dataclasses.dataclass
class Coords:
    """Per-coordinate results for a set of entries of one leaf.

    ``tol`` is the whole tolerance: ``fd_tol`` (the finite-difference error estimate times the
    safety factor, which sets how small an error the check can see), plus your gradient's own
    rounding, plus your atol/rtol. ``how`` says how an entry was judged when the first step
    would not do: ``"smaller step"``, ``"one-sided"`` (J is NaN/Inf on one side: a domain
    edge), ``"kink nearby"`` (a kink within reach of the first step; judged with steps that stay
    on one side of it). ``cause`` is what dominates ``fd_tol``: ``"noise"`` or ``"truncation"``.
    """

    idx: np.ndarray
    numerical: np.ndarray
    tol: np.ndarray
    status: np.ndarray  # "ok" | "fail" | "kink" | "nan"
    left: np.ndarray
    right: np.ndarray
    fd_tol: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    how: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, object))
    cause: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, object))
    step: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    def take(self, sl: Any) -> Coords:
        return Coords(*(getattr(self, f.name)[sl] for f in dataclasses.fields(self)))


def costs(
    engine: Engine, problem: Problem, group: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, progress: Progress
) -> np.ndarray:
    """``engine.costs``, except at points whose J this problem's shared table already holds
    (``Problem.evaluations``: the forward-mode check evaluated them, the reverse-mode check of
    the same projected cost asks again); the points evaluated here are added to it."""
    table = None if problem.evaluations is None else problem.evaluations.setdefault(tuple(group), {})
    if table is None:
        return engine.costs(group, idx, vals, progress)
    idx, vals = np.asarray(idx), np.asarray(vals)
    keys = list(zip(idx.tolist(), vals.tolist()))  # exact: a float32 or float64 value as a Python float
    hit = np.fromiter((k in table for k in keys), bool, len(keys))
    out = np.empty(len(keys), np.float64)
    if hit.any():
        out[hit] = [table[k] for k, h in zip(keys, hit) if h]
        progress.update(int(hit.sum()))
    if not hit.all():
        miss = np.flatnonzero(~hit)
        got = engine.costs(group, idx[miss], vals[miss], progress)
        out[miss] = got
        table.update(zip((keys[m] for m in miss), got.tolist()))
    return out


def _points(theta: np.ndarray, h: np.ndarray, offsets: Sequence[int], dtype) -> np.ndarray:
    """θ + o·h in the check dtype (exact for power-of-two h; see numerics.base_step)."""
    return np.concatenate([(theta + o * h).astype(dtype) for o in offsets])


def entry_name(problem: Problem, group: tuple[int, ...], flat: int) -> str:
    """``W2[3, 1]`` for a position in the concatenation of the group's leaves."""
    for i in group:
        size = int(problem.floats[i].size)
        if flat < size:
            shape = tuple(problem.floats[i].shape)
            index = ", ".join(str(int(j)) for j in np.unravel_index(flat, shape)) if shape else ""
            return f"{problem.paths[i]}[{index}]"
        flat -= size
    return "?"


@dataclasses.dataclass
class _Search:
    """What the step search found for a set of suspects (NaN where it found nothing usable)."""

    estimate: np.ndarray
    error: np.ndarray  # truncation + round-off of ``estimate`` (before the safety factor)
    cause: np.ndarray
    step: np.ndarray
    how: np.ndarray
    kink_near: np.ndarray  # a kink crossed by the larger steps, not by the one judged with
    kink_at: np.ndarray  # a kink at θ (within the smallest step that can still see it)
    noise: np.ndarray  # J's noise per entry as the ladder saw it (never below the noise it was given)


def _kink_reach(
    gaps: np.ndarray, steps: np.ndarray, noise: float | np.ndarray, safety: float
) -> tuple[np.ndarray, np.ndarray]:
    """Where along a ladder of steps (largest first) the one-sided slopes straddle a kink.

    ``gaps[k]`` is the forward minus the backward slope at ``steps[k]``. A pair of neighbouring
    steps is crossed when the gap stays put between them (``numerics.is_kink``). Returns, per
    entry, the deepest crossed pair (−1 if none) and whether the jump persists down to the
    smallest step that could still see it (a kink at θ) rather than vanishing (a kink nearby).
    """
    n_levels, k = gaps.shape
    thr = safety * 4 * noise / steps
    deepest = np.full(k, -1)
    for m in range(n_levels - 1):
        crossed = numerics.is_kink(gaps[m + 1], gaps[m], thr[m + 1], float(np.median(steps[m] / steps[m + 1])))
        deepest[crossed] = m
    at = deepest >= 0
    for e in np.flatnonzero(at):
        jump = abs(gaps[deepest[e] + 1, e])
        below = np.arange(deepest[e] + 2, n_levels)
        visible = below[thr[below, e] < 0.5 * jump]
        # The jump vanished at a step where it would still have been seen: the kink is nearby.
        if np.any(~(np.abs(gaps[visible, e]) >= 0.5 * jump)):
            at[e] = False
    return deepest, at


# A slope jump at a kink is of the size of the slopes around it; a one-sided excess many times
# the derivative is steep curvature (exp(10^6 θ)), not a kink.
KINK_JUMP_MAX = 10.0


def _one_side_jumps(
    estimate: np.ndarray,
    d: np.ndarray,
    fwd: np.ndarray,
    bwd: np.ndarray,
    ladder: np.ndarray,
    best: np.ndarray,
    up: int,
    noise: float | np.ndarray,
    safety: float,
) -> np.ndarray:
    """Whether the first step's one-sided slopes show a kink on one side only.

    A kink between h/4 and h leaves no flat gap on the ladder (``_kink_reach``), but the side
    that crosses it departs from the smooth model f'(θ) ± a s + b s² fitted at the converged
    level (a from the gap between the slopes, b from the central difference), while the other
    side follows it; curvature moves both sides alike.
    """
    rows = np.arange(estimate.size)
    s = ladder[best + 1, rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (fwd[best + 1, rows] - bwd[best + 1, rows]) / (2 * s)
        b = (d[best + 1, rows] - estimate) / s**2
        h = ladder[up]
        dev_r = fwd[up] - (estimate + a * h + b * h**2)
        dev_l = bwd[up] - (estimate - a * h + b * h**2)
        tol = safety * 2 * noise / h + 4 * np.abs(b) * h**2
        jump = np.maximum(np.abs(dev_r), np.abs(dev_l))
        quiet = np.minimum(np.abs(dev_r), np.abs(dev_l))
        other = np.where(np.abs(dev_r) > np.abs(dev_l), bwd[up], fwd[up])
        sized = jump <= KINK_JUMP_MAX * np.maximum(np.abs(estimate), np.abs(other))
    return (jump > tol) & (quiet <= tol) & (quiet < jump / 4) & sized


def _search(
    engine: Engine,
    problem: Problem,
    group: tuple[int, ...],
    idx: np.ndarray,
    theta: np.ndarray,
    h: np.ndarray,
    j_h: tuple[np.ndarray, np.ndarray],
    j_2h: tuple[np.ndarray, np.ndarray],
    dtype: Any,
    noise: np.ndarray,
    safety: float,
    progress: Progress,
) -> _Search:
    """Adapts the step of suspects until the central difference converges (N&W §8.1; the
    extrapolation of numdifftools and Ridders' method follow the same idea).

    Evaluates J(θ ± h·4^j), j = 2, 1, −1, ..., −STEP_LEVELS, in one call; Richardson-extrapolates
    neighbouring levels and keeps the level with the smallest estimated error, among the steps
    below any kink the larger steps straddle (a kink at θ itself is left to the slope test). Where
    no central level is finite (θ ± h leaves J's domain on one side), one-sided levels are tried.
    """
    k = idx.size
    up = numerics.STEP_UP_LEVELS
    ladder = numerics.step_ladder(h)  # (U + L + 1, k): 16h, 4h, h, h/4, ...; row U is h
    rows_new = [j for j in range(ladder.shape[0]) if j != up]
    # The larger steps stop at a fraction of the coordinate's scale (numerics.step_cap).
    allowed = (ladder[rows_new] <= numerics.step_cap(theta)[None, :]) | (np.asarray(rows_new) > up)[:, None]
    pts = np.stack([np.stack([_points(theta, ladder[j], (o,), dtype) for o in (1, -1)]) for j in rows_new])
    sel = np.broadcast_to(allowed[:, None, :], pts.shape)
    flat_idx = np.broadcast_to(idx[None, None, :], pts.shape)[sel]
    got = costs(engine, problem, group, flat_idx, pts[sel], progress)
    vals = np.full(pts.shape, np.nan)
    vals[sel] = got
    moved = pts.astype(np.float64)
    jp, jm, pp, pm = (np.zeros(ladder.shape) for _ in range(4))
    jp[rows_new], jm[rows_new], pp[rows_new], pm[rows_new] = vals[:, 0], vals[:, 1], moved[:, 0], moved[:, 1]
    jp[up], jm[up] = j_h
    pp[up], pm[up] = (theta + h).astype(dtype), (theta - h).astype(dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = np.where(pp > pm, (jp - jm) / (pp - pm), np.nan)
        steps = np.where(pp > pm, (pp - pm) / 2, np.nan)
        d, noise = numerics.no_information(d, jp, jm, steps, noise)
        j0 = problem.j0
        fwd = np.where(pp > theta, (jp - j0) / (pp - theta), np.nan)
        bwd = np.where(pm < theta, (j0 - jm) / (theta - pm), np.nan)
        # Gaps between one-sided slopes on the ladder ..., 4h, 2h, h, h/4, ...: where a kink is straddled.
        r2, l2 = (j_2h[0] - j0) / (2 * h), (j0 - j_2h[1]) / (2 * h)
        # Each entry's own noise, when its ladder shows more than J's probe saw (see ladder_noise).
        noise = np.maximum(noise, numerics.ladder_noise(d, np.where(np.isfinite(steps), steps, ladder)))
        gaps = np.concatenate([fwd[:up] - bwd[:up], (r2 - l2)[None], fwd[up:] - bwd[up:]])
        gap_steps = np.concatenate([ladder[:up], 2 * h[None], ladder[up:]])
        deepest, at = _kink_reach(gaps, gap_steps, noise, safety)
        est, trunc, roundoff = numerics.richardson_levels(d, np.where(np.isfinite(steps), steps, ladder), noise)
    # The first ladder row strictly below the smaller step of the deepest crossed pair.
    small = deepest + 1
    first_clean = np.where(deepest < 0, 0, np.where(small < up, small + 1, np.where(small == up, up, small)))
    error = trunc + roundoff
    # Level j uses steps h/4^j and h/4^(j+1): keep those strictly below the deepest crossed pair.
    usable = np.isfinite(error) & (np.arange(error.shape[0])[:, None] >= first_clean[None, :])
    # A kink counts as within reach when it is straddled by 2h or h (the larger trial steps 4h,
    # 16h are the search's own: a kink they cross did not touch the first verdict).
    out = _Search(
        np.full(k, np.nan),
        np.full(k, np.nan),
        np.full(k, "", object),
        np.full(k, np.nan),
        np.full(k, "", object),
        deepest >= up - 1,
        at,
        np.broadcast_to(np.asarray(noise, np.float64), (k,)).copy(),
    )
    rows = np.arange(k)
    best = np.argmin(np.where(usable, error, np.inf), axis=0)
    found = usable[best, rows] & ~at
    out.estimate[found] = est[best, rows][found]
    out.error[found] = error[best, rows][found]
    out.cause[found] = np.where(trunc[best, rows] > roundoff[best, rows], "truncation", "noise")[found]
    out.step[found] = ladder[best + 1, rows][found]
    out.how[found] = np.where(best > up, "smaller step", np.where(best < up, "larger step", ""))[found]
    out.kink_near |= found & (best > up) & _one_side_jumps(out.estimate, d, fwd, bwd, ladder, best, up, noise, safety)
    out.how[found & out.kink_near] = "kink nearby"
    # Domain edges: no finite central level; one side of θ may still be in J's domain.
    edge = ~found & ~at & ~np.any(np.isfinite(error), axis=0)
    for side, js, ps in ((1.0, jp, pp), (-1.0, jm, pm)):
        if not edge.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            s_steps = np.abs(ps - theta)
            e1, t1, r1 = numerics.one_sided_levels(j0, js, ladder, side, noise)
            err1 = np.where(np.isfinite(t1) & np.isfinite(e1) & (s_steps[:-1] > 0), t1 + r1, np.inf)
        b1 = np.argmin(err1, axis=0)
        ok1 = edge & np.isfinite(err1[b1, rows])
        out.estimate[ok1] = e1[b1, rows][ok1]
        out.error[ok1] = err1[b1, rows][ok1]
        out.cause[ok1] = np.where(t1[b1, rows] > r1[b1, rows], "truncation", "noise")[ok1]
        out.step[ok1] = ladder[b1, rows][ok1]
        out.how[ok1] = "one-sided"
        edge &= ~ok1
    return out


def path_noise(
    engine: Engine, problem: Problem, group: tuple[int, ...], idx: np.ndarray, path_eps: np.ndarray, progress: Progress
) -> np.ndarray:
    """J's noise measured along each leaf of ``group`` whose path to J narrows (per entry of
    ``idx``; NaN where none was measured or the leaf's path is as fine as the check).

    Why: a float32 softmax inside a float64 check adds float32 round-off to J, but J's values are
    float64: not a grid of spacing eps32·|J| but noise, usually a fraction of it (only part of J
    passes through the narrow section). ECnoise on one-sided lines along one coordinate of the
    leaf (``numerics.ecnoise``, at the first spacing whose lines look like noise) measures it. A
    line that does not look like noise (a bfloat16 cast of J itself leaves J's values on a grid:
    most of them equal) measures nothing, and the floor eps·|J| stands.
    """
    base = numerics.machine_eps(problem.dtype)
    cache = problem.__dict__.setdefault("_path_noise", {})
    sizes = np.array([int(problem.floats[i].size) for i in group])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    leaf = precision.leaf_of(problem, group, idx)
    out = np.full(np.asarray(idx).size, np.nan)
    todo = [j for j, i in enumerate(group) if np.any((leaf == j) & (path_eps > base)) and i not in cache]
    if todo:
        theta = np.concatenate([problem.host(i) for i in group])
        flat, pts = [], []
        for j in todo:
            at = starts[j] + int(np.argmax(np.abs(problem.host(group[j]))))  # a coordinate J surely reads
            t = abs(float(theta[at]))
            for f in numerics.NOISE_SPACING_FACTORS:
                line = f * numerics.noise_spacing(problem.dtype) * max(1.0, t) * np.arange(1, 10)
                flat.append(np.full(9, at))
                pts.append((theta[at] + line).astype(theta.dtype))
        vals = costs(engine, problem, group, np.concatenate(flat), np.concatenate(pts), progress)
        vals = vals.reshape(len(todo), -1, 9)
        for j, lines in zip(todo, vals):
            found = [numerics.ecnoise(v) for v in lines if numerics.looks_like_noise(v)]
            cache[group[j]] = found[0] if found else math.nan
    for j, i in enumerate(group):
        if i in cache:
            out[leaf == j] = cache[i]
    return out


def quantum_floor(
    noise: float, path_eps: np.ndarray, j0: float, vals: np.ndarray, measured: np.ndarray | None = None
) -> np.ndarray:
    """Each entry's noise level: J's probed noise, and never below the spacing of J's values in
    the dtype J is computed in along the entry's path (a float32 softmax or a bfloat16 section in a
    float64 check: ``precision.path_precision``).

    Why: J there takes values on a grid of about eps·|J|; two evaluations that round to the same
    value say nothing about the derivative at that step ("no information"), not that it is 0.
    With the floor the round-off bound of a small step is at least the grid over the step, so the
    steps that adapt go up, not down, where J is quantized.
    """
    v = np.abs(np.concatenate([[j0], np.ravel(vals)]))
    v = v[np.isfinite(v)]
    mag = float(np.max(v)) if v.size else 0.0
    floor = np.asarray(path_eps, np.float64) * mag
    if measured is not None:  # J's noise measured along the narrow path (``path_noise``) replaces the floor
        floor = np.where(np.isfinite(measured), measured, floor)
    return np.maximum(noise, floor)


def _coarse(fd_tol: np.ndarray, numerical: np.ndarray, g_scale: np.ndarray) -> np.ndarray:
    """Entries whose error estimate is too coarse to pass (above half the resolution bound of
    their own size or of yours' leaf scale): they get the second look and steps that adapt
    before the leaf is called inconclusive."""
    with np.errstate(invalid="ignore"):
        return fd_tol > 0.5 * numerics.RESOLUTION_BOUND * np.maximum(np.abs(numerical), g_scale)


def check_entries(
    engine: Engine,
    problem: Problem,
    group: tuple[int, ...],
    idx: np.ndarray,
    yours: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
    noise: float | NoiseBox,
    opts: Options,
    progress: Progress,
) -> Coords:
    """Compares yours (``g``) with finite differences at entries ``idx`` of a group of leaves.

    ``idx`` indexes the concatenation of the group's raveled leaves; ``yours()`` gives yours,
    its dtype's eps and its leaf's largest magnitude, per entry: it is called once the finite
    differences are in (your gradient may still be compiling until then).
    ``noise`` is J's noise level, or the box that delivers it: the probe group's first call
    then carries the probe points too.

    Entries that fail at the first step get a second look at 2h (a truncation estimate and the
    kink test); those whose verdict still rests on a truncation estimate, or whose J was NaN/Inf
    at θ ± h, get steps that adapt (``_search``): a tolerance is never widened to absorb a step
    that is too large for the curvature or a kink within its reach.
    """
    base = np.concatenate([problem.host(i) for i in group])
    dtype = base.dtype
    theta = base[idx].astype(np.float64)
    k = idx.size
    path_eps = precision.entry_eps(problem, group, idx)
    if opts.eps is not None:
        h = np.full(k, float(opts.eps))
    else:
        h = numerics.base_step(theta, dtype, opts.method, path_eps)
    offsets = numerics.STENCILS[opts.method][0]
    pts = _points(theta, h, offsets, dtype)
    lost = np.flatnonzero(pts[:k] == pts[k : 2 * k])
    if lost.size:
        raise ValueError(
            MSG_STEP_LOST.format(
                entry=entry_name(problem, group, int(idx[lost[0]])),
                theta=theta[lost[0]],
                h=h[lost[0]],
                dtype=dtype,
                count=numerics.plural(int(lost.size), "entry", "entries"),
            )
        )
    probe_idx: Any = ()
    probe_vals: Any = ()
    carries_probe = isinstance(noise, NoiseBox) and noise.group == group
    if isinstance(noise, NoiseBox) and carries_probe:
        probe_idx, probe_vals = probe_entries(problem, group, noise.seed, engine.unread(group))
    n_main = len(offsets) * k
    all_vals = costs(
        engine,
        problem,
        group,
        np.concatenate([np.tile(idx, len(offsets)), np.asarray(probe_idx, np.int64)]),
        np.concatenate([pts, np.asarray(probe_vals, dtype)]),
        progress,
    )
    if isinstance(noise, NoiseBox):
        noise = noise.deliver(all_vals[n_main:]) if carries_probe else noise.get()
    vals = all_vals[:n_main].reshape(len(offsets), k)
    narrow = path_eps > numerics.machine_eps(dtype)
    measured = path_noise(engine, problem, group, idx, path_eps, progress) if narrow.any() else None
    nz = quantum_floor(noise, path_eps, problem.j0, vals, measured)
    g, g_eps, g_scale = yours()
    J = dict(zip(offsets, vals))
    P = dict(zip(offsets, pts.astype(np.float64).reshape(len(offsets), k)))
    # Central difference at h over the step actually taken (exact for the default steps).
    with np.errstate(divide="ignore", invalid="ignore"):
        d_h = (J[1] - J[-1]) / (P[1] - P[-1])
    h = (P[1] - P[-1]) / 2  # the step taken (a user's eps may not be representable at θ)
    if opts.method == "central":
        numerical = d_h
    else:
        w = numerics.STENCILS[opts.method][1]
        numerical = sum(wi * J[o] for o, wi in zip(offsets, w)) / h
    roundoff = nz * numerics.roundoff_factor(opts.method) / h
    floor = np.maximum.reduce(
        [
            numerics.grad_rounding(g, g_eps, g_scale),
            precision.entry_grad_rounding(problem, group, idx, g_eps),
            numerics.section_rounding(g, max(precision.path_precision(problem).eps, default=0.0), g_scale),
        ]
    )
    fd_tol = opts.safety * roundoff
    unread = engine.unread(group)
    if unread is not None:  # J does not read these entries: the difference is exactly 0
        fd_tol = np.where(unread[idx], 0.0, fd_tol)
    tol = fd_tol + floor + opts.atol + opts.rtol * np.abs(numerical)
    err = np.abs(g - numerical)
    status = np.where(err <= tol, "ok", "fail").astype(object)
    status[~np.isfinite(numerical)] = "nan"
    status[np.isfinite(numerical) & ~np.isfinite(g)] = "fail"
    left = np.full(k, np.nan)
    right = np.full(k, np.nan)
    how = np.full(k, "", object)
    cause = np.full(k, "noise", object)
    step = h.copy()

    sus = np.flatnonzero((status == "fail") | (status == "nan") | _coarse(fd_tol, numerical, g_scale))
    if sus.size and opts.refine:
        # Second look at suspects: steps 2h (if not already taken) give a truncation-error
        # estimate |D(h) - D(2h)| / 3, a Richardson-improved estimate, and kink detection.
        if sus.size > opts.max_refine:
            with np.errstate(divide="ignore", invalid="ignore"):
                rank = np.nan_to_num(err[sus] / tol[sus], nan=np.inf)
            sus = sus[np.argsort(-rank)[: opts.max_refine]]
        if 2 not in J:
            pts2 = _points(theta[sus], h[sus], (2, -2), dtype)
            j2p, j2m = costs(engine, problem, group, np.tile(idx[sus], 2), pts2, progress).reshape(2, sus.size)
        else:
            j2p, j2m = J[2][sus], J[-2][sus]
        hs = h[sus]
        with np.errstate(divide="ignore", invalid="ignore"):
            d_2h = (j2p - j2m) / (4 * hs)
            trunc = np.abs(d_h[sus] - d_2h) / 3
            if opts.method == "central":
                best = (4 * d_h[sus] - d_2h) / 3
                round2 = nz[sus] * numerics.roundoff_factor("central4") / hs
            elif opts.method == "richardson":
                d4 = (8 * (J[1][sus] - J[-1][sus]) - (j2p - j2m)) / (12 * hs)
                best, trunc = numerical[sus], np.abs(numerical[sus] - d4)
                round2 = roundoff[sus]
            else:
                best, round2 = numerical[sus], roundoff[sus]
            user2 = opts.atol + opts.rtol * np.abs(best)
            fd2 = opts.safety * (round2 + trunc)
            tol2 = fd2 + floor[sus] + user2
            gap = np.abs(g[sus] - best)
            ok2 = (gap <= tol2) & np.isfinite(g[sus]) & np.isfinite(best)
            # Kinks: one-sided slopes that disagree by a jump that does not shrink with h.
            j0 = problem.j0
            r1, l1 = (J[1][sus] - j0) / hs, (j0 - J[-1][sus]) / hs
            r2, l2 = (j2p - j0) / (2 * hs), (j0 - j2m) / (2 * hs)
            kink = numerics.is_kink(r1 - l1, r2 - l2, opts.safety * 4 * nz[sus] / hs)
            lo = np.minimum.reduce([l1, r1, l2, r2]) - tol2
            hi = np.maximum.reduce([l1, r1, l2, r2]) + tol2
        # A pass that rests on the truncation estimate means the step was too large for the
        # curvature (or straddled a kink): such entries, failures, kinks and NaNs get steps
        # that adapt instead of a wider tolerance.
        rests_on_trunc = gap > opts.safety * round2 + floor[sus] + user2
        must = ~ok2 | kink | rests_on_trunc | ~np.isfinite(best)
        adapt = must | _coarse(fd2, best, g_scale[sus])
        if opts.eps is not None:
            adapt &= ~ok2 | kink  # a step you chose is kept where it gives a verdict
        settled = sus[~adapt]
        numerical[settled], tol[settled], fd_tol[settled] = best[~adapt], tol2[~adapt], fd2[~adapt]
        cause[settled] = np.where(trunc[~adapt] > round2[~adapt], "truncation", "noise")
        status[settled] = "ok"
        a = np.flatnonzero(adapt)
        if a.size:
            s = sus[a]
            found = _search(
                engine,
                problem,
                group,
                idx[s],
                theta[s],
                h[s],
                (J[1][s], J[-1][s]),
                (j2p[a], j2m[a]),
                dtype,
                nz[s],
                opts.safety,
                progress,
            )
            # The ladder may have seen more noise than assumed (J's values equal at small steps, an
            # entry's own noise): the first two looks' bounds grow by the same factor.
            with np.errstate(divide="ignore", invalid="ignore"):
                grow = np.where(nz[s] > 0, np.maximum(found.noise / nz[s], 1.0), 1.0)
            round2[a] *= grow
            fd2[a] = opts.safety * (round2[a] + trunc[a])
            tol2[a] = fd2[a] + floor[s] + user2[a]
            ok2[a] = (gap[a] <= tol2[a]) & np.isfinite(g[s]) & np.isfinite(best[a])
            fd_tol[s] *= grow
            # The look with the smallest error bound gives the verdict: the search's best level, or
            # the 2h look where it is finer (a bf16 cost whose smaller steps only add round-off) and
            # usable (finite, no kink straddled); the first look only where it was merely coarse.
            two_h = np.isfinite(best[a]) & ~kink[a]
            ok = np.isfinite(found.estimate) & (opts.safety * found.error < np.where(two_h, fd2[a], np.inf))
            t = s[ok]
            numerical[t] = found.estimate[ok]
            fd_tol[t] = opts.safety * found.error[ok]
            tol[t] = fd_tol[t] + floor[t] + opts.atol + opts.rtol * np.abs(numerical[t])
            status[t] = np.where(np.abs(g[t] - numerical[t]) <= tol[t], "ok", "fail")
            status[t[~np.isfinite(g[t])]] = "fail"
            how[t], cause[t], step[t] = found.how[ok], found.cause[ok], found.step[ok]
            # Entries with no usable step: a kink at θ is judged by its one-sided slopes; the
            # rest keep the 2h look (a failure that stands) or cannot be checked (NaN).
            # Only coarse, and no finer for the search: the finer of the first two looks stands.
            keep1 = ~ok & ~must[a] & (fd_tol[s] <= fd2[a])
            k1 = s[keep1]
            tol[k1] = fd_tol[k1] + floor[k1] + opts.atol + opts.rtol * np.abs(numerical[k1])
            status[k1] = np.where(np.abs(g[k1] - numerical[k1]) <= tol[k1], "ok", "fail")
            rest = ~ok & ~keep1
            at = rest & (found.kink_at | kink[a]) & must[a]
            for sel, val in ((rest, None), (at, "kink")):
                u = s[sel]
                numerical[u], tol[u], fd_tol[u] = best[a][sel], tol2[a][sel], fd2[a][sel]
                if val is None:
                    fin = np.isfinite(best[a][sel])
                    status[u] = np.where(fin, np.where(ok2[a][sel], "ok", "fail"), "nan")
                    cause[u] = np.where(trunc[a][sel] > round2[a][sel], "truncation", "noise")
                else:
                    inside = (g[u] >= lo[a][sel]) & (g[u] <= hi[a][sel])
                    status[u] = np.where(ok2[a][sel], "ok", np.where(inside, "kink", "fail"))
            near = (found.kink_near & ok) | kink[a]
            left[s[near]], right[s[near]] = l1[a][near], r1[a][near]
    failed = np.flatnonzero(status == "fail")
    if failed.size:
        # A float64 gradient near 0 is defined only to the rounding of the terms it sums (an exact
        # minimum): measured once, and only where something fails (precision.measured_check_rounding).
        # So is a gradient through a narrow section (a float32 softmax) to the section's rounding of
        # its terms (precision.measured_section_rounding): that one says "compute it wider".
        check = precision.entry_check_rounding(problem, group, idx[failed])
        section = precision.entry_section_rounding(problem, group, idx[failed])
        narrow_f = np.flatnonzero(section > 0)
        if narrow_f.size:  # what the section did to J's differences, entry by entry
            f = failed[narrow_f]
            wide_d = precision.section_differences(problem, group, idx[f], theta[f], step[f])
            bent = np.abs(numerical[f] - wide_d)
            section[narrow_f] += np.where(np.isfinite(bent), bent, 0.0)
        extra = np.maximum(check, section)
        tol[failed] += extra
        fd_tol[failed] += extra
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(g[failed]) & np.isfinite(numerical[failed])
            ok &= np.abs(g[failed] - numerical[failed]) <= tol[failed]
        status[failed[ok]] = "ok"
        cause[failed[ok]] = np.where(section[ok] > check[ok], "section", "rounding")
    # A gradient in your dtype that is rounding throughout limits what can be seen as the differences'
    # own error does (precision.entry_swamped_rounding): the report calls such a leaf inconclusive.
    swamp = precision.entry_swamped_rounding(problem, group, idx, g_eps)
    cause[swamp > fd_tol] = "rounding"
    fd_tol = np.maximum(fd_tol, swamp)
    still = np.flatnonzero(status == "fail")
    if still.size and opts.refine and opts.method != "central" and opts.eps is None:
        # Higher-order stencils reach out to 2h or 4h with larger h and can straddle a kink
        # (ReLU) that central differences at ∛eps steer clear of: give failures a central look.
        c = check_entries(
            engine,
            problem,
            group,
            idx[still],
            lambda: (g[still], g_eps[still], g_scale[still]),
            noise,
            dataclasses.replace(opts, method="central"),
            progress,
        )
        rescued = c.status != "fail"
        for arr, new in (
            (numerical, c.numerical),
            (tol, c.tol),
            (status, c.status),
            (left, c.left),
            (right, c.right),
            (fd_tol, c.fd_tol),
            (how, c.how),
            (cause, c.cause),
            (step, c.step),
        ):
            arr[still[rescued]] = new[rescued]
    return Coords(idx, numerical, tol, status, left, right, fd_tol, how, cause, step)


def leaf_scale(g: np.ndarray) -> float:
    return float(np.max(np.abs(g))) if g.size and np.all(np.isfinite(g)) else 0.0
