"""Rewriting a problem into the real, positional form the check works on.

Two rewrites, both done before the problem is prepared, so every later stage sees only real
floating leaves and positional arguments:

* keyword arguments for your functions become one trailing positional argument (a dict), and
  are passed back as keywords inside;
* a complex leaf ``z`` becomes two real leaves ``z.real`` and ``z.imag``; the cost sees
  ``z.real + 1j·z.imag``, and your gradient is read in JAX's convention (below).

JAX's convention for a real cost J of complex z = x + iy: ``jax.grad(J)(z)`` is
∂J/∂x − i·∂J/∂y (the conjugate of PyTorch's ∂J/∂x + i·∂J/∂y). So yours is compared as
``real(g)`` against ∂J/∂x and ``-imag(g)`` against ∂J/∂y.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src.report import GradCheckReport
from jgradcheck._src.tree import conform, is_floating, path_str

PyTree = Any

MSG_CONJUGATE = (
    "yours is the conjugate of JAX's convention: for a real cost of complex z = x + iy, "
    "jax.grad returns ∂J/∂x − i·∂J/∂y (PyTorch returns its conjugate); return jnp.conj(yours)"
)


class ReIm(NamedTuple):
    """A complex leaf as its two real parts (paths ``z.real`` and ``z.imag`` in the report)."""

    real: Any
    imag: Any


def is_complex(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if isinstance(x, complex):
        return True
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.complexfloating))
    except TypeError:
        return False


def has_complex(tree: PyTree) -> bool:
    return any(is_complex(x) for x in jax.tree_util.tree_leaves(tree))


def split_complex(tree: PyTree) -> PyTree:
    """Each complex leaf becomes ``ReIm(real, imag)`` (on the host: no compilation)."""

    def one(x: Any) -> Any:
        if not is_complex(x):
            return x
        arr = np.asarray(x)
        return ReIm(arr.real.copy(), arr.imag.copy())

    return jax.tree_util.tree_map(one, tree)


def join_complex(tree: PyTree) -> PyTree:
    """Inverse of :func:`split_complex`, traceable."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.complex(x.real, x.imag) if isinstance(x, ReIm) else x,
        tree,
        is_leaf=lambda x: isinstance(x, ReIm),
    )


def complex_mask(params: PyTree) -> tuple[bool, ...]:
    """Which leaves of ``params`` (in flattening order) are complex."""
    return tuple(is_complex(x) for x in jax.tree_util.tree_leaves(params))


def grad_as_parts(grads: PyTree, mask: tuple[bool, ...]) -> PyTree:
    """Your gradient (complex leaves where params has them) as ``ReIm(∂J/∂x, ∂J/∂y)`` leaves.

    JAX's convention: yours = ∂J/∂x − i·∂J/∂y, so ∂J/∂y = −imag(yours).
    """
    flat_g, treedef = jax.tree_util.tree_flatten(grads)
    if len(flat_g) != len(mask):
        return grads  # the structure check downstream names the missing or extra leaves
    parts = [ReIm(jnp.real(g), -jnp.imag(g)) if m else g for g, m in zip(flat_g, mask)]
    return jax.tree_util.tree_unflatten(treedef, parts)


@dataclasses.dataclass(frozen=True)
class Form:
    """params' structure, to read your gradient in it (NNX ``State`` or pure dict, linen collection, ...)."""

    treedef: Any
    paths: tuple[tuple[Any, ...], ...]
    floating: tuple[bool, ...]

    @classmethod
    def of(cls, params: PyTree, select: Any = None) -> Form:
        """params' form; with ``select`` (``only=``), only the leaves it keeps must be in yours."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        floating = tuple(
            (is_floating(x) or is_complex(x)) and (select is None or bool(select(path_str(p), x))) for p, x in flat
        )
        return cls(treedef, tuple(tuple(p) for p, _ in flat), floating)

    def __call__(self, yours: PyTree) -> PyTree:
        return conform(yours, self.treedef, self.paths, self.floating)


@dataclasses.dataclass(frozen=True)
class Wrapped:
    """``fn`` called on rewritten inputs: complex leaves rejoined, keywords re-expanded.

    Hashable by the wrapped function, so the compiled programs of a cost are reused.
    """

    fn: Any
    complex_params: bool = False
    kwargs: bool = False
    grad_mask: tuple[bool, ...] | None = None  # a gradient function: which params leaves are complex
    form: Form | None = None  # a gradient function: params' structure, to read yours in it

    def __call__(self, params: PyTree, *args: Any) -> Any:
        kw: dict[str, Any] = {}
        if self.kwargs:
            args, kw = args[:-1], args[-1]
        if self.complex_params:
            params = join_complex(params)
        out = self.fn(params, *args, **kw)
        if self.form is not None:
            out = self.form(out)
        if self.grad_mask is not None:
            out = grad_as_parts(out, self.grad_mask)
        return out

    def __hash__(self) -> int:
        try:
            h = hash(self.fn)
        except TypeError:
            h = id(self.fn)
        return hash((h, self.complex_params, self.kwargs, self.grad_mask, self.form))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Wrapped)
            and other.fn is self.fn
            and (other.complex_params, other.kwargs, other.grad_mask, other.form)
            == (self.complex_params, self.kwargs, self.grad_mask, self.form)
        )


def conjugate_diagnosis(report: GradCheckReport) -> GradCheckReport:
    """Names the conjugate convention when a complex leaf's imaginary part is exactly sign-flipped."""
    rows = list(report.leaves)
    changed = False
    for k, row in enumerate(rows):
        if not (row.path == "imag" or row.path.endswith(".imag")) or row.passed:
            continue
        real = next((r for r in rows if r.path == row.path[: -len("imag")] + "real"), None)
        if real is not None and real.passed and row.diagnosis and row.diagnosis.startswith("sign flipped"):
            rows[k] = dataclasses.replace(row, diagnosis=MSG_CONJUGATE)
            changed = True
    return dataclasses.replace(report, leaves=tuple(rows)) if changed else report


MSG_KWARGS = (
    "{fn} does not take the keyword argument(s) {names}: keyword arguments of check_grad that are "
    "not its own options are passed on to cost_fn and grad_fn ({error}). Check the spelling of "
    "an option, or bind arguments first with functools.partial(cost_fn, {first}=...)."
)


@dataclasses.dataclass(frozen=True)
class Rewritten:
    """The problem in real, positional form; ``complex_mask`` is None without complex leaves."""

    cost_fn: Any
    grad_fn: Any
    params: PyTree
    args: tuple[Any, ...]
    complex_mask: tuple[bool, ...] | None


def rewrite(
    cost_fn: Any,
    grad_fn: Any,
    params: PyTree,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    select: Any = None,
) -> Rewritten:
    """Keywords become a trailing argument; complex leaves become real pairs (see module doc); your
    gradient is read in params' structure (:func:`jgradcheck._src.tree.conform`), where only the
    leaves ``select`` keeps (``only=``) must be present."""
    form = Form.of(params, select) if grad_fn is not None else None
    if grad_fn is not None and not callable(grad_fn):
        grad_fn = form(grad_fn) if form is not None else grad_fn
    cplx = has_complex(params)
    if not cplx and not kwargs:
        grad = Wrapped(grad_fn, form=form) if callable(grad_fn) else grad_fn
        return Rewritten(cost_fn, grad, params, tuple(args), None)
    mask = complex_mask(params) if cplx else None
    if kwargs:
        args = (*args, dict(kwargs))
    cost = Wrapped(cost_fn, cplx, bool(kwargs)) if callable(cost_fn) else cost_fn
    if callable(grad_fn):
        grad = Wrapped(grad_fn, cplx, bool(kwargs), mask, form)
    else:
        grad = grad_as_parts(grad_fn, mask) if mask is not None else grad_fn
    return Rewritten(cost, grad, split_complex(params) if cplx else params, tuple(args), mask)


def join_grad(grads: PyTree, mask: tuple[bool, ...] | None) -> PyTree:
    """A numerical gradient of split params back in JAX's complex convention: ∂J/∂x − i·∂J/∂y."""
    if mask is None:
        return grads
    return jax.tree_util.tree_map(
        lambda x: x.real - 1j * x.imag if isinstance(x, ReIm) else x, grads, is_leaf=lambda x: isinstance(x, ReIm)
    )
