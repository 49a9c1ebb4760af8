"""Pytrees and helpers from the JAX ecosystem users bring: equinox modules, optax losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jgradcheck

eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")


@pytest.fixture(scope="module")
def mlp():
    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.PRNGKey(0))  # its activation is a non-array leaf
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
    labels = jax.nn.one_hot(jnp.arange(16) % 3, 3)
    return model, x, labels


def cost(model, x, labels):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy(logits, labels))


def test_equinox_module_with_filter_grad_passes_with_readable_paths(mlp):
    model, x, labels = mlp
    report = jgradcheck.check_grad(cost, eqx.filter_grad(cost), model, x, labels)
    assert report.passed, str(report)
    assert [leaf.path for leaf in report.leaves][:2] == ["layers[0].weight", "layers[0].bias"]
    assert report.warnings == ()  # optax/jax internals (log_softmax's stop_gradient) are not flagged


def test_equinox_planted_bug_is_located(mlp):
    model, x, labels = mlp
    exact = eqx.filter_grad(cost)

    def buggy(m, x, labels):
        g = exact(m, x, labels)
        return eqx.tree_at(lambda t: t.layers[1].weight, g, 2 * g.layers[1].weight)

    report = jgradcheck.check_grad(cost, buggy, model, x, labels)
    assert not report.passed
    assert [leaf.path for leaf in report.failed_leaves] == ["layers[1].weight"]
    assert "yours ≈ 2 × numerical" in report.leaf("layers[1].weight").diagnosis


def test_a_callable_module_as_the_cost(mlp):
    # An equinox Module holding arrays is unhashable; jgradcheck keys its programs by identity.
    model, x, labels = mlp

    class Loss(eqx.Module):
        labels: jax.Array

        def __call__(self, m, x):
            return cost(m, x, self.labels)

    loss = Loss(labels)
    grad = eqx.filter_grad(loss)
    assert jgradcheck.check_grad(loss, grad, model, x).passed
    moved = jax.tree.map(lambda a: a * 1.1 if eqx.is_array(a) else a, model)
    assert jgradcheck.check_grad(loss, grad, moved, x).passed
