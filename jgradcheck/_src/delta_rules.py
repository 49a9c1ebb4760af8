"""Delta rules for convolutions, slabs (one row or channel), products changed on both sides, and ``scan`` bodies.

Part of the delta interpreter (``delta.py``, whose docstring lists what each rule keeps small).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat
from jgradcheck._src.delta import (  # noqa: F401
    _DENSE_LOG,
    _ELEMENTWISE,
    _FOLD,
    OneHot,
    Slab,
    Strided,
    _bind,
    _dense,
    _eval_eqn,
    _take,
    eval_delta,
    folded,
)


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


# The kernel-slice rule sums one term per kernel position, unrolled: past this many positions
# (a long 1-D kernel, a 7x7x7 one) it compiles slower than the single-channel convolution.
MAX_POSITIONS = 64


def _windows_fit(eqn) -> bool:
    """Whether a convolution's change can be read as windows of one input channel: a non-empty
    output. An input dilation (a transposed convolution) is the interior padding of
    ``_canonical``: the windows read the dilated channel as the convolution does."""
    conv = compat.conv_params(eqn)
    shape = eqn.outvars[0].aval.shape
    return all(shape[a] > 0 for a in conv.out_spec[2:])


def _channel_rule_fits(eqn, bases) -> bool:
    """Whether ``_channel_conv`` takes a change in one input channel of this convolution: a
    non-empty output and a kernel of at most ``MAX_POSITIONS`` positions."""
    rhs_spec = compat.conv_params(eqn).rhs_spec
    positions = math.prod(jnp.shape(bases[1])[a] for a in rhs_spec[2:])
    return _windows_fit(eqn) and positions <= MAX_POSITIONS


def _plain_conv(eqn) -> bool:
    """A convolution without feature or batch groups (each output channel reads every input
    channel through its own kernel slice), the case the one-hot and slab rules cover."""
    conv = compat.conv_params(eqn)
    return conv.feature_group_count == 1 and conv.batch_group_count == 1


def _conv_onehot(eqn, bases, oh: OneHot, side: int):
    """Δ of a convolution when one kernel entry (side 1) or one input entry (side 0) moves.

    A kernel entry (spatial k, in-channel c, out-channel o) changes output channel o only, by
    δ times input channel c seen through a kernel that is one at k: the channel's window at k
    (``_shifted_channel``; for a transposed convolution, of the dilated channel). An
    input entry changes the outputs whose window covers it, through every kernel: the
    convolution of a one-hot image.
    """
    conv = compat.conv_params(eqn)
    lhs_spec, rhs_spec, out_spec = conv.lhs_spec, conv.rhs_spec, conv.out_spec
    lhs, rhs = bases
    dtype = eqn.outvars[0].aval.dtype
    if side == 0:
        d = _dense(lhs, oh)
        return _bind(eqn, d, rhs)[0].astype(dtype)
    p = jnp.unravel_index(oh.index, jnp.shape(rhs))
    if _windows_fit(eqn):
        return Slab(out_spec[1], p[rhs_spec[0]], _shifted_channel(eqn, lhs, p, oh.delta))
    channel = jax.lax.dynamic_slice_in_dim(lhs, p[rhs_spec[1]], 1, lhs_spec[1])
    shape = list(jnp.shape(rhs))
    shape[rhs_spec[0]] = shape[rhs_spec[1]] = 1
    at: list[Any] = list(p)
    at[rhs_spec[0]] = at[rhs_spec[1]] = 0
    kernel = jnp.zeros(shape, jnp.result_type(rhs)).at[tuple(at)].set(jnp.asarray(oh.delta, jnp.result_type(rhs)))
    one = _bind(eqn, channel, kernel)[0]
    return Slab(out_spec[1], p[rhs_spec[0]], jnp.squeeze(one, out_spec[1]).astype(dtype))


def _canonical(eqn, x, spec):
    """One channel of a convolution's input (``x``: its array without the feature axis) as
    (N, spatial...), dilated and padded as the convolution dilates and pads it (``lax.pad``'s
    interior padding is the input dilation: d − 1 zeros between entries, then the edges)."""
    rest = [a for a in range(len(spec)) if a != spec[1]]
    x = jnp.transpose(x, [rest.index(spec[0])] + [rest.index(a) for a in spec[2:]])
    conv = compat.conv_params(eqn)
    padding = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(conv.padding, conv.lhs_dilation)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), padding)


def _window(eqn, x, starts):
    """The entries of a padded channel (``_canonical``) that kernel position ``starts`` reads,
    for every output position: (N, output spatial...)."""
    conv = compat.conv_params(eqn)
    outs = [eqn.outvars[0].aval.shape[a] for a in conv.out_spec[2:]]
    strides, dilation = conv.window_strides, conv.rhs_dilation
    sizes = [jnp.shape(x)[0]] + [(o - 1) * st + 1 for o, st in zip(outs, strides)]
    at = [0] + [k * d for k, d in zip(starts, dilation)]
    x = (
        jax.lax.dynamic_slice(x, at, sizes)
        if any(not isinstance(k, int) for k in starts)
        else x[tuple(slice(a, a + n) for a, n in zip(at, sizes))]
    )
    return x[(slice(None),) + tuple(slice(None, None, st) for st in strides)]


def _to_output(eqn, x, features: bool):
    """(N, output spatial...[, O]) to the convolution's output layout (without its feature
    axis unless ``features``)."""
    out_spec = compat.conv_params(eqn).out_spec
    canonical = {out_spec[0]: 0, **{a: 1 + s for s, a in enumerate(out_spec[2:])}}
    if features:
        canonical[out_spec[1]] = len(out_spec) - 1
    return jnp.transpose(x, [canonical[a] for a in range(len(out_spec)) if a in canonical])


def _shifted_channel(eqn, lhs, p, delta):
    """δ times input channel ``p[in]`` as the kernel position ``p[spatial]`` sees it: the
    input padded as the convolution pads it, sliced from that position with the window
    strides. Under ``vmap`` this is a gather of one output channel's worth of entries, where a
    convolution with a per-perturbation kernel would become a grouped convolution (on CPU as
    slow per perturbation as the full one)."""
    conv = compat.conv_params(eqn)
    lhs_spec, rhs_spec = conv.lhs_spec, conv.rhs_spec
    x = jax.lax.dynamic_index_in_dim(lhs, p[rhs_spec[1]], lhs_spec[1], keepdims=False)
    x = _window(eqn, _canonical(eqn, x, lhs_spec), [p[a] for a in rhs_spec[2:]])
    acc = conv.preferred_element_type or jnp.result_type(lhs, delta)
    x = _to_output(eqn, x.astype(acc) * jnp.asarray(delta).astype(acc), False)
    return x.astype(eqn.outvars[0].aval.dtype)


def _channel_conv(eqn, values, kernel_in, index):
    """Δ of a convolution whose input changes in one channel (``values``, the input's shape
    without its feature axis): every output channel changes, through that channel's kernel
    slice only. Computed as a sum over kernel positions of the channel's window there times
    the kernel's (O,) vector there: under ``vmap`` one fused loop, where a convolution would
    become a grouped one and a product a batched small one (on CPU 2-3x slower per
    perturbation, and the grouped convolution about as slow as the full one)."""
    conv = compat.conv_params(eqn)
    lhs_spec, rhs_spec = conv.lhs_spec, conv.rhs_spec
    x = _canonical(eqn, values, lhs_spec)
    kernel = jax.lax.dynamic_index_in_dim(kernel_in, index, rhs_spec[1], keepdims=False)
    rest = [a for a in range(len(rhs_spec)) if a != rhs_spec[1]]
    kernel = jnp.transpose(kernel, [rest.index(a) for a in rhs_spec[2:]] + [rest.index(rhs_spec[0])])
    acc = conv.preferred_element_type or jnp.result_type(values, kernel)
    x, kernel = x.astype(acc), kernel.astype(acc)
    out = sum(_window(eqn, x, list(k))[..., None] * kernel[k] for k in np.ndindex(*jnp.shape(kernel)[:-1]))
    return _to_output(eqn, out, True).astype(eqn.outvars[0].aval.dtype)


def _scan_rule(eqn, scan: compat.ScanParams, bases, ds):
    """A scan evaluated on perturbed values: the carry holds base + Δ, the body's dense changes
    are folded into their values as they form (``delta._FOLD``), and only sparse changes (a
    weight entry's one-hot, a slab) travel as changes, through the rules that keep them small.
    The loop's constants (its weights) stay shared and unbatched; the change is taken out at the
    outputs only, as (perturbed − base) against the scan evaluated once on the bases.

    Why: a change carried as a dense delta evaluates every gate as f(b + Δ) − f(b), and a
    product changed on both sides as three products: 3-4x the elementwise work of J per
    perturbation, where the perturbed values need it once. Carrying values costs no precision
    the delta form kept: after one step the carried change is dense, each step's
    f(b + Δ) − f(b) already rounds at the scale of f(b), as the value does. Where every input's
    change is exactly zero (another leaf's entry in a shared program), the outputs' change is
    exactly zero, as in the delta form, not the round-off between two evaluations.
    """
    n_c, n_carry = scan.num_consts, scan.num_carry
    consts_b, carry_b, xs_b = bases[:n_c], bases[n_c : n_c + n_carry], bases[n_c + n_carry :]
    consts_d, carry_d, xs_d = ds[:n_c], ds[n_c : n_c + n_carry], ds[n_c + n_carry :]
    out_base = _bind(eqn, *bases)
    changed = _any_change(ds)

    # Constants: a sparse change stays one (the rules keep a weight entry's change small); a
    # dense one is folded in (one product with the perturbed weight, not two).
    consts = [
        (b, d) if d is None or isinstance(d, _SPARSE) else (folded(b, d), None) for b, d in zip(consts_b, consts_d)
    ]
    carry = [folded(b, d) for b, d in zip(carry_b, carry_d)]
    # Inputs: a slab across the scanned axis is a slab of every step; anything else is folded.
    xs: list[Any] = []
    xs_slabs: list[tuple[int, Any, Any] | None] = []
    for b, d in zip(xs_b, xs_d):
        if isinstance(d, Slab) and d.axis > 0:
            xs.append(b)
            xs_slabs.append((d.axis - 1, d.index, d.values))
        else:
            xs.append(folded(b, d))
            xs_slabs.append(None)
    carry_types = [v.aval.dtype for v in eqn.outvars[:n_carry]]
    # What differs per perturbation inside the body (``delta._eval_folding``): the carry, and
    # the constants and inputs whose change was folded in.
    moving_consts = [b for (b, d), d0 in zip(consts, consts_d) if d0 is not None and d is None]
    xs_moving = [s is None and d is not None for s, d in zip(xs_slabs, xs_d)]

    def step(carry, x):
        x_vals, x_slabs = x
        x_ds = [None if s is None else Slab(s[0], s[1], v) for s, v in zip(xs_slabs, x_slabs)]
        moving = {id(v): v for v in [*carry, *moving_consts]}
        moving.update((id(v), v) for v, m in zip(x_vals, xs_moving) if m)
        token = _FOLD.set(moving)
        try:
            outs = eval_delta(
                scan.body,
                list(scan.consts),
                [*(b for b, _ in consts), *carry, *x_vals],
                [*(d for _, d in consts), *([None] * n_carry), *x_ds],
            )
        finally:
            _FOLD.reset(token)
        values = [folded(b, d) for b, d in outs]
        new_carry = [jnp.asarray(v, dtype=t) for v, t in zip(values[:n_carry], carry_types)]
        return new_carry, values[n_carry:]

    slab_values = [None if s is None else s[2] for s in xs_slabs]
    token = _DENSE_LOG.set(None)  # the scan's work is logged as a whole, by eval_delta
    try:
        carry_p, ys_p = jax.lax.scan(
            step, carry, (xs, slab_values), length=scan.length, reverse=scan.reverse, unroll=scan.unroll
        )
    finally:
        _DENSE_LOG.reset(token)
    out: list[tuple[Any, Any]] = []
    for var, base, value in zip(eqn.outvars, out_base, [*carry_p, *ys_p]):
        if jnp.issubdtype(var.aval.dtype, jnp.inexact):
            d = value.astype(jnp.result_type(base)) - base
            out.append((base, jnp.where(changed, d, jnp.zeros((), d.dtype))))
        else:  # integer / boolean outputs: the perturbed value is the base, as in ``_whole``
            out.append((jnp.where(changed, value, base), None))
    return out


_SPARSE = (OneHot, Slab, Strided)


def _any_change(ds):
    """Whether any of the changes ``ds`` is nonzero (a NaN counts): a traced boolean."""
    flags = []
    for d in ds:
        if d is None:
            continue
        if isinstance(d, OneHot):
            flags.append(jnp.asarray(d.delta) != 0)
        elif isinstance(d, (Slab, Strided)):
            flags.append(jnp.any(d.values != 0))
        else:
            flags.append(jnp.any(d != 0))
    return jnp.any(jnp.stack(flags)) if flags else jnp.asarray(False)


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


def _merged_into(old, new, axis):
    """The axis of ``new`` into which a reshape merges ``old``'s axes p..``axis`` (``axis`` the
    minor end, p < axis), all other axes unchanged; None for any other reshape."""
    for p in range(axis):
        if tuple(new) == tuple(old[:p]) + (math.prod(old[p : axis + 1]),) + tuple(old[axis + 1 :]):
            return p
    return None


def _strided_rule(eqn, name, bases, ds, i, out_base):
    """A matrix product that contracts a Strided change's axis reads every ``stride``-th row of
    the other operand only: ``(B, M·C) @ (M·C, K)`` with the change in channel c is
    ``(B, M) @ (M, K)`` against rows c, c + C, ... Computed as a broadcast product and a sum:
    under ``vmap`` a batched small matmul runs far slower on CPU than the fused loop. None for
    other products (the change is then made dense)."""
    st: Strided = ds[i]
    if name != "dot_general" or any(compat.dot_dimension_numbers(eqn)[1]):
        return None
    (lc, rc), _ = compat.dot_dimension_numbers(eqn)
    other = bases[1 - i]
    if len(lc) != 1 or jnp.ndim(other) != 2 or jnp.ndim(bases[i]) != 2:
        return None
    my_c, other_c = (lc[0], rc[0]) if i == 0 else (rc[0], lc[0])
    if st.axis != my_c:
        return None
    shape = jnp.shape(other)
    split = shape[:other_c] + (shape[other_c] // st.stride, st.stride) + shape[other_c + 1 :]
    rows = jax.lax.dynamic_index_in_dim(other.reshape(split), st.index, other_c + 1, keepdims=False)
    rows = rows if other_c == 0 else rows.T  # (M, K)
    values = st.values if my_c == 1 else st.values.T  # (B, M)
    acc = compat.preferred_element_type(eqn) or jnp.result_type(values, rows)
    out = jnp.sum(values[:, :, None].astype(acc) * rows[None, :, :].astype(acc), axis=1)  # (B, K)
    out = out if i == 0 else out.T
    return [(out_base[0], out.astype(eqn.outvars[0].aval.dtype))]


def _slab_rule(eqn, name, bases, ds, i, out_base):
    """Rules that keep a Slab sparse, or turn it into a small dense change; None if none fits."""
    sl: Slab = ds[i]
    out_aval = eqn.outvars[0].aval
    shape_i = tuple(jnp.shape(bases[i]))
    out_shape = tuple(out_aval.shape)
    if name in ("add", "sub") and len(out_shape) == len(shape_i) and shape_i[sl.axis] == out_shape[sl.axis]:
        # The slab operand may be broadcast along its other (size-1) axes: a bias.
        values = -sl.values if (name == "sub" and i == 1) else sl.values
        rest = tuple(d for k, d in enumerate(out_shape) if k != sl.axis)
        return [(out_base[0], Slab(sl.axis, sl.index, jnp.broadcast_to(values, rest).astype(out_aval.dtype)))]
    if name in _ELEMENTWISE and not eqn.primitive.multiple_results and tuple(out_aval.shape) == shape_i:
        if all(jnp.ndim(b) == 0 or tuple(jnp.shape(b)) == shape_i for b in bases):
            at = [b if jnp.ndim(b) == 0 else _take(b, sl.axis, sl.index) for b in bases]
            moved = list(at)
            moved[i] = at[i] + sl.values.astype(jnp.result_type(at[i]))
            if jnp.issubdtype(out_aval.dtype, jnp.inexact):
                return [(out_base[0], Slab(sl.axis, sl.index, _bind(eqn, *moved)[0] - _bind(eqn, *at)[0]))]
    if name == "dot_general" and not any(compat.dot_dimension_numbers(eqn)[1]):
        (lc, rc), _ = compat.dot_dimension_numbers(eqn)
        my_c, other_c = (list(lc), list(rc)) if i == 0 else (list(rc), list(lc))
        other = bases[1 - i]
        dt = out_aval.dtype
        if sl.axis in my_c:  # the slab's axis is summed over: one slice of the other operand
            k = my_c.index(sl.axis)
            other_slice = _take(other, other_c[k], sl.index)
            mc = [d - (d > sl.axis) for j, d in enumerate(my_c) if j != k]
            oc = [d - (d > other_c[k]) for j, d in enumerate(other_c) if j != k]
            if i == 0:
                dense = jax.lax.dot_general(sl.values, other_slice, ((mc, oc), ((), ())))
            else:
                dense = jax.lax.dot_general(other_slice, sl.values, ((oc, mc), ((), ())))
            return [(out_base[0], dense.astype(dt))]
        mc = [d - (d > sl.axis) for d in my_c]
        my_free = [d for d in range(len(shape_i)) if d not in my_c]
        pos = my_free.index(sl.axis)
        if i == 0:
            vals = jax.lax.dot_general(sl.values, other, ((mc, other_c), ((), ())))
            axis = pos
        else:
            vals = jax.lax.dot_general(other, sl.values, ((other_c, mc), ((), ())))
            axis = jnp.ndim(other) - len(other_c) + pos
        return [(out_base[0], Slab(axis, sl.index, vals.astype(dt)))]
    if name == "reduce_sum" and len(bases) == 1:
        axes = compat.reduce_axes(eqn)
        mapped = tuple(a - (a > sl.axis) for a in axes if a != sl.axis)
        vals = jnp.sum(sl.values, axis=mapped) if mapped else sl.values
        if sl.axis in axes:
            return [(out_base[0], vals.astype(out_aval.dtype))]
        return [(out_base[0], Slab(sl.axis - sum(a < sl.axis for a in axes), sl.index, vals))]
    if name == "reshape" and len(bases) == 1:
        axis = _kept_axis(shape_i, tuple(out_aval.shape), sl.axis)
        if axis is not None:
            rest = tuple(d for k, d in enumerate(out_aval.shape) if k != axis)
            return [(out_base[0], Slab(axis, sl.index, sl.values.reshape(rest)))]
        merged = _merged_into(shape_i, out_shape, sl.axis)
        if merged is not None:  # the slab's axis is the minor end of a flattened run of axes
            values_shape = out_shape[:merged] + (out_shape[merged] // shape_i[sl.axis],) + out_shape[merged + 1 :]
            return [(out_base[0], Strided(merged, sl.index, shape_i[sl.axis], sl.values.reshape(values_shape)))]
    if name == "conv_general_dilated" and _plain_conv(eqn):
        lhs_spec = compat.conv_params(eqn).lhs_spec
        if i == 0 and sl.axis == lhs_spec[1] and _channel_rule_fits(eqn, bases):
            return [(out_base[0], _channel_conv(eqn, sl.values, bases[1], sl.index))]
        if i == 0 and sl.axis == lhs_spec[1]:
            # Too many positions to unroll: the convolution of the change made dense, through the
            # shared kernel. Not the channel's kernel slice: that slice moves with the change, and
            # under vmap a per-perturbation kernel is a grouped convolution (on XLA:CPU hundreds
            # of times slower than the dense one: a conv_transpose check took minutes).
            return [(out_base[0], _bind(eqn, _dense(bases[0], sl), bases[1])[0])]
    if name == "transpose":
        perm = list(compat.permutation(eqn))
        inner = [p - (p > sl.axis) for p in perm if p != sl.axis]
        return [(out_base[0], Slab(perm.index(sl.axis), sl.index, jnp.transpose(sl.values, inner)))]
    return None
