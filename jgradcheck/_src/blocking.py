"""Warnings that are true: a ``stop_gradient`` or a custom rule is named only where it changes the derivative.

Finite differences see the function; ``jax.grad`` sees the function as its ``stop_gradient``
calls and custom rules reshape it. Where the two derivatives differ, a gradient that follows
JAX's semantics (``yours = jax.grad(cost_fn)``) cannot match the numerical one, and the check
says why. Where they agree (the max shift of a logsumexp: d max / dx times Σ softmax − 1 = 0,
a custom rule that is right), a warning would cry wolf.

So each site is tested the way chex's ``assert_numerical_grads`` does for the whole function:
``jax.grad`` of the cost at θ with the blocking removed (``stop_gradient`` as the identity, a
custom rule replaced by the function it decorates) against ``jax.grad`` of the cost as written.
A site whose removal changes some leaf's derivative by more than round-off is named, with its
source line and the leaves it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat
from jgradcheck._src.jaxpr_scan import MSG_RANDOM_DTYPE, _called_by_jax, _source, invisible_to_fd

MSG_STOP = (
    "cost_fn's jax.lax.stop_gradient at {where} changes jax.grad's derivative at these params (finite "
    "differences see through it, jax.grad does not) in {leaves}. If yours follows jax's semantics (e.g. "
    "yours = jax.grad(cost_fn)), expect a mismatch there; to check the math, remove that stop_gradient."
)
MSG_CUSTOM = (
    "cost_fn uses {kind} ({names}): its rule gives a derivative other than the function it decorates at "
    "these params, in {leaves}; finite differences follow the function, jax.grad the rule. A mismatch there "
    "means the rule disagrees with its function: check the rule, or (gradient clipping, straight-through "
    "estimators) expect it."
)
MSG_UNTESTED = (
    "cost_fn uses {what} at {where}, inside a loop or branch (scan, while, cond) where the check cannot "
    "remove it to see whether it changes the derivative. If it does and yours follows jax's semantics, "
    "expect a mismatch at the leaves that feed it."
)

_CUSTOM = {"custom_jvp_call": "custom_jvp", "custom_vjp_call": "custom_vjp", "custom_vjp_call_jaxpr": "custom_vjp"}
# At most this many sites are each removed alone (one gradient each); more are removed together.
MAX_SITES = 4
_INLINE = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"}


def _where(eqn: Any) -> str:
    """``file.py:12 (fn)`` of the user's line that made ``eqn``."""
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
    except Exception:  # noqa: BLE001 - JAX's private module moved: name no line
        frame = None
    if frame is None:
        return "an unknown line"
    return f"{frame.file_name.rsplit('/', 1)[-1]}:{frame.start_line} ({frame.function_name})"


class _Site:
    """One blocking equation: a user's stop_gradient or a custom rule of the user's."""

    def __init__(self, eqn: Any, kind: str, name: str, reachable: bool):
        self.eqn, self.kind, self.name, self.reachable = eqn, kind, name, reachable


def _sites(jaxpr: Any, reachable: bool = True) -> list[_Site]:
    """The blocking sites of a jaxpr; ``reachable``: the interpreter below can remove them."""
    out: list[_Site] = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "stop_gradient" and not _called_by_jax(eqn):
            out.append(_Site(eqn, "stop_gradient", "jax.lax.stop_gradient", reachable))
        elif name in _CUSTOM:
            src = _source(eqn)
            if src is not None:
                out.append(_Site(eqn, _CUSTOM[name], src, reachable))
            continue  # a rule's own body is not what jax.grad runs
        inline = reachable and name in _INLINE
        for sub in compat.subjaxprs(compat.params(eqn)):
            out += _sites(compat.open_jaxpr(sub)[0], inline)
    return out


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], drop: frozenset[int]) -> list[Any]:
    """Evaluates ``jaxpr`` with the equations in ``drop`` (by id) unblocked: stop_gradient as the
    identity, a custom rule as the function it decorates; calls (jit, remat) are inlined."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if type(v).__name__ == "Literal" else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        subs = list(compat.subjaxprs(compat.params(eqn)))
        if id(eqn) in drop and name == "stop_gradient":
            outs = invals
        elif id(eqn) in drop:  # a custom rule: the function it decorates
            body, body_consts = compat.open_jaxpr(_body(eqn))
            outs = _eval(body, body_consts, invals[len(invals) - len(body.invars) :], drop)
        elif name in _INLINE and len(subs) == 1:
            body, body_consts = compat.open_jaxpr(subs[0])
            outs = _eval(body, body_consts, invals, drop)
        else:
            subfuns, bind_params = _bind_params(eqn)
            outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _bind_params(eqn: Any) -> tuple[list[Any], dict[str, Any]]:
    """(sub-functions, params) to bind ``eqn``'s primitive with: jax 0.4 returns both, later jax the params."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], list):
        return got[0], dict(got[1])
    return [], dict(got)


def _body(eqn: Any) -> Any:
    for key in ("call_jaxpr", "fun_jaxpr"):
        sub = compat.params(eqn).get(key)
        if compat.is_jaxpr(sub):
            return sub
    raise KeyError("no body")


def _gradient(closed: Any, inputs: tuple, drop: frozenset[int]) -> list[np.ndarray]:
    """jax.grad of the traced cost with respect to the checked leaves, with ``drop`` unblocked."""
    floats, rest = inputs[0], [x for group in inputs[1:] for x in group]
    jaxpr, consts = compat.open_jaxpr(closed)

    def f(fl: list[Any]) -> Any:
        return _eval(jaxpr, consts, [*fl, *rest], drop)[0]

    return [np.asarray(g, np.float64) for g in jax.jit(jax.grad(f))(list(floats))]


def _changed(a: list[np.ndarray], b: list[np.ndarray], paths: Sequence[str], dtype: Any) -> list[str]:
    """The leaves whose derivative differs beyond round-off: √ε of the larger gradient's scale,
    below what any finite-difference check of that precision can resolve (an exact rewrite,
    the max shift of a logsumexp, differs by a few ε)."""
    tol = float(np.sqrt(np.finfo(dtype).eps))
    out = []
    for ga, gb, path in zip(a, b, paths):
        scale = max(float(np.max(np.abs(ga), initial=0.0)), float(np.max(np.abs(gb), initial=0.0)))
        if float(np.max(np.abs(ga - gb), initial=0.0)) > tol * scale + np.finfo(dtype).tiny:
            out.append(path)
    return out


def _names(paths: list[str], keep: int = 4) -> str:
    return ", ".join(paths[:keep]) + (f" and {len(paths) - keep} more" if len(paths) > keep else "")


def blocking_warnings(problem: Any, promoted_pytree: bool = False) -> tuple[str, ...]:
    """The report's warnings about what finite differences cannot see, each one true at θ.

    Args:
      problem: the prepared check (its traced cost, inputs, checked leaves' paths).
      promoted_pytree: the check runs in float64 and your gradient was given as a precomputed
        pytree (random draws in the cost then differ from those your gradient saw).

    Returns:
      One warning per stop_gradient that changes the derivative at θ (its line and the leaves it
      changes), one per kind of custom rule whose rule disagrees with its function there, and
      the dtype note on random draws; blocking that cannot be removed (inside a scan) is named
      as untested.
    """
    closed = problem.trace
    # Random draws are read from the program as you run it (a widened trace keeps them too).
    as_run = problem.user_trace if problem.user_trace is not None else closed
    out = [w for w in invisible_to_fd(as_run, promoted_pytree) if w == MSG_RANDOM_DTYPE]
    sites = _sites(closed.jaxpr)
    if not sites:
        return tuple(out)
    for site in (s for s in sites if not s.reachable):
        what = "jax.lax.stop_gradient" if site.kind == "stop_gradient" else f"{site.kind} ({site.name})"
        out.append(MSG_UNTESTED.format(what=what, where=_where(site.eqn)))
    tested = [s for s in sites if s.reachable]
    if not tested:
        return tuple(dict.fromkeys(out))
    dtype = jnp.result_type(*[f.dtype for f in problem.floats])
    base = _gradient(closed, problem.inputs, frozenset())
    groups = [[s] for s in tested] if len(tested) <= MAX_SITES else [tested]
    custom: dict[str, tuple[set[str], set[str]]] = {}
    for group in groups:
        changed = _changed(
            base, _gradient(closed, problem.inputs, frozenset(id(s.eqn) for s in group)), problem.paths, dtype
        )
        if not changed:
            continue
        stops = [s for s in group if s.kind == "stop_gradient"]
        if stops:
            where = ", ".join(dict.fromkeys(_where(s.eqn) for s in stops))
            out.append(MSG_STOP.format(where=where, leaves=_names(changed)))
        for s in group:
            if s.kind != "stop_gradient":
                names, leaves = custom.setdefault(s.kind, (set(), set()))
                names.add(s.name)
                leaves.update(changed)
    for kind, (names, leaves) in sorted(custom.items()):
        ordered = [p for p in problem.paths if p in leaves]
        out.append(MSG_CUSTOM.format(kind=kind, names=", ".join(sorted(names)), leaves=_names(ordered)))
    return tuple(dict.fromkeys(out))
