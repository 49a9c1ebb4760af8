"""The problem: your cost and parameters split, promoted and traced; your gradient read in.

The first stage of a check. ``prepare`` splits ``params`` and ``args`` into floating leaves
(perturbed, promoted to float64 under x64) and the rest (integer leaves, PRNG keys: carried
along untouched) and traces the cost once (and twice more for the determinism check). Where
float64 inputs would change the cost's program (it draws random masks, whose bits depend on the
dtype; a float32 carry or init value no longer fits), the cost is traced as you run it and its
arithmetic widened instead (promote.py), and your gradient function runs the same way;
``Problem.groups`` groups the leaves for compilation when first read. ``user_gradient`` calls
your gradient (jitted when it can be) and validates it leaf by leaf against ``params``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat, numerics, promote
from jgradcheck._src.delta import work
from jgradcheck._src.options import QUICK_COMPILE, QUICK_LEAN_COMPILE
from jgradcheck._src.tree import MSG_NO_FLOAT, Layout, is_floating, path_str, split

PyTree = Any

MSG_NOT_CALLABLE = "cost_fn must be a function J(params, *args) -> scalar; got {kind}."
MSG_NOT_SCALAR = (
    "cost_fn must return a scalar, but J(params, *args) has shape {shape}. Reduce it to one "
    "number, e.g. jnp.mean over the examples (J = (1/m) Σ L), and add the "
    "regularization term."
)
MSG_SWAPPED_COST = (
    "cost_fn returns a pytree shaped like params ({shape}), not a scalar. If that is a gradient, did you "
    "swap them? The order is check_grad(cost_fn, grad_fn, params, *args): the cost first, your "
    "gradient second. If it is one loss per example, reduce it to one number (jnp.mean)."
)
MSG_SWAPPED_GRAD = (
    "grad_fn returned a scalar ({shape}), but params has {n} floating leaves ({paths}): that is a cost, "
    "not a gradient. Did you swap them? The order is check_grad(cost_fn, grad_fn, params, *args): the "
    "cost first, your gradient (a pytree shaped like params) second."
)
MSG_AUX = (
    "cost_fn returns a tuple ({shape}) whose first element is a scalar: a (loss, aux) pair, as for "
    "jax.value_and_grad(..., has_aux=True)? The check needs the loss alone: drop aux with "
    "check_grad(lambda p, *a: cost_fn(p, *a)[0], grad_fn, params, *args) (and the same for a grad_fn that "
    "returns (grads, aux))."
)
MSG_PROMOTION_OFF = (
    "promotion to float64 turned off: with its inputs promoted to float64, {fn} stopped with JAX's "
    "dtype error ({error}): it hard-codes a narrower dtype (a scan carry, reduce or reduce_window init "
    "values, an astype). The check ran in the inputs' own dtypes instead (x64=False): the precision line "
    "says how small an error it can still see. To check in float64, build those values from the inputs' "
    "dtype (jnp.zeros(shape, x.dtype)) or pass float64 inputs under jax.enable_x64"
)
MSG_NOT_REAL = "cost_fn must return a real floating scalar; J(params, *args) has dtype {dtype}."
MSG_NONFINITE = (
    "J(params, *args) = {value} at the given params: finite differences of a NaN/Inf cost are "
    "meaningless. Check the data, log(0) in the loss (clip probabilities), and the initialization."
)
MSG_NONDETERMINISTIC = (
    "cost_fn is not deterministic: two evaluations at the same params gave J = {a} and {b}. "
    "Finite differences need the same J every time (dropout breaks gradient checking). "
    "Pass a fixed PRNG key as an argument (and use the same mask in your gradient), or set "
    "keep_prob = 1.0 while checking."
)
MSG_NONDETERMINISTIC_TRACE = (
    "cost_fn is not deterministic: tracing it twice at the same params gave different programs "
    "or constants (a NumPy or Python random draw, the time, or a counter read while J is built). "
    "Finite differences need the same J every time: draw randomness from a fixed PRNG key passed "
    "as an argument (and use the same mask in your gradient), or set keep_prob = 1.0 while checking."
)
MSG_UNTRACEABLE = (
    "cost_fn must be a JAX-traceable function of params: J(params, *args) is evaluated with "
    "jax.jit and jax.vmap, where params are tracers, not concrete numbers. It converted a traced "
    "value to a Python or NumPy value ({kind}): use jnp operations throughout (no float(), "
    "int(), .item(), np.asarray() or Python if/while on values of params). JAX said:\n{error}"
)
MSG_MISSING = (
    "the gradient is missing leaves that params has: {missing}. Your gradient must return one "
    "array per floating parameter leaf, in a pytree shaped like params."
)
MSG_EXTRA = "the gradient has leaves that params does not: {extra}. Return a pytree shaped like params."
MSG_SHAPE = (
    "gradient leaf {path!r} has shape {got} but the parameter has shape {want}{hint}. dJ/dθ has the parameter's shape."
)
MSG_GRAD_TYPE = "gradient leaf {path!r} is {kind}; expected a real array shaped like the parameter {want}."


class CostFn(Protocol):
    def __call__(self, params: PyTree, *args: Any) -> jax.Array: ...


class GradFn(Protocol):
    def __call__(self, params: PyTree, *args: Any) -> PyTree: ...


@contextlib.contextmanager
def precision_scope(x64: bool):
    """Scoped precision: float64 if asked, and "highest" matmuls (no TF32 on GPUs, jax#11628)."""
    with contextlib.ExitStack() as stack:
        if x64:
            stack.enter_context(compat.enable_x64(True))  # jax.experimental's on jax 0.4
        stack.enter_context(jax.default_matmul_precision("highest"))
        yield


def threads_see_the_same_jax() -> bool:
    """Whether a new thread, once it re-enters ``precision_scope`` with the caller's x64 flag,
    traces under the same JAX settings as the calling thread.

    JAX's contexts are thread-local; the check re-enters x64 and matmul precision in its
    threads, but not the others a caller may have set (``jax.set_mesh``, ``default_device``,
    ``disable_jit``): under those, the work stays in the calling thread. Compared through JAX's
    trace context (private; its absence means no).
    """
    from jax._src import config as jax_config

    context = getattr(jax_config, "trace_context", None)
    if context is None:
        return False
    x64 = bool(jax.config.read("jax_enable_x64"))
    mine, theirs = context(), []

    def look() -> None:
        with precision_scope(x64):
            theirs.append(context())

    worker = threading.Thread(target=look)
    worker.start()
    worker.join()
    return bool(theirs) and len(theirs[0]) == len(mine) and all(a is b or a == b for a, b in zip(mine, theirs[0]))


@dataclasses.dataclass
class Problem:
    cost_fn: Callable[..., Any]
    layout: Layout
    args_layout: Layout
    floats: list[jax.Array]
    arrays: list[Any]
    arg_floats: list[jax.Array]
    arg_arrays: list[Any]
    paths: tuple[str, ...]
    orig_dtypes: tuple[str, ...]
    j0: float
    dtype: Any
    precision: str
    batch_sizes: tuple[int, ...]
    trace: Any
    # Your inputs as your program sees them, where promotion widens some (None: it widens none).
    as_run: tuple[list[Any], ...] | None = None
    # The cost runs as traced at those inputs with its arithmetic widened (promote.py) instead of
    # on float64 inputs; your gradient function then runs the same way.
    widened: bool = False
    # Where widened: the cost's jaxpr as you run it (its custom rules and stop_gradients, which
    # the widened ``trace`` inlines), for what reads the program rather than evaluates it.
    user_trace: Any = None
    # J's values at the points evaluated so far, by group and point, shared by every check of one
    # ``reuse_traces`` block that evaluates the same traced cost at the same inputs (forward and
    # reverse mode of check_rules judge the same projected costs); None outside such a block.
    evaluations: dict[Any, dict[tuple[int, float], float]] | None = None
    _groups: list[tuple[int, ...]] | None = None
    _host: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    # The active ``reuse_traces`` block's memo where prepared inside one (None outside): the checks
    # of the same trace share its plan of groups.
    _memo: dict[Any, Any] | None = None

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """Which float leaves share a compiled program (the engine's plan), planned on first use:
        your gradient's thread starts before it, and compiles while the plan traces. Inside a
        ``reuse_traces`` block, once per trace (the engine keys its plans by the printed program,
        which costs a millisecond or two to print for every check)."""
        if self._groups is None:
            key = ("groups", id(self.trace), len(self.floats))
            kept = None if self._memo is None else self._memo.get(key)
            if kept is not None and kept[0] is self.trace:
                self._groups = list(kept[1])
            else:
                self._groups = groups(self, range(len(self.floats)))
                if self._memo is not None:
                    self._memo[key] = (self.trace, list(self._groups))  # the trace kept: its id stays its own
        return self._groups

    def host(self, i: int) -> np.ndarray:
        """Leaf i raveled on the host, in its check dtype (cached: big leaves are copied once)."""
        if i not in self._host:
            self._host[i] = np.asarray(self.floats[i]).ravel()
        return self._host[i]

    def group_of(self, i: int) -> tuple[int, ...]:
        return next(g for g in self.groups if i in g)

    def params(self) -> PyTree:
        return self.layout.merge(self.floats, self.arrays)

    def args(self) -> tuple[Any, ...]:
        return self.args_layout.merge(self.arg_floats, self.arg_arrays)

    @property
    def inputs(self) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """The dynamic inputs every compiled program takes: (floats, arrays, arg floats, arg arrays)."""
        return self.floats, self.arrays, self.arg_floats, self.arg_arrays


def _trace(cost_fn, layout: Layout, args_layout: Layout, inputs: tuple) -> Any:
    """The cost's jaxpr over (floats, arrays, arg floats, arg arrays); non-array leaves (an
    activation function in an equinox module, a Python int) are constants, as in the engine."""

    def f(fl, ar, af, aa):
        return cost_fn(layout.merge(fl, ar), *args_layout.merge(af, aa))

    try:
        return jax.make_jaxpr(f)(*inputs)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.TracerBoolConversionError,
    ) as err:
        raise TypeError(MSG_UNTRACEABLE.format(kind=type(err).__name__, error=_first_lines(str(err)))) from err


# The traces kept while ``reuse_traces`` is active (None: none kept).
_REUSE = threading.local()


@contextlib.contextmanager
def reuse_traces() -> Any:
    """Within it, ``prepare`` traces a cost once per (cost, layouts, input shapes and dtypes).

    For one vector check (vector.py), whose scalar checks are the same cost projected on several
    cotangents u (an argument, not a constant): the first check traces it (three times with the
    determinism check), the others reuse that trace instead of tracing the same program again.
    Nothing is kept past the block: a cost checked again later, whose closure may have changed,
    is traced again.
    """
    old = getattr(_REUSE, "memo", None)
    _REUSE.memo = {"scope": next(_SCOPES)} if old is None else old
    try:
        yield
    finally:
        _REUSE.memo = old


_SCOPES = itertools.count(1)


def reuse_scope() -> int | None:
    """Which outermost ``reuse_traces`` block is active (a number new for each), or None."""
    memo = getattr(_REUSE, "memo", None)
    return None if memo is None else memo["scope"]


def _avals(tree: Any) -> tuple[Any, ...]:
    return tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in jax.tree_util.tree_leaves(tree))


def _reuse_key(cost_fn, layout: Layout, args_layout: Layout, inputs: tuple) -> Any:
    """The key of a kept trace, or None outside ``reuse_traces`` (or for an unhashable static leaf)."""
    if getattr(_REUSE, "memo", None) is None:
        return None
    key = (cost_fn, layout, args_layout, _avals(inputs), bool(jax.config.read("jax_enable_x64")))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _trace_once(cost_fn, layout: Layout, args_layout: Layout, inputs: tuple) -> Any:
    """``_trace``, kept for reuse inside ``reuse_traces``."""
    key = _reuse_key(cost_fn, layout, args_layout, inputs)
    if key is None:
        return _trace(cost_fn, layout, args_layout, inputs)
    memo = _REUSE.memo
    if ("trace", key) not in memo:
        memo["trace", key] = _trace(cost_fn, layout, args_layout, inputs)
    return memo["trace", key]


def _first_lines(text: str, n: int = 2) -> str:
    """The head of JAX's message: what was converted, and where (its full text stays chained)."""
    return "\n".join(text.strip().splitlines()[:n])


def _same_trace(a: Any, b: Any) -> bool:
    """Whether two traces of the cost are the same program with the same constants."""
    if compat.jaxpr_text(a.jaxpr) != compat.jaxpr_text(b.jaxpr) or len(a.consts) != len(b.consts):
        return False
    return all(np.array_equal(_const_data(x), _const_data(y)) for x, y in zip(a.consts, b.consts))


def _const_data(x: Any) -> np.ndarray:
    """A constant's values; typed PRNG keys compare by their key data."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def prepare(cost_fn, params, args, x64: bool, check_determinism: bool) -> Problem:
    """Splits and promotes the inputs and traces the cost (no compilation: that comes once, later)."""
    if not callable(cost_fn):
        raise TypeError(MSG_NOT_CALLABLE.format(kind=type(cost_fn).__name__))
    cost_fn = user_cost = hashable(cost_fn)
    target = np.float64 if x64 else None
    layout, floats, arrays = split(params, "params", target, python_floats=True)
    if not floats:
        dtypes = sorted({str(getattr(x, "dtype", type(x).__name__)) for x in jax.tree_util.tree_leaves(params)})
        raise ValueError(MSG_NO_FLOAT.format(dtypes=", ".join(dtypes) or "none"))
    args_layout, arg_floats, arg_arrays = split(tuple(args), "args", target, python_floats=False)
    orig = tuple(
        str(getattr(leaf, "dtype", "float64" if promote.user_x64() else "float32"))
        for leaf, k in zip(jax.tree_util.tree_leaves(params), layout.kinds)
        if k == "float"
    )
    dtype = jnp.result_type(*[f.dtype for f in floats])
    inputs = (floats, arrays, arg_floats, arg_arrays)
    as_run = _as_run_inputs(params, args) if x64 else None
    widened: str | None = None
    user_trace = None
    try:
        trace = _trace_once(cost_fn, layout, args_layout, inputs)
    except TypeError as err:
        if isinstance(err.__cause__, jax.errors.JAXTypeError):  # not traceable: MSG_UNTRACEABLE
            raise
        # Promotion changed the program (a float32 carry or init value, int64 next to int32):
        # run the program as written, its arithmetic in float64.
        built = _widened_or_none(cost_fn, layout, args_layout, inputs, as_run)
        if built is None:
            raise
        (trace, cost_fn, user_trace), widened = built, _first_lines(str(err), 1)
    else:
        if as_run is not None and promote.draws_random(trace):
            # jax.random draws other bits for float64: keep the draws of the program as you run it.
            built = _widened_or_none(cost_fn, layout, args_layout, inputs, as_run)
            if built is not None:
                (trace, cost_fn, user_trace), widened = built, "random"
    out = trace.out_avals[0] if len(trace.out_avals) == 1 else None
    if out is None or out.shape != ():
        shape = out.shape if out is not None else f"a tuple of {len(trace.out_avals)} outputs"
        _not_scalar(cost_fn, layout, args_layout, inputs)
        raise ValueError(MSG_NOT_SCALAR.format(shape=shape))
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(MSG_NOT_REAL.format(dtype=out.dtype))

    def again() -> Any:
        if widened is None:
            return _trace(cost_fn, layout, args_layout, inputs)
        built = _widened_or_none(user_cost, layout, args_layout, inputs, as_run)
        return built[0] if built is not None else trace

    reuse = _reuse_key(user_cost, layout, args_layout, inputs)
    if check_determinism and ("deterministic", reuse) not in (getattr(_REUSE, "memo", None) or {}):
        if not all(_same_trace(trace, again()) for _ in range(2)):
            raise ValueError(MSG_NONDETERMINISTIC_TRACE)
        if reuse is not None:  # asked once per kept trace (see reuse_traces)
            _REUSE.memo["deterministic", reuse] = True
    kinds = sorted(set(orig))
    if x64 and widened is not None:
        precision = (
            f"float64 (your {', '.join(k for k in kinds if k != 'float64')} program as traced, its arithmetic "
            f"widened to float64; {'random draws' if widened == 'random' else 'typed values'} as you run it)"
        )
    elif x64:
        precision = "float64" + (
            f" (promoted from {', '.join(k for k in kinds if k != 'float64')})" if kinds != ["float64"] else ""
        )
    else:
        precision = ", ".join(sorted({str(f.dtype) for f in floats})) + " (promotion to float64 off)"
    batch = averaged_counts(trace)
    problem = Problem(
        cost_fn,
        layout,
        args_layout,
        floats,
        arrays,
        arg_floats,
        arg_arrays,
        layout.float_paths,
        orig,
        math.nan,
        dtype,
        precision,
        batch,
        trace,
        as_run=as_run,
        widened=widened is not None,
        user_trace=user_trace,
    )
    if reuse is not None:
        problem._memo = _REUSE.memo
        if widened is None:
            problem.evaluations = _shared_evaluations(trace, inputs)
    return problem


def _shared_evaluations(trace: Any, inputs: tuple) -> dict[Any, Any]:
    """The table of J's values kept in the active ``reuse_traces`` block for this trace (the same
    object for every check that reuses it) at these input values; a table of its own where the
    values cannot be read as bytes.

    Why it is sound: the same traced program at the same inputs and the same point gives the same
    J (the determinism check, made once per kept trace, says so), so a second check's finite
    differences at a point the first evaluated are exactly what evaluating again would give. The
    first check evaluates every point; the table only saves the second from doing it again.
    """
    return shared("evaluations", trace, inputs, dict)


def _digest(tree: Any) -> tuple[Any, ...] | None:
    """The shapes, dtypes and bytes of a pytree's leaves; None where some leaf has no bytes (a PRNG key)."""
    try:
        return tuple(
            (np.shape(x), str(np.asarray(x).dtype), np.asarray(x).tobytes()) for x in jax.tree_util.tree_leaves(tree)
        )
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def shared(kind: str, owner: Any, inputs: Any, make: Callable[[], Any]) -> Any:
    """``make()``, made once per (kind, owner object, input values) within the active
    ``reuse_traces`` block (made anew outside one, or for inputs without bytes): what the checks of
    one check_rules call compute alike (fn's output for forward and reverse mode, J's values).
    ``owner`` is kept alive with the value, so its ``id`` is not another object's meanwhile."""
    memo: dict[Any, Any] | None = getattr(_REUSE, "memo", None)
    digest = None if memo is None else _digest(inputs)
    if memo is None or digest is None:
        return make()
    key = (kind, id(owner), digest)
    kept = memo.get(key)
    if kept is None or kept[0] is not owner:
        kept = memo[key] = (owner, make())
    return kept[1]


# Unary steps between a sum and its division that keep it the same sum (a sign, a dtype).
_SAME_SUM = {"neg", "convert_element_type", "copy", "copy_p"}


def averaged_counts(closed: Any) -> tuple[int, ...]:
    """The counts m the cost averages over: a ``reduce_sum`` divided by m (``jnp.mean``, or
    ``jnp.sum(...) / m``), where m is the size of some of the summed axes. What a report may call
    "the batch size m" (diagnose.common_factor), rather than any dimension of the data."""
    from jgradcheck._src.jaxpr_scan import walk_eqns

    made_by: dict[Any, Any] = {}
    counts: list[int] = []
    try:
        eqns = list(walk_eqns(closed.jaxpr))
    except Exception:  # noqa: BLE001 - an unfamiliar jaxpr: no count rather than a wrong one
        return ()
    for eqn in eqns:
        for v in eqn.outvars:
            made_by[v] = eqn
    for eqn in eqns:
        name = eqn.primitive.name
        if name not in ("div", "mul") or len(eqn.invars) != 2 or not hasattr(eqn.invars[1], "val"):
            continue
        value = float(np.asarray(eqn.invars[1].val)) if np.size(eqn.invars[1].val) == 1 else math.nan
        m = value if name == "div" else (1.0 / value if value else math.nan)
        if not (math.isfinite(m) and m > 1 and abs(m - round(m)) < 1e-6 * m):
            continue
        src = _made_by(made_by, eqn.invars[0])
        while src is not None and src.primitive.name in _SAME_SUM:
            src = _made_by(made_by, src.invars[0])
        if src is None or src.primitive.name != "reduce_sum":
            continue
        shape = tuple(getattr(src.invars[0].aval, "shape", ()))
        axes = tuple(src.params.get("axes", ()))
        sizes = [int(shape[a]) for a in axes if a < len(shape)]
        if _product_of_some(sizes, round(m)):
            counts.append(round(m))
    return tuple(dict.fromkeys(counts))


def _made_by(made_by: dict[Any, Any], v: Any) -> Any:
    """The equation that made ``v``; None for a literal or an input."""
    return None if hasattr(v, "val") else made_by.get(v)


def _product_of_some(sizes: list[int], m: int) -> bool:
    """Whether m is the product of some of ``sizes`` (the axes a mean divides by)."""
    products = {1}
    for n in sizes:
        products |= {p * n for p in products}
    return m in products


def _as_run_inputs(params: PyTree, args: Sequence[Any]) -> tuple[list[Any], ...] | None:
    """The inputs as your program sees them (your dtypes, your x64 setting), where promotion
    would widen some floating input; None where every one is float64 already."""
    # A float64 leaf means you run the program under x64 (a scoped jax.enable_x64, or the flag).
    wide = any(getattr(x, "dtype", None) == np.float64 for x in jax.tree_util.tree_leaves((params, args)))
    with compat.enable_x64(wide or promote.user_x64()):
        _, fl, ar = split(params, "params", None, python_floats=True)
        _, afl, aar = split(tuple(args), "args", None, python_floats=False)
    if all(np.dtype(x.dtype) in (np.float64, np.complex128) for x in (*fl, *afl)):
        return None
    return fl, ar, afl, aar


def _widened_or_none(cost_fn, layout: Layout, args_layout: Layout, inputs: tuple, as_run: Any) -> Any:
    """The cost's program as you run it, its arithmetic widened to float64 (promote.py), traced
    at the promoted ``inputs``; None where that cannot be built (the caller keeps its path)."""
    if as_run is None:
        return None

    def f(fl, ar, af, aa):
        return cost_fn(layout.merge(fl, ar), *args_layout.merge(af, aa))

    try:
        wide = promote.widened(f, *as_run)
        as_run_fn = getattr(wide, "__wrapped_as_run__")  # noqa: B009 - set by promote.widened
        return jax.make_jaxpr(wide)(*inputs), _as_cost(wide, layout, args_layout), as_run_fn
    except Exception:  # noqa: BLE001 - the program as run fails too, or has a body promote.py cannot rebuild
        return None


def _as_cost(wide: Callable[..., Any], layout: Layout, args_layout: Layout) -> Callable[..., Any]:
    """``J(params, *args)`` from the widened program over (floats, arrays, arg floats, arg arrays):
    what reads ``problem.cost_fn`` (the measured rounding of a float32 gradient) then sees the same
    program, the same random draws, as the check's evaluations."""

    def parts(tree: PyTree, lay: Layout) -> tuple[list[Any], list[Any]]:
        leaves = jax.tree_util.tree_leaves(tree)
        return [x for x, k in zip(leaves, lay.kinds) if k == "float"], [
            x for x, k in zip(leaves, lay.kinds) if k == "array"
        ]

    program = jax.jit(wide)  # one compiled program, not one dispatch per equation

    def cost(params: PyTree, *args: Any) -> Any:
        return program(*parts(params, layout), *parts(tuple(args), args_layout))

    return hashable(cost)


def _not_scalar(cost_fn, layout: Layout, args_layout: Layout, inputs: tuple) -> None:
    """Names the two common reasons a cost is not a scalar: a gradient passed as the cost (swapped
    arguments), and a (loss, aux) pair."""

    def f(fl, ar, af, aa):
        return cost_fn(layout.merge(fl, ar), *args_layout.merge(af, aa))

    out = jax.eval_shape(f, *inputs)
    params = jax.eval_shape(lambda fl, ar: layout.merge(fl, ar), *inputs[:2])
    floats = [np.shape(x) for x, k in zip(jax.tree_util.tree_leaves(params), layout.kinds) if k == "float"]
    got = [np.shape(x) for x in jax.tree_util.tree_leaves(out)]
    shape = _shape_text(out)
    out_tree: Any = jax.tree_util.tree_structure(out)  # PyTreeDef's == is untyped in jaxlib's stubs
    if out_tree == jax.tree_util.tree_structure(params) or (len(got) == len(floats) and got == floats and len(got) > 1):
        raise ValueError(MSG_SWAPPED_COST.format(shape=shape))
    if isinstance(out, (tuple, list)) and len(out) >= 2 and np.shape(jax.tree_util.tree_leaves(out[0])[0]) == ():
        if len(jax.tree_util.tree_leaves(out[0])) == 1:
            raise ValueError(MSG_AUX.format(shape=shape))


def _shape_text(tree: PyTree, limit: int = 4) -> str:
    """``W: (3, 2), b: (2,)``: a pytree of shapes, briefly."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    parts = [f"{path_str(p)}: {tuple(np.shape(x))}" for p, x in flat[:limit]]
    return ", ".join(parts) + (", …" if len(flat) > limit else "")


def is_promotion_error(error: BaseException, *trees: PyTree) -> bool:
    """Whether ``error`` is JAX's dtype mismatch between promoted float64 values and a dtype the
    function hard-codes (a float32 scan carry or init value), and promotion changed some input.

    JAX raises a TypeError naming both types (``float32[3,8]`` vs ``float64[3,8]``); without a
    narrower floating input, promotion changed nothing and the error is the function's own.
    """
    if not isinstance(error, TypeError):
        return False
    text = str(error)
    if "float64" not in text or not any(t in text for t in ("float32", "float16", "bfloat16")):
        return False
    return any(
        is_floating(x) and np.dtype(getattr(x, "dtype", np.float64)) != np.float64
        for tree in trees
        for x in jax.tree_util.tree_leaves(tree)
    )


def promotion_note(fn: str, error: BaseException) -> str:
    """The report's warning after a check fell back to ``x64=False`` (see :func:`is_promotion_error`)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    first = first.rstrip(":")
    if len(first) > 160:
        first = first[:157] + "..."
    return MSG_PROMOTION_OFF.format(fn=fn, error=first)


def _grad_call(grad_fn, layout: Layout, args_layout: Layout, floats, arrays, arg_floats, arg_arrays):
    return grad_fn(layout.merge(floats, arrays), *args_layout.merge(arg_floats, arg_arrays))


_GRAD_STATIC = ("grad_fn", "layout", "args_layout")
_grad_jit = jax.jit(_grad_call, static_argnames=_GRAD_STATIC)
# Your gradient runs once: on a CPU, when J is small, compiling it fast is what counts.
_grad_jit_quick = jax.jit(_grad_call, static_argnames=_GRAD_STATIC, compiler_options=QUICK_COMPILE)
_grad_jit_quick_lean = jax.jit(_grad_call, static_argnames=_GRAD_STATIC, compiler_options=QUICK_LEAN_COMPILE)
QUICK_GRAD_WORK = 4e6  # multiply-adds of one J


class _ByIdentity:
    """A callable that hashes by the identity of the one it wraps (equinox modules, partials of
    arrays): jit needs hashable static arguments, and the same object then reuses its programs."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn


def hashable(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        hash(fn)
    except TypeError:
        return _ByIdentity(fn)
    return fn


def _call_grad(grad_fn, problem: Problem) -> PyTree:
    """Calls your gradient jitted (one compile instead of one per operation in eager mode);
    falls back to eager execution if it is not traceable (Python control flow on values)."""

    if problem.widened:
        wide = _widened_grad(grad_fn, problem)
        if wide is not None:
            return wide
    try:
        small = sum(work(e) for e in problem.trace.jaxpr.eqns) < QUICK_GRAD_WORK
        quick = small and jax.default_backend() == "cpu"
        lean = not compat.has_loop(problem.trace.jaxpr) and compat.lean_compile_ok()
        jitted = (_grad_jit_quick_lean if lean else _grad_jit_quick) if quick else _grad_jit
        return jitted(hashable(grad_fn), problem.layout, problem.args_layout, *problem.inputs)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    ):
        return grad_fn(problem.params(), *problem.args())
    except TypeError:
        # Float64 inputs break your gradient alone (a float32 carry in your backward pass): it
        # runs as you run it, in your dtypes, and is judged at their precision.
        got = _as_written_grad(grad_fn, problem) if problem.as_run is not None else None
        if got is None:
            raise
        return got


def _widened_grad(grad_fn, problem: Problem) -> PyTree | None:
    """Your gradient run as the cost is: its program as you run it with the arithmetic widened
    (the same random draws); where it cannot be traced so (Python control flow on values), run
    as you run it, on your inputs in your dtypes (the same draws, your dtype's rounding: judged
    as a precomputed gradient is). None where neither runs (then the promoted inputs' path says why)."""

    def g(fl, ar, af, aa):
        return _grad_call(grad_fn, problem.layout, problem.args_layout, fl, ar, af, aa)

    if problem.as_run is None:
        return None
    try:
        wide = promote.widened(g, *problem.as_run)
        return jax.jit(wide)(*problem.inputs)
    except Exception:  # noqa: BLE001 - not traceable: run it as you do
        return _as_written_grad(grad_fn, problem)


def _as_written_grad(grad_fn, problem: Problem) -> PyTree | None:
    """Your gradient on your inputs in your dtypes, under your x64 setting; None if it fails."""
    assert problem.as_run is not None
    fl, ar, af, aa = problem.as_run
    wide64 = any(getattr(x, "dtype", None) == np.float64 for x in fl + af)
    try:
        with compat.enable_x64(wide64 or promote.user_x64()):
            return _grad_call(grad_fn, problem.layout, problem.args_layout, fl, ar, af, aa)
    except Exception:  # noqa: BLE001 - the promoted inputs' error is the one to show
        return None


def user_gradient(grad_fn, problem: Problem) -> tuple[list[np.ndarray], list[float]]:
    """Your gradient, leaf by leaf in params' float-leaf order, and each leaf's own eps."""
    grads = _call_grad(grad_fn, problem) if callable(grad_fn) else grad_fn
    _check_not_cost(grads, problem)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    by_path = {path_str(p): leaf for p, leaf in flat}
    want = dict(zip(problem.paths, problem.floats))
    all_params = set(problem.layout.paths)
    missing = [p for p in problem.paths if p not in by_path]
    extra = [p for p in by_path if p not in all_params]
    if missing:
        raise ValueError(
            MSG_MISSING.format(missing=", ".join(missing))
            + (f" It has extra leaves: {', '.join(extra)}." if extra else "")
        )
    if extra:
        raise ValueError(MSG_EXTRA.format(extra=", ".join(extra)))
    out, eps = [], []
    for path in problem.paths:
        g, p = by_path[path], want[path]
        if not hasattr(g, "shape") and not isinstance(g, (int, float)):
            raise TypeError(MSG_GRAD_TYPE.format(path=path, kind=type(g).__name__, want=p.shape))
        g = np.asarray(g)
        is_float = jnp.issubdtype(g.dtype, jnp.floating)
        if not (is_float or jnp.issubdtype(g.dtype, jnp.integer) or g.dtype == np.bool_):
            raise TypeError(MSG_GRAD_TYPE.format(path=path, kind=f"an array of dtype {g.dtype}", want=p.shape))
        if g.shape != p.shape:
            hint = " (transposed?)" if g.shape == p.shape[::-1] and len(p.shape) == 2 else ""
            raise ValueError(MSG_SHAPE.format(path=path, got=g.shape, want=p.shape, hint=hint))
        eps.append(numerics.machine_eps(g.dtype) if is_float else numerics.machine_eps(problem.dtype))
        out.append(np.asarray(g, np.float64).ravel())
    return out, eps


def _check_not_cost(grads: PyTree, problem: Problem) -> None:
    """A scalar where params has several leaves, or a scalar shape, is a cost: swapped arguments?"""
    leaves = jax.tree_util.tree_leaves(grads)
    if (
        len(leaves) != 1
        or np.shape(leaves[0]) != ()
        or not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(grads))
    ):
        return
    if len(problem.floats) == 1 and problem.floats[0].shape == () and problem.paths == ("<root>",):
        return  # a scalar parameter has a scalar gradient
    paths = ", ".join(problem.paths[:4]) + (", …" if len(problem.paths) > 4 else "")
    raise ValueError(MSG_SWAPPED_GRAD.format(shape="shape ()", n=len(problem.floats), paths=paths))


class Yours:
    """Your gradient, computed in a thread while the check compiles its own programs.

    Compiling your gradient takes about as long as compiling one of the check's programs (0.2 s
    for a unit-test MLP, 1-1.5 s for a transformer block on a 2-core CPU); nothing needs its
    values before the first finite differences are in, so the two compile side by side.
    ``get()`` returns ``user_gradient``'s result or raises its error; ``failed`` is set as soon
    as it has one, so the check's workers can stop at their next block instead of finishing.
    """

    def __init__(self, grad_fn: Any, problem: Problem):
        self.failed = threading.Event()
        self._done = threading.Event()
        self._result: tuple[list[np.ndarray], list[float]] | None = None
        self._error: BaseException | None = None
        if not callable(grad_fn) or not threads_see_the_same_jax():
            self._run(grad_fn, problem)
            return
        x64 = bool(jax.config.read("jax_enable_x64"))  # JAX's contexts are thread-local

        def scoped() -> None:
            with precision_scope(x64):
                self._run(grad_fn, problem)

        threading.Thread(target=scoped, name="jgradcheck-yours", daemon=True).start()

    @classmethod
    def ready(cls, grads: list[np.ndarray], eps: list[float]) -> Yours:
        """Values already at hand (``numerical_grad`` compares against zeros)."""
        out = cls.__new__(cls)
        out.failed, out._done = threading.Event(), threading.Event()
        out._result, out._error = (grads, eps), None
        out._done.set()
        return out

    def _run(self, grad_fn: Any, problem: Problem) -> None:
        try:
            self._result = user_gradient(grad_fn, problem)
        except BaseException as e:  # noqa: BLE001 - handed to the caller of get()
            self._error = e
            self.failed.set()
        finally:
            self._done.set()

    def get(self) -> tuple[list[np.ndarray], list[float]]:
        while not self._done.wait(0.1):  # short waits: Ctrl-C gets through
            pass
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


# Leaves up to this many entries may share a compiled program (biases, small last layers): one
# compilation instead of one per leaf. Which ones share is the engine's plan (``plan_groups``).
SMALL_LEAF = 4096


def groups(problem: Problem, leaves: Sequence[int]) -> list[tuple[int, ...]]:
    """Big leaves alone (their followers stay unbatched: large GEMMs); small ones by the engine's plan."""
    from jgradcheck._src.engine import plan_groups  # the engine imports this module's neighbours

    return plan_groups(problem.trace, jax.tree_util.tree_leaves(problem.inputs), list(leaves), SMALL_LEAF)
