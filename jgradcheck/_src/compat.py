"""The one place that reads JAX internals which change between releases.

The delta interpreter and the jaxpr readers take equation params apart (a scan's body and how
its inputs split into constants, carry and scanned values; a call's body; a product's
dimension numbers). JAX renames and reshapes these without notice: jax 0.12 dropped scan's
``num_consts``/``num_carry`` for ``ft_in``/``ft_out`` and merged ``ClosedJaxpr`` into
``Jaxpr``. Every such read goes through a helper here, which either returns a checked value or
raises ``Unsupported``; callers then treat the equation as one they have no rule for (the delta
interpreter evaluates it whole: f(x + Δ) − f(x)), so a change in JAX makes a check slower,
never a crash.

Tested (``.ci/run``) on jax 0.8.0 (Python 3.12, the lower bound in pyproject.toml), 0.10.2
(Python 3.11) and 0.12.0.1 (Python 3.13). Readers of older layouts (0.4's ``pjit``,
``custom_vjp_call_jaxpr``, ``jax.experimental.enable_x64``) are kept: they cost nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

MSG_UNSUPPORTED = (
    "{primitive}: param {key!r} {problem} (jax {version}); the equation is evaluated whole instead "
    "(f(x + Δ) − f(x)). If this jax is newer than jgradcheck's tested range, upgrade jgradcheck."
)


class Unsupported(Exception):
    """Params of an equation that this version of jgradcheck cannot read."""

    def __init__(self, primitive: str, key: str, problem: str):
        self.primitive, self.key, self.problem = primitive, key, problem
        super().__init__(MSG_UNSUPPORTED.format(primitive=primitive, key=key, problem=problem, version=jax.__version__))

    @property
    def short(self) -> str:
        """'primitive (param problem)', for one line of a report."""
        return f"{self.primitive} ({self.key!r} {self.problem})"


_REQUIRED = object()


def params(eqn: Any) -> Mapping[str, Any]:
    """An equation's params: the single access point (tests plant unknown shapes here)."""
    return eqn.params


def param(eqn: Any, key: str, default: Any = _REQUIRED, kind: type | tuple[type, ...] | None = None) -> Any:
    """``params(eqn)[key]``, checked.

    Args:
      eqn: a jaxpr equation.
      key: the param's name.
      default: returned when the param is absent; without it, absence raises.
      kind: the type(s) the value must have.

    Raises:
      Unsupported: the param is missing (and has no default) or is not of ``kind``.
    """
    prm = params(eqn)
    if key not in prm:
        if default is _REQUIRED:
            raise Unsupported(eqn.primitive.name, key, "is missing")
        return default
    value = prm[key]
    if kind is not None and not isinstance(value, kind):
        raise Unsupported(eqn.primitive.name, key, f"is a {type(value).__name__}")
    return value


def _ints(eqn: Any, key: str, value: Any) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise Unsupported(eqn.primitive.name, key, f"is not a sequence of ints: {value!r}") from None


# ---------------------------------------------------------------------------------------------
# Jaxprs inside params.


def is_jaxpr(value: Any) -> bool:
    """Whether ``value`` is a (closed or open) jaxpr; jax 0.12 has one class for both."""
    return isinstance(value, (jex.ClosedJaxpr, jex.Jaxpr))


def open_jaxpr(value: Any) -> tuple[Any, list[Any]]:
    """(the open jaxpr, its constants) of a ClosedJaxpr, or of a Jaxpr (no constants before
    jax 0.12, its attached ones from 0.12 on)."""
    if isinstance(value, jex.ClosedJaxpr):
        return value.jaxpr, list(value.consts)
    return value, list(getattr(value, "consts", ()))


def subjaxprs(prm: Mapping[str, Any]) -> Iterator[Any]:
    """Every jaxpr among an equation's params (as stored: closed or open), inside tuples and
    lists too (cond's branches)."""

    def walk(value: Any) -> Iterator[Any]:
        if is_jaxpr(value):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from walk(v)

    for value in prm.values():
        yield from walk(value)


_ADDRESS = re.compile(r" at 0x([0-9a-fA-F]+)")


def jaxpr_text(jaxpr: Any) -> str:
    """A jaxpr's text with object addresses masked (``<function f at 0xXXXX>``), as jax prints
    it from 0.10.1 on; before, a callback or a reduction's ``lambda`` printed its address, so
    two traces of the same cost read as two programs."""
    return _ADDRESS.sub(lambda m: " at 0x" + "X" * len(m.group(1)), str(jaxpr))


def has_subjaxprs(eqn: Any) -> bool:
    """Whether an equation carries a body: a loop, a conditional, a call or a custom rule."""
    return any(True for _ in subjaxprs(params(eqn)))


def bind_params(eqn: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(sub-functions, params) to bind the equation's primitive with, as
    ``jax.core.eval_jaxpr`` does; older JAX returned the pair, newer the params alone."""
    got = eqn.primitive.get_bind_params(eqn.params)
    return got if isinstance(got, tuple) else ((), got)


# ---------------------------------------------------------------------------------------------
# Loops and calls.


@dataclasses.dataclass(frozen=True)
class ScanParams:
    """What the scan rule needs of a ``scan`` equation.

    Attributes:
      body: the open jaxpr of one step, invars (consts, carry, xs), outvars (carry, ys).
      consts: values the body closes over (its constvars).
      num_consts: leading inputs passed to every step unchanged (the loop's weights).
      num_carry: inputs after those that each step updates.
      length, reverse, unroll: as for ``jax.lax.scan``.
    """

    body: Any
    consts: tuple[Any, ...]
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: int | bool


def _scan_split(eqn: Any) -> tuple[int, int]:
    """(num_consts, num_carry): named params up to jax 0.11, the leaf counts of the first two
    groups of ``ft_in`` (a flat tree of (consts, carry, xs)) from 0.12."""
    prm = params(eqn)
    if "num_consts" in prm or "num_carry" in prm:
        return param(eqn, "num_consts", kind=int), param(eqn, "num_carry", kind=int)
    ft_in = param(eqn, "ft_in")
    try:
        groups = ft_in.unpack()
        n = [len(g) for g in groups]
    except Exception:  # noqa: BLE001 - any failure means a layout this module does not know
        raise Unsupported(eqn.primitive.name, "ft_in", f"has no (consts, carry, xs) groups: {ft_in!r}") from None
    if len(n) != 3:
        raise Unsupported(eqn.primitive.name, "ft_in", f"has {len(n)} groups, not (consts, carry, xs)")
    return n[0], n[1]


def scan_params(eqn: Any) -> ScanParams:
    """The checked params of a ``scan`` equation.

    Raises:
      Unsupported: params missing, of another type, or inconsistent with the equation.
    """
    body = param(eqn, "jaxpr")
    if not is_jaxpr(body):
        raise Unsupported(eqn.primitive.name, "jaxpr", f"is a {type(body).__name__}")
    inner, consts = open_jaxpr(body)
    n_c, n_carry = _scan_split(eqn)
    n_in = len(eqn.invars)
    if n_c < 0 or n_carry < 0 or n_c + n_carry > n_in or len(inner.invars) != n_in:
        raise Unsupported(eqn.primitive.name, "num_consts", f"({n_c}, {n_carry}) does not fit {n_in} inputs")
    if len(inner.outvars) != len(eqn.outvars) or n_carry > len(eqn.outvars):
        raise Unsupported(eqn.primitive.name, "jaxpr", "has outputs that do not match the equation's")
    unroll = param(eqn, "unroll", default=1, kind=(int, bool))
    return ScanParams(
        body=inner,
        consts=tuple(consts),
        num_consts=n_c,
        num_carry=n_carry,
        length=param(eqn, "length", kind=int),
        reverse=bool(param(eqn, "reverse", default=False, kind=bool)),
        unroll=unroll,
    )


# Call-like primitives: the param holding the body, by primitive name (jax 0.4.38 traces pjit and
# custom_vjp_call_jaxpr where 0.10 traces jit and custom_vjp_call).
CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}
# Calls whose leading ``num_consts`` inputs are not inputs of the body (custom rules' consts).
_LEADING_CONSTS = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class CallParams:
    """A call-like equation's body.

    Attributes:
      body: the open jaxpr.
      consts: values the body closes over.
      skip: leading inputs of the equation that are not inputs of the body.
    """

    body: Any
    consts: tuple[Any, ...]
    skip: int


def call_params(eqn: Any) -> CallParams:
    """The body of a call-like equation (``CALLS``), to inline it.

    Raises:
      Unsupported: not a known call, or its body param is missing or of another type, or its
        inputs do not match the equation's.
    """
    name = eqn.primitive.name
    if name not in CALLS:
        raise Unsupported(name, "jaxpr", "names no known call")
    sub = param(eqn, CALLS[name])
    if not is_jaxpr(sub):
        raise Unsupported(name, CALLS[name], f"is a {type(sub).__name__}")
    inner, consts = open_jaxpr(sub)
    n_in = len(eqn.invars)
    skip = 0
    if len(inner.invars) != n_in and name in _LEADING_CONSTS:
        skip = param(eqn, "num_consts", default=0, kind=int)
    if len(inner.invars) != n_in - skip:
        raise Unsupported(name, CALLS[name], f"takes {len(inner.invars)} inputs, the equation gives {n_in}")
    if len(inner.outvars) != len(eqn.outvars):
        raise Unsupported(name, CALLS[name], "has outputs that do not match the equation's")
    return CallParams(inner, tuple(consts), skip)


def custom_rule_body(eqn: Any) -> Any | None:
    """The open jaxpr of the function a custom_jvp/custom_vjp rule decorates, or None."""
    for key in ("call_jaxpr", "fun_jaxpr"):
        sub = params(eqn).get(key)
        if is_jaxpr(sub):
            return open_jaxpr(sub)[0]
    return None


# ---------------------------------------------------------------------------------------------
# Products, reductions and layout.


def dot_dimension_numbers(eqn: Any) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]:
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` of a dot_general.

    Raises:
      Unsupported: another layout.
    """
    dn = param(eqn, "dimension_numbers")
    try:
        (lc, rc), (lb, rb) = dn
    except (TypeError, ValueError):
        raise Unsupported(eqn.primitive.name, "dimension_numbers", f"is not ((lc, rc), (lb, rb)): {dn!r}") from None
    key = "dimension_numbers"
    return (_ints(eqn, key, lc), _ints(eqn, key, rc)), (_ints(eqn, key, lb), _ints(eqn, key, rb))


@dataclasses.dataclass(frozen=True)
class ConvParams:
    """What the convolution rules need of a ``conv_general_dilated`` equation (as in
    ``jax.lax.conv_general_dilated``; specs are axis positions, batch/feature first)."""

    lhs_spec: tuple[int, ...]
    rhs_spec: tuple[int, ...]
    out_spec: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int
    batch_group_count: int
    preferred_element_type: Any


def conv_params(eqn: Any) -> ConvParams:
    """The checked params of a ``conv_general_dilated`` equation.

    Raises:
      Unsupported: a param missing or of another shape.
    """
    dn = param(eqn, "dimension_numbers")
    try:
        lhs, rhs, out = dn
    except (TypeError, ValueError):
        raise Unsupported(eqn.primitive.name, "dimension_numbers", f"is not (lhs, rhs, out) specs: {dn!r}") from None
    key = "dimension_numbers"
    lhs, rhs, out = _ints(eqn, key, lhs), _ints(eqn, key, rhs), _ints(eqn, key, out)
    ndim = len(eqn.outvars[0].aval.shape)
    if not len(lhs) == len(rhs) == len(out) == ndim:
        raise Unsupported(eqn.primitive.name, key, f"specs {dn!r} do not fit rank {ndim}")
    spatial = ndim - 2
    raw_padding = param(eqn, "padding")
    try:
        padding = tuple((int(lo), int(hi)) for lo, hi in raw_padding)
    except (TypeError, ValueError):
        raise Unsupported(eqn.primitive.name, "padding", f"is not (low, high) pairs: {raw_padding!r}") from None
    got = ConvParams(
        lhs_spec=lhs,
        rhs_spec=rhs,
        out_spec=out,
        window_strides=_ints(eqn, "window_strides", param(eqn, "window_strides")),
        padding=padding,
        lhs_dilation=_ints(eqn, "lhs_dilation", param(eqn, "lhs_dilation")),
        rhs_dilation=_ints(eqn, "rhs_dilation", param(eqn, "rhs_dilation")),
        feature_group_count=param(eqn, "feature_group_count", kind=int),
        batch_group_count=param(eqn, "batch_group_count", kind=int),
        preferred_element_type=param(eqn, "preferred_element_type", default=None),
    )
    for key in ("window_strides", "padding", "lhs_dilation", "rhs_dilation"):
        if len(getattr(got, key)) != spatial:
            raise Unsupported(eqn.primitive.name, key, f"has {len(getattr(got, key))} entries for {spatial} axes")
    return got


def preferred_element_type(eqn: Any) -> Any:
    """A product's accumulation dtype, or None (the operands' result type)."""
    return param(eqn, "preferred_element_type", default=None)


def reduce_axes(eqn: Any) -> tuple[int, ...]:
    """The axes a reduction sums over."""
    return _ints(eqn, "axes", param(eqn, "axes"))


def permutation(eqn: Any) -> tuple[int, ...]:
    """A transpose's permutation."""
    perm = _ints(eqn, "permutation", param(eqn, "permutation"))
    if sorted(perm) != list(range(len(perm))):
        raise Unsupported(eqn.primitive.name, "permutation", f"is not a permutation: {perm!r}")
    return perm


def broadcast_dimensions(eqn: Any) -> tuple[int, ...]:
    """Where broadcast_in_dim puts each operand axis in its output."""
    return _ints(eqn, "broadcast_dimensions", param(eqn, "broadcast_dimensions"))


def split_transpose(eqn: Any) -> bool:
    """Whether a scan is the split transpose of another (a param of older jax; no rule covers it)."""
    return bool(param(eqn, "_split_transpose", default=False))


def scan_length(eqn: Any) -> int:
    """A loop's trip count where its params say it (scan), else 1: for cost estimates only."""
    value = params(eqn).get("length", 1)
    return value if isinstance(value, int) else 1


# ---------------------------------------------------------------------------------------------
# Host callbacks and precision.


def callback_params(eqn: Any) -> tuple[Any, tuple[Any, ...], Any, str | None]:
    """(callback, result_avals, sharding, vmap_method) of a pure_callback or io_callback.

    Raises:
      Unsupported: ``callback`` or ``result_avals`` missing.
    """
    avals = tuple(param(eqn, "result_avals", kind=(tuple, list)))
    return param(eqn, "callback"), avals, params(eqn).get("sharding"), params(eqn).get("vmap_method")


def pure_callback_params(template: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """Params for a ``pure_callback`` equation: those of ``template`` (one this jax traced, so
    params a version adds, as 0.4's ``vectorized``, are there), overridden by ``values``."""
    return {**template, **values}


def enable_x64(on: bool = True) -> contextlib.AbstractContextManager[Any]:
    """A scoped float64 switch: ``jax.enable_x64`` where it exists (0.10 and later), else its
    former home ``jax.experimental.enable_x64`` (0.4.38). Never the global flag."""
    scoped: Any = getattr(jax, "enable_x64", None)
    if scoped is None:
        from jax import experimental

        scoped = getattr(experimental, "enable_x64")  # noqa: B009 - absent from newer stubs
    return scoped(on)


def has_loop(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (open) runs a ``scan`` or ``while`` loop, in any nested jaxpr (such programs
    keep XLA:CPU's fusion emitters: a scan's program ran 1.7x slower without them)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("scan", "while"):
            return True
        if any(has_loop(open_jaxpr(sub)[0]) for sub in subjaxprs(eqn.params)):
            return True
    return False


_LEAN_OK: list[bool] = []


def lean_compile_ok() -> bool:
    """Whether this jaxlib's XLA:CPU takes ``xla_cpu_use_fusion_emitters`` (the lean compile of
    ``engine.LEAN_COMPILE`` and ``options.QUICK_LEAN_COMPILE``): jaxlib 0.10 does; 0.12's XLA
    no longer has the option and rejects every program compiled with it ("No such compile
    option"). Probed once, on first use (never at import: a backend started at import would come
    before a user's ``jax.distributed.initialize``), by compiling a one-operation program."""
    if not _LEAN_OK:
        try:
            jax.jit(lambda x: x + 1.0, compiler_options={"xla_cpu_use_fusion_emitters": False}).lower(
                np.float32(0.0)
            ).compile()
            ok = True
        except Exception:  # noqa: BLE001 - any refusal means: compile with XLA's defaults
            ok = False
        _LEAN_OK.append(ok)
    return _LEAN_OK[0]
