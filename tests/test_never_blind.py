"""Never a pass that could not see, never a crash inside (issue 8).

Each test is a reproducer of the issue: a wrong gradient that used to pass (low precision,
steep costs, kinks within the step), a correct one that used to fail (domain edges), a check
that could not be interrupted, an error that did not teach.
"""

from __future__ import annotations

import _thread
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck

_W = jnp.arange(1.0, 5.0)


def _f(w):
    return jnp.sum(w**2)


# --- your gradient's own rounding: judged per entry, from its dtype and magnitude ------------------

_LOW = [jnp.bfloat16, jnp.float16]
_BUGS = {"sign": -2.0, "doubled": 4.0, "5%": 2.1}


@pytest.mark.parametrize("dtype", _LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("bug", list(_BUGS))
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_low_precision_gradient_with_a_bug_fails(dtype, bug, x64):
    """bf16 ε is 2^-7: 256 ulps of the leaf's largest entry used to allow 200% errors."""
    c = _BUGS[bug]
    report = jgradcheck.check_grad(_f, lambda w: (c * w).astype(dtype), _W, x64=x64)
    assert report.status == "failed", str(report)


@pytest.mark.parametrize("dtype", _LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_low_precision_gradient_that_is_right_passes(dtype, x64):
    report = jgradcheck.check_grad(_f, lambda w: (2 * w).astype(dtype), _W, x64=x64)
    assert report.passed, str(report)


# --- low-precision parameters with x64=False ------------------------------------------------------


@pytest.mark.parametrize("dtype", _LOW, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("bug", ["sign", "doubled"])
def test_low_precision_parameters_never_pass_a_bug(dtype, bug):
    c = _BUGS[bug]
    report = jgradcheck.check_grad(_f, lambda w: c * w, _W.astype(dtype), x64=False)
    assert not report.passed, str(report)
    assert report.status == "failed"


@pytest.mark.parametrize("dtype", _LOW, ids=["bfloat16", "float16"])
def test_low_precision_parameters_right_gradient_is_inconclusive_with_a_reason(dtype):
    report = jgradcheck.check_grad(_f, lambda w: 2 * w, _W.astype(dtype), x64=False)
    # J is rounded to 8 (bfloat16) or 11 (float16) bits: no step resolves 1% of this gradient.
    assert report.status == "inconclusive", str(report)
    text = str(report)
    assert "INCONCLUSIVE" in text and "x64=True" in text
    assert report.leaf("<root>").status == "inconclusive"
    row = next(line for line in text.splitlines() if line.strip().startswith("<root>"))
    assert "inconclusive" in row  # the leaf row, not "FAIL"
    assert "FAIL" not in text


def test_inconclusive_assertion_says_so():
    with pytest.raises(AssertionError, match="INCONCLUSIVE"):
        jgradcheck.assert_grad_correct(_f, lambda w: 2 * w, _W.astype(jnp.bfloat16), x64=False)


# --- steep costs: steps that adapt ------------------------------------------------------------------


def _steep(b):
    return jnp.sum(jnp.exp(b * 1e6))


def _steep_grad(b):
    return 1e6 * jnp.exp(b * 1e6)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_steep_cost_right_gradient_passes_with_a_small_difference(x64):
    with jax.enable_x64(x64):
        b = jnp.array([1e-6, -1e-6])
    report = jgradcheck.check_grad(_steep, _steep_grad, b)
    assert report.passed, str(report)
    assert report.difference < 1e-6
    assert report.leaf("<root>").resolution < 1e-2


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_steep_cost_wrong_gradient_fails(x64):
    with jax.enable_x64(x64):
        b = jnp.array([1e-6, -1e-6])
    report = jgradcheck.check_grad(_steep, lambda b: -_steep_grad(b), b)
    assert report.status == "failed", str(report)


def test_an_enormous_truncation_estimate_is_inconclusive_not_a_pass():
    """A step you chose, far too large for the curvature: no pass can rest on it."""
    report = jgradcheck.check_grad(_steep, lambda b: 1.01 * _steep_grad(b), jnp.array([1e-6, -1e-6]), eps=1e-5)
    assert report.status == "inconclusive", str(report)


# --- domain edges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cost, grad",
    [
        (lambda x: jnp.sum(jnp.log(x)), lambda x: 1 / x),
        (lambda x: jnp.sum(jnp.sqrt(x)), lambda x: 0.5 / jnp.sqrt(x)),
    ],
    ids=["log", "sqrt"],
)
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_domain_edge_right_gradient_passes_and_is_reported(cost, grad, x64):
    with jax.enable_x64(x64):
        x = jnp.array([1e-7, 0.5])
    report = jgradcheck.check_grad(cost, grad, x)
    assert report.passed, str(report)
    assert report.difference < 1e-6
    text = str(report)
    assert "smaller step" in text  # x = 1e-7: θ - h leaves the domain; smaller steps stay inside it
    assert "0 isolated" not in text
    wrong = jgradcheck.check_grad(cost, lambda x: 1.05 * grad(x), x)
    assert wrong.status == "failed"


def test_one_sided_differences_where_only_one_side_is_in_the_domain():
    # J is defined for w >= 0 only, and w[0] = 0 sits on the edge: no central step fits.
    def cost(p):
        return jnp.sum(jnp.where(p >= 0, p**2 + 3 * p, jnp.nan))

    report = jgradcheck.check_grad(cost, lambda p: 2 * p + 3, jnp.array([0.0, 0.7]))
    assert report.passed, str(report)
    assert "one-sided" in str(report)
    assert jgradcheck.check_grad(cost, lambda p: 2 * p + 3.2, jnp.array([0.0, 0.7])).status == "failed"


# --- kinks within reach of the step -----------------------------------------------------------------

_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((3, 1))
_W1 = _RNG.standard_normal((4, 3))
_B1 = _RNG.standard_normal((4, 1))
_B1[0, 0] = 3e-6 - (_W1[0] @ _X)[0]  # unit 0's pre-activation: 3e-6, below the step
_W2 = _RNG.standard_normal((1, 4))


def _mlp(p, x):
    a = jax.nn.relu(p["W1"] @ x + p["b1"])
    return jnp.sum(jnp.tanh(p["W2"] @ a))


def _mlp_params():
    with jax.enable_x64(True):
        return {k: jnp.asarray(v) for k, v in (("W1", _W1), ("b1", _B1), ("W2", _W2))}, jnp.asarray(_X)


def _planted(p, x):
    # 5% off exactly on the entries whose stencil straddles the kink (b1[0, 0], W1[0, 2]).
    g = jax.grad(_mlp)(p, x)
    return {**g, "W1": g["W1"].at[0, 2].multiply(1.05), "b1": g["b1"].at[0, 0].multiply(1.05)}


def test_kink_within_reach_is_listed_and_the_right_gradient_passes():
    p, x = _mlp_params()
    report = jgradcheck.check_grad(_mlp, jax.grad(_mlp), p, x)
    assert report.passed, str(report)
    assert {(e.path, e.index) for e in report.kinks} == {("b1", (0, 0)), ("W1", (0, 2))}
    assert all(e.how == "kink nearby" for e in report.kinks)
    assert "kink closer to θ than the step" in str(report)


def test_five_percent_error_on_entries_straddling_a_kink_fails():
    p, x = _mlp_params()
    report = jgradcheck.check_grad(_mlp, _planted, p, x)
    assert report.status == "failed", str(report)
    assert {e.name for e in report.worst if e.status == "fail"} == {"b1[0, 0]", "W1[0, 2]"}


# --- Ctrl-C -----------------------------------------------------------------------------------------


# Blocks of the big leaf after which Ctrl-C comes, and the check's block size (small, so that
# the check has many blocks left: 2 x 6,400 evaluations in blocks of 256 are 50 blocks).
_CTRL_C_AT_BLOCK = 3
_CTRL_C_BLOCK_EVALS = 256
# How long a worker that saw Ctrl-C sent waits for the main thread to pass it on, and how long
# the check's threads get to end: bounds on a hang, not speeds (the main thread wakes every
# schedule.WAIT_SLICE_S).
_CTRL_C_PATIENCE_S = 60.0


def test_ctrl_c_stops_a_long_check_quickly_and_leaves_nothing_behind(monkeypatch):
    """Ctrl-C after the third block of the big leaf: no block of it starts after that.

    Ctrl-C is sent from the tick the engine's workers give after each block, not from a timer,
    so the check is stopped at a known block on any host. The worker that sends it, and every
    worker at its next tick, waits until the main thread has passed the interrupt on to them
    (``schedule._Cancellable.stop``): the blocks run do not depend on how soon the main thread
    wakes. Waiting there past ``_CTRL_C_PATIENCE_S`` is a failure (Ctrl-C never got through).
    """
    from jgradcheck._src import engine, schedule

    rng = np.random.default_rng(1)
    m = jnp.asarray(rng.standard_normal((80, 8)), jnp.float32)
    params = {"big": jnp.asarray(rng.standard_normal((80, 80)) * 0.1, jnp.float32), "b": jnp.ones(3)}
    big = int(params["big"].size)

    def cost(p):
        return jnp.sum(jnp.tanh(p["big"] @ m) ** 2) + jnp.sum(p["b"] ** 2)

    monkeypatch.setattr(engine, "BLOCK_EVALS", _CTRL_C_BLOCK_EVALS)
    blocks = {"big": 0, "other": 0}  # blocks dispatched, by group

    def counting(block):
        def counted(program, group, consts, flat, *rest):
            blocks["big" if any(flat[g].size == big for g in group) else "other"] += 1
            return block(program, group, consts, flat, *rest)

        return counted

    for name in ("_group_block", "_group_block_quick", "_group_block_fused", "_group_block_quick_fused"):
        monkeypatch.setattr(engine, name, counting(getattr(engine, name)))

    sent = threading.Event()
    at_send: dict[str, int] = {}
    stuck: list[str] = []
    workers: set[str] = set()
    tick = schedule._Cancellable.update

    def update(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            workers.add(threading.current_thread().name)
            if not sent.is_set() and blocks["big"] >= _CTRL_C_AT_BLOCK:
                at_send.update(blocks)
                sent.set()
                _thread.interrupt_main()
            if sent.is_set() and not self.stop.wait(_CTRL_C_PATIENCE_S):
                stuck.append(threading.current_thread().name)
        elif not sent.is_set() and blocks["big"] >= _CTRL_C_AT_BLOCK:  # no worker threads: Ctrl-C here
            at_send.update(blocks)
            sent.set()
            _thread.interrupt_main()
        tick(self, *args, **kwargs)

    monkeypatch.setattr(schedule._Cancellable, "update", update)
    x64_before = jax.config.read("jax_enable_x64")
    precision_before = jax.config.jax_default_matmul_precision
    threads_before = set(threading.enumerate())
    # A process started in the background by a non-interactive shell (as CI may start this
    # suite) inherits SIGINT ignored, and interrupt_main then does nothing: Python's own handler.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            jgradcheck.check_grad(
                cost, jax.grad(cost), params, mode="full", strategy="vmap", chunk_size=64, progress=False
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert sent.is_set() and not stuck, (at_send, stuck)
    assert workers, "the groups ran in the calling thread: this test is about stopping worker threads"
    # The big leaf's worker stopped at the tick that sent Ctrl-C; any other worker ran at most the
    # block it was in. The check had 2 x 6,400 / 256 = 50 blocks of the big leaf to run.
    assert blocks["big"] == at_send["big"] == _CTRL_C_AT_BLOCK, (blocks, at_send)
    assert blocks["other"] <= at_send["other"] + 1, (blocks, at_send)
    assert 2 * big // _CTRL_C_BLOCK_EVALS >= 10 * _CTRL_C_AT_BLOCK
    assert jax.config.read("jax_enable_x64") == x64_before
    assert jax.config.jax_default_matmul_precision == precision_before
    left = [t for t in threading.enumerate() if t not in threads_before]
    for t in left:
        t.join(_CTRL_C_PATIENCE_S)
    assert not [t.name for t in left if t.is_alive()]


# --- errors that teach ------------------------------------------------------------------------------


def test_untraceable_cost_says_j_must_be_traceable():
    with pytest.raises(TypeError, match="JAX-traceable function of params") as info:
        jgradcheck.check_grad(lambda w: float(_f(w)), lambda w: 2 * w, _W)
    assert "float" in str(info.value)
    assert isinstance(info.value.__cause__, jax.errors.ConcretizationTypeError)


def test_nondeterministic_trace_message_has_no_placeholders():
    def cost(w):
        return jnp.sum(w**2) + np.random.default_rng().standard_normal()

    with pytest.raises(ValueError, match="not deterministic") as info:
        jgradcheck.check_grad(cost, lambda w: 2 * w, _W)
    assert "trace 1" not in str(info.value)


def test_no_inf_percent_and_no_1_entries():
    # A leaf whose numerical gradient is exactly zero, another inconclusive, one failing: the
    # texts a report can hold.
    def cost(p):
        return jnp.sum(p["w"] ** 2) + 0.0 * jnp.sum(p["z"])

    params = {"w": jnp.arange(1.0, 5.0).astype(jnp.bfloat16), "z": jnp.ones(2, jnp.bfloat16)}
    report = jgradcheck.check_grad(cost, lambda p: {"w": 2 * p["w"], "z": jnp.zeros(2)}, params, x64=False)
    text = str(report)
    assert "inf%" not in text and "1 entries" not in text and "0 isolated" not in text
