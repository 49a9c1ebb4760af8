"""Effects and host callbacks in a cost that is evaluated 2n times.

Applied by ``clean`` before either strategy evaluates the cost:

* equations with no outputs (``jax.debug.print``, ``jax.debug.callback``, an ``io_callback``
  that returns nothing) are dropped from the 2n perturbed evaluations, inside loop and cond
  bodies too: they would run once per chunk of perturbations, in no meaningful order. They
  still run where your own code evaluates the cost (your gradient, called once by the check);
* ``io_callback`` with results is evaluated as a pure function of its inputs, one call per
  perturbation (``vmap_method="sequential"``), and its ordering is dropped: batched
  perturbations have no order to keep;
* ``pure_callback`` results are cast to the declared dtypes (a callback written for float32
  returns float32 arrays after the check promoted its inputs to float64), and a callback that
  declared no ``vmap_method`` is called once per perturbation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

from jgradcheck._src import compat


@functools.cache
def _pure_callback():
    """The ``pure_callback`` primitive and the params this JAX gives it, found through the
    public API (versions add params: 0.4's ``vectorized``)."""
    closed = jax.make_jaxpr(
        lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct((), np.float32), x, vmap_method="sequential")
    )(np.float32(0))
    eqn = closed.jaxpr.eqns[0]
    return eqn.primitive, dict(compat.params(eqn))


class _CastResults:
    """A host callback whose results are cast to the dtypes it declared.

    Why: under the check's float64 promotion a callback written for float32 still returns
    float32 arrays, and JAX rejects results that differ from the declared dtype.
    """

    def __init__(self, callback, avals):
        self.callback, self.avals = callback, tuple(avals)

    def __call__(self, *args):
        out = self.callback(*args)
        return tuple(np.asarray(o, dtype=a.dtype) for o, a in zip(out, self.avals))


def _clean_sub(value):
    if isinstance(value, jex.ClosedJaxpr):  # from jax 0.12 every Jaxpr: its consts attached
        new = clean(value)
        return new, new is not value
    if isinstance(value, jex.Jaxpr):
        new = clean(jex.ClosedJaxpr(value, ())).jaxpr
        return new, new is not value
    if isinstance(value, tuple) and value and all(isinstance(v, jex.ClosedJaxpr) for v in value):
        got = [_clean_sub(v) for v in value]
        return tuple(g for g, _ in got), any(c for _, c in got)
    return value, False


def clean(closed):
    """``closed`` ready for batched perturbed evaluation (see the module docstring): equations
    without outputs dropped, ``io_callback`` as a pure callback, callback results cast."""
    eqns = []
    changed = False
    for eqn in closed.jaxpr.eqns:
        name = eqn.primitive.name
        if not eqn.outvars:
            changed = True
            continue
        params = dict(compat.params(eqn))
        sub_changed = False
        for k, v in params.items():
            params[k], c = _clean_sub(v)
            sub_changed |= c
        if name in ("pure_callback", "io_callback"):
            callback, avals, sharding, vmap_method = compat.callback_params(eqn)
            primitive, template = _pure_callback()
            new = compat.pure_callback_params(
                template,
                callback=_CastResults(callback, avals),
                result_avals=avals,
                sharding=sharding,
                vmap_method=vmap_method or "sequential",
            )
            eqn = eqn.replace(primitive=primitive, params=new, effects=frozenset())
            changed = True
        elif sub_changed:
            effects = frozenset().union(*(getattr(v, "effects", frozenset()) for v in compat.subjaxprs(params)))
            eqn = eqn.replace(params=params, effects=effects if eqn.effects else frozenset())
            changed = True
        eqns.append(eqn)
    if not changed:
        return closed
    effects = frozenset().union(*(e.effects for e in eqns))
    j = closed.jaxpr
    return jex.ClosedJaxpr(jex.Jaxpr(j.constvars, j.invars, j.outvars, eqns, effects, j.debug_info), closed.consts)


def callbacks(jaxpr) -> tuple[Any, ...]:
    """The host functions a jaxpr calls: its printed text shows their addresses masked, so two
    programs with the same text may call different functions."""
    out: list[Any] = []
    for eqn in jaxpr.eqns:
        cb = compat.params(eqn).get("callback")
        if cb is not None:
            out.append(getattr(cb, "callback_func", cb))
        for sub in compat.subjaxprs(compat.params(eqn)):
            out.extend(callbacks(compat.open_jaxpr(sub)[0]))
    return tuple(out)
