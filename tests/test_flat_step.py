"""Verdicts where J is flat at the step: quantized J (float32/bfloat16 sections, extreme scales),
tiny gradients after training and near a minimum. Each verdict test pins one status."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jgradcheck import check_grad, check_rules
from jgradcheck._src.precision import path_precision
from jgradcheck._src.problem import prepare


def status(r) -> str:
    return "passed" if r.passed else ("inconclusive" if r.inconclusive else "failed")


def failed_leaves(r) -> set[str]:
    return {row.path for row in r.leaves if row.status == "fail"}


# 1. Every finite difference rounds to 0: a wrong gradient must never pass.
# Each case pins the status it gets: FAILED where a step that J resolves exists within the
# coordinate's scale, INCONCLUSIVE (never passed) where none does.
@pytest.mark.parametrize(
    "cost, grad, w, x64, expected",
    [
        (
            lambda w: jnp.sum((1e30 * w) ** 2),
            lambda w: -2e60 * w,
            jnp.array([1e-30, -2e-30, 3e-30]),
            True,
            "inconclusive",
        ),
        (lambda w: 1e12 + 1e-6 * jnp.sum(w), jnp.ones_like, jnp.arange(1.0, 5.0), True, "failed"),
        (
            lambda w: 1e4 + 1e-4 * jnp.sum(w),
            lambda w: 0.05 * jnp.ones_like(w),
            jnp.arange(1.0, 5.0),
            False,
            "inconclusive",
        ),
        (lambda w: 1e4 + 1e-4 * jnp.sum(w), lambda w: 0.05 * jnp.ones_like(w), jnp.arange(1.0, 5.0), True, "failed"),
    ],
    ids=["tiny-params", "huge-offset-f64", "offset-f32", "offset-promoted"],
)
def test_wrong_gradient_lost_in_rounding_never_passes(cost, grad, w, x64, expected):
    r = check_grad(cost, grad, w, x64=x64)
    assert status(r) == expected, str(r)


def _attention_params(seed: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {n: jax.random.normal(k, (1, 4, 2, 8), dtype) for n, k in zip("qkv", ks)}


def _attention_cost(p):
    return jnp.sum(jax.nn.dot_product_attention(p["q"], p["k"], p["v"]) ** 2)


def test_path_precision_reads_narrowing_casts():
    with jax.enable_x64(True):
        p = _attention_params(0, jnp.float64)
        pp = path_precision(prepare(_attention_cost, p, (), True, False))
    # Leaves sorted k, q, v: the softmax (float32) sits on the paths of q and k, not v.
    assert pp.eps[:2] == (float(jnp.finfo(jnp.float32).eps),) * 2
    assert pp.eps[2] == float(jnp.finfo(jnp.float64).eps)
    assert "float32" in pp.where[0] and pp.where[2] is None


# 2. dot_product_attention's float32 softmax inside the float64 check: correct passes, a planted bug fails.
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_attention_float32_softmax(seed, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        p = _attention_params(seed, dtype)
        g = jax.grad(_attention_cost)
        assert status(check_grad(_attention_cost, g, p)) == "passed"

        def bad(p):
            d = dict(g(p))
            d["k"] = d["k"] * 1.02
            return d

        r = check_grad(_attention_cost, bad, p)
        assert status(r) == "failed" and failed_leaves(r) == {"k"}


# 3. A bfloat16 section: never FAILED on a correct gradient.
@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_section_never_fails_a_correct_gradient(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    W, x = jax.random.normal(k1, (6, 4)), jax.random.normal(k2, (5, 6))

    def c(W, x):
        return jnp.sum(jnp.tanh((x @ W).astype(jnp.bfloat16)).astype(jnp.float32) ** 2)

    r = check_grad(c, jax.grad(c), W, x)
    # J is rounded to bfloat16 (8 bits) before the sum: no step within W's scale resolves 1%.
    assert status(r) == "inconclusive", str(r)
    assert path_precision(prepare(c, W, (x,), True, False)).where[0].startswith("bfloat16")
    assert "J is computed in bfloat16 (convert_element_type) on this leaf's path" in r.leaf("<root>").note


# 4. After training: softmax cross-entropy at a confident point (gradient entries ~1e-9 of J's terms).
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_confident_cross_entropy_passes(seed, dtype):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 5)
    x = 20.0 * np.eye(4)[y] + 0.1 * rng.standard_normal((5, 4))

    def ce(x):
        return jnp.mean(-jax.nn.log_softmax(x)[jnp.arange(5), y])

    with jax.enable_x64(dtype == jnp.float64):
        r = check_grad(ce, jax.grad(ce), jnp.asarray(x, dtype))
    assert status(r) == "passed", str(r)


def test_confident_cross_entropy_planted_error_fails():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 5)
    x = jnp.asarray(20.0 * np.eye(4)[y] + 0.1 * rng.standard_normal((5, 4)))

    def ce(x):
        return jnp.mean(-jax.nn.log_softmax(x)[jnp.arange(5), y])

    r = check_grad(ce, lambda x: jax.grad(ce)(x).at[1, 2].multiply(1.5), x)
    assert status(r) == "failed"
    assert any(e.index == (1, 2) for e in r.worst[:1])


# 5. Near a minimum in float64: a quadratic's central differences are exact at any step.
@pytest.mark.parametrize("seed", range(5))
def test_quadratic_near_its_minimum_passes(seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        M = rng.standard_normal((3, 3))
        A = jnp.asarray(M @ M.T + 3 * np.eye(3))
        xs = jnp.asarray(rng.standard_normal(3))

        def J(x):
            return 0.5 * (x - xs) @ A @ (x - xs) + 1.0

        x = xs + jnp.asarray(10.0 ** rng.uniform(-10, -8, 3) * rng.choice([-1, 1], 3))
        assert status(check_grad(J, jax.grad(J), x)) == "passed"
        r = check_grad(J, lambda x: 1.01 * jax.grad(J)(x), x)
        assert status(r) == "failed"


# 6. Derivatives far below anything a difference sees, with a 50% error planted: never passed.
@pytest.mark.parametrize(
    "f, x0", [(jnp.sin, np.pi / 2), (jnp.cos, np.pi), (jax.scipy.special.erf, 10.0)], ids=["sin", "cos", "erf"]
)
def test_planted_rule_at_a_vanishing_derivative_never_passes(f, x0):
    @jax.custom_jvp
    def g(x):
        return f(x)

    @g.defjvp
    def g_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return g(x), 1.5 * jax.jvp(f, (x,), (t,))[1]

    r = check_rules(g, jnp.asarray(x0, jnp.float32))
    assert not r.passed


# 6b. An exact 0 against round-off (tanh'' at 0) is judged against the function's other derivatives.
@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
def test_second_derivative_exactly_zero_passes(x64):
    with jax.enable_x64(x64):
        r = check_rules(jnp.tanh, jnp.zeros((), jnp.float64 if x64 else jnp.float32), order=2)
    assert status(r) == "passed", str(r)
    assert r.difference < 1e-6
    # Where the differences are round-off (jax 0.10), the row says what it was judged against; on
    # jax 0.12 tanh'' at 0 differences to exactly 0 and needs no such note.
    for row in r.leaves:
        if row.path.startswith(("fwd2", "rev2")) and row.worst is not None and row.worst.numerical != 0:
            assert row.note is not None and "0 to within" in row.note, str(r)


def test_second_derivative_planted_error_at_zero_still_fails():
    @jax.custom_jvp
    def sech2(x):
        return 1 - jnp.tanh(x) ** 2

    @sech2.defjvp
    def sech2_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        # A wrong rule for tanh'': 0.1 too large (tanh''(0) = 0).
        return sech2(x), (-2 * jnp.tanh(x) * sech2(x) + 0.1) * dx

    @jax.custom_jvp
    def t(x):
        return jnp.tanh(x)

    @t.defjvp
    def t_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        return t(x), sech2(x) * dx

    r = check_rules(t, jnp.zeros((), jnp.float32), order=2)
    assert status(r) == "failed", str(r)


# Sensitivity stays: small planted errors in float32 params (default promotion) and float64.
@pytest.mark.parametrize("dtype, rel", [(jnp.float32, 1e-2), (jnp.float64, 1e-6)], ids=["f32-1%", "f64-1e-6"])
def test_mlp_single_entry_error_found(dtype, rel):
    with jax.enable_x64(dtype == jnp.float64):
        k = jax.random.split(jax.random.PRNGKey(3), 4)
        X = jax.random.normal(k[0], (16, 5), dtype)
        Y = jax.random.normal(k[1], (16, 2), dtype)
        p = {"W1": jax.random.normal(k[2], (5, 8), dtype), "W2": jax.random.normal(k[3], (8, 2), dtype)}

        def cost(p, X, Y):
            return jnp.mean((jnp.tanh(X @ p["W1"]) @ p["W2"] - Y) ** 2)

        g = jax.grad(cost)
        assert status(check_grad(cost, g, p, X, Y)) == "passed"

        def bad(p, X, Y):
            d = dict(g(p, X, Y))
            d["W1"] = d["W1"].at[2, 3].multiply(1 + rel)
            return d

        r = check_grad(cost, bad, p, X, Y)
        assert status(r) == "failed" and failed_leaves(r) == {"W1"}
        assert r.worst[0].path == "W1" and r.worst[0].index == (2, 3)


# The same floors in screen mode: the step and J's grid from the leaf's path, your float32
# gradient's measured rounding.
@pytest.mark.parametrize("seed", range(2))
def test_screen_mode_sees_a_planted_error_through_a_float32_softmax(seed):
    p = _attention_params(seed)
    g = jax.grad(_attention_cost)

    def bad(p):
        d = dict(g(p))
        d["k"] = d["k"] * 1.02
        return d

    r = check_grad(_attention_cost, bad, p, mode="screen")
    assert status(r) == "failed" and failed_leaves(r) == {"k"}, str(r)


def test_screen_mode_float32_gradient_values():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    X, Y = jax.random.normal(k[0], (32, 6)), jax.random.normal(k[1], (32, 3))
    p = {"W1": jax.random.normal(k[2], (6, 16)), "W2": jax.random.normal(k[3], (16, 3))}

    def cost(p, X, Y):
        return jnp.mean((jnp.tanh(X @ p["W1"]) @ p["W2"] - Y) ** 2)

    g32 = jax.jit(jax.grad(cost))(p, X, Y)
    assert status(check_grad(cost, g32, p, X, Y, mode="screen")) == "passed"
    bad = dict(g32)
    bad["W2"] = bad["W2"] * (1 + 1e-3)
    r = check_grad(cost, bad, p, X, Y, mode="screen")
    assert status(r) == "failed" and failed_leaves(r) == {"W2"}


# 7. After training, your gradient as float32 values (the classic flow): its rounding grows with the
# terms its sums cancel, not with its size; measured, so a correct one passes and 1% of a leaf fails.
@pytest.mark.parametrize("seed", range(4))
def test_trained_float32_gradient_values(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    X = jax.random.normal(k[0], (64, 4))
    Y = jnp.sin(X @ jax.random.normal(k[1], (4, 2)))
    p = {
        "W1": 0.5 * jax.random.normal(k[2], (4, 16)),
        "b1": jnp.zeros(16),
        "W2": 0.5 * jax.random.normal(k[3], (16, 2)),
        "b2": jnp.zeros(2),
    }

    def cost(p, X, Y):
        return jnp.mean((jnp.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"] - Y) ** 2)

    opt = optax.adam(1e-2)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(cost)(p, X, Y), s)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=300)[0][0]

    p = train(p)
    g = jax.jit(jax.grad(cost))(p, X, Y)
    r = check_grad(cost, g, p, X, Y)
    assert status(r) == "passed", str(r)
    bad = dict(g)
    bad["W1"] = bad["W1"] * 1.01
    r = check_grad(cost, bad, p, X, Y)
    assert status(r) == "failed" and failed_leaves(r) == {"W1"}, str(r)


# A saturated layer next to a live bias: W's gradient (~1e-11) is within its own error bound, so it
# is judged against the other leaves' scale, and says so; a wrong bias gradient beside it still fails.
def _saturated():
    rng = np.random.default_rng(108)
    s, xs = 10.0 ** rng.uniform(-3, 3), 10.0 ** rng.uniform(-2, 1)  # 140 and 0.79
    rng.integers(2)
    p = {
        "W": jnp.asarray(s * rng.standard_normal((5, 3)), jnp.float32),
        "b": jnp.asarray(s * rng.standard_normal(3), jnp.float32),
    }
    X = jnp.asarray(xs * rng.standard_normal((8, 5)), jnp.float32)

    def cost(p, X):
        return jnp.mean(jnp.tanh(X @ p["W"]) ** 2) + 0.01 * jnp.sum(p["b"] ** 2)

    return cost, p, X


def test_saturated_layer_is_judged_against_the_other_leaves():
    cost, p, X = _saturated()
    r = check_grad(cost, jax.grad(cost), p, X)
    assert status(r) == "passed", str(r)
    assert "judged against the scale of the other leaves" in r.leaf("W").note
    bad = lambda p, X: {**jax.grad(cost)(p, X), "b": -jax.grad(cost)(p, X)["b"]}  # noqa: E731
    r = check_grad(cost, bad, p, X)
    assert status(r) == "failed" and failed_leaves(r) == {"b"}, str(r)
