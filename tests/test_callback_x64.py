"""A host callback in a float64 check: XLA may call it from its own threads, where the scoped
``jax.enable_x64`` does not reach, and JAX then rejects the narrowed results. The check falls back
to your own dtypes and says why, instead of crashing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jgradcheck
from jgradcheck._src.check import _is_callback_narrowed


def _half(a):
    return np.asarray(0.5).astype(a.dtype)


def _cost(w):
    return jnp.sum(w**2) + jax.pure_callback(_half, jax.ShapeDtypeStruct((), w.dtype), w[0], vmap_method="sequential")


_W = np.arange(1.0, 3001.0) / 3000  # large enough that XLA:CPU runs the vmapped callback in its own threads


def test_a_callback_narrowed_in_xlas_threads_is_recognised():
    text = "INTERNAL: CpuCallback error ... RuntimeError: Incorrect output dtype for return value #0: Expected: float64, Actual: float32"
    assert _is_callback_narrowed(ValueError(text))
    assert not _is_callback_narrowed(
        ValueError("Incorrect output dtype for return value #0: Expected: float32, Actual: int32")
    )


def test_a_float64_check_of_a_cost_with_a_callback_reports_instead_of_crashing():
    report = jgradcheck.check_grad(_cost, lambda w: 2 * w, _W, strategy="vmap", progress=False)
    narrowed = [w for w in report.warnings if "host callback" in w]
    if narrowed:  # XLA called it from its own threads: checked in your dtypes, and said so
        assert "JAX_ENABLE_X64=1" in narrowed[0] and "float32" in report.precision
        assert report.status in ("passed", "inconclusive"), str(report)
    else:  # called from this thread: a float64 check
        assert report.passed, str(report)


def test_a_wrong_gradient_beside_a_callback_is_never_a_pass():
    report = jgradcheck.check_grad(_cost, lambda w: 2 * w.at[2900].multiply(1.5), _W, strategy="vmap", progress=False)
    assert report.status == "failed" and report.worst[0].name == "<root>[2900]", str(report)
