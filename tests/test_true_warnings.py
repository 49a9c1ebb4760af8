"""Warnings that are true: stop_gradient and custom rules are named only where they change the derivative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jgradcheck


def _lse(z):
    """The standard max-shifted logsumexp: the shift cannot change the derivative."""
    m = jax.lax.stop_gradient(z.max(axis=-1, keepdims=True))
    return (m + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def _softmax_xent(p, x, y):
    z = x @ p["W"] + p["b"]
    return jnp.mean(_lse(z) - jnp.sum(z * y, axis=-1))


@pytest.mark.parametrize("x64", [True, False])
def test_the_max_shifted_logsumexp_gets_no_warning(x64):
    p = {"W": jax.random.normal(jax.random.key(0), (3, 4)), "b": jnp.zeros(4)}
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    report = jgradcheck.check_grad(_softmax_xent, jax.grad(_softmax_xent), p, x, y, x64=x64)
    assert report.passed, str(report)
    assert report.warnings == ()


def _stopped(p):
    return jnp.sum(p["w"] ** 2 * jax.lax.stop_gradient(jnp.sum(p["v"]))) + jnp.sum(p["v"] ** 3)


def test_a_stop_gradient_that_changes_the_derivative_is_named_with_its_line_and_leaves():
    p = {"w": jnp.array([0.3, -0.4, 0.9]), "v": jnp.array([1.0, 2.0])}
    report = jgradcheck.check_grad(_stopped, jax.grad(_stopped), p)
    assert report.status == "failed"
    (warning,) = report.warnings
    assert "stop_gradient at test_true_warnings.py:" in warning and "(_stopped)" in warning
    assert "in v." in warning


def test_a_stop_gradient_on_a_constant_path_is_not_named():
    def cost(p, x):  # stop_gradient on data only: nothing to block
        return jnp.sum((x @ p["w"]) ** 2) * jax.lax.stop_gradient(jnp.sum(x))

    report = jgradcheck.check_grad(cost, jax.grad(cost), {"w": jnp.array([1.0, -2.0])}, jnp.eye(2))
    assert report.passed and report.warnings == ()


@jax.custom_jvp
def _right_tanh(x):
    return jnp.tanh(x)


_right_tanh.defjvp(lambda p, t: (jnp.tanh(p[0]), (1 - jnp.tanh(p[0]) ** 2) * t[0]))


@jax.custom_vjp
def _clip_grad(x):
    return x


_clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def test_a_right_custom_rule_is_not_named_a_clipping_rule_is():
    p = {"w": jnp.array([0.3, -0.4, 0.9])}
    right = lambda p: jnp.sum(_right_tanh(p["w"]) ** 2)  # noqa: E731
    report = jgradcheck.check_grad(right, jax.grad(right), p)
    assert report.passed and report.warnings == ()
    clipped = lambda p: jnp.sum(_clip_grad(p["w"]) ** 2)  # noqa: E731
    report = jgradcheck.check_grad(clipped, jax.grad(clipped), p)
    assert report.status == "failed"
    (warning,) = report.warnings
    assert "custom_vjp (_clip_grad" in warning and "in w;" in warning


def test_a_stop_gradient_inside_a_scan_is_named_as_untested():
    def cost(p):
        def body(c, _):
            return c + jax.lax.stop_gradient(c) * p["w"], None

        return jnp.sum(jax.lax.scan(body, p["w"], None, length=2)[0])

    report = jgradcheck.check_grad(cost, jax.grad(cost), {"w": jnp.array([0.5, 1.5])})
    assert any("inside a loop or branch" in w for w in report.warnings), report.warnings
