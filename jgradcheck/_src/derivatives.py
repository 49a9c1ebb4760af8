"""Vector derivatives: VJPs, JVPs, JAX's own rules, Hessian-vector products.

Each is checked through the scalar check, so every stage (steps, noise, error estimates,
kinks, precision, modes, the report) is the one ``check_grad`` uses. For a function
f: primals → outputs with Jacobian J and a cotangent u over the outputs, the scalar cost
``J_u(x) = ⟨u, f(x)⟩`` has the gradient ``uᵀJ``:

* for a VJP, ``pullback(u)`` is your ``uᵀJ``;
* for a JVP, ``⟨u, jvp(eᵢ)⟩`` over every input entry i is (your ``J eᵢ`` projected on u);
* a Hessian-vector product is the JVP of ``jax.grad(cost)``.

Every input entry is perturbed (all columns of J by central differences), and the outputs
are seen through ``cotangents`` random Gaussian cotangents (or, with few outputs, through
each output in turn: the full Jacobian entry by entry). A wrong column cannot hide from a
random Gaussian projection except on a set of measure zero. For the columns that fail, the
full column is then computed both ways and the disagreeing entries are named with their
output leaf and index (``report.jacobian``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src.check import option_clashes
from jgradcheck._src.merge import merge_reports
from jgradcheck._src.problem import reuse_traces
from jgradcheck._src.registry import recorded
from jgradcheck._src.report import GradCheckReport
from jgradcheck._src.tree import check_live, conform, is_floating
from jgradcheck._src.vector import (
    MSG_HVP_SHAPE,
    MSG_MODES,
    MSG_NO_FWD,
    MSG_NO_PRIMALS,
    MSG_ORDER,
    jvp_yours,
    real_primals,
    vector_check,
    vjp_yours,
)

PyTree = Any

MSG_VJP_FORM = (
    "check_vjp(fn, vjp_fn, *primals): vjp_fn must be a function with jax.vjp's signature "
    "(vjp_fn(*primals) returns (out, pullback)), or a custom_vjp rule's pair (fwd, bwd) as you pass it "
    "to defvjp; got {got}."
)
MSG_VJP_CUSTOM = (
    " It is the jax.custom_vjp function itself: pass its rule, check_vjp(fn, (fn_fwd, fn_bwd), *primals), "
    "or check JAX's derivative of it with check_rules(fn, *primals)."
)
MSG_FWD_RETURN = (
    "fwd(*primals) must return (out, residuals), as a custom_vjp fwd rule does; it returned {kind}. "
    "Return fn's output and what bwd needs: return out, (x, w)."
)
MSG_BWD_RETURN = (
    "bwd(residuals, cotangent) returned {got} for {want} primal(s); as defvjp requires, it must return a "
    "tuple with one cotangent per primal, in the primals' order (for one primal: return (g,))."
)


def _timed(check: Callable[..., GradCheckReport]) -> Callable[..., GradCheckReport]:
    """The report's ``seconds`` is the call's wall time (building yours, every projection's
    check, locating failing outputs), not the sum of the scalar checks inside it."""

    @functools.wraps(check)
    def timed(*args: Any, **kwargs: Any) -> GradCheckReport:
        start = time.perf_counter()
        report = check(*args, **kwargs)
        return dataclasses.replace(report, seconds=time.perf_counter() - start)

    return timed


@recorded
@_timed
def check_vjp(
    fn: Callable[..., Any],
    vjp_fn: Callable[..., Any] | tuple[Callable[..., Any], Callable[..., Any]],
    *primals: Any,
    cotangents: int | None = None,
    **options: Any,
) -> GradCheckReport:
    """Checks your vector-Jacobian product (a layer's backward pass) against finite differences.

    Every input entry is perturbed (each column of the Jacobian by central differences, on
    the engine of :func:`check_grad`), and compared with your pullback applied to cotangents:
    each output in turn when there are at most 4 outputs (the full Jacobian entry by entry),
    else ``cotangents`` random Gaussian ones (default 2). For failing input entries the full
    Jacobian column is then computed both ways, and ``report.jacobian`` names the output leaf
    and index of each disagreement. The error-aware verdict, kinks, precision and diagnosis
    are those of :func:`check_grad`.

    Args:
      fn: ``fn(*primals)`` returning any pytree of real floating arrays.
      vjp_fn: with ``jax.vjp``'s signature: ``vjp_fn(*primals)`` returns ``(out, pullback)`` and
        ``pullback(cotangent)`` a tuple with one cotangent per primal. ``jax.vjp`` itself is
        correct by definition (``fn`` is bound to it). Or a ``jax.custom_vjp`` rule's pair
        ``(fwd, bwd)`` as written for ``defvjp``: ``fwd(*primals)`` returns ``(out, residuals)``
        and ``bwd(residuals, cotangent)`` a tuple with one cotangent per primal (None for a zero
        one). Bind ``nondiff_argnums`` arguments with ``functools.partial`` first.
      *primals: the point to check at; every floating leaf is an input.
      cotangents: how many random cotangents (None: each output when there are at most 4, else 2).
      **options: options of :func:`check_grad` (``x64``, ``eps``, ``method``, ``mode``,
        ``rtol``, ``atol``, ``seed``, ...).

    Returns:
      A :class:`GradCheckReport` whose rows are the primals' leaves (named after ``fn``'s
      parameters), ``what="your VJP"``.

    Raises:
      TypeError: ``vjp_fn`` is neither a function nor a ``(fwd, bwd)`` pair; it does not return
        ``(out, pullback)`` (``fwd`` not ``(out, residuals)``, ``bwd`` not a tuple); a
        non-floating output; an unknown option.
      ValueError: the pullback (or ``bwd``) returns the wrong number of cotangents or a wrong
        shape; its primal output differs from ``fn``'s.

    Examples:
      >>> import jax, jax.numpy as jnp, jgradcheck
      >>> def layer(x, w):
      ...     return jnp.tanh(x @ w)
      >>> def layer_vjp(x, w):
      ...     y = jnp.tanh(x @ w)
      ...     def pullback(dy):
      ...         dz = dy * (1 - y**2)
      ...         return dz @ w.T, x.T @ dz
      ...     return y, pullback
      >>> x, w = jnp.ones((2, 3)), jnp.full((3, 4), 0.1)
      >>> jgradcheck.check_vjp(layer, layer_vjp, x, w).passed
      True

      A custom rule's pair, as written for ``defvjp``:

      >>> def layer_fwd(x, w):
      ...     y = jnp.tanh(x @ w)
      ...     return y, (x, w, y)
      >>> def layer_bwd(res, dy):
      ...     x, w, y = res
      ...     dz = dy * (1 - y**2)
      ...     return dz @ w.T, x.T @ dz
      >>> jgradcheck.check_vjp(layer, (layer_fwd, layer_bwd), x, w).passed
      True
    """
    rule = _vjp_form(vjp_fn, len(primals))
    return _check_rule("check_vjp", "your VJP", fn, rule, jax.vjp, vjp_yours, primals, cotangents, options)


def _vjp_form(vjp_fn: Any, n_primals: int) -> Callable[..., Any]:
    """``vjp_fn`` in jax.vjp's form: a function as it is, a ``(fwd, bwd)`` pair adapted; else a
    TypeError that shows both forms."""
    if isinstance(vjp_fn, (tuple, list)):
        if len(vjp_fn) == 2 and all(callable(f) for f in vjp_fn):
            return _from_pair(vjp_fn[0], vjp_fn[1], n_primals)
        kinds = ", ".join(type(f).__name__ for f in vjp_fn)
        raise TypeError(MSG_VJP_FORM.format(got=f"a {type(vjp_fn).__name__} of {len(vjp_fn)} ({kinds})"))
    if not callable(vjp_fn):
        raise TypeError(MSG_VJP_FORM.format(got=f"a {type(vjp_fn).__name__}"))
    if isinstance(vjp_fn, jax.custom_vjp):
        return _custom_vjp_hint(vjp_fn)
    return vjp_fn


def _custom_vjp_hint(f: Any) -> Callable[..., Any]:
    """The custom_vjp function itself, passed as vjp_fn: it returns its output, not a pair; say so."""

    def vjp_fn(*primals: Any) -> Any:
        got = f(*primals)
        if isinstance(got, (tuple, list)) and len(got) == 2 and callable(got[1]):
            return got
        raise TypeError(MSG_VJP_FORM.format(got="a jax.custom_vjp function") + MSG_VJP_CUSTOM)

    return vjp_fn


def _from_pair(fwd: Callable[..., Any], bwd: Callable[..., Any], n_primals: int) -> Callable[..., Any]:
    """A custom_vjp rule's ``(fwd, bwd)`` as ``vjp_fn(*primals) -> (out, pullback)``."""

    def vjp_fn(*primals: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
        got = fwd(*primals)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            kind = f"a tuple of {len(got)}" if isinstance(got, (tuple, list)) else f"a {type(got).__name__}"
            raise TypeError(MSG_FWD_RETURN.format(kind=kind))
        out, residuals = got

        def pullback(cotangent: Any) -> tuple[Any, ...]:
            cts = bwd(residuals, cotangent)
            if not isinstance(cts, (tuple, list)) or len(cts) != n_primals:
                what = f"{len(cts)} cotangents" if isinstance(cts, (tuple, list)) else f"a {type(cts).__name__}"
                raise ValueError(MSG_BWD_RETURN.format(got=what, want=n_primals))
            # defvjp lets bwd return None for a zero cotangent.
            return tuple(_zero_cotangent(p) if c is None else c for c, p in zip(cts, primals))

        return out, pullback

    return vjp_fn


def _zero_cotangent(primal: Any) -> Any:
    """The zero cotangent of ``primal``: zeros in its dtype, float0 for an integer leaf."""
    return jax.tree_util.tree_map(
        lambda x: (
            jnp.zeros(np.shape(x), jnp.result_type(x)) if is_floating(x) else np.zeros(np.shape(x), jax.dtypes.float0)
        ),
        primal,
    )


@recorded
@_timed
def check_jvp(
    fn: Callable[..., Any], jvp_fn: Callable[..., Any], *primals: Any, cotangents: int | None = None, **options: Any
) -> GradCheckReport:
    """Checks your Jacobian-vector product (a forward-mode rule) against finite differences.

    As :func:`check_vjp`, with your JVP applied to every input basis tangent (batched with
    ``jax.vmap``), so every column of your Jacobian is compared with its central difference.

    Args:
      fn: ``fn(*primals)`` returning any pytree of real floating arrays.
      jvp_fn: with ``jax.jvp``'s signature: ``jvp_fn(primals, tangents)`` (two tuples) returns
        ``(out, tangent_out)``; ``jax.jvp`` itself is correct by definition.
      *primals: the point to check at.
      cotangents: as in :func:`check_vjp`.
      **options: options of :func:`check_grad`.

    Returns:
      A :class:`GradCheckReport` with ``what="your JVP"``.

    Raises:
      TypeError: ``jvp_fn`` does not return a pair; a non-floating output; an unknown option.
      ValueError: its primal output differs from ``fn``'s, or a tangent output has the wrong shape.

    Examples:
      >>> import jax, jax.numpy as jnp, jgradcheck
      >>> f = lambda x: jnp.sin(x) * x
      >>> jvp = lambda p, t: (f(p[0]), (jnp.cos(p[0]) * p[0] + jnp.sin(p[0])) * t[0])
      >>> jgradcheck.check_jvp(f, jvp, jnp.linspace(0.0, 1.0, 5)).passed
      True
    """
    return _check_rule("check_jvp", "your JVP", fn, jvp_fn, jax.jvp, jvp_yours, primals, cotangents, options)


def _check_rule(
    name: str,
    what: str,
    fn: Callable[..., Any],
    rule: Callable[..., Any],
    jax_rule: Callable[..., Any],
    yours: Callable[..., Any],
    primals: Sequence[Any],
    cotangents: int | None,
    options: dict[str, Any],
) -> GradCheckReport:
    """check_vjp and check_jvp: your ``rule`` (or JAX's own, with ``fn`` bound) through the vector walk."""
    if not primals:
        raise TypeError(MSG_NO_PRIMALS.format(fn=name, other="vjp_fn" if jax_rule is jax.vjp else "jvp_fn"))

    def build_for(f: Callable[..., Any]) -> Callable[..., Any]:
        bound = functools.partial(jax_rule, f) if rule is jax_rule else rule

        def build(inputs, P, outs, U, fn_out):
            return yours(bound, inputs, P, outs, U, fn_out)

        return build

    def rebuild(wide_fn: Callable[..., Any]) -> Callable[..., Any]:
        # fn widened to float64 as you run it (promote.py): JAX's own rules of it, or yours
        # widened the same way (the same program, random draws, typed values).
        if rule is jax_rule:
            return build_for(wide_fn)
        wide_rule = _widened_rule(rule, jax_rule, fn, primals)

        def build(inputs, P, outs, U, fn_out):
            return yours(wide_rule, inputs, P, outs, U, fn_out)

        return build

    rebuild.custom_ok = rule is not jax_rule  # type: ignore[attr-defined]
    return vector_check(name, what, fn, build_for(fn), primals, (), cotangents, options, rebuild=rebuild)


def _widened_rule(
    rule: Callable[..., Any], jax_rule: Callable[..., Any], fn: Callable[..., Any], primals: Sequence[Any]
) -> Callable[..., Any]:
    """Your rule as traced at your inputs' dtypes, its arithmetic widened (promote.py): a JVP as one
    function of (primals, tangents); a VJP as its output and its pullback, each a function of the
    primals (and the cotangent). Raises where it cannot be traced so (the check then falls back)."""
    from jgradcheck._src import promote

    tangents = tuple(_zero_cotangent(p) for p in primals)
    if jax_rule is jax.jvp:
        return promote.widened(rule, tuple(primals), tangents)
    out = jax.eval_shape(fn, *primals)
    ct = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), out)
    wide_out = promote.widened(lambda *p: rule(*p)[0], *primals)
    wide_pull = promote.widened(lambda p, c: tuple(rule(*p)[1](c)), tuple(primals), ct)

    def vjp_fn(*p: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
        return wide_out(*p), lambda c: wide_pull(tuple(p), c)

    return vjp_fn


def _order2(fn: Callable[..., Any], mode: str, seed: int, primals: Sequence[Any]) -> Callable[..., Any]:
    """JAX's first derivative of ``fn`` in ``mode``, along a fixed random direction, as a
    function of the primals (its own derivatives are JAX's second-order rules)."""
    with _wide_scope(primals):
        out = jax.eval_shape(fn, *primals)
    rng = np.random.default_rng([seed, 0x2D])
    if mode == "rev":
        # NumPy arrays: a float64 direction made outside x64 would be truncated to float32.
        ct = jax.tree_util.tree_map(lambda s: np.asarray(rng.standard_normal(s.shape), s.dtype), out)

        @functools.wraps(fn)
        def rev(*p: Any) -> Any:
            y, pullback = jax.vjp(fn, *p)
            cts = pullback(jax.tree_util.tree_map(lambda c, o: c.astype(o.dtype), ct, y))
            # Integer primals get float0 cotangents: not outputs to differentiate again.
            return jax.tree_util.tree_map(lambda c: None if c.dtype == jax.dtypes.float0 else c, cts)

        return rev
    tangent = tuple(
        jax.tree_util.tree_map(
            lambda x: (
                np.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x))
                if is_floating(x)
                else np.zeros(np.shape(x), jax.dtypes.float0)
            ),
            p,
        )
        for p in primals
    )

    @functools.wraps(fn)
    def fwd(*p: Any) -> Any:
        t = jax.tree_util.tree_map(lambda v, x: v if v.dtype == jax.dtypes.float0 else v.astype(x.dtype), tangent, p)
        return jax.jvp(fn, p, t)[1]

    return fwd


def _wide_scope(primals: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
    """x64 where some primal is float64: traced outside it, JAX would truncate them with a warning."""
    from jgradcheck._src import compat

    wide = any(getattr(x, "dtype", None) == np.float64 for x in jax.tree_util.tree_leaves(primals))
    return compat.enable_x64(True) if wide else contextlib.nullcontext()


def _has_custom_vjp(fn: Callable[..., Any], primals: Sequence[Any]) -> bool:
    from jgradcheck._src.jaxpr_scan import walk_eqns

    with _wide_scope(primals):
        jaxpr = jax.make_jaxpr(fn)(*primals)
    return any(e.primitive.name.startswith("custom_vjp") for e in walk_eqns(jaxpr.jaxpr))


@recorded
@_timed
def check_rules(
    fn: Callable[..., Any],
    *primals: Any,
    modes: Sequence[str] = ("fwd", "rev"),
    order: int = 1,
    cotangents: int | None = None,
    **options: Any,
) -> GradCheckReport:
    """Checks JAX's own derivatives of ``fn`` (its custom_vjp/custom_jvp rules, any primitive's
    rules) against finite differences, in forward and reverse mode, up to ``order``.

    ``"rev"`` checks ``jax.vjp(fn, ...)`` as :func:`check_vjp` does, ``"fwd"`` checks
    ``jax.jvp`` as :func:`check_jvp` does; with ``order=2`` also the derivatives of those
    derivatives (along a fixed random direction), as ``jax.test_util.check_grads(order=2)`` and
    torch's ``gradgradcheck`` do. Rows are prefixed by what they check: ``rev:x``, ``fwd:x``,
    ``rev2:x``, ``fwd2:x``. A function with a ``custom_vjp`` rule has no forward mode: ``"fwd"``
    is then skipped with a warning (its reverse rule is still checked).

    Where feeding float64 inputs changes ``fn``'s program (a float32 scan carry, typed init values
    of a reduction, a Python int beside int32 indices), ``fn`` is checked as traced at your inputs'
    dtypes with its arithmetic widened to float64 (JAX's rules of that program), and
    ``report.warnings`` says so. Complex primals are checked in reverse mode only.

    Args:
      fn: ``fn(*primals)`` returning a pytree of real floating arrays.
      *primals: the point to check at.
      modes: a non-empty subset of ``("fwd", "rev")``.
      order: 1, or 2 for second derivatives too.
      cotangents: as in :func:`check_vjp`.
      **options: options of :func:`check_grad`.

    Returns:
      One :class:`GradCheckReport` over every mode and order, ``what="JAX's derivative of fn"``.

    Examples:
      >>> import jax, jax.numpy as jnp, jgradcheck
      >>> @jax.custom_vjp
      ... def softplus(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))
      >>> jgradcheck.check_rules(softplus, jnp.linspace(-2.0, 2.0, 5), modes=("rev",)).passed
      True
    """
    if not primals:
        raise TypeError(MSG_NO_PRIMALS.format(fn="check_rules", other="<no rule>"))
    check_live("check_rules", primals=primals)
    option_clashes("check_rules", {"fn": fn}, primals, {}, options)
    if isinstance(modes, str):  # modes="rev" means ("rev",)
        modes = (modes,)
    if not modes or any(m not in ("fwd", "rev") for m in modes):
        raise ValueError(MSG_MODES.format(modes=modes))
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(MSG_ORDER.format(order=order))
    if "fwd" in modes:
        real_primals("check_rules", fn, primals)
    seed = int(options.get("seed", 0))
    no_fwd = "fwd" in modes and _has_custom_vjp(fn, primals)
    reports, prefixes, notes = [], [], []
    with reuse_traces():  # forward and reverse check the same projected costs of fn: traced once
        for o in range(1, order + 1):
            for mode in dict.fromkeys(modes):
                if mode == "fwd" and no_fwd:
                    notes.append(MSG_NO_FWD.format(fn=getattr(fn, "__name__", "fn")))
                    continue
                g = fn if o == 1 else _order2(fn, mode, seed, primals)
                check = check_vjp if mode == "rev" else check_jvp
                rule = jax.vjp if mode == "rev" else jax.jvp
                reports.append(check(g, rule, *primals, cotangents=cotangents, **options))
                prefixes.append(f"{mode}{'' if o == 1 else o}:")
    if not reports:
        raise ValueError(MSG_NO_FWD.format(fn=getattr(fn, "__name__", "fn")) + "; ask for modes=('rev',).")
    merged = merge_reports(reports, prefixes, top_k=int(options.get("top_k", 10)))
    jac = tuple(dataclasses.replace(e, path=p + e.path) for r, p in zip(reports, prefixes) for e in r.jacobian)
    notes = list(dict.fromkeys(notes))
    return dataclasses.replace(
        merged,
        what=f"JAX's derivative of {getattr(fn, '__name__', 'fn')}",
        jacobian=tuple(jac),
        warnings=merged.warnings + tuple(notes),
        mode=reports[0].mode,
    )


@recorded
@_timed
def check_hvp(
    cost_fn: Callable[..., Any], hvp_fn: Callable[..., Any], params: PyTree, *args: Any, **options: Any
) -> GradCheckReport:
    """Checks your Hessian-vector product against finite differences of ``jax.grad(cost_fn)``.

    H·v is the JVP of the gradient, so this is :func:`check_jvp` of ``jax.grad(cost_fn)``:
    every column of the Hessian by central differences of the gradient, against your
    ``hvp_fn`` applied to every basis vector. A Gauss-Newton or Fisher product is checked the
    same way: it fails where it differs from the true Hessian, and the report's difference
    says by how much.

    Args:
      cost_fn: ``J(params, *args) -> scalar`` (its gradient comes from ``jax.grad``).
      hvp_fn: ``hvp_fn(params, v, *args)`` returning H·v shaped like ``params``.
      params: the point to check at: a pytree of floating arrays (integer leaves and non-array
        leaves such as an equinox activation are not supported here yet).
      *args: further arguments to both functions (data); not differentiated.
      **options: options of :func:`check_grad` and ``cotangents`` of :func:`check_vjp`.

    Returns:
      A :class:`GradCheckReport` with ``what="your Hessian-vector product"``.

    Raises:
      TypeError: a leaf of ``params`` is not floating (an integer step counter, a PRNG key).
      ValueError: ``hvp_fn``'s output is not shaped like ``params``.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p, a: jnp.sum(p["w"] ** 3) * a
      >>> hvp = lambda p, v, a: {"w": 6 * p["w"] * v["w"] * a}
      >>> jgradcheck.check_hvp(J, hvp, {"w": jnp.array([1.0, 2.0, 3.0])}, 2.0).passed
      True
    """
    cotangents = options.pop("cotangents", None)
    _floating_only(params)
    grad = jax.grad(cost_fn)

    def gradient(params: PyTree, *a: Any) -> PyTree:
        return grad(params, *a)

    def jvp_fn(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
        p, v = primals[0], tangents[0]
        hv = hvp_fn(p, v, *args)
        # Yours may come in another form of params (an NNX State against its pure dict, a linen
        # variable dict against its 'params' collection): matched leaf by leaf, as gradients are.
        flat_p, treedef = jax.tree_util.tree_flatten_with_path(p)
        hv = conform(hv, treedef, tuple(path for path, _ in flat_p), (True,) * len(flat_p))
        want, got = treedef, jax.tree_util.tree_structure(hv)
        if str(want) != str(got):
            raise ValueError(MSG_HVP_SHAPE.format(detail=f"it returned structure {got}, params have {want}"))
        return grad(p, *args), hv

    if not callable(hvp_fn):
        raise TypeError(f"hvp_fn must be a function hvp_fn(params, v, *args); got {type(hvp_fn).__name__}.")

    def build(inputs, P, outs, U, fn_out):
        return jvp_yours(jvp_fn, inputs, P, outs, U, fn_out)

    def rebuild(wide_fn: Callable[..., Any]) -> Callable[..., Any]:
        # A cost that hard-codes float32: the gradient and your H·v widened as you run them.
        from jgradcheck._src import promote

        wide_jvp = promote.widened(jvp_fn, (params,), (_zero_cotangent(params),))

        def build(inputs, P, outs, U, fn_out):
            return jvp_yours(wide_jvp, inputs, P, outs, U, fn_out)

        return build

    rebuild.custom_ok = True  # type: ignore[attr-defined]
    return vector_check(
        "check_hvp",
        "your Hessian-vector product",
        gradient,
        build,
        (params,),
        args,
        cotangents,
        options,
        "grad",
        rebuild=rebuild,
    )


MSG_HVP_LEAF = (
    "check_hvp differentiates jax.grad(cost_fn) with respect to every leaf of params, but params{path} is "
    "{kind}: jax.grad cannot differentiate it. Pass it among *args instead (check_hvp(cost_fn, hvp_fn, "
    "params, *args) gives args to both functions, undifferentiated), or bind it with functools.partial."
)


def _floating_only(params: PyTree) -> None:
    """check_hvp's params must all be floating: name the first leaf that is not, and what to do."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_floating(x):
            dtype = getattr(x, "dtype", None)
            kind = f"an array of dtype {dtype}" if dtype is not None else f"a {type(x).__name__}"
            raise TypeError(MSG_HVP_LEAF.format(path=jax.tree_util.keystr(path), kind=kind))
