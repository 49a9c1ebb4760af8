"""Running the groups of leaves: in threads that overlap their compilations, interruptibly."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import jax
import numpy as np

from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.estimate import Coords, check_entries, leaf_scale
from jgradcheck._src.numerics import STENCILS
from jgradcheck._src.options import Options
from jgradcheck._src.probe import NoiseBox, ProbeFailed, probe_entries
from jgradcheck._src.problem import Problem, Yours, threads_see_the_same_jax


class Cancelled(Exception):
    """Raised in a worker at its next block once the check was interrupted (Ctrl-C)."""


# A full check over its time budget gives up only while more time is projected to remain than
# was spent: past that, finishing costs less than what screening would throw away.
# It decides only once this fraction of the budget has passed: the first blocks are the smallest
# groups' (the probe's group goes first), compiling beside one another. Projected from them, a
# 400k-entry MLP whose full check takes 15 s looked like 1.5-7 minutes.
DECIDE_AFTER = 1 / 6


class Budget:
    """``mode="auto"``'s limit on a full check's time, judged after every block.

    Evaluations differ in cost by group (a first-layer weight's change is dense through the next
    layer, a second-layer weight's is one unit wide), so each group's time is projected apart: its
    evaluations left at its own rate, measured since its first block (which paid for compiling).
    A group not yet measured counts for nothing: the projection is a lower bound, so a check that
    would finish in time is never given up (the engine's work model, 0.4-20x off per group, sent a
    3-20 s transformer check to screening under load). The groups run in ``lanes`` threads: the
    time left is their sum over the lanes. The
    projection is the check's time so far (from ``started``, preparation included) plus that.
    Once a sixth of ``seconds`` has passed, a projection over ``seconds`` with more time left than
    spent stops the check (``Cancelled``); ``projected``, ``done`` (evaluations) and ``elapsed``
    then say why, for the caller to screen instead.
    """

    def __init__(self, seconds: float, started: float):
        self.seconds, self.started = float(seconds), float(started)
        self.projected: float | None = None
        self.done = 0  # evaluations done when it was projected to run over ...
        self.elapsed = 0.0  # ... and the seconds spent by then
        self.lanes = 1
        self._planned: dict[tuple[int, ...], int] = {}
        self._count: dict[tuple[int, ...], int] = {}
        self._first: dict[tuple[int, ...], tuple[float, int]] = {}  # after each group's first block
        self._last: dict[tuple[int, ...], float] = {}

    def plan(self, planned: dict[tuple[int, ...], int], lanes: int) -> None:
        """``planned`` evaluations per group, run in ``lanes`` threads."""
        self.lanes = max(1, int(lanes))
        for group, count in planned.items():
            self._planned[group], self._count[group] = int(count), 0

    @property
    def planned(self) -> int:
        """Evaluations the full check planned."""
        return sum(self._planned.values())

    def record(self, group: tuple[int, ...] | None, n: int) -> None:
        """``n`` evaluations of ``group`` are done (ticks of other work, such as a probe, are not counted)."""
        if group is None or group not in self._count or n <= 0:
            return
        self._count[group] += int(n)
        now = time.perf_counter()
        self._first.setdefault(group, (now, self._count[group]))
        self._last[group] = now

    def _rates(self) -> dict[tuple[int, ...], float]:
        """Seconds per evaluation of each group measured past its first block."""
        return {
            g: (self._last[g] - t0) / (self._count[g] - c0)
            for g, (t0, c0) in self._first.items()
            if self._count[g] > c0 and self._last[g] > t0
        }

    def over(self) -> bool:
        elapsed = time.perf_counter() - self.started
        if elapsed < DECIDE_AFTER * self.seconds:
            return False
        rates = self._rates()
        if not rates:
            return False
        times = [max(0, self._planned[g] - self._count[g]) * rate for g, rate in rates.items()]
        # Rates measured while the lanes share the machine: a group left alone runs faster, so the
        # longest group's time is no bound (it sent a 42 s check to screening); the sum over the lanes is.
        left = sum(times) / self.lanes
        if elapsed + left <= self.seconds or left <= elapsed:
            return False
        self.projected, self.done, self.elapsed = elapsed + left, sum(self._count.values()), elapsed
        return True


class _Cancellable:
    """The progress bar the workers tick after each block: also where they learn to stop."""

    def __init__(self, progress: Progress, failed: threading.Event, budget: Budget | None = None):
        self.progress = progress
        self.stop = threading.Event()
        self.failed = failed  # your gradient raised: no point finishing
        self.budget = budget
        self._lock = threading.Lock()

    # Always "enabled": the engine then waits for each block before ticking, so a worker
    # learns of a Ctrl-C after the block it is computing, not after its last dispatched one.
    enabled = True

    def update(self, n: int, group: tuple[int, ...] | None = None) -> None:
        if self.stop.is_set() or self.failed.is_set():
            raise Cancelled
        with self._lock:  # workers tick from their threads
            self.progress.update(n)
            if self.budget is not None:
                self.budget.record(group, n)
            over = self.budget is not None and self.budget.over()
        if over:
            self.stop.set()
            raise Cancelled


class _GroupTicks:
    """One group's ticks: the shared ones, told which group they come from (``Budget.record``)."""

    enabled = True

    def __init__(self, ticks: _Cancellable, group: tuple[int, ...]):
        self.ticks, self.group = ticks, group

    def update(self, n: int) -> None:
        self.ticks.update(n, self.group)


# How often the main thread wakes while waiting on the workers, to let Ctrl-C through.
WAIT_SLICE_S = 0.1


def _wait_all(futures: list[concurrent.futures.Future]) -> None:
    """Waits in short slices: a KeyboardInterrupt arrives between them, not after the last group."""
    pending = set(futures)
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=WAIT_SLICE_S)


def check_leaves(
    engine: Engine,
    problem: Problem,
    selection: dict[int, np.ndarray],
    yours: Yours,
    noise: float | NoiseBox,
    opts: Options,
    progress: Progress,
    budget: Budget | None = None,
) -> dict[int, Coords]:
    """Entry-by-entry check of ``selection`` (leaf -> entry indices), grouped for compilation.

    Groups run in threads: each one's first call compiles its program, and XLA compiles (and
    the device computes) while other threads trace, so a cold check overlaps its compilations.
    A KeyboardInterrupt (Ctrl-C) in the main thread cancels the groups not started, stops the
    running ones at their next block, waits for them, and propagates. So does an error in your
    gradient (``yours``, computed meanwhile in its own thread), which is then raised. A
    ``budget`` projected to be exceeded stops the groups the same way and raises ``Cancelled``.
    """
    out: dict[int, Coords] = {}
    groups = [tuple(i for i in full if i in selection) for full in problem.groups]
    groups = [grp for grp in groups if grp]
    if isinstance(noise, NoiseBox):
        if noise.group not in groups:  # the probe's group is not checked here: probe on its own
            probe = probe_entries(problem, noise.group, noise.seed, engine.unread(noise.group))
            noise = noise.deliver(engine.costs(noise.group, *probe, progress))
        else:  # the group carrying the probe goes first: the others wait for it to judge
            groups.sort(key=lambda grp: grp != noise.group)
    ticks = _Cancellable(progress, yours.failed, budget)
    if budget is not None:
        per_entry = len(STENCILS[opts.method][0])
        lanes = min(len(groups), os.cpu_count() or 1) if len(groups) > 1 and threads_see_the_same_jax() else 1
        budget.plan({grp: per_entry * sum(int(selection[i].size) for i in grp) for grp in groups}, lanes)

    def run(group: tuple[int, ...]) -> None:
        ticks.update(0)  # raises Cancelled before compiling anything once the check is stopping
        sizes = [int(problem.floats[i].size) for i in group]
        offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        idx = np.concatenate([selection[i] + o for i, o in zip(group, offs)]).astype(np.int64)

        def entries() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            grads, g_eps = yours.get()
            g = np.concatenate([grads[i][selection[i]] for i in group])
            eps = np.concatenate([np.full(selection[i].size, g_eps[i]) for i in group])
            scale = np.concatenate([np.full(selection[i].size, leaf_scale(grads[i])) for i in group])
            return g, eps, scale

        try:
            group_ticks = _GroupTicks(ticks, group)
            c = check_entries(engine, problem, group, idx, entries, noise, opts, group_ticks)  # type: ignore[arg-type]
        except BaseException:
            if isinstance(noise, NoiseBox) and noise.group == group:
                noise.fail()  # the groups waiting on this one's probe must not wait forever
            raise
        start = 0
        for i, o in zip(group, offs):
            part = c.take(slice(start, start + selection[i].size))
            part.idx = part.idx - o
            out[i] = part
            start += selection[i].size

    if len(groups) > 1 and threads_see_the_same_jax():
        # JAX's x64 and matmul-precision contexts are thread-local: re-enter them per thread.
        x64_now = bool(jax.config.read("jax_enable_x64"))

        def run_scoped(group: tuple[int, ...]) -> None:
            with jax.enable_x64(x64_now), jax.default_matmul_precision("highest"):
                run(group)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1))
        try:
            futures = [pool.submit(run_scoped, grp) for grp in groups]
            _wait_all(futures)
        except BaseException:
            ticks.stop.set()
            if isinstance(noise, NoiseBox):
                noise.fail()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if yours.failed.is_set():
            yours.get()  # raises your gradient's error, the reason the workers stopped
        errors = [f.exception() for f in futures]
        # The probe's own error (e.g. a NaN cost) rather than the waiting groups' ProbeFailed.
        for error in sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, ProbeFailed)):
            raise error
    else:
        for grp in groups:
            try:
                run(grp)
            except Cancelled:
                yours.get()  # raises your gradient's error
                raise
    return out
