"""The chunk size changes how the engine batches its evaluations, never what they give.

``chunk_size`` sets the perturbations per vmap step; blocks hold several chunks (a lax.map that
computes only the chunks a call needs) and the last block is padded. One chunk per perturbation,
a size that divides nothing, and one larger than the whole call must all give the numerical
derivatives of the default, to the round-off of J, in float32 and float64, by either strategy;
and a check must say the same about every leaf and find the same wrong entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import engine


def _cost(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return jnp.sum(h**2) + 0.1 * jnp.sum(p["w"] ** 3)


def _grad(p, x):
    z = x @ p["w"] + p["b"]
    dz = 2 * jnp.tanh(z) * (1 - jnp.tanh(z) ** 2)
    return {"w": x.T @ dz + 0.3 * p["w"] ** 2, "b": jnp.sum(dz, axis=0)}


_R = np.random.default_rng(7)
_P = {"w": jnp.asarray(_R.standard_normal((4, 5)) * 0.5, jnp.float32), "b": jnp.asarray(_R.standard_normal(5) * 0.1)}
_X = jnp.asarray(_R.standard_normal((6, 4)), jnp.float32)
_N = 25  # entries: 2 x 25 = 50 evaluations per call
# One per perturbation; 3 divides neither 50 nor the blocks of 16; 100 is more than the call.
_CHUNKS = [1, 3, 100]
_H = 2.0**-8  # eps=: a power of two, so that the bound below knows the step


@pytest.fixture
def batched(monkeypatch):
    """Every call through the batched programs, in blocks of several chunks: no compiled loop,
    no one-chunk blocks for cheap costs, blocks of 16 evaluations (several per call)."""
    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)  # the strategy asked for, as asked
    monkeypatch.setattr(engine, "QUICK_SECONDS", 0.0)
    monkeypatch.setattr(engine, "BLOCK_EVALS", 16)


def _roundoff(x64: bool) -> float:
    """How far two orders of the same float operations may move a central difference: 4 ulps
    of J at each of its two points (|J(θ ± h eᵢ)| ≤ 2|J(θ)| here), over the step 2h. Measured
    (2026-12-02): every chunk size within 1/4 of one ulp, most identical bit for bit."""
    dtype = np.float64 if x64 else np.float32
    with jax.enable_x64(x64):
        j0 = abs(float(jax.jit(_cost)(jax.tree.map(lambda v: jnp.asarray(v, dtype), _P), jnp.asarray(_X, dtype))))
    return 4 * 2 * float(np.spacing(dtype(2 * j0))) / (2 * _H)


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("strategy", ["delta", "vmap"])
def test_numerical_derivatives_do_not_depend_on_the_chunk_size(strategy, x64, batched):
    ran: list[int] = []
    chunk = engine.Engine._chunk
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine.Engine, "_chunk", lambda self, *a: ran.append(chunk(self, *a)) or ran[-1])
        got = {
            k: jgradcheck.numerical_grad(_cost, _P, _X, chunk_size=k, strategy=strategy, x64=x64, eps=_H, float64=True)
            for k in [None, *_CHUNKS]
        }
    assert {1, 3} <= set(ran) and max(ran) >= 2 * _N, ran  # the chunk sizes asked for ran
    tol = _roundoff(x64)
    ref = got[None]
    for k in _CHUNKS:
        for leaf in ("w", "b"):
            np.testing.assert_allclose(got[k][leaf], ref[leaf], rtol=0, atol=tol, err_msg=f"chunk_size={k}, {leaf}")
    # The bound is round-off, far below the derivatives (a wrong chunk's 0 or neighbour is not).
    assert tol < 1e-3 * max(float(np.max(np.abs(v))) for v in ref.values())


def _rows(report):
    return [(leaf.path, leaf.status, leaf.checked, leaf.n_failed) for leaf in report.leaves]


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_a_check_says_the_same_with_any_chunk_size(x64, batched):
    def wrong(p, x):  # one entry of w off by 1%
        g = _grad(p, x)
        return {**g, "w": g["w"].at[2, 3].multiply(1.01)}

    reports = {
        k: jgradcheck.check_grad(_cost, wrong, _P, _X, chunk_size=k, mode="full", x64=x64, eps=_H, progress=False)
        for k in [None, *_CHUNKS]
    }
    ref = reports[None]
    # A second look combines steps h and 2h ((4 D(h) - D(2h)) / 3): 1.5 times the round-off.
    tol = 1.5 * _roundoff(x64)
    assert _rows(ref) == [("b", "ok", 5, 0), ("w", "fail", 20, 1)], str(ref)
    assert [(e.path, e.index) for e in ref.worst if e.status == "fail"] == [("w", (2, 3))]
    for k in _CHUNKS:
        report = reports[k]
        assert _rows(report) == _rows(ref), (k, str(report))
        assert [(e.path, e.index, e.status) for e in report.worst] == [(e.path, e.index, e.status) for e in ref.worst]
        for e, r in zip(report.worst, ref.worst):
            # The same steps: the same estimate, to round-off.
            assert abs(e.numerical - r.numerical) <= tol, (k, e, r)
