"""A float32 section inside a float64 check (``jax.nn.dot_product_attention``'s softmax) at an
extreme scale: its rounding must not fail a correct gradient, nor hide a bug elsewhere.

With weights ×30 the softmax saturates: the query and key weights' gradient through it, JAX's
own included, is float32 rounding of the terms it sums (~1e-3 against ~1e3 for the value
weights), and so are J's central differences through it. Before the check measured what the
section does (``precision.measured_section_rounding``, ``precision.section_differences``), a
correct gradient failed there at 640× its tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import precision

_D = 8


def _cost(p, x, y):
    q, k, v = (jnp.einsum("bsd,de->bse", x, p[n]).reshape(2, 5, 2, 4) for n in ("wq", "wk", "wv"))
    o = jax.nn.dot_product_attention(q, k, v).reshape(2, 5, _D) @ p["wo"]
    return jnp.mean((o - y) ** 2)


def _setup(seed: int, scale: float, dtype: str):
    rng = np.random.default_rng(seed)
    p = {k: rng.standard_normal((_D, _D)) * scale / np.sqrt(_D) for k in ("wq", "wk", "wv", "wo")}
    x, y = rng.standard_normal((2, 5, _D)), rng.standard_normal((2, 5, _D)) * 0.1
    with jax.enable_x64(dtype == "float64"):
        p = {k: jnp.asarray(v, dtype) for k, v in p.items()}
        x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        g = jax.grad(_cost)(p, x, y)
    return p, x, y, g


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_saturated_float32_softmax_does_not_fail_a_correct_gradient(seed, dtype):
    p, x, y, g = _setup(seed, 30.0, dtype)
    report = jgradcheck.check_grad(_cost, g, p, x, y, progress=False)
    assert report.status != "failed", str(report)
    for leaf in report.leaves:
        if leaf.path in ("wq", "wk") and leaf.status == "inconclusive":
            assert "compute that section in float64" in str(report)


def test_without_the_measured_section_a_correct_gradient_fails(monkeypatch):
    """The plant: the section's measurements off, the false failure comes back."""
    monkeypatch.setattr(precision, "entry_section_rounding", lambda problem, group, idx: np.zeros(np.size(idx)))
    assert any(
        jgradcheck.check_grad(_cost, g, p, x, y, progress=False).status == "failed"
        for p, x, y, g in (_setup(s, 30.0, "float64") for s in (0, 1, 2))
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_bug_beside_the_section_still_fails_at_its_entry(seed):
    """A value weight's entry 1% off (its path is float64) fails there, saturated softmax or not."""
    p, x, y, g = _setup(seed, 30.0, "float64")
    with jax.enable_x64(True):
        bad = {**g, "wv": g["wv"].at[2, 5].multiply(1.01)}
    report = jgradcheck.check_grad(_cost, bad, p, x, y, progress=False)
    assert report.status == "failed" and report.worst[0].name == "wv[2, 5]", str(report)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_scale_one_a_bug_through_the_section_still_fails(seed, dtype):
    """Where the softmax is not saturated, a 1% error of the largest query-weight entry fails there."""
    p, x, y, g = _setup(seed, 1.0, dtype)
    i = np.unravel_index(int(np.argmax(np.abs(np.asarray(g["wq"])))), g["wq"].shape)
    with jax.enable_x64(dtype == "float64"):
        bad = {**g, "wq": g["wq"].at[i].multiply(1.01)}
    report = jgradcheck.check_grad(_cost, bad, p, x, y, progress=False)
    name = f"wq[{i[0]}, {i[1]}]"
    assert report.status == "failed" and name in [e.name for e in report.worst], str(report)
    assert jgradcheck.check_grad(_cost, g, p, x, y, progress=False).status != "failed"
