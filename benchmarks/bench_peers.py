"""jgradcheck against the tools its users have today, on the classic recipe's MLP with a hand-written backprop.

One process, float64 everywhere (JAX inside a scoped ``jax.enable_x64(True)``, torch ``.double()``).
The network is the classic recipe's one: ReLU hidden layers, sigmoid output, cross-entropy averaged over m
examples plus the L2 term λ/(2m) Σ‖W‖², column-major (X is (n_x, m), W_l is (n_l, n_{l-1}), b_l is
(n_l, 1)). Its gradient is written by hand (the thing being checked), in JAX and, identically, in
torch. Every contender checks that hand-written gradient twice: correct, and with a planted bug
(dW2 doubled), and we record whether it caught the bug and whether it named the right leaf (W2).

Contenders (each built fresh per size, so its first call pays its own compilation):

  classic loop          ravel_pytree, a jitted J(θ) called 2n times from Python with θ ± 1e-7 e_i,
                      the classic recipe's difference ‖approx − yours‖/(‖approx‖ + ‖yours‖).
  torch gradcheck     slow mode and fast_mode=True, on a torch.autograd.Function whose backward
                      returns the hand-written gradient (so gradcheck checks that gradient).
  jax check_grads     check_grads(J, (params,), order=1, modes=["rev"]) with J wrapped in
                      jax.custom_vjp whose bwd returns the hand-written gradient.
  scipy check_grad    scipy.optimize.check_grad on the flattened θ (forward differences).
  numdifftools        numdifftools.Gradient on the flattened θ (Richardson extrapolation).
  jgradcheck          check_grad(..., mode="full" | "screen" | "sample").

Per contender and size: cold time (first call, compilation included), warm time (second call,
same functions), cost evaluations, the verdict on the correct gradient, whether the planted bug
was caught, and whether W2 was named. Times are also given as ratios to jgradcheck full, measured
minutes apart in the same process (the ratios are what survives a shared, noisy machine).

Verdicts for the contenders that return a number (classic loop, scipy, numdifftools) use the
classic recipe's scale on that number: < 1e-5 pass, 1e-5 .. 1e-3 "double-check", >= 1e-3 "bug"; anything
but "pass" counts as flagging the gradient. scipy returns an absolute 2-norm only, so its number
is that norm divided by ‖yours‖₂.

Contenders with O(n) evaluations whose predicted time for one call exceeds --budget seconds at a
size are skipped: the prediction is expected evaluations x the time of one J call at this size
(jitted JAX from Python, or torch) x that contender's own overhead factor measured at the previous
size. jgradcheck full is not predicted (its evaluations are batched); it runs up to
--jg-full-max-n. A cold call over --rerun-max seconds (the Python loops) is not repeated warm.
torch fast_mode's failing run is skipped where slow mode would be (it recomputes the slow-mode
Jacobian of every input to write its message). torch runs single-threaded (--torch-threads).

Run:
  PYTHONPATH=. python benchmarks/bench_peers.py --out benchmarks/results_peers.md   # the recorded run
  PYTHONPATH=. python benchmarks/bench_peers.py --quick         # smoke run, small sizes only
  PYTHONPATH=. python benchmarks/bench_peers.py --sizes 10-16-8-1,32-64-16-1 --out /tmp/r.md

Needs (benchmark-only, not dependencies of jgradcheck): torch (CPU build), scipy, numdifftools,
matplotlib.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numdifftools
import numpy as np
import scipy
import scipy.optimize
import torch
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads
from torch.autograd.gradcheck import GradcheckError

import jgradcheck

DEFAULT_SIZES = "10-16-8-1,32-64-16-1,256-128-64-1,784-1024-256-1"
QUICK_SIZES = "10-16-8-1,32-64-16-1"
CLASSIC_EPS = 1e-7  # the classic recipe's step
LAMBD = 0.7  # L2 strength (the classic recipe's regularization exercise)
GRADE_DOUBLE_CHECK, GRADE_BUG = 1e-5, 1e-3  # the classic recipe's scale
BUGGY_LEAF = "W2"


# ----------------------------------------------------------------------------------------------
# The network: cost and hand-written backprop, in JAX and in torch (same formulas).


@dataclasses.dataclass
class Problem:
    dims: tuple[int, ...]
    m: int
    params_np: dict[str, np.ndarray]  # W1, b1, ..., float64
    X: np.ndarray
    Y: np.ndarray

    @property
    def L(self) -> int:
        return len(self.dims) - 1

    @property
    def n(self) -> int:
        return sum(v.size for v in self.params_np.values())

    @property
    def names(self) -> list[str]:  # torch input order: W1, b1, W2, b2, ...
        return [f"{k}{j}" for j in range(1, self.L + 1) for k in ("W", "b")]

    @property
    def flops(self) -> float:  # one forward pass
        return 2.0 * self.m * sum(a * b for a, b in zip(self.dims[:-1], self.dims[1:]))

    @property
    def label(self) -> str:
        return "-".join(map(str, self.dims))


def make_problem(dims: tuple[int, ...], m: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    params = {}
    for j in range(1, len(dims)):
        params[f"W{j}"] = rng.standard_normal((dims[j], dims[j - 1])) * math.sqrt(2.0 / dims[j - 1])  # He init
        params[f"b{j}"] = 0.01 * rng.standard_normal((dims[j], 1))
    X = rng.standard_normal((dims[0], m))
    Y = (rng.random((1, m)) < 0.5).astype(np.float64)
    return Problem(tuple(dims), m, params, X, Y)


def jax_cost(p, X, Y, lambd=LAMBD):
    L, m = len(p) // 2, X.shape[1]
    A = X
    for j in range(1, L):
        A = jnp.maximum(0.0, p[f"W{j}"] @ A + p[f"b{j}"])
    AL = jax.nn.sigmoid(p[f"W{L}"] @ A + p[f"b{L}"])
    cross_entropy = -jnp.sum(Y * jnp.log(AL) + (1 - Y) * jnp.log(1 - AL)) / m
    l2 = sum(jnp.sum(jnp.square(p[f"W{j}"])) for j in range(1, L + 1)) * lambd / (2 * m)
    return cross_entropy + l2


def jax_backprop(p, X, Y, lambd=LAMBD, bug=False):
    """The hand-written gradient (the thing being checked); bug=True doubles dW2."""
    L, m = len(p) // 2, X.shape[1]
    As, Zs, A = [X], [], X
    for j in range(1, L):
        Z = p[f"W{j}"] @ A + p[f"b{j}"]
        A = jnp.maximum(0.0, Z)
        Zs.append(Z)
        As.append(A)
    AL = jax.nn.sigmoid(p[f"W{L}"] @ A + p[f"b{L}"])
    dZ = AL - Y
    g = {}
    for j in range(L, 0, -1):
        W = p[f"W{j}"]
        g[f"W{j}"] = dZ @ As[j - 1].T / m + (lambd / m) * W
        g[f"b{j}"] = jnp.sum(dZ, axis=1, keepdims=True) / m
        if j > 1:
            dZ = (W.T @ dZ) * (Zs[j - 2] > 0)
    if bug:
        g[BUGGY_LEAF] = 2.0 * g[BUGGY_LEAF]
    return g


def torch_cost(flat, X, Y, lambd=LAMBD):
    L, m = len(flat) // 2, X.shape[1]
    A = X
    for j in range(1, L):
        A = torch.clamp(flat[2 * j - 2] @ A + flat[2 * j - 1], min=0.0)
    AL = torch.sigmoid(flat[2 * L - 2] @ A + flat[2 * L - 1])
    cross_entropy = -torch.sum(Y * torch.log(AL) + (1 - Y) * torch.log(1 - AL)) / m
    l2 = sum(torch.sum(flat[2 * j - 2] ** 2) for j in range(1, L + 1)) * lambd / (2 * m)
    return cross_entropy + l2


def torch_backprop(flat, X, Y, lambd=LAMBD, bug=False):
    """The same hand-written gradient in torch (no autograd); returns (dW1, db1, dW2, ...)."""
    L, m = len(flat) // 2, X.shape[1]
    As, Zs, A = [X], [], X
    for j in range(1, L):
        Z = flat[2 * j - 2] @ A + flat[2 * j - 1]
        A = torch.clamp(Z, min=0.0)
        Zs.append(Z)
        As.append(A)
    AL = torch.sigmoid(flat[2 * L - 2] @ A + flat[2 * L - 1])
    dZ = AL - Y
    g = [None] * (2 * L)
    for j in range(L, 0, -1):
        W = flat[2 * j - 2]
        g[2 * j - 2] = dZ @ As[j - 1].T / m + (lambd / m) * W
        g[2 * j - 1] = torch.sum(dZ, dim=1, keepdim=True) / m
        if j > 1:
            dZ = (W.T @ dZ) * (Zs[j - 2] > 0)
    if bug:
        g[2] = 2.0 * g[2]  # dW2
    return tuple(g)


# ----------------------------------------------------------------------------------------------
# Shared helpers.


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


def classic_difference(approx: np.ndarray, yours: np.ndarray) -> float:
    return float(np.linalg.norm(approx - yours) / (np.linalg.norm(approx) + np.linalg.norm(yours)))


def grade(x: float) -> str:
    if not math.isfinite(x) or x >= GRADE_BUG:
        return "bug"
    return "double-check" if x >= GRADE_DOUBLE_CHECK else "pass"


def leaf_of_index(idx: int, params: dict[str, Any]) -> str:
    """The classic recipe's identify_parameter, for ravel_pytree's order (sorted dict keys)."""
    start = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.size(leaf))
        if idx < start + size:
            return jax.tree_util.keystr(path).strip("[]'\"")
        start += size
    raise IndexError(idx)


@dataclasses.dataclass
class Outcome:
    flagged: bool  # the gradient was reported wrong
    leaf: str  # what it says about where: "W2", "index only (-> W2)", "input 2 (W2)", "none", ...
    metric: str  # the number it returns, if any
    evals: int | None


@dataclasses.dataclass
class Contender:
    name: str
    make: Callable[[Problem], Callable[[bool], Outcome]]
    evals_per_n: float | None  # O(n) contenders: expected evaluations / n, for the skip rule
    # What one of its evaluations costs like, for the skip rule: a jitted J called from Python ("jax"),
    # or a torch forward ("torch").
    probe: str | None
    how_counted: str
    # A contender whose failing run costs like another's full run (torch fast_mode recomputes the
    # slow-mode Jacobian of every input to write its error message): that contender's name.
    bug_run_like: str | None = None


# ----------------------------------------------------------------------------------------------
# Contenders. Each `make_*` builds fresh functions for one problem and returns run(bug).


def make_classic_loop(prob: Problem):
    params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
    X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
    theta0, unravel = ravel_pytree(params)
    J = jax.jit(lambda th, X, Y: jax_cost(unravel(th), X, Y))
    grads = {b: jax.jit(lambda p, X, Y, b=b: jax_backprop(p, X, Y, bug=b)) for b in (False, True)}
    theta = np.asarray(theta0)

    def run(bug: bool) -> Outcome:
        count = Counter()
        dtheta = np.asarray(ravel_pytree(grads[bug](params, X, Y))[0])
        approx = np.zeros_like(theta)
        for i in range(theta.size):  # the classic recipe's loop, as written
            plus = np.copy(theta)
            plus[i] += CLASSIC_EPS
            count()
            j_plus = float(J(plus, X, Y))
            minus = np.copy(theta)
            minus[i] -= CLASSIC_EPS
            count()
            j_minus = float(J(minus, X, Y))
            approx[i] = (j_plus - j_minus) / (2 * CLASSIC_EPS)
        return _flat_outcome(approx, dtheta, params, count.n)

    return run


def _flat_outcome(approx, yours, params, evals) -> Outcome:
    """The verdict of a checker that returns a flat vector: the classic recipe's difference, and the
    worst index mapped back to its leaf by hand (the checker itself names none)."""
    d = classic_difference(approx, yours)
    worst = int(np.argmax(np.abs(approx - yours)))
    return Outcome(grade(d) != "pass", f"index only (-> {leaf_of_index(worst, params)})", f"{d:.1e}", evals)


def _make_torch(fast: bool):
    def make(prob: Problem):
        X, Y = torch.from_numpy(prob.X).double(), torch.from_numpy(prob.Y).double()
        inputs = tuple(torch.from_numpy(prob.params_np[k].copy()).double().requires_grad_(True) for k in prob.names)
        count = Counter()

        def function(bug: bool):
            class HandWrittenJ(torch.autograd.Function):
                @staticmethod
                def forward(ctx, *flat):
                    count()
                    ctx.save_for_backward(*flat)
                    return torch_cost(flat, X, Y)

                @staticmethod
                def backward(ctx, grad_out):
                    return tuple(grad_out * g for g in torch_backprop(ctx.saved_tensors, X, Y, bug=bug))

            return HandWrittenJ.apply

        fns = {b: function(b) for b in (False, True)}

        def run(bug: bool) -> Outcome:
            count.n = 0
            # raise_exception=True and catching GradcheckError is exactly raise_exception=False
            # (torch's gradcheck wraps the same helper in that try/except), plus the message.
            try:
                torch.autograd.gradcheck(fns[bug], inputs, fast_mode=fast, raise_exception=True)
                return Outcome(False, "-", "True", count.n)
            except GradcheckError as e:
                hit = re.search(r"with respect to input (\d+)", str(e))
                leaf = f"input {hit.group(1)} ({prob.names[int(hit.group(1))]})" if hit else "none"
                return Outcome(True, leaf, "False", count.n)

        return run

    return make


def make_check_grads(prob: Problem):
    params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
    X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
    count = Counter()

    def wrapped(bug: bool):
        # What a user must write to have check_grads test a hand-written gradient.
        @jax.custom_vjp
        def J(p):
            return jax_cost(p, X, Y)

        def fwd(p):
            return jax_cost(p, X, Y), p

        def bwd(p, g):
            return (jax.tree_util.tree_map(lambda a: g * a, jax_backprop(p, X, Y, bug=bug)),)

        J.defvjp(fwd, bwd)
        Jj = jax.jit(J)

        def f(p):
            count()
            return Jj(p)

        return f

    fns = {b: wrapped(b) for b in (False, True)}

    def run(bug: bool) -> Outcome:
        count.n = 0
        try:
            check_grads(fns[bug], (params,), order=1, modes=["rev"])
            return Outcome(False, "-", "no error", count.n)
        except AssertionError as e:
            rel = re.search(r"Max relative difference[^:]*: ([0-9.e+-]+)", str(e))
            names = [n for n in prob.names if re.search(rf"\b{n}\b", str(e))]
            metric = f"AssertionError (rel. diff {float(rel.group(1)):.1e})" if rel else "AssertionError"
            return Outcome(True, ", ".join(names) or "none", metric, count.n)

    return run


def _flat_fns(prob: Problem):
    params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
    X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
    theta0, unravel = ravel_pytree(params)
    J = jax.jit(lambda th: jax_cost(unravel(th), X, Y))
    grads = {b: jax.jit(lambda th, b=b: ravel_pytree(jax_backprop(unravel(th), X, Y, bug=b))[0]) for b in (False, True)}
    return params, np.asarray(theta0), J, grads


def make_scipy(prob: Problem):
    params, theta0, J, grads = _flat_fns(prob)
    count = Counter()

    def f(th):
        count()
        return float(J(th))

    def run(bug: bool) -> Outcome:
        count.n = 0
        g = lambda th: np.asarray(grads[bug](th))  # noqa: E731
        err = scipy.optimize.check_grad(f, g, theta0)
        rel = err / np.linalg.norm(g(theta0))
        return Outcome(grade(rel) != "pass", "none", f"{rel:.1e}", count.n)

    return run


def make_numdifftools(prob: Problem):
    params, theta0, J, grads = _flat_fns(prob)
    count = Counter()

    def f(th):
        count()
        return float(J(th))

    gradient = numdifftools.Gradient(f)

    def run(bug: bool) -> Outcome:
        count.n = 0
        approx = np.asarray(gradient(theta0))
        yours = np.asarray(grads[bug](theta0))
        return _flat_outcome(approx, yours, params, count.n)

    return run


def _make_jgradcheck(mode: str):
    def make(prob: Problem):
        params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
        X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
        # Fresh function objects per contender: each mode compiles its own code on its first call.
        J = lambda p, X, Y: jax_cost(p, X, Y)  # noqa: E731
        dJ = {b: (lambda p, X, Y, b=b: jax_backprop(p, X, Y, bug=b)) for b in (False, True)}

        def run(bug: bool) -> Outcome:
            r = jgradcheck.check_grad(J, dJ[bug], params, X, Y, mode=mode)
            failed = [leaf.path for leaf in r.failed_leaves]
            if r.passed:
                leaf = "-"
            elif failed == [BUGGY_LEAF] and r.worst and r.worst[0].path == BUGGY_LEAF:
                leaf = f"{BUGGY_LEAF}{list(r.worst[0].index)}"
            else:
                leaf = f"failed {failed}, worst {r.worst[0].name if r.worst else None}"
            return Outcome(not r.passed, leaf, f"{r.difference:.1e}", r.evaluations)

        return run

    return make


CONTENDERS = [
    # Not skipped by prediction (its evaluations are batched, their cost depends on the library's
    # evaluation strategy, not on a Python call): it runs up to --jg-full-max-n parameters.
    Contender("jgradcheck full", _make_jgradcheck("full"), None, None, "report.evaluations"),
    Contender("jgradcheck screen", _make_jgradcheck("screen"), None, None, "report.evaluations"),
    Contender("jgradcheck sample", _make_jgradcheck("sample"), None, None, "report.evaluations"),
    Contender("classic loop", make_classic_loop, 2.0, "jax", "Python counter around the jitted J (2n)"),
    Contender(
        "torch gradcheck",
        _make_torch(fast=False),
        2.0,
        "torch",
        "counter in Function.forward (2 per input element + a few checks)",
    ),
    Contender(
        "torch gradcheck fast",
        _make_torch(fast=True),
        None,
        None,
        "counter in Function.forward (2 per input for the random projection + a few checks; on failure "
        "it recomputes the whole slow-mode numerical Jacobian for its message: 2n more)",
        bug_run_like="torch gradcheck",
    ),
    Contender("jax check_grads", make_check_grads, None, None, "Python counter around J (primal, vjp, ±eps)"),
    Contender("scipy check_grad", make_scipy, 1.0, "jax", "Python counter around the jitted J (n + 1)"),
    Contender("numdifftools", make_numdifftools, 30.0, "jax", "Python counter around the jitted J"),
]
CONTENDERS_BY_NAME = {c.name: c for c in CONTENDERS}
BASELINE = "jgradcheck full"


# ----------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Row:
    name: str
    n: int
    cold: float | None = None
    warm: float | None = None
    bug_time: float | None = None
    correct: Outcome | None = None
    buggy: Outcome | None = None
    skipped: str | None = None
    warm_note: str | None = None
    bug_skipped: str | None = None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def warm_up() -> None:
    """Backend start-up and first-jit costs paid once, before any contender is timed."""
    jax.block_until_ready(jax.jit(lambda x: x @ x.T + 1.0)(jnp.ones((8, 8))))
    x = torch.ones(8, 8, dtype=torch.float64, requires_grad=True)
    (x @ x.T).sum().backward()


def _median_time(fn: Callable[[], Any], reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def probes(prob: Problem) -> dict[str, float]:
    """What one evaluation costs at this size: a jitted J called from Python with a NumPy θ, a torch
    forward (and, for the record, the FLOPs of one forward pass)."""
    params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
    X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
    theta, unravel = ravel_pytree(params)
    J = jax.jit(lambda th: jax_cost(unravel(th), X, Y))
    theta = np.asarray(theta)
    flat = [torch.from_numpy(prob.params_np[k]).double() for k in prob.names]
    tX, tY = torch.from_numpy(prob.X).double(), torch.from_numpy(prob.Y).double()
    return {
        "jax": _median_time(lambda: float(J(theta))),
        "torch": _median_time(lambda: float(torch_cost(flat, tX, tY))),
        "flops": prob.flops,
    }


def verify(prob: Problem) -> None:
    """The hand-written backprop (JAX and torch) agrees with jax.grad before anything is timed."""
    params = {k: jnp.asarray(v) for k, v in prob.params_np.items()}
    X, Y = jnp.asarray(prob.X), jnp.asarray(prob.Y)
    auto = jax.grad(jax_cost)(params, X, Y)
    mine = jax_backprop(params, X, Y)
    flat = [torch.from_numpy(prob.params_np[k]).double() for k in prob.names]
    theirs = torch_backprop(flat, torch.from_numpy(prob.X).double(), torch.from_numpy(prob.Y).double())
    for k, t in zip(prob.names, theirs):
        np.testing.assert_allclose(np.asarray(mine[k]), np.asarray(auto[k]), rtol=1e-9, atol=1e-13, err_msg=k)
        np.testing.assert_allclose(t.numpy(), np.asarray(auto[k]), rtol=1e-9, atol=1e-13, err_msg=k)


def run_size(prob: Problem, budget: float, rerun_max: float, full_max_n: int, rates: dict[str, float]) -> list[Row]:
    """Runs every contender (cold, warm, planted bug), skipping the O(n) ones predicted too slow.

    The prediction: expected evaluations x this size's probe x (seconds per evaluation / probe)
    measured for the same contender at the previous size (the fastest of its three calls). A cold
    call longer than ``rerun_max`` is not repeated warm: such contenders are Python loops whose
    compilation is well under a second of it.
    """
    verify(prob)
    rows = []
    probe = probes(prob)

    def predict(name: str, evals_per_n: float, kind: str) -> float | None:
        return evals_per_n * prob.n * probe[kind] * rates[name] if name in rates else None

    for c in CONTENDERS:
        row = Row(c.name, prob.n)
        predicted = predict(c.name, c.evals_per_n, c.probe) if c.evals_per_n is not None else None
        if c.name == BASELINE and prob.n > full_max_n:
            predicted, budget_note = math.inf, f"skipped (n > --jg-full-max-n = {full_max_n:,})"
        elif predicted is not None:
            budget_note = f"skipped (too slow: ~{predicted:,.0f} s predicted per call > {budget:.0f} s)"
        if predicted is not None and predicted > budget:
            row.skipped = budget_note
            rows.append(row)
            print(f"  {c.name:22s} {row.skipped}", flush=True)
            continue
        run = c.make(prob)
        row.cold, row.correct = timed(functools.partial(run, False))
        if row.cold > rerun_max:
            row.warm_note = "not rerun"
        else:
            row.warm, _ = timed(functools.partial(run, False))
        like = CONTENDERS_BY_NAME.get(c.bug_run_like)
        bug_predicted = predict(like.name, like.evals_per_n, like.probe) if like else None
        if bug_predicted is not None and bug_predicted > budget:
            row.bug_skipped = f"not run: its failing run recomputes the slow-mode Jacobian, ~{bug_predicted:,.0f} s"
        else:
            row.bug_time, row.buggy = timed(functools.partial(run, True))
        if row.correct.evals and c.probe:
            times = [t for t in (row.cold, row.warm, row.bug_time) if t is not None]
            rates[c.name] = min(times) / row.correct.evals / probe[c.probe]
        print(f"  {c.name:22s} {_fmt_row(row)}", flush=True)
        rows.append(row)
    return rows


def _fmt_row(row: Row) -> str:
    warm = f"{row.warm:8.2f} s" if row.warm is not None else row.warm_note
    out = f"cold {row.cold:8.2f} s  warm {warm}  evals {row.correct.evals}  "
    out += f"correct->{'FLAGGED' if row.correct.flagged else 'pass'}  "
    if row.buggy is None:
        return out + f"bug run {row.bug_skipped}"
    return out + (
        f"bug-run {row.bug_time:8.2f} s  evals {row.buggy.evals}  "
        f"bug->{'caught' if row.buggy.flagged else 'MISSED'} ({row.buggy.leaf})"
    )


def _ratio(x: float | None, base: float | None) -> str:
    return "" if x is None or not base else f"{x / base:.2f}"


def _named(bug: Outcome) -> str:
    named = bug.leaf if bug.flagged else "-"
    if named.startswith("index only"):
        return f"index only{' (-> W2)' if BUGGY_LEAF in named else ' (wrong leaf)'}"
    if named.startswith("input"):
        return f"yes: {named}" if f"({BUGGY_LEAF})" in named else f"no: {named}"
    if named.startswith(BUGGY_LEAF):
        return f"yes: {named}"
    return "no" if named in ("none", "-") else f"no: {named}"


def table(prob: Problem, rows: list[Row]) -> str:
    ran = {r.name: r for r in rows if r.cold is not None}
    base_name = BASELINE if BASELINE in ran else "jgradcheck screen"
    base = ran.get(base_name)
    short = base_name.replace("jgradcheck", "jg")
    head = (
        f"### n = {prob.n:,} parameters (layers {prob.label}, m = {prob.m} examples)\n\n"
        f"| contender | cold s | warm s | bug run s | cold / {short} | warm / {short} | cost evals (correct / bug) | "
        "correct grad | bug caught | names W2 | metric (correct / bug) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.name} | {r.skipped} | | | | | | | | | |")
            continue
        cor, bug = r.correct, r.buggy
        if r.warm is not None:
            warm, warm_ratio = f"{r.warm:.2f}", _ratio(r.warm, base and base.warm)
        else:  # a Python loop whose compile time is < 1 s of it: warm ~ cold
            warm, warm_ratio = f"{r.warm_note}", f"~{_ratio(r.cold, base and base.warm)}"
        if bug is None:
            bug_cells = ("", "", r.bug_skipped, "", "")
            evals = f"{cor.evals:,} / -"
        else:
            bug_cells = (f"{r.bug_time:.2f}", "", "yes" if bug.flagged else "NO", _named(bug), bug.metric)
            evals = f"{cor.evals:,} / {bug.evals:,}"
        lines.append(
            f"| {r.name} | {r.cold:.2f} | {warm} | {bug_cells[0]} | {_ratio(r.cold, base and base.cold)} | "
            f"{warm_ratio} | {evals} | {'false alarm' if cor.flagged else 'pass'} | {bug_cells[2]} | "
            f"{bug_cells[3]} | {cor.metric} / {bug_cells[4] or '-'} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(results: list[tuple[Problem, list[Row]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "os^vDP*Xhp"
    for k, c in enumerate(CONTENDERS):
        pts = [(p.n, r.cold) for p, rows in results for r in rows if r.name == c.name and r.cold is not None]
        if pts:
            xs, ys = zip(*pts)
            style = "-" if c.name.startswith("jgradcheck") else "--"
            ax.plot(xs, ys, style, marker=markers[k % len(markers)], label=c.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (parameters)")
    ax.set_ylabel("time of first call, compilation included (s)")
    ax.set_title("Checking a hand-written MLP gradient, float64, CPU (missing points: skipped)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _git() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../jgradcheck"], cwd=here, capture_output=True, text=True
        )
        return head.stdout.strip() + (" + uncommitted changes in jgradcheck/" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def environment() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout.split("\n")[1]
        mem = f"{mem.split()[1]} GiB RAM"
    except (OSError, IndexError):
        mem = "RAM unknown"
    return "\n".join(
        [
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {os.cpu_count()} CPU cores (nproc), {cpu}, {mem}, shared and noisy; "
            f"JAX devices {[str(d) for d in jax.devices()]}; torch threads {torch.get_num_threads()}",
            f"- Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
            f"torch {torch.__version__}, scipy {scipy.__version__}, numdifftools {numdifftools.__version__}, "
            f"numpy {np.__version__}, jgradcheck {jgradcheck.__version__} (git {_git()})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help=f"comma-separated layer dims (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"small sizes only, a smoke run ({QUICK_SIZES})")
    parser.add_argument("--examples", type=int, default=64, help="m, examples in X (default 64)")
    parser.add_argument("--budget", type=float, default=120.0, help="skip a contender predicted slower (s/call)")
    parser.add_argument("--jg-full-max-n", type=int, default=1_100_000, help="largest n for jgradcheck full")
    parser.add_argument("--rerun-max", type=float, default=30.0, help="no warm rerun after a longer cold call (s)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", default=None, help="write the markdown results here")
    parser.add_argument("--plot", default=None, help="PNG path (default: peers_time_vs_n.png beside --out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    problems = [make_problem(tuple(int(d) for d in s.split("-")), args.examples) for s in sizes.split(",")]
    command = "PYTHONPATH=. python benchmarks/bench_peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = environment()
    print(env, flush=True)

    results = []
    rates: dict[str, float] = {}
    t_start = time.perf_counter()
    with jax.enable_x64(True):
        warm_up()
        for prob in problems:
            print(f"\nn = {prob.n:,} (layers {prob.label}, m = {prob.m})", flush=True)
            rows = run_size(prob, args.budget, args.rerun_max, args.jg_full_max_n, rates)
            results.append((prob, rows))
            print("\n" + table(prob, rows), flush=True)
    total = time.perf_counter() - t_start

    how = "\n".join(f"- {c.name}: {c.how_counted}" for c in CONTENDERS)
    text = (
        "# jgradcheck against its peers\n\n"
        f"Command: `{command.strip()}` (total {total / 60:.1f} min)\n\n{env}\n"
        "- GPU: unmeasured (no GPU was lent in this session).\n"
        f"- torch ran with torch.set_num_threads({args.torch_threads}): with 2 threads on this loaded 2-core "
        "machine a tiny float64 matmul took milliseconds (OpenMP threads waiting on each other); 1 thread was "
        "several times faster, so this favours torch.\n\n"
        "Cold = first call, compilation included; warm = second call, same functions; bug run = third "
        "call, with the planted bug (a new gradient function: what it compiles anew is included). Ratios are to "
        "jgradcheck full at the same size. Every contender checks the same hand-written backprop of the "
        "classic recipe's MLP (float64), once correct and once with dW2 doubled.\n\n"
        + "\n".join(table(p, rows) for p, rows in results)
        + "\nHow evaluations were counted:\n"
        + how
        + "\n\nThe metric column: the classic recipe's difference for classic loop, numdifftools and jgradcheck "
        "(jgradcheck's over the entries it compared one by one: 0 when screening passed every leaf and "
        "compared none); ‖yours − numerical‖₂ / ‖yours‖₂ for scipy; gradcheck's bool; check_grads' "
        "'Max relative difference' from its AssertionError. Number verdicts use the classic recipe's scale (< 1e-5 "
        "pass, otherwise flagged); gradcheck, check_grads and jgradcheck give their own verdicts.\n"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    # The PNG goes beside --out (the recorded run: beside this script); a run without --out is a
    # smoke run and leaves the recorded plot alone unless --plot says otherwise.
    png = args.plot or (
        os.path.join(os.path.dirname(os.path.abspath(args.out)), "peers_time_vs_n.png") if args.out else None
    )
    if png is None:
        return
    plot(results, png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
