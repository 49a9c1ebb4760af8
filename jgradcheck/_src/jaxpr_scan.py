"""Reading the cost's jaxpr for things finite differences cannot see."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jgradcheck._src import compat

MSG_STOP_GRADIENT = (
    "cost_fn uses jax.lax.stop_gradient: finite differences see through it, jax.grad does not. "
    "If yours follows jax's semantics (e.g. yours = jax.grad(cost_fn)), expect a mismatch at the "
    "leaves that feed the stopped value; to check the math, remove stop_gradient from cost_fn."
)
MSG_CUSTOM_RULE = (
    "cost_fn uses {kind} ({names}): finite differences ignore the custom rule, jax.grad obeys it. "
    "A mismatch at the leaves feeding it means the rule disagrees with the function it decorates: "
    "check the rule, or (e.g. for gradient clipping or straight-through estimators) expect it."
)

MSG_RANDOM_DTYPE = (
    "cost_fn draws random numbers (e.g. a dropout mask from a fixed key) and the check runs in "
    "float64, while your gradient was given as a precomputed pytree: jax.random draws depend on "
    "the dtype, so the masks may differ from the ones your gradient used. Pass your gradient as a "
    "function (it then runs in float64 too), or use x64=False."
)
_RANDOM = {"random_bits", "threefry2x32", "random_wrap", "random_seed"}

_CUSTOM = {"custom_jvp_call": "custom_jvp", "custom_vjp_call": "custom_vjp", "custom_vjp_call_jaxpr": "custom_vjp"}


def walk_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, sub-jaxprs (jit, cond, scan, custom rules) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in compat.subjaxprs(compat.params(eqn)):
            yield from walk_eqns(compat.open_jaxpr(sub)[0])


def _called_by_jax(eqn: Any) -> bool:
    """Whether a stop_gradient was called by JAX's own library (logsumexp, softmax, ...).

    Those are exact rewrites (they only stabilize the numerics), so a warning would be noise.
    """
    tb = getattr(eqn.source_info, "traceback", None)
    frames = list(getattr(tb, "frames", []) or [])
    for k, frame in enumerate(frames[:-1]):
        if frame.function_name == "stop_gradient" and "/jax/_src/lax/" in frame.file_name:
            return "/jax/_src/" in frames[k + 1].file_name
    return False


def _source(eqn: Any) -> str | None:
    """'name at file:line' of a custom rule's function; None for JAX's own (jax.nn.relu, ...).

    JAX's library rules (relu, logsumexp, ...) are exact and would only add noise to reports.
    """
    body = compat.custom_rule_body(eqn)
    src = getattr(getattr(body, "debug_info", None), "func_src_info", None)
    if src:
        if "/jax/_src/" in src or "/jax/nn/" in src:
            return None
        return src
    return "an unnamed function"


def invisible_to_fd(closed: Any, promoted_pytree: bool = False) -> tuple[str, ...]:
    """Warnings for stop_gradient and custom_jvp/custom_vjp rules found in the cost's jaxpr.

    Args:
      closed: the cost's closed jaxpr.
      promoted_pytree: the check runs in float64 and your gradient was given as a precomputed
        pytree: random draws in the cost then differ from those your gradient saw.
    """
    stop = random = False
    custom: dict[str, set[str]] = {}
    for eqn in walk_eqns(closed.jaxpr):
        name = eqn.primitive.name
        if name == "stop_gradient" and not _called_by_jax(eqn):
            stop = True
        elif name in _RANDOM:
            random = True
        elif name in _CUSTOM:
            where = _source(eqn)
            if where is not None:
                custom.setdefault(_CUSTOM[name], set()).add(where)
    out = [MSG_STOP_GRADIENT] if stop else []
    if random and promoted_pytree:
        out.append(MSG_RANDOM_DTYPE)
    for kind, names in sorted(custom.items()):
        out.append(MSG_CUSTOM_RULE.format(kind=kind, names=", ".join(sorted(names))))
    return tuple(out)
