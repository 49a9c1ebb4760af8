"""A check inside a test suite reuses its compiled programs: no timing here, only what is compiled.

The programs of the vector checks (your JVP on every basis tangent, projected) are kept by their
traced text (vector.run_compiled): a tiny program runs eagerly in the first checks that see it
(vector.EAGER_SIGHTS) and is compiled after; the same operation checked again at new values,
written as a new lambda, then compiles nothing new; the arrays a rule closes over are arguments of the kept program, so a
rule with the same code and wrong values still fails, eagerly or compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import vector

DTYPES = ["float32", "float64"]


def _as(a: np.ndarray, dtype: str) -> jax.Array:
    with jax.enable_x64(dtype == "float64"):
        return jnp.asarray(a, dtype)


def _x(dtype: str, shift: float = 0.0) -> jax.Array:
    return _as(np.linspace(0.1, 0.9, 6).reshape(2, 3) + shift, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_sight_of_known_equations_runs_eagerly_and_a_third_check_compiles_nothing_new(dtype, monkeypatch):
    monkeypatch.setattr(vector, "EAGER_SIGHTS", 1)  # compiled from the second check that sees it
    c = {"float32": 0.25, "float64": 0.375}[dtype]  # programs no other test runs (both run in float64)
    f = lambda x: jnp.sin(x) * x + c * x  # noqa: E731
    # A check of the same equations in other programs (another constant): after it, JAX holds an
    # executable for each equation, and a program made of them runs eagerly on its first sight.
    other = jgradcheck.check_rules(lambda x: jnp.sin(x) * x + (c + 1.0) * x, _x(dtype))
    assert other.status == "passed", other
    compiled, eager = vector._COMPILED[0], vector._EAGER[0]
    first = jgradcheck.check_rules(f, _x(dtype))
    assert first.status == "passed", first
    assert vector._COMPILED[0] == compiled  # every program of this tiny check ran eagerly
    assert vector._EAGER[0] > eager
    second = jgradcheck.check_rules(lambda x: jnp.sin(x) * x + c * x, _x(dtype, 0.02))
    assert second.status == "passed", second
    assert vector._COMPILED[0] > compiled  # seen twice: compiled
    before = vector._COMPILED[0]
    again = jgradcheck.check_rules(lambda x: jnp.sin(x) * x + c * x, _x(dtype, 0.01))
    assert again.status == "passed", again
    assert vector._COMPILED[0] == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_program_takes_the_rules_own_values(dtype, monkeypatch):
    monkeypatch.setattr(vector, "EAGER_SIGHTS", 1)  # compiled from the second check that sees it
    # A failing check measures its gradient's rounding with programs of its own (precision.py),
    # compiled through the same cache: not the programs counted here.
    from jgradcheck._src import precision

    monkeypatch.setattr(precision, "measured_check_rounding", lambda problem: (0.0,) * len(problem.floats))
    # The same JVP code closing over another array: the kept program, but your values.
    x = _x(dtype)
    f = lambda x: jnp.sin(x) * 3.0  # noqa: E731

    def jvp_with(w, fn=f):
        return lambda p, t: (fn(p[0]), w * jnp.cos(p[0]) * t[0])

    # The same equations in other programs (another constant) first: JAX then holds an executable
    # for each, and the programs below run eagerly on their first sight.
    g = lambda x: jnp.sin(x) * 2.5  # noqa: E731
    primed = jgradcheck.check_jvp(g, jvp_with(_as(np.full(x.shape, 2.5), dtype), g), x)
    assert primed.status == "passed", primed
    w = np.full(x.shape, 3.0)
    w[1, 2] = 3.3  # one entry of the rule 10% off
    compiled = vector._COMPILED[0]
    first = jgradcheck.check_jvp(f, jvp_with(_as(w, dtype)), x)  # first sight: eagerly
    assert vector._COMPILED[0] == compiled
    assert first.status == "failed", first
    assert {(e.path, e.index) for e in first.worst if e.status == "fail"} == {("x", (1, 2))}
    right = jgradcheck.check_jvp(f, jvp_with(_as(np.full(x.shape, 3.0), dtype)), x)  # compiled
    assert right.status == "passed", right
    before = vector._COMPILED[0]
    wrong = jgradcheck.check_jvp(f, jvp_with(_as(w, dtype)), x)
    assert vector._COMPILED[0] == before
    assert wrong.status == "failed", wrong
    assert {(e.path, e.index) for e in wrong.worst if e.status == "fail"} == {("x", (1, 2))}


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_trace_that_changes_is_still_caught_with_traces_kept(dtype):
    # Same values, another program every other trace: only the determinism check sees it, and
    # keeping one trace per vector check must not keep it from looking.
    calls = [0]

    def fn(x):
        calls[0] += 1
        return x * 2.0 if calls[0] % 2 else x + x

    with pytest.raises(ValueError, match="not deterministic"):
        jgradcheck.check_rules(fn, _x(dtype), modes=("rev",))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_reverse_share_their_evaluations(dtype):
    # One numerical side for both modes of an order: the second check evaluates nothing the first
    # did, and judges its own derivative against the same finite differences.
    f = lambda x: jnp.sin(x) * x  # noqa: E731
    both = jgradcheck.check_rules(f, _x(dtype), modes=("fwd", "rev"))
    rev = jgradcheck.check_rules(f, _x(dtype), modes=("rev",))
    assert both.status == "passed" and rev.status == "passed", (both, rev)
    assert both.evaluations == rev.evaluations > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_wrong_gradient_judged_against_shared_evaluations_still_fails(dtype):
    # Two scalar checks of the same cost at the same inputs in one block: the second is served
    # the first one's values of J and must still see its own wrong entry, and only it.
    from jgradcheck._src.problem import reuse_traces

    x = _x(dtype)
    cost = lambda p: jnp.sum(jnp.sin(p) * p)  # noqa: E731
    right = jax.grad(cost)
    wrong = lambda p: right(p).at[1, 2].multiply(1.01)  # noqa: E731
    with reuse_traces():
        first = jgradcheck.check_grad(cost, right, x)
        second = jgradcheck.check_grad(cost, wrong, x)
    assert first.status == "passed", first
    assert first.evaluations > 0
    assert second.status == "failed", second
    assert {e.index for e in second.worst if e.status == "fail"} == {(1, 2)}
    assert second.evaluations < first.evaluations  # the shared points were not evaluated again


def test_a_program_runs_eagerly_in_its_first_checks_then_compiled(monkeypatch):
    monkeypatch.setattr(vector, "EAGER_SIGHTS", 3)
    x = _x("float32")
    jgradcheck.check_rules(lambda x: jnp.cos(x) * x + 0.625 * x, x)  # the same equations, other programs
    compiled = vector._COMPILED[0]
    for k in range(3):  # three checks: eager
        r = jgradcheck.check_rules(lambda x: jnp.cos(x) * x + 0.875 * x, _x("float32", 0.01 * k))
        assert r.status == "passed", r
    assert vector._COMPILED[0] == compiled
    r = jgradcheck.check_rules(lambda x: jnp.cos(x) * x + 0.875 * x, _x("float32", 0.05))  # the fourth: compiled
    assert r.status == "passed", r
    assert vector._COMPILED[0] > compiled
