"""Delta rules for convolutions, products changed on both sides, and ``scan`` bodies.

Part of the delta interpreter (``delta.py``, whose docstring lists what each rule keeps small).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jgradcheck._src.delta import _DENSE_LOG, _ELEMENTWISE, OneHot, Slab, _bind, _dense, _eval_eqn, _take, eval_delta  # noqa: F401


def _bilinear(eqn, bases, ds):
    """Δ(A·B) = ΔA·B + A·ΔB + ΔA·ΔB, each term by the single-change rules: the shared operand
    stays unbatched (a weight in a scan body next to a changed carry)."""
    a, b = bases
    da, db = ds
    terms = [
        _eval_eqn(eqn, [a, b], [da, None])[0][1],
        _eval_eqn(eqn, [a, b], [None, db])[0][1],
        _eval_eqn(eqn, [_dense(a, da), b], [None, db])[0][1],
    ]
    shape, dtype = eqn.outvars[0].aval.shape, eqn.outvars[0].aval.dtype
    return sum(jnp.broadcast_to(_dense(jnp.zeros(shape, dtype), t), shape) for t in terms)


def _kept_axis(old, new, axis):
    """The axis of ``new`` that is ``old``'s ``axis`` unchanged by a reshape, or None: the
    entries before it and after it must regroup among themselves."""
    before, after = math.prod(old[:axis]), math.prod(old[axis + 1 :])
    acc = 1
    for k, d in enumerate(new):
        if acc == before and d == old[axis] and math.prod(new[k + 1 :]) == after:
            return k
        acc *= d
    return None


def _plain_conv(eqn) -> bool:
    """A convolution without feature or batch groups (each output channel reads every input
    channel through its own kernel slice), the case the one-hot and slab rules cover."""
    return eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1


def _conv_onehot(eqn, bases, oh: OneHot, side: int):
    """Δ of a convolution when one kernel entry (side 1) or one input entry (side 0) moves.

    A kernel entry (spatial k, in-channel c, out-channel o) changes output channel o only, by
    δ times input channel c seen through a kernel that is one at k: a single-channel
    convolution instead of the full one. An input entry changes the outputs whose window
    covers it, through every kernel: the convolution of a one-hot image.
    """
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    lhs, rhs = bases
    dtype = eqn.outvars[0].aval.dtype
    if side == 0:
        d = _dense(lhs, oh)
        return _bind(eqn, d, rhs)[0].astype(dtype)
    p = jnp.unravel_index(oh.index, jnp.shape(rhs))
    channel = jax.lax.dynamic_slice_in_dim(lhs, p[rhs_spec[1]], 1, lhs_spec[1])
    shape = list(jnp.shape(rhs))
    shape[rhs_spec[0]] = shape[rhs_spec[1]] = 1
    at: list[Any] = list(p)
    at[rhs_spec[0]] = at[rhs_spec[1]] = 0
    kernel = jnp.zeros(shape, jnp.result_type(rhs)).at[tuple(at)].set(jnp.asarray(oh.delta, jnp.result_type(rhs)))
    one = _bind(eqn, channel, kernel)[0]
    return Slab(out_spec[1], p[rhs_spec[0]], jnp.squeeze(one, out_spec[1]).astype(dtype))


def _scan_rule(eqn, bases, ds):
    """A scan whose body is interpreted with deltas: the loop's constants (its weights) stay
    shared and unbatched, and the change travels through the carry as a dense delta.

    Why: re-evaluating the scan at base + Δ batches every weight the perturbation touches, so
    each step becomes many small batched products; carrying the change instead turns the step
    into products of one (perturbations × batch) matrix with the shared weights.
    """
    prm = eqn.params
    body, n_c, n_carry = prm["jaxpr"], prm["num_consts"], prm["num_carry"]
    consts_b, carry_b, xs_b = bases[:n_c], bases[n_c : n_c + n_carry], bases[n_c + n_carry :]
    consts_d, carry_d, xs_d = ds[:n_c], ds[n_c : n_c + n_carry], ds[n_c + n_carry :]
    inexact = [jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars]

    def dense(b, d, f):  # a fixed (strong) type per carry, as scan requires
        return jnp.asarray(_dense(b, d), dtype=jnp.result_type(b)) if f else None

    # A delta in any input may reach every inexact carry: carry those densely.
    carry_d = [dense(b, d, f) for b, d, f in zip(carry_b, carry_d, inexact[:n_carry])]
    xs_d = [None if d is None else _dense(b, d) for b, d in zip(xs_b, xs_d)]

    def step(carry, x):
        cb, cd = carry
        xb, xd = x
        outs = eval_delta(body.jaxpr, list(body.consts), [*consts_b, *cb, *xb], [*consts_d, *cd, *xd])
        new_cb = [b for b, _ in outs[:n_carry]]
        new_cd = [dense(b, d, f) for (b, d), f in zip(outs[:n_carry], inexact[:n_carry])]
        ys = outs[n_carry:]
        yd = [dense(b, d, f) for (b, d), f in zip(ys, inexact[n_carry:])]
        return (new_cb, new_cd), ([b for b, _ in ys], yd)

    token = _DENSE_LOG.set(None)  # the scan's work is logged as a whole, by eval_delta
    try:
        (cb, cd), (yb, yd) = _scan(step, carry_b, carry_d, xs_b, xs_d, prm)
    finally:
        _DENSE_LOG.reset(token)
    return list(zip(cb, cd)) + list(zip(yb, yd))


def _scan(step, carry_b, carry_d, xs_b, xs_d, prm):
    return jax.lax.scan(
        step,
        (list(carry_b), carry_d),
        (list(xs_b), xs_d),
        length=prm["length"],
        reverse=prm["reverse"],
        unroll=prm["unroll"],
    )


def _same_slab_rule(eqn, name, bases, ds, live, out_base):
    """An elementwise operation on several changes confined to the same slab (the same axis and
    the very same traced index: two values computed from one change, as x and x³ in GELU):
    the result changes in that slab only. None if the slabs may differ."""
    first: Slab = ds[live[0]]
    if any(ds[k].axis != first.axis or ds[k].index is not first.index for k in live):
        return None
    out_aval = eqn.outvars[0].aval
    shape = tuple(out_aval.shape)
    if name not in _ELEMENTWISE or eqn.primitive.multiple_results:
        return None
    if not jnp.issubdtype(out_aval.dtype, jnp.inexact):
        return None
    if not all(jnp.ndim(b) == 0 or tuple(jnp.shape(b)) == shape for b in bases):
        return None
    at = [b if jnp.ndim(b) == 0 else _take(b, first.axis, first.index) for b in bases]
    moved = list(at)
    for k in live:
        moved[k] = at[k] + ds[k].values.astype(jnp.result_type(at[k]))
    return [(out_base[0], Slab(first.axis, first.index, _bind(eqn, *moved)[0] - _bind(eqn, *at)[0]))]
