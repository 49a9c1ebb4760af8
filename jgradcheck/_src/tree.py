"""Splitting a parameter pytree into the floating leaves that are checked and the rest.

Integer and boolean leaves (step counters, PRNG keys, masks) ride along untouched: they
are never raveled into θ, because `ravel_pytree` promotes mixed dtypes and mangles uint32
PRNG keys (jax-ml/jax#6136, #29593).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

PyTree = Any

MSG_COMPLEX = (
    "{name} leaf {path!r} is complex ({dtype}); jgradcheck checks real parameters only. "
    "Split it into real and imaginary parts (two real leaves) and write J in terms of them."
)
MSG_NO_FLOAT = (
    "params has no floating-point leaves, so there is nothing to check (leaf dtypes: {dtypes}). "
    "Pass the weights as float arrays, e.g. jnp.asarray(w, jnp.float32)."
)
MSG_TRACED = (
    "{fn} was called inside a JAX transformation ({where}): it runs your functions many times and "
    "reads concrete numbers, so jax.jit, jax.vmap and jax.grad cannot trace it. Call {fn} outside jit, "
    "vmap and grad, on concrete arrays (in a test, or after the training step)."
)
MSG_DELETED = (
    "{name}{path} has been deleted (donated to a jitted function through donate_argnums or "
    "donate_argnames, or freed with .delete()): its buffer is gone. Pass a live copy, e.g. "
    "jax.tree_util.tree_map(jnp.copy, {name}) taken before the call that donates it."
)
MSG_UNHASHABLE = (
    "{name} leaf {path!r} is neither an array nor hashable ({kind}); jgradcheck passes "
    "non-array leaves to your function as compile-time constants. Convert it to an array "
    "or close over it in cost_fn."
)


def check_live(fn: str, **trees: PyTree) -> None:
    """Raises a teaching error when ``fn`` is called under a JAX trace or with a deleted array.

    Args:
      fn: the public function called (``check_grad``), for the message.
      **trees: the pytrees it was given, by argument name (``params=..., args=...``).

    Raises:
      TypeError: a leaf is a tracer, or JAX is tracing (a cost that closes over a traced value).
      ValueError: a leaf is a deleted (donated) array.
    """
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.core.Tracer):
                where = f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}"
                raise TypeError(MSG_TRACED.format(fn=fn, where=where))
            if isinstance(leaf, jax.Array) and leaf.is_deleted():
                raise ValueError(MSG_DELETED.format(name=name, path=jax.tree_util.keystr(path)))
    if not _top_level():
        raise TypeError(MSG_TRACED.format(fn=fn, where="JAX is tracing the code that called it"))


def _top_level() -> bool:
    """Whether no JAX transformation is tracing the caller (JAX's private trace state; True if it moved)."""
    try:
        from jax._src import core
    except ImportError:  # pragma: no cover - JAX reorganized
        return True
    clean = getattr(core, "trace_state_clean", None)
    return True if clean is None else bool(clean())


def _key_str(key: Any, first: bool) -> str:
    if isinstance(key, DictKey):
        k = key.key
        if isinstance(k, str) and k.isidentifier():
            return k if first else f".{k}"
        return f"[{k!r}]"
    if isinstance(key, GetAttrKey):
        return key.name if first else f".{key.name}"
    if isinstance(key, SequenceKey):
        return f"[{key.idx}]"
    if isinstance(key, FlattenedIndexKey):
        return f"[{key.key}]"
    return f"[{key!s}]"


def path_str(path: tuple[Any, ...]) -> str:
    """Renders a key path readably: ``W2``, ``layers[0].w``, ``enc.b``; the root is ``<root>``."""
    if not path:
        return "<root>"
    return "".join(_key_str(k, i == 0) for i, k in enumerate(path))


def is_floating(x: Any) -> bool:
    """Whether a leaf is a real floating-point array or Python float."""
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:  # extended dtypes such as typed PRNG keys
        return False


def _is_complex(x: Any) -> bool:
    if isinstance(x, complex):
        return True
    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.complexfloating))
    except TypeError:
        return False


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of a pytree goes: checked float leaf, dynamic array, or static constant.

    Hashable, so it can be a static argument of the jitted engine: the same structure gives
    an equal layout, and re-checking at new values of the same shapes hits the jit cache.
    """

    treedef: Any
    paths: tuple[str, ...]
    kinds: tuple[str, ...]  # "float" | "array" | "static" per leaf
    statics: tuple[Any, ...]  # the static leaves' values, in order

    @property
    def float_paths(self) -> tuple[str, ...]:
        return tuple(p for p, k in zip(self.paths, self.kinds) if k == "float")

    def merge(self, floats: list[Any], arrays: list[Any]) -> PyTree:
        """Rebuilds the pytree from its float leaves and dynamic non-float leaves."""
        fi, ai, si = iter(floats), iter(arrays), iter(self.statics)
        leaves = [next(fi) if k == "float" else next(ai) if k == "array" else next(si) for k in self.kinds]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


MSG_ONLY_NONE = (
    "only={only!r} matches no floating leaf of params. Its floating leaves are: {paths}. A pattern names a "
    "leaf as the report prints it ('W1', 'layers[0].w'), or a subtree ('layers[0]'); * and ? are wildcards "
    "('layers[*].w'), brackets are literal."
)
MSG_ONLY_TYPE = (
    "only= takes a leaf path pattern ('W1', 'layers[0].*'), a list of them, or a function (path, leaf) -> bool; "
    "got {kind}."
)

Only = str | Sequence[str] | Callable[[str, Any], bool] | None

# The leaves a check perturbs (``only=``), for ``split`` of params during this check; None: all of them.
_SELECTED: contextvars.ContextVar[Callable[[str, Any], bool] | None] = contextvars.ContextVar(
    "jgradcheck_selected", default=None
)


def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` are wildcards; everything else, brackets included, is literal (``layers[0].w``)."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    # The pattern names the leaf itself or a subtree of it: "layers[0]" selects "layers[0].w".
    return re.compile(f"(?:{body})(?:[.\\[].*)?", re.DOTALL)


def selector(only: Only, params: PyTree) -> Callable[[str, Any], bool] | None:
    """``only=`` as a predicate on (printed path, leaf), checked against params' floating leaves.

    Args:
      only: None (every leaf), a pattern or list of patterns on the printed leaf path, or a
        predicate ``(path, leaf) -> bool``.
      params: the parameters, to check that the selection is not empty.

    Returns:
      None for every leaf, or the predicate.

    Raises:
      ValueError: the selection has no floating leaf (the message lists them).
      TypeError: ``only`` is of another type.
    """
    if only is None:
        return None
    if callable(only):
        select = only
    elif isinstance(only, str) or (isinstance(only, Sequence) and only and all(isinstance(p, str) for p in only)):
        patterns = [_glob(p) for p in ([only] if isinstance(only, str) else only)]

        def select(path: str, leaf: Any) -> bool:
            return any(g.fullmatch(path) for g in patterns)

    else:
        raise TypeError(MSG_ONLY_TYPE.format(kind=f"{type(only).__name__} {only!r}"[:80]))
    floats = [
        (path_str(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if is_floating(leaf) or _is_complex(leaf)
    ]
    if not any(select(p, leaf) for p, leaf in floats):
        raise ValueError(MSG_ONLY_NONE.format(only=only, paths=", ".join(p for p, _ in floats) or "none"))
    return select


@contextlib.contextmanager
def only_scope(select: Callable[[str, Any], bool] | None) -> Iterator[None]:
    """Within: ``split`` of params leaves the floating leaves that ``select`` rejects unperturbed."""
    token = _SELECTED.set(select)
    try:
        yield
    finally:
        _SELECTED.reset(token)


def _on_device(x: Any) -> jax.Array:
    """``x`` as a JAX array. A NumPy array is transferred (``jax.device_put``): ``jnp.asarray`` of
    one compiles a small conversion program per shape and dtype, 30-40 ms each on a CPU, most of
    a small check's preparation; anything else goes through ``jnp.asarray``."""
    if isinstance(x, np.ndarray) and x.dtype == jax.dtypes.canonicalize_dtype(x.dtype):
        return jax.device_put(x)
    return jnp.asarray(x)


def split(
    tree: PyTree, name: str, float_dtype: Any | None, *, python_floats: bool
) -> tuple[Layout, list[jax.Array], list[Any]]:
    """Splits ``tree`` into a layout, its floating leaves (cast to ``float_dtype`` if given) and array leaves.

    Args:
      tree: the pytree (``params`` or the extra arguments).
      name: what to call it in error messages.
      float_dtype: dtype to cast floating leaves to, or None to keep each leaf's dtype.
      python_floats: whether Python floats are checked leaves (params) or constants (args).

    Within :func:`only_scope`, the floating leaves of params that ``only=`` leaves out are
    dynamic arrays (cast like the others, never perturbed).

    Raises:
      TypeError: a complex leaf, or a non-array leaf that cannot be a static constant.
    """
    select = _SELECTED.get() if python_floats else None
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, kinds, statics, floats, arrays = [], [], [], [], []
    for path, leaf in flat:
        p = path_str(path)
        paths.append(p)
        if _is_complex(leaf) and python_floats:  # complex data in args rides along like any array
            raise TypeError(MSG_COMPLEX.format(name=name, path=p, dtype=getattr(leaf, "dtype", "complex")))
        if is_floating(leaf) and (_is_array(leaf) or python_floats):
            if select is not None and not select(p, leaf):
                want = float_dtype or jax.dtypes.canonicalize_dtype(np.dtype(getattr(leaf, "dtype", np.float64)))
                arrays.append(_on_device(np.asarray(leaf, dtype=want)))
                kinds.append("array")
                continue
            if float_dtype is not None and np.dtype(getattr(leaf, "dtype", np.float64)) != float_dtype:
                # Cast on the host: an eager astype would compile a small program per shape.
                floats.append(_on_device(np.asarray(leaf, dtype=float_dtype)))
            else:
                # Keep the leaf's dtype as far as JAX's current x64 setting allows (float64
                # becomes float32 when x64 is off, as everywhere in JAX), converting on the host.
                want = jax.dtypes.canonicalize_dtype(np.dtype(getattr(leaf, "dtype", np.float64)))
                floats.append(
                    _on_device(np.asarray(leaf, dtype=want))
                    if want != getattr(leaf, "dtype", None)
                    else _on_device(leaf)
                )
            kinds.append("float")
        elif _is_array(leaf):
            arrays.append(_on_device(leaf))
            kinds.append("array")
        else:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(MSG_UNHASHABLE.format(name=name, path=p, kind=type(leaf).__name__)) from None
            statics.append(leaf)
            kinds.append("static")
    return Layout(treedef, tuple(paths), tuple(kinds), tuple(statics)), floats, arrays


# Yours in another form than params: the forms of one model's parameters that the frameworks hand out.
MSG_FORM = (
    "your gradient's leaves ({yours}) match neither params' own form ({own}) nor its {alt} form ({alt_paths}). "
    "{missing}Return your gradient in one of these two forms: the same structure as params ({how_own}), or {how_alt}."
)


def _segments(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A key path as plain names, the same for a dict key, an attribute and a NamedTuple field."""
    out = []
    for k in path:
        if isinstance(k, (DictKey, FlattenedIndexKey)):
            out.append(str(k.key))
        elif isinstance(k, GetAttrKey):
            out.append(k.name)
        elif isinstance(k, SequenceKey):
            out.append(f"[{k.idx}]")
        else:
            out.append(str(k))
    return tuple(out)


def _is_value_key(k: Any) -> bool:
    # flax NNX wraps each array in a Variable whose pytree key is the attribute ``value``.
    return isinstance(k, GetAttrKey) and k.name == "value"


def _pure(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The path without NNX's ``.value`` keys: ``nnx.to_pure_dict(state)``'s path of the same leaf."""
    return _segments(tuple(k for k in path if not _is_value_key(k)))


def _common_head(paths: list[tuple[str, ...]]) -> str | None:
    """The first segment every path shares (linen's ``'params'`` collection), or None."""
    heads = {p[0] for p in paths if p}
    return next(iter(heads)) if len(heads) == 1 and all(len(p) > 1 for p in paths) else None


def conform(yours: PyTree, treedef: Any, paths: tuple[tuple[Any, ...], ...], floating: tuple[bool, ...]) -> PyTree:
    """Your gradient in params' own structure, matched leaf by leaf by path.

    Yours may come in params' structure (returned unchanged) or in another form of the same
    parameters: an NNX ``State`` against ``nnx.to_pure_dict(state)`` (either way round), a linen
    variable dict against its ``'params'`` collection (either way round), a NamedTuple against
    a dict of its fields. Leaves are matched by their path with NNX's ``.value`` keys and one
    shared top-level key dropped where needed.

    Args:
      yours: your gradient pytree.
      treedef: the structure of params.
      paths: the key path of each leaf of params.
      floating: which leaves of params are checked.

    Returns:
      ``yours`` itself where its paths already cover params' checked leaves, or a pytree with
      params' structure holding your leaves (zeros at the unchecked leaves); ``yours`` unchanged
      where no form fits and params has no other form (the structure check then names the
      missing and extra leaves).

    Raises:
      ValueError: params has another form (NNX, linen) and yours fits neither.
    """
    flat = jax.tree_util.tree_flatten_with_path(yours)[0]
    if len(flat) == 1 and not flat[0][0]:
        return yours  # a bare array: a scalar parameter, or a cost returned by mistake (named downstream)
    want = [path_str(p) for p, f in zip(paths, floating) if f]
    got = {path_str(p) for p, _ in flat}
    if all(w in got for w in want):
        return yours
    mine = [(_pure(p), leaf) for p, leaf in flat]
    theirs = [_pure(p) for p in paths]
    head_t = _common_head([t for t, f in zip(theirs, floating) if f])
    head_m = _common_head([m for m, _ in mine])
    for drop_t, drop_m in ((None, None), (head_t, None), (None, head_m)):
        key_t = [t[1:] if drop_t is not None else t for t in theirs]
        by = {(m[1:] if drop_m is not None else m): leaf for m, leaf in mine}
        if len(by) == len(mine) and all(k in by for k, f in zip(key_t, floating) if f):
            leaves = [by[k] if f else np.zeros((), np.int8) for k, f in zip(key_t, floating)]
            return jax.tree_util.tree_unflatten(treedef, leaves)
    alt = _other_form(paths, floating)
    if alt is None:
        return yours
    name, alt_paths, how_own, how_alt = alt
    lacks = min(([w for w in want if w not in got], [a for a in alt_paths if a not in got]), key=len)
    raise ValueError(
        MSG_FORM.format(
            yours=_few(sorted(got)),
            own=_few(want),
            alt=name,
            alt_paths=_few(alt_paths),
            how_own=how_own,
            how_alt=how_alt,
            missing=f"Closest, it lacks {_few(lacks)}. " if lacks else "",
        )
    )


def _few(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _other_form(
    paths: tuple[tuple[Any, ...], ...], floating: tuple[bool, ...]
) -> tuple[str, list[str], str, str] | None:
    """The other form of params that yours may take (NNX pure dict, linen collection), for the error."""
    checked = [p for p, f in zip(paths, floating) if f]
    if any(_is_value_key(k) for p in checked for k in p):
        pure = [path_str(tuple(k for k in p if not _is_value_key(k))) for p in checked]
        return "pure-dict", pure, "an nnx.State, e.g. from nnx.split", "its pure dict, as nnx.to_pure_dict(state) gives"
    head = _common_head([_segments(p) for p in checked])
    if head == "params":  # flax linen's variables dict
        inner = [path_str(p[1:]) for p in checked]
        return (
            f"{head!r}-collection",
            inner,
            f"a variables dict {{{head!r}: ...}}",
            f"the {head!r} collection alone, variables[{head!r}]",
        )
    return None
