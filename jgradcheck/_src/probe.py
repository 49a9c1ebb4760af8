"""The noise probe: J(θ) twice (determinism) and J's round-off noise level (ECnoise).

The noise sets the round-off part of every entry's error estimate. The probe's points ride in
the first call of the smallest group's program (no compilation of its own); in screen mode
they go through the line program.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from jgradcheck._src import numerics, precision
from jgradcheck._src.engine import Engine
from jgradcheck._src.problem import MSG_NONDETERMINISTIC, MSG_NONFINITE, Problem


def probe_line(engine: Engine, problem: Problem, seed: int, check_determinism: bool) -> float:
    """J(θ) (twice) and its noise level from one batched call of the line program (screen mode).

    ECnoise along two random one-sided lines over the group of small leaves (or the smallest
    leaf): the program is the one that screens them.
    """
    group = probe_group(problem)
    theta = np.concatenate([problem.host(i) for i in group]).astype(np.float64)
    rng = np.random.default_rng(seed)
    scale = np.maximum(1.0, np.abs(theta)) / math.sqrt(theta.size)
    dirs = np.stack([rng.choice([-1.0, 1.0], size=theta.size) * scale for _ in range(2)])
    ts, which = [np.zeros(2)], [np.zeros(2)]
    for f in numerics.NOISE_SPACING_FACTORS:
        line = f * numerics.noise_spacing(problem.dtype) * np.arange(1, 10, dtype=np.float64)
        ts += [line, line]
        which += [np.zeros(9), np.ones(9)]
    values = engine.line_costs(group, dirs, np.concatenate(ts), np.concatenate(which).astype(np.int32))
    return noise_from(values, problem, check_determinism)


def probe_group(problem: Problem) -> tuple[int, ...]:
    return min(problem.groups, key=lambda g: sum(int(problem.floats[i].size) for i in g))


def probe_entries(
    problem: Problem, group: tuple[int, ...], seed: int, unread: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Single-entry probe points for full and sample modes: J(θ) twice, then one-sided lines
    along two random coordinates of ``group``. They ride in that group's first call, so the
    probe costs no compilation of its own. Entries J never reads (``unread``, the engine's
    mask) would show no noise at all: the coordinates are drawn from the others."""
    theta = np.concatenate([problem.host(i) for i in group])
    rng = np.random.default_rng(seed)
    pool = np.ones(theta.size, bool) if unread is None or unread.all() else ~unread
    # J's noise along a path that narrows (a float32 softmax in a float64 check) is measured per
    # leaf (estimate.path_noise): the noise for every other leaf is measured where the path does not.
    wide = precision.entry_eps(problem, group, np.arange(theta.size)) <= numerics.machine_eps(problem.dtype)
    if (pool & wide).any():
        pool &= wide
    cand = np.flatnonzero(pool)
    js = cand[rng.choice(cand.size, size=2, replace=cand.size < 2)]
    base = theta[js].astype(np.float64)
    idx, moved = [np.array([js[0], js[0]])], [base[[0, 0]]]
    for f in numerics.NOISE_SPACING_FACTORS:
        steps = f * numerics.noise_spacing(problem.dtype) * np.arange(1, 10, dtype=np.float64)
        idx += [np.repeat(js, 9)]
        moved += [base[k] + steps * max(1.0, abs(base[k])) for k in range(2)]
    return np.concatenate(idx).astype(np.int64), np.concatenate(moved).astype(theta.dtype)


def noise_from(v: np.ndarray, problem: Problem, check_determinism: bool) -> float:
    """J(θ) and its noise level from probe values [J(θ), J(θ), then two lines of 9 per spacing].

    Sets ``problem.j0``. The noise is ECnoise (Moré & Wild) on each one-sided line (t = s..9s:
    a kink at θ itself, ReLU or |w| at 0, lies at the end of the line rather than inside it,
    where it would pass for noise and hide real bugs); the smaller estimate wins (in case one
    line crosses a kink), at the coarsest spacing whose lines look like noise
    (``numerics.looks_like_noise``; NOISE_SPACING_FACTORS), or over all spacings if none does
    (then the estimate errs large: a coarse check, never a blind pass); never below eps |J|.

    Raises:
      ValueError: J(θ) is NaN/Inf, or differs between two evaluations (runtime randomness).
    """
    j0, j1 = float(v[0]), float(v[1])
    if not math.isfinite(j0):
        raise ValueError(MSG_NONFINITE.format(value=j0))
    if check_determinism and not abs(j1 - j0) <= 64 * numerics.machine_eps(problem.dtype) * max(abs(j0), abs(j1)):
        raise ValueError(MSG_NONDETERMINISTIC.format(a=repr(j0), b=repr(j1)))
    problem.j0 = j0
    # Never below rounding at J's magnitude at θ (|J(θ)| itself may be 0). Not the probe lines'
    # largest value: in a low-precision dtype they reach ~θ away, where J may be several times larger.
    floor = numerics.machine_eps(problem.dtype) * max(abs(j0), abs(j1), np.finfo(np.float64).tiny)
    lines = [v[s : s + 9] for s in range(2, len(v) - 8, 9)]
    per_spacing = [lines[i : i + 2] for i in range(0, len(lines), 2)]
    for pair in per_spacing:
        valid = [numerics.ecnoise(x) for x in pair if numerics.looks_like_noise(x)]
        if valid:
            return max(floor, min(valid))
    estimates = [numerics.ecnoise(x) for x in per_spacing[0]]
    finite = [e for e in estimates if math.isfinite(e)]
    return max(floor, min(finite)) if finite else floor


class NoiseBox:
    """The noise level, delivered by the group whose first call carries the probe.

    Other groups evaluate meanwhile (their points do not depend on it) and wait only to judge.
    """

    def __init__(self, problem: Problem, seed: int, check_determinism: bool):
        self.problem, self.seed, self.check_determinism = problem, seed, check_determinism
        self.group = probe_group(problem)
        self._ready = threading.Event()
        self._value: float | None = None

    def deliver(self, values: np.ndarray) -> float:
        try:
            self._value = noise_from(values, self.problem, self.check_determinism)
            return self._value
        finally:
            self._ready.set()

    def fail(self) -> None:
        """The group carrying the probe stopped before delivering it (an error, Ctrl-C)."""
        self._ready.set()

    def get(self) -> float:
        self._ready.wait()
        if self._value is None:
            raise ProbeFailed
        return self._value


class ProbeFailed(Exception):
    """Raised in groups waiting on a probe that failed; the probe's own error is reported."""
