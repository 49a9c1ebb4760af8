"""The precision J is computed in along each parameter's path, read from the cost's jaxpr.

A check promoted to float64 is only as fine as the narrowest arithmetic between a parameter and
J: ``jax.nn.dot_product_attention`` runs its softmax in float32 whatever its inputs are, a mixed-
precision layer casts to bfloat16, a user's ``astype(jnp.float32)`` stays as written. Along such a
path J's values are quantized at that dtype's spacing, and a finite difference over a step too
small for it reads two equal values of J as a derivative of 0. This module walks the traced cost
once (no compilation) and gives, per float leaf, the machine epsilon of the narrowest floating
dtype on any value that depends on it, and where that narrowing happens.

Data flow is tracked per equation: a value depends on a leaf if any input of its equation does.
Inside a sub-program (``pjit``, custom rules, ``scan``, ``while``, ``cond``) every input is taken to
depend on everything its equation's inputs depend on: conservative (a path may be called narrower
than it is, which only makes the step larger), never blind to a cast inside a loop body.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import compat, numerics


@dataclasses.dataclass(frozen=True)
class PathPrecision:
    """Per float leaf: ``eps`` the machine epsilon of the narrowest float on its path to J (at
    least the check dtype's), and ``where`` that dtype and the primitive that produced it
    (``"bfloat16 (convert_element_type)"``), or ``None`` where the path is as fine as the check."""

    eps: tuple[float, ...]
    where: tuple[str | None, ...]


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
    """Every jaxpr among an equation's parameters (a ClosedJaxpr's ``.jaxpr``, tuples of branches)."""
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            inner = getattr(x, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out.append(inner)
            elif hasattr(x, "eqns") and hasattr(x, "invars"):
                out.append(x)
    return out


def _float_eps(aval: Any) -> float | None:
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return None
    try:
        return _EPS[dtype]
    except (KeyError, TypeError):
        pass
    try:
        eps = numerics.machine_eps(dtype) if np.issubdtype(dtype, np.inexact) or "float" in str(dtype) else None
    except (TypeError, ValueError):
        return None
    try:
        _EPS[dtype] = eps
    except TypeError:  # an unhashable dtype
        pass
    return eps


# Machine epsilon by dtype, for every value of every traced cost walked (jnp.finfo takes ~0.1 ms).
_EPS: dict[Any, float | None] = {}


def _walk(jaxpr: Any, deps_in: list[int], narrow: dict[int, tuple[float, str]]) -> list[int]:
    """Propagates dependency bitmasks through ``jaxpr`` and records, per leaf bit, the widest
    machine epsilon (narrowest float) seen on a dependent value. Returns the outputs' masks."""
    deps: dict[Any, int] = {}
    for v, d in zip(jaxpr.invars, deps_in):
        deps[v] = d
    for eqn in jaxpr.eqns:
        d = 0
        for v in eqn.invars:
            if not hasattr(v, "val"):  # a Literal has no dependence
                d |= deps.get(v, 0)
        if not d:
            continue
        for sub in _subjaxprs(eqn.params):
            # Positional where the arity matches (pjit, custom rules); else every input sees d.
            inner = (
                [deps.get(v, 0) if not hasattr(v, "val") else 0 for v in eqn.invars]
                if len(sub.invars) == len(eqn.invars)
                else [d] * len(sub.invars)
            )
            _walk(sub, inner, narrow)
        for v in eqn.outvars:
            deps[v] = d
            eps = _float_eps(getattr(v, "aval", None))
            if eps is None:
                continue
            bits = d
            while bits:
                low = bits & -bits
                i = low.bit_length() - 1
                if eps > narrow.get(i, (0.0, ""))[0]:
                    narrow[i] = (eps, f"{v.aval.dtype} ({eqn.primitive.name})")
                bits ^= low
    return [deps.get(v, 0) if not hasattr(v, "val") else 0 for v in jaxpr.outvars]


def path_precision(problem: Any) -> PathPrecision:
    """The narrowest float along each float leaf's path to J (cached on the problem).

    The first ``len(problem.floats)`` inputs of ``problem.trace`` are the float leaves, in order.
    """
    cached = problem.__dict__.get("_path_precision")
    if cached is not None:
        return cached
    n = len(problem.floats)
    base = numerics.machine_eps(problem.dtype)
    narrow: dict[int, tuple[float, str]] = {}
    jaxpr = problem.trace.jaxpr
    deps_in = [1 << i if i < n else 0 for i in range(len(jaxpr.invars))]
    try:
        _walk(jaxpr, deps_in, narrow)
    except Exception:  # an unfamiliar jaxpr: fall back to the check dtype (today's behaviour)
        narrow = {}
    eps, where = [], []
    for i in range(n):
        e, site = narrow.get(i, (0.0, ""))
        eps.append(max(base, e))
        where.append(site if e > base else None)
    out = PathPrecision(tuple(eps), tuple(where))
    problem.__dict__["_path_precision"] = out
    return out


def leaf_of(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """For positions in the concatenation of a group's raveled leaves: the position in ``group``
    of the leaf each falls in."""
    sizes = np.array([int(problem.floats[i].size) for i in group])
    return np.searchsorted(np.cumsum(sizes), np.asarray(idx), side="right")


def entry_eps(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: its leaf's path epsilon."""
    pp = path_precision(problem)
    leaf = leaf_of(problem, group, idx)
    return np.asarray([pp.eps[i] for i in group], np.float64)[leaf]


def _cost_of(problem: Any) -> Any:
    """J as a function of (float leaves, arg float leaves), the rest of the inputs bound."""

    def cost(fl: list[Any], af: list[Any]) -> Any:
        args = problem.args_layout.merge(af, problem.arg_arrays)
        return problem.cost_fn(problem.layout.merge(fl, problem.arrays), *args)

    return cost


def _quiet(cost: Any, *example: Any) -> Any:
    """``cost`` as traced at ``example``'s shapes and dtypes, its equations without outputs (a
    ``jax.debug.print``, an output-less callback) dropped as for the engine's evaluations
    (``effects.clean``): a measuring run must not print or call back (a test of printing costs
    saw 5 calls from the float32 gradient runs)."""
    from jgradcheck._src.effects import clean

    ready = clean(jax.make_jaxpr(cost)(*example))

    def run(*a: Any) -> Any:
        return jax.core.eval_jaxpr(ready.jaxpr, ready.consts, *jax.tree_util.tree_leaves(a))[0]

    return run


# Your gradient given as values in a narrower dtype than the check's (a float32 pytree from
# jax.grad, the classic flow of a precomputed gradient) is off by the rounding of the sums that
# made it: that grows with the terms summed (a batch mean of residuals that cancel after training),
# not with the gradient's own size. It is measured, not guessed: JAX's own gradient of the same
# cost in your dtype against the check's, times this margin (another summation order, your own
# backward pass, rounds differently but by about as much).
GRAD_ROUNDING_MARGIN = 4.0


def measured_grad_rounding(problem: Any) -> tuple[float, ...]:
    """Per float leaf: how far a gradient of J computed in the parameters' own dtypes is off.

    ``GRAD_ROUNDING_MARGIN`` times the largest difference, over the leaf, between ``jax.grad`` of
    the cost at the parameters in their own dtypes (float32, as you ran it) and at the check's
    dtype (cached on the problem). A cost ``jax.grad`` cannot differentiate gives 0: the
    ulp-based bound (``numerics.grad_rounding``) alone applies.
    """
    cached = problem.__dict__.get("_grad_rounding")
    if cached is None:
        try:
            low = [jnp.dtype(d) for d in problem.orig_dtypes]
            draws = CHECK_DRAWS if all(d == jnp.dtype(np.float32) for d in low) else 1
            swamped: list[bool] = []
            cached = tuple(_measure(problem, draws=draws, swamped=swamped))
        except Exception:  # a cost jax.grad cannot take, or one that needs its own dtypes
            cached, swamped = (0.0,) * len(problem.floats), []
        problem.__dict__["_grad_rounding"] = cached
        problem.__dict__["_grad_swamped"] = tuple(swamped) or (False,) * len(problem.floats)
    return cached


def entry_swamped_rounding(problem: Any, group: tuple[int, ...], idx: np.ndarray, grad_eps: np.ndarray) -> np.ndarray:
    """Per entry: ``entry_grad_rounding`` where its leaf's gradient in your dtype is rounding
    throughout (a float32 gradient at a float32 minimum), else 0. It limits what the check can
    see as the differences' own error does: a 1% bug of such a gradient is below it, so a leaf
    it dominates is inconclusive, never passed."""
    measured = entry_grad_rounding(problem, group, idx, grad_eps)
    flags = problem.__dict__.get("_grad_swamped") or (False,) * len(problem.floats)
    return np.where(np.asarray([flags[i] for i in group], bool)[leaf_of(problem, group, idx)], measured, 0.0)


# Float32 runs of jax.grad (at the parameters and at one-ulp moves of them) whose largest difference
# from float64 measures a gradient's rounding (``measured_check_rounding``, ``measured_grad_rounding``).
CHECK_DRAWS = 4
# A low-precision gradient that moves, over one-ulp moves of θ, by at least this fraction of its
# difference from float64 is rounding throughout: that difference is not capped (see ``_measure``).
SPREAD_IS_ROUNDING = 0.25


def measured_section_rounding(problem: Any) -> tuple[float, ...]:
    """Per float leaf whose path to J narrows (a float32 softmax in a float64 check): how far a
    gradient of J through that section, and J's differences, may be off by the section's
    rounding, measured; 0 for the other leaves, or where it cannot be measured.

    2 × ``GRAD_ROUNDING_MARGIN`` × the leaf's largest difference between ``jax.grad`` of the cost
    as written and of the same cost with its narrowing casts widened (``promote.casts_widened``):
    once for a gradient through the section (yours), once for the differences of J through it.

    Why: the section rounds at its own epsilon whatever the check's dtype, relative to the terms
    it carries, not to the gradient. At an extreme scale they are far apart:
    ``jax.nn.dot_product_attention`` with weights ×30 (J = 4.5e5) saturates its float32 softmax,
    and a key weight's gradient through it came out 2.6e-3 where the same attention in float64 has
    5.3e-4, and the central differences of J through it -2.4e-3: the check failed a correct
    gradient at 640× the tolerance built on the gradient's size. At scale 1 the two gradients
    differ by ~eps32 of the terms: nothing a 1% error hides behind.
    """
    cached = problem.__dict__.get("_section_rounding")
    if cached is None:
        pp = path_precision(problem)
        base = numerics.machine_eps(problem.dtype)
        narrow = {i for i, e in enumerate(pp.eps) if e > base}
        cached = (0.0,) * len(problem.floats)
        if narrow:
            try:
                cached = tuple(_section_error(problem, narrow))
            except Exception:  # a cost jax.grad or promote.py cannot take: the size-relative floors apply
                pass
        problem.__dict__["_section_rounding"] = cached
    return cached


def _section_error(problem: Any, leaves: set[int]) -> list[float]:
    from jgradcheck._src import promote  # promote imports compat only; kept local like run_compiled
    from jgradcheck._src.vector import run_compiled  # vector imports the check, which imports this

    cost = _cost_of(problem)

    floats, arg_floats = list(problem.floats), list(problem.arg_floats)
    with compat.enable_x64(jnp.dtype(problem.dtype).itemsize > 4):
        written = run_compiled(jax.grad(_quiet(cost, floats, arg_floats)), floats, arg_floats)
        wide = promote.widened(cost, floats, arg_floats)
        with promote.casts_widened():
            widened = run_compiled(jax.grad(_quiet(wide, floats, arg_floats)), floats, arg_floats)
    out = []
    for i, (a, b) in enumerate(zip(written, widened)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        ok = i in leaves and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        out.append(2 * GRAD_ROUNDING_MARGIN * float(np.max(np.abs(a - b), initial=0.0)) if ok else 0.0)
    return out


# At most this many failing entries of a leaf with a narrow path get central differences of the
# cost with its casts widened (``section_differences``): one call of that cost per point.
SECTION_ENTRIES = 256


def section_differences(
    problem: Any, group: tuple[int, ...], idx: np.ndarray, theta: np.ndarray, h: np.ndarray
) -> np.ndarray:
    """Per entry: the central difference over ±h of the cost with its narrowing casts widened
    (``promote.casts_widened``), at the same points as the check's; NaN where it cannot be run.

    The difference between it and the check's own is what the narrow section did to J's
    differences at that entry (near a float32 softmax's saturation, its quantization steps look
    like kinks and bend the differences by as much as the gradient).
    """
    k = int(np.asarray(idx).size)
    out = np.full(k, np.nan)
    if k == 0 or k > SECTION_ENTRIES:
        return out
    from jgradcheck._src import promote

    cost = _cost_of(problem)

    floats, arg_floats = list(problem.floats), list(problem.arg_floats)
    sizes = np.cumsum([int(problem.floats[i].size) for i in group])
    try:
        with compat.enable_x64(jnp.dtype(problem.dtype).itemsize > 4):
            with promote.casts_widened():  # traced once, widened casts and all
                wide = _quiet(promote.widened(cost, floats, arg_floats), floats, arg_floats)

            @functools.partial(jax.jit, static_argnums=1)
            def at(leaf_flat: Any, which: int, pos: Any, value: Any) -> Any:
                moved = list(leaf_flat)
                moved[which] = moved[which].reshape(-1).at[pos].set(value).reshape(moved[which].shape)
                return wide(moved, arg_floats)

            for j, (i, t, s) in enumerate(zip(np.asarray(idx), theta, h)):
                g = int(np.searchsorted(sizes, i, side="right"))
                pos = int(i - (sizes[g] - problem.floats[group[g]].size))
                leaf = group[g]
                dtype = np.asarray(problem.host(leaf)).dtype
                plus, minus = (np.asarray(t + o * s, np.float64).astype(dtype) for o in (1, -1))
                jp = float(at(floats, leaf, pos, plus))
                jm = float(at(floats, leaf, pos, minus))
                out[j] = (jp - jm) / (float(plus) - float(minus))
    except Exception:  # a cost promote.py cannot rebuild: the measured gradient floor alone applies
        return np.full(k, np.nan)
    return out


def entry_section_rounding(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: ``measured_section_rounding`` of its leaf."""
    measured = measured_section_rounding(problem)
    return np.asarray([measured[i] for i in group], np.float64)[leaf_of(problem, group, idx)]


def measured_check_rounding(problem: Any) -> tuple[float, ...]:
    """Per float leaf of a float64 check: how far any float64 program's gradient of J may be off
    by rounding, measured; 0 elsewhere (a float32 check, or where it cannot be measured).

    ``GRAD_ROUNDING_MARGIN`` × (ε64 / ε32) × the leaf's largest difference between ``jax.grad`` of
    the cost in float32 and in float64: the gradient's sensitivity to rounding, read in float32
    and scaled to float64.

    Why: at an exact minimum (a model trained to zero loss) every residual r = prediction − target
    is 0 up to the rounding of an O(1) prediction, and so is the gradient Σ r ∂r/∂θ. Two programs
    of the same J (your gradient's, the check's vmapped one) round those predictions differently:
    measured on a float64 GRU trained to loss 2e-33, your correct gradient and the central
    differences, each ~1e-17, differed by 1e-17, and J is exactly quadratic along its output
    weights, so larger steps agreed with the check's own rounding and failed yours at 120× its
    tolerance. A gradient of ~0 there is defined only to ε64 × the size of the terms it sums;
    float32 shows that size 2^29 times larger. Elsewhere the floor is ~ε64 of the gradient's
    terms: a 1e-4 error of a leaf is ~1e11 times above it. A float32 run that differs in kind
    (another branch) moves it by at most ε64/ε32 ≈ 2e-9 of the gradient.
    """
    if jnp.dtype(problem.dtype) != jnp.dtype(np.float64):
        return (0.0,) * len(problem.floats)
    cached = problem.__dict__.get("_check_rounding")
    if cached is None:
        try:
            diffs = _measure(
                problem, low=[jnp.dtype(np.float32)] * len(problem.floats), margin=1.0, cap=False, draws=CHECK_DRAWS
            )
            ratio = numerics.machine_eps(np.float64) / numerics.machine_eps(np.float32)
            cached = tuple(GRAD_ROUNDING_MARGIN * ratio * d for d in diffs)
        except Exception:  # a cost jax.grad cannot take, or one that cannot run in float32
            cached = (0.0,) * len(problem.floats)
        problem.__dict__["_check_rounding"] = cached
    return cached


def entry_check_rounding(problem: Any, group: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: ``measured_check_rounding`` of its leaf."""
    measured = measured_check_rounding(problem)
    return np.asarray([measured[i] for i in group], np.float64)[leaf_of(problem, group, idx)]


def _gradient_runs(problem: Any, low: list[Any], draws: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """jax.grad of the cost in float64, and in ``low`` dtypes at the parameters and ``draws`` − 1
    seeded one-ulp moves of them; kept on the problem (a float32 check that fails asks for the same
    runs twice: its own gradient's rounding and the check's)."""
    key = ("_gradient_runs", tuple(str(d) for d in low), draws)
    kept = problem.__dict__.get(key)
    if kept is not None:
        return kept
    narrow = max(low, key=lambda d: float(jnp.finfo(d).eps))
    wide64 = any(jnp.finfo(d).bits > 32 for d in low)

    from jgradcheck._src.vector import run_compiled  # vector imports the check, which imports this

    cost = _cost_of(problem)
    quiet: dict[tuple[str, ...], Any] = {}  # traced once per dtypes, not once per draw

    def grads(floats: list[Any], arg_floats: list[Any]) -> list[np.ndarray]:
        sig = tuple(str(jnp.asarray(x).dtype) for x in [*floats, *arg_floats])
        if sig not in quiet:
            quiet[sig] = jax.grad(_quiet(cost, floats, arg_floats))
        # Compiled once per traced program (the same cost checked again at new values reuses it),
        # not once per check as a jax.jit of a new closure would be.
        return [np.asarray(g, np.float64).ravel() for g in run_compiled(quiet[sig], floats, arg_floats)]

    with compat.enable_x64(True):
        fine = grads(list(problem.floats), list(problem.arg_floats))
    rng = np.random.default_rng(0)
    low_args = [jnp.asarray(a, narrow) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in problem.arg_floats]
    rounds = []
    for k in range(draws):
        floats = [np.asarray(f).astype(d) for f, d in zip(problem.floats, low)]
        if k:
            floats = [
                np.nextafter(f, np.where(rng.random(f.shape) < 0.5, -np.inf, np.inf).astype(f.dtype)) for f in floats
            ]
        with compat.enable_x64(wide64):
            rounds.append(grads([jnp.asarray(f) for f in floats], low_args))
    problem.__dict__[key] = (fine, rounds)
    return fine, rounds


def _measure(
    problem: Any,
    low: list[Any] | None = None,
    margin: float = GRAD_ROUNDING_MARGIN,
    cap: bool = True,
    draws: int = 1,
    swamped: list[bool] | None = None,
) -> list[float]:
    """Per leaf: ``margin`` × the largest |jax.grad in ``low`` dtypes (the parameters' own by
    default) − jax.grad in float64|, capped at ``numerics.GRAD_REL_CAP`` of the leaf (``cap``).

    ``draws`` > 1 (``low`` all float32): the low run is repeated at the parameters moved by one
    float32 ulp up or down per entry (seeded), the largest difference kept. One rounding is one
    sample: a scalar leaf's float32 gradient, a mean of residuals, came out exactly equal to the
    float64 one in one case of six. ``swamped`` (a list, if given) gets per leaf whether the
    rounding was left uncapped above the cap: the gradient is rounding throughout."""
    low = [jnp.dtype(d) for d in problem.orig_dtypes] if low is None else low
    fine, rounds = _gradient_runs(problem, low, draws)
    stats = []
    for leaf, f in enumerate(fine):
        diffs = [np.abs(f - r[leaf]) for r in rounds]
        ok = bool(np.all(np.isfinite(f)) and all(np.all(np.isfinite(d)) for d in diffs))
        worst = max(float(np.max(d, initial=0.0)) for d in diffs)
        spread = max((float(np.max(np.abs(r[leaf] - rounds[0][leaf]), initial=0.0)) for r in rounds[1:]), default=0.0)
        # Never more than numerics.GRAD_REL_CAP of the leaf's largest entry: a float32 gradient off by
        # more is not rounding (a cost whose float32 and float64 runs differ in kind: other random
        # masks, another branch), and must not widen the tolerance that far ...
        most = numerics.GRAD_REL_CAP * float(np.max(np.abs(f), initial=0.0))
        stats.append((ok, worst, most, ok and worst * margin > most and spread >= SPREAD_IS_ROUNDING * worst))
    # ... unless the low runs are rounding throughout: a low run that moves by as much as it differs
    # when θ moves by one of its ulps (masks and branches do not move so). Rounding throughout is a
    # property of the point (a float32 minimum, where every residual is rounding), so a leaf whose
    # low gradient happens to round alike at the moves (one reading of data rounding) is not capped
    # either once another leaf shows it.
    point = cap and any(s[3] for s in stats)
    out = []
    for ok, worst, most, _ in stats:
        uncapped = not cap or point
        out.append(min(margin * worst, math.inf if uncapped else most) if ok else 0.0)
        if swamped is not None:
            swamped.append(bool(ok and point and margin * worst > most))
    return out


def entry_grad_rounding(problem: Any, group: tuple[int, ...], idx: np.ndarray, grad_eps: np.ndarray) -> np.ndarray:
    """Per entry of a group's concatenated leaves: the measured rounding of its leaf's gradient,
    where your gradient's dtype (``grad_eps``, per entry) is narrower than the check's; else 0."""
    narrower = np.asarray(grad_eps, np.float64) > numerics.machine_eps(problem.dtype)
    if not narrower.any():
        return np.zeros(np.asarray(idx).size)
    leaf = leaf_of(problem, group, idx)
    measured = measured_grad_rounding(problem)
    return np.where(narrower, np.asarray([measured[i] for i in group], np.float64)[leaf], 0.0)
