"""``numerical_grad`` and ``check_grad``: the gradient check of any JAX pytree."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jgradcheck._src import numerics, screen
from jgradcheck._src.assemble import build_report
from jgradcheck._src.blocking import blocking_warnings
from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.jaxpr_scan import walk_eqns
from jgradcheck._src.modes import over_budget_note, run_mode, tell_over_budget
from jgradcheck._src.options import (
    MSG_METHOD,
    MSG_MODE,
    MSG_STRATEGY,
    Options,
    check_budget,
    check_eps,
    check_options,
    show_progress,
)
from jgradcheck._src.probe import NoiseBox, probe_line
from jgradcheck._src.problem import (
    MSG_NOT_CALLABLE,
    CostFn,
    GradFn,
    Problem,
    Yours,
    is_promotion_error,
    precision_scope,
    prepare,
    promotion_note,
)
from jgradcheck._src.registry import recorded
from jgradcheck._src.report import GradCheckReport, LeafReport
from jgradcheck._src.schedule import Budget, Cancelled, check_leaves
from jgradcheck._src.tree import Only, check_live, is_floating, only_scope, path_str, selector
from jgradcheck._src.wrap import MSG_KWARGS, conjugate_diagnosis, is_complex, join_grad, rewrite

PyTree = Any

MSG_OPTION_CLASH = (
    "{fn} takes a parameter named {name!r}, which is also an option of {check} ({what}): {taken}, so {fn} "
    "was called without it. Bind your model's {name} first, functools.partial({fn}, {name}=...), and the "
    "same in your other functions; {name}= then sets only the check's option."
)
MSG_PROMOTION_ERROR = (
    "cost_fn cannot run on float64 inputs: {error}. Here, pass x64=False to differentiate in the inputs' own dtypes."
)
MSG_OPTION_KEPT = (
    "{fn} takes a parameter {name!r} too: {name}={value!r} was taken by {check} as {what}, and {fn} kept "
    "its own default; to pass it to {fn}, bind it with functools.partial({fn}, {name}=...)"
)


@recorded  # the pytest plugin's session summary hears of every check (registry.py)
def check_grad(
    cost_fn: CostFn,
    grad_fn: GradFn | PyTree,
    params: PyTree,
    *args: Any,
    eps: float | None = None,
    x64: bool = True,
    method: str = "central",
    mode: str = "auto",
    full_max_size: int = 500_000,
    time_budget: float | None = 60.0,
    sample_size: int = 64,
    screen_directions: int = 4,
    rtol: float = 0.0,
    atol: float = 0.0,
    safety: float = numerics.DEFAULT_SAFETY,
    top_k: int = 10,
    taylor_test: bool = False,
    chunk_size: int | None = None,
    devices: Sequence[Any] | None = None,
    progress: bool | None = None,
    check_determinism: bool = True,
    max_refine: int = 4096,
    seed: int = 0,
    strategy: str = "delta",
    only: Only = None,
    **kwargs: Any,
) -> GradCheckReport:
    """Checks your gradient of ``cost_fn`` against central finite differences, entry by entry.

    Every floating entry θᵢ of ``params`` is perturbed by ±hᵢ and J re-evaluated (batched with
    ``jax.vmap`` under ``jax.jit``, in chunks, one group of leaves at a time, computing only what
    each perturbation changes: see ``strategy``); (J(θ+hᵢeᵢ) − J(θ−hᵢeᵢ)) / 2hᵢ
    is compared with your gradient against an estimate of its own error (round-off measured
    from the noise in J, truncation from a second step), so a verdict is not a false alarm in
    float32, near a minimum or at large scales. Kinks (ReLU at 0, max ties) are detected from
    one-sided slopes and accepted when yours lies between them. The report also gives the
    classic relative difference and graded scale, the per-leaf table, the worst entries, and
    plain words for the kind of bug (a factor, a sign, a transpose, a missing L2 term, ...).

    Args:
      cost_fn: ``J(params, *args) -> scalar``: the full cost, regularization term included,
        deterministic (dropout off or with a fixed key passed in ``args``).
      grad_fn: your gradient: a function ``grad_fn(params, *args)`` returning a pytree shaped
        like ``params``, or that pytree itself. Integer/bool leaves of ``params`` are ignored
        (yours may omit them or hold anything there).
      params: any pytree of arrays (dicts, lists, NamedTuples, flax/equinox/optax trees).
        Floating leaves are checked; integer and bool leaves (step counters, PRNG keys) ride
        along untouched. A complex leaf ``z`` is checked as its real and imaginary parts
        (rows ``z.real`` and ``z.imag``), with yours read in JAX's convention: for a real J,
        ``jax.grad`` returns ∂J/∂x − i·∂J/∂y for z = x + iy. Yours in PyTorch's convention
        (the conjugate) fails on ``z.imag`` with a diagnosis saying so.
      *args: further arguments to both functions (data, labels, a PRNG key, λ).
      **kwargs: keyword arguments that are not options of the check are passed on to both
        functions (``check_grad(cost, grad, params, X, lam=0.5)``); a keyword whose name is an
        option here (``eps``, ``mode``, ``seed``, ...) is taken as the option: bind such an
        argument with ``functools.partial`` instead. Floating arrays among them are data, not
        parameters: they are not perturbed.
      eps: absolute step for every entry (the classic recipe uses 1e-7). Default: per entry
        ∛ε·max(1, |θᵢ|) rounded to a power of two, ε the machine epsilon of the check's dtype.
      x64: run the check in float64 (params, floating args and your ``grad_fn``) inside a
        scoped ``jax.enable_x64``; your global setting is not touched. With False, each leaf
        keeps its dtype and the report says how small an error it can still see.
      method: ``"central"`` (2 evaluations per entry), ``"central4"`` (4, 4th order) or
        ``"richardson"`` (6, 6th order, Richardson extrapolation over h, 2h, 4h).
      mode: ``"full"`` (every entry), ``"sample"`` (``sample_size`` random entries per leaf,
        small leaves whole), ``"screen"`` (``screen_directions`` random directions per leaf,
        then a search for the wrong entries in leaves that fail), or ``"auto"``: full up to
        ``full_max_size`` entries and when the full check is projected to finish within
        ``time_budget``, screen otherwise (``report.mode`` says which ran and why).
      full_max_size: the size above which ``mode="auto"`` screens.
      time_budget: seconds a full check may take under ``mode="auto"`` (default 60; None: no
        limit). Once a sixth of it has passed, the check's time is projected from each group of
        leaves' measured speed; past the budget, while more time is left than spent, the check
        screens instead and says so on stderr (unless ``progress=False``) and in
        ``report.mode``. ``mode="full"`` never screens.
      sample_size: entries per leaf in sample mode.
      screen_directions: random (Rademacher) directions per leaf in screen mode.
      rtol: extra relative tolerance on |yours − numerical| (on top of the error estimate).
      atol: extra absolute tolerance.
      safety: how many estimated errors a discrepancy may reach before it is a failure.
      top_k: how many worst entries to list.
      taylor_test: also fit the Taylor-remainder slope per leaf (≈2 correct, ≈1 wrong): an
        ε-free second opinion, about 8 evaluations per leaf.
      chunk_size: perturbations per vmap step. Default: as many as fit a quarter of the free
        device memory (1 GiB on CPU), measured from the compiled cost.
      devices: devices to spread the perturbations over (default: all local devices of the
        default backend).
      progress: show a progress bar with ETA on stderr (True), or nothing (False). Default: on a
        terminal for a large check (over 50,000 evaluations) from the start; otherwise once the
        check has run for 10 s (in a log: a line every ~10 s), so no long check is silent.
      check_determinism: evaluate J twice in separate traces and raise if it differs.
      max_refine: at most this many failing entries per leaf get the second, 2h look.
      seed: seed of the random directions and samples (each leaf's stream also depends on its
        path, so adding a leaf never changes the others').
      strategy: how single-entry perturbations are evaluated: ``"delta"`` (default) interprets
        the cost's jaxpr carrying each value as base + change, so what a perturbation does not
        change is computed once and a product with the perturbed leaf shrinks to one row;
        ``"vmap"`` re-evaluates the whole cost per perturbation (the reference; use it if a
        primitive in your cost misbehaves under the interpreter). Under ``"delta"``, groups
        whose change is dense anyway are re-evaluated whole, and a unit-test-sized check on a
        CPU compiles J alone and calls it once per perturbation; ``report.evaluated`` says
        which ran.
      only: the leaves to check, the others are not perturbed (and yours may leave them out):
        a pattern on the leaf path as the report prints it (``"W1"``, ``"layers[0].*"``; a
        subtree ``"layers[0]"`` selects its leaves; ``*`` and ``?`` are wildcards, brackets
        literal), a list of patterns, or a predicate ``(path, leaf) -> bool``. The report lists
        the others as "not checked" (their rows have ``status == "not checked"``).

    Returns:
      A :class:`GradCheckReport`; ``report.passed`` is the verdict, ``str(report)`` the table.

    Raises:
      ValueError: J is not a scalar (a gradient passed as the cost: swapped arguments; a
        ``(loss, aux)`` pair), not finite at ``params``, or not deterministic; your gradient is a
        scalar (swapped arguments), or its structure or a leaf's shape differs from ``params``;
        a leaf of ``params`` or ``args`` is a deleted (donated) array; no floating leaves; a bad
        option; ``only`` matches no floating leaf (the message lists them).
      TypeError: ``cost_fn`` is not callable; called under ``jax.jit``, ``jax.vmap`` or
        ``jax.grad``; a non-array leaf that is not hashable; one of your functions needs an
        argument named like an option (``eps``: bind it with ``functools.partial``).

    Where float64 inputs would break your cost or change what it draws (a float32 scan carry or
    init value it hard-codes, random masks from a key), the check runs the program as you traced
    it with its arithmetic held in float64 (random draws, bitcasts and your own narrowing casts as
    written); only where that cannot be done does it run again with ``x64=False``, and
    ``report.warnings`` says so.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p, x: jnp.sum((x @ p["W"]) ** 2)
      >>> dJ = lambda p, x: {"W": 2 * x.T @ (x @ p["W"])}
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> jgradcheck.check_grad(J, dJ, {"W": jnp.ones((2, 1))}, x).passed
      True

    References:
      The classic gradient-checking recipe of the deep-learning course notes; Nocedal & Wright §8.1; Moré &
      Wild 2011 (noise estimation).
    """
    start = time.perf_counter()
    given = {k: v for k, v in locals().items() if k in _OPTION_DEFAULTS}
    if not callable(cost_fn):
        raise TypeError(MSG_NOT_CALLABLE.format(kind=type(cost_fn).__name__))
    check_live(
        "check_grad", params=params, args=args, kwargs=kwargs, **({} if callable(grad_fn) else {"grad_fn": grad_fn})
    )
    clashes = option_clashes("check_grad", {"cost_fn": cost_fn, "grad_fn": grad_fn}, (params, *args), kwargs, given)
    select = selector(only, params)
    rw = rewrite(cost_fn, grad_fn, params, args, kwargs, select)
    cost_fn, grad_fn, params, args = rw.cost_fn, rw.grad_fn, rw.params, rw.args
    if mode not in ("auto", "full", "screen", "sample"):
        raise ValueError(MSG_MODE.format(mode=mode))
    if method not in numerics.ORDER:
        raise ValueError(MSG_METHOD.format(method=method))
    if strategy not in ("delta", "vmap"):
        raise ValueError(MSG_STRATEGY.format(strategy=strategy))
    eps = check_eps(eps)
    budget_s = check_budget(time_budget)
    check_options(
        sample_size=sample_size,
        screen_directions=screen_directions,
        top_k=top_k,
        max_refine=max_refine,
        full_max_size=full_max_size,
        chunk_size=chunk_size,
        safety=safety,
        rtol=rtol,
        atol=atol,
        devices=devices,
    )
    opts = Options(eps, method, float(safety), float(rtol), float(atol), True, int(max_refine))

    def run(x64: bool) -> GradCheckReport:
        with precision_scope(x64), _explain_kwargs(kwargs), only_scope(select):
            problem = prepare(cost_fn, params, args, x64, check_determinism)
            yours = Yours(grad_fn, problem)  # compiles and runs while the check compiles its programs
            engine = make_engine(problem, devices, chunk_size, strategy)
            n = sum(int(f.size) for f in problem.floats)
            chosen = mode if mode != "auto" else ("full" if n <= full_max_size else "screen")
            noise: float | NoiseBox
            if chosen == "screen":
                noise = probe_line(engine, problem, seed, check_determinism)
            else:  # the probe rides in the first call of the smallest group's program
                noise = NoiseBox(problem, seed, check_determinism)
            mode_note = (
                chosen
                if mode != "auto"
                else f"{chosen} (auto: {n:,} entries {'≤' if chosen == 'full' else '>'} full_max_size {full_max_size:,})"
            )
            budget = Budget(budget_s, start) if mode == "auto" and chosen == "full" and budget_s else None
            try:
                per_leaf = run_mode(
                    chosen,
                    engine,
                    problem,
                    yours,
                    noise,
                    opts,
                    sample_size,
                    screen_directions,
                    seed,
                    progress,
                    n,
                    budget,
                )
            except Cancelled:
                if budget is None or budget.projected is None:
                    raise  # your gradient's error stopped it (raised by yours.get() below), not the budget
                tell_over_budget(n, budget, progress)
                chosen, mode_note = "screen", over_budget_note(n, budget)
                noise = probe_line(engine, problem, seed, check_determinism)
                # How the abandoned full check (and this probe) evaluated entries is not how the
                # screened ones were: report.evaluated names only the search's strategies.
                engine.forget_runs()
                per_leaf = run_mode(
                    chosen, engine, problem, yours, noise, opts, sample_size, screen_directions, seed, progress, n
                )
            grads, _ = yours.get()
            warnings = list(
                blocking_warnings(
                    problem,
                    # A precomputed pytree beside a float64 run whose random draws differ from yours;
                    # a widened run (promote.py) draws your float32 masks, so it needs no warning.
                    promoted_pytree=x64
                    and not callable(grad_fn)
                    and not problem.widened
                    and "promoted" in problem.precision,
                )
            )
            slopes = None
            if taylor_test:
                slopes = screen.taylor_slopes(
                    engine, problem, grads, noise if isinstance(noise, float) else noise.get(), seed
                )
        report = build_report(
            problem,
            grads,
            per_leaf,
            warnings + clashes,
            slopes,
            opts,
            mode_note,
            engine,
            top_k,
            time.perf_counter() - start,
        )
        return not_checked(report, params, select)

    report = without_promotion_if_needed(run, x64, "cost_fn", params, args)
    return conjugate_diagnosis(report) if rw.complex_mask is not None else report


def not_checked(report: GradCheckReport, params: PyTree, select: Any) -> GradCheckReport:
    """The report with a row for each floating leaf that ``only=`` left out (after the checked ones)."""
    if select is None:
        return report
    rows = tuple(
        LeafReport(
            path=path_str(p),
            shape=tuple(np.shape(x)),
            dtype=str(getattr(x, "dtype", "float")),
            difference=math.nan,
            passed=True,
            checked=0,
            how="not checked",
            n_failed=0,
            n_kinks=0,
            worst=None,
            resolution=math.nan,
            status="not checked",
        )
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if is_floating(x) and not select(path_str(p), x)
    )
    if not rows:
        return report
    values = None if report.entry_values is None else (*report.entry_values, *(None,) * len(rows))
    return dataclasses.replace(report, leaves=report.leaves + rows, entry_values=values)


def without_promotion_if_needed(
    run: Callable[[bool], GradCheckReport], x64: bool, fn: str, *trees: Any
) -> GradCheckReport:
    """``run(x64)``, or, when float64 promotion broke a function that hard-codes float32 (a scan
    carry, typed init values), ``run(False)`` with a warning saying so.

    A retry of the whole check, not a repair of the promoted program: in the inputs' own dtypes
    the function runs as its author wrote it, and the report's precision line says what that
    precision can still see.
    """
    first: Exception
    try:
        return run(x64)
    except TypeError as e:
        if not (x64 and is_promotion_error(e, *trees)):
            raise
        first, note = e, promotion_note(fn, e)
    except Exception as e:  # noqa: BLE001 - only JAX's callback dtype error is handled, see below
        if not (x64 and _is_callback_narrowed(e)):
            raise
        first, note = e, MSG_CALLBACK_X64.format(fn=fn)
    try:
        report = run(False)
    except Exception as e:  # the function's own error, once promotion is out of the way
        raise e from first
    return dataclasses.replace(report, warnings=(*report.warnings, note))


MSG_CALLBACK_X64 = (
    "{fn} calls a host callback (jax.pure_callback or io_callback) that XLA ran in its own threads, where "
    "JAX's scoped float64 mode does not reach: JAX narrowed the callback's float64 results to float32 and "
    "then rejected them. Checked in your own dtypes instead (x64=False): the precision line says how small "
    "an error that can still see. To check in float64, enable x64 globally for this run "
    "(JAX_ENABLE_X64=1) so that XLA's threads see it too."
)


def _is_callback_narrowed(error: BaseException) -> bool:
    """JAX's error when a float64 check's host callback ran in one of XLA's threads (where the
    scoped ``jax.enable_x64`` is off) and its float64 results were narrowed to float32."""
    text = str(error)
    return "Incorrect output dtype for return value" in text and "Expected: float64" in text


# The check's own options and their defaults: a keyword of these names is taken as the option.
_OPTION_WORDS = {
    "eps": "the finite-difference step",
    "seed": "the seed of the random directions and samples",
    "mode": "how many entries are checked",
    "method": "the finite-difference stencil",
}


def option_clashes(
    check: str, fns: dict[str, Any], positional: tuple[Any, ...], kwargs: dict[str, Any], given: dict[str, Any]
) -> list[str]:
    """Options whose names are also parameters of your functions: an error where a function then
    misses its argument, a warning where it keeps its default while the option was set.

    Args:
      check: the public function (``check_grad``), for the messages.
      fns: your functions by argument name (non-callables are skipped).
      positional: what they are called with positionally.
      kwargs: the keywords passed on to them.
      given: the options' values in this call.

    Returns:
      The warnings for the report.

    Raises:
      TypeError: a function misses a required argument whose name is one of the options.
    """
    notes: list[str] = []
    for who, fn in fns.items():
        if not callable(fn):
            continue
        try:
            sig = inspect.signature(fn)
            bound = sig.bind_partial(*positional, **kwargs).arguments
        except (TypeError, ValueError):
            continue
        for name, p in sig.parameters.items():
            if (
                name not in given
                or name not in _OPTION_DEFAULTS
                or name in bound
                or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ):
                continue
            value, what = given[name], _OPTION_WORDS.get(name, f"an option of {check}")
            if p.default is p.empty:
                taken = (
                    f"{name}={value!r} was taken as the check's {name}"
                    if _is_set(value, _OPTION_DEFAULTS[name])
                    else f"a keyword {name}= is taken by the check, never passed on"
                )
                raise TypeError(MSG_OPTION_CLASH.format(check=check, fn=who, name=name, what=what, taken=taken))
            if _is_set(value, _OPTION_DEFAULTS[name]):
                notes.append(MSG_OPTION_KEPT.format(check=check, fn=who, name=name, value=value, what=what))
    return list(dict.fromkeys(notes))


def _is_set(value: Any, default: Any) -> bool:
    """Whether an option was given a value other than its default."""
    try:
        return value is not default and bool(value != default)
    except (TypeError, ValueError):  # an array-like value
        return True


@contextlib.contextmanager
def _explain_kwargs(kwargs: dict[str, Any]) -> Iterator[None]:
    """A TypeError about keyword arguments we passed on says where they came from."""
    try:
        yield
    except TypeError as e:
        if kwargs and "keyword argument" in str(e):
            names = ", ".join(repr(k) for k in kwargs)
            raise TypeError(
                MSG_KWARGS.format(fn="your function", names=names, error=e, first=next(iter(kwargs)))
            ) from e
        raise


_OPTION_DEFAULTS = {
    k: p.default for k, p in inspect.signature(check_grad).parameters.items() if p.kind is p.KEYWORD_ONLY
}


@contextlib.contextmanager
def _explain_promotion(x64: bool, *trees: Any) -> Iterator[None]:
    """JAX's dtype error from a cost that hard-codes float32, with what to do (numerical_grad has no
    report to say that it fell back to x64=False, so it does not)."""
    try:
        yield
    except TypeError as e:
        if x64 and is_promotion_error(e, *trees):
            raise TypeError(MSG_PROMOTION_ERROR.format(error=promotion_note("cost_fn", e))) from e
        raise


def make_engine(problem: Problem, devices: Sequence[Any] | None, chunk_size: int | None, strategy: str) -> Engine:
    devs = list(devices) if devices is not None else jax.local_devices()
    return Engine(
        problem.cost_fn,
        problem.layout,
        problem.args_layout,
        *problem.inputs,
        devs,
        chunk_size,
        eval_bytes(problem),
        strategy,
        trace=problem.trace,
    )


def eval_bytes(problem: Problem) -> int:
    """Footprint of one cost evaluation: the bytes of every value its jaxpr computes.

    An upper bound on the temporaries (XLA fuses many of them away), measured from the
    traced program without compiling it, so the chunk size errs on the safe side.
    """
    total = 0
    for eqn in walk_eqns(problem.trace.jaxpr):
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
            if shape is not None and dtype is not None:
                try:
                    total += math.prod(shape) * np.dtype(dtype).itemsize
                except TypeError:  # extended dtypes (PRNG keys)
                    continue
    return total


def numerical_grad(
    cost_fn: CostFn,
    params: PyTree,
    *args: Any,
    eps: float | None = None,
    x64: bool = True,
    method: str = "central",
    chunk_size: int | None = None,
    devices: Sequence[Any] | None = None,
    progress: bool | None = None,
    strategy: str = "delta",
    float64: bool = False,
    only: Only = None,
    **kwargs: Any,
) -> PyTree:
    """The finite-difference gradient of ``cost_fn`` at ``params``, shaped like ``params``.

    Each floating entry gets (J(θ+hᵢeᵢ) − J(θ−hᵢeᵢ)) / 2hᵢ (or a higher-order stencil),
    evaluated in parallel with ``jax.vmap`` in chunks.

    Args:
      cost_fn: ``J(params, *args) -> scalar``.
      params: any pytree; floating leaves are differentiated.
      *args: further arguments to ``cost_fn``.
      eps: absolute step (the classic recipe's 1e-7); default ∛ε·max(1, |θᵢ|) per entry.
      x64: compute in float64 under a scoped ``jax.enable_x64`` (the global flag is untouched).
      method: ``"central"``, ``"central4"`` or ``"richardson"``.
      chunk_size: perturbations per vmap step (default from device memory).
      devices: devices to spread the work over.
      progress: show a progress bar on stderr.
      strategy: ``"delta"`` or ``"vmap"``; see :func:`check_grad`.
      float64: return the float64 estimates as NumPy arrays (full precision on the host)
        instead of arrays typed and placed like ``params``.
      only: the leaves to differentiate (see :func:`check_grad`); the others are not
        perturbed and come back as NaN.
      **kwargs: keyword arguments passed on to ``cost_fn`` (see :func:`check_grad`).

    Returns:
      A pytree like ``params``: at each floating leaf an array of that leaf's shape, dtype and
      placement (a ``jax.Array`` on the leaf's devices/sharding for JAX leaves, a NumPy array
      for NumPy leaves), or float64 NumPy arrays with ``float64=True``; complex leaves get
      ∂J/∂x − i·∂J/∂y (JAX's convention); integer and bool leaves become ``float0`` zeros, as
      in ``jax.grad(..., allow_int=True)``.

    Raises:
      ValueError: J not a scalar or not finite, no floating leaves, a bad option.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> g = jgradcheck.numerical_grad(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.array([1.0, -2.0])})
      >>> [round(float(v), 6) for v in g["w"]]
      [2.0, -4.0]
    """
    given = {k: v for k, v in locals().items() if k in _OPTION_DEFAULTS}
    if method not in numerics.ORDER:
        raise ValueError(MSG_METHOD.format(method=method))
    if strategy not in ("delta", "vmap"):
        raise ValueError(MSG_STRATEGY.format(strategy=strategy))
    eps = check_eps(eps)
    check_options(chunk_size=chunk_size, devices=devices)
    opts = Options(eps, method, numerics.DEFAULT_SAFETY, 0.0, 0.0, False, 0)
    if not callable(cost_fn):
        raise TypeError(MSG_NOT_CALLABLE.format(kind=type(cost_fn).__name__))
    check_live("numerical_grad", params=params, args=args, kwargs=kwargs)
    option_clashes("numerical_grad", {"cost_fn": cost_fn}, (params, *args), kwargs, given)
    original = params
    select = selector(only, params)
    rw = rewrite(cost_fn, None, params, args, kwargs)
    cost_fn, params, args = rw.cost_fn, rw.params, rw.args
    with (
        precision_scope(x64),
        _explain_kwargs(kwargs),
        _explain_promotion(x64, params, args),
        only_scope(select),
    ):
        problem = prepare(cost_fn, params, args, x64, check_determinism=False)
        problem.j0 = float("nan")  # refinement (which needs J(θ)) is off here
        engine = make_engine(problem, devices, chunk_size, strategy)
        n = sum(int(f.size) for f in problem.floats)
        total = n * len(numerics.STENCILS[method][0])
        bar = Progress(total, **show_progress(progress, total))
        sel = {i: np.arange(int(f.size)) for i, f in enumerate(problem.floats)}
        zeros = [np.zeros(int(f.size)) for f in problem.floats]
        coords = check_leaves(engine, problem, sel, Yours.ready(zeros, [0.0] * len(zeros)), 0.0, opts, bar)
        out = [coords[i].numerical.reshape(f.shape) for i, f in enumerate(problem.floats)]
        bar.close()
    it = iter(out)

    def skipped(leaf: Any) -> Any:  # a leaf only= left out: not differentiated
        nan = np.full(np.shape(leaf), np.nan)
        return nan if float64 else _like(nan, leaf)

    leaves = [
        (next(it) if float64 else _like(next(it), leaf))
        if k == "float"
        else skipped(leaf)
        if select is not None and is_floating(leaf)
        else np.zeros(np.shape(leaf), jax.dtypes.float0)
        for leaf, k in zip(jax.tree_util.tree_leaves(params), problem.layout.kinds)
    ]
    grads = jax.tree_util.tree_unflatten(problem.layout.treedef, leaves)
    if rw.complex_mask is None:
        return grads
    joined = join_grad(grads, rw.complex_mask)
    if float64:
        return joined
    return jax.tree_util.tree_map(lambda g, p: _like(np.asarray(g), p) if is_complex(p) else g, joined, original)


def _like(values: np.ndarray, leaf: Any) -> Any:
    """``values`` (float64, host) in the dtype and on the devices of ``leaf``."""
    if isinstance(leaf, jax.Array):
        # Under x64 for float64 leaves: outside it, device_put would narrow them to float32.
        with jax.enable_x64(bool(jax.config.read("jax_enable_x64")) or leaf.dtype == np.float64):
            return jax.device_put(values.astype(leaf.dtype), leaf.sharding)
    dtype = np.asarray(leaf).dtype if isinstance(leaf, (np.ndarray, np.generic)) else np.float64
    return values.astype(dtype)
