"""check_vjp(fn, (fwd, bwd), *primals): a custom_vjp rule's pair, checked as it is written for defvjp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck


def _layer(x, w):
    return jnp.tanh(x @ w)


def _layer_fwd(x, w):
    y = jnp.tanh(x @ w)
    return y, (x, w, y)


def _layer_bwd(res, dy):
    x, w, y = res
    dz = dy * (1 - y**2)
    return dz @ w.T, x.T @ dz


def _layer_bwd_wrong(res, dy):
    x, w, y = res
    dz = dy * (1 - y)  # planted: (1 - y) where (1 - y²) is due
    return dz @ w.T, x.T @ dz


def _point(x64: bool):
    rng = np.random.default_rng(0)
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        return jnp.asarray(rng.standard_normal((2, 3)), dtype), jnp.asarray(0.5 * rng.standard_normal((3, 4)), dtype)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_a_correct_pair_passes(x64):
    x, w = _point(x64)
    with jax.enable_x64(x64):
        report = jgradcheck.check_vjp(_layer, (_layer_fwd, _layer_bwd), x, w)
    assert report.passed, str(report)
    assert report.what == "your VJP"
    assert [leaf.path for leaf in report.leaves] == ["w", "x"]


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_a_planted_wrong_bwd_fails_in_both_inputs(x64):
    x, w = _point(x64)
    with jax.enable_x64(x64):
        report = jgradcheck.check_vjp(_layer, (_layer_fwd, _layer_bwd_wrong), x, w)
    assert report.status == "failed", str(report)
    assert {leaf.path for leaf in report.failed_leaves} == {"w", "x"}
    assert report.jacobian and all(e.output.startswith("out[") for e in report.jacobian)


def test_the_pair_is_the_one_defvjp_takes():
    """The same two functions make a working custom_vjp, and check_rules agrees with check_vjp."""
    layer = jax.custom_vjp(_layer)
    layer.defvjp(_layer_fwd, _layer_bwd)
    x, w = _point(False)
    np.testing.assert_allclose(
        jax.grad(lambda w: jnp.sum(layer(x, w)))(w), jax.grad(lambda w: jnp.sum(_layer(x, w)))(w), rtol=1e-6
    )
    assert jgradcheck.check_rules(layer, x, w, modes=("rev",)).passed
    bad = jax.custom_vjp(_layer)
    bad.defvjp(_layer_fwd, _layer_bwd_wrong)
    assert jgradcheck.check_rules(bad, x, w, modes=("rev",)).status == "failed"
    assert jgradcheck.check_vjp(_layer, [_layer_fwd, _layer_bwd_wrong], x, w).status == "failed"  # a list too


def test_assert_vjp_correct_takes_the_pair():
    x, w = _point(False)
    jgradcheck.assert_vjp_correct(_layer, (_layer_fwd, _layer_bwd), x, w)
    with pytest.raises(AssertionError, match=r"FAILED: your VJP disagrees with the numerical one in w, x"):
        jgradcheck.assert_vjp_correct(_layer, (_layer_fwd, _layer_bwd_wrong), x, w)


def test_bwd_may_return_none_for_a_zero_cotangent():
    def f(x, n):
        return x * n

    fwd = lambda x, n: (f(x, n), n)  # noqa: E731
    bwd = lambda n, g: (g * n, None)  # noqa: E731 - None: n is an integer, it has no cotangent
    report = jgradcheck.check_vjp(f, (fwd, bwd), jnp.linspace(-1.0, 1.0, 3), jnp.int32(3))
    assert report.passed, str(report)
    assert [leaf.path for leaf in report.leaves] == ["x"]


@pytest.mark.parametrize(
    "rule, match",
    [
        ((_layer_fwd, _layer_bwd, _layer_bwd), r"or a custom_vjp rule's pair \(fwd, bwd\) .*got a tuple of 3"),
        ((_layer_fwd, 3.0), r"got a tuple of 2 \(function, float\)"),
        ("vjp", r"vjp_fn must be a function with jax.vjp's signature .* got a str"),
    ],
    ids=["three", "not-callable", "a-string"],
)
def test_neither_form_is_a_teaching_error(rule, match):
    x, w = _point(False)
    with pytest.raises(TypeError, match=match):
        jgradcheck.check_vjp(_layer, rule, x, w)


def test_fwd_that_does_not_return_residuals_is_named():
    x, w = _point(False)
    with pytest.raises(TypeError, match=r"fwd\(\*primals\) must return \(out, residuals\)"):
        jgradcheck.check_vjp(_layer, (_layer, _layer_bwd), x, w)


def test_bwd_that_returns_a_bare_array_is_named():
    f = jnp.sin
    fwd = lambda x: (jnp.sin(x), x)  # noqa: E731
    bwd = lambda x, g: jnp.cos(x) * g  # noqa: E731 - defvjp wants (jnp.cos(x) * g,)
    with pytest.raises(ValueError, match=r"bwd\(residuals, cotangent\) returned a .* for 1 primal.*return \(g,\)"):
        jgradcheck.check_vjp(f, (fwd, bwd), jnp.ones(3))


def test_the_custom_vjp_function_itself_says_what_to_pass():
    layer = jax.custom_vjp(_layer)
    layer.defvjp(_layer_fwd, _layer_bwd)
    x, w = _point(False)
    with pytest.raises(
        TypeError, match=r"jax.custom_vjp function itself: pass its rule, check_vjp\(fn, \(fn_fwd, fn_bwd\)"
    ):
        jgradcheck.check_vjp(_layer, layer, x, w)
