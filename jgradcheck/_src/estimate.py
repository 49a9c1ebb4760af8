"""Estimates and verdicts: central differences per entry, their error bounds, kinks.

``check_entries`` evaluates the stencil at the chosen entries of one group of leaves, estimates
the finite-difference error (round-off from J's noise, truncation from a second step 2h for
suspects), judges yours against it, and tells kinks (one-sided slopes that do not agree) from
bugs. ``check_leaves`` runs the groups, overlapping their compilations in threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jgradcheck._src import numerics
from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.options import Options
from jgradcheck._src.probe import NoiseBox, ProbeFailed, probe_entries
from jgradcheck._src.problem import Problem

MSG_STEP_LOST = (
    "the step h = {h:g} is lost in {dtype} at {entry} = {theta:g}: θ + h and θ - h round to the "
    "same number, so the finite difference there is 0/0 ({count} entries like this). Use the "
    "default step (eps=None), which scales with |θ|, or a larger eps, or x64=True."
)


@dataclasses.dataclass
class Coords:
    """Per-coordinate results for a set of entries of one leaf."""

    idx: np.ndarray
    numerical: np.ndarray
    tol: np.ndarray
    status: np.ndarray  # "ok" | "fail" | "kink" | "nan"
    left: np.ndarray
    right: np.ndarray


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


def check_entries(
    engine: Engine,
    problem: Problem,
    group: tuple[int, ...],
    idx: np.ndarray,
    g: np.ndarray,
    g_eps: np.ndarray,
    g_scale: np.ndarray,
    noise: float | NoiseBox,
    opts: Options,
    progress: Progress,
) -> Coords:
    """Compares yours (``g``) with finite differences at entries ``idx`` of a group of leaves.

    ``idx`` indexes the concatenation of the group's raveled leaves; ``g``, ``g_eps`` and
    ``g_scale`` are yours, its dtype's eps and its leaf's largest magnitude, per entry.
    ``noise`` is J's noise level, or the box that delivers it: the probe group's first call
    then carries the probe points too.
    """
    base = np.concatenate([problem.host(i) for i in group])
    dtype = base.dtype
    theta = base[idx].astype(np.float64)
    k = idx.size
    if opts.eps is not None:
        h = np.full(k, float(opts.eps))
    else:
        h = numerics.base_step(theta, dtype, opts.method)
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
                count=lost.size,
            )
        )
    probe_idx: Any = ()
    probe_vals: Any = ()
    carries_probe = isinstance(noise, NoiseBox) and noise.group == group
    if isinstance(noise, NoiseBox) and carries_probe:
        probe_idx, probe_vals = probe_entries(problem, group, noise.seed)
    n_main = len(offsets) * k
    all_vals = engine.costs(
        group,
        np.concatenate([np.tile(idx, len(offsets)), np.asarray(probe_idx, np.int64)]),
        np.concatenate([pts, np.asarray(probe_vals, dtype)]),
        progress,
    )
    if isinstance(noise, NoiseBox):
        noise = noise.deliver(all_vals[n_main:]) if carries_probe else noise.get()
    vals = all_vals[:n_main].reshape(len(offsets), k)
    J = dict(zip(offsets, vals))
    P = dict(zip(offsets, pts.astype(np.float64).reshape(len(offsets), k)))
    # Central difference at h over the step actually taken (exact for the default steps).
    d_h = (J[1] - J[-1]) / (P[1] - P[-1])
    h = (P[1] - P[-1]) / 2  # the step taken (a user's eps may not be representable at θ)
    if opts.method == "central":
        numerical = d_h
    else:
        w = numerics.STENCILS[opts.method][1]
        numerical = sum(wi * J[o] for o, wi in zip(offsets, w)) / h
    roundoff = noise * numerics.roundoff_factor(opts.method) / h
    floor = numerics.GRAD_ULPS * g_eps * (np.abs(g) + g_scale) + opts.atol + opts.rtol * np.abs(numerical)
    tol = opts.safety * roundoff + floor
    err = np.abs(g - numerical)
    status = np.where(err <= tol, "ok", "fail").astype(object)
    status[~np.isfinite(numerical)] = "nan"
    status[np.isfinite(numerical) & ~np.isfinite(g)] = "fail"
    left = np.full(k, np.nan)
    right = np.full(k, np.nan)

    sus = np.flatnonzero(status == "fail")
    if sus.size and opts.refine:
        # Second look at suspects: steps 2h (if not already taken) give a truncation-error
        # estimate |D(h) - D(2h)| / 3, a Richardson-improved estimate, and kink detection.
        if sus.size > opts.max_refine:
            sus = sus[np.argsort(-(err[sus] / tol[sus]))[: opts.max_refine]]
        if 2 not in J:
            pts2 = _points(theta[sus], h[sus], (2, -2), dtype)
            j2p, j2m = engine.costs(group, np.tile(idx[sus], 2), pts2, progress).reshape(2, sus.size)
        else:
            j2p, j2m = J[2][sus], J[-2][sus]
        hs = h[sus]
        d_2h = (j2p - j2m) / (4 * hs)
        trunc = np.abs(d_h[sus] - d_2h) / 3
        if opts.method == "central":
            best = (4 * d_h[sus] - d_2h) / 3
            round2 = noise * numerics.roundoff_factor("central4") / hs
        elif opts.method == "richardson":
            d4 = (8 * (J[1][sus] - J[-1][sus]) - (j2p - j2m)) / (12 * hs)
            best, trunc = numerical[sus], np.abs(numerical[sus] - d4)
            round2 = roundoff[sus]
        else:
            best, round2 = numerical[sus], roundoff[sus]
        tol2 = opts.safety * (round2 + trunc) + floor[sus]
        numerical[sus], tol[sus] = best, tol2
        ok2 = np.abs(g[sus] - best) <= tol2
        status[sus[ok2 & np.isfinite(g[sus])]] = "ok"
        # Kinks: one-sided slopes that disagree by a jump that does not shrink with h.
        j0 = problem.j0
        r1, l1 = (J[1][sus] - j0) / hs, (j0 - J[-1][sus]) / hs
        r2, l2 = (j2p - j0) / (2 * hs), (j0 - j2m) / (2 * hs)
        kink = numerics.is_kink(r1 - l1, r2 - l2, opts.safety * 4 * noise / hs)
        lo = np.minimum.reduce([l1, r1, l2, r2]) - tol2
        hi = np.maximum.reduce([l1, r1, l2, r2]) + tol2
        gs = g[sus]
        accepted = kink & ~ok2 & (gs >= lo) & (gs <= hi)
        status[sus[accepted]] = "kink"
        left[sus[kink]], right[sus[kink]] = l1[kink], r1[kink]
    still = np.flatnonzero(status == "fail")
    if still.size and opts.refine and opts.method != "central" and opts.eps is None:
        # Higher-order stencils reach out to 2h or 4h with larger h and can straddle a kink
        # (ReLU) that central differences at ∛eps steer clear of: give failures a central look.
        c = check_entries(
            engine,
            problem,
            group,
            idx[still],
            g[still],
            g_eps[still],
            g_scale[still],
            noise,
            dataclasses.replace(opts, method="central"),
            progress,
        )
        rescued = c.status != "fail"
        for arr, val in ((numerical, c.numerical), (tol, c.tol), (status, c.status), (left, c.left), (right, c.right)):
            arr[still[rescued]] = val[rescued]
    return Coords(idx, numerical, tol, status, left, right)


def check_leaves(
    engine: Engine,
    problem: Problem,
    selection: dict[int, np.ndarray],
    grads: list[np.ndarray],
    g_eps: list[float],
    noise: float | NoiseBox,
    opts: Options,
    progress: Progress,
) -> dict[int, Coords]:
    """Entry-by-entry check of ``selection`` (leaf -> entry indices), grouped for compilation.

    Groups run in threads: each one's first call compiles its program, and XLA compiles (and
    the device computes) while other threads trace, so a cold check overlaps its compilations.
    """
    out: dict[int, Coords] = {}
    groups = [tuple(i for i in full if i in selection) for full in problem.groups]
    groups = [grp for grp in groups if grp]
    if isinstance(noise, NoiseBox):
        if noise.group not in groups:  # the probe's group is not checked here: probe on its own
            probe = probe_entries(problem, noise.group, noise.seed)
            noise = noise.deliver(engine.costs(noise.group, *probe, progress))
        else:  # the group carrying the probe goes first: the others wait for it to judge
            groups.sort(key=lambda grp: grp != noise.group)

    def run(group: tuple[int, ...]) -> None:
        sizes = [int(problem.floats[i].size) for i in group]
        offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        idx = np.concatenate([selection[i] + o for i, o in zip(group, offs)]).astype(np.int64)
        g = np.concatenate([grads[i][selection[i]] for i in group])
        eps = np.concatenate([np.full(selection[i].size, g_eps[i]) for i in group])
        scale = np.concatenate([np.full(selection[i].size, leaf_scale(grads[i])) for i in group])
        c = check_entries(engine, problem, group, idx, g, eps, scale, noise, opts, progress)
        start = 0
        for i, o in zip(group, offs):
            sl = slice(start, start + selection[i].size)
            out[i] = Coords(c.idx[sl] - o, c.numerical[sl], c.tol[sl], c.status[sl], c.left[sl], c.right[sl])
            start += selection[i].size

    if len(groups) > 1:
        # JAX's x64 and matmul-precision contexts are thread-local: re-enter them per thread.
        x64_now = bool(jax.config.read("jax_enable_x64"))

        def run_scoped(group: tuple[int, ...]) -> None:
            with jax.enable_x64(x64_now), jax.default_matmul_precision("highest"):
                run(group)

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1)) as pool:
            futures = [pool.submit(run_scoped, grp) for grp in groups]
            errors = [f.exception() for f in futures]
        # The probe's own error (e.g. a NaN cost) rather than the waiting groups' ProbeFailed.
        for error in sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, ProbeFailed)):
            raise error
    else:
        for grp in groups:
            run(grp)
    return out


def leaf_scale(g: np.ndarray) -> float:
    return float(np.max(np.abs(g))) if g.size and np.all(np.isfinite(g)) else 0.0
