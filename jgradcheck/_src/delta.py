"""J at single-entry perturbations without recomputing what a perturbation does not change.

The vmap engine re-evaluates the whole cost for every perturbed entry: for a first-layer
weight that means the full first-layer product W1 @ X, although W1 + δ·e_(r,c) changes only
row r of it, by δ·X[c]. This module interprets the cost's jaxpr with each value carried as
``base + delta``: ``base`` is the unperturbed value (unbatched, computed once), ``delta`` is
None, a dense array, or a one-hot (one entry δ at a flat index). Rules keep deltas one-hot or
cheap where the algebra allows:

* a product with a one-hot operand is a row (or column) of the other operand, scaled by δ;
* an elementwise operation on a one-hot changes one entry: f(b_p + δ) − f(b_p);
* a sum of a one-hot is δ; reshapes, transposes and casts move the index;
* linear operations (add, sub, neg, products with one dense delta, reductions, broadcasts,
  reshapes, selects) apply to the delta alone;
* a convolution with a one-hot kernel entry changes one output channel: the input channel it
  reads, shifted to that kernel position (for a transposed convolution, of the dilated input);
  one changed input channel (a slab) needs only that channel's kernel slice (a sum over kernel
  positions). No rule convolves with a kernel that moves with the perturbation: under vmap
  that is a grouped convolution, far slower on CPU than the whole cost (``grouped_work``);
* a broadcast bias entry is a slab (one channel, one column), kept through bias adds,
  elementwise operations (also between two changes in the same slab, as x and x³ in GELU),
  reshapes that keep its axis, products and sums;
* a slab whose axis a reshape merges as the minor end of a flattened axis (NHWC features
  flattened before a dense layer) is ``Strided``: every C-th position; a matrix product that
  contracts it reads every C-th row of the other operand only;
* a product with changes on both sides is ΔA·B + A·ΔB + ΔA·ΔB by the rules above, so the
  unchanged operands stay shared;
* a ``scan`` runs on perturbed values: its carry holds base + Δ, its body is interpreted with
  the same rules, its constants (the loop's weights) shared and unbatched, a weight entry's
  change kept small by the rules and any dense change folded into its value, so each gate is
  evaluated once per perturbation; the change is taken out at the scan's outputs
  (perturbed − base, exactly zero where no input changed);
* anything else is evaluated on base + delta and the delta is what changed: f(x + Δ) − f(x).
  So is an equation whose params this JAX lays out in a way the rules do not read
  (``compat.Unsupported``): a new JAX makes the check slower there, never a crash, and
  ``fallbacks`` lists those equations for the report.

Call-like primitives (jit, custom_jvp/custom_vjp calls: finite differences ignore their
rules anyway, checkpoint) are inlined. The result is J(θ) + ΔJ: the same number as a direct
evaluation up to rounding of the same order, so the finite-difference analysis is unchanged.

Effects and host callbacks are handled before either strategy evaluates the cost: see
``effects.py``.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat


class OneHot(NamedTuple):
    index: Any  # flat index (int scalar)
    delta: Any  # the change at that index (scalar)


class Slab(NamedTuple):
    """A change confined to position ``index`` along ``axis`` (a row, when axis is 0)."""

    axis: int
    index: Any  # int scalar
    values: Any  # the change there: the value's shape without ``axis``


class Strided(NamedTuple):
    """A slab merged into a wider axis by a reshape (NHWC features flattened before a dense
    layer): the change sits at positions index, index + stride, index + 2·stride, ... along
    ``axis``; ``values`` has that axis at its length over ``stride``."""

    axis: int
    index: Any  # int scalar
    stride: int
    values: Any


def _take(x, axis, index):
    return jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


_ELEMENTWISE = {
    "neg",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "sin",
    "cos",
    "tan",
    "tanh",
    "logistic",
    "sqrt",
    "rsqrt",
    "cbrt",
    "abs",
    "sign",
    "integer_pow",
    "square",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "add",
    "sub",
    "mul",
    "div",
    "max",
    "min",
    "pow",
    "atan2",
    "rem",
    "nextafter",
    "convert_element_type",
    "copy",
    "copy_p",
    "real",
    "imag",
    "not",
    "and",
    "or",
    "xor",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "select_n",
    "clamp",
    "stop_gradient",
}
# Linear in their (first) operand; convert_element_type only when it widens a float (see
# _is_linear): narrowing and integer casts round, and rounding is not linear.
_LINEAR_UNARY = {
    "neg",
    "reduce_sum",
    "broadcast_in_dim",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "convert_element_type",
    "copy",
    "copy_p",
    "slice",
    "rev",
    "cumsum",
    "stop_gradient",
}
_CALLS = compat.CALLS


def _bind(eqn, *args):
    # As jax.core.eval_jaxpr does: higher-order primitives take their sub-functions apart.
    subfuns, params = compat.bind_params(eqn)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _dense(base, d):
    if d is None:
        return jnp.zeros_like(base)
    if isinstance(d, OneHot):
        flat = jnp.zeros((math.prod(jnp.shape(base)),), jnp.result_type(base))
        return flat.at[d.index].set(jnp.asarray(d.delta, flat.dtype)).reshape(jnp.shape(base))
    if isinstance(d, Slab):
        zeros = jnp.zeros(jnp.shape(base), jnp.result_type(base))
        return zeros.at[(slice(None),) * d.axis + (d.index,)].set(d.values.astype(zeros.dtype))
    if isinstance(d, Strided):
        shape, dtype = jnp.shape(base), jnp.result_type(base)
        at = jnp.arange(d.stride) == d.index
        at = at.reshape((1,) * (d.axis + 1) + (d.stride,) + (1,) * (len(shape) - d.axis - 1))
        values = jnp.expand_dims(d.values.astype(dtype), d.axis + 1)
        return jnp.where(at, values, jnp.zeros((), dtype)).reshape(shape)  # no 0·inf
    return d


def _at(x, index):
    """Entry ``index`` (flat) of x, or x itself if it is a scalar."""
    x = jnp.asarray(x)
    return x if x.ndim == 0 else x.reshape(-1)[index]


def _dot_onehot(eqn, bases, deltas, side):
    """Δ of dot_general when operand ``side`` is one-hot and the other has no delta."""
    (lc, rc), _ = compat.dot_dimension_numbers(eqn)
    lhs, rhs = bases
    oh = deltas[side]
    mine, other = (lhs, rhs) if side == 0 else (rhs, lhs)
    my_c, other_c = (lc, rc) if side == 0 else (rc, lc)
    p = jnp.unravel_index(oh.index, jnp.shape(mine))
    moved = jnp.moveaxis(other, list(other_c), list(range(len(other_c))))
    piece = moved[tuple(p[d] for d in my_c)] if other_c else moved  # the other's free dims
    my_free = [d for d in range(jnp.ndim(mine)) if d not in my_c]
    out_shape = eqn.outvars[0].aval.shape
    dtype = eqn.outvars[0].aval.dtype
    piece = (oh.delta * piece).astype(dtype)
    mine_idx = tuple(p[d] for d in my_free)
    if len(my_free) == 1:  # a row (or column) of the output: keep it sparse
        axis = 0 if side == 0 else jnp.ndim(other) - len(other_c)
        return Slab(axis, mine_idx[0], piece)
    zeros = jnp.zeros(out_shape, dtype)
    if side == 0:  # out dims: lhs free..., rhs free...
        return zeros.at[mine_idx].set(piece)
    n_other_free = jnp.ndim(other) - len(other_c)
    return zeros.at[(slice(None),) * n_other_free + mine_idx].set(piece)


def _reindex(oh: OneHot, old_shape, new_shape, perm=None):
    if perm is None:  # reshape-like: row-major flat index is unchanged
        return oh
    p = jnp.unravel_index(oh.index, old_shape)
    q = tuple(p[i] for i in perm)
    return OneHot(jnp.ravel_multi_index(q, new_shape, mode="clip"), oh.delta)


def eval_delta(jaxpr, consts, args, deltas):
    """Evaluates ``jaxpr`` on ``args`` (bases) with ``deltas``; returns (base, delta) per output."""
    env: dict[Any, tuple[Any, Any]] = {}

    def read(v):
        if isinstance(v, jex.Literal):
            return v.val, None
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (c, None)
    for v, a, d in zip(jaxpr.invars, args, deltas):
        env[v] = (a, d)
    log = _DENSE_LOG.get()
    moving = _FOLD.get()
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        bases = [b for b, _ in ins]
        ds = [d for _, d in ins]
        if moving is not None:
            bases, ds, outs = _eval_folding(eqn, bases, ds, moving)
        else:
            outs = _eval_eqn(eqn, bases, ds)
        if log is not None and eqn.primitive.name not in _CALLS and any(_is_dense(d) for _, d in outs):
            log.append((eqn, work(eqn) / _slab_saving(eqn, bases, ds)))
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _eval_folding(eqn, bases, ds, moving: dict[int, Any]):
    """One equation of a loop body whose carry holds perturbed values (``_FOLD``).

    ``moving`` holds (by id) the values that differ per perturbation: the carry, and what is
    computed from it. A change on such a value is folded into it before the equation (its
    operand is per perturbation anyway), a change on a shared value (a weight, an input) is
    left to the rules, which keep a weight entry's change a row or a column instead of a
    per-perturbation weight; a dense change that comes out is folded into its value.
    """
    live = [k for k, d in enumerate(ds) if d is not None]
    touched = any(id(b) in moving for b in bases)
    if touched and live:
        bases, ds = list(bases), list(ds)
        for k in live:
            if id(bases[k]) in moving:
                bases[k] = _moving(moving, folded(bases[k], ds[k]))
                ds[k] = None
    outs = _eval_eqn(eqn, bases, ds)
    got: list[tuple[Any, Any]] = []
    for b, d in outs:
        if d is not None and not isinstance(d, (OneHot, Slab, Strided)):
            got.append((_moving(moving, folded(b, d)), None))
        else:
            if touched or (live and d is None):  # from a moving value, or a perturbed integer
                _moving(moving, b)
            got.append((b, d))
    return bases, ds, got


def _moving(moving: dict[int, Any], value):
    moving[id(value)] = value  # kept alive: its id stays its own while the body is traced
    return value


def folded(base, d):
    """The value base + Δ in the base's dtype; a one-hot or a slab is selected in (one pass that
    XLA fuses with the sum), not scattered into zeros first."""
    if d is None:
        return base
    dtype = jnp.result_type(base)
    shape = jnp.shape(base)
    if isinstance(d, OneHot) and shape:
        at = jnp.arange(math.prod(shape)).reshape(shape) == d.index
        return jnp.where(at, base + jnp.asarray(d.delta, dtype), base)
    if isinstance(d, Slab):
        at = jnp.arange(shape[d.axis]).reshape((1,) * d.axis + (-1,) + (1,) * (len(shape) - d.axis - 1)) == d.index
        return jnp.where(at, base + jnp.expand_dims(d.values.astype(dtype), d.axis), base)
    return jnp.asarray(base + _dense(base, d), dtype=dtype)


# While set (by the scan rule, tracing a loop body whose carry holds perturbed values): the
# values that differ per perturbation, by id (``_eval_folding``); None outside loop bodies.
_FOLD: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar("fold", default=None)


# While set (by ``dense_work``), eval_delta records each equation whose change came out dense.
# Measuring does not trace scan bodies through the interpreter (the same log; tests set this).
MEASURE_SCAN_BODIES = False
_DENSE_LOG: contextvars.ContextVar[list[tuple[Any, float]] | None] = contextvars.ContextVar("dense", default=None)


def _is_dense(d) -> bool:
    return d is not None and not isinstance(d, (OneHot, Slab, Strided)) and jnp.ndim(d) > 0


def _slab_saving(eqn, bases, ds) -> float:
    """How much less than ``work(eqn)`` a product fed one slab costs: the slab's axis, when
    contracted, shrinks to one entry."""
    live = [i for i, d in enumerate(ds) if d is not None]
    if len(live) != 1 or eqn.primitive.name not in _PRODUCTS:
        return 1.0
    d = ds[live[0]]
    if isinstance(d, Strided):
        return float(d.stride)
    if eqn.primitive.name == "conv_general_dilated" and not _channel_rule_fits(eqn, bases):
        return 1.0  # the change is made dense there (``delta_rules._slab_rule``)
    return float(jnp.shape(bases[live[0]])[d.axis]) if isinstance(d, Slab) else 1.0


_PRODUCTS = {"dot_general", "conv_general_dilated"}


def work(eqn) -> float:
    """Rough arithmetic cost of one equation: multiply-adds for products and convolutions,
    loop bodies times their trip count, one per output entry otherwise."""
    name = eqn.primitive.name
    out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    try:
        if name == "dot_general":
            (lc, _), _ = compat.dot_dimension_numbers(eqn)
            return float(out * math.prod(eqn.invars[0].aval.shape[d] for d in lc))
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            return float(out * math.prod(rhs) / rhs[compat.conv_params(eqn).rhs_spec[0]])
    except compat.Unsupported:
        return float(out)  # an estimate only: one per output entry
    subs = list(compat.subjaxprs(compat.params(eqn)))
    if subs:
        inner = max(sum(work(e) for e in compat.open_jaxpr(s)[0].eqns) for s in subs)
        return float(inner * compat.scan_length(eqn))
    return float(out)


def dense_work(closed, flat, leaves: Sequence[int]) -> tuple[float, list[tuple[Any, float]]]:
    """Work of one perturbed evaluation of the group ``leaves`` (every leaf carrying a change,
    as in the engine) where the change does not stay small, and the equations where it is
    dense, in order; found by tracing the delta interpreter (nothing is compiled or run)."""
    w, log, _ = measure(closed, flat, leaves)
    return w, log


def measure(closed, flat, leaves: Sequence[int]) -> tuple[float, list[tuple[Any, float]], float]:
    """``dense_work``, and the work of the grouped convolutions vmap makes of the traced
    delta program (``grouped_work``: its convolutions whose input and kernel both move with
    the perturbation)."""
    log: list[tuple[Any, float]] = []
    token = _DENSE_LOG.set(log)
    leaves = list(leaves)
    try:
        sizes = [math.prod(jnp.shape(flat[g])) for g in leaves]
        traced = jax.make_jaxpr(
            lambda i, v: perturbed_cost(
                closed.jaxpr, closed.consts, flat, leaves, sizes, i, v, [flat[g] for g in leaves]
            )
        )(np.int32(0), jnp.zeros((), jnp.result_type(flat[leaves[0]])))
    finally:
        _DENSE_LOG.reset(token)
    return sum(w for _, w in log), log, grouped_work(traced.jaxpr, range(len(traced.jaxpr.invars)))


def grouped_work(jaxpr, moving: Sequence[int]) -> float:
    """Work (``work``) of the convolutions of ``jaxpr`` whose input and kernel both depend on
    the inputs at positions ``moving``: under vmap over those inputs each becomes a grouped
    convolution with one group per perturbation, which XLA:CPU runs hundreds of times slower
    than its multiply-adds suggest (a (3, 3, 8, 8) conv_transpose kernel: 13 s per 512
    perturbations, against 0.2 s for the whole cost under vmap). Calls are followed into their
    bodies; any other body (a loop, a branch) is taken to depend wholly on a moving input."""
    return _grouped(jaxpr, {v for k, v in enumerate(jaxpr.invars) if k in set(moving)})[0]


def _grouped(jaxpr, moving: set) -> tuple[float, list[bool]]:
    total = 0.0
    for eqn in jaxpr.eqns:
        dep = [not isinstance(v, jex.Literal) and v in moving for v in eqn.invars]
        if not any(dep):
            continue
        outs = [True] * len(eqn.outvars)
        try:
            call = compat.call_params(eqn) if eqn.primitive.name in _CALLS else None
        except compat.Unsupported:
            call = None
        if call is not None:
            inner = {v for v, d in zip(call.body.invars, dep[call.skip :]) if d}
            w, outs = _grouped(call.body, inner)
            total += w
        elif eqn.primitive.name == "conv_general_dilated" and all(dep[:2]):
            total += work(eqn)
        else:
            for sub in compat.subjaxprs(compat.params(eqn)):
                body = compat.open_jaxpr(sub)[0]
                total += _grouped(body, set(body.invars))[0] * max(1, compat.scan_length(eqn))
        moving.update(v for v, d in zip(eqn.outvars, outs) if d)
    return total, [not isinstance(v, jex.Literal) and v in moving for v in jaxpr.outvars]


def _eval_eqn(eqn, bases, ds):
    if not eqn.outvars:  # jax.debug.print and other output-less callbacks: see the docstring
        return []
    if all(d is None for d in ds):
        return [(b, None) for b in _bind(eqn, *bases)]
    try:
        got = _inlined(eqn, bases, ds)
    except compat.Unsupported:  # params this JAX lays out otherwise: see ``fallbacks``
        return _whole(eqn, bases, ds, None)
    if got is not None:
        return got
    out_base = _bind(eqn, *bases)
    try:
        got = _rules(eqn, bases, ds, out_base)
    except compat.Unsupported:
        got = None
    return got if got is not None else _whole(eqn, bases, ds, out_base)


def _inlined(eqn, bases, ds):
    """Loops and calls whose bodies are interpreted; None for other equations."""
    name = eqn.primitive.name
    if name == "scan" and not compat.split_transpose(eqn):
        scan = compat.scan_params(eqn)  # unknown params: evaluated whole (raises first)
        if _DENSE_LOG.get() is not None and not MEASURE_SCAN_BODIES:
            # Measuring (``dense_work``): the rule carries every inexact output densely and logs
            # the scan as a whole, so its outputs stand in for it without tracing its body
            # through the interpreter (0.1 s per trace of a GRU: most of a cold plan).
            return [
                (b, jnp.zeros(jnp.shape(b), jnp.result_type(b)) if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None)
                for b, v in zip(_bind(eqn, *bases), eqn.outvars)
            ]
        return _scan_rule(eqn, scan, bases, ds)
    if name in _CALLS:
        call = compat.call_params(eqn)
        return eval_delta(call.body, list(call.consts), bases[call.skip :], ds[call.skip :])
    return None


def _rules(eqn, bases, ds, out_base):
    """The delta rules (see the module docstring); None where none applies."""
    name = eqn.primitive.name
    onehots = [i for i, d in enumerate(ds) if isinstance(d, OneHot)]
    live = [i for i, d in enumerate(ds) if d is not None]
    out_aval = eqn.outvars[0].aval
    # One-hot rules.
    if len(live) == 1 and onehots:
        i = live[0]
        oh = ds[i]
        shape_i = jnp.shape(bases[i])
        if name == "dot_general" and not any(compat.dot_dimension_numbers(eqn)[1]):
            return [(out_base[0], _dot_onehot(eqn, bases, ds, i))]
        if name in _ELEMENTWISE and not eqn.primitive.multiple_results and tuple(out_aval.shape) == tuple(shape_i):
            if all(jnp.ndim(b) == 0 or tuple(jnp.shape(b)) == tuple(shape_i) for b in bases):
                at = [_at(b, oh.index) for b in bases]
                moved = list(at)
                moved[i] = at[i] + jnp.asarray(oh.delta, jnp.result_type(at[i]))
                new = _bind(eqn, *moved)[0]
                old = _bind(eqn, *at)[0]
                if jnp.issubdtype(out_aval.dtype, jnp.inexact):
                    return [(out_base[0], OneHot(oh.index, new - old))]
        if name == "reduce_sum" and len(bases) == 1:
            axes = compat.reduce_axes(eqn)
            if len(axes) == len(shape_i):
                return [(out_base[0], jnp.asarray(oh.delta, out_aval.dtype))]
            p = jnp.unravel_index(oh.index, shape_i)
            keep = [p[d] for d in range(len(shape_i)) if d not in axes]
            return [
                (out_base[0], OneHot(jnp.ravel_multi_index(tuple(keep), tuple(out_aval.shape), mode="clip"), oh.delta))
            ]
        if name in ("reshape", "squeeze", "expand_dims") and len(bases) == 1:
            return [(out_base[0], oh)]
        if name == "transpose":
            perm = compat.permutation(eqn)
            return [(out_base[0], _reindex(oh, shape_i, tuple(out_aval.shape), perm))]
        if name == "conv_general_dilated" and _plain_conv(eqn):
            return [(out_base[0], _conv_onehot(eqn, bases, oh, i))]
        wide = [k for k, d in enumerate(shape_i) if d != 1]
        if name == "broadcast_in_dim" and len(wide) == 1:
            axis = compat.broadcast_dimensions(eqn)[wide[0]]  # a bias: one entry moves a whole slab
            rest = tuple(d for k, d in enumerate(out_aval.shape) if k != axis)
            if out_aval.shape[axis] == shape_i[wide[0]]:
                return [(out_base[0], Slab(axis, oh.index, jnp.full(rest, oh.delta, out_aval.dtype)))]
    if len(live) == 1 and isinstance(ds[live[0]], Slab):
        got = _slab_rule(eqn, name, bases, ds, live[0], out_base)
        if got is not None:
            return got
    if len(live) == 1 and isinstance(ds[live[0]], Strided):
        got = _strided_rule(eqn, name, bases, ds, live[0], out_base)
        if got is not None:
            return got
    if len(live) > 1 and all(isinstance(ds[k], Slab) for k in live):
        got = _same_slab_rule(eqn, name, bases, ds, live, out_base)
        if got is not None:
            return got
    # Linear rules on dense deltas.
    if name in _LINEAR_UNARY and len(live) == 1 and live[0] == 0 and _is_linear(eqn, bases[0]):
        d = _dense(bases[0], ds[0])
        return [(out_base[0], _bind(eqn, d, *bases[1:])[0])]
    if name in ("add", "sub", "add_any") and len(bases) == 2:
        a, b = (_dense(bases[k], ds[k]) if ds[k] is not None else None for k in range(2))
        if a is None:
            d = -b if name == "sub" else b
        elif b is None:
            d = a
        else:
            d = a - b if name == "sub" else a + b
        return [(out_base[0], jnp.broadcast_to(d, out_aval.shape).astype(out_aval.dtype))]
    if name == "mul" and len(live) == 1:
        k = live[0]
        d = _dense(bases[k], ds[k])
        return [(out_base[0], d * bases[1 - k])]
    if name == "dot_general" and len(live) == 2:
        return [(out_base[0], _bilinear(eqn, bases, ds))]
    if name == "dot_general" and len(live) == 1:
        args = list(bases)
        args[live[0]] = _dense(bases[live[0]], ds[live[0]])
        return [(out_base[0], _bind(eqn, *args)[0])]
    if name == "select_n" and ds[0] is None:
        cases = [_dense(b, d) for b, d in zip(bases[1:], ds[1:])]
        return [(out_base[0], _bind(eqn, bases[0], *cases)[0])]
    return None


def _whole(eqn, bases, ds, out_base):
    """The equation evaluated whole at base + delta; the delta is what changed: f(x + Δ) − f(x)."""
    if out_base is None:
        out_base = _bind(eqn, *bases)
    full = _bind(eqn, *[b if d is None else b + _dense(b, d) for b, d in zip(bases, ds)])
    out = []
    for fb, ob, var in zip(full, out_base, eqn.outvars):
        if jnp.issubdtype(var.aval.dtype, jnp.inexact):
            out.append((ob, fb - ob))
        else:  # integer / boolean outputs: carry the perturbed value itself as the base
            out.append((fb, None))
    return out


def _is_linear(eqn, operand) -> bool:
    """Whether applying the primitive to the change alone is exact: casts must widen floats."""
    if eqn.primitive.name != "convert_element_type":
        return True
    src, dst = jnp.result_type(operand), eqn.outvars[0].aval.dtype
    return (
        jnp.issubdtype(src, jnp.floating)
        and jnp.issubdtype(dst, jnp.floating)
        and jnp.finfo(dst).bits >= jnp.finfo(src).bits
        and jnp.finfo(dst).nmant >= jnp.finfo(src).nmant
    )


# What each rule reads of its equation's params, as ``fallbacks`` checks it without running.
_READERS = {
    "scan": compat.scan_params,
    "dot_general": compat.dot_dimension_numbers,
    "conv_general_dilated": compat.conv_params,
    "reduce_sum": compat.reduce_axes,
    "transpose": compat.permutation,
    "broadcast_in_dim": compat.broadcast_dimensions,
    **{name: compat.call_params for name in _CALLS},
}


def fallbacks(jaxpr) -> tuple[str, ...]:
    """The equations of ``jaxpr`` (through the calls and loop bodies the interpreter enters)
    whose params the delta rules cannot read on this JAX, as 'primitive (why)' once each: the
    interpreter evaluates those whole (f(x + Δ) − f(x)) where a change reaches them.
    Structural: nothing is traced."""
    found: dict[str, None] = {}

    def walk(j) -> None:
        for eqn in j.eqns:
            reader = _READERS.get(eqn.primitive.name)
            if reader is None or (eqn.primitive.name == "scan" and compat.split_transpose(eqn)):
                continue
            try:
                got = reader(eqn)
            except compat.Unsupported as e:
                found.setdefault(e.short, None)
                continue
            if isinstance(got, (compat.ScanParams, compat.CallParams)):
                walk(got.body)

    walk(jaxpr)
    return tuple(found)


MSG_FALLBACKS = "evaluated whole, params unknown to jgradcheck on jax {version}: {where}"


def fallback_note(jaxpr) -> str:
    """One line of the report naming ``fallbacks(jaxpr)``, or "" when there are none."""
    where = fallbacks(jaxpr)
    return MSG_FALLBACKS.format(version=jax.__version__, where=", ".join(where)) if where else ""


def perturbed_cost(jaxpr, consts, args, group_invars, sizes, index, value, bases):
    """J with entry ``index`` of the group's concatenated invars set to ``value``: J(θ) + ΔJ."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    deltas = [None] * len(args)
    for pos, off, size, base in zip(group_invars, offsets, sizes, bases):
        inside = (index >= off) & (index < off + size)
        local = jnp.clip(index - off, 0, size - 1)
        current = base.reshape(-1)[local]
        delta = jnp.where(inside, jnp.asarray(value, base.dtype) - current, jnp.zeros((), base.dtype))
        deltas[pos] = OneHot(local, delta)
    ((b, d),) = eval_delta(jaxpr, consts, args, deltas)
    return b if d is None else b + _dense(b, d)


# The rules for convolutions, products changed on both sides and loop bodies (they use the
# interpreter above, so they are imported last).
from jgradcheck._src.delta_rules import (  # noqa: E402
    _bilinear,
    _channel_rule_fits,
    _conv_onehot,
    _plain_conv,
    _same_slab_rule,
    _scan_rule,
    _slab_rule,
    _strided_rule,
)
