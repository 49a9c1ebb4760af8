"""Running the groups of leaves: in threads that overlap their compilations, interruptibly."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import jax
import numpy as np

from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.estimate import Coords, check_entries, leaf_scale
from jgradcheck._src.options import Options
from jgradcheck._src.probe import NoiseBox, ProbeFailed, probe_entries
from jgradcheck._src.problem import Problem, Yours, threads_see_the_same_jax


class Cancelled(Exception):
    """Raised in a worker at its next block once the check was interrupted (Ctrl-C)."""


# A full check over its time budget gives up only in its first half: past it, finishing costs
# less than what was spent.
GIVE_UP_BEFORE = 0.5


class Budget:
    """``mode="auto"``'s limit on a full check's time, judged after every block.

    The check's time so far (from ``started``, preparation included) plus the evaluations left at
    the rate measured since the first block (which paid for compiling) is the projection; once it
    exceeds ``seconds`` while less than half the work is done, the check stops (``Cancelled``) and
    ``projected`` holds the projection, for the caller to screen instead.
    """

    def __init__(self, seconds: float, started: float):
        self.seconds, self.started = float(seconds), float(started)
        self.projected: float | None = None
        self.done = 0  # evaluations done when it was projected to run over

    def over(self, progress: Progress) -> bool:
        if progress.done >= GIVE_UP_BEFORE * progress.total:
            return False
        rest = progress.projected_s()
        if rest is None:
            return False
        projected = (progress.start - self.started) + rest
        if projected <= self.seconds:
            return False
        self.projected, self.done = projected, progress.done
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

    def update(self, n: int) -> None:
        if self.stop.is_set() or self.failed.is_set():
            raise Cancelled
        with self._lock:  # workers tick from their threads
            self.progress.update(n)
            over = self.budget is not None and self.budget.over(self.progress)
        if over:
            self.stop.set()
            raise Cancelled


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
            c = check_entries(engine, problem, group, idx, entries, noise, opts, ticks)  # type: ignore[arg-type]
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
