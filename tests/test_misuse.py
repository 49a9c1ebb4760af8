"""Every call a user brings gets a verdict or an error that teaches (issue 18's reproducers).

Misuse (called under jit, a donated array, an integer leaf in check_hvp, swapped or (loss, aux)
costs, an option-named keyword) raises an error that names the argument and the fix; functions
whose outputs hold ±inf/NaN are checked on their finite entries; costs that hard-code float32 or
draw random masks are checked in float64 on the program as the user runs it (promote.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jgradcheck

DTYPES = ["float32", "float64"]


def _array(x, dtype: str):
    """``x`` as a JAX array of ``dtype`` (float64 made in a scoped x64 context)."""
    with jax.enable_x64(dtype == "float64"):
        return jnp.asarray(np.asarray(x), dtype)


def _model(dtype: str = "float32"):
    rng = np.random.default_rng(0)
    params = {"W": _array(rng.standard_normal((3, 2)), dtype), "b": _array(rng.standard_normal(2), dtype)}
    X, Y = _array(rng.standard_normal((5, 3)), dtype), _array(rng.standard_normal((5, 2)), dtype)

    def cost(p, X, Y):
        return jnp.mean((X @ p["W"] + p["b"] - Y) ** 2)

    def grad(p, X, Y):
        r = 2 * (X @ p["W"] + p["b"] - Y) / r_size(Y)
        return {"W": X.T @ r, "b": jnp.sum(r, axis=0)}

    def r_size(Y):
        return Y.size

    return cost, grad, params, X, Y


# --- 1. outputs with ±inf or NaN ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits_checked_on_finite_entries(dtype):
    x = _array(jax.random.normal(jax.random.PRNGKey(0), (3, 4)), dtype)
    mask = np.asarray(x) > 0
    r = jgradcheck.check_rules(lambda x: jnp.where(mask, x, -jnp.inf), x)
    assert r.passed, r
    n = int((~mask).sum())
    assert any(f"{n} of 12 output entries" in w and "left out" in w for w in r.warnings), r.warnings


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_window_max_over_inf_padding(dtype):
    x = _array(jax.random.normal(jax.random.PRNGKey(0), (3, 4)), dtype)
    f = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2), (2, 1), [(0, 3), (1, 2)])  # noqa: E731
    r = jgradcheck.check_rules(f, x)
    assert r.passed, r
    assert any("-inf" in w and "left out" in w for w in r.warnings), r.warnings


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_rule_on_finite_entries_still_fails(dtype):
    x = _array(np.linspace(-1.0, 1.0, 12).reshape(3, 4), dtype)
    mask = np.asarray(x) > 0

    def f(x):
        return jnp.where(mask, jnp.sin(x), -jnp.inf)

    def f_vjp(x):
        def pullback(dy):
            return (jnp.where(mask, 1.05 * jnp.cos(x) * dy, 0.0),)  # 5% off

        return f(x), pullback

    r = jgradcheck.check_vjp(f, f_vjp, x)
    assert not r.passed
    assert any("left out" in w for w in r.warnings)


@pytest.mark.parametrize("dtype", DTYPES)
def test_asin_outside_its_domain(dtype):
    r = jgradcheck.check_rules(jnp.arcsin, _array(np.linspace(-2.0, 2.0, 8), dtype))
    assert r.passed, r
    assert any("NaN" in w and "left out" in w for w in r.warnings), r.warnings


def test_every_output_non_finite_is_a_clear_error():
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="every output entry of fn is ±inf or NaN"):
        jgradcheck.check_rules(lambda x: x * jnp.inf, x)


def test_rule_with_other_non_finite_entries_is_named():
    x = jnp.linspace(-1.0, 1.0, 4)
    f = lambda x: jnp.where(x > 0, x, -jnp.inf)  # noqa: E731
    wrong = lambda p, t: (jnp.where(p[0] > 0, p[0], jnp.inf), t[0])  # noqa: E731
    with pytest.raises(ValueError, match="where it is ±inf or NaN"):
        jgradcheck.check_jvp(f, wrong, x)


# --- 2 and 8. costs that hard-code float32 ------------------------------------------------------


def test_variadic_reduce_with_typed_init_values():
    init = (jnp.float32(0.0), jnp.float32(1.0))

    def f(a, b):
        return lax.reduce((a, b), init, lambda x, y: (x[0] + y[0], x[1] * y[1]), (0,))

    r = jgradcheck.check_rules(f, 1.1 * jnp.ones((3, 4), jnp.float32), 0.9 * jnp.ones((3, 4), jnp.float32))
    assert r.status == "passed", r
    # Checked in float64 on the program as run (its typed init values kept), not with promotion off.
    assert any("widened to float64" in w for w in r.warnings), r.warnings
    assert not any("promotion to float64 turned off" in w for w in r.warnings), r.warnings
    assert r.precision.startswith("float64"), r.precision


def _scan_cost(params, xs):
    def step(h, x):
        h = jnp.tanh(h @ params["U"] + x @ params["W"])
        return h, h

    _, hs = lax.scan(step, jnp.zeros((3, 8), jnp.float32), xs)
    return jnp.sum(hs**2)


def _scan_problem():
    rng = np.random.default_rng(1)
    params = {
        "U": jnp.asarray(0.3 * rng.standard_normal((8, 8)), jnp.float32),
        "W": jnp.asarray(0.3 * rng.standard_normal((4, 8)), jnp.float32),
    }
    return params, jnp.asarray(rng.standard_normal((5, 3, 4)), jnp.float32)


@pytest.mark.parametrize("given", ["function", "values"])
def test_scan_with_float32_carry_is_checked_in_float64(given):
    params, xs = _scan_problem()
    grad = jax.grad(_scan_cost) if given == "function" else jax.grad(_scan_cost)(params, xs)
    r = jgradcheck.check_grad(_scan_cost, grad, params, xs)
    assert r.status == "passed", r
    assert r.precision.startswith("float64 (your float32 program as traced"), r.precision
    assert not any("promotion" in w for w in r.warnings), r.warnings


def test_scan_with_float32_carry_still_catches_a_bug():
    params, xs = _scan_problem()

    def wrong(p, xs):
        g = jax.grad(_scan_cost)(p, xs)
        return {"U": g["U"], "W": 1.01 * g["W"]}

    r = jgradcheck.check_grad(_scan_cost, wrong, params, xs)
    assert r.status == "failed", r
    assert [row.path for row in r.leaves if not row.passed] == ["W"]


def _scan_layer(w, xs):
    def step(h, x):
        h = jnp.tanh(h * w + x)
        return h, h

    return lax.scan(step, jnp.zeros(3, jnp.float32), xs)[1]


@pytest.mark.parametrize("kind", ["vjp", "pair", "jvp"])
def test_hand_written_rule_of_a_float32_carry(kind):
    w = jnp.array([0.5, -0.3, 0.8], jnp.float32)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)

    def vjp(w, xs, scale=1.0):
        out, pullback = jax.vjp(_scan_layer, w, xs)
        return out, lambda c: (scale * pullback(c)[0], pullback(c)[1])

    def fwd(w, xs):
        return vjp(w, xs)

    def bwd(res, c):
        return res(c)

    def bad_jvp(p, t):  # 1% off along w's tangent
        along_w = jax.jvp(_scan_layer, p, (t[0], jnp.zeros_like(t[1])))[1]
        return _scan_layer(*p), 1.01 * along_w + jax.jvp(_scan_layer, p, (jnp.zeros_like(t[0]), t[1]))[1]

    if kind == "jvp":
        check, good, bad = jgradcheck.check_jvp, lambda p, t: jax.jvp(_scan_layer, p, t), bad_jvp
    elif kind == "pair":
        check, good, bad = jgradcheck.check_vjp, (fwd, bwd), (lambda w, xs: vjp(w, xs, 1.01), bwd)
    else:
        check, good, bad = jgradcheck.check_vjp, vjp, functools.partial(vjp, scale=1.01)
    r = check(_scan_layer, good, w, xs)
    assert r.status == "passed", r
    assert any("widened to float64" in x for x in r.warnings), r.warnings
    r = check(_scan_layer, bad, w, xs)
    assert r.status == "failed", r
    assert [leaf.path for leaf in r.failed_leaves] == ["w"]


def test_hvp_of_a_float32_carry():
    params, xs = _scan_problem()
    hvp = jax.jit(lambda p, v, xs: jax.jvp(lambda q: jax.grad(_scan_cost)(q, xs), (p,), (v,))[1])
    r = jgradcheck.check_hvp(_scan_cost, hvp, params, xs)
    assert r.status == "passed", r
    assert any("widened to float64" in x for x in r.warnings), r.warnings

    def bad(p, v, xs):
        out = hvp(p, v, xs)
        return {"U": out["U"], "W": 1.01 * out["W"]}

    r = jgradcheck.check_hvp(_scan_cost, bad, params, xs)
    assert r.status == "failed", r
    # H's rows of W are off: in the columns of U and W alike, at the outputs grad.W only.
    assert r.jacobian and all(e.output.startswith("grad.W[") for e in r.jacobian), r.jacobian


def test_numerical_grad_of_a_float32_carry():
    params, xs = _scan_problem()
    g = jgradcheck.numerical_grad(_scan_cost, params, xs)
    want = jax.grad(_scan_cost)(params, xs)
    assert g["U"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g["U"]), np.asarray(want["U"]), rtol=1e-4, atol=1e-5)


# --- 9. dropout from a fixed key: the classic flow of a precomputed gradient -------------------


def _dropout_problem(dtype: str):
    rng = np.random.default_rng(4)
    params = {"W1": _array(rng.standard_normal((4, 6)), dtype), "W2": _array(rng.standard_normal((6, 2)), dtype)}
    X = _array(rng.standard_normal((10, 4)), dtype)

    def cost(p, X, key):
        h = jnp.tanh(X @ p["W1"])
        keep = jax.random.uniform(key, h.shape) < 0.8  # the draw depends on the default float dtype
        h = jnp.where(keep, h / 0.8, 0.0)
        return jnp.mean((h @ p["W2"]) ** 2)

    return cost, params, X


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", ["values", "function", "untraceable function"])
def test_precomputed_dropout_gradient_passes(dtype, given):
    cost, params, X = _dropout_problem(dtype)
    key = jax.random.PRNGKey(7)
    with jax.enable_x64(dtype == "float64"):  # as the user runs it
        grads = jax.grad(cost)(params, X, key)

    def untraceable(p, X, key):
        g = jax.grad(cost)(p, X, key)
        return g if float(jnp.sum(g["W1"])) == float(jnp.sum(g["W1"])) else None  # Python on values

    grad_fn = {"values": grads, "function": jax.grad(cost), "untraceable function": untraceable}[given]
    r = jgradcheck.check_grad(cost, grad_fn, params, X, key)
    assert r.status == "passed", r
    assert r.precision.startswith("float64"), r.precision
    assert not any("masks may differ" in w for w in r.warnings), r.warnings


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_gradient_from_another_key_fails(dtype):
    cost, params, X = _dropout_problem(dtype)
    with jax.enable_x64(dtype == "float64"):
        grads = jax.grad(cost)(params, X, jax.random.PRNGKey(8))  # the backward pass drew other masks
    r = jgradcheck.check_grad(cost, grads, params, X, jax.random.PRNGKey(7))
    assert r.status == "failed", r


# --- 3. called under a JAX transformation -------------------------------------------------------


def _check(w):
    return jgradcheck.check_grad(lambda w: jnp.sum(w**2), lambda w: 2 * w, w).difference


@pytest.mark.parametrize(
    "transform",
    [jax.jit, jax.grad, lambda f: jax.vmap(f)],
    ids=["jit", "grad", "vmap"],
)
def test_check_grad_under_a_transformation(transform):
    w = jnp.ones((2, 4)) if transform not in (jax.jit, jax.grad) else jnp.ones(4)
    with pytest.raises(TypeError, match="Call check_grad outside jit") as info:
        transform(_check)(w)
    assert "params" in str(info.value)


def test_check_grad_under_jit_with_a_closed_over_tracer():
    def outer(s):
        return jgradcheck.check_grad(lambda w: s * jnp.sum(w**2), lambda w: 2 * s * w, np.ones(3)).difference

    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(outer)(2.0)


def test_vector_checks_under_jit():
    with pytest.raises(TypeError, match="Call check_rules outside jit"):
        jax.jit(lambda x: jgradcheck.check_rules(jnp.sin, x).difference)(jnp.ones(3))
    with pytest.raises(TypeError, match="Call check_jvp outside jit"):
        jax.jit(lambda x: jgradcheck.check_jvp(jnp.sin, jax.jvp, x).difference)(jnp.ones(3))


# --- 4. deleted and donated arrays --------------------------------------------------------------


def test_deleted_leaf_is_named():
    cost, grad, params, X, Y = _model()
    params = {"W2": params["W"], "b": params["b"]}
    params["W2"] = jnp.array(params["W2"])
    params["W2"].delete()
    with pytest.raises(ValueError, match=r"params\['W2'\] has been deleted.*live copy"):
        jgradcheck.check_grad(lambda p, X, Y: jnp.sum(p["W2"]), lambda p, X, Y: p, params, X, Y)


def test_donated_argument_is_named():
    cost, grad, params, X, Y = _model()
    X = jnp.array(X)
    jax.jit(lambda x: x + 1, donate_argnums=0)(X)
    if not X.is_deleted():  # pragma: no cover - a backend without donation
        pytest.skip("this backend does not donate")
    with pytest.raises(ValueError, match=r"args\[0\] has been deleted.*donate"):
        jgradcheck.check_grad(cost, grad, params, X, Y)


# --- 5. check_hvp with an integer leaf ----------------------------------------------------------


def test_check_hvp_integer_leaf():
    params = {"w": jnp.ones(3), "step": jnp.array(2)}
    with pytest.raises(TypeError, match=r"params\['step'\] is an array of dtype int32.*\*args"):
        jgradcheck.check_hvp(lambda p: jnp.sum(p["w"] ** 3), lambda p, v: {"w": 6 * p["w"] * v["w"]}, params)


# --- 6. swapped cost and gradient, (loss, aux) --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_swapped_cost_and_grad(dtype):
    cost, grad, params, X, Y = _model(dtype)
    with pytest.raises(ValueError, match="did you swap them"):
        jgradcheck.check_grad(grad, cost, params, X, Y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_returning_a_scalar(dtype):
    cost, grad, params, X, Y = _model(dtype)
    with pytest.raises(ValueError, match="grad_fn returned a scalar.*Did you swap them"):
        jgradcheck.check_grad(cost, cost, params, X, Y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_aux_cost(dtype):
    cost, grad, params, X, Y = _model(dtype)

    def with_aux(p, X, Y):
        return cost(p, X, Y), {"residual": X @ p["W"] - Y}

    with pytest.raises(ValueError, match=r"\(loss, aux\) pair.*\[0\]"):
        jgradcheck.check_grad(with_aux, grad, params, X, Y)


# --- 7. a keyword the cost takes whose name is an option ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_option_named_keyword(dtype):
    cost, grad, params, X, Y = _model(dtype)

    def model_cost(p, X, Y, eps):
        return cost(p, X, Y) + eps * jnp.sum(p["W"] ** 2)

    def model_grad(p, X, Y, eps):
        g = grad(p, X, Y)
        return {"W": g["W"] + 2 * eps * p["W"], "b": g["b"]}

    with pytest.raises(TypeError, match=r"eps=0.001 was taken as the check's eps.*functools.partial"):
        jgradcheck.check_grad(model_cost, model_grad, params, X, Y, eps=1e-3)
    r = jgradcheck.check_grad(
        functools.partial(model_cost, eps=1e-3), functools.partial(model_grad, eps=1e-3), params, X, Y
    )
    assert r.passed, r


def test_option_named_keyword_in_a_vector_check():
    def f(x, eps):
        return jnp.sin(x) + eps

    with pytest.raises(TypeError, match=r"fn takes a parameter named 'eps'.*functools.partial\(fn, eps=...\)"):
        jgradcheck.check_rules(f, jnp.ones(3), eps=1e-3)
    assert jgradcheck.check_rules(functools.partial(f, eps=0.5), jnp.ones(3), eps=1e-3).passed


def test_option_named_keyword_with_a_default_is_a_warning():
    cost, grad, params, X, Y = _model()

    def model_cost(p, X, Y, seed=0):
        return cost(p, X, Y)

    r = jgradcheck.check_grad(model_cost, grad, params, X, Y, seed=3)
    assert r.passed
    assert any("'seed'" in w and "kept its own default" in w for w in r.warnings), r.warnings


# --- honest numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_yours_holding_inf_warns_nothing(value):
    cost, grad, params, X, Y = _model()

    def bad(p, X, Y):
        g = grad(p, X, Y)
        return {"W": g["W"].at[0, 0].set(value), "b": g["b"]}

    r = jgradcheck.check_grad(cost, bad, params, X, Y)  # filterwarnings = error: a RuntimeWarning fails
    assert not r.passed
    assert "NaN/Inf" in (r.leaves[0].diagnosis or "")


def test_no_ratio_against_a_numerical_zero():
    from jgradcheck._src.diagnose import describe_leaf

    numerical = np.array([1e-12, -2e-12, 1.5e-12])
    yours = np.array([1.0, -2.0, 1.5])
    text = describe_leaf(yours, numerical, np.ones(3), (3,), 3)
    assert "×" not in (text or ""), text
    text = describe_leaf(numerical, yours, np.ones(3), (3,), 3)
    assert "×" not in (text or ""), text


def _wide_target(dtype: str):
    rng = np.random.default_rng(0)
    X, Y = _array(rng.standard_normal((32, 6)), dtype), _array(rng.standard_normal((32, 3)), dtype)
    params = {"W": _array(rng.standard_normal((6, 3)), dtype), "b": _array(np.zeros(3), dtype)}

    def cost(p, X, Y):
        return jnp.mean((X @ p["W"] + p["b"] - Y) ** 2)  # a mean over all 32 × 3 entries

    def residual(p, X, Y):
        return 2 * (X @ p["W"] + p["b"] - Y)

    return cost, residual, params, X, Y


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_size_label_is_what_the_cost_averages_over(dtype):
    cost, residual, params, X, Y = _wide_target(dtype)

    def per_row(p, X, Y):  # divides by the 32 rows where the cost divides by 96 entries
        r = residual(p, X, Y) / X.shape[0]
        return {"W": X.T @ r, "b": r.sum(0)}

    r = jgradcheck.check_grad(cost, per_row, params, X, Y)
    assert r.status == "failed", r
    assert "m = 3" not in r.diagnosis, r.diagnosis  # 3 is Y's width, not a count the cost averages over
    assert "averages over m = 96 entries, your gradient divides by 32" in r.diagnosis, r.diagnosis

    def no_mean(p, X, Y):
        r = residual(p, X, Y)
        return {"W": X.T @ r, "b": r.sum(0)}

    r = jgradcheck.check_grad(cost, no_mean, params, X, Y)
    assert "batch size m = 96: a missing 1/m" in r.diagnosis, r.diagnosis


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_check_shows_the_derivative(dtype):
    # Few outputs: each output in turn, scaled by 2 inside; the table shows erf'(1) itself.
    r = jgradcheck.check_rules(lax.erf, _array(1.0, dtype))
    assert r.status == "passed", r
    want = 2 / np.sqrt(np.pi) * np.exp(-1.0)
    for row in r.leaves:
        assert row.worst.yours == pytest.approx(want, rel=1e-6), row
        assert row.worst.numerical == pytest.approx(want, rel=1e-6), row
    # Many outputs: projections on random cotangents, and the report says so.
    r = jgradcheck.check_rules(lax.erf, _array(np.linspace(0.5, 1.0, 6), dtype))
    assert "yours and numerical: uᵀJ" in r.mode, r.mode


@pytest.mark.parametrize(
    ("cost", "want"),
    [
        (lambda x: jnp.mean(x**2), (96,)),  # jnp.mean over all 32 × 3 entries
        (lambda x: -jnp.sum(x**2) / x.shape[0], (32,)),  # a mean over the rows, sign and all
        (lambda x: 0.5 * jnp.sum(x**2), ()),  # a factor 1/2 is no count
        (lambda x: jnp.sum(x) / 7, ()),  # 7 is not the size of summed axes
        (lambda x: jnp.sum(x) / (-jnp.float32(2.0)) / 32, ()),  # a literal in the chain
    ],
)
def test_averaged_counts_read_from_the_cost(cost, want):
    from jgradcheck._src.problem import averaged_counts

    assert averaged_counts(jax.make_jaxpr(cost)(jnp.ones((32, 3)))) == want


@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_gradient_alone_hard_codes_float32(scale):
    # The cost is written for any dtype; your backward pass has a float32 scan carry: it runs as you
    # run it, in float32, and is judged as a float32 gradient (it passes, and a 1% error fails).
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal(3), jnp.float32)
    xs = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)

    def cost(w, xs):
        h = jnp.zeros(3, w.dtype)
        for x in xs:
            h = jnp.tanh(h * w + x)
        return jnp.sum(h**2)

    def layer(w, xs):
        return jnp.sum(lax.scan(lambda h, x: (jnp.tanh(h * w + x), None), jnp.zeros(3, jnp.float32), xs)[0] ** 2)

    r = jgradcheck.check_grad(cost, lambda w, xs: scale * jax.grad(layer)(w, xs), w, xs)
    assert r.status == ("passed" if scale == 1.0 else "failed"), r
