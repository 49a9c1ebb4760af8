"""The engine never runs a program slower than re-evaluating the whole cost (issue 17).

What it chose is asserted, never how long it took: the kernel of a transposed convolution goes
through a cheap rule (a shifted window of the dilated input); a rule that would make vmap run
grouped convolutions is dropped for whole re-evaluation; a delta program timed slower than
whole re-evaluation (on a clock the test controls) is dropped for its program; costs built
from primitives the delta rules do not know give the same numbers as whole re-evaluation. Each
check passes with correct gradients and fails at the planted entry (1% of one kernel entry).
Checks take float32 and float64 inputs (``x64`` names the inputs' precision there; the check
runs in float64, its default); the rule tests evaluate the costs in each precision.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import compat, delta, delta_rules
from jgradcheck._src import engine as eng
from jgradcheck._src.check import make_engine
from jgradcheck._src.problem import precision_scope, prepare
from jgradcheck._src.progress import Progress

_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test decides for itself: no strategy, plan or timing remembered from another."""
    for name in ("_CHOSEN", "_RACED", "_DROPPED", "_SPEED", "_PLANS"):
        monkeypatch.setattr(eng, name, {})


def _conv_transpose_cost(p, x):
    y = jax.lax.conv_transpose(x, p["k"], (2, 2), "SAME", dimension_numbers=_NHWC)
    return jnp.sum(y**2)


def _conv_transpose_case(x64: bool, out_channels: int = 8):
    r = np.random.default_rng(0)
    dtype = jnp.float64 if x64 else jnp.float32
    with precision_scope(x64):
        k = jnp.asarray(r.standard_normal((3, 3, 8, out_channels)) * 0.3, dtype)
        x = jnp.asarray(r.standard_normal((2, 12, 12, 8)), dtype)
    return {"k": k}, x


def _planted(grad_fn, leaf: str, at: tuple[int, ...], factor: float = 1.01):
    """``grad_fn`` with one entry of ``leaf`` 1% off."""

    def bad(p, *args):
        g = dict(grad_fn(p, *args))
        g[leaf] = g[leaf].at[at].multiply(factor)
        return g

    return bad


def _engine_for(cost, params, args, x64=True):
    problem = prepare(cost, params, args, x64, check_determinism=False)
    return problem, make_engine(problem, None, None, "delta")


def test_a_transposed_kernel_entry_is_a_shifted_window_of_the_dilated_input(monkeypatch):
    params, x = _conv_transpose_case(True)
    used = []
    rule = delta_rules._shifted_channel
    monkeypatch.setattr(delta_rules, "_shifted_channel", lambda *a: used.append(1) or rule(*a))
    monkeypatch.setattr(eng, "COMPILE_SECONDS", 0.0)  # not the small-check shortcuts
    monkeypatch.setattr(eng, "LOOP_SECONDS", 0.0)
    with precision_scope(True):
        problem, engine = _engine_for(_conv_transpose_cost, params, (x,))
        w, log, grouped = delta.measure(problem.trace, engine.flat, (0,))
        assert engine.strategy_for((0,)) == "delta"
    assert used  # (once per trace: measured here, then by strategy_for)
    assert grouped == 0.0  # no per-perturbation kernel, so no grouped convolution under vmap
    assert [e.primitive.name for e, _ in log] == []  # the change stays one output channel
    assert not engine.dropped


@pytest.mark.parametrize("x64", [True, False])
def test_conv_transpose_check_passes_and_finds_one_kernel_entry_1_percent_off(x64):
    params, x = _conv_transpose_case(x64)
    grad = jax.grad(_conv_transpose_cost)
    report = jgradcheck.check_grad(_conv_transpose_cost, grad, params, x)
    assert report.passed, report
    assert "k" in report.evaluated and "grouped" not in report.evaluated and "timed" not in report.evaluated
    bad = jgradcheck.check_grad(_conv_transpose_cost, _planted(grad, "k", (1, 2, 3, 4)), params, x)
    assert bad.status == "failed", bad
    assert bad.worst[0].name == "k[1, 2, 3, 4]"


def _old_transposed_rule(monkeypatch):
    """The rule before issue 17: a transposed convolution's kernel entry as a single-channel
    convolution with a per-perturbation kernel, which vmap turns into a grouped convolution."""
    monkeypatch.setattr(
        delta_rules, "_windows_fit", lambda eqn: all(d == 1 for d in compat.conv_params(eqn).lhs_dilation)
    )


def test_a_rule_that_makes_grouped_convolutions_is_dropped_for_whole_reevaluation(monkeypatch):
    _old_transposed_rule(monkeypatch)
    params, x = _conv_transpose_case(True)
    monkeypatch.setattr(eng, "COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(eng, "LOOP_SECONDS", 0.0)
    with precision_scope(True):
        problem, engine = _engine_for(_conv_transpose_cost, params, (x,))
        _, _, grouped = delta.measure(problem.trace, engine.flat, (0,))
        assert grouped > 0 and delta.grouped_work(problem.trace.jaxpr, (0,)) == 0.0
        assert engine.strategy_for((0,)) == "vmap"
    assert engine.dropped == {0: "grouped"}


@pytest.mark.parametrize("x64", [True, False])
def test_with_the_grouped_rule_the_check_re_evaluates_whole_and_still_finds_the_bug(x64, monkeypatch):
    _old_transposed_rule(monkeypatch)
    params, x = _conv_transpose_case(x64)
    grad = jax.grad(_conv_transpose_cost)
    report = jgradcheck.check_grad(_conv_transpose_cost, grad, params, x)
    assert report.passed, report
    assert "changes only would run grouped convolutions: k" in report.evaluated
    bad = jgradcheck.check_grad(_conv_transpose_cost, _planted(grad, "k", (2, 0, 5, 1)), params, x)
    assert bad.status == "failed" and bad.worst[0].name == "k[2, 0, 5, 1]", bad


def test_two_convolutions_whose_input_and_kernel_both_move_count_in_whole_reevaluation_too():
    def cost(p, x):  # k1 and k2 in one group: under vmap the second convolution is grouped either way
        h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=_NHWC))
        return jnp.sum(jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=_NHWC) ** 2)

    r = np.random.default_rng(2)
    params = {"k1": jnp.asarray(r.standard_normal((3, 3, 2, 3))), "k2": jnp.asarray(r.standard_normal((3, 3, 3, 2)))}
    x = jnp.asarray(r.standard_normal((2, 6, 6, 2)))
    with precision_scope(True):
        problem = prepare(cost, params, (x,), True, check_determinism=False)
        both = delta.grouped_work(problem.trace.jaxpr, (0, 1))
        second = [e for e in problem.trace.jaxpr.eqns if e.primitive.name == "conv_general_dilated"][1]
        assert both == delta.work(second)
        assert delta.grouped_work(problem.trace.jaxpr, (0,)) == 0.0


# The measured guard, on a clock the test controls: each call of a group's compiled block
# advances it by a fixed number of seconds per evaluation, by strategy.


def _fake_speeds(monkeypatch, per_eval: dict[str, float]):
    now = threading.local()  # one clock per thread: groups run in threads of their own
    calls: list[tuple[str, int]] = []
    blocks = eng.Engine._blocks

    def timed(self, group, strategy, idx, vals, progress):
        out = blocks(self, group, strategy, idx, vals, progress)
        now.t = getattr(now, "t", 0.0) + per_eval[strategy] * int(np.asarray(idx).shape[0])
        calls.append((strategy, int(np.asarray(idx).shape[0])))
        return out

    monkeypatch.setattr(eng.Engine, "_blocks", timed)
    monkeypatch.setattr(eng, "_clock", lambda: getattr(now, "t", 0.0))
    monkeypatch.setattr(eng, "COMPILE_SECONDS", 0.0)  # not the small-check shortcuts
    monkeypatch.setattr(eng, "LOOP_SECONDS", 0.0)
    return calls


def _mlp(p, x):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2)


def _mlp_case(x64: bool):
    r = np.random.default_rng(4)
    dtype = jnp.float64 if x64 else jnp.float32
    with precision_scope(x64):
        return (
            {
                "w1": jnp.asarray(r.standard_normal((6, 10)) * 0.4, dtype),
                "w2": jnp.asarray(r.standard_normal((10, 3)), dtype),
            },
            jnp.asarray(r.standard_normal((5, 6)), dtype),
        )


@pytest.mark.parametrize("x64", [True, False])
def test_a_delta_program_timed_slower_is_dropped_and_the_check_still_finds_the_bug(x64, monkeypatch):
    calls = _fake_speeds(monkeypatch, {"delta": 1.0, "vmap": 0.01})
    params, x = _mlp_case(x64)
    grad = jax.grad(_mlp)
    report = jgradcheck.check_grad(_mlp, grad, params, x, chunk_size=8)
    assert report.passed, report
    assert "whole cost re-evaluated, timed faster than changes only: w1, w2" in report.evaluated
    raced = [s for s, n in calls]
    assert "delta" in raced and raced[-1] == "vmap"
    # Dropped for the program: the next check re-evaluates whole from its first block.
    calls.clear()
    bad = jgradcheck.check_grad(_mlp, _planted(grad, "w1", (3, 7)), params, x, chunk_size=8)
    assert {s for s, _ in calls} == {"vmap"}
    assert "timed faster than changes only: w1, w2" in bad.evaluated
    assert bad.status == "failed" and bad.worst[0].name == "w1[3, 7]", bad


def test_a_delta_program_timed_faster_is_kept_and_timed_once(monkeypatch):
    calls = _fake_speeds(monkeypatch, {"delta": 1.0, "vmap": 1.2})  # whole re-evaluation not 1.5x faster
    params, x = _mlp_case(True)
    report = jgradcheck.check_grad(_mlp, jax.grad(_mlp), params, x, chunk_size=8)
    assert report.passed, report
    assert report.evaluated.startswith("changes only (delta): w1, w2")
    assert "vmap" in [s for s, _ in calls]  # it was timed
    calls.clear()
    assert jgradcheck.check_grad(_mlp, jax.grad(_mlp), params, x, chunk_size=8).passed
    assert {s for s, _ in calls} == {"delta"}  # and not again


def test_a_delta_program_faster_than_the_model_s_whole_cost_is_not_raced(monkeypatch):
    calls = _fake_speeds(monkeypatch, {"delta": 1e-12, "vmap": 1e-15})
    monkeypatch.setattr(eng, "GUARD_SECONDS", 0.0)
    params, x = _mlp_case(True)
    assert jgradcheck.check_grad(_mlp, jax.grad(_mlp), params, x, chunk_size=8).passed
    assert {s for s, _ in calls} == {"delta"}


def test_a_delta_program_slower_than_a_measured_whole_cost_is_raced(monkeypatch):
    # Faster than the work model's whole cost, but slower than whole re-evaluation of the same
    # cost measured on another group: the model is checked against the measurement.
    calls = _fake_speeds(monkeypatch, {"delta": 1e-12, "vmap": 1e-15})
    monkeypatch.setattr(eng, "GUARD_SECONDS", 0.0)
    params, x = _mlp_case(True)
    with precision_scope(True):
        problem, engine = _engine_for(_mlp, params, (x,))
        engine.chunk_size = 8
        base = np.asarray(problem.floats[0]).ravel()
        idx = np.arange(base.size)
        eng._SPEED[(engine.program, (1,), "vmap", 1)] = 1e-14
        engine.costs((0,), idx, base + 0.25, Progress(idx.size, False))
    assert engine.dropped == {0: "timed"}
    assert [s for s, _ in calls][:3] == ["delta", "delta", "vmap"]


def test_a_raced_call_evaluates_every_entry_by_the_winner(monkeypatch):
    # One call never mixes the strategies (their round-off differs): the winner's values for all.
    _fake_speeds(monkeypatch, {"delta": 1.0, "vmap": 0.01})
    params, x = _mlp_case(True)
    with precision_scope(True):
        problem, engine = _engine_for(_mlp, params, (x,))
        engine.chunk_size = 8
        group = (0,)
        base = np.asarray(problem.floats[0]).ravel()
        idx = np.arange(base.size)
        got = engine.costs(group, idx, base + 0.25, Progress(idx.size, False))
        assert engine.dropped == {0: "timed"}
        ref = make_engine(problem, None, 8, "vmap").costs(group, idx, base + 0.25, Progress(idx.size, False))
    np.testing.assert_array_equal(got, ref)


# Costs built from primitives the delta rules do not know: each is evaluated whole where the
# change reaches it (f(x + Δ) − f(x)), so the numbers are whole re-evaluation's to rounding.


def _sorted_cost(p, x):
    return jnp.sum(jnp.sort(x @ p["w"], axis=-1) * jnp.arange(1.0, 5.0))


def _cumprod_cost(p, x):
    return jnp.sum(jnp.cumprod(1.0 + 0.1 * jnp.tanh(x @ p["w"]), axis=0))


def _pool_cost(p, x):
    h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=_NHWC)
    pooled = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.sum(jax.nn.logsumexp(pooled, axis=(1, 2)))


def _fft_cost(p, x):
    return jnp.sum(jnp.abs(jnp.fft.rfft(x @ p["w"], axis=0)) ** 2)


def _loop_cost(p, x):  # a while loop (fori_loop with static bounds would be a scan)
    def body(c):
        return c[0] + 1, jnp.tanh(c[1] @ p["u"] + x)

    return jnp.sum(jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1] ** 2)


def _unknown_cases():
    r = np.random.default_rng(5)

    def a(*shape, s=0.5):
        return r.standard_normal(shape) * s

    return {
        "sort": (_sorted_cost, {"w": a(3, 4)}, (a(5, 3),), "w", (1, 2)),
        "cumprod": (_cumprod_cost, {"w": a(3, 4)}, (a(6, 3),), "w", (2, 0)),
        "max_pool": (_pool_cost, {"k": a(3, 3, 2, 3)}, (a(2, 6, 6, 2),), "k", (1, 1, 0, 2)),
        "fft": (_fft_cost, {"w": a(3, 4)}, (a(8, 3),), "w", (0, 3)),
        "while": (_loop_cost, {"u": a(4, 4)}, (a(3, 4),), "u", (2, 1)),
    }


UNKNOWN = _unknown_cases()


def _as(tree, x64):
    dtype = jnp.float64 if x64 else jnp.float32
    with precision_scope(x64):
        return jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_costs_of_unknown_primitives_pass_and_fail_at_the_planted_entry(name, x64):
    cost, params, args, leaf, at = UNKNOWN[name]
    params, args = _as(params, x64), _as(args, x64)
    grad = jax.jacfwd(cost) if name == "while" else jax.grad(cost)  # no reverse mode through while
    report = jgradcheck.check_grad(cost, grad, params, *args)
    assert report.passed, report
    bad = jgradcheck.check_grad(cost, _planted(grad, leaf, at, 1.05), params, *args)
    assert bad.status == "failed", bad
    assert bad.worst[0].name == f"{leaf}[{', '.join(map(str, at))}]"


@pytest.mark.parametrize("name", sorted(UNKNOWN))
def test_costs_of_unknown_primitives_delta_matches_whole_and_has_no_grouped_convolution(name, monkeypatch):
    cost, params, args, leaf, _ = UNKNOWN[name]
    params, args = _as(params, True), _as(args, True)
    monkeypatch.setattr(eng, "COMPILE_SECONDS", 0.0)
    monkeypatch.setattr(eng, "LOOP_SECONDS", 0.0)
    monkeypatch.setattr(eng, "MEASURE_STRATEGIES", False)
    with precision_scope(True):
        problem, engine = _engine_for(cost, params, args)
        _, _, grouped = delta.measure(problem.trace, engine.flat, (0,))
        assert grouped == 0.0
        base = np.asarray(problem.floats[0]).ravel()
        idx = np.arange(base.size)
        monkeypatch.setattr(eng, "INTERPRET_ALWAYS", True)
        fast = engine.costs((0,), idx, base + 0.3, Progress(idx.size, False))
        ref = make_engine(problem, None, None, "vmap").costs((0,), idx, base + 0.3, Progress(idx.size, False))
    np.testing.assert_allclose(fast, ref, rtol=0, atol=64 * np.finfo(np.float64).eps * max(1.0, np.max(np.abs(ref))))


# The rule itself against whole re-evaluation, in float32 and float64: transposed convolutions
# in other layouts, with strides, kernel dilation and negative padding.


def _transposed_layouts(p, x):
    a = jax.lax.conv_transpose(x, p["k"], (2, 2), "SAME", dimension_numbers=_NHWC)
    b = jax.lax.conv_general_dilated(  # NCHW/OIHW, input dilation in both axes, kernel dilation, negative padding
        jnp.transpose(x, (0, 3, 1, 2)), p["o"], (1, 2), ((2, -1), (1, 0)), lhs_dilation=(3, 2), rhs_dilation=(1, 2)
    )
    c = jax.lax.conv_transpose(x, p["k"][:, :, :, :2], (3, 1), "VALID", dimension_numbers=_NHWC)
    return jnp.sum(jnp.sin(a)) + jnp.sum(b**2) + jnp.sum(jnp.tanh(c))


@pytest.mark.parametrize("x64", [True, False])
def test_the_transposed_kernel_rule_matches_whole_reevaluation(x64, monkeypatch):
    r = np.random.default_rng(6)
    params = _as({"k": r.standard_normal((3, 2, 3, 4)) * 0.5, "o": r.standard_normal((2, 3, 2, 3)) * 0.5}, x64)
    x = _as(r.standard_normal((2, 5, 4, 3)), x64)
    monkeypatch.setattr(eng, "INTERPRET_ALWAYS", True)
    used = []
    rule = delta_rules._shifted_channel
    monkeypatch.setattr(delta_rules, "_shifted_channel", lambda *a: used.append(1) or rule(*a))
    got = {}
    with precision_scope(x64):
        problem = prepare(_transposed_layouts, params, (x,), x64, check_determinism=False)
        for strategy in ("delta", "vmap"):
            engine = make_engine(problem, None, None, strategy)
            got[strategy] = np.concatenate(
                [
                    engine.costs((g,), np.arange(n), np.asarray(problem.floats[g]).ravel() + v, Progress(n, False))
                    for g in range(len(problem.floats))
                    for n in [problem.floats[g].size]
                    for v in (0.37, -0.21)
                ]
            )
    assert used  # the kernel entries went through the shifted window
    eps = np.finfo(np.float64 if x64 else np.float32).eps
    ref = got["vmap"]
    np.testing.assert_allclose(got["delta"], ref, rtol=0, atol=32 * eps * max(1.0, float(np.max(np.abs(ref)))))
