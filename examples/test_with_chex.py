"""A gradient test to copy into your own test suite (pytest + chex).

``assert_grad_correct`` raises ``AssertionError`` with the report's table when your gradient is
wrong, like any chex assertion. ``@chex.variants`` runs each test twice: with your gradient
under ``jax.jit`` and without, so a bug that only appears (or disappears) under tracing is
caught too. The second test plants a bug to show what a failure looks like.

Run: python -m pytest -q examples/test_with_chex.py
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

import jgradcheck


def cost(params, x, y):
    """Half the summed squared error over the m examples of a one-hidden-layer tanh network, plus λ/2 ‖W2‖²."""
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    r = h @ params["W2"] - y
    return 0.5 * jnp.sum(r**2) / x.shape[0] + 0.05 * jnp.sum(params["W2"] ** 2)


def grad(params, x, y):
    """The hand-written gradient under test."""
    m = x.shape[0]
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    r = h @ params["W2"] - y
    dz = (r @ params["W2"].T) * (1 - h**2) / m
    return {"W1": x.T @ dz, "b1": dz.sum(0), "W2": h.T @ r / m + 0.1 * params["W2"]}


def grad_sign_bug(params, x, y):
    """The same gradient with a classic mistake: the L2 term's sign flipped."""
    g = grad(params, x, y)
    return {**g, "W2": g["W2"] - 0.2 * params["W2"]}


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "W1": jax.random.normal(k1, (4, 8)) / 2,
        "b1": jnp.full((8,), 0.1),
        "W2": jax.random.normal(k2, (8, 2)) / 3,
    }
    return params, jax.random.normal(k3, (16, 4)), jax.random.normal(k4, (16, 2))


class GradientTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_is_correct(self):
        params, x, y = _problem()
        jgradcheck.assert_grad_correct(cost, self.variant(grad), params, x, y)

    @chex.variants(with_jit=True, without_jit=True)
    def test_planted_bug_is_caught(self):
        params, x, y = _problem()
        with pytest.raises(AssertionError, match=r"FAILED: your gradient disagrees with the numerical one in W2"):
            jgradcheck.assert_grad_correct(cost, self.variant(grad_sign_bug), params, x, y)
