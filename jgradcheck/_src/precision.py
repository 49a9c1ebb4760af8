"""The precision J is computed in along each parameter's path, read from the cost's jaxpr.

A check promoted to float64 is only as fine as the narrowest arithmetic between a parameter and
J: ``jax.nn.dot_product_attention`` runs its softmax in float32 whatever its inputs are, a mixed-
precision layer casts to bfloat16, a user's ``astype(jnp.float32)`` stays as written. Along such a
path J's values are quantized at that dtype's spacing, and a finite difference over a step too
small for it reads two equal values of J as a derivative of 0. This module walks the traced cost
once (no compilation) and gives, per float leaf, the machine epsilon of the narrowest floating
dtype on any value that depends on it, and where that narrowing happens.

Data flow is tracked per equation: a value depends on a leaf if any input of its equation does.
Inside a sub-program (``pjit``, custom rules, ``scan``, ``while``, ``cond``) every input is taken to
depend on everything its equation's inputs depend on: conservative (a path may be called narrower
than it is, which only makes the step larger), never blind to a cast inside a loop body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat, numerics


@dataclasses.dataclass(frozen=True)
class PathPrecision:
    """Per float leaf: ``eps`` the machine epsilon of the narrowest float on its path to J (at
    least the check dtype's), and ``where`` that dtype and the primitive that produced it
    (``"bfloat16 (convert_element_type)"``), or ``None`` where the path is as fine as the check."""

    eps: tuple[float, ...]
    where: tuple[str | None, ...]


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
    """Every jaxpr among an equation's parameters (a ClosedJaxpr's ``.jaxpr``, tuples of branches)."""
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            inner = getattr(x, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out.append(inner)
            elif hasattr(x, "eqns") and hasattr(x, "invars"):
                out.append(x)
    return out


def _float_eps(aval: Any) -> float | None:
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return None
    try:
        return _EPS[dtype]
    except (KeyError, TypeError):
        pass
    try:
        eps = numerics.machine_eps(dtype) if np.issubdtype(dtype, np.inexact) or "float" in str(dtype) else None
    except (TypeError, ValueError):
        return None
    try:
        _EPS[dtype] = eps
    except TypeError:  # an unhashable dtype
        pass
    return eps


# Machine epsilon by dtype, for every value of every traced cost walked (jnp.finfo takes ~0.1 ms).
_EPS: dict[Any, float | None] = {}


def _walk(jaxpr: Any, deps_in: list[int], narrow: dict[int, tuple[float, str]]) -> list[int]:
    """Propagates dependency bitmasks through ``jaxpr`` and records, per leaf bit, the widest
    machine epsilon (narrowest float) seen on a dependent value. Returns the outputs' masks."""
    deps: dict[Any, int] = {}
    for v, d in zip(jaxpr.invars, deps_in):
        deps[v] = d
    for eqn in jaxpr.eqns:
        d = 0
        for v in eqn.invars:
            if not hasattr(v, "val"):  # a Literal has no dependence
                d |= deps.get(v, 0)
        if not d:
            continue
        for sub in _subjaxprs(eqn.params):
            # Positional where the arity matches (pjit, custom rules); else every input sees d.
            inner = (
                [deps.get(v, 0) if not hasattr(v, "val") else 0 for v in eqn.invars]
                if len(sub.invars) == len(eqn.invars)
                else [d] * len(sub.invars)
            )
            _walk(sub, inner, narrow)
        for v in eqn.outvars:
            deps[v] = d
            eps = _float_eps(getattr(v, "aval", None))
            if eps is None:
                continue
            bits = d
            while bits:
                low = bits & -bits
                i = low.bit_length() - 1
                if eps > narrow.get(i, (0.0, ""))[0]:
                    narrow[i] = (eps, f"{v.aval.dtype} ({eqn.primitive.name})")
                bits ^= low
    return [deps.get(v, 0) if not hasattr(v, "val") else 0 for v in jaxpr.outvars]


def path_precision(problem: Any) -> PathPrecision:
    """The narrowest float along each float leaf's path to J (cached on the problem).

    The first ``len(problem.floats)`` inputs of ``problem.trace`` are the float leaves, in order.
    """
    cached = problem.__dict__.get("_path_precision")
    if cached is not None:
        return cached
    n = len(problem.floats)
    base = numerics.machine_eps(problem.dtype)
    narrow: dict[int, tuple[float, str]] = {}
    jaxpr = problem.trace.jaxpr
    deps_in = [1 << i if i < n else 0 for i in range(len(jaxpr.invars))]
    try:
        _walk(jaxpr, deps_in, narrow)
    except Exception:  # an unfamiliar jaxpr: fall back to the check dtype (today's behaviour)
        narrow = {}
    eps, where = [], []
    for i in range(n):
        e, site = narrow.get(i, (0.0, ""))
        eps.append(max(base, e))
        where.append(site if e > base else None)
    out = PathPrecision(tuple(eps), tuple(where))
    problem.__dict__["_path_precision"] = out
    return out


def leaf_of(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """For positions in the concatenation of a group's raveled leaves: the position in ``group``
    of the leaf each falls in."""
    sizes = np.array([int(problem.floats[i].size) for i in group])
    return np.searchsorted(np.cumsum(sizes), np.asarray(idx), side="right")


def entry_eps(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: its leaf's path epsilon."""
    pp = path_precision(problem)
    leaf = leaf_of(problem, group, idx)
    return np.asarray([pp.eps[i] for i in group], np.float64)[leaf]


# Your gradient given as values in a narrower dtype than the check's (a float32 pytree from
# jax.grad, the classic flow of a precomputed gradient) is off by the rounding of the sums that
# made it: that grows with the terms summed (a batch mean of residuals that cancel after training),
# not with the gradient's own size. It is measured, not guessed: JAX's own gradient of the same
# cost in your dtype against the check's, times this margin (another summation order, your own
# backward pass, rounds differently but by about as much).
GRAD_ROUNDING_MARGIN = 4.0


def measured_grad_rounding(problem: Any) -> tuple[float, ...]:
    """Per float leaf: how far a gradient of J computed in the parameters' own dtypes is off.

    ``GRAD_ROUNDING_MARGIN`` times the largest difference, over the leaf, between ``jax.grad`` of
    the cost at the parameters in their own dtypes (float32, as you ran it) and at the check's
    dtype (cached on the problem). A cost ``jax.grad`` cannot differentiate gives 0: the
    ulp-based bound (``numerics.grad_rounding``) alone applies.
    """
    cached = problem.__dict__.get("_grad_rounding")
    if cached is None:
        try:
            cached = tuple(_measure(problem))
        except Exception:  # a cost jax.grad cannot take, or one that needs its own dtypes
            cached = (0.0,) * len(problem.floats)
        problem.__dict__["_grad_rounding"] = cached
    return cached


def _measure(problem: Any) -> list[float]:
    low = [jnp.dtype(d) for d in problem.orig_dtypes]
    narrow = max(low, key=lambda d: float(jnp.finfo(d).eps))
    wide64 = any(jnp.finfo(d).bits > 32 for d in low)

    from jgradcheck._src.vector import run_compiled  # vector imports the check, which imports this

    def grads(floats: list[Any], arg_floats: list[Any]) -> list[np.ndarray]:
        def cost(fl: list[Any], af: list[Any]) -> Any:
            args = problem.args_layout.merge(af, problem.arg_arrays)
            return problem.cost_fn(problem.layout.merge(fl, problem.arrays), *args)

        # Compiled once per traced program (the same cost checked again at new values reuses it),
        # not once per check as a jax.jit of a new closure would be.
        return [np.asarray(g, np.float64).ravel() for g in run_compiled(jax.grad(cost), floats, arg_floats)]

    with compat.enable_x64(True):
        fine = grads(list(problem.floats), list(problem.arg_floats))
    with compat.enable_x64(wide64):
        rough = grads(
            [jnp.asarray(f, d) for f, d in zip(problem.floats, low)],
            [jnp.asarray(a, narrow) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in problem.arg_floats],
        )
    out = []
    for f, r in zip(fine, rough):
        ok = np.all(np.isfinite(f)) and np.all(np.isfinite(r))
        # Never more than numerics.GRAD_REL_CAP of the leaf's largest entry: a float32 gradient off by
        # more is not rounding (a cost whose float32 and float64 runs differ in kind: other random
        # masks, another branch), and must not widen the tolerance that far.
        cap = numerics.GRAD_REL_CAP * float(np.max(np.abs(f), initial=0.0))
        out.append(min(GRAD_ROUNDING_MARGIN * float(np.max(np.abs(f - r), initial=0.0)), cap) if ok else 0.0)
    return out


def entry_grad_rounding(problem: Any, group: tuple[int, ...], idx: np.ndarray, grad_eps: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: the measured rounding of its leaf's gradient,
    where your gradient's dtype (``grad_eps``, per entry) is narrower than the check's; else 0."""
    narrower = np.asarray(grad_eps, np.float64) > numerics.machine_eps(problem.dtype)
    if not narrower.any():
        return np.zeros(np.asarray(idx).size)
    leaf = leaf_of(problem, group, idx)
    measured = measured_grad_rounding(problem)
    return np.where(narrower, np.asarray([measured[i] for i in group], np.float64)[leaf], 0.0)
