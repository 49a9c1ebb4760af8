"""Vector derivatives: hand-written VJPs, JVPs, custom rules, second order, HVPs, complex parameters.

Each planted bug must fail at the right input leaf and entry (and, where the Jacobian is
compared, the right output entry); each correct version must pass; in float32 and float64
inputs. Bad inputs raise errors that name what is wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck

DTYPES = [np.float32, np.float64]


def _data(dtype, n=4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, n)).astype(dtype)
    w = (rng.standard_normal((n, n)) / 2).astype(dtype)
    return x, w


# A dense layer y = tanh(x @ w) and its hand-written backward, as in a layer-by-layer codebase.
def dense(x, w):
    return jnp.tanh(x @ w)


def dense_vjp(x, w, bug=None):
    y = jnp.tanh(x @ w)

    def pullback(dy):
        dz = dy * (1 - y**2)
        dx, dw = dz @ w.T, x.T @ dz
        if bug == "dw_transposed":
            dw = dw.T
        if bug == "one_entry":
            dw = dw.at[1, 2].multiply(3.0)
        if bug == "swapped":
            return dw, dx
        return dx, dw

    return y, pullback


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_layer_backward_passes(dtype):
    x, w = _data(dtype)
    report = jgradcheck.check_vjp(dense, dense_vjp, x, w)
    assert report.passed, report
    assert [row.path for row in report.leaves] == ["w", "x"]  # named after dense's parameters
    assert report.what == "your VJP"
    assert report.jacobian == ()


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_dw_fails_at_w_and_names_outputs(dtype):
    x, w = _data(dtype)
    report = jgradcheck.check_vjp(dense, functools.partial(dense_vjp, bug="dw_transposed"), x, w)
    assert not report.passed
    assert report.leaf("x").passed and not report.leaf("w").passed
    assert "transposed" in (report.leaf("w").diagnosis or "")
    assert report.jacobian and all(e.path == "w" and e.output.startswith("out[") for e in report.jacobian)
    assert "disagreeing Jacobian entries" in str(report)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_wrong_entry_is_named_with_its_output(dtype):
    x, w = _data(dtype)
    report = jgradcheck.check_vjp(dense, functools.partial(dense_vjp, bug="one_entry"), x, w)
    assert not report.passed
    assert report.leaf("w").n_failed == 1 and report.leaf("w").worst.index == (1, 2)
    # Only output column 2 depends on w[1, 2]: each named output entry is out[i, 2].
    assert report.jacobian and all(e.index == (1, 2) and e.output.endswith(", 2]") for e in report.jacobian)
    j = report.jacobian[0]
    assert j.yours == pytest.approx(3 * j.numerical, rel=1e-4)


def test_cotangents_in_the_wrong_order_same_shapes_fail():
    x = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    _, w = _data(np.float32)
    report = jgradcheck.check_vjp(dense, functools.partial(dense_vjp, bug="swapped"), x, w)
    assert not report.passed and not report.leaf("x").passed and not report.leaf("w").passed


def test_cotangents_in_the_wrong_order_different_shapes_raise():
    x, w = _data(np.float32)
    w = w[:, :3]
    with pytest.raises(ValueError, match="cotangent for x shaped \\(4, 3\\).*wrong order"):
        jgradcheck.check_vjp(dense, functools.partial(dense_vjp, bug="swapped"), x, w)


def test_jax_vjp_and_jvp_themselves_are_correct():
    x, w = _data(np.float32)
    assert jgradcheck.check_vjp(dense, jax.vjp, x, w).passed
    assert jgradcheck.check_jvp(dense, jax.jvp, x, w).passed


# A custom_vjp softplus whose bwd forgets the sigmoid's factor.
@jax.custom_vjp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))


@jax.custom_vjp
def softplus_bad(x):
    return jnp.logaddexp(x, 0.0)


softplus_bad.defvjp(lambda x: (softplus_bad(x), x), lambda x, g: (g * jax.nn.sigmoid(x) * 0.5,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_vjp_rule(dtype):
    x = np.linspace(-2, 2, 7).astype(dtype)
    good = jgradcheck.check_rules(softplus, x)
    assert good.passed, good
    assert any("forward mode skipped" in w for w in good.warnings)
    bad = jgradcheck.check_rules(softplus_bad, x)
    assert not bad.passed
    row = bad.leaf("rev:x")
    assert row.n_failed == 7 and "0.5" in row.diagnosis
    # The Jacobian is diagonal: each disagreement is d out[i] / d x[i].
    assert bad.jacobian and all(e.output == f"out[{e.index[0]}]" for e in bad.jacobian)


# A custom_jvp with the wrong sign, and one that is right at first order only.
@jax.custom_jvp
def sin_bad(x):
    return jnp.sin(x)


sin_bad.defjvp(lambda p, t: (jnp.sin(p[0]), -jnp.cos(p[0]) * t[0]))


@jax.custom_jvp
def sin_first_order(x):
    return jnp.sin(x)


sin_first_order.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(jax.lax.stop_gradient(p[0])) * t[0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_jvp_wrong_sign_fails_both_modes(dtype):
    x = np.linspace(-1, 1, 5).astype(dtype)
    report = jgradcheck.check_rules(sin_bad, x)
    assert not report.leaf("fwd:x").passed and not report.leaf("rev:x").passed
    assert "sign" in report.leaf("fwd:x").diagnosis
    assert jgradcheck.check_rules(jnp.sin, x, order=2).passed


def test_second_order_catches_a_rule_right_only_at_first_order():
    x = np.linspace(-1, 1, 5).astype(np.float32)
    assert jgradcheck.check_rules(sin_first_order, x).passed
    report = jgradcheck.check_rules(sin_first_order, x, order=2)
    assert not report.passed
    assert report.leaf("fwd:x").passed and report.leaf("rev:x").passed
    assert not report.leaf("fwd2:x").passed and not report.leaf("rev2:x").passed


def test_check_jvp_hand_written():
    x, w = _data(np.float64)

    def jvp(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        y = jnp.tanh(x @ w)
        return y, (1 - y**2) * (dx @ w + x @ dw)

    def jvp_bad(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        y = jnp.tanh(x @ w)
        return y, (1 - y**2) * (dx @ w - x @ dw)

    assert jgradcheck.check_jvp(dense, jvp, x, w).passed
    bad = jgradcheck.check_jvp(dense, jvp_bad, x, w)
    assert bad.leaf("x").passed and not bad.leaf("w").passed
    assert "sign" in bad.leaf("w").diagnosis


def _cost(p, X):
    return jnp.sum(jnp.tanh(X @ p["w"]) ** 2)


def _true_hvp(p, v, X):
    return jax.jvp(lambda q: jax.grad(_cost)(q, X), (p,), (v,))[1]


def _gauss_newton(p, v, X):
    y = jnp.tanh(X @ p["w"])
    jz = (1 - y**2)[:, None] * X
    return {"w": 2 * jz.T @ (jz @ v["w"])}


@pytest.mark.parametrize("dtype", DTYPES)
def test_hvp(dtype):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((6, 3)).astype(dtype)
    p = {"w": rng.standard_normal(3).astype(dtype)}
    assert jgradcheck.check_hvp(_cost, _true_hvp, p, X).passed
    report = jgradcheck.check_hvp(_cost, _gauss_newton, p, X)
    assert not report.passed and not report.leaf("w").passed
    assert report.what == "your Hessian-vector product"
    assert all(e.output.startswith("grad.w[") for e in report.jacobian)
    with pytest.raises(AssertionError, match="assert_hvp_correct failed"):
        jgradcheck.assert_hvp_correct(_cost, _gauss_newton, p, X)


def _complex_cost(z, a):
    return jnp.sum(jnp.abs(z) ** 2 * a) + jnp.real(z[0] * z[1])


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_parameters_in_jax_convention(dtype):
    z = np.array([1 + 2j, -0.5 + 0.3j, 0.2 - 1j], dtype)
    report = jgradcheck.check_grad(_complex_cost, jax.grad(_complex_cost), z, 2.0)
    assert report.passed, report
    assert [row.path for row in report.leaves] == ["real", "imag"]
    conj = jgradcheck.check_grad(_complex_cost, lambda z, a: jnp.conj(jax.grad(_complex_cost)(z, a)), z, 2.0)
    assert not conj.passed and conj.leaf("real").passed
    assert "conjugate of JAX's convention" in conj.leaf("imag").diagnosis
    g = jgradcheck.numerical_grad(_complex_cost, z, 2.0)
    np.testing.assert_allclose(g, jax.grad(_complex_cost)(z, 2.0), rtol=1e-5)


def test_complex_leaf_in_a_pytree_is_split_by_path():
    p = {"z": np.array([1 + 1j, 2 - 1j], np.complex64), "w": np.ones(2, np.float32)}

    def cost(p):
        return jnp.sum(jnp.abs(p["z"] * p["w"]) ** 2)

    report = jgradcheck.check_grad(cost, jax.grad(cost), p)
    assert report.passed
    assert {row.path for row in report.leaves} == {"w", "z.real", "z.imag"}


def test_complex_primals_in_check_vjp():
    z = np.array([1 + 2j, -0.5 + 0.3j], np.complex64)
    report = jgradcheck.check_vjp(lambda z: jnp.abs(z) ** 2, jax.vjp, z)
    assert report.passed, report


# Bad inputs.
def test_bad_inputs_raise_clear_errors():
    x, w = _data(np.float32)
    with pytest.raises(TypeError, match="must return \\(out, pullback\\)"):
        jgradcheck.check_vjp(dense, lambda x, w: dense(x, w), x, w)

    def one_cotangent(x, w):
        y, pb = dense_vjp(x, w)
        return y, lambda dy: (pb(dy)[0],)

    with pytest.raises(ValueError, match="returned 1 cotangents for 2 primal"):
        jgradcheck.check_vjp(dense, one_cotangent, x, w)

    def off_primal(primals, tangents):
        return primals[0] @ primals[1], primals[0] @ tangents[1]

    with pytest.raises(ValueError, match="primal output differs from fn"):
        jgradcheck.check_jvp(dense, off_primal, x, w)
    with pytest.raises(TypeError, match="only real floating outputs"):
        jgradcheck.check_vjp(lambda x: jnp.argmax(x), jax.vjp, x)
    with pytest.raises(TypeError, match="jnp.real"):
        jgradcheck.check_vjp(lambda x: x * 1j, jax.vjp, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tol'"):
        jgradcheck.check_vjp(dense, jax.vjp, x, w, tol=1e-3)
    with pytest.raises(ValueError, match="modes must be"):
        jgradcheck.check_rules(dense, x, w, modes=("backward",))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        jgradcheck.check_rules(dense, x, w, order=3)


def test_assertions_are_chex_style():
    x, w = _data(np.float32)
    jgradcheck.assert_vjp_correct(dense, dense_vjp, x, w)
    jgradcheck.assert_jvp_correct(dense, jax.jvp, x, w)
    jgradcheck.assert_rules_correct(softplus, np.linspace(-1, 1, 3), modes=("rev",))
    jgradcheck.assert_rules_correct(softplus, np.linspace(-1, 1, 3), modes="rev")  # a bare string too
    with pytest.raises(AssertionError, match="Assertion assert_vjp_correct failed: layer 3"):
        jgradcheck.assert_vjp_correct(
            dense, functools.partial(dense_vjp, bug="dw_transposed"), x, w, custom_message="layer 3"
        )
    with pytest.raises(ValueError, match="assert_rules_correct failed"):
        jgradcheck.assert_rules_correct(softplus_bad, np.linspace(-1, 1, 3), exception_type=ValueError)


def test_pytree_and_integer_primals_in_every_check():
    def f(p, n, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return {"h": h * n, "s": jnp.sum(h, axis=0)}

    p = {"w": np.full((3, 4), 0.2, np.float32), "b": np.zeros(4, np.float32)}
    x = (np.arange(6.0, dtype=np.float32).reshape(2, 3)) / 6
    for report in (
        jgradcheck.check_vjp(f, jax.vjp, p, 2, x),
        jgradcheck.check_jvp(f, jax.jvp, p, 2, x),
        jgradcheck.check_rules(f, p, 2, x, order=2),  # the integer primal's float0 cotangent is left out
    ):
        assert report.passed, report
        assert {row.path.split(":")[-1] for row in report.leaves} == {"p.b", "p.w", "x"}


def test_a_rule_that_ignores_its_incoming_cotangent_or_tangent_fails():
    """The forgotten ``* dout``: with few outputs the basis cotangents are scaled (not 1)."""
    y, z = jnp.array([0.0, 1.0, 0.0]), jnp.array([0.2, -0.5, 1.0])

    def loss(z):
        return -jnp.sum(y * jax.nn.log_softmax(z))

    forgot = lambda z: (loss(z), lambda dout: (jax.nn.softmax(z) - y,))  # noqa: E731
    right = lambda z: (loss(z), lambda dout: (dout * (jax.nn.softmax(z) - y),))  # noqa: E731
    assert jgradcheck.check_vjp(loss, right, z).passed
    assert not jgradcheck.check_vjp(loss, forgot, z).passed

    @jax.custom_vjp
    def sq(x):
        return jnp.sum(x**2)

    sq.defvjp(lambda x: (sq(x), x), lambda x, g: (2 * x,))  # g forgotten
    assert not jgradcheck.check_rules(sq, jnp.array([0.5, -0.3, 1.2, 0.8])).passed

    def f(w):
        return jnp.sin(w) ** 3

    assert jgradcheck.check_hvp(f, lambda w, v: jax.hessian(f)(w) * v, 0.4).passed
    assert not jgradcheck.check_hvp(f, lambda w, v: jax.hessian(f)(w), 0.4).passed  # v forgotten


def test_numpy_backward_and_none_cotangents_give_reports_not_crashes():
    x, w = _data(np.float32)

    def numpy_vjp(x, w, factor):
        y = np.tanh(np.asarray(x) @ np.asarray(w))

        def pullback(dy):
            dz = np.asarray(dy) * (1 - y**2)
            return dz @ np.asarray(w).T, factor * (np.asarray(x).T @ dz)

        return y, pullback

    assert jgradcheck.check_vjp(dense, functools.partial(numpy_vjp, factor=1.0), x, w).passed
    bad = jgradcheck.check_vjp(dense, functools.partial(numpy_vjp, factor=2.0), x, w)
    assert not bad.passed and bad.jacobian and all(e.path == "w" for e in bad.jacobian)

    def f(x, n):
        return jnp.sin(x) * n

    wrong = lambda x, n: (f(x, n), lambda dy: (1.5 * dy * jnp.cos(x) * n, None))  # noqa: E731
    report = jgradcheck.check_vjp(f, wrong, x, 2)
    assert not report.passed and report.jacobian


def test_complex_data_in_args_rides_along():
    z, X = np.array([1 + 1j, 2 - 1j], np.complex64), np.array([0.5 + 0.5j, 1.0], np.complex64)

    def cost(p, X):
        return jnp.sum(jnp.abs(p["z"] * X) ** 2)

    assert jgradcheck.check_grad(cost, jax.grad(cost), {"z": z}, X).passed
