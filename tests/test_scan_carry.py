"""The scan rule carries perturbed values (``delta_rules._scan_rule``): J(θ) + ΔJ must match
re-evaluating the whole cost on every kind of scan, and a check built on it must still pass a
correct recurrent gradient and fail a wrong entry of a recurrent weight at that entry.

Each perturbed J below is computed by the delta program (each leaf alone, and all leaves in
one program as the engine groups a recurrent model's weights) and by whole re-evaluation, at
the same points, in float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import delta


def _gru_step(p, h, x):
    z = jax.nn.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"])
    r = jax.nn.sigmoid(x @ p["wr"] + h @ p["ur"] + p["br"])
    c = jnp.tanh(x @ p["wh"] + (r * h) @ p["uh"] + p["bh"])
    return (1 - z) * h + z * c


def _gru(p, xs):  # forward; weights are the body's constants; the initial carry is a leaf
    def step(h, x):
        h = _gru_step(p, h, x)
        return h, jnp.sum(h**2, axis=-1)

    h, ys = jax.lax.scan(step, jnp.broadcast_to(p["h0"], (xs.shape[1], p["h0"].shape[0])), xs)
    return jnp.sum(jnp.tanh(h)) + jnp.mean(ys)


def _reverse_counted(p, xs):  # reverse; an integer carry that counts and scales; an int ys
    def step(carry, x):
        h, k = carry
        h = jnp.tanh(x @ p["w"] + h @ p["u"]) * (1.0 + 0.1 * k.astype(h.dtype))
        return (h, k + 1), (h[:, 0], (h > 0).sum(axis=-1))

    (h, k), (first, positive) = jax.lax.scan(step, (p["h0"], jnp.int32(0)), xs, reverse=True)
    return jnp.sum(h**2) + jnp.sum(first * positive.astype(first.dtype)) + k.astype(h.dtype)


def _perturbed_inputs(p, xs):  # xs computed from leaves (a slab across time, a dense change)
    proj = jnp.tanh(xs @ p["w_in"] + p["b_in"])  # (T, B, H): w_in's column is a slab per step
    gain = p["g"] * p["u"]  # the scalar gain makes the loop's constant change densely

    def step(c, x):
        h, s = c
        h = jnp.sin(x + h @ gain) * p["decay"]
        return (h, s + jnp.mean(h)), h

    (h, s), hs = jax.lax.scan(step, (p["h0"], jnp.zeros((), p["h0"].dtype)), proj)
    return jnp.sum(h) + s + jnp.sum(hs[::2] ** 2)


def _nested(p, xs):  # a scan inside a scan's body, and a param scanned over directly
    def inner(h, w):
        return jnp.tanh(h @ p["u"] + w), None

    def outer(h, x):
        h, _ = jax.lax.scan(inner, h * x[0], p["ws"])
        return h, jnp.sum(h)

    h, ys = jax.lax.scan(outer, p["h0"], xs)
    return jnp.sum(h**2) + jnp.sum(ys * p["ys_w"])


def _cases(seed):
    r = np.random.default_rng(seed)

    def a(*shape, s=0.5):
        return jnp.asarray(r.standard_normal(shape) * s, jnp.float32)

    return {
        "gru": (
            _gru,
            {g: a(3, 4) for g in ("wz", "wr", "wh")}
            | {g: a(4, 4) for g in ("uz", "ur", "uh")}
            | {g: a(4, s=0.1) for g in ("bz", "br", "bh", "h0")},
            (a(5, 2, 3, s=1.0),),
        ),
        "reverse_counted": (_reverse_counted, {"w": a(3, 4), "u": a(4, 4), "h0": a(2, 4)}, (a(6, 2, 3, s=1.0),)),
        "perturbed_inputs": (
            _perturbed_inputs,
            {"w_in": a(3, 4), "b_in": a(4), "g": a(s=1.0), "u": a(4, 4), "decay": a(4), "h0": a(2, 4)},
            (a(5, 2, 3, s=1.0),),
        ),
        "nested": (_nested, {"u": a(3, 3), "ws": a(4, 3), "h0": a(2, 3), "ys_w": a(5)}, (a(5, 2),)),
    }


@pytest.fixture
def scan_rule_calls(monkeypatch):
    """Every group through the delta interpreter, and a count of the scan rule's uses."""
    from jgradcheck._src import engine

    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)
    monkeypatch.setattr(engine, "MEASURE_STRATEGIES", False)
    calls = []
    rule = delta._scan_rule

    def counted(*a, **k):
        calls.append(1)
        return rule(*a, **k)

    monkeypatch.setattr(delta, "_scan_rule", counted)
    jax.clear_caches()  # programs compiled by an earlier test would not trace the rule again
    return calls


def _perturbed_costs(cost, params, args, strategy, x64, together):
    """J at θ + v·eᵢ for every entry i and v in (0.37, -0.21, 0) (an unchanged entry: the
    interpreter's own round-off, f(x + 0) − f(x) where XLA rounds the two differently), by ``strategy``: with
    ``together``, every leaf in one program (each evaluation carries a change in all of them,
    zero but in one), else each leaf alone."""
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare
    from jgradcheck._src.progress import Progress

    with precision_scope(x64):
        problem = prepare(cost, params, args, x64, check_determinism=False)
        engine = make_engine(problem, None, None, strategy)
        leaves = range(len(problem.floats))
        groups = [tuple(leaves)] if together else [(i,) for i in leaves]
        out = []
        for group in groups:
            base = np.concatenate([np.asarray(problem.floats[g]).ravel() for g in group])
            idx = np.arange(base.size)
            out.append(
                np.stack(
                    [engine.costs(group, idx, base + v, Progress(idx.size, False)) for v in (0.37, -0.21, 0.0)],
                    axis=1,
                )
            )
        assert set(engine.ran.values()) == {strategy}
        return np.concatenate(out)


# Each leaf alone on one draw; all leaves in one program (as the engine groups them) on three.
@pytest.mark.parametrize(
    ("seed", "together"), [(0, False), (0, True), (1, True), (2, True)], ids=["0-alone", "0", "1", "2"]
)
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["gru", "reverse_counted", "perturbed_inputs", "nested"])
def test_scan_rule_matches_whole_reevaluation(name, seed, x64, together, scan_rule_calls):
    cost, params, args = _cases(seed)[name]
    fast = _perturbed_costs(cost, params, args, "delta", x64, together)
    assert scan_rule_calls, "the scan rule never ran"
    ref = _perturbed_costs(cost, params, args, "vmap", x64, together)
    eps = np.finfo(np.float64 if x64 else np.float32).eps
    # J(θ) + ΔJ against J(θ + v eᵢ): the same terms rounded in another order, a few ulps of them.
    np.testing.assert_allclose(fast, ref, rtol=0, atol=32 * eps * max(1.0, float(np.max(np.abs(ref)))))


def test_a_zero_change_leaves_the_loop_exactly_unchanged():
    """In a shared program an entry of another leaf gives the loop a zero change in every
    weight: the loop's outputs then change by exactly zero (not by the round-off between the
    loop run on perturbed values and on the bases), and by the whole loop's change otherwise."""
    r = np.random.default_rng(3)
    with jax.enable_x64(True):
        w, u = jnp.asarray(r.standard_normal((3, 4)) * 0.5), jnp.asarray(r.standard_normal((4, 4)) * 0.5)
        xs = jnp.asarray(r.standard_normal((7, 2, 3)))

        def loop(w, u):
            step = lambda h, x: (jnp.tanh(x @ w + h @ u), jnp.sum(h))  # noqa: E731
            return jax.lax.scan(step, jnp.zeros((2, 4)), xs)

        closed = jax.make_jaxpr(loop)(w, u)

        def perturbed(k, v):  # entry k of u moved by v, a zero change in w
            deltas = [delta.OneHot(jnp.int32(0), jnp.zeros(())), delta.OneHot(k, v)]
            return [d for _, d in delta.eval_delta(closed.jaxpr, closed.consts, [w, u], deltas)]

        ks = jnp.arange(16, dtype=jnp.int32)
        vs = jnp.where(ks % 2 == 0, 0.0, 0.37)
        dh, dys = jax.jit(jax.vmap(perturbed))(ks, vs)
        h, ys = loop(w, u)
        for k in range(16):
            if k % 2 == 0:
                assert np.all(np.asarray(dh[k]) == 0) and np.all(np.asarray(dys[k]) == 0)
            else:
                h_k, ys_k = loop(w, u.reshape(-1).at[k].add(0.37).reshape(4, 4))
                np.testing.assert_allclose(np.asarray(h + dh[k]), np.asarray(h_k), rtol=0, atol=1e-14)
                np.testing.assert_allclose(np.asarray(ys + dys[k]), np.asarray(ys_k), rtol=0, atol=1e-13)
                assert np.any(np.asarray(dh[k]) != 0)


def _gru_case(x64):
    r = np.random.default_rng(7)
    dt = np.float64 if x64 else np.float32

    def a(*shape, s=0.5):
        return (r.standard_normal(shape) * s).astype(dt)

    params = {g: a(3, 8) for g in ("wz", "wr", "wh")} | {g: a(8, 8) for g in ("uz", "ur", "uh")}
    params |= {g: a(8, s=0.1) for g in ("bz", "br", "bh", "h0")} | {"out": a(8)}
    xs, ys = a(6, 4, 3, s=1.0), a(4, s=1.0)

    def cost(p, xs, ys):
        def step(h, x):
            return _gru_step(p, h, x), None

        h, _ = jax.lax.scan(step, jnp.broadcast_to(p["h0"], (xs.shape[1], 8)), xs)
        return jnp.mean((h @ p["out"] - ys) ** 2)

    return cost, params, (xs, ys)


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_a_recurrent_gradient_passes_and_a_one_percent_error_fails_at_its_entry(x64, scan_rule_calls):
    # float32 weights are checked in float64 (the default promotion): finite differences in
    # float32 cannot resolve 1% of this GRU's smaller entries, whatever the strategy.
    cost, params, args = _gru_case(x64)
    good = jax.grad(cost)
    report = jgradcheck.check_grad(cost, good, params, *args, mode="full")
    assert report.passed, report
    assert scan_rule_calls, "the scan rule never ran"

    # The recurrent weight's largest entry (a small one could hide 1% under round-off in float32).
    with jax.enable_x64(True):
        at = tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(good(params, *args)["ur"])), (8, 8)))

    def bad(p, xs, ys):
        g = good(p, xs, ys)
        return {**g, "ur": g["ur"].at[at].multiply(1.01)}

    report = jgradcheck.check_grad(cost, bad, params, *args, mode="full")
    assert not report.passed
    assert report.worst[0].name == f"ur[{at[0]}, {at[1]}]"
