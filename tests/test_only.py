"""only=: check some leaves, leave the others unperturbed, and say so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck


def _mlp():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "layers": [
            {"w": jax.random.normal(k1, (3, 4)) / 2, "b": jnp.zeros(4)},
            {"w": jax.random.normal(k2, (4, 1)) / 2, "b": jnp.zeros(1)},
        ]
    }
    x = jax.random.normal(k3, (6, 3))
    return params, x


def cost(p, x):
    h = jnp.tanh(x @ p["layers"][0]["w"] + p["layers"][0]["b"])
    return jnp.mean((h @ p["layers"][1]["w"] + p["layers"][1]["b"]) ** 2)


def buggy_second_layer(p, x):
    g = jax.grad(cost)(p, x)
    g["layers"][1]["w"] = 2 * g["layers"][1]["w"]  # planted bug in the layer we do not check
    return g


@pytest.mark.parametrize("x64", [True, False])
def test_only_the_first_layer_is_checked_and_the_rest_is_listed(x64):
    params, x = _mlp()
    report = jgradcheck.check_grad(cost, buggy_second_layer, params, x, only="layers[0]", x64=x64)
    assert report.passed, str(report)
    assert report.not_checked == ("layers[1].b", "layers[1].w")
    assert report.leaf("layers[1].w").status == "not checked"
    text = str(report)
    assert "not checked (left out by only=, not perturbed): layers[1].b, layers[1].w" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("layers[1].w"))
    assert "not checked" in row


def test_the_others_are_not_perturbed():
    b0 = jnp.array([0.5, -1.0])

    def frozen_b(p, x):  # NaN wherever b moves: a perturbation of b would show
        return jnp.where(jnp.all(p["b"] == b0), jnp.sum(jnp.sin(x @ p["w"] + p["b"])), jnp.nan)

    params, x = {"w": jnp.ones((3, 2)) / 3, "b": b0}, jnp.arange(6.0).reshape(2, 3) / 6

    def grad(p, x):
        return {"w": jax.grad(frozen_b)(p, x)["w"]}

    report = jgradcheck.check_grad(frozen_b, grad, params, x, only="w")
    assert report.passed, str(report)
    assert report.not_checked == ("b",)


def test_a_bug_in_the_checked_leaf_is_found_and_yours_may_omit_the_others():
    params, x = _mlp()

    def only_first_w(p, x):
        return {"layers": [{"w": 3 * jax.grad(cost)(p, x)["layers"][0]["w"]}]}

    report = jgradcheck.check_grad(cost, only_first_w, params, x, only=["layers[0].w"])
    assert report.status == "failed"
    assert [leaf.path for leaf in report.failed_leaves] == ["layers[0].w"]


def test_wildcards_and_a_predicate():
    params, x = _mlp()
    report = jgradcheck.check_grad(cost, jax.grad(cost), params, x, only="layers[*].b")
    assert report.not_checked == ("layers[0].w", "layers[1].w")
    report = jgradcheck.check_grad(cost, jax.grad(cost), params, x, only=lambda path, leaf: leaf.ndim == 2)
    assert report.not_checked == ("layers[0].b", "layers[1].b")


def test_a_pattern_that_matches_nothing_lists_the_paths():
    params, x = _mlp()
    with pytest.raises(ValueError, match=r"only='W1' matches no floating leaf.*layers\[0\]\.b, layers\[0\]\.w"):
        jgradcheck.check_grad(cost, jax.grad(cost), params, x, only="W1")
    with pytest.raises(TypeError, match="only= takes a leaf path pattern"):
        jgradcheck.check_grad(cost, jax.grad(cost), params, x, only=3)


def test_numerical_grad_only_leaves_the_others_nan():
    params, x = _mlp()
    g = jgradcheck.numerical_grad(cost, params, x, only="layers[1].w")
    exact = jax.grad(cost)(params, x)
    np.testing.assert_allclose(g["layers"][1]["w"], exact["layers"][1]["w"], rtol=1e-4)
    assert np.isnan(np.asarray(g["layers"][0]["w"])).all()


def test_assert_grad_correct_passes_only_through():
    params, x = _mlp()
    jgradcheck.assert_grad_correct(cost, buggy_second_layer, params, x, only="layers[0]")
    with pytest.raises(AssertionError, match=r"layers\[1\]\.w \(1 of 2 leaves checked\)"):
        jgradcheck.assert_grad_correct(cost, buggy_second_layer, params, x, only="layers[1]")


def test_vector_checks_take_only_on_primals():
    def f(x, w):
        return jnp.tanh(x * w)

    def vjp_fn(x, w):
        out = f(x, w)

        def pullback(u):
            d = u * (1 - out**2)
            return d * w, 2 * d * x  # planted bug in w's cotangent

        return out, pullback

    x, w = jnp.array([0.3, -0.2, 0.5]), jnp.array([1.5, 0.7, -0.4])
    report = jgradcheck.check_vjp(f, vjp_fn, x, w, only="x")
    assert report.passed, str(report)
    assert report.not_checked == ("w",)
    bad = jgradcheck.check_vjp(f, vjp_fn, x, w, only="w")
    assert [leaf.path for leaf in bad.failed_leaves] == ["w"]
    assert bad.not_checked == ("x",)


def test_check_hvp_takes_only():
    def J(p):
        return jnp.sum(p["a"] ** 3) + jnp.sum(p["b"] ** 4)

    def hvp(p, v):
        return {"a": 6 * p["a"] * v["a"], "b": 6 * p["b"] ** 2 * v["b"]}  # planted bug: 6 where 12 is due

    p = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5, -1.0])}
    assert jgradcheck.check_hvp(J, hvp, p, only="a").passed
    assert [leaf.path for leaf in jgradcheck.check_hvp(J, hvp, p, only="b").failed_leaves] == ["b"]


def test_check_jvp_and_check_rules_take_only():
    def f(x, w):
        return jnp.sin(x * w)

    x, w = jnp.array([0.3, 0.5]), jnp.array([1.0, 2.0])
    report = jgradcheck.check_jvp(f, lambda p, t: jax.jvp(f, p, t), x, w, only="w")
    assert report.passed and report.not_checked == ("x",)
    report = jgradcheck.check_rules(f, x, w, only="w")
    assert report.passed
    assert report.not_checked == ("fwd:x", "rev:x")
