"""The delta interpreter must give the same finite differences as re-evaluating the whole cost.

Each cost below exercises a different kind of primitive: products with the perturbed leaf on
either side, batch dimensions, transposes, gathers (embedding lookups), control flow (scan,
cond, while), custom rules, integer and boolean intermediates, softmax, convolutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck


def _mlp_rhs(p, x):  # flax-style x @ kernel: the perturbed leaf is the right operand
    h = jnp.tanh(x @ p["k1"] + p["b1"])
    return jnp.mean((h @ p["k2"]) ** 2) + 0.1 * jnp.sum(p["k1"] ** 2)


def _attention(p, x):  # batch dims in dot_general, transposes, softmax (stop_gradient inside)
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    s = jnp.einsum("bqd,bkd->bqk", q, k) / 2.0
    a = jax.nn.softmax(s, axis=-1)
    return jnp.sum(jnp.einsum("bqk,bkd->bqd", a, v) ** 2)


def _embedding(p, tokens):  # gather with an integer argument
    e = p["table"][tokens]
    return jnp.sum(jnp.sin(e) * p["w"])


def _scan_rnn(p, xs):  # lax.scan
    def step(h, x):
        h = jnp.tanh(p["wh"] @ h + p["wx"] @ x)
        return h, jnp.sum(h)

    _, ys = jax.lax.scan(step, jnp.zeros(3), xs)
    return jnp.sum(ys**2)


def _control(p, x):  # cond, while_loop, integer and boolean intermediates, where/argmax
    s = jnp.sum(p["w"] * x)
    y = jax.lax.cond(s > 0, lambda t: t**2, lambda t: -t, s)
    i = jnp.argmax(p["w"])
    z = jax.lax.fori_loop(0, 3, lambda k, c: c * 0.5 + jnp.cos(c), p["w"])
    return y + p["w"][i] + jnp.sum(jnp.where(p["w"] > 0.1, z, z**2))


@jax.custom_vjp
def _scaled(x):
    return 2.0 * x


_scaled.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))


def _custom(p, x):  # custom_vjp and custom_jvp (relu) inlined
    return jnp.sum(jax.nn.relu(_scaled(p["w"]) @ x - 0.1)) + jnp.sum(jax.nn.gelu(p["w"]))


def _conv(p, x):  # convolution: no one-hot rule, falls back to the generic rule
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME")
    return jnp.mean(jnp.tanh(y))


def _cases():
    r = np.random.default_rng(0)

    def a(*shape):
        return jnp.asarray(r.standard_normal(shape) * 0.5, jnp.float32)

    return {
        "mlp_rhs": (_mlp_rhs, {"k1": a(4, 5), "b1": a(5), "k2": a(5, 2)}, (a(6, 4),)),
        "attention": (_attention, {"wq": a(4, 3), "wk": a(4, 3), "wv": a(4, 3)}, (a(2, 5, 4),)),
        "embedding": (_embedding, {"table": a(7, 3), "w": a(3)}, (jnp.array([1, 4, 4, 6, 0]),)),
        "scan_rnn": (_scan_rnn, {"wh": a(3, 3), "wx": a(3, 2)}, (a(4, 2),)),
        "control": (_control, {"w": a(5)}, (a(5),)),
        "custom": (_custom, {"w": a(3, 4)}, (a(4, 2),)),
        "conv": (_conv, {"k": a(2, 1, 3, 3)}, (a(1, 1, 5, 5),)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_matches_full_reevaluation(name):
    cost, params, args = CASES[name]
    fast = jgradcheck.numerical_grad(cost, params, *args, strategy="delta")
    ref = jgradcheck.numerical_grad(cost, params, *args, strategy="vmap")
    with jax.enable_x64(True):
        exact = jax.grad(cost)(
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params),
            *[jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in args],
        )
    for key in params:
        scale = float(np.max(np.abs(ref[key]))) + 1e-30
        # The two strategies round differently, so they agree to the noise of J over h.
        np.testing.assert_allclose(fast[key], ref[key], atol=1e-8 * max(1.0, scale), rtol=0)
        np.testing.assert_allclose(fast[key], np.asarray(exact[key]), atol=1e-6 * max(1.0, scale), rtol=1e-6)


def test_delta_check_catches_a_planted_bug_on_the_right_operand():
    cost, params, args = CASES["mlp_rhs"]
    good = jax.grad(cost)

    def bad(p, x):
        g = good(p, x)
        return {**g, "k1": g["k1"].at[2, 3].add(0.05)}

    assert jgradcheck.check_grad(cost, good, params, *args).passed
    report = jgradcheck.check_grad(cost, bad, params, *args)
    assert not report.passed
    assert report.worst[0].name == "k1[2, 3]"


def test_unknown_strategy_is_rejected():
    cost, params, args = CASES["control"]
    with pytest.raises(ValueError, match="strategy must be"):
        jgradcheck.check_grad(cost, jax.grad(cost), params, *args, strategy="fast")
