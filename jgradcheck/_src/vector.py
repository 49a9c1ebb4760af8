"""The shared walk of the vector checks: inputs and outputs, projections, yours, and locating.

See :mod:`jgradcheck._src.derivatives` for what is checked and why through projections.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jgradcheck._src import compat, numerics, promote
from jgradcheck._src.check import check_grad, option_clashes, without_promotion_if_needed
from jgradcheck._src.delta import work
from jgradcheck._src.effects import callbacks
from jgradcheck._src.engine import PROGRAM_LOCK, QUICK_SECONDS, WORK_RATE, remember
from jgradcheck._src.merge import merge_reports
from jgradcheck._src.options import QUICK_COMPILE, QUICK_LEAN_COMPILE
from jgradcheck._src.problem import hashable, precision_scope, reuse_scope, reuse_traces, shared
from jgradcheck._src.report import Entry, GradCheckReport
from jgradcheck._src.tree import check_live, is_floating, path_str

PyTree = Any

MSG_OPTION = (
    "{fn}() got an unexpected keyword argument {name!r}. Its options are those of check_grad "
    "({options}); pass further data to your function with functools.partial."
)
MSG_NO_PRIMALS = "{fn} needs at least one primal: {fn}(fn, {other}, *primals)."
MSG_OUT_DTYPE = "fn's output {path} has dtype {dtype}; only real floating outputs can be checked. {hint}"
MSG_VJP_RETURN = "vjp_fn(*primals) must return (out, pullback) like jax.vjp; it returned {kind}."
MSG_PULLBACK_LEN = (
    "vjp_fn's pullback returned {got} for {want} primal(s) ({names}); like jax.vjp's, it must "
    "return a tuple with one cotangent per primal, in the primals' order."
)
MSG_COTANGENT = (
    "vjp_fn's pullback returned a cotangent for {name} shaped {got}; the primal is shaped {want}{hint}. "
    "Each cotangent has its primal's shape."
)
MSG_JVP_RETURN = "jvp_fn(primals, tangents) must return (out, tangent_out) like jax.jvp; it returned {kind}."
MSG_TANGENT = "jvp_fn's tangent output {path} is shaped {got}; fn's output there is shaped {want}."
MSG_STRUCTURE = "{who} returned an output of structure {got}; fn(*primals) has structure {want}."
MSG_PRIMAL_OUT = (
    "{who}'s primal output differs from fn(*primals) at {path} (max |difference| {diff:.3g} where "
    "fn's values reach {scale:.3g}): it must return fn's own output, as jax.{which} does."
)
MSG_PRIMAL_NONFINITE = (
    "{who}'s primal output differs from fn(*primals) at {path} in where it is ±inf or NaN ({detail}): it "
    "must return fn's own output, as jax.{which} does."
)
MSG_LEFT_OUT = (
    "{n:,} of {m:,} output entries of fn are not finite at the primals ({detail}; e.g. {first}) and were "
    "left out of the check: finite differences see no derivative there, and where your rule's output holds "
    "the same ±inf/NaN it was compared as equal"
)
MSG_NAN_YOURS = (
    "your pullback is NaN/Inf at {n:,} input entries, from the zero cotangent of a left-out output times an "
    "infinite or NaN derivative (0 × NaN, as in asin's rule outside [-1, 1]); they were compared as 0 there"
)
MSG_ALL_NONFINITE = (
    "every output entry of fn is ±inf or NaN at the primals ({detail}): there is no finite value to "
    "difference. Check at primals where fn is finite (inside the domain of log, sqrt or asin; a mask that "
    "keeps some entries)."
)
MSG_WIDENED = (
    "fn (and your rule with it) ran as traced at your inputs' dtypes with its arithmetic widened to float64: "
    "with float64 inputs its program changes ({error}), as where it hard-codes a dtype (a float32 scan carry "
    "or init value)"
)
MSG_COMPLEX_PRIMAL = (
    "{fn} checks forward mode on real inputs only, but {name} is {dtype}: a JVP's tangent of a complex input "
    "is complex, and finite differences step its real and imaginary parts apart. Check reverse mode "
    "(check_vjp, or check_rules(..., modes=('rev',))), or split the input: fn_ri = lambda re, im: "
    "fn(jax.lax.complex(re, im)) at (jnp.real(z), jnp.imag(z))."
)
MSG_MODES = "modes must be a non-empty subset of ('fwd', 'rev'); got {modes!r}."
MSG_ORDER = "order must be 1 or 2; got {order!r}."
MSG_NO_FWD = (
    "forward mode skipped: {fn} has a custom_vjp rule, which JAX cannot differentiate in "
    "forward mode (only its reverse rule was checked)"
)
MSG_HVP_SHAPE = "hvp_fn(params, v, *args) must return H·v shaped like params; {detail}."

# Outputs up to this many are checked one by one (the full Jacobian, entry by entry).
EXACT_OUTPUTS = 4
# Default number of random cotangents when there are more outputs: each is one scalar check.
DEFAULT_COTANGENTS = 2
# Failing columns whose full Jacobian column is computed to name the output index.
LOCATE_COLUMNS = 8
# Yours as a full Jacobian (to locate outputs from a VJP) only up to this many outputs.
LOCATE_MAX_OUTPUTS = 1 << 16
# The size of the basis cotangents and tangents: a power of two (exact scaling) that is not 1,
# so a rule that ignores the incoming cotangent or tangent cannot pass.
BASIS_SCALE = 2.0
# Tangents (or cotangents) per batched call of your function.
BATCH = 256


def _check_options(fn: str, options: dict[str, Any]) -> None:
    allowed = [
        k for k, p in inspect.signature(check_grad).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for name in options:
        if name not in allowed:
            raise TypeError(MSG_OPTION.format(fn=fn, name=name, options=", ".join(allowed)))


def real_primals(kind: str, fn: Callable[..., Any], primals: Sequence[Any]) -> None:
    """A complex primal gets MSG_COMPLEX_PRIMAL, not JAX's float0 tangent error."""
    inputs = _Inputs.of(fn, primals)
    for k, p in enumerate(primals):
        for path, x in jax.tree_util.tree_flatten_with_path(p)[0]:
            if jnp.iscomplexobj(x):
                name = inputs.label(k) + (path_str(path) if path else "")
                raise TypeError(MSG_COMPLEX_PRIMAL.format(fn=kind, name=name, dtype=jnp.result_type(x)))


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The primals as one params pytree: a single pytree as is, else named by fn's signature."""

    names: tuple[str, ...] | None  # None: a single container primal, used as params directly
    tupled: bool  # no usable names: params is the tuple of primals

    @staticmethod
    def of(fn: Callable[..., Any], primals: Sequence[Any]) -> _Inputs:
        if len(primals) == 1 and not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(primals[0])):
            return _Inputs(None, False)
        try:
            params = inspect.signature(fn).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
        if len(names) >= len(primals) and len(set(names[: len(primals)])) == len(primals):
            return _Inputs(tuple(names[: len(primals)]), False)
        return _Inputs(None, True)

    def params(self, primals: Sequence[Any]) -> PyTree:
        if self.names is not None:
            return dict(zip(self.names, primals))
        return tuple(primals) if self.tupled else primals[0]

    def primals(self, params: PyTree) -> tuple[Any, ...]:
        if self.names is not None:
            return tuple(params[n] for n in self.names)
        return tuple(params) if self.tupled else (params,)

    def label(self, k: int) -> str:
        if self.names is not None:
            return self.names[k]
        return f"[{k}]" if self.tupled else "params"


def _flat(out: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(out)
    return jnp.concatenate([jnp.ravel(x) for x in leaves]) if len(leaves) > 1 else jnp.ravel(leaves[0])


@dataclasses.dataclass(frozen=True)
class _Projected:
    """The scalar cost ⟨u, f(x)⟩ (u a flat vector over f's outputs); hashable by f.

    ``masked``: the outputs u does not see (u = 0 there: ±inf or NaN at the primals) are dropped
    before the product, as 0 × inf would make the whole cost NaN.
    """

    fn: Any
    inputs: _Inputs
    masked: bool = False

    def __call__(self, params: PyTree, u: jax.Array, *args: Any) -> jax.Array:
        out = _flat(self.fn(*self.inputs.primals(params), *args)).astype(u.dtype)
        if self.masked:
            out = jnp.where(u != 0, out, 0)
        return jnp.dot(out, u)


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """f's output structure: leaf paths, shapes, dtypes and their offsets in the flat vector."""

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]

    @staticmethod
    def of(shapes_tree: PyTree, root: str = "out") -> _Outputs:
        flat, treedef = jax.tree_util.tree_flatten_with_path(shapes_tree)
        paths, shapes, dtypes = [], [], []
        for path, leaf in flat:
            p = path_str(path)
            name = root if p == "<root>" else (root + p if p.startswith("[") else f"{root}.{p}")
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                hint = (
                    "Return jnp.real(y) and jnp.imag(y) as two outputs."
                    if jnp.issubdtype(leaf.dtype, jnp.complexfloating)
                    else "Leave integer outputs out of the function you check."
                )
                raise TypeError(MSG_OUT_DTYPE.format(path=name, dtype=leaf.dtype, hint=hint))
            paths.append(name)
            shapes.append(tuple(leaf.shape))
            dtypes.append(leaf.dtype)
        return _Outputs(treedef, tuple(paths), tuple(shapes), tuple(dtypes))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def unflatten(self, u: np.ndarray) -> PyTree:
        parts, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            k = math.prod(shape)
            parts.append(jnp.asarray(u[start : start + k].reshape(shape), dtype))
            start += k
        return jax.tree_util.tree_unflatten(self.treedef, parts)

    def name(self, flat: int) -> str:
        for path, shape in zip(self.paths, self.shapes):
            k = math.prod(shape)
            if flat < k:
                return f"{path}[{', '.join(str(int(i)) for i in np.unravel_index(flat, shape))}]" if shape else path
            flat -= k
        return "?"


def _promote(tree: PyTree, x64: bool) -> PyTree:
    """Floating leaves in float64 under x64 (as the scalar check promotes params)."""
    if not x64:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float64)) if is_floating(x) else x, tree)


def _finite(out: PyTree) -> np.ndarray:
    """Which flat output entries are finite (the others are left out of a vector check)."""
    return np.concatenate([np.isfinite(np.asarray(x, np.float64)).ravel() for x in jax.tree_util.tree_leaves(out)])


def _nonfinite_detail(out: PyTree, keep: np.ndarray) -> str:
    """``3 -inf, 1 NaN``: what the left-out output entries hold."""
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(out)])[~keep]
    counts = [(int(np.sum(flat == -np.inf)), "-inf"), (int(np.sum(flat == np.inf)), "+inf")]
    counts.append((int(np.sum(np.isnan(flat))), "NaN"))
    return ", ".join(f"{n:,} {what}" for n, what in counts if n)


def _zero_nonfinite(projections: list[PyTree]) -> tuple[list[PyTree], int]:
    """Your projections with NaN/Inf entries set to 0, and at how many input entries (see MSG_NAN_YOURS)."""
    out: list[PyTree] = []
    bad: dict[Any, Any] = {}
    for tree in projections:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        fixed = []
        for k, x in enumerate(leaves):
            if is_floating(x) and not isinstance(x, float):
                a = np.asarray(x)
                finite = np.isfinite(a)
                if not finite.all():
                    bad[k] = bad.get(k, np.zeros(a.shape, bool)) | ~finite
                    a = np.where(finite, a, 0).astype(a.dtype)
                fixed.append(a)
            else:
                fixed.append(x)
        out.append(jax.tree_util.tree_unflatten(treedef, fixed))
    return out, sum(int(m.sum()) for m in bad.values())


def _cotangents(m: int, count: int | None, seed: int) -> tuple[np.ndarray, bool]:
    """The cotangents (rows) and whether they are the exact basis of the outputs.

    Few outputs: each output in turn (the Jacobian entry by entry). Otherwise Gaussian
    directions: a wrong column is missed only if its error is orthogonal to every one of them
    (probability zero), unlike Rademacher signs, where two equal errors can cancel.
    """
    if count is None and m <= EXACT_OUTPUTS:
        # Each output in turn, scaled by a fixed factor that is not ±1: a pullback that ignores
        # its incoming cotangent (the forgotten "* dout") would agree with a unit one.
        return np.diag(BASIS_SCALE * np.where(np.arange(m) % 2, -1.0, 1.0)), True
    rng = np.random.default_rng([seed, 0x76A7])
    return rng.standard_normal((count or DEFAULT_COTANGENTS, m)) / math.sqrt(m), False


def _compare_out(who: str, which: str, got: PyTree, want: PyTree) -> None:
    """Your function's primal output must be fn's (up to rounding)."""
    if str(jax.tree_util.tree_structure(got)) != str(jax.tree_util.tree_structure(want)):
        raise ValueError(
            MSG_STRUCTURE.format(
                who=who, got=jax.tree_util.tree_structure(got), want=jax.tree_util.tree_structure(want)
            )
        )
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g64.shape != w64.shape:
            raise ValueError(MSG_TANGENT.format(path=path_str(path), got=g64.shape, want=w64.shape))
        finite = np.isfinite(w64)
        if not finite.all():
            # ±inf and NaN compare as equal where both sides have them; the rest as below.
            same = np.isfinite(g64) == finite
            same[~finite] &= (g64[~finite] == w64[~finite]) | (np.isnan(g64[~finite]) & np.isnan(w64[~finite]))
            if not same.all():
                k = int(np.flatnonzero(~same.ravel())[0])
                detail = f"yours {g64.ravel()[k]:.3g} where fn gives {w64.ravel()[k]:.3g}"
                raise ValueError(MSG_PRIMAL_NONFINITE.format(who=who, path=path_str(path), detail=detail, which=which))
            g64, w64 = g64[finite], w64[finite]
        scale = float(np.max(np.abs(w64))) if w64.size else 0.0
        diff = float(np.max(np.abs(g64 - w64))) if w64.size else 0.0
        # Rounding of a float32 computation of the same values, with room for reassociation.
        if not diff <= 1e-4 * max(scale, 1e-30) + 1e-30:
            raise ValueError(MSG_PRIMAL_OUT.format(who=who, path=path_str(path), diff=diff, scale=scale, which=which))


class _Yours:
    """Your derivative seen through cotangent rows ``U`` (k, m): one params-shaped pytree per row."""

    def __init__(self, projections: list[PyTree], column: Callable[[list[tuple[int, int]]], np.ndarray] | None):
        self.projections = projections
        self.column = column  # (primal leaf, flat index) list -> your Jacobian columns (m, q)


def vjp_yours(vjp_fn, inputs: _Inputs, primals, outs: _Outputs, U: np.ndarray, fn_out: PyTree) -> _Yours:
    def first() -> tuple[PyTree, list[Any]]:
        got = vjp_fn(*primals)
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and callable(got[1])):
            raise TypeError(MSG_VJP_RETURN.format(kind=type(got).__name__))
        return got[0], [got[1](outs.unflatten(u)) for u in U]

    # Your function and its pullback on every row of U: one compiled program, kept across checks.
    out, pulled = compiled_or_eager(first)
    if any(getattr(c, "dtype", None) == jax.dtypes.float0 for c in jax.tree_util.tree_leaves(pulled)):
        out, pulled = first()  # integer inputs' float0 cotangents, as your pullback returns them
    _compare_out("vjp_fn", "vjp", out, fn_out)
    names = ", ".join(inputs.label(k) for k in range(len(primals)))

    def pull(cts: Any) -> PyTree:
        if not isinstance(cts, (tuple, list)) or len(cts) != len(primals):
            got = f"{len(cts)} cotangents" if isinstance(cts, (tuple, list)) else f"a {type(cts).__name__}"
            raise ValueError(MSG_PULLBACK_LEN.format(got=got, want=len(primals), names=names))
        for k, (ct, p) in enumerate(zip(cts, primals)):
            for (path, c), x in zip(jax.tree_util.tree_flatten_with_path(ct)[0], jax.tree_util.tree_leaves(p)):
                if np.shape(c) != np.shape(x) and getattr(c, "dtype", None) != jax.dtypes.float0:
                    where = inputs.label(k) + ("" if not path else path_str(path))
                    others = [inputs.label(j) for j, q in enumerate(primals) if j != k and np.shape(q) == np.shape(c)]
                    hint = (
                        " (transposed?)"
                        if np.shape(c) == np.shape(x)[::-1]
                        else f" (it is shaped like {others[0]}: cotangents in the wrong order?)"
                        if others
                        else ""
                    )
                    raise ValueError(MSG_COTANGENT.format(name=where, got=np.shape(c), want=np.shape(x), hint=hint))
        return inputs.params(list(cts))

    projections = [pull(cts) for cts in pulled]

    floats = [k for k, x in enumerate(jax.tree_util.tree_leaves(inputs.params(list(primals)))) if is_floating(x)]

    pullback: list[Any] = []  # your pullback, eagerly, only to locate failing outputs

    def rows_of(u: jax.Array) -> list[jax.Array]:
        cts = [_zeros_for(p) if c is None else c for c, p in zip(pullback[0](_unflatten_traced(outs, u)), primals)]
        leaves = jax.tree_util.tree_leaves(inputs.params(cts))
        return [jnp.ravel(leaves[k]) for k in floats]

    def column(cols: list[tuple[int, int]]) -> np.ndarray:
        # Your Jacobian's columns, from every output's cotangent: batched, or one by one when
        # your pullback is not traceable (NumPy code, Python control flow on values).
        m, parts = outs.size, []
        if not pullback:
            pullback.append(vjp_fn(*primals)[1])
        batched = jax.jit(jax.vmap(rows_of))
        for s in range(0, m, BATCH):
            basis = np.zeros((min(BATCH, m - s), m))
            basis[np.arange(basis.shape[0]), s + np.arange(basis.shape[0])] = 1.0
            try:
                rows = batched(jnp.asarray(basis, outs.dtypes[0]))
            except _UNTRACEABLE:
                one = [rows_of(jnp.asarray(b, outs.dtypes[0])) for b in basis]
                rows = [np.stack([np.asarray(r[li]) for r in one]) for li in range(len(floats))]
            parts.append(np.stack([np.asarray(rows[li][:, i], np.float64) for li, i in cols], axis=1))
        return np.concatenate(parts, axis=0)

    return _Yours(projections, column if outs.size <= LOCATE_MAX_OUTPUTS else None)


# What a function that JAX cannot trace raises under jit/vmap.
_UNTRACEABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerBoolConversionError,
)


def _zeros_for(primal: Any) -> Any:
    """The cotangent of a primal your pullback returned None for (an integer input)."""
    return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), primal)


def _unflatten_traced(outs: _Outputs, u: jax.Array) -> PyTree:
    parts, start = [], 0
    for shape, dtype in zip(outs.shapes, outs.dtypes):
        k = math.prod(shape)
        parts.append(u[start : start + k].reshape(shape).astype(dtype))
        start += k
    return jax.tree_util.tree_unflatten(outs.treedef, parts)


def _basis_tangent(inputs: _Inputs, primals: Sequence[Any], leaf: int | None, i: Any) -> tuple[Any, ...]:
    """The tangent e_i in float leaf ``leaf`` (params order, flat position i), zeros elsewhere
    (``float0`` for integer leaves, as jax.jvp wants); with ``leaf=None``, i is the position in
    the float leaves concatenated (-1 with leaf -1: the zero tangent)."""
    leaves, treedef = jax.tree_util.tree_flatten(inputs.params(list(primals)))
    out: list[Any] = []
    fl = 0
    offset = 0
    for x in leaves:
        if is_floating(x):
            dtype = jnp.result_type(x)
            size = int(np.size(x))
            if fl == leaf or leaf is None:
                # A comparison with an iota rather than a scatter: the same tangent, traced in a
                # fraction of the time (every check traces it to find its kept program).
                # (No jnp.where: a jitted function, a call in the program that keeps it from running
                # eagerly; 0 or 1 times a power of two is exact.)
                hot = jnp.arange(offset, offset + size) == i if leaf is None else jnp.arange(size) == i
                t = (lax.convert_element_type(hot, dtype) * jnp.asarray(BASIS_SCALE, dtype)).reshape(np.shape(x))
            else:
                t = jnp.zeros(np.shape(x), dtype)
            out.append(t)
            fl += 1
            offset += size
        else:
            out.append(np.zeros(np.shape(x), jax.dtypes.float0))
    return inputs.primals(jax.tree_util.tree_unflatten(treedef, out))


# Compiled programs of run_compiled, by the text of their traced program: a suite that checks the
# same operation at the same shapes again (new values, a new lambda) compiles nothing new.
_PROGRAMS: dict[Any, Callable[..., Any]] = {}
# How many: a suite cycles through its cases, so fewer than it uses would all be dropped before
# their next use (JAX's own op list: 416 cases of about 5 programs each).
PROGRAMS_KEPT = 4096
# Tiny programs run eagerly so far, by the same key: the ``reuse_scope`` of the last check that
# ran one, and in how many checks it ran (sights within one check count once).
_SEEN: dict[Any, tuple[int | None, int]] = {}
# A tiny program runs eagerly in this many checks before it is compiled: once its equations'
# executables are JAX's, an eager run costs a few tens of microseconds per equation more than the
# compiled program, which costs 15-40 ms to compile: about ten runs' worth. A suite that checks an
# operation once or twice never compiles it; a loop of checks compiles it.
EAGER_SIGHTS = 8
# How many programs run_compiled has compiled in this process (tests read it: a second identical
# check compiles none).
_COMPILED = [0]
# How many tiny programs it ran eagerly, primitive by primitive, on their first sight.
_EAGER = [0]


# Equations (primitive, parameters, input types) that ran in a program of run_compiled: JAX keeps an
# executable per such equation for eager calls (where it was compiled, not yet: its first eager
# call compiles it, once).
_EQUATIONS: dict[Any, bool] = {}
# A first-sight program runs eagerly only where at most this many of its equations are new: each
# compiles on its own for its first eager call (3-10 ms on a 2-core CPU), the whole program in
# 15-40 ms; a cumulative max's rule (dozens of new slices and selects) compiled eagerly took seconds.
EAGER_NEW_EQUATIONS = 3


def _new_equations(jaxpr: Any) -> int:
    """How many of ``jaxpr``'s equations ran in no earlier program (a body or a call counts as more
    than ``EAGER_NEW_EQUATIONS``); all of them are remembered from now on. Called with ``PROGRAM_LOCK`` held."""
    new = 0
    for eqn in jaxpr.eqns:
        if compat.has_subjaxprs(eqn):
            # A body or call compiles whole for its eager call, new objects each trace: as costly as
            # compiling the program.
            new += EAGER_NEW_EQUATIONS + 1
            continue
        sig = (
            eqn.primitive.name,
            tuple(str(getattr(v, "aval", "")) for v in eqn.invars),
            tuple(sorted((k, str(v)) for k, v in eqn.params.items())),
        )
        if sig not in _EQUATIONS:
            new += 1
            remember(_EQUATIONS, sig, True, most=16 * PROGRAMS_KEPT)
    return new


def run_compiled(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)`` through a compiled program reused across checks.

    ``fn`` is traced (cheap) and its program looked up by its printed text and host callbacks,
    as the engine's programs are (engine.Program): the arrays it closes over (the primals, the
    cotangents) are its jaxpr's constants, passed as dynamic arguments, so the same operation
    checked at new values, or written as a new closure, reuses the compiled code. A fresh
    ``jax.jit`` of a new closure per check would compile every time.

    A tiny program (its work under ``QUICK_SECONDS`` at ``WORK_RATE``, on a CPU) whose equations
    are not new to this process runs eagerly instead, its traced equations one by one: JAX keeps
    each equation's executable across calls, so a suite's new operation compiles only its own
    primitives (the basis tangent, the products and sums at the case's shapes are compiled once
    for the whole suite), where compiling the whole program costs 15-40 ms. A test suite checks
    most programs once or twice; one that ``EAGER_SIGHTS`` checks ran is compiled.
    """
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    # A program that runs in a blink compiles at XLA:CPU's quick level (options.QUICK_COMPILE):
    # there its compilation is the whole cost.
    quick = jax.default_backend() == "cpu" and sum(work(e) for e in closed.jaxpr.eqns) / WORK_RATE < QUICK_SECONDS
    key = (compat.jaxpr_text(closed.jaxpr), callbacks(closed.jaxpr), quick)
    treedef = jax.tree_util.tree_structure(shapes)
    scope = reuse_scope()
    with PROGRAM_LOCK:
        run = _PROGRAMS.pop(key, None)
        if run is not None:
            _PROGRAMS[key] = run  # the most recently used last: the oldest unused is dropped first
        seen = _SEEN.get(key)
        if seen is None:  # first sight: eager where its equations are not new (see _new_equations)
            eager = run is None and quick and _new_equations(closed.jaxpr) <= EAGER_NEW_EQUATIONS
            sights = 1
        else:  # ran eagerly before: again, until checks enough to pay for its compilation saw it
            sights = seen[1] + (scope is None or seen[0] != scope)
            eager = run is None and sights <= EAGER_SIGHTS
        if eager:
            remember(_SEEN, key, (scope, sights), most=PROGRAMS_KEPT)
            _EAGER[0] += 1
        else:
            _SEEN.pop(key, None)
    if eager:
        return jax.tree_util.tree_unflatten(
            treedef, jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
        )
    if run is None:
        jaxpr = closed.jaxpr

        def program(consts: list[Any], *a: Any) -> Any:
            return jax.core.eval_jaxpr(jaxpr, consts, *jax.tree_util.tree_leaves(a))

        lean = not compat.has_loop(jaxpr) and compat.lean_compile_ok()
        options = (QUICK_LEAN_COMPILE if lean else QUICK_COMPILE) if quick else None
        run = jax.jit(program, compiler_options=options)
        with PROGRAM_LOCK:
            remember(_PROGRAMS, key, run, most=PROGRAMS_KEPT)
            _COMPILED[0] += 1
    return jax.tree_util.tree_unflatten(treedef, run(list(closed.consts), *args))


def compiled_or_eager(fn: Callable[[], Any]) -> Any:
    """``fn()`` through ``run_compiled`` (one compiled program, reused by the next check of the same
    operation, instead of compiling each of its primitives for its first eager call), or eagerly
    where it cannot be traced (NumPy code, a non-array output): then any error is fn's own."""
    try:
        return run_compiled(fn)
    except Exception:  # noqa: BLE001 - run as written: the error it raises, if any, is the one to show
        return fn()


def jvp_yours(jvp_fn, inputs: _Inputs, primals, outs: _Outputs, U: np.ndarray, fn_out: PyTree) -> _Yours:
    Uj = jnp.asarray(U)
    leaves, treedef = jax.tree_util.tree_flatten(inputs.params(list(primals)))
    float_leaves = [x for x in leaves if is_floating(x)]
    sizes = [int(np.size(x)) for x in float_leaves]
    n = sum(sizes)
    seen = np.any(U != 0, axis=0)  # outputs left out (not finite at the primals) are seen by no row

    def tangent_out(leaf: int | None, i: Any) -> jax.Array:
        # J e_i from your JVP of the scaled basis tangent (see BASIS_SCALE).
        t = _flat(jvp_fn(tuple(primals), _basis_tangent(inputs, primals, leaf, i))[1]) / BASIS_SCALE
        return _only_seen(t, seen)

    def project(i: Any) -> jax.Array:  # entry i of the float leaves concatenated
        return Uj @ tangent_out(None, i).astype(Uj.dtype)

    first = _first_projections(jvp_fn, inputs, primals, outs, Uj, seen, n)
    if first is None:  # the first call alone, for the error it raises or to see it is well formed
        got = compiled_or_eager(lambda: jvp_fn(tuple(primals), _basis_tangent(inputs, primals, -1, 0)))
        _check_jvp_output(got, outs)
        start, vals = 0, []
    else:
        got, proj = first
        _check_jvp_output(got, outs)
        start, vals = proj.shape[0], [proj]
    _compare_out("jvp_fn", "jvp", got[0], fn_out)
    try:
        batched = jax.vmap(project)
        vals += [np.asarray(run_compiled(batched, jnp.arange(s, min(n, s + BATCH)))) for s in range(start, n, BATCH)]
    except _UNTRACEABLE:  # your JVP is not traceable: one tangent at a time
        vals = [np.stack([np.asarray(project(i)) for i in range(n)])]
    flat = np.concatenate(vals, axis=0)  # (n, k)
    ends = np.cumsum(sizes)
    per_leaf = [flat[e - size : e] for e, size in zip(ends, sizes)]
    projections = []
    for r in range(len(U)):
        it = iter([p[:, r].reshape(np.shape(x)) for p, x in zip(per_leaf, float_leaves)])
        tree = jax.tree_util.tree_unflatten(treedef, [next(it) if is_floating(x) else x for x in leaves])
        projections.append(tree)

    def column(cols: list[tuple[int, int]]) -> np.ndarray:
        return np.stack([np.asarray(tangent_out(li, i), np.float64) for li, i in cols], axis=1)

    return _Yours(projections, column)


def _first_projections(
    jvp_fn, inputs: _Inputs, primals, outs: _Outputs, Uj: jax.Array, seen: np.ndarray, n: int
) -> tuple[tuple[Any, Any], np.ndarray] | None:
    """Your JVP's primal output and tangent output (its first call, to validate) together with the
    first ``BATCH`` basis projections, as one program: one trace and one lookup where the two were
    two programs. None where that program cannot be built (a JVP that does not return a pair,
    whose primal output depends on the tangent, that cannot be traced): the first call alone then
    says what is wrong, as it did before, or runs the projections one by one."""
    shapes: list[Any] = []

    def one(i: Any) -> tuple[Any, jax.Array]:
        got = jvp_fn(tuple(primals), _basis_tangent(inputs, primals, None, i))
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise TypeError(MSG_JVP_RETURN.format(kind=type(got).__name__))
        shapes.append(jax.tree_util.tree_map(lambda t: jax.ShapeDtypeStruct(np.shape(t), t.dtype), got[1]))
        t = _only_seen(_flat(got[1]) / BASIS_SCALE, seen)
        return got[0], Uj @ t.astype(Uj.dtype)

    try:
        out, proj = run_compiled(jax.vmap(one, out_axes=(None, 0)), jnp.arange(0, min(n, BATCH)))
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    # The tangent output's structure and shapes, as traced (one tangent's, inside vmap).
    tangent = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes[-1])
    return (out, tangent), np.asarray(proj)


def _only_seen(t: jax.Array, seen: np.ndarray) -> jax.Array:
    """A flat tangent output with the outputs no cotangent sees set to 0 (they may be ±inf or NaN,
    which a cotangent's 0 would not cancel). lax.select, not jnp.where (a jitted call)."""
    if seen.all():
        return t
    return lax.select(jnp.asarray(seen), t, lax.full_like(t, 0))


def _check_jvp_output(got: Any, outs: _Outputs) -> None:
    """Your JVP's first call returns a pair whose tangent output has fn's output structure and shapes."""
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise TypeError(MSG_JVP_RETURN.format(kind=type(got).__name__))
    if jax.tree_util.tree_structure(got[1]) != outs.treedef:
        raise ValueError(
            MSG_STRUCTURE.format(
                who="jvp_fn's tangent output", got=jax.tree_util.tree_structure(got[1]), want=outs.treedef
            )
        )
    for path, t, shape in zip(outs.paths, jax.tree_util.tree_leaves(got[1]), outs.shapes):
        if tuple(np.shape(t)) != shape:
            raise ValueError(MSG_TANGENT.format(path=path, got=np.shape(t), want=shape))


def _locate(
    report: GradCheckReport,
    fn: Callable[..., Any],
    inputs: _Inputs,
    primals: Sequence[Any],
    args: Sequence[Any],
    outs: _Outputs,
    yours: _Yours,
    x64: bool,
    top_k: int,
    seen: np.ndarray,
) -> tuple[Entry, ...]:
    """For failing input entries, the full Jacobian column both ways: which outputs disagree
    (among the outputs ``seen``: those finite at the primals)."""
    failing: list[Entry] = []
    for e in report.worst:
        if e.status == "fail" and (e.path, e.index) not in {(f.path, f.index) for f in failing}:
            failing.append(e)
    failing = failing[:LOCATE_COLUMNS]
    if not failing or yours.column is None:
        return ()
    params = inputs.params(list(primals))
    flat_paths = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    float_paths = [(p, x) for p, x in flat_paths if is_floating(x)]
    cols, where = [], []
    for e in failing:
        li = next((k for k, (p, _) in enumerate(float_paths) if p == e.path), None)
        if li is None:
            continue
        shape = np.shape(float_paths[li][1])
        cols.append((li, int(np.ravel_multi_index(e.index, shape)) if shape else 0))
        where.append(e)
    if not cols:
        return ()
    with precision_scope(x64):
        P = _promote(tuple(primals), x64)
        leaves, treedef = jax.tree_util.tree_flatten(inputs.params(list(P)))
        float_pos = [k for k, x in enumerate(leaves) if is_floating(x)]
        flat_f = jax.jit(lambda *p: _flat(fn(*p, *args)))
        numerical = []
        for li, i in cols:
            x = np.asarray(leaves[float_pos[li]], np.float64)
            theta = x.reshape(-1)[i : i + 1]
            h = float(numerics.base_step(theta, x.dtype, "central")[0])
            vals = []
            for sign in (1.0, -1.0):
                moved = list(leaves)
                y = x.reshape(-1).copy()
                y[i] += sign * h
                moved[float_pos[li]] = jnp.asarray(y.reshape(x.shape), jnp.result_type(leaves[float_pos[li]]))
                vals.append(
                    np.asarray(flat_f(*inputs.primals(jax.tree_util.tree_unflatten(treedef, moved))), np.float64)
                )
            with np.errstate(invalid="ignore"):  # inf - inf at outputs left out: masked below
                numerical.append((vals[0] - vals[1]) / (2 * h))
        mine = yours.column(cols)
    out: list[Entry] = []
    for c, e in enumerate(where):
        num, got = numerical[c], mine[:, c]
        with np.errstate(invalid="ignore"):  # inf - inf at outputs left out (see vector_check)
            gap = np.where(seen, np.abs(got - num), 0.0)
        if not gap.size or not np.max(gap) > 0:
            continue
        # The largest disagreements of the column (a few; the worst first).
        for j in np.argsort(-gap)[:3]:
            if gap[j] < 0.1 * np.max(gap):
                break
            out.append(Entry(e.path, e.index, float(got[j]), float(num[j]), math.nan, "fail", output=outs.name(int(j))))
    out.sort(key=lambda e: -e.abs_error)
    return tuple(out[:top_k])


def _for_fn(warning: str) -> str:
    """A scalar check's warning in the words of a vector check (fn, your derivative)."""
    return (
        warning.replace("jax.grad(cost_fn)", "JAX's derivative of fn")
        .replace("jax.grad does not", "JAX's derivatives do not")
        .replace("cost_fn", "fn")
    )


def vector_check(
    kind: str,
    what: str,
    fn: Callable[..., Any],
    build: Callable[..., _Yours],
    primals: Sequence[Any],
    args: Sequence[Any],
    cotangents: int | None,
    options: dict[str, Any],
    out_name: str = "out",
    rebuild: Callable[[Callable[..., Any]], Callable[..., _Yours]] | None = None,
) -> GradCheckReport:
    """The shared walk of every vector check (see the module docstring).

    Outputs that are ±inf or NaN at the primals are left out (the report says how many). Where
    promotion to float64 breaks ``fn`` (a float32 init value or scan carry) and the derivative
    checked is JAX's own (``rebuild(fn)`` gives its ``build`` for another fn), fn is checked as
    you run it with its arithmetic widened to float64 (promote.py); otherwise, or where that
    cannot be done, the check runs again without promotion and says so.
    """
    _check_options(kind, options)
    if cotangents is not None and (isinstance(cotangents, bool) or not isinstance(cotangents, int) or cotangents < 1):
        raise ValueError(f"cotangents must be a positive integer or None; got {cotangents!r}.")
    check_live(kind, primals=tuple(primals), args=tuple(args))
    if kind == "check_jvp":
        real_primals(kind, fn, primals)
    option_clashes(kind, {"fn": fn}, (*primals, *args), {}, options)

    def run(x64: bool, f: Callable[..., Any] = fn, b: Callable[..., _Yours] = build) -> GradCheckReport:
        opts = {**options, "x64": x64} if "x64" in options or not x64 else options
        return _vector_check(f, b, primals, args, cotangents, opts, out_name, what)

    x64 = bool(options.get("x64", True))
    if not x64 or rebuild is None:
        return without_promotion_if_needed(run, x64, "fn", tuple(primals), tuple(args))
    try:
        return run(True)
    except TypeError as e:
        first = e
    # Promotion changed fn's program (a float32 carry or init value, int64 beside int32 indices):
    # check fn as you run it, its arithmetic widened to float64 (promote.py), with JAX's rules of that.
    wide = _widened_fn(fn, primals, args, custom_ok=getattr(rebuild, "custom_ok", False))
    if wide is not None:
        try:
            report = run(True, wide, rebuild(wide))
        except Exception:  # noqa: BLE001 - fall back to the inputs' own dtypes below
            pass
        else:
            return dataclasses.replace(report, warnings=(*report.warnings, MSG_WIDENED.format(error=_head(first))))
    return without_promotion_if_needed(
        lambda x64: _raise(first) if x64 else run(False), True, "fn", tuple(primals), tuple(args)
    )


def _raise(error: BaseException) -> Any:
    raise error


def _head(error: BaseException) -> str:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first if len(first) <= 160 else first[:157] + "..."


def _widened_fn(
    fn: Callable[..., Any], primals: Sequence[Any], args: Sequence[Any], custom_ok: bool = False
) -> Callable[..., Any] | None:
    """fn as traced at your dtypes with its arithmetic widened, or None: no input to widen, a
    custom rule where JAX's derivative of fn is what is checked (inlining it would check JAX's
    derivative instead of the rule; ``custom_ok`` where yours is checked against fn's values),
    a body promote.py cannot rebuild, or fn fails as you run it too."""
    if all(
        getattr(x, "dtype", None) in (np.float64, np.complex128)
        for x in jax.tree_util.tree_leaves(primals)
        if is_floating(x)
    ):
        return None
    try:
        closed, _ = promote.trace_as_run(fn, *primals, *args)
        if promote.has_custom_rules(closed) and not custom_ok:
            return None
        wide = promote.widened(fn, *primals, *args)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return functools.wraps(fn)(wide) if hasattr(fn, "__name__") else wide


def _vector_check(
    fn: Callable[..., Any],
    build: Callable[..., _Yours],
    primals: Sequence[Any],
    args: Sequence[Any],
    cotangents: int | None,
    options: dict[str, Any],
    out_name: str,
    what: str,
) -> GradCheckReport:
    x64, seed = bool(options.get("x64", True)), int(options.get("seed", 0))
    inputs = _Inputs.of(fn, primals)
    f = hashable(fn)
    with precision_scope(x64):
        P = _promote(tuple(primals), x64)
        # Once per check_rules call: its forward and reverse checks see the same output.
        fn_out = shared("output", fn, (P, args, x64), lambda: compiled_or_eager(lambda: fn(*P, *args)))
        outs = _Outputs.of(fn_out, out_name)
        keep = _finite(fn_out)
        U, exact = _cotangents(outs.size, cotangents, seed)
        U = U.astype(np.float64 if x64 else np.result_type(*outs.dtypes))
        rows = np.arange(len(U))  # exact: which output each row sees
        notes: list[str] = []
        if not keep.all():
            if not keep.any():
                raise ValueError(MSG_ALL_NONFINITE.format(detail=_nonfinite_detail(fn_out, keep)))
            if exact:
                rows = rows[keep]
                U = U[keep]
            else:
                U[:, ~keep] = 0.0
            first = outs.name(int(np.flatnonzero(~keep)[0]))
            notes.append(
                MSG_LEFT_OUT.format(
                    n=int((~keep).sum()), m=outs.size, detail=_nonfinite_detail(fn_out, keep), first=first
                )
            )
        yours = build(inputs, P, outs, U, fn_out)
        if not keep.all():
            projections, bad = _zero_nonfinite(yours.projections)
            yours = _Yours(projections, yours.column)
            if bad:
                notes.append(MSG_NAN_YOURS.format(n=bad))
    cost = _Projected(f, inputs, masked=not keep.all())
    params = inputs.params(list(primals))
    # Every projection is the same program of fn (u is an argument): traced once (three times for
    # the determinism check), not once per projection.
    with reuse_traces():
        reports = [check_grad(cost, y, params, u, *args, **options) for y, u in zip(yours.projections, U)]
    if exact:
        # Each check is one output's row of the Jacobian: its entries are Jacobian entries.
        named = []
        for j, r in enumerate(reports):
            o = int(rows[j])
            s = float(U[j, o])  # the cotangent's scale: the entries are s × J[o, i]

            def entry(e: Entry, s: float = s, o: int = o) -> Entry:
                return dataclasses.replace(
                    e,
                    yours=e.yours / s,
                    numerical=e.numerical / s,
                    error_estimate=e.error_estimate / abs(s),
                    left=e.left / s,
                    right=e.right / s,
                    output=outs.name(o),
                )

            # Every value shown is the derivative itself, ∂out[o]/∂x[i]: the leaf rows too.
            leaves = tuple(
                dataclasses.replace(
                    row, worst=None if row.worst is None else entry(row.worst), scale=row.scale / abs(s)
                )
                for row in r.leaves
            )
            named.append(dataclasses.replace(r, worst=tuple(entry(e) for e in r.worst), leaves=leaves))
        merged = merge_reports(named, top_k=int(options.get("top_k", 10)))
        jac = tuple(e for e in merged.worst if e.status == "fail")
        how = f"; outputs one by one ({outs.size}: the full Jacobian entry by entry)"
    else:
        merged = merge_reports(reports, top_k=int(options.get("top_k", 10)))
        jac = _locate(merged, f, inputs, primals, args, outs, yours, x64, int(options.get("top_k", 10)), keep)
        how = f"; {outs.size:,} outputs seen through {len(U)} random cotangents u (yours and numerical: uᵀJ)"
        if not merged.passed and yours.column is None:
            how += f" (too many outputs to name the output index: {outs.size:,} > {LOCATE_MAX_OUTPUTS:,})"
    # The custom-rule warnings of the scalar check speak of jax.grad of a cost: not what is checked here.
    warnings = tuple(_for_fn(w) for w in merged.warnings if not w.startswith("cost_fn uses custom_")) + tuple(notes)
    return dataclasses.replace(merged, what=what, jacobian=jac, mode=merged.mode + how, warnings=warnings)
