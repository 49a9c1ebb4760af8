"""Your program as you run it, with its arithmetic in float64.

Promoting a check to float64 by feeding float64 inputs into your Python function runs another
program than yours wherever it decides something from a dtype: ``jax.random.uniform(key, shape)``
draws other bits (other dropout masks) when the default float is float64, a carry written as
``jnp.zeros(shape, jnp.float32)`` no longer matches the loop's float64 output, typed init values no
longer match their operands, Python ints turn int64 next to int32 indices. This module instead
traces the function once as you run it (your inputs' dtypes, your x64 setting) and evaluates that
program equation by equation with every floating value held in float64:

* arithmetic runs in float64 (literals and captured constants as your program has them: rounded
  to its dtype, then widened, so the function is the one you run);
* random draws, bitcasts and callbacks run exactly as written, their outputs then widened (the
  same masks);
* your own narrowing casts (``astype(jnp.bfloat16)``, float64 to float32) round as written, then
  widen: the precision line still sees them;
* loops, conditionals, reductions and scatters with bodies are rebuilt from their bodies (so a
  float32 carry becomes a float64 one); calls, checkpoints and custom rules are inlined (finite
  differences ignore custom rules anyway).

An equation that cannot take float64 inputs, or whose body this module does not rebuild, runs as
written in its own dtypes and its outputs are widened: never another program, at worst that
equation's rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from jgradcheck._src import compat


class Unsupported(Exception):
    """A primitive with a body this module does not know how to rebuild in float64."""


# Run exactly as written: bits, keys and host code. Their float outputs are widened after.
_AS_WRITTEN = {
    "bitcast_convert_type",
    "random_bits",
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "random_fold_in",
    "random_split",
    "threefry2x32",
    "pure_callback",
    "io_callback",
    "debug_callback",
    "nextafter",
}
# Params that name an output or accumulation dtype: widened with the values.
_DTYPE_PARAMS = ("dtype", "new_dtype", "preferred_element_type")


def wide(dtype: Any) -> Any:
    """The dtype a value of ``dtype`` is held in: float64 for real floats, complex128 for complex
    (under x64; outside it the widest JAX allows, float32: the program then runs as written)."""
    dtype = np.dtype(dtype) if not _is_extended(dtype) else dtype
    if _is_extended(dtype):
        return dtype
    if jax.dtypes.issubdtype(dtype, np.complexfloating):
        return jax.dtypes.canonicalize_dtype(np.complex128)
    if jax.dtypes.issubdtype(dtype, np.floating):
        return jax.dtypes.canonicalize_dtype(np.float64)
    return dtype


def _is_extended(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


def _inexact(dtype: Any) -> bool:
    return not _is_extended(dtype) and jax.dtypes.issubdtype(dtype, np.inexact)


def _widen(x: Any) -> Any:
    """``x`` held wide (float64), unchanged if it is not floating."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not _inexact(dtype) or np.dtype(dtype).itemsize >= np.dtype(wide(dtype)).itemsize:
        return x
    return lax.convert_element_type(x, wide(dtype))


def _as(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype`` (a wide value back in the dtype the program wrote)."""
    if getattr(x, "dtype", None) == dtype:
        return x
    return lax.convert_element_type(x, dtype)


def _literal(v: Any) -> Any:
    """A literal or captured constant as the program holds it (its dtype), then widened."""
    aval = getattr(v, "aval", None)
    val = getattr(v, "val", v)
    dtype = getattr(aval, "dtype", None) or getattr(val, "dtype", None)
    if dtype is not None and _inexact(dtype):
        return np.asarray(np.asarray(val, dtype), wide(dtype))
    return val


def _wide_params(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for key in _DTYPE_PARAMS:
        d = out.get(key)
        if d is not None and not isinstance(d, (bool, int)):
            try:
                if _inexact(d):
                    out[key] = wide(d)
            except TypeError:
                pass
    return out


# Whether your narrowing casts round as written (the default) or are widened too (``casts_widened``).
_KEEP_CASTS: contextvars.ContextVar[bool] = contextvars.ContextVar("jgradcheck_keep_casts", default=True)


@contextlib.contextmanager
def casts_widened() -> Any:
    """Within it, ``run_jaxpr`` widens narrowing casts too (``jax.nn.dot_product_attention``'s
    float32 softmax runs in float64): the cost as it would be with no narrow section, to measure
    what such a section does to a gradient (``precision.measured_section_rounding``)."""
    token = _KEEP_CASTS.set(False)
    try:
        yield
    finally:
        _KEEP_CASTS.reset(token)


def _narrowing(eqn: Any) -> bool:
    """A cast you wrote from a wider float to a narrower one (kept as written)."""
    new = compat.params(eqn).get("new_dtype")
    old = getattr(eqn.invars[0].aval, "dtype", None)
    return (
        new is not None
        and old is not None
        and _inexact(new)
        and _inexact(old)
        and np.dtype(new).itemsize < np.dtype(old).itemsize
    )


def _as_written(eqn: Any, vals: Sequence[Any]) -> list[Any]:
    """The equation in its own dtypes (inputs narrowed back to them), outputs widened."""
    ins = [
        _as(x, v.aval.dtype) if _inexact(getattr(v.aval, "dtype", np.int32)) else x for x, v in zip(vals, eqn.invars)
    ]
    subfuns, params = compat.bind_params(eqn)
    out = eqn.primitive.bind(*subfuns, *ins, **params)
    out = out if eqn.primitive.multiple_results else [out]
    return [_widen(o) for o in out]


def _promoted(eqn: Any, vals: Sequence[Any]) -> list[Any]:
    subfuns, params = compat.bind_params(eqn)
    out = eqn.primitive.bind(*subfuns, *vals, **_wide_params(params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _closed(sub: Any) -> tuple[Any, list[Any]]:
    inner, consts = compat.open_jaxpr(sub)
    return inner, [_literal(c) for c in consts]


def _body(sub: Any) -> Callable[..., list[Any]]:
    inner, consts = _closed(sub)
    return lambda *args: run_jaxpr(inner, consts, list(args))


def _scan(eqn: Any, vals: list[Any]) -> list[Any]:
    p = compat.scan_params(eqn)
    consts = [_literal(c) for c in p.consts]
    fixed = vals[: p.num_consts]
    init = vals[p.num_consts : p.num_consts + p.num_carry]
    xs = vals[p.num_consts + p.num_carry :]

    def step(carry, x):
        out = run_jaxpr(p.body, consts, [*fixed, *carry, *x])
        return out[: p.num_carry], out[p.num_carry :]

    carry, ys = lax.scan(step, init, xs, length=p.length, reverse=p.reverse, unroll=p.unroll)
    return [*carry, *ys]


def _while(eqn: Any, vals: list[Any]) -> list[Any]:
    prm = compat.params(eqn)
    nc, nb = prm["cond_nconsts"], prm["body_nconsts"]
    cond, body = _body(prm["cond_jaxpr"]), _body(prm["body_jaxpr"])
    cconsts, bconsts, init = vals[:nc], vals[nc : nc + nb], vals[nc + nb :]
    return list(lax.while_loop(lambda c: cond(*cconsts, *c)[0], lambda c: tuple(body(*bconsts, *c)), tuple(init)))


def _cond(eqn: Any, vals: list[Any]) -> list[Any]:
    branches = [_body(b) for b in compat.params(eqn)["branches"]]
    index, ops = vals[0], vals[1:]
    return list(lax.switch(index, [lambda *o, b=b: tuple(b(*o)) for b in branches], *ops))


def _reduce(eqn: Any, vals: list[Any]) -> list[Any]:
    prm = compat.params(eqn)
    body = _body(prm["jaxpr"])
    n = len(vals) // 2
    if n == 1:
        return [lax.reduce(vals[0], vals[1], lambda a, b: body(a, b)[0], tuple(prm["dimensions"]))]
    comp = lambda a, b: tuple(body(*a, *b))  # noqa: E731
    return list(lax.reduce(tuple(vals[:n]), tuple(vals[n:]), comp, tuple(prm["dimensions"])))


def _reduce_window(eqn: Any, vals: list[Any]) -> list[Any]:
    prm = compat.params(eqn)
    inner = prm["jaxpr"]
    inner, consts = compat.open_jaxpr(inner)
    consts = [_literal(c) for c in (*consts, *prm.get("consts", ()))]
    n = len(vals) // 2

    def comp(a, b):
        a, b = (a, b) if n > 1 else ((a,), (b,))
        out = run_jaxpr(inner, consts, [*a, *b])
        return tuple(out) if n > 1 else out[0]

    ops, inits = (tuple(vals[:n]), tuple(vals[n:])) if n > 1 else (vals[0], vals[1])
    out = lax.reduce_window(
        ops,
        inits,
        comp,
        tuple(prm["window_dimensions"]),
        tuple(prm["window_strides"]),
        tuple(tuple(p) for p in prm["padding"]),
        tuple(prm["base_dilation"]),
        tuple(prm["window_dilation"]),
    )
    return list(out) if n > 1 else [out]


def _call(eqn: Any, vals: list[Any]) -> list[Any]:
    c = compat.call_params(eqn)
    return run_jaxpr(c.body, [_literal(x) for x in c.consts], vals[c.skip :])


def _remat(eqn: Any, vals: list[Any]) -> list[Any]:
    inner, consts = compat.open_jaxpr(compat.params(eqn)["jaxpr"])
    return run_jaxpr(inner, [_literal(c) for c in consts], vals)


def _scatter(eqn: Any, vals: list[Any]) -> list[Any]:
    """A scatter with its combining function (``update_jaxpr``, on scalars) rebuilt for wide values."""
    subfuns, params = compat.bind_params(eqn)
    update = params.get("update_jaxpr")
    if update is not None:
        inner, consts = compat.open_jaxpr(update)
        consts = [_literal(c) for c in (*consts, *params.get("update_consts", ()))]
        scalar = jax.ShapeDtypeStruct((), vals[0].dtype)
        closed = jax.make_jaxpr(lambda a, b: run_jaxpr(inner, consts, [a, b])[0])(scalar, scalar)
        params = {**params, "update_jaxpr": closed.jaxpr, "update_consts": list(closed.consts)}
    out = eqn.primitive.bind(*subfuns, *vals, **_wide_params(params))
    return list(out) if eqn.primitive.multiple_results else [out]


_BODIES: dict[str, Callable[[Any, list[Any]], list[Any]]] = {
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "reduce": _reduce,
    "reduce_window": _reduce_window,
    **{name: _call for name in compat.CALLS},
    "remat2": _remat,
    **{name: _scatter for name in ("scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max")},
}


def run_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` with its floating values held wide (see the module docstring)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return _literal(v) if hasattr(v, "val") else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = _widen(x)
    for v, x in zip(jaxpr.invars, args):
        env[v] = _widen(x)
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _BODIES:
            try:
                out = _BODIES[name](eqn, vals)
            except Unsupported:
                raise
            except Exception:  # noqa: BLE001 - params of another JAX version: run it as written
                out = _as_written(eqn, vals)
        elif compat.has_subjaxprs(eqn):
            # A body this module does not rebuild (custom_linear_solve, shard_map, ...): the
            # equation runs as you run it, in its own dtypes (right, if only as fine as those).
            out = _as_written(eqn, vals)
        elif name in _AS_WRITTEN or (name == "convert_element_type" and _narrowing(eqn) and _KEEP_CASTS.get()):
            out = _as_written(eqn, vals)
        else:
            try:
                out = _promoted(eqn, vals)
            except Exception:  # noqa: BLE001 - this equation cannot take wide inputs: run it as written
                out = _as_written(eqn, vals)
        for v, x in zip(eqn.outvars, out):
            env[v] = _widen(x)
    return [read(v) for v in jaxpr.outvars]


def _same_structure(a: Any, b: Any) -> bool:
    """Whether two tree structures are equal (PyTreeDef's ``==``, which jaxlib's stubs leave untyped)."""
    return bool(a == b)


def user_x64() -> bool:
    """Your x64 setting, as your program runs outside the check (not the check's scoped one)."""
    from jax._src import config as jax_config

    state = getattr(jax_config, "enable_x64", None)
    if state is not None and hasattr(state, "get_global"):
        return bool(state.get_global())
    return bool(jax.config.read("jax_enable_x64"))


def trace_as_run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn``'s closed jaxpr at ``args`` (your dtypes), under your own x64 setting."""
    with compat.enable_x64(user_x64()) if not _has_wide(args) else contextlib.nullcontext():
        return jax.make_jaxpr(fn, return_shape=True)(*args)


def _has_wide(args: Any) -> bool:
    """Whether some input is float64 (then it was made under x64, and is traced under it)."""
    return any(getattr(x, "dtype", None) in (np.float64, np.complex128) for x in jax.tree_util.tree_leaves(args))


def widened(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """``fn`` as traced at ``args`` (as you run it), as a function of the same pytrees whose
    floating arithmetic runs in float64 (call it under x64). Raises ``Unsupported`` early."""
    closed, shape = trace_as_run(fn, *args)
    treedef = jax.tree_util.tree_structure(args)
    out_tree = jax.tree_util.tree_structure(shape)
    _check_known(closed.jaxpr)
    consts = [_literal(c) for c in closed.consts]

    def run(*a: Any) -> Any:
        flat, tree = jax.tree_util.tree_flatten(a)
        if not _same_structure(tree, treedef):
            raise TypeError(f"the widened function takes inputs of structure {treedef}; got {tree}")
        return jax.tree_util.tree_unflatten(out_tree, run_jaxpr(closed.jaxpr, consts, flat))

    run.__name__ = getattr(fn, "__name__", "fn")
    run.__wrapped_as_run__ = closed  # type: ignore[attr-defined]
    return run


def _check_known(jaxpr: Any) -> None:
    """Raises ``Unsupported`` for a program this module cannot run (none known today: bodies it
    does not rebuild run as written); kept as the one place to refuse one."""
    for eqn in jaxpr.eqns:
        for sub in compat.subjaxprs(compat.params(eqn)):
            _check_known(compat.open_jaxpr(sub)[0])


def draws_random(closed: Any) -> bool:
    """Whether a traced program draws random numbers (its draws depend on the float dtype)."""
    from jgradcheck._src.jaxpr_scan import walk_eqns

    return any(e.primitive.name in ("random_bits", "threefry2x32") for e in walk_eqns(closed.jaxpr))


def has_custom_rules(closed: Any) -> bool:
    from jgradcheck._src.jaxpr_scan import walk_eqns

    return any(e.primitive.name.startswith(("custom_jvp", "custom_vjp")) for e in walk_eqns(closed.jaxpr))
