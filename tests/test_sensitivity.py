"""Sensitivity: the smallest planted errors the check must still find, on the layers users check.

Yours is ``jax.grad(cost)`` with one planted change: a single entry off by a relative ``ENTRY`` or a
whole leaf off by a relative ``LEAF``, sizes by the parameters' dtype (the check promotes float32 to
float64 by default):

============  ======  ======
params        entry   leaf
============  ======  ======
float32       1%      0.01%
float64       1e-6    1e-7
============  ======  ======

Each must fail in that leaf only (and, for the entry, at that entry), while the same ``jax.grad``
without the change passes, on a tanh MLP, an attention layer (``jax.nn.dot_product_attention`` with
q/k/v projections), a convolution (``lax.conv_general_dilated``) and a GRU-like RNN (``lax.scan``),
each over several random draws. A transformer block is checked whole, and random quadratic and tanh
costs at scales from 1e-3 to 1e3 are drawn by hypothesis.

Two limits of the cost, not of the check: behind ``dot_product_attention``'s float32 softmax J is
defined to float32 only, so with float32 parameters 0.01% of the key projection is below what any
step resolves (strict xfail), and with float64 parameters the value projection is checked at 1e-5 /
1e-6 (one float32 ulp is 1.2e-7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jgradcheck

SEEDS = (0, 1)
DTYPES = ("float32", "float64")
ENTRY = {"float32": 1e-2, "float64": 1e-6}
LEAF = {"float32": 1e-4, "float64": 1e-7}


@dataclasses.dataclass(frozen=True)
class Model:
    """A cost ``cost(params, *args)``, its parameters and data (float64 NumPy), and the leaf to plant in."""

    cost: Callable[..., Any]
    params: dict[str, np.ndarray]
    args: tuple[np.ndarray, ...]
    leaf: str
    leaf64: str | None = None  # the leaf to plant in with float64 parameters, where it differs
    # (entry, leaf) sizes with float64 parameters where the cost itself is defined only to float32:
    # errors below one float32 ulp (1.2e-7) of a gradient read from a float32 section are not bugs
    # any check can tell from the section's own rounding (numerics.section_rounding).
    sizes64: tuple[float, float] | None = None

    def size(self, dtype: str, kind: str) -> float:
        if dtype == "float64" and self.sizes64:
            return self.sizes64[0 if kind == "entry" else 1]
        return (ENTRY if kind == "entry" else LEAF)[dtype]

    def planted_leaf(self, dtype: str) -> str:
        return self.leaf64 if dtype == "float64" and self.leaf64 else self.leaf

    def inputs(self, dtype: str) -> tuple[dict[str, jax.Array], tuple[np.ndarray, ...]]:
        """Parameters as JAX arrays of ``dtype`` (float64 made in a scoped x64 context), data as NumPy."""
        with jax.enable_x64(dtype == "float64"):
            params = {k: jnp.asarray(v, dtype) for k, v in self.params.items()}
        return params, tuple(np.asarray(a, dtype) for a in self.args)

    def exact_grad(self) -> dict[str, np.ndarray]:
        """jax.grad in float64 (scoped x64), as NumPy arrays."""
        with jax.enable_x64(True):
            g = jax.grad(self.cost)(
                {k: jnp.asarray(v) for k, v in self.params.items()}, *(jnp.asarray(a) for a in self.args)
            )
            return {k: np.asarray(v) for k, v in g.items()}


def _normal(r: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return scale * r.standard_normal(shape)


def _mlp(seed: int) -> Model:
    r = np.random.default_rng(seed)
    params = {"W1": _normal(r, (4, 6), 0.5), "b1": _normal(r, 6, 0.1), "W2": _normal(r, (6, 3), 0.4)}
    params["b2"] = _normal(r, 3, 0.1)

    def cost(p, X, Y):
        h = jnp.tanh(X @ p["W1"] + p["b1"])
        return 0.5 * jnp.mean((h @ p["W2"] + p["b2"] - Y) ** 2)

    return Model(cost, params, (_normal(r, (8, 4)), _normal(r, (8, 3))), "W1")


def _heads(x, w, n_heads: int):
    """(T, d) @ (d, d) split into heads, in dot_product_attention's (B, T, N, H) layout."""
    return (x @ w).reshape(1, x.shape[0], n_heads, -1)


def _attention(seed: int) -> Model:
    r = np.random.default_rng(seed)
    d, T, H = 8, 4, 2
    params = {name: _normal(r, (d, d), d**-0.5) for name in ("wq", "wk", "wv")}

    def cost(p, x, t):
        o = jax.nn.dot_product_attention(_heads(x, p["wq"], H), _heads(x, p["wk"], H), _heads(x, p["wv"], H))
        return jnp.sum(jnp.tanh(o) * t)

    # dot_product_attention computes its softmax in float32 whatever the inputs' dtype, so J is rounded
    # to float32 along the query and key paths: 1e-6 there is below what any step can see. With float64
    # parameters the bugs go into the value projection, whose path stays float64; its gradient still
    # reads the float32 softmax's probabilities, so the float64 sizes are 10x the others' (sizes64).
    args = (_normal(r, (T, d)), _normal(r, (1, T, H, d // H)))
    return Model(cost, params, args, "wk", leaf64="wv", sizes64=(1e-5, 1e-6))


def _conv(seed: int) -> Model:
    r = np.random.default_rng(seed)
    params = {"kernel": _normal(r, (3, 2, 3, 3), 0.3), "bias": _normal(r, 3, 0.1)}

    def cost(p, x, t):
        y = lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jnp.mean(jnp.tanh(y + p["bias"][:, None, None]) * t)

    return Model(cost, params, (_normal(r, (2, 2, 6, 6)), _normal(r, (2, 3, 4, 4))), "kernel")


def _gru(seed: int) -> Model:
    r = np.random.default_rng(seed)
    n_in, n_h = 3, 4
    params = {name: _normal(r, (n_in + n_h, n_h), 0.5) for name in ("Wz", "Wr", "Wh")}
    params["b"] = _normal(r, n_h, 0.1)

    def cost(p, xs, t):
        def step(h, x):
            xh = jnp.concatenate([x, h], -1)
            z = jax.nn.sigmoid(xh @ p["Wz"])
            reset = jax.nn.sigmoid(xh @ p["Wr"])
            candidate = jnp.tanh(jnp.concatenate([x, reset * h], -1) @ p["Wh"] + p["b"])
            return (1 - z) * h + z * candidate, None

        h, _ = lax.scan(step, jnp.zeros((xs.shape[1], n_h), xs.dtype), xs)
        return jnp.sum((h - t) ** 2)

    return Model(cost, params, (_normal(r, (5, 2, n_in)), _normal(r, (2, n_h))), "Wh")


MODELS = {"mlp": _mlp, "attention": _attention, "conv": _conv, "gru": _gru}


def _planted(cost, leaf: str, factor: float, index: tuple[int, ...] | None = None):
    """jax.grad(cost) with ``leaf`` (or its entry ``index``) multiplied by ``factor``."""
    grad = jax.grad(cost)

    def planted(params, *args):
        g = dict(grad(params, *args))
        g[leaf] = g[leaf] * factor if index is None else g[leaf].at[index].multiply(factor)
        return g

    return planted


def _typical_entry(g: np.ndarray, seed: int) -> tuple[int, ...]:
    """A random entry at least as large as the leaf's median: 1% of an entry ≈ 0 is no error at all."""
    size = np.abs(g).ravel()
    flat = int(np.random.default_rng(seed).choice(np.flatnonzero(size >= np.median(size))))
    return tuple(int(i) for i in np.unravel_index(flat, g.shape))


def _cases(xfail: dict[tuple[str, str], str] | None = None):
    for name in MODELS:
        for dtype in DTYPES:
            for seed in SEEDS:
                reason = (xfail or {}).get((name, dtype))
                marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
                yield pytest.param(name, dtype, seed, marks=marks, id=f"{name}-{dtype}-seed{seed}")


@pytest.mark.parametrize(("name", "dtype", "seed"), list(_cases()))
def test_correct_gradient_passes(name, dtype, seed):
    model = MODELS[name](seed)
    params, args = model.inputs(dtype)
    report = jgradcheck.check_grad(model.cost, jax.grad(model.cost), params, *args)
    assert report.status == "passed", str(report)


@pytest.mark.parametrize(("name", "dtype", "seed"), list(_cases()))
def test_one_entry_off_fails_at_that_entry(name, dtype, seed):
    model = MODELS[name](seed)
    leaf = model.planted_leaf(dtype)
    index = _typical_entry(model.exact_grad()[leaf], seed)
    params, args = model.inputs(dtype)
    report = jgradcheck.check_grad(
        model.cost, _planted(model.cost, leaf, 1 + model.size(dtype, "entry"), index), params, *args
    )
    assert report.status == "failed", str(report)
    assert [row.path for row in report.failed_leaves] == [leaf], str(report)
    assert report.leaf(leaf).n_failed == 1, str(report)
    assert report.leaf(leaf).worst.index == index, str(report)


# Today's misses: the estimator must find these (the lead's side of issue 15).
_LEAF_MISSES = {
    ("attention", "float32"): "passed: wk 0.01% off is not seen (wk's resolution ~2e-3: the softmax runs in float32)",
}


@pytest.mark.parametrize(("name", "dtype", "seed"), list(_cases(_LEAF_MISSES)))
def test_whole_leaf_off_fails_in_that_leaf(name, dtype, seed):
    model = MODELS[name](seed)
    leaf = model.planted_leaf(dtype)
    params, args = model.inputs(dtype)
    report = jgradcheck.check_grad(model.cost, _planted(model.cost, leaf, 1 + model.size(dtype, "leaf")), params, *args)
    assert report.status == "failed", str(report)
    assert [row.path for row in report.failed_leaves] == [leaf], str(report)


# --- a transformer block on dot_product_attention, checked whole ------------------------------------------


def _block(seed: int) -> Model:
    """Pre-norm block: x + attention(LN(x)) Wo, then x + gelu(LN(x) W1 + b1) W2; causal, 2 heads."""
    r = np.random.default_rng(seed)
    d, T, H, f = 8, 4, 2, 16
    params = {name: _normal(r, (d, d), d**-0.5) for name in ("wq", "wk", "wv", "wo")}
    params |= {"g1": 1 + _normal(r, d, 0.1), "g2": 1 + _normal(r, d, 0.1)}
    params |= {"w1": _normal(r, (d, f), d**-0.5), "b1": _normal(r, f, 0.1), "w2": _normal(r, (f, d), f**-0.5)}

    def norm(x, g):
        return g * (x - jnp.mean(x, -1, keepdims=True)) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-5)

    def cost(p, x, t):
        a = norm(x, p["g1"])
        q, k, v = (_heads(a, p[w], H) for w in ("wq", "wk", "wv"))
        x = x + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(T, d) @ p["wo"]
        x = x + jax.nn.gelu(norm(x, p["g2"]) @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean((x - t) ** 2)

    return Model(cost, params, (_normal(r, (T, d)), _normal(r, (T, d))), "wk")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer_block_with_jax_grad_passes(dtype, seed):
    model = _block(seed)
    params, args = model.inputs(dtype)
    report = jgradcheck.check_grad(model.cost, jax.grad(model.cost), params, *args)
    assert report.status == "passed", str(report)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer_block_key_projection_two_percent_off_fails_there(dtype, seed):
    model = _block(seed)
    params, args = model.inputs(dtype)
    report = jgradcheck.check_grad(model.cost, _planted(model.cost, "wk", 1.02), params, *args)
    assert report.status == "failed", str(report)
    assert [row.path for row in report.failed_leaves] == ["wk"], str(report)


# --- random quadratic and tanh costs at any scale -----------------------------------------------------------


def _random_cost(seed: int, n: int, kind: str, cost_scale: float, param_scale: float):
    """J(w) = cost_scale · f(w / param_scale), f a convex quadratic or a tanh layer plus a small L2 term."""
    r = np.random.default_rng(seed)
    M = r.standard_normal((n, n))
    A, B, c = M @ M.T / n + np.eye(n), r.standard_normal((n, n)) / np.sqrt(n), r.standard_normal(n)

    def cost(p):
        u = p["w"] / param_scale
        f = 0.5 * u @ (A @ u) + c @ u if kind == "quadratic" else jnp.sum(c * jnp.tanh(B @ u)) + 0.1 * u @ u
        return cost_scale * f

    return cost, param_scale * r.standard_normal(n)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 6),
    kind=st.sampled_from(["quadratic", "tanh"]),
    cost_exp=st.floats(-3, 3),
    param_exp=st.floats(-3, 3),
    dtype=st.sampled_from(DTYPES),
)
def test_random_costs_at_any_scale(seed, n, kind, cost_exp, param_exp, dtype):
    cost, w = _random_cost(seed, n, kind, 10.0**cost_exp, 10.0**param_exp)
    with jax.enable_x64(True):
        exact = np.asarray(jax.grad(cost)({"w": jnp.asarray(w)})["w"])
        params = {"w": jnp.asarray(w, dtype)}
    ok = jgradcheck.check_grad(cost, jax.grad(cost), params)
    assert ok.status == "passed", str(ok)
    i = int(np.argmax(np.abs(exact)))  # 1% of the largest entry
    wrong = jgradcheck.check_grad(cost, _planted(cost, "w", 1.01, (i,)), params)
    assert wrong.status == "failed", str(wrong)
    assert wrong.leaf("w").n_failed == 1 and wrong.leaf("w").worst.index == (i,), str(wrong)
