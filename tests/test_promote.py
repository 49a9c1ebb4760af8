"""promote.py: your program as you run it, its arithmetic widened to float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jgradcheck._src import promote

X = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)


@jax.custom_vjp
def _sin(x):
    return jnp.sin(x)


_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))

PROGRAMS = {
    "scatter_add": lambda x: x.at[jnp.array([0, 2, 0])].add(x[:3]),
    "segment_max": lambda x: jax.ops.segment_max(x, jnp.array([0, 1, 1]), 2),
    "argsort": lambda x: x[jnp.argsort(x[:, 0])],
    "relu (custom_jvp)": jax.nn.relu,
    "custom_vjp": _sin,
    "softmax": jax.nn.softmax,
    "checkpoint": jax.checkpoint(lambda x: jnp.sin(x) * 2),
    "cummax": lambda x: lax.cummax(x, 1),
    "linalg_solve": lambda x: jnp.linalg.solve(x[:, :3] + 3 * jnp.eye(3), x[:, 3]),
    "fori_loop": lambda x: lax.fori_loop(0, jnp.int32(3), lambda i, y: y * 1.1, x),
    "map": lambda x: lax.map(jnp.sin, x),
    "pure_callback": lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x),
    "top_k": lambda x: lax.top_k(x, 2)[0],
    "conv": lambda x: lax.conv(x[None, None], jnp.ones((1, 1, 2, 2), x.dtype), (1, 1), "SAME"),
    "float32 scan carry": lambda x: lax.scan(lambda h, r: (jnp.tanh(h + r), h), jnp.zeros(4, jnp.float32), x)[1],
}


def _run_wide(fn, *args):
    wide = promote.widened(fn, *args)
    with jax.enable_x64(True):
        return jax.jit(wide)(*[np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args])


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_widened_program_is_yours_in_float64(name):
    fn = PROGRAMS[name]
    got = _run_wide(fn, X)
    assert got.dtype == np.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(fn(X), np.float64), rtol=2e-6, atol=2e-6)


def test_random_draws_are_the_ones_you_run():
    key = jax.random.PRNGKey(3)

    def keep(x, key):
        return jnp.where(jax.random.uniform(key, x.shape) < 0.5, x, 0.0)

    with jax.enable_x64(True):  # what promoting the inputs draws: other bits, other masks
        other = keep(np.asarray(X, np.float64), key)
    got = _run_wide(keep, X, key)
    want = keep(X, key)
    np.testing.assert_array_equal(np.asarray(got) != 0, np.asarray(want) != 0)
    assert not np.array_equal(np.asarray(other) != 0, np.asarray(want) != 0)


def test_narrowing_cast_kept_as_written():
    x = jnp.float32(1.0) + jnp.float32(2.0**-12) * jnp.arange(4, dtype=jnp.float32)
    got = _run_wide(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32) * 3, x)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(got), np.full(4, 3.0))  # bf16 rounds the steps away


def test_arithmetic_is_float64():
    # 1 + 1e-10 - 1 is 0 in float32 and 1e-10 in float64: the widened program computes it.
    got = _run_wide(lambda x: (x + 1e-10) - x, jnp.ones(2, jnp.float32))
    assert float(got[0]) == pytest.approx(1e-10, rel=1e-5)
