"""JAX's own rules, op by op, through check_rules: zero crashes and zero false alarms.

A list in the spirit of JAX's ``tests/lax_autodiff_test.py`` (written here, not copied): each case
is an operation, the shapes and values of its inputs (inside its domain, away from its kinks), and
what it must give. JAX's rules are right, so every case must pass, in float32 and float64, under
the default promotion to float64; an operation the checks cannot take (a complex output) must
raise the error that says what to do.

Every case goes through check_rules (forward and reverse, some to order 2) and check_grad of a
scalar cost built on it; a few hand-written rules through check_vjp and check_jvp. The CI subset
(``ci=True``, about a minute on a 2-core CPU) runs in every suite; the whole list (about five
minutes) with ``JGRADCHECK_OPLIST=all``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jgradcheck

DTYPES = ["float32", "float64"]
ALL = os.environ.get("JGRADCHECK_OPLIST", "") == "all"


@dataclasses.dataclass(frozen=True)
class Case:
    """One operation: ``fn(*inputs)``, the inputs' makers ``rng -> array`` (floats in the test's
    dtype, integer inputs as made), whether it is in the CI subset, and the order checked."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[Callable[[np.random.Generator], Any], ...]
    ci: bool = False
    order: int = 1
    modes: tuple[str, ...] = ("fwd", "rev")
    dtypes: tuple[str, ...] = tuple(DTYPES)


def normal(*shape: int, scale: float = 1.0) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: scale * rng.standard_normal(shape)


def uniform(lo: float, hi: float, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.uniform(lo, hi, shape)


def spread(lo: float, hi: float, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Distinct values well apart (max, min, sort, cummax: no ties, away from the switch points)."""
    n = int(np.prod(shape))
    return lambda rng: rng.permutation(np.linspace(lo, hi, n)).reshape(shape)


def ints(values: Any) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: np.asarray(values, np.int32)


def _variadic_reduce(a, b):
    # Typed init values, as JAX's tests write them: promotion must not break them.
    init = (jnp.zeros((), a.dtype), jnp.ones((), b.dtype))
    return lax.reduce((a, b), init, lambda x, y: (x[0] + y[0], x[1] * y[1]), (0,))


def _argmax_reduce(x, y):
    # An argmax-style variadic reduction: the largest x and the y beside it travel together.
    # (JAX cannot differentiate it with an integer index operand: jax.jvp raises on the Zero.)
    def pick(a, b):
        take = a[0] >= b[0]
        return lax.select(take, a[0], b[0]), lax.select(take, a[1], b[1])

    return lax.reduce((x, y), (jnp.array(-jnp.inf, x.dtype), jnp.zeros((), y.dtype)), pick, (1,))


def _while(x):
    # An int32 counter and a float carry of the input's dtype: mixed dtypes in one loop.
    def body(c):
        i, y = c
        return i + 1, jnp.sin(y) * 1.1 + 0.1 * i.astype(y.dtype)

    return lax.while_loop(lambda c: c[0] < 3, body, (jnp.int32(0), x))[1]


def _scan(w, xs):
    # A float32 carry written by hand (as tutorials do) for float32 inputs, an int32 step counter,
    # stacked outputs: promotion to float64 must not break the carry.
    def step(carry, x):
        h, k = carry
        h = jnp.tanh(h @ w + x) + 0.01 * k
        return (h, k + 1), h

    carry = jnp.float32 if w.dtype == jnp.float32 else w.dtype
    (h, _), hs = lax.scan(step, (jnp.zeros((2, 3), carry), jnp.int32(0)), xs)
    return hs.sum(0) + h


def _cond(x, k):
    return lax.cond(k > 0, lambda v: jnp.sin(v) * 2.0, lambda v: jnp.cos(v), x)


def _switch(x, k):
    return lax.switch(k, [jnp.sin, jnp.cos, lambda v: v**3], x)


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _conv_strided(x, w):
    return lax.conv_general_dilated(
        x, w, (2, 1), [(1, 0), (0, 1)], rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _sort2(a, b):
    return lax.sort((a, b), dimension=1, num_keys=1)


def _sort3(a, b, c):
    return lax.sort((a, b, c), dimension=0, num_keys=2)


def _spd(a):
    m = a @ a.T + 3.0 * jnp.eye(a.shape[0], dtype=a.dtype)
    return jnp.linalg.cholesky(m)


def _tri_solve(a, b):
    lower = jnp.tril(a) + 3.0 * jnp.eye(a.shape[0], dtype=a.dtype)
    return lax.linalg.triangular_solve(lower, b, left_side=True, lower=True)


def _eigvalsh(a):
    return jnp.linalg.eigvalsh(a + a.T)


CASES = [
    # Elementwise, one input.
    Case("neg", lax.neg, (normal(3, 4),)),
    Case("exp", jnp.exp, (normal(3, 4),), order=2),
    Case("exp2", jnp.exp2, (normal(3, 4),)),
    Case("expm1", jnp.expm1, (normal(3, 4),)),
    Case("log", jnp.log, (uniform(0.5, 3.0, 3, 4),)),
    Case("log1p", jnp.log1p, (uniform(0.1, 3.0, 3, 4),)),
    Case("sinh", jnp.sinh, (normal(3, 4),)),
    Case("cosh", jnp.cosh, (normal(3, 4),)),
    Case("tanh", jnp.tanh, (normal(3, 4),), order=2),
    Case("sin", jnp.sin, (normal(3, 4),), order=2),
    Case("cos", jnp.cos, (normal(5),)),
    Case("tan", jnp.tan, (uniform(-1.3, 1.3, 3, 4),)),
    Case("asin", jnp.arcsin, (uniform(-0.9, 0.9, 3, 4),)),
    Case("acos", jnp.arccos, (uniform(-0.9, 0.9, 3, 4),)),
    Case("atan", jnp.arctan, (normal(3, 4),)),
    Case("asinh", jnp.arcsinh, (normal(3, 4),)),
    Case("acosh", jnp.arccosh, (uniform(1.2, 3.0, 3, 4),)),
    Case("atanh", jnp.arctanh, (uniform(-0.9, 0.9, 3, 4),)),
    Case("erf", lax.erf, (normal(3, 4),)),
    Case("erfc", lax.erfc, (normal(3, 4),)),
    Case("erf_inv", lax.erf_inv, (uniform(-0.9, 0.9, 3, 4),), ci=True),
    Case("lgamma", lax.lgamma, (uniform(0.5, 3.0, 3, 4),), ci=True),
    Case("digamma", lax.digamma, (uniform(0.5, 3.0, 3, 4),)),
    Case("bessel_i0e", lax.bessel_i0e, (normal(3, 4),)),
    Case("bessel_i1e", lax.bessel_i1e, (normal(3, 4),)),
    Case("sqrt", jnp.sqrt, (uniform(0.5, 3.0, 3, 4),)),
    Case("rsqrt", lax.rsqrt, (uniform(0.5, 3.0, 3, 4),)),
    Case("cbrt", jnp.cbrt, (uniform(0.5, 3.0, 3, 4),)),
    Case("logistic", jax.nn.sigmoid, (normal(3, 4),), order=2),
    Case("abs", jnp.abs, (spread(0.3, 2.0, 3, 4),)),
    Case("square", jnp.square, (normal(3, 4),)),
    Case("integer_pow", lambda x: lax.integer_pow(x, 3), (normal(3, 4),)),
    Case("reciprocal", jnp.reciprocal, (uniform(0.5, 3.0, 3, 4),)),
    Case("floor", jnp.floor, (uniform(0.1, 0.4, 3, 4),)),
    Case("round", jnp.round, (uniform(0.1, 0.4, 3, 4),)),
    Case("relu", jax.nn.relu, (spread(-2.0, 2.1, 3, 4),)),
    Case("softplus", jax.nn.softplus, (normal(3, 4),)),
    Case("gelu", jax.nn.gelu, (normal(3, 4),)),
    Case("softmax", functools.partial(jax.nn.softmax, axis=-1), (normal(3, 4),)),
    Case("log_softmax", functools.partial(jax.nn.log_softmax, axis=-1), (normal(3, 4),)),
    Case("logsumexp", functools.partial(jax.nn.logsumexp, axis=0), (normal(3, 4),)),
    # Elementwise, two or three inputs, with broadcasting.
    Case("add", jnp.add, (normal(3, 1), normal(1, 4))),
    Case("sub", jnp.subtract, (normal(3, 4), normal(4))),
    Case("mul", jnp.multiply, (normal(), normal(3, 4)), ci=True, order=2),
    Case("div", jnp.divide, (normal(3, 4), uniform(0.5, 2.0, 3, 4))),
    Case("max", jnp.maximum, (spread(-2.0, 2.0, 3, 4), spread(-1.9, 2.1, 3, 4))),
    Case("min", jnp.minimum, (spread(-2.0, 2.0, 3, 4), spread(-1.9, 2.1, 3, 4))),
    Case("pow", lax.pow, (uniform(0.5, 2.0, 3, 4), uniform(-1.0, 2.0, 3, 4)), ci=True),
    Case("atan2", jnp.arctan2, (uniform(0.3, 2.0, 3, 4), normal(3, 4)), ci=True),
    Case("rem", lax.rem, (uniform(2.2, 2.8, 3, 4), uniform(1.0, 1.05, 3, 4)), ci=True),
    Case("clamp", lambda x: lax.clamp(-1.0, x, 1.0), (spread(-1.5, 1.6, 3, 4),)),
    Case("select_n", lambda a, b: lax.select_n(jnp.arange(12).reshape(3, 4) % 3 == 0, a, b), (normal(3, 4),) * 2),
    Case(
        "select_n_3way",
        lambda a, b, c: lax.select_n(jnp.arange(12).reshape(3, 4) % 3, a, b, c),
        (normal(3, 4),) * 3,
        ci=True,
    ),
    # Shapes and indexing.
    Case("concatenate", lambda a, b: lax.concatenate([a, b, a], 1), (normal(2, 3), normal(2, 1))),
    Case("split", lambda x: tuple(jnp.split(x, [1, 3], axis=1)), (normal(2, 5),)),
    Case("reshape_transpose", lambda x: x.reshape(4, 3).T, (normal(3, 4),)),
    Case("broadcast_in_dim", lambda x: jnp.broadcast_to(x, (2, 3, 4)) * 1.5, (normal(3, 1),)),
    Case("pad", lambda x: lax.pad(x, 0.5, [(1, -1, 1), (0, 2, 0)]), (normal(3, 4),)),
    Case("rev", lambda x: lax.rev(x, (0, 1)), (normal(3, 4),)),
    Case("slice", lambda x: x[1:, ::2], (normal(3, 4),)),
    Case("dynamic_slice", lambda x, i: lax.dynamic_slice(x, (i, i - 1), (2, 2)), (normal(4, 4), ints(1))),
    # A Python int beside an int32 index: int64 under x64, which dynamic_slice refuses. As you run it
    # (float32, x64 off) it is fine; the check must not break it (float64 inputs need x64 anyway).
    Case(
        "dynamic_slice_literal_index",
        lambda x, i: lax.dynamic_slice(x, (i, 1), (2, 2)),
        (normal(4, 4), ints(1)),
        ci=True,
        dtypes=("float32",),
    ),
    Case(
        "dynamic_update_slice",
        lambda x, u, i: lax.dynamic_update_slice(x, u, (i, i - 1)),
        (normal(4, 3), normal(2, 3), ints(1)),
    ),
    Case("gather", lambda x, idx: x[idx], (normal(5, 3), ints([4, 0, 2, 2])), ci=True),
    Case("gather_2d", lambda x: x[jnp.array([0, 2, 1]), jnp.array([3, 0, 1])], (normal(3, 4),)),
    Case(
        "scatter_add",
        lambda x, u: x.at[jnp.array([0, 2, 0, 1])].add(u),
        (normal(3, 4), normal(4, 4)),
        ci=True,
    ),
    Case("scatter_set", lambda x, u: x.at[jnp.array([2, 0])].set(u), (normal(3, 4), normal(2, 4))),
    Case(
        "scatter_mul",
        lambda x, u: x.at[jnp.array([2, 0])].multiply(u, unique_indices=True),  # JAX's rule needs unique ones
        (normal(3, 4), normal(2, 4)),
    ),
    # Reductions.
    Case("reduce_sum", lambda x: jnp.sum(x, axis=1), (normal(3, 4),)),
    Case("reduce_max", lambda x: jnp.max(x, axis=0), (spread(-2.0, 2.0, 3, 4),)),
    Case("reduce_min", lambda x: jnp.min(x, axis=1), (spread(-2.0, 2.0, 3, 4),)),
    Case("reduce_prod", lambda x: jnp.prod(x, axis=1), (uniform(0.5, 1.5, 3, 4),)),
    Case("argmax_reduce", _argmax_reduce, (spread(-2.0, 2.0, 3, 4), normal(3, 4)), ci=True),
    Case("variadic_reduce", _variadic_reduce, (uniform(0.5, 1.5, 3, 4), uniform(0.5, 1.5, 3, 4)), ci=True),
    Case("cumsum", lambda x: jnp.cumsum(x, axis=1), (normal(3, 4),), ci=True),
    Case("cumprod", lambda x: jnp.cumprod(x, axis=0), (uniform(0.5, 1.5, 3, 4),), ci=True),
    Case("cummax", lambda x: lax.cummax(x, axis=1), (spread(-2.0, 2.0, 3, 4),)),
    Case("cumlogsumexp", lambda x: lax.cumlogsumexp(x, axis=0), (normal(3, 4),)),
    Case(
        "reduce_window_sum",
        lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 2), (1, 1), "VALID"),
        (normal(3, 4),),
    ),
    Case(
        "reduce_window_max_inf",
        lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2), (2, 1), [(0, 3), (1, 2)]),
        (spread(-2.0, 2.0, 3, 4),),
        ci=True,
    ),
    Case(
        "reduce_window_min_inf",
        lambda x: lax.reduce_window(x, jnp.inf, lax.min, (2, 2), (1, 2), [(1, 1), (0, 1)]),
        (spread(-2.0, 2.0, 3, 4),),
    ),
    Case("avg_pool", lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 2), (2, 2), "SAME") / 4.0, (normal(4, 4),)),
    Case("sort", lambda x: jnp.sort(x, axis=1), (spread(-2.0, 2.0, 3, 4),)),
    Case("sort_2_operands", _sort2, (spread(-2.0, 2.0, 3, 4), normal(3, 4)), ci=True),
    Case("sort_3_operands", _sort3, (spread(-2.0, 2.0, 3, 4), normal(3, 4), normal(3, 4))),
    Case("top_k", lambda x: lax.top_k(x, 2)[0], (spread(-2.0, 2.0, 3, 4),)),
    # Linear algebra.
    Case("dot", jnp.dot, (normal(3, 4), normal(4, 2)), order=2),
    Case(
        "dot_general_batched",
        lambda a, b: lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))),
        (normal(2, 3, 4), normal(2, 4, 2)),
        ci=True,
    ),
    Case("einsum", lambda a, b: jnp.einsum("ij,kj->ik", a, b), (normal(3, 4), normal(2, 4))),
    Case("conv", _conv, (normal(1, 2, 4, 4, scale=0.5), normal(3, 2, 3, 3, scale=0.5)), ci=True),
    Case("conv_strided_dilated", _conv_strided, (normal(1, 5, 4, 2, scale=0.5), normal(2, 2, 2, 3, scale=0.5))),
    Case("cholesky", _spd, (normal(3, 3),)),
    Case("triangular_solve", _tri_solve, (normal(3, 3), normal(3, 2))),
    Case("eigvalsh", _eigvalsh, (normal(3, 3),)),
    # Control flow, mixed dtypes.
    Case("while_mixed", _while, (normal(3),), ci=True, modes=("fwd",)),  # JAX has no reverse while_loop
    Case("fori_loop", lambda x: lax.fori_loop(0, 3, lambda i, y: y * jnp.cos(y), x), (normal(4),)),
    Case("scan_mixed", _scan, (normal(3, 3, scale=0.5), normal(4, 2, 3)), ci=True),
    Case("cond", _cond, (normal(3, 4), ints(1)), ci=True),
    Case("switch", _switch, (normal(3), ints(2))),
    Case("checkpoint", jax.checkpoint(lambda x: jnp.sin(jnp.sin(x))), (normal(3, 4),)),
    Case("jit_inside", jax.jit(lambda a, b: jnp.tanh(a @ b)), (normal(3, 4), normal(4, 2))),
]

assert len({c.name for c in CASES}) == len(CASES)
PARAMS = [
    pytest.param(c, d, id=f"{c.name}-{d}", marks=() if c.ci or ALL else pytest.mark.skip("JGRADCHECK_OPLIST=all"))
    for c in CASES
    for d in c.dtypes
]


def _inputs(case: Case, dtype: str) -> tuple[Any, ...]:
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    out = []
    for make in case.inputs:
        x = np.asarray(make(rng))
        if np.issubdtype(x.dtype, np.floating):
            with jax.enable_x64(dtype == "float64"):
                out.append(jnp.asarray(x, dtype))
        else:
            out.append(jnp.asarray(x))
    return tuple(out)


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_jax_rules_pass(case: Case, dtype: str):
    primals = _inputs(case, dtype)
    report = jgradcheck.check_rules(case.fn, *primals, order=case.order, modes=case.modes)
    assert report.status == "passed", report
    # Checked in float64: promotion did not have to be turned off.
    assert not any("promotion to float64 turned off" in w for w in report.warnings), report.warnings


# check_grad of a scalar cost built on each operation, against jax.grad: the promotion-sensitive
# ones in CI (typed values, carries, literal indices), every one with JGRADCHECK_OPLIST=all.
GRAD_CI = {"variadic_reduce", "scan_mixed", "dynamic_slice_literal_index", "cond", "reduce_window_max_inf", "rem"}
GRAD_PARAMS = [
    pytest.param(
        c, d, id=f"{c.name}-{d}", marks=() if c.name in GRAD_CI or ALL else pytest.mark.skip("JGRADCHECK_OPLIST=all")
    )
    for c in CASES
    for d in c.dtypes
    if "rev" in c.modes
]


@pytest.mark.parametrize(("case", "dtype"), GRAD_PARAMS)
def test_check_grad_of_jax_grad_passes(case: Case, dtype: str):
    primals = _inputs(case, dtype)
    floats = [k for k, x in enumerate(primals) if jnp.issubdtype(x.dtype, jnp.floating)]

    def cost(params, *others):
        full = list(others)
        for k, x in zip(floats, params):
            full.insert(k, x)
        leaves = jax.tree_util.tree_leaves(case.fn(*full))
        # Finite outputs only (±inf where a window sees only padding), weighted so that none cancels.
        return sum(jnp.sum(jnp.where(jnp.isfinite(y), jnp.sin(y) + 0.5 * y, 0.0)) for y in leaves)

    params = [primals[k] for k in floats]
    others = [x for k, x in enumerate(primals) if k not in floats]
    report = jgradcheck.check_grad(cost, jax.grad(cost), params, *others)
    assert report.status == "passed", report


# Hand-written rules of a few of the operations above: check_vjp and check_jvp take them.
def _cumsum_vjp(x):
    return jnp.cumsum(x, axis=1), lambda g: (jnp.flip(jnp.cumsum(jnp.flip(g, 1), axis=1), 1),)


def _cumsum_jvp(p, t):
    return jnp.cumsum(p[0], axis=1), jnp.cumsum(t[0], axis=1)


def _gather_vjp(x):
    idx = jnp.array([4, 0, 2, 2])
    return x[idx], lambda g: (jnp.zeros_like(x).at[idx].add(g),)


def _sort2_vjp(a, b):
    perm = jnp.argsort(a, axis=1)
    out = (jnp.take_along_axis(a, perm, 1), jnp.take_along_axis(b, perm, 1))

    def pullback(g):
        rows = jnp.arange(a.shape[0])[:, None]
        return jnp.zeros_like(a).at[rows, perm].set(g[0]), jnp.zeros_like(b).at[rows, perm].set(g[1])

    return out, pullback


def _erf_inv_jvp(p, t):
    y = lax.erf_inv(p[0])
    return y, t[0] * jnp.sqrt(jnp.pi) / 2 * jnp.exp(y**2)


RULES = [
    ("cumsum_vjp", "vjp", lambda x: jnp.cumsum(x, axis=1), _cumsum_vjp, (normal(3, 4),)),
    ("cumsum_jvp", "jvp", lambda x: jnp.cumsum(x, axis=1), _cumsum_jvp, (normal(3, 4),)),
    ("gather_vjp", "vjp", lambda x: x[jnp.array([4, 0, 2, 2])], _gather_vjp, (normal(5, 3),)),
    ("sort2_vjp", "vjp", _sort2, _sort2_vjp, (spread(-2.0, 2.0, 3, 4), normal(3, 4))),
    ("erf_inv_jvp", "jvp", lax.erf_inv, _erf_inv_jvp, (uniform(-0.9, 0.9, 3, 4),)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "kind", "fn", "rule", "makers"), RULES, ids=[r[0] for r in RULES])
def test_hand_written_rules_pass(name, kind, fn, rule, makers, dtype):
    primals = _inputs(Case(name, fn, makers), dtype)
    check = jgradcheck.check_vjp if kind == "vjp" else jgradcheck.check_jvp
    report = check(fn, rule, *primals)
    assert report.status == "passed", report


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_rule_error_fails_at_its_input(dtype):
    # A 1% error in one operand's cotangent of the two-operand sort: caught, at that operand.
    def bad(a, b):
        out, pullback = _sort2_vjp(a, b)
        return out, lambda g: (pullback(g)[0], 1.01 * pullback(g)[1])

    primals = _inputs(Case("sort_2_operands", _sort2, (spread(-2.0, 2.0, 3, 4), normal(3, 4))), dtype)
    report = jgradcheck.check_vjp(_sort2, bad, *primals)
    assert report.status == "failed", report
    assert {leaf.path for leaf in report.failed_leaves} == {"b"}


def test_complex_output_names_the_fix():
    with pytest.raises(TypeError, match=r"out has dtype complex.*Return jnp.real\(y\) and jnp.imag\(y\)"):
        jgradcheck.check_rules(lax.complex, jnp.ones(3), jnp.full(3, 2.0))


def test_complex_input_names_the_fix():
    z = jnp.array([1 + 2j, 0.5 - 1j], jnp.complex64)
    with pytest.raises(TypeError, match=r"check_rules checks forward mode on real inputs only, but z is complex64"):
        jgradcheck.check_rules(lambda z: jnp.abs(z) ** 2, z)
    # Reverse mode takes it.
    assert jgradcheck.check_rules(lambda z: jnp.abs(z) ** 2, z, modes=("rev",)).status == "passed"
