"""assert_grad_correct: the assertion layer for pytest and chex tests."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck

PREFIX = "[jgradcheck] Assertion assert_grad_correct failed: "

_X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
_PARAMS = {"w": jnp.array([0.5, -1.0, 0.25]), "b": jnp.array([0.1])}


def _cost(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)


def _grad(p, x):
    t = jnp.tanh(x @ p["w"] + p["b"])
    dz = 2 * t * (1 - t**2)
    return {"w": x.T @ dz, "b": jnp.sum(dz, keepdims=True)}


def _buggy_grad(p, x):
    g = _grad(p, x)
    return {**g, "b": 2 * g["b"]}  # dJ/db doubled


def test_passes_silently_for_a_correct_gradient():
    assert jgradcheck.assert_grad_correct(_cost, _grad, _PARAMS, _X) is None


def test_raises_with_the_report_for_a_buggy_gradient():
    with pytest.raises(AssertionError) as info:
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X, custom_message="layer 1 backprop")
    message = str(info.value)
    assert message.startswith(PREFIX + "layer 1 backprop")
    assert "FAILED" in message and "yours" in message and "numerical" in message
    b_row = next(line for line in message.splitlines() if line.strip().startswith("b "))
    assert "FAIL" in b_row and "2 × numerical" in b_row
    w_row = next(line for line in message.splitlines() if line.strip().startswith("w "))
    assert "FAIL" not in w_row


def test_exception_type_is_honored():
    with pytest.raises(ValueError, match=r"^\[jgradcheck\] Assertion assert_grad_correct failed: "):
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X, exception_type=ValueError)


def test_check_kwargs_are_passed_through():
    # A 1e-6 relative error fails at the defaults and passes with rtol = 1e-4.
    off = lambda p, x: jax.tree_util.tree_map(lambda g: g * (1 + 1e-6), _grad(p, x))  # noqa: E731
    with pytest.raises(AssertionError, match="FAILED"):
        jgradcheck.assert_grad_correct(_cost, off, _PARAMS, _X)
    jgradcheck.assert_grad_correct(_cost, off, _PARAMS, _X, rtol=1e-4)
    with pytest.raises(ValueError, match="mode must be one of"):
        jgradcheck.assert_grad_correct(_cost, _grad, _PARAMS, _X, mode="nope")


def test_chex_disable_asserts_makes_it_a_no_op():
    chex.disable_asserts()
    try:
        assert jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X) is None
    finally:
        chex.enable_asserts()
    with pytest.raises(AssertionError):
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X)


class ChexVariantsTest(chex.TestCase):
    """The user's grad_fn wrapped by chex variants (jitted or not) is checked like any other."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_correct_gradient(self):
        jgradcheck.assert_grad_correct(_cost, self.variant(_grad), _PARAMS, _X)

    @chex.variants(with_jit=True, without_jit=True)
    def test_buggy_gradient(self):
        with self.assertRaisesRegex(AssertionError, r"\[jgradcheck\] Assertion assert_grad_correct failed: "):
            jgradcheck.assert_grad_correct(_cost, self.variant(_buggy_grad), _PARAMS, _X)
