"""Which entries of a parameter leaf the cost can read at all, from the data it is given.

An embedding table is read only at the rows its tokens select: with a vocabulary of 32k and a
batch of a few hundred tokens, nearly every row is unread, and J(θ ± h·eᵢ) equals J(θ) bit for
bit at each of its entries. The engine evaluates none of them (their central difference is
exactly 0, so yours must be 0 there too). This module finds them, conservatively: a leaf
qualifies only when every use of it, through nested ``jit`` calls, is the operand of a
``gather`` whose indices depend on data alone (the args, integer leaves, constants), never on
a floating parameter. The indices are then concrete: that slice of J is computed (one small
compiled program per leaf, reused by re-checks), and the gather itself is applied to the entry
numbers 1..size instead of the leaf, so XLA's own semantics (clipping, fill for out-of-bounds
indices, any dimension numbers) say which entries it reads. Anything else (a second use of the leaf, a loop, a
custom rule, indices computed from parameters as in top-k routing) means every entry may be
read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jgradcheck._src import compat

# Calls whose body is a plain jaxpr run once: a use inside is followed into the body.
_CALLS = ("pjit", "jit", "closed_call", "core_call")


class _Unknown:
    """A value that depends on a floating parameter: not concrete."""


UNKNOWN = _Unknown()


class _Scope:
    """A jaxpr whose inputs are known lazily (``inputs(k)``), evaluated on demand (traced)."""

    def __init__(self, jaxpr: Any, consts: Sequence[Any], inputs: Any):
        self.jaxpr = jaxpr
        self.producer = {v: e for e in jaxpr.eqns for v in e.outvars}
        self.env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        self.position = {v: k for k, v in enumerate(jaxpr.invars)}
        self.inputs = inputs

    def value(self, var: Any) -> Any:
        """The concrete value of ``var``, or UNKNOWN."""
        if isinstance(var, jcore.Literal):
            return var.val
        if var in self.env:
            return self.env[var]
        if var in self.position:
            out = self.inputs(self.position[var])
        else:
            out = self._compute(var)
        self.env[var] = out
        return out

    def _compute(self, var: Any) -> Any:
        eqn = self.producer[var]
        if eqn.primitive.name in _CALLS:
            inner = _body(eqn)
            if inner is None:
                return UNKNOWN
            scope = _Scope(inner.body, inner.consts, lambda k, e=eqn: self.value(e.invars[k]))
            return scope.value(inner.body.outvars[eqn.outvars.index(var)])
        if compat.has_subjaxprs(eqn):
            return UNKNOWN  # loops, conditionals, custom rules: not followed
        args = [self.value(v) for v in eqn.invars]
        if any(a is UNKNOWN for a in args):
            return UNKNOWN
        subfuns, params = compat.bind_params(eqn)
        outs = eqn.primitive.bind(*subfuns, *args, **params)
        return outs[eqn.outvars.index(var)] if eqn.primitive.multiple_results else outs


def _body(eqn: Any) -> compat.CallParams | None:
    """A call's body, or None when this JAX lays out its params otherwise (not followed)."""
    try:
        return compat.call_params(eqn)
    except compat.Unsupported:
        return None


def _gathers(jaxpr: Any, var: Any) -> list[tuple[tuple[Any, ...], Any]] | None:
    """Every use of ``var`` as (the call equations leading to it, the gather equation), or None
    when some use is not a gather's operand. Structural: nothing is evaluated."""
    if var in jaxpr.outvars:
        return None
    found: list[tuple[tuple[Any, ...], Any]] = []
    for eqn in jaxpr.eqns:
        for k, v in enumerate(eqn.invars):
            if v is not var:
                continue
            if eqn.primitive.name in _CALLS:
                call = _body(eqn)
                if call is None or call.skip:
                    return None
                inner = call.body
                sub = _gathers(inner, inner.invars[k])
                if sub is None:
                    return None
                found += [((eqn, *calls), g) for calls, g in sub]
            elif eqn.primitive.name == "gather" and k == 0:
                found.append(((), eqn))
            else:
                return None
    return found


def _read_mask(scope: _Scope, uses: list[tuple[tuple[Any, ...], Any]], shape: tuple[int, ...]) -> Any:
    """Traced: a boolean mask of the entries the gathers read, or None (indices not data)."""
    size = math.prod(shape)
    ids = jnp.arange(1, size + 1, dtype=jnp.int32).reshape(shape)
    read = jnp.zeros(size, bool)
    for calls, eqn in uses:
        here = scope
        for call in calls:
            inner = _body(call)
            if inner is None:
                return None
            here = _Scope(inner.body, inner.consts, lambda j, e=call, s=here: s.value(e.invars[j]))
        indices = here.value(eqn.invars[1])
        if indices is UNKNOWN:
            return None
        params = dict(compat.params(eqn))
        if params.get("fill_value") is not None:
            params["fill_value"] = 0  # out-of-bounds slots then name no entry
        got = jax.lax.gather_p.bind(ids, indices, **params).reshape(-1)
        # Entry numbers 1..size mark what is read; fill values (0, or the lowest int) do not.
        hit = jnp.zeros(size + 1, bool).at[jnp.clip(got, 0, size)].set(True)[1:]
        read = read | hit
    return read


# Compiled discovery programs by (program key, leaf, data positions): a re-check with new data
# reruns them.
_PROGRAMS: dict[Any, Any] = {}


def unread_entries(
    key: Any, jaxpr: Any, consts: Sequence[Any], flat: Sequence[Any], floats: Sequence[int], leaf: int
) -> np.ndarray | None:
    """A boolean mask over the entries of input ``leaf`` that J never reads, or None when
    every entry may be read (or when finding out fails: the conservative answer).

    ``key`` identifies ``jaxpr`` (the engine's ``Program``); ``floats`` are the positions of
    the floating parameters in ``flat``: values computed from them are never concrete.
    """
    uses = _gathers(jaxpr, jaxpr.invars[leaf])
    if not uses:
        return None
    shape = tuple(np.shape(flat[leaf]))
    unknown = set(floats)
    known = [k for k in range(len(flat)) if k not in unknown]
    if math.prod(shape) >= 2**31 - 1:  # entry numbers are int32
        return None
    cache = (key, leaf, tuple(known))  # which inputs are data is not in the jaxpr's text
    if cache not in _PROGRAMS:
        if len(_PROGRAMS) >= 256:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))

        def discover(consts: Sequence[Any], data: Sequence[Any]) -> Any:
            env = dict(zip(known, data))
            scope = _Scope(jaxpr, consts, lambda k: env.get(k, UNKNOWN))
            return _read_mask(scope, uses, shape)

        _PROGRAMS[cache] = jax.jit(discover)
    try:
        read = _PROGRAMS[cache](list(consts), [flat[k] for k in known])
    except Exception:  # noqa: BLE001 - a primitive that cannot run here: assume all read
        return None
    if read is None:
        return None
    read = np.asarray(read)
    return None if read.all() else ~read
