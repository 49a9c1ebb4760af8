"""``numerical_grad`` and ``check_grad``: the gradient check of any JAX pytree."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jgradcheck._src import diagnose, numerics, screen
from jgradcheck._src.engine import Engine, Progress
from jgradcheck._src.jaxpr_scan import invisible_to_fd, walk_eqns
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport
from jgradcheck._src.tree import MSG_NO_FLOAT, Layout, path_str, split

PyTree = Any

MSG_NOT_CALLABLE = "cost_fn must be a function J(params, *args) -> scalar; got {kind}."
MSG_NOT_SCALAR = (
    "cost_fn must return a scalar, but J(params, *args) has shape {shape}. Reduce it to one "
    "number, e.g. jnp.mean over the examples (the seeds' J = (1/m) Σ L), and add the "
    "regularization term."
)
MSG_NOT_REAL = "cost_fn must return a real floating scalar; J(params, *args) has dtype {dtype}."
MSG_NONFINITE = (
    "J(params, *args) = {value} at the given params: finite differences of a NaN/Inf cost are "
    "meaningless. Check the data, log(0) in the loss (clip probabilities), and the initialization."
)
MSG_NONDETERMINISTIC = (
    "cost_fn is not deterministic: two evaluations at the same params gave J = {a} and {b}. "
    "Finite differences need the same J every time (the seeds: dropout breaks gradient checking). "
    "Pass a fixed PRNG key as an argument (and use the same mask in your gradient), or set "
    "keep_prob = 1.0 while checking."
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
MSG_MODE = "mode must be one of 'auto', 'full', 'screen', 'sample'; got {mode!r}."
MSG_METHOD = "method must be one of 'central', 'central4', 'richardson'; got {method!r}."
MSG_STEP_LOST = (
    "the step h = {h:g} is lost in {dtype} at {entry} = {theta:g}: θ + h and θ - h round to the "
    "same number, so the finite difference there is 0/0 ({count} entries like this). Use the "
    "default step (eps=None), which scales with |θ|, or a larger eps, or x64=True."
)
MSG_COUNT = "{name} must be a positive integer; got {value!r}."
MSG_POSITIVE = "{name} must be a positive number; got {value!r}."
MSG_NONNEGATIVE = "{name} must be a non-negative number; got {value!r}."
MSG_NO_DEVICES = "devices is empty; pass None (all local devices) or a non-empty list such as jax.devices()[:1]."
MSG_STRATEGY = "strategy must be 'delta' or 'vmap'; got {strategy!r}."
MSG_EPS = "eps must be a positive finite number (an absolute step); got {eps!r}."


class CostFn(Protocol):
    def __call__(self, params: PyTree, *args: Any) -> jax.Array: ...


class GradFn(Protocol):
    def __call__(self, params: PyTree, *args: Any) -> PyTree: ...


@contextlib.contextmanager
def _scope(x64: bool):
    """Scoped precision: float64 if asked, and "highest" matmuls (no TF32 on GPUs, jax#11628)."""
    with contextlib.ExitStack() as stack:
        if x64:
            stack.enter_context(jax.enable_x64(True))
        stack.enter_context(jax.default_matmul_precision("highest"))
        yield


@dataclasses.dataclass
class _Problem:
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
    groups: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    _host: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

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

    return jax.make_jaxpr(f)(*inputs)


def _same_trace(a: Any, b: Any) -> bool:
    """Whether two traces of the cost are the same program with the same constants."""
    if str(a.jaxpr) != str(b.jaxpr) or len(a.consts) != len(b.consts):
        return False
    return all(np.array_equal(_const_data(x), _const_data(y)) for x, y in zip(a.consts, b.consts))


def _const_data(x: Any) -> np.ndarray:
    """A constant's values; typed PRNG keys compare by their key data."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _prepare(cost_fn, params, args, x64: bool, check_determinism: bool) -> _Problem:
    """Splits and promotes the inputs and traces the cost (no compilation: that comes once, later)."""
    if not callable(cost_fn):
        raise TypeError(MSG_NOT_CALLABLE.format(kind=type(cost_fn).__name__))
    cost_fn = hashable(cost_fn)
    target = np.float64 if x64 else None
    layout, floats, arrays = split(params, "params", target, python_floats=True)
    if not floats:
        dtypes = sorted({str(getattr(x, "dtype", type(x).__name__)) for x in jax.tree_util.tree_leaves(params)})
        raise ValueError(MSG_NO_FLOAT.format(dtypes=", ".join(dtypes) or "none"))
    args_layout, arg_floats, arg_arrays = split(tuple(args), "args", target, python_floats=False)
    orig = tuple(
        str(getattr(leaf, "dtype", "float32" if not jax.config.read("jax_enable_x64") else "float64"))
        for leaf, k in zip(jax.tree_util.tree_leaves(params), layout.kinds)
        if k == "float"
    )
    dtype = jnp.result_type(*[f.dtype for f in floats])
    inputs = (floats, arrays, arg_floats, arg_arrays)
    trace = _trace(cost_fn, layout, args_layout, inputs)
    out = trace.out_avals[0] if len(trace.out_avals) == 1 else None
    if out is None or out.shape != ():
        shape = out.shape if out is not None else f"a tuple of {len(trace.out_avals)} outputs"
        raise ValueError(MSG_NOT_SCALAR.format(shape=shape))
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(MSG_NOT_REAL.format(dtype=out.dtype))
    if check_determinism and not all(
        _same_trace(trace, _trace(cost_fn, layout, args_layout, inputs)) for _ in range(2)
    ):
        raise ValueError(MSG_NONDETERMINISTIC.format(a="(trace 1)", b="(trace 2: different constants)"))
    kinds = sorted(set(orig))
    if x64:
        precision = "float64" + (
            f" (promoted from {', '.join(k for k in kinds if k != 'float64')})" if kinds != ["float64"] else ""
        )
    else:
        precision = ", ".join(sorted({str(f.dtype) for f in floats})) + " (promotion to float64 off)"
    batch: list[int] = []
    for leaf in jax.tree_util.tree_leaves(args):
        shape = getattr(leaf, "shape", ())
        if shape:
            batch += [int(shape[0]), int(shape[-1])]
    problem = _Problem(
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
        tuple(dict.fromkeys(batch)),
        trace,
    )
    problem.groups = _groups(problem, range(len(floats)))
    return problem


def _grad_call(grad_fn, layout: Layout, args_layout: Layout, floats, arrays, arg_floats, arg_arrays):
    return grad_fn(layout.merge(floats, arrays), *args_layout.merge(arg_floats, arg_arrays))


_grad_jit = jax.jit(_grad_call, static_argnames=("grad_fn", "layout", "args_layout"))


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


def _call_grad(grad_fn, problem: _Problem) -> PyTree:
    """Calls your gradient jitted (one compile instead of one per operation in eager mode);
    falls back to eager execution if it is not traceable (Python control flow on values)."""

    try:
        return _grad_jit(hashable(grad_fn), problem.layout, problem.args_layout, *problem.inputs)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    ):
        return grad_fn(problem.params(), *problem.args())


def _user_gradient(grad_fn, problem: _Problem) -> tuple[list[np.ndarray], list[float]]:
    """Your gradient, leaf by leaf in params' float-leaf order, and each leaf's own eps."""
    grads = _call_grad(grad_fn, problem) if callable(grad_fn) else grad_fn
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


def _probe_line(engine: Engine, problem: _Problem, seed: int, check_determinism: bool) -> float:
    """J(θ) (twice) and its noise level from one batched call of the line program (screen mode).

    ECnoise along two random one-sided lines over the group of small leaves (or the smallest
    leaf): the program is the one that screens them.
    """
    group = _probe_group(problem)
    theta = np.concatenate([problem.host(i) for i in group]).astype(np.float64)
    rng = np.random.default_rng(seed)
    scale = np.maximum(1.0, np.abs(theta)) / math.sqrt(theta.size)
    dirs = np.stack([rng.choice([-1.0, 1.0], size=theta.size) * scale for _ in range(2)])
    line = numerics.noise_spacing(problem.dtype) * np.arange(1, 10, dtype=np.float64)
    ts = np.concatenate([[0.0, 0.0], line, line])
    which = np.concatenate([[0, 0], np.zeros(9), np.ones(9)]).astype(np.int32)
    return _noise_from(engine.line_costs(group, dirs, ts, which), problem, check_determinism)


def _probe_group(problem: _Problem) -> tuple[int, ...]:
    return min(problem.groups, key=lambda g: sum(int(problem.floats[i].size) for i in g))


def _probe_entries(problem: _Problem, group: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-entry probe points for full and sample modes: J(θ) twice, then one-sided lines
    along two random coordinates of ``group``. They ride in that group's first call, so the
    probe costs no compilation of its own."""
    theta = np.concatenate([problem.host(i) for i in group])
    rng = np.random.default_rng(seed)
    js = rng.choice(theta.size, size=2, replace=theta.size < 2)
    steps = numerics.noise_spacing(problem.dtype) * np.arange(1, 10, dtype=np.float64)
    idx = np.concatenate([[js[0], js[0]], np.repeat(js, 9)]).astype(np.int64)
    base = theta[js].astype(np.float64)
    moved = np.concatenate([base[k] + steps * max(1.0, abs(base[k])) for k in range(2)])
    vals = np.concatenate([theta[[js[0], js[0]]].astype(np.float64), moved]).astype(theta.dtype)
    return idx, vals


def _noise_from(v: np.ndarray, problem: _Problem, check_determinism: bool) -> float:
    """J(θ) and its noise level from probe values [J(θ), J(θ), line 1 (9), line 2 (9)].

    Sets ``problem.j0``. The noise is ECnoise (Moré & Wild) on each one-sided line (t = s..9s:
    a kink at θ itself, ReLU or |w| at 0, lies at the end of the line rather than inside it,
    where it would pass for noise and hide real bugs); the smaller estimate wins (in case one
    line crosses a kink); never below eps |J|.

    Raises:
      ValueError: J(θ) is NaN/Inf, or differs between two evaluations (runtime randomness).
    """
    j0, j1 = float(v[0]), float(v[1])
    if not math.isfinite(j0):
        raise ValueError(MSG_NONFINITE.format(value=j0))
    if check_determinism and not abs(j1 - j0) <= 64 * numerics.machine_eps(problem.dtype) * max(abs(j0), abs(j1)):
        raise ValueError(MSG_NONDETERMINISTIC.format(a=repr(j0), b=repr(j1)))
    problem.j0 = j0
    # Never below rounding at J's magnitude near θ (|J(θ)| itself may be 0).
    floor = numerics.machine_eps(problem.dtype) * max(
        float(np.max(np.abs(v[np.isfinite(v)]))), np.finfo(np.float64).tiny
    )
    estimates = [numerics.ecnoise(v[2:11]), numerics.ecnoise(v[11:20])]
    finite = [e for e in estimates if math.isfinite(e)]
    return max(floor, min(finite)) if finite else floor


class _NoiseBox:
    """The noise level, delivered by the group whose first call carries the probe.

    Other groups evaluate meanwhile (their points do not depend on it) and wait only to judge.
    """

    def __init__(self, problem: _Problem, seed: int, check_determinism: bool):
        self.problem, self.seed, self.check_determinism = problem, seed, check_determinism
        self.group = _probe_group(problem)
        self._ready = threading.Event()
        self._value: float | None = None

    def deliver(self, values: np.ndarray) -> float:
        try:
            self._value = _noise_from(values, self.problem, self.check_determinism)
            return self._value
        finally:
            self._ready.set()

    def get(self) -> float:
        self._ready.wait()
        if self._value is None:
            raise _ProbeFailed
        return self._value


class _ProbeFailed(Exception):
    """Raised in groups waiting on a probe that failed; the probe's own error is reported."""


@dataclasses.dataclass
class _Coords:
    """Per-coordinate results for a set of entries of one leaf."""

    idx: np.ndarray
    numerical: np.ndarray
    tol: np.ndarray
    status: np.ndarray  # "ok" | "fail" | "kink" | "nan"
    left: np.ndarray
    right: np.ndarray


def _points(theta: np.ndarray, h: np.ndarray, offsets: Sequence[int], dtype) -> np.ndarray:
    """θ + o·h in the check dtype (exact for power-of-two h; see numerics.base_step)."""
    return np.concatenate([(theta + o * h).astype(dtype) for o in offsets])


def _entry_name(problem: _Problem, group: tuple[int, ...], flat: int) -> str:
    """``W2[3, 1]`` for a position in the concatenation of the group's leaves."""
    for i in group:
        size = int(problem.floats[i].size)
        if flat < size:
            shape = tuple(problem.floats[i].shape)
            index = ", ".join(str(int(j)) for j in np.unravel_index(flat, shape)) if shape else ""
            return f"{problem.paths[i]}[{index}]"
        flat -= size
    return "?"


def _check_entries(
    engine: Engine,
    problem: _Problem,
    group: tuple[int, ...],
    idx: np.ndarray,
    g: np.ndarray,
    g_eps: np.ndarray,
    g_scale: np.ndarray,
    noise: float | _NoiseBox,
    opts: _Options,
    progress: Progress,
) -> _Coords:
    """Compares yours (``g``) with finite differences at entries ``idx`` of a group of leaves.

    ``idx`` indexes the concatenation of the group's raveled leaves; ``g``, ``g_eps`` and
    ``g_scale`` are yours, its dtype's eps and its leaf's largest magnitude, per entry.
    ``noise`` is J's noise level, or the box that delivers it: the probe group's first call
    then carries the probe points too.
    """
    base = np.concatenate([problem.host(i) for i in group])
    dtype = base.dtype
    theta = base[idx].astype(np.float64)
    k = idx.size
    if opts.eps is not None:
        h = np.full(k, float(opts.eps))
    else:
        h = numerics.base_step(theta, dtype, opts.method)
    offsets = numerics.STENCILS[opts.method][0]
    pts = _points(theta, h, offsets, dtype)
    lost = np.flatnonzero(pts[:k] == pts[k : 2 * k])
    if lost.size:
        raise ValueError(
            MSG_STEP_LOST.format(
                entry=_entry_name(problem, group, int(idx[lost[0]])),
                theta=theta[lost[0]],
                h=h[lost[0]],
                dtype=dtype,
                count=lost.size,
            )
        )
    probe_idx: Any = ()
    probe_vals: Any = ()
    carries_probe = isinstance(noise, _NoiseBox) and noise.group == group
    if isinstance(noise, _NoiseBox) and carries_probe:
        probe_idx, probe_vals = _probe_entries(problem, group, noise.seed)
    n_main = len(offsets) * k
    all_vals = engine.costs(
        group,
        np.concatenate([np.tile(idx, len(offsets)), np.asarray(probe_idx, np.int64)]),
        np.concatenate([pts, np.asarray(probe_vals, dtype)]),
        progress,
    )
    if isinstance(noise, _NoiseBox):
        noise = noise.deliver(all_vals[n_main:]) if carries_probe else noise.get()
    vals = all_vals[:n_main].reshape(len(offsets), k)
    J = dict(zip(offsets, vals))
    P = dict(zip(offsets, pts.astype(np.float64).reshape(len(offsets), k)))
    # Central difference at h over the step actually taken (exact for the default steps).
    d_h = (J[1] - J[-1]) / (P[1] - P[-1])
    h = (P[1] - P[-1]) / 2  # the step taken (a user's eps may not be representable at θ)
    if opts.method == "central":
        numerical = d_h
    else:
        w = numerics.STENCILS[opts.method][1]
        numerical = sum(wi * J[o] for o, wi in zip(offsets, w)) / h
    roundoff = noise * numerics.roundoff_factor(opts.method) / h
    floor = numerics.GRAD_ULPS * g_eps * (np.abs(g) + g_scale) + opts.atol + opts.rtol * np.abs(numerical)
    tol = opts.safety * roundoff + floor
    err = np.abs(g - numerical)
    status = np.where(err <= tol, "ok", "fail").astype(object)
    status[~np.isfinite(numerical)] = "nan"
    status[np.isfinite(numerical) & ~np.isfinite(g)] = "fail"
    left = np.full(k, np.nan)
    right = np.full(k, np.nan)

    sus = np.flatnonzero(status == "fail")
    if sus.size and opts.refine:
        # Second look at suspects: steps 2h (if not already taken) give a truncation-error
        # estimate |D(h) - D(2h)| / 3, a Richardson-improved estimate, and kink detection.
        if sus.size > opts.max_refine:
            sus = sus[np.argsort(-(err[sus] / tol[sus]))[: opts.max_refine]]
        if 2 not in J:
            pts2 = _points(theta[sus], h[sus], (2, -2), dtype)
            j2p, j2m = engine.costs(group, np.tile(idx[sus], 2), pts2, progress).reshape(2, sus.size)
        else:
            j2p, j2m = J[2][sus], J[-2][sus]
        hs = h[sus]
        d_2h = (j2p - j2m) / (4 * hs)
        trunc = np.abs(d_h[sus] - d_2h) / 3
        if opts.method == "central":
            best = (4 * d_h[sus] - d_2h) / 3
            round2 = noise * numerics.roundoff_factor("central4") / hs
        elif opts.method == "richardson":
            d4 = (8 * (J[1][sus] - J[-1][sus]) - (j2p - j2m)) / (12 * hs)
            best, trunc = numerical[sus], np.abs(numerical[sus] - d4)
            round2 = roundoff[sus]
        else:
            best, round2 = numerical[sus], roundoff[sus]
        tol2 = opts.safety * (round2 + trunc) + floor[sus]
        numerical[sus], tol[sus] = best, tol2
        ok2 = np.abs(g[sus] - best) <= tol2
        status[sus[ok2 & np.isfinite(g[sus])]] = "ok"
        # Kinks: one-sided slopes that disagree by a jump that does not shrink with h.
        j0 = problem.j0
        r1, l1 = (J[1][sus] - j0) / hs, (j0 - J[-1][sus]) / hs
        r2, l2 = (j2p - j0) / (2 * hs), (j0 - j2m) / (2 * hs)
        kink = numerics.is_kink(r1 - l1, r2 - l2, opts.safety * 4 * noise / hs)
        lo = np.minimum.reduce([l1, r1, l2, r2]) - tol2
        hi = np.maximum.reduce([l1, r1, l2, r2]) + tol2
        gs = g[sus]
        accepted = kink & ~ok2 & (gs >= lo) & (gs <= hi)
        status[sus[accepted]] = "kink"
        left[sus[kink]], right[sus[kink]] = l1[kink], r1[kink]
    still = np.flatnonzero(status == "fail")
    if still.size and opts.refine and opts.method != "central" and opts.eps is None:
        # Higher-order stencils reach out to 2h or 4h with larger h and can straddle a kink
        # (ReLU) that central differences at ∛eps steer clear of: give failures a central look.
        c = _check_entries(
            engine,
            problem,
            group,
            idx[still],
            g[still],
            g_eps[still],
            g_scale[still],
            noise,
            dataclasses.replace(opts, method="central"),
            progress,
        )
        rescued = c.status != "fail"
        for arr, val in ((numerical, c.numerical), (tol, c.tol), (status, c.status), (left, c.left), (right, c.right)):
            arr[still[rescued]] = val[rescued]
    return _Coords(idx, numerical, tol, status, left, right)


# Leaves up to this many entries may share a compiled program (biases, small last layers): one
# compilation instead of one per leaf. Which ones share is the engine's plan (``plan_groups``).
SMALL_LEAF = 4096


def _groups(problem: _Problem, leaves: Sequence[int]) -> list[tuple[int, ...]]:
    """Big leaves alone (their followers stay unbatched: large GEMMs); small ones by the engine's plan."""
    from jgradcheck._src.engine import plan_groups

    return plan_groups(problem.trace, jax.tree_util.tree_leaves(problem.inputs), list(leaves), SMALL_LEAF)


def check_leaves(
    engine: Engine,
    problem: _Problem,
    selection: dict[int, np.ndarray],
    grads: list[np.ndarray],
    g_eps: list[float],
    noise: float | _NoiseBox,
    opts: _Options,
    progress: Progress,
) -> dict[int, _Coords]:
    """Entry-by-entry check of ``selection`` (leaf -> entry indices), grouped for compilation.

    Groups run in threads: each one's first call compiles its program, and XLA compiles (and
    the device computes) while other threads trace, so a cold check overlaps its compilations.
    """
    out: dict[int, _Coords] = {}
    groups = [tuple(i for i in full if i in selection) for full in problem.groups]
    groups = [grp for grp in groups if grp]
    if isinstance(noise, _NoiseBox):
        if noise.group not in groups:  # the probe's group is not checked here: probe on its own
            probe = _probe_entries(problem, noise.group, noise.seed)
            noise = noise.deliver(engine.costs(noise.group, *probe, progress))
        else:  # the group carrying the probe goes first: the others wait for it to judge
            groups.sort(key=lambda grp: grp != noise.group)

    def run(group: tuple[int, ...]) -> None:
        sizes = [int(problem.floats[i].size) for i in group]
        offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        idx = np.concatenate([selection[i] + o for i, o in zip(group, offs)]).astype(np.int64)
        g = np.concatenate([grads[i][selection[i]] for i in group])
        eps = np.concatenate([np.full(selection[i].size, g_eps[i]) for i in group])
        scale = np.concatenate([np.full(selection[i].size, _scale(grads[i])) for i in group])
        c = _check_entries(engine, problem, group, idx, g, eps, scale, noise, opts, progress)
        start = 0
        for i, o in zip(group, offs):
            sl = slice(start, start + selection[i].size)
            out[i] = _Coords(c.idx[sl] - o, c.numerical[sl], c.tol[sl], c.status[sl], c.left[sl], c.right[sl])
            start += selection[i].size

    if len(groups) > 1:
        # JAX's x64 and matmul-precision contexts are thread-local: re-enter them per thread.
        x64_now = bool(jax.config.read("jax_enable_x64"))

        def run_scoped(group: tuple[int, ...]) -> None:
            with jax.enable_x64(x64_now), jax.default_matmul_precision("highest"):
                run(group)

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1)) as pool:
            futures = [pool.submit(run_scoped, grp) for grp in groups]
            errors = [f.exception() for f in futures]
        # The probe's own error (e.g. a NaN cost) rather than the waiting groups' _ProbeFailed.
        for error in sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, _ProbeFailed)):
            raise error
    else:
        for grp in groups:
            run(grp)
    return out


def _scale(g: np.ndarray) -> float:
    return float(np.max(np.abs(g))) if g.size and np.all(np.isfinite(g)) else 0.0


@dataclasses.dataclass(frozen=True)
class _Options:
    eps: float | None
    method: str
    safety: float
    rtol: float
    atol: float
    refine: bool
    max_refine: int


def _entries(path: str, shape, c: _Coords, g: np.ndarray, which: Sequence[int] | np.ndarray) -> list[Entry]:
    out = []
    for j in which:
        index = tuple(int(i) for i in np.unravel_index(int(c.idx[j]), shape)) if shape else ()
        out.append(
            Entry(
                path,
                index,
                float(g[j]),
                float(c.numerical[j]),
                float(c.tol[j]),
                str(c.status[j]),
                float(c.left[j]),
                float(c.right[j]),
            )
        )
    return out


def _leaf_devs(engine: Engine) -> tuple[str, ...]:
    return tuple(f"{d.platform}:{d.id}" for d in engine.devices)


def _run_mode(mode, engine, problem, grads, g_eps, noise, opts, sample_size, n_dirs, seed, progress, n):
    """Per-leaf results for ``mode`` in ("full", "sample", "screen")."""
    sizes = [int(f.size) for f in problem.floats]
    per_entry = len(numerics.STENCILS[opts.method][0])
    if mode == "full":
        total = per_entry * n
    elif mode == "sample":
        total = per_entry * sum(min(s, sample_size) for s in sizes)
    else:
        total = 4 * n_dirs * len(sizes)
    bar = Progress(total, _show(progress, total // 2))
    results: dict[int, screen.LeafResult] = {}
    if mode in ("full", "sample"):
        sel = {}
        for i, size in enumerate(sizes):
            if mode == "full" or size <= sample_size:
                sel[i] = np.arange(size)
            else:
                sel[i] = np.sort(screen.leaf_rng(problem.paths[i], seed).choice(size, sample_size, replace=False))
        coords = check_leaves(engine, problem, sel, grads, g_eps, noise, opts, bar)
        for i, size in enumerate(sizes):
            results[i] = screen.LeafResult(coords[i], "entries" if sel[i].size == size else "sampled")
    else:
        to_locate: dict[int, np.ndarray] = {}
        notes: dict[int, tuple[str, int]] = {}
        for i, size in enumerate(sizes):
            g = grads[i]
            fails, ys, ns, tols = screen.directional_test(engine, problem, i, g, g_eps[i], noise, opts, n_dirs, seed)
            bar.update(4 * n_dirs)
            rms = float(np.sqrt(np.mean(ns**2)))
            resolution = float(np.median(tols)) / rms if rms > 0 else math.inf
            if not fails:
                results[i] = screen.LeafResult(
                    None,
                    "screened",
                    n_dirs,
                    numerics.relative_difference(ns, ys),
                    resolution,
                    dir_yours=ys,
                    dir_numerical=ns,
                )
                continue
            note = f"failed {fails}/{n_dirs} random directions"
            if size <= screen.LOCATE_FULL_MAX:
                to_locate[i] = np.arange(size)
            else:
                found, tests = screen.bisect(engine, problem, i, g, g_eps[i], noise, opts, seed)
                sample = screen.leaf_rng(problem.paths[i], seed, 10**6).choice(
                    size, min(size, screen.LOCATE_SAMPLE), replace=False
                )
                to_locate[i] = np.unique(np.concatenate([found, sample]).astype(np.int64))
                note += (
                    f"; bisection ({tests} tests) narrowed it to {found.size} entries"
                    if found.size
                    else f"; bisection ({tests} tests): the error is spread over the leaf"
                )
            notes[i] = (note, fails)
        coords = check_leaves(engine, problem, to_locate, grads, g_eps, noise, opts, bar)
        for i, c in coords.items():
            note, fails = notes[i]
            n_bad = int(np.sum(c.status == "fail"))
            how = "entries" if c.idx.size == sizes[i] else "sampled"
            results[i] = screen.LeafResult(c, how, n_dirs, extra_failures=0 if n_bad else fails, note=note)
    out = [results[i] for i in range(len(sizes))]
    bar.close()
    return out


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
) -> GradCheckReport:
    """Checks your gradient of ``cost_fn`` against central finite differences, entry by entry.

    Every floating entry θᵢ of ``params`` is perturbed by ±hᵢ and J re-evaluated (batched with
    ``jax.vmap`` under ``jax.jit``, in chunks, one group of leaves at a time, computing only what
    each perturbation changes: see ``strategy``); (J(θ+hᵢeᵢ) − J(θ−hᵢeᵢ)) / 2hᵢ
    is compared with your gradient against an estimate of its own error (round-off measured
    from the noise in J, truncation from a second step), so a verdict is not a false alarm in
    float32, near a minimum or at large scales. Kinks (ReLU at 0, max ties) are detected from
    one-sided slopes and accepted when yours lies between them. The report also gives the
    seeds' relative difference and graded scale, the per-leaf table, the worst entries, and
    plain words for the kind of bug (a factor, a sign, a transpose, a missing L2 term, ...).

    Args:
      cost_fn: ``J(params, *args) -> scalar``: the full cost, regularization term included,
        deterministic (dropout off or with a fixed key passed in ``args``).
      grad_fn: your gradient: a function ``grad_fn(params, *args)`` returning a pytree shaped
        like ``params``, or that pytree itself. Integer/bool leaves of ``params`` are ignored
        (yours may omit them or hold anything there).
      params: any pytree of arrays (dicts, lists, NamedTuples, flax/equinox/optax trees).
        Floating leaves are checked; integer and bool leaves (step counters, PRNG keys) ride
        along untouched.
      *args: further arguments to both functions (data, labels, a PRNG key, λ).
      eps: absolute step for every entry (the seeds use 1e-7). Default: per entry
        ∛ε·max(1, |θᵢ|) rounded to a power of two, ε the machine epsilon of the check's dtype.
      x64: run the check in float64 (params, floating args and your ``grad_fn``) inside a
        scoped ``jax.enable_x64``; your global setting is not touched. With False, each leaf
        keeps its dtype and the report says how small an error it can still see.
      method: ``"central"`` (2 evaluations per entry), ``"central4"`` (4, 4th order) or
        ``"richardson"`` (6, 6th order, Richardson extrapolation over h, 2h, 4h).
      mode: ``"full"`` (every entry), ``"sample"`` (``sample_size`` random entries per leaf,
        small leaves whole), ``"screen"`` (``screen_directions`` random directions per leaf,
        then a search for the wrong entries in leaves that fail), or ``"auto"``: full up to
        ``full_max_size`` entries, screen above.
      full_max_size: the size above which ``mode="auto"`` screens.
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
      progress: show a progress bar with ETA on stderr; default: when stderr is a terminal
        and the check is large.
      check_determinism: evaluate J twice in separate traces and raise if it differs.
      max_refine: at most this many failing entries per leaf get the second, 2h look.
      seed: seed of the random directions and samples (each leaf's stream also depends on its
        path, so adding a leaf never changes the others').
      strategy: how single-entry perturbations are evaluated: ``"delta"`` (default) interprets
        the cost's jaxpr carrying each value as base + change, so what a perturbation does not
        change is computed once and a product with the perturbed leaf shrinks to one row;
        ``"vmap"`` re-evaluates the whole cost per perturbation (the reference; use it if a
        primitive in your cost misbehaves under the interpreter).

    Returns:
      A :class:`GradCheckReport`; ``report.passed`` is the verdict, ``str(report)`` the table.

    Raises:
      ValueError: J is not a scalar, not finite at ``params``, or not deterministic; your
        gradient's structure or a leaf's shape differs from ``params``; no floating leaves;
        a bad option.
      TypeError: ``cost_fn`` is not callable; a complex or non-array leaf.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p, x: jnp.sum((x @ p["W"]) ** 2)
      >>> dJ = lambda p, x: {"W": 2 * x.T @ (x @ p["W"])}
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> jgradcheck.check_grad(J, dJ, {"W": jnp.ones((2, 1))}, x).passed
      True

    References:
      The seed notes on gradient checking (``shared/seeds``); Nocedal & Wright §8.1; Moré &
      Wild 2011 (noise estimation).
    """
    start = time.perf_counter()
    if mode not in ("auto", "full", "screen", "sample"):
        raise ValueError(MSG_MODE.format(mode=mode))
    if method not in numerics.ORDER:
        raise ValueError(MSG_METHOD.format(method=method))
    if strategy not in ("delta", "vmap"):
        raise ValueError(MSG_STRATEGY.format(strategy=strategy))
    eps = _check_eps(eps)
    _check_options(
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
    opts = _Options(eps, method, float(safety), float(rtol), float(atol), True, int(max_refine))
    with _scope(x64):
        problem = _prepare(cost_fn, params, args, x64, check_determinism)
        grads, g_eps = _user_gradient(grad_fn, problem)
        engine = _engine(problem, devices, chunk_size, strategy)
        n = sum(int(f.size) for f in problem.floats)
        chosen = mode if mode != "auto" else ("full" if n <= full_max_size else "screen")
        noise: float | _NoiseBox
        if chosen == "screen":
            noise = _probe_line(engine, problem, seed, check_determinism)
        else:  # the probe rides in the first call of the smallest group's program
            noise = _NoiseBox(problem, seed, check_determinism)
        mode_note = (
            chosen
            if mode != "auto"
            else f"{chosen} (auto: n = {n:,} {'<=' if chosen == 'full' else '>'} full_max_size = {full_max_size:,})"
        )
        per_leaf = _run_mode(
            chosen, engine, problem, grads, g_eps, noise, opts, sample_size, screen_directions, seed, progress, n
        )
        warnings = list(
            invisible_to_fd(
                problem.trace, promoted_pytree=x64 and not callable(grad_fn) and "promoted" in problem.precision
            )
        )
        slopes = None
        if taylor_test:
            slopes = screen.taylor_slopes(
                engine, problem, grads, noise if isinstance(noise, float) else noise.get(), seed
            )
    return _build_report(
        problem, grads, per_leaf, warnings, slopes, opts, mode_note, engine, top_k, time.perf_counter() - start
    )


def _engine(problem: _Problem, devices: Sequence[Any] | None, chunk_size: int | None, strategy: str) -> Engine:
    devs = list(devices) if devices is not None else jax.local_devices()
    return Engine(
        problem.cost_fn,
        problem.layout,
        problem.args_layout,
        *problem.inputs,
        devs,
        chunk_size,
        _eval_bytes(problem),
        strategy,
        trace=problem.trace,
    )


def _eval_bytes(problem: _Problem) -> int:
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


def _build_report(
    problem, grads, per_leaf, warnings, slopes, opts, mode_note, engine, top_k, seconds
) -> GradCheckReport:
    rows: list[LeafReport] = []
    all_entries: list[tuple] = []
    kinks: list[Entry] = []
    factors: list[float | None] = []
    ys_parts: list[np.ndarray] = []
    ns_parts: list[np.ndarray] = []
    for i, (path, f) in enumerate(zip(problem.paths, problem.floats)):
        res = per_leaf[i]
        shape = tuple(f.shape)
        g = grads[i]
        slope = None if slopes is None else slopes[i]
        if res.coords is None:  # screened and passed: directions only
            ys_parts.append(res.dir_yours)
            ns_parts.append(res.dir_numerical)
            rows.append(
                LeafReport(
                    path,
                    shape,
                    problem.orig_dtypes[i],
                    res.difference,
                    passed=True,
                    checked=res.n_dirs,
                    how="screened",
                    n_failed=0,
                    n_kinks=0,
                    worst=None,
                    resolution=res.resolution,
                    taylor_slope=slope,
                )
            )
            factors.append(None)
            continue
        c = res.coords
        gi = g[c.idx]
        finite = np.isfinite(c.numerical)
        kink = c.status == "kink"
        compared = finite & ~kink  # kinks are judged by their slopes, not by this difference
        ys_parts.append(gi[compared])
        ns_parts.append(c.numerical[compared])
        fails = np.flatnonzero(c.status == "fail")
        unverifiable = np.flatnonzero(c.status == "nan")
        kink_idx = np.flatnonzero(kink)
        # How far outside its tolerance each entry is: kinks rank last, unverifiable first.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.abs(gi - c.numerical) / np.where(c.tol > 0, c.tol, np.inf)
        ratio = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf)
        ratio[kink] = -1.0
        worst_j = int(np.argmax(ratio)) if ratio.size and ratio.max() >= 0 else None
        leaf_worst = _entries(path, shape, c, gi, [worst_j])[0] if worst_j is not None else None
        all_entries.append((ratio, path, shape, c, gi))
        kinks += _entries(path, shape, c, gi, kink_idx)
        passed = fails.size == 0 and unverifiable.size == 0 and res.extra_failures == 0
        diag = None
        fac = None
        if not passed:
            full = c.idx.size == f.size
            theta = problem.host(i).astype(np.float64)[c.idx]
            sel = compared
            diag = diagnose.describe_leaf(
                gi[sel], c.numerical[sel], theta[sel], shape if full else (), int(np.sum(c.status[sel] == "fail"))
            )
            fac = diagnose.fitted_factor(gi[sel], c.numerical[sel])
            if unverifiable.size:
                note = f"J is NaN/Inf at θ ± h for {unverifiable.size} entries: they could not be checked"
                diag = (diag + "; " if diag else "") + note
            if res.note:
                diag = (diag + "; " if diag else "") + res.note
        factors.append(fac if not passed else None)
        scale = float(np.sqrt(np.mean(c.numerical[finite] ** 2))) if finite.any() else 0.0
        resolution = float(np.median(c.tol)) / scale if scale > 0 else math.inf
        rows.append(
            LeafReport(
                path,
                shape,
                problem.orig_dtypes[i],
                numerics.relative_difference(c.numerical[compared], gi[compared]),
                passed,
                int(c.idx.size),
                res.how,
                int(fails.size) + int(unverifiable.size) + res.extra_failures,
                int(kink_idx.size),
                leaf_worst,
                resolution,
                diag,
                slope,
            )
        )
    for row in rows:
        if row.passed and row.resolution > 1e-2:
            warnings.append(
                f"{row.path}: finite differences in {problem.precision} can only see errors above "
                f"{row.resolution:.0%} of its gradient here (entries near zero or noisy J); "
                + ("run with x64=True" if "off" in problem.precision else "the pass means no large error")
                + "."
            )
    # The seeds' difference over everything compared: entries, and screened leaves' directions.
    ys = np.concatenate(ys_parts) if ys_parts else np.zeros(0)
    ns = np.concatenate(ns_parts) if ns_parts else np.zeros(0)
    difference = numerics.relative_difference(ns, ys)
    if not np.all(np.isfinite(ys)):
        difference = math.nan
    # k worst entries over all of θ, ranked by how far outside their tolerance they are.
    cand = []
    for ratio, path, shape, c, gi in all_entries:
        top = [j for j in np.argsort(-ratio)[:top_k] if ratio[j] >= 0]
        cand += [(float(ratio[j]), e) for j, e in zip(top, _entries(path, shape, c, gi, top))]
    cand.sort(key=lambda t: -t[0])
    worst = tuple(e for _, e in cand[:top_k])
    passed = all(r.passed for r in rows)
    failing = [f for f, r in zip(factors, rows) if not r.passed]
    cross = diagnose.common_factor(failing, problem.batch_sizes) if len(failing) == len(rows) else None
    return GradCheckReport(
        passed,
        difference,
        Grade.of(difference),
        tuple(rows),
        worst,
        tuple(kinks),
        cross,
        tuple(warnings),
        problem.precision,
        opts.method if opts.eps is None else f"{opts.method} (eps = {opts.eps:g})",
        mode_note,
        engine.evaluations,
        _leaf_devs(engine),
        seconds,
    )


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
) -> PyTree:
    """The finite-difference gradient of ``cost_fn`` at ``params``, shaped like ``params``.

    Each floating entry gets (J(θ+hᵢeᵢ) − J(θ−hᵢeᵢ)) / 2hᵢ (or a higher-order stencil),
    evaluated in parallel with ``jax.vmap`` in chunks.

    Args:
      cost_fn: ``J(params, *args) -> scalar``.
      params: any pytree; floating leaves are differentiated.
      *args: further arguments to ``cost_fn``.
      eps: absolute step (the seeds' 1e-7); default ∛ε·max(1, |θᵢ|) per entry.
      x64: compute in float64 under a scoped ``jax.enable_x64`` (the global flag is untouched).
      method: ``"central"``, ``"central4"`` or ``"richardson"``.
      chunk_size: perturbations per vmap step (default from device memory).
      devices: devices to spread the work over.
      progress: show a progress bar on stderr.
      strategy: ``"delta"`` or ``"vmap"``; see :func:`check_grad`.

    Returns:
      A pytree like ``params``: NumPy float64 arrays (float32 etc. with ``x64=False``) at
      floating leaves; integer and bool leaves become ``float0`` zeros, as in
      ``jax.grad(..., allow_int=True)``.

    Raises:
      ValueError: J not a scalar or not finite, no floating leaves, a bad option.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> g = jgradcheck.numerical_grad(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.array([1.0, -2.0])})
      >>> [round(float(v), 6) for v in g["w"]]
      [2.0, -4.0]
    """
    if method not in numerics.ORDER:
        raise ValueError(MSG_METHOD.format(method=method))
    if strategy not in ("delta", "vmap"):
        raise ValueError(MSG_STRATEGY.format(strategy=strategy))
    eps = _check_eps(eps)
    _check_options(chunk_size=chunk_size, devices=devices)
    opts = _Options(eps, method, numerics.DEFAULT_SAFETY, 0.0, 0.0, False, 0)
    with _scope(x64):
        problem = _prepare(cost_fn, params, args, x64, check_determinism=False)
        problem.j0 = float("nan")  # refinement (which needs J(θ)) is off here
        engine = _engine(problem, devices, chunk_size, strategy)
        n = sum(int(f.size) for f in problem.floats)
        bar = Progress(n * len(numerics.STENCILS[method][0]), _show(progress, n))
        sel = {i: np.arange(int(f.size)) for i, f in enumerate(problem.floats)}
        zeros = [np.zeros(int(f.size)) for f in problem.floats]
        coords = check_leaves(engine, problem, sel, zeros, [0.0] * len(zeros), 0.0, opts, bar)
        out = [
            coords[i].numerical.reshape(f.shape).astype(np.float64 if x64 else np.asarray(f).dtype)
            for i, f in enumerate(problem.floats)
        ]
        bar.close()
    it = iter(out)
    leaves = [
        next(it) if k == "float" else np.zeros(np.shape(leaf), jax.dtypes.float0)
        for leaf, k in zip(jax.tree_util.tree_leaves(params), problem.layout.kinds)
    ]
    return jax.tree_util.tree_unflatten(problem.layout.treedef, leaves)


def _check_options(**options: Any) -> None:
    """Counts must be positive integers, factors positive, tolerances non-negative."""
    for name in ("sample_size", "screen_directions", "top_k", "max_refine", "full_max_size", "chunk_size"):
        if name in options and options[name] is not None:
            v = options[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
                raise ValueError(MSG_COUNT.format(name=name, value=v))
    if "safety" in options and not (isinstance(options["safety"], numbers.Real) and float(options["safety"]) > 0):
        raise ValueError(MSG_POSITIVE.format(name="safety", value=options["safety"]))
    for name in ("rtol", "atol"):
        if name in options and not (isinstance(options[name], numbers.Real) and float(options[name]) >= 0):
            raise ValueError(MSG_NONNEGATIVE.format(name=name, value=options[name]))
    devices = options.get("devices")
    if devices is not None and len(list(devices)) == 0:
        raise ValueError(MSG_NO_DEVICES)


def _check_eps(eps: Any) -> float | None:
    """A user step: a positive finite real number (NumPy scalars welcome, bools not)."""
    if eps is None:
        return None
    if (
        isinstance(eps, (bool, np.bool_))
        or not isinstance(eps, numbers.Real)
        or not (math.isfinite(eps) and float(eps) > 0)
    ):
        raise ValueError(MSG_EPS.format(eps=eps))
    return float(eps)


def _show(progress: bool | None, n: int) -> bool:
    """Progress bar default: only on a terminal, only for checks large enough to wait for."""
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty() and n > 50_000
