"""The perturbation engine: J at many single-coordinate perturbations, batched with vmap.

One group of leaves at a time (``plan_groups``: a large leaf alone, small leaves together when
that adds less work than a compilation saves): only the group is batched and every other leaf
stays unbatched, so XLA turns the layers that follow into large matrix products instead of
batched small ones. By default each perturbation goes through the delta interpreter
(``delta.py``), which computes only what the perturbation changes; a group whose change is
dense through nearly all of J outside loops re-evaluates the whole cost instead, as the
``"vmap"`` strategy does everywhere (``Engine.ran`` records, per leaf, which ran; measured
against each other in ``benchmarks/``). So does a group whose delta program would run grouped
convolutions the whole cost does not (``delta.grouped_work``), or whose delta program is timed
slower than whole re-evaluation on its first chunks (``Engine._race``): a rule never makes a
check much slower than re-evaluating the whole cost (``benchmarks/results_pathology.md``). Evaluations run in chunks of ``chunk`` perturbations under
``jax.lax.map``, so memory stays bounded by one chunk (never an n x n matrix), and in blocks of
fixed shape per chunk size that compute only the chunks a call needs, so a progress bar can
tick and every call of a group (the first pass, second looks, re-checks at new values) reuses
one compiled program. Entries J never reads (``reads.py``) are not evaluated. Compiled programs
are keyed by the traced cost's text (``Program``), so the same cost written as a new closure or
lambda reuses them too. With several devices the chunk axis is sharded over a 1-D mesh.
A unit-test-sized check on one CPU (``Engine._loops``) compiles J alone instead, once for all
its groups, and calls it once per perturbation (``"loop"``): there a batched program's
compilation would cost more than all the calls. On a CPU, programs of a cost without loops
compile without XLA's fusion emitters (``LEAN_COMPILE``: less compile time, the same run
time), and a group estimated cheap starts on a quick program that moves to the optimized one
when its timed blocks say the rest would pay for the compilation (``_tier_up``).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jgradcheck._src import compat
from jgradcheck._src import delta as delta_module
from jgradcheck._src.delta import eval_delta, fallback_note, grouped_work, measure, perturbed_cost, work
from jgradcheck._src.effects import callbacks, clean
from jgradcheck._src.options import QUICK_COMPILE
from jgradcheck._src.progress import Progress
from jgradcheck._src.reads import unread_entries
from jgradcheck._src.tree import Layout

# Perturbations evaluated per jitted call (a block); bounds compile shapes and paces the bar,
# and a Ctrl-C stops the workers after the block they are in: at 2,048, a check whose cost is
# a 200x200 by 200x256 product stopped within 1 s (16,384: 12 s), warm speed unchanged.
BLOCK_EVALS = 1 << 11
# Memory for one chunk when the device does not report its own (CPU): 1 GiB.
DEFAULT_BUDGET_BYTES = 1 << 30
# Upper bound on a chunk: past a few hundred, larger batches stop speeding up CPU or GPU GEMMs.
MAX_CHUNK = 512
# On a CPU, a smaller bound for a group whose change turns dense (whole re-evaluation, or
# delta work of at least ``SPARSE_FRACTION`` of J): each perturbation then carries
# activation-sized temporaries, and a chunk of 128 keeps them in cache, so the elementwise work
# between the products, which dominates a float64 softmax, GELU or gated recurrence, stops
# being memory-bound. Timed per evaluation on the compiled programs of
# ``benchmarks/bench_models.py`` (2-core CPU, 2026-12-02, one process, 4-5 runs each, medians):
# transformer attention weight (delta) 376 -> 228 us at 512 -> 128, its whole-cost group
# 392 -> 231 us; scan GRU 449 -> 285 us (32: 437, 8: 621); 41k MLP's bias group 138 -> 113 us.
# A sparse change (a CNN's second kernel or dense layer) has small temporaries and ran slower
# in chunks of 128 than of 221 (CNN warm check 2.5 -> 3.6 s): it keeps ``MAX_CHUNK``.
CPU_MAX_CHUNK = 128


class Program:
    """The cost as a traced program over its flat inputs, hashable by its printed text.

    Compiled programs are keyed by this, not by the cost function: re-checking the same cost
    written as a new closure or lambda traces to the same text and reuses the compiled code.
    The jaxpr's constants (arrays the cost closes over) are dynamic arguments, so a closure
    over new values of the same shapes reuses it too. Host callbacks are part of the key by
    identity: the text shows their addresses masked.
    """

    def __init__(self, closed: Any):
        self.key = (compat.jaxpr_text(closed.jaxpr), callbacks(closed.jaxpr))
        self._hash = hash(self.key)
        ready = clean(closed)
        self.jaxpr, self.consts = ready.jaxpr, list(ready.consts)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and other.key == self.key

    def __call__(self, consts, flat):
        ((out, _),) = eval_delta(self.jaxpr, consts, flat, [None] * len(flat))
        return out


def _group_vector(flat, group: tuple[int, ...]) -> jax.Array:
    """The group's leaves raveled and concatenated."""
    return jnp.concatenate([flat[g].reshape(-1) for g in group]) if len(group) > 1 else flat[group[0]].reshape(-1)


def _with_group(flat, group: tuple[int, ...], vec: jax.Array) -> list[Any]:
    """``flat`` with the group's leaves replaced by the pieces of ``vec``."""
    shapes = [flat[g].shape for g in group]
    parts = jnp.split(vec, np.cumsum([math.prod(s) for s in shapes])[:-1].tolist()) if len(group) > 1 else [vec]
    out = list(flat)
    for g, part, shape in zip(group, parts, shapes):
        out[g] = part.reshape(shape)
    return out


def _map_chunks(batched, program: Program, idx, vals, active):
    """``batched`` over the chunks of a block (``idx``, ``vals``: (chunks, chunk)), computing
    only the first ``active`` chunks (a run-time count; the rest give 0). One compiled program
    per chunk size then serves every call of a group, however many entries it asks for: a
    second look at 32 entries reuses the first pass's program instead of compiling anew."""
    dtype = program.jaxpr.outvars[0].aval.dtype
    if idx.shape[0] == 1:  # one chunk per block (cheap groups): no loop to compile
        return batched(idx[0], vals[0]).astype(dtype)[None]
    ks = jnp.arange(idx.shape[0], dtype=jnp.int32)

    def step(xvk):
        x, v, k = xvk
        return jax.lax.cond(
            k < active,
            lambda: batched(x, v).astype(dtype),
            lambda: jnp.zeros(x.shape, dtype),
        )

    return jax.lax.map(step, (idx, vals, ks))


def _group_block_impl(program: Program, group: tuple[int, ...], consts, flat, idx, vals, active):
    """J with entry ``idx[k]`` of the group's concatenated leaves set to ``vals[k]``, for all k
    in the first ``active`` chunks.

    ``flat`` is every input leaf (the float parameters first); only the group's leaves are
    batched, every other leaf stays unbatched.
    """
    base = _group_vector(flat, group)

    def one(i, v):
        return program(consts, _with_group(flat, group, base.at[i].set(v)))

    return _map_chunks(jax.vmap(one), program, idx, vals, active)


def _group_delta_block_impl(program: Program, group: tuple[int, ...], consts, flat, idx, vals, active):
    """As ``_group_block``, through the delta interpreter (``delta.py``): what a single-entry
    perturbation does not change is computed once, and products with the perturbed leaf
    shrink to a row of the other operand."""
    sizes = [math.prod(flat[g].shape) for g in group]
    bases = [flat[g] for g in group]

    def one(i, v):
        return perturbed_cost(program.jaxpr, consts, flat, list(group), sizes, i, v, bases)

    return _map_chunks(jax.vmap(one), program, idx, vals, active)


_STATIC = ("program", "group")
# On a CPU, a group's program compiles without XLA:CPU's fusion emitters (``LEAN_COMPILE``)
# unless the cost has a loop (``_has_loop``); elsewhere, and with loops, with XLA's defaults
# (``_fused``). Per program of ``benchmarks/bench_models.py`` (2-core CPU, 2026-12-02, process
# CPU time of the compilation, fastest of 9 runs; ``benchmarks/results_compile.md``): 13-49%
# less compile time on the 15 programs of a transformer block, a CNN and an MLP, run time
# within +-8% (12 -> 13 us the most; the CNN's second kernel 1.36x, at 25 us per evaluation);
# the scan GRU's program compiled 27% faster but ran 1.7x slower.
LEAN = True
LEAN_COMPILE = {"xla_cpu_use_fusion_emitters": False}
_group_block = jax.jit(_group_block_impl, static_argnames=_STATIC, compiler_options=LEAN_COMPILE)
_group_delta_block = jax.jit(_group_delta_block_impl, static_argnames=_STATIC, compiler_options=LEAN_COMPILE)
_group_block_fused = jax.jit(_group_block_impl, static_argnames=_STATIC)
_group_delta_block_fused = jax.jit(_group_delta_block_impl, static_argnames=_STATIC)
# Groups whose evaluations are estimated under ``QUICK_SECONDS`` in all (multiply-adds at
# ``WORK_RATE``) compile with ``QUICK_COMPILE`` (on a CPU, also without the fusion emitters:
# 0.11-0.37 s against 0.30-1.03 s for the quick programs above, 1.0-1.6x their run time):
# there the compilation is most of their cost.
QUICK_SECONDS = 0.1
# Whether the quick programs drop the fusion emitters too (a cost without loops, on a CPU). In
# one process, 3 alternating runs each (2026-12-02, load 2.6-3.5, ``results_compile.md``):
# 41k MLP cold CPU 3.19 -> 2.90 s, warm 1.13 -> 1.06 s; CNN cold 5.15 -> 4.37 s, warm 1.30 -> 1.11 s.
QUICK_LEAN = True
_QUICK_CPU = {**QUICK_COMPILE, **LEAN_COMPILE}
_group_block_quick = jax.jit(_group_block_impl, static_argnames=_STATIC, compiler_options=_QUICK_CPU)
_group_delta_block_quick = jax.jit(_group_delta_block_impl, static_argnames=_STATIC, compiler_options=_QUICK_CPU)
_group_block_quick_fused = jax.jit(_group_block_impl, static_argnames=_STATIC, compiler_options=QUICK_COMPILE)
_group_delta_block_quick_fused = jax.jit(
    _group_delta_block_impl, static_argnames=_STATIC, compiler_options=QUICK_COMPILE
)
# A call that started on a ``QUICK_COMPILE`` program moves to the optimized one (``_tier_up``)
# when its quick evaluations left, timed on its second block (plus the quick program's run time
# in earlier calls of the process), would take longer than
# compiling the optimized program is estimated to cost, once ``TIER_SAVES`` of them is saved:
# the optimized program is estimated to compile ``TIER_COMPILE_RATIO`` times as long as the
# quick one did (its first block, less that block's evaluations at the timed speed) and to
# run ``1 - TIER_SAVES`` of the quick one's time. Measured on the engine's programs of
# ``benchmarks/bench_models.py`` (2-core CPU, 2026-12-02, ``benchmarks/results_compile.md``):
# optimized / quick compile time 1.3-2.6 over ten programs; run time saved 14-45% on a
# transformer's attention and whole-cost programs, 66% on a scan GRU's, 79-82% on a CNN's
# second kernel and dense layer (quick: 125 and 29 us per evaluation, optimized 22 and 6).
TIER_UP = True
TIER_COMPILE_RATIO = 2.0
TIER_SAVES = 0.5
# (program, group, strategy, devices) whose calls moved to the optimized program: later calls
# (second looks, warm checks) start there.
_TIERED_UP: dict[Any, bool] = {}
# Seconds of the first block of a quick program, compilation included, by (that key, chunk):
# measured on its first call; later calls compile nothing and weigh this one.
_QUICK_FIRST: dict[Any, float] = {}
# Seconds the quick program of each key ran, over the calls timed in this process (``_tier_up``).
_QUICK_SPENT: dict[Any, float] = {}


_has_loop = compat.has_loop


def _tier_up(per_eval: float, first_block: float, block_evals: int, left: int, spent: float = 0.0) -> bool:
    """Whether a call on a quick program, timed at ``per_eval`` seconds per evaluation on its
    second block (its first, of ``block_evals`` evaluations, took ``first_block`` seconds with
    the compilation), should compile the optimized program for its ``left`` evaluations.

    ``spent``: seconds the quick program already ran in earlier calls of this process: a group
    checked again (a warm check, a test suite's next case) is likely to be checked again, so
    its past calls count as calls to come (as a JIT compiler's invocation counters do)."""
    compile_quick = max(first_block - per_eval * block_evals, 0.0)
    return TIER_SAVES * (left * per_eval + spent) > TIER_COMPILE_RATIO * compile_quick


@functools.partial(jax.jit, static_argnames=("program", "group"))
def _group_line_block(program: Program, group: tuple[int, ...], consts, flat, dirs, ts, which):
    """J(θ + t_k d_{which_k}) with directions ``dirs`` (num_dirs, group size) over the group's
    concatenated leaves: the noise probe, screening, bisection and the Taylor test.

    Only the group's leaves are batched, as in ``_group_block``.
    """
    base = _group_vector(flat, group)

    def one(t, k):
        return program(consts, _with_group(flat, group, (base + t * dirs[k]).astype(base.dtype)))

    return jax.lax.map(lambda tk: jax.vmap(one)(*tk), (ts, which))


def _one_cost_impl(program: Program, consts, flat):
    """J itself, compiled once per cost and called once per perturbation (``"loop"``)."""
    return program(consts, flat)


# At the quick level without the fusion emitters (``QUICK_LEAN``; the loop strategy runs on a CPU
# only, for checks whose calls take under ``LOOP_SECONDS`` in all): a small MLP's J compiled in
# 20 ms instead of 47 ms, a small attention layer's in 24 instead of 59 (2-core CPU, 2026-12-02,
# process CPU time, medians of 5, ``benchmarks/results_compile.md``).
_one_cost = jax.jit(_one_cost_impl, static_argnames=("program",), compiler_options=_QUICK_CPU)
_one_cost_fused = jax.jit(_one_cost_impl, static_argnames=("program",), compiler_options=QUICK_COMPILE)


# The plain loop (``Engine.strategy_for``): seconds per call of the compiled J from Python, on
# top of J's own work, and the most its calls may take in all for a group. Timed once each on a
# 2-core CPU, 2026-11-23, on ``benchmarks/bench_models.py``'s 161-parameter MLP (a scratch
# script, not a results file): the vmap program of such a J compiles in 0.14-0.19 s at level 0
# against 0.06-0.09 s for J alone, and 322 calls take 0.03 s.
LOOP_CALL_SECONDS = 1e-4
LOOP_SECONDS = 0.06


# A leaf "stays sparse" when its perturbed evaluations do less than this fraction of J's work
# where the change is dense.
SPARSE_FRACTION = 1 / 64
# Orders of magnitude for the grouping cost model: work units (multiply-adds) per second of
# batched small operations on one CPU core, and seconds to compile one perturbation program.
WORK_RATE = 1e9
# Where a group's change is dense through this fraction of J's work (outside loops, where the
# scan rule keeps weights shared), the delta interpreter only adds bookkeeping (f(x + Δ) − f(x)
# per equation): the whole cost is re-evaluated instead. Measured on a transformer block:
# embedding, positions and the first layer norm ran 1.4-1.7x faster re-evaluated.
DENSE_REEVAL = 0.9
# Tests set this to send every group through the delta interpreter.
INTERPRET_ALWAYS = False
# Tests clear this to evaluate entries J never reads too (``reads.py``).
SKIP_UNREAD = True
COMPILE_SECONDS = 0.5
# The measured guard (``Engine._race``): a delta group whose remaining evaluations would take
# more than ``GUARD_SECONDS`` at its measured speed, and whose evaluations run no faster than
# the work model's whole cost (``PROBE_RATIO`` x its multiply-adds at ``WORK_RATE``), is timed
# against whole re-evaluation; whole re-evaluation takes over when it is ``SWITCH_MARGIN``
# times faster (a check may take at most 1.5x its whole-cost time). Timing every group would
# cost a compilation each: on a transformer block (2-core CPU, 2026-12-02) the attention
# weights' delta programs ran within 1.0-1.3x of whole re-evaluation at 0.6-0.7x the model's
# whole cost, and racing them added 5-7 s to a cold check; the conv_transpose kernel before
# its rule was fixed ran 36x the model's whole cost.
GUARD_SECONDS = 1.0
PROBE_RATIO = 1.0
SWITCH_MARGIN = 1.5
# Tests clear this to run the strategy the cost model chose without timing it.
MEASURE_STRATEGIES = True
# The clock the guard reads (tests replace it to decide a race without timing anything).
_clock = time.perf_counter


def plan_groups(trace: Any, flat: Sequence[Any], leaves: Sequence[int], small: int) -> list[tuple[int, ...]]:
    """Which float leaves share a compiled program.

    Large leaves (more than ``small`` entries) get their own. In a shared program every leaf
    carries a change in every evaluation, so one leaf whose change turns dense (a first
    convolution kernel, an embedding, a layer norm before attention) makes every entry of the
    group pay for that dense re-evaluation, and two changes meeting in one equation can undo
    the rules that keep each one small. So the delta interpreter is traced (not compiled) to
    measure the dense work W (multiply-adds) of one evaluation of a candidate group:

    * each small leaf alone first, which also gives its pattern: "sparse" (W under
      ``SPARSE_FRACTION`` of J's work) or the equation where its change first turns dense
      (shared by the gates of a scan, a weight and its bias);
    * leaves then join a group, cheapest first, trying the group of their own pattern and
      the sparse group, when the work joining adds, 2·(S_ab·W_ab − S_a·W_a − S_b·W_b) for S
      entries, costs less time than compiling one more program (``WORK_RATE``,
      ``COMPILE_SECONDS``); otherwise they start a group;
    * leaves, large or small, whose change is dense through ``DENSE_REEVAL`` of J's work outside
      loops are re-evaluated whole anyway: they share one program (an embedding, positions and
      every layer-norm scale of a transformer block: one compilation instead of six).
    """
    key = (str(trace.jaxpr), callbacks(trace.jaxpr), tuple(leaves), small)
    if key not in _PLANS:
        if len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = _plan_groups(trace, list(flat), leaves, small)
    return _PLANS[key]


# Plans by program text: re-checking the same cost (new values, a new closure) plans once.
_PLANS: dict[Any, list[tuple[int, ...]]] = {}


def _plan_groups(trace: Any, flat: list[Any], leaves: Sequence[int], small: int) -> list[tuple[int, ...]]:
    total = sum(work(e) for e in trace.jaxpr.eqns) or 1.0
    sizes = {i: math.prod(jnp.shape(flat[i])) for i in leaves}
    few = [i for i in leaves if sizes[i] <= small]
    if 2 * sum(sizes[i] for i in few) * total / WORK_RATE < COMPILE_SECONDS:
        # Even re-evaluating everything densely costs less than one more compilation.
        big = [(i,) for i in leaves if sizes[i] > small]
        by_dtype: dict[str, list[int]] = {}
        for i in few:
            by_dtype.setdefault(str(jnp.result_type(flat[i])), []).append(i)
        return big + [tuple(v) for v in by_dtype.values()]

    def measure(g: Sequence[int]) -> float:
        return _dense_work(trace, flat, g)[0]

    out: list[tuple[str, Any, list[int], float]] = []  # big leaves: (dtype, -, [leaf], W)
    alone: list[tuple[float, Any, int]] = []
    whole: dict[str, list[int]] = {}  # by dtype: leaves re-evaluated whole anyway
    for i in leaves:
        w, loops, log, _ = _dense_work(trace, flat, [i])
        if w >= DENSE_REEVAL * total and not loops:
            # Dense through nearly all of J: the whole cost is re-evaluated for this leaf
            # (``Engine.strategy_for``), so all such leaves share that one program.
            whole.setdefault(str(jnp.result_type(flat[i])), []).append(i)
        elif math.prod(jnp.shape(flat[i])) > small:
            out.append((str(jnp.result_type(flat[i])), None, [i], w))
        else:
            alone.append((w, None if w < SPARSE_FRACTION * total or not log else id(log[0][0]), i))

    def size(g: Sequence[int]) -> int:
        return sum(math.prod(jnp.shape(flat[i])) for i in g)

    bins: list[tuple[str, Any, list[int], float]] = []  # (dtype, pattern, leaves, W)
    for w_b, key, i in sorted(alone, key=lambda c: c[0]):
        dtype = str(jnp.result_type(flat[i]))
        # Try the bin of the same pattern, then the sparse one: two traces per leaf at most.
        tries = [k for k, b in enumerate(bins) if b[0] == dtype and b[1] == key]
        tries += [k for k, b in enumerate(bins) if b[0] == dtype and b[1] is None and k not in tries]
        for k in tries[:2]:
            _, key_a, g, w_a = bins[k]
            both = [*g, i]
            w_ab = measure(both)
            added = 2 * (size(both) * w_ab - size(g) * w_a - size([i]) * w_b) / WORK_RATE
            if added < COMPILE_SECONDS:
                bins[k] = (dtype, key_a, both, w_ab)
                break
        else:
            bins.append((dtype, key, [i], w_b))
    # A group joins the whole-cost program when re-evaluating its entries whole adds less work
    # than compiling its own program would cost.
    plan: list[tuple[tuple[int, ...], float]] = []  # (group, its dense work per evaluation)
    for dtype, _, g, w in out + bins:
        if dtype in whole and 2 * size(g) * (total - w) / WORK_RATE < COMPILE_SECONDS:
            whole[dtype].extend(g)
        else:
            plan.append((tuple(sorted(g)), w))
    plan += [(tuple(sorted(g)), total) for g in whole.values()]
    if LONGEST_FIRST:
        # The groups run in threads in this order: the longest first, so that the last to start
        # are short (longest-processing-time scheduling). Bins were formed cheapest first, so a
        # transformer's attention groups and its whole-cost group started last, alone at the end.
        plan.sort(key=lambda gw: -(COMPILE_SECONDS + 2 * size(gw[0]) * gw[1] / WORK_RATE))
    return [g for g, _ in plan]


# Tests and benchmarks clear this to keep the plan in the order it was formed.
LONGEST_FIRST = True


def _dense_work(trace: Any, flat: Sequence[Any], group: Sequence[int]) -> tuple[float, bool, Any, float]:
    """``dense_work`` of one evaluation of ``group`` (multiply-adds where the change is dense,
    and where), whether a loop is among those places, and the work of the grouped convolutions
    in the delta program (``delta.measure``); (0, False, [], 0) when the interpreter cannot
    trace a primitive (no preference: its own error comes when it runs).

    Remembered per traced cost (the object itself) and set of leaves: the plan measures every
    group it forms, and ``Engine.strategy_for`` asks again for each (a trace of the interpreter
    each: 0.3-0.5 s of a cold transformer check). The order of the leaves does not change it."""
    key = (id(trace), tuple(sorted(group)), delta_module.MEASURE_SCAN_BODIES)
    with _MEASURED_LOCK:
        got = _MEASURED.get(key)
    if got is not None and got[0] is trace:
        return got[1]
    try:
        w, log, grouped = measure(trace, flat, group)
    except Exception:  # noqa: BLE001 - see the docstring
        out: tuple[float, bool, Any, float] = (0.0, False, [], 0.0)
    else:
        out = (w, any(e.primitive.name in ("scan", "while") for e, _ in log), log, grouped)
    with _MEASURED_LOCK:
        remember(_MEASURED, key, (trace, out))  # the trace kept alive: its id stays its own
    return out


# ``_dense_work`` by (id of the trace, leaves, MEASURE_SCAN_BODIES): (the trace, the result).
_MEASURED: dict[Any, tuple[Any, tuple[float, bool, Any, float]]] = {}
_MEASURED_LOCK = threading.Lock()


# Strategy and work per evaluation by (program, group, threshold), remembered as ``_PLANS`` is.
_CHOSEN: dict[Any, tuple[str, float]] = {}
# (program, group, devices) whose delta program ``Engine._race`` timed; (program, group) whose
# delta program was dropped, ``_CHOSEN`` then saying "vmap": "timed" slower than whole
# re-evaluation (``_race``), or "grouped" (``delta.grouped_work``, ``Engine.strategy_for``).
_RACED: dict[Any, bool] = {}
_DROPPED: dict[Any, str] = {}
# Guards each engine's state and the caches below (checks may run in several of your threads),
# and other modules' caches of compiled programs (``vector.py``).
PROGRAM_LOCK = threading.Lock()
# Chunk sizes each (program, group, strategy, devices, chunk option) was compiled with.
_CHUNKS: dict[Any, set[int]] = {}
# Seconds per evaluation measured on blocks that ran after their program was compiled, by
# (program, group, strategy, devices): the chunk reuse then weighs padding at the measured
# speed, not the work model's (about 4x pessimistic on attention).
_SPEED: dict[Any, float] = {}


def remember(cache: dict[Any, Any], key: Any, value: Any, most: int = 256) -> None:
    """``cache[key] = value``, dropping the oldest entry past ``most``."""
    if key not in cache and len(cache) >= most:
        cache.pop(next(iter(cache)))
    cache[key] = value


class _Capped:
    """Forwards at most ``most`` ticks to ``progress`` (and every stop request): entries a
    timing race evaluates twice count once."""

    def __init__(self, progress: Any, most: int):
        self.progress, self.left = progress, most
        self.enabled = progress.enabled

    def update(self, n: int) -> None:
        n = min(n, self.left)
        self.left -= n
        self.progress.update(n)


def _names(paths: list[str], most: int = 6) -> str:
    return ", ".join(paths[:most]) + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _to_host(x: jax.Array) -> np.ndarray:
    """Host copy of a result; under ``jax.distributed`` results span processes and are gathered."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x, np.float64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)


def _next_pow2(k: int) -> int:
    return 1 << max(0, int(k) - 1).bit_length()


def choose_chunk(leaf_bytes: int, eval_bytes: int, budget: int, n_devices: int, most: int = MAX_CHUNK) -> int:
    """Perturbations per vmap step: as many as fit ``budget`` bytes per device, at most ``most``.

    Why: each batched evaluation holds the cost's temporaries (``eval_bytes``, an upper bound
    from the traced cost) plus, when it copies the perturbed leaves, ``leaf_bytes``; the chunk
    is what keeps the peak at budget rather than growing with n.
    """
    per_eval = max(1, leaf_bytes + eval_bytes)
    chunk = int(max(1, min(most, budget // per_eval)))
    return chunk * n_devices


def device_budget(device: Any) -> int:
    """A quarter of the device's free memory when it reports it (GPU/TPU), else 1 GiB (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return max(1 << 26, free // 4)
    return DEFAULT_BUDGET_BYTES


class Engine:
    """Evaluates a cost at perturbed parameters, for one prepared problem."""

    def __init__(
        self,
        cost_fn: Callable[..., Any],
        layout: Layout,
        args_layout: Layout,
        floats: list[jax.Array],
        arrays: list[Any],
        arg_floats: list[jax.Array],
        arg_arrays: list[Any],
        devices: Sequence[Any],
        chunk_size: int | None,
        eval_bytes: int,
        strategy: str = "delta",
        trace: Any = None,
    ):
        self.cost_fn, self.layout, self.args_layout = cost_fn, layout, args_layout
        self.devices = list(devices)
        self.chunk_size, self.eval_bytes = chunk_size, eval_bytes
        self.strategy = strategy
        self.mesh = Mesh(np.array(self.devices), ("p",)) if len(self.devices) > 1 else None
        rep = self._replicated
        self.floats = [rep(x) for x in floats]
        self.arrays = [rep(x) for x in arrays]
        self.arg_floats = [rep(x) for x in arg_floats]
        self.arg_arrays = [rep(x) for x in arg_arrays]
        inputs = (self.floats, self.arrays, self.arg_floats, self.arg_arrays)
        if trace is None:
            trace = jax.make_jaxpr(lambda fl, ar, af, aa: cost_fn(layout.merge(fl, ar), *args_layout.merge(af, aa)))(
                *inputs
            )
        self.program = Program(trace)
        self.trace = trace
        self.total_work = sum(work(e) for e in trace.jaxpr.eqns) or 1.0  # multiply-adds of one J
        self._work: dict[tuple[int, ...], float] = {}  # multiply-adds per evaluation, by group
        self._unread: dict[tuple[int, ...], np.ndarray | None] = {}
        self.ran: dict[int, str] = {}  # float leaf -> how its perturbations were evaluated
        # Groups timed by ``_race``: (seconds per evaluation of the delta program, of the whole
        # cost under vmap); leaves whose delta program was dropped, and why.
        self.timed: dict[tuple[int, ...], tuple[float, float]] = {}
        self.dropped: dict[int, str] = {}  # float leaf -> "timed" or "grouped", as ``_DROPPED``
        self.skipped: dict[int, int] = {}  # float leaf -> evaluations skipped (entries never read)
        self.consts = [rep(c) for c in self.program.consts]
        self.flat = jax.tree_util.tree_leaves(inputs)
        self.evaluations = 0
        self._loop_in: bool | None = None  # whether the cost has a loop (``_has_loop``)
        self._lock = PROGRAM_LOCK  # also guards the module-level caches, shared by every engine

    def _replicated(self, x):
        if self.mesh is None:
            return jax.device_put(x, self.devices[0])
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def _sharded(self, x):
        if self.mesh is None:
            return jax.device_put(x, self.devices[0])
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(None, "p")))

    def chunk_for(self, leaf_bytes: int, dense: bool = False) -> int:
        """Perturbations per vmap step (``choose_chunk``); at most ``CPU_MAX_CHUNK`` on a CPU
        when the change is ``dense``."""
        n_dev = len(self.devices)
        if self.chunk_size is not None:
            return int(math.ceil(self.chunk_size / n_dev) * n_dev)
        most = CPU_MAX_CHUNK if dense and self.devices[0].platform == "cpu" else MAX_CHUNK
        return choose_chunk(leaf_bytes, self.eval_bytes, device_budget(self.devices[0]), n_dev, most)

    def strategy_for(self, group: tuple[int, ...]) -> str:
        """``"loop"`` for a unit-test-sized group on one CPU (``_loops``); ``"vmap"`` for a
        group whose change is dense through ``DENSE_REEVAL`` of J's work outside loops (the
        interpreter would only add its bookkeeping), whose evaluations cost less than a
        compilation, or whose delta program has more grouped convolutions than the whole cost
        under vmap (``delta.grouped_work``: a rule is then dropped for the group); else the
        engine's (``_race`` then times the delta program against whole re-evaluation)."""
        if self.strategy != "delta" or INTERPRET_ALWAYS:
            return self.strategy
        total = self.total_work
        entries = sum(int(self.floats[g].size) for g in group)
        if self._loops(entries):
            return "loop"
        if 2 * entries * total / WORK_RATE < COMPILE_SECONDS:
            # Even dense, these evaluations cost less than compiling: the vmap program is J under
            # vmap and compiles about as fast as J (the interpreter's program takes 2-3x longer).
            return "vmap"
        with self._lock:
            key = (self.program, group, DENSE_REEVAL)
            if key not in _CHOSEN:
                w, loops, _, grouped = _dense_work(self.trace, self.flat, group)
                dense = w >= DENSE_REEVAL * total and not loops
                if not dense and grouped > grouped_work(self.trace.jaxpr, group):
                    # A rule made a grouped convolution whole re-evaluation does not have: dropped.
                    remember(_DROPPED, (self.program, group), "grouped")
                    dense = True
                remember(_CHOSEN, key, ("vmap", total) if dense else ("delta", w))
            strategy, self._work[group] = _CHOSEN[key]
            why = _DROPPED.get((self.program, group))
            if why is not None:
                self.dropped.update(dict.fromkeys(group, why))
            return strategy

    def _loops(self, entries: int) -> bool:
        """Whether a group of ``entries`` calls the compiled J once per perturbation: a
        unit-test-sized check on one CPU, where compiling a batched program would cost more
        than all its calls (``LOOP_SECONDS``). J compiles once for every such group."""
        return (
            self.mesh is None
            and self.devices[0].platform == "cpu"
            and 2 * entries * (LOOP_CALL_SECONDS + self.total_work / WORK_RATE) < LOOP_SECONDS
        )

    def _quick(self, group: tuple[int, ...], strategy: str) -> bool:
        """Whether this group's evaluations are so cheap that compiling fast matters more."""
        entries = sum(int(self.floats[g].size) for g in group)
        return self.devices[0].platform == "cpu" and 2 * entries * self._per_eval(group, strategy) < QUICK_SECONDS

    def _per_eval(self, group: tuple[int, ...], strategy: str) -> float:
        """Estimated seconds of one evaluation of ``group`` by ``strategy`` (its work at ``WORK_RATE``)."""
        work = self.total_work if strategy == "vmap" else self._work.get(group, self.total_work)
        return work / WORK_RATE

    def _chunk(self, group: tuple[int, ...], strategy: str, count: int, copy_bytes: int) -> int:
        """Perturbations per vmap step for a call of ``count``: a power of two, as many as fit
        the memory budget and no more than the call needs; or a chunk size this group's program
        was already compiled with, when evaluating its padding costs less than compiling
        (``COMPILE_SECONDS`` against the seconds per evaluation measured on this group's
        earlier blocks, else its work per evaluation at ``WORK_RATE``)."""
        n_dev = len(self.devices)
        dense = strategy != "delta" or self._work.get(group, self.total_work) >= SPARSE_FRACTION * self.total_work
        want = min(self.chunk_for(copy_bytes, dense), _next_pow2(count))
        want = int(math.ceil(want / n_dev) * n_dev)
        key = (self.program, group, strategy, n_dev, self.chunk_size)
        with self._lock:
            have = _CHUNKS.setdefault(key, set())
            if len(_CHUNKS) > 256:
                _CHUNKS.pop(next(iter(_CHUNKS)))
            per_eval = _SPEED.get((self.program, group, strategy, n_dev), self._per_eval(group, strategy))
            for c in sorted(c for c in have if c >= want):
                if (math.ceil(count / c) * c - count) * per_eval < COMPILE_SECONDS:
                    return c
            have.add(want)
            return want

    def unread(self, group: tuple[int, ...]) -> np.ndarray | None:
        """Entries of the group's concatenated leaves that J never reads (rows of an embedding
        no token selects; ``reads.py``), or None when it may read them all."""
        with self._lock:
            if group not in self._unread:
                floats = range(len(self.floats))
                masks = [
                    unread_entries(self.program, self.program.jaxpr, self.consts, self.flat, floats, g) for g in group
                ]
                self._unread[group] = (
                    None
                    if all(m is None for m in masks)
                    else np.concatenate(
                        [np.zeros(self.floats[g].size, bool) if m is None else m for g, m in zip(group, masks)]
                    )
                )
            return self._unread[group]

    def costs(self, group: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, progress: Progress) -> np.ndarray:
        """J with entry ``idx[k]`` of the group's concatenated float leaves set to ``vals[k]``.

        Returns float64 values on the host, one per k. Entries J never reads are not evaluated:
        their J is J(θ), taken from one evaluation at the first of them.
        """
        group = tuple(group)
        idx, vals = np.asarray(idx), np.asarray(vals)
        unread = self.unread(group)
        skip = unread[idx] if unread is not None and idx.size and SKIP_UNREAD else None
        if skip is None or not skip.any():
            return self._evaluate(group, idx, vals, progress)
        keep = np.concatenate([np.flatnonzero(~skip), np.flatnonzero(skip)[:1]])
        got = self._evaluate(group, idx[keep], vals[keep], progress)
        sizes = np.cumsum([int(self.floats[g].size) for g in group])
        with self._lock:
            skipped = idx[np.flatnonzero(skip)[1:]]  # the first one was evaluated: J(θ)
            for g, n in zip(group, np.bincount(np.searchsorted(sizes, skipped, side="right"), minlength=len(group))):
                self.skipped[g] = self.skipped.get(g, 0) + int(n)
        progress.update(int(idx.size - keep.size))
        out = np.full(idx.size, got[-1])
        out[keep] = got
        return out

    def _evaluate(self, group: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, progress: Progress) -> np.ndarray:
        count = int(idx.shape[0])
        if count == 0:
            return np.zeros((0,), np.float64)
        strategy = self.strategy_for(group)
        if strategy == "loop":
            return self._loop(group, idx, vals, progress)
        if strategy == "delta" and self._unmeasured(group):
            return self._race(group, idx, vals, progress)
        return self._blocks(group, strategy, idx, vals, progress)

    def _unmeasured(self, group: tuple[int, ...]) -> bool:
        """Whether the delta program of this group has not yet been timed against whole
        re-evaluation (``_race``) in this process."""
        if not MEASURE_STRATEGIES or INTERPRET_ALWAYS or self.strategy != "delta":
            return False
        with self._lock:
            return (self.program, group, len(self.devices)) not in _RACED

    def _race(self, group: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, progress: Progress) -> np.ndarray:
        """The delta program, timed on its first chunks against whole re-evaluation; the cheaper
        evaluates this call, and every later call of the group's program.

        The cost model (``dense_work`` at ``WORK_RATE``) counts multiply-adds where the change
        turns dense, not how fast XLA runs what a rule produces: a rule may be slower than the
        whole cost it replaces (a per-perturbation kernel, which vmap makes a grouped
        convolution, ran a conv_transpose check 200x slower). So the delta program's first
        chunk is run (it compiles there) and its second timed. When the rest would take more
        than ``GUARD_SECONDS`` and runs no faster than the model's whole cost (``PROBE_RATIO``),
        whole re-evaluation is timed the same way, on its own chunk size; it takes over when it
        runs ``SWITCH_MARGIN`` times faster (both programs are compiled by then) and evaluates
        every entry of the call, so one call never mixes the two strategies' round-off. A
        delta program measured slower is dropped for this program (``_DROPPED``): later calls
        and checks re-evaluate the whole cost, and the report says why.
        """
        count = int(idx.shape[0])
        key = (self.program, group, len(self.devices))
        chunk = self._chunk(group, "delta", count, 0)
        if count < 3 * chunk:  # too few chunks to time one and still gain from the answer
            return self._blocks(group, "delta", idx, vals, progress)
        first = self._blocks(group, "delta", idx[:chunk], vals[:chunk], progress)
        started = _clock()
        second = self._blocks(group, "delta", idx[chunk : 2 * chunk], vals[chunk : 2 * chunk], progress)
        per_delta = max(_clock() - started, 0.0) / chunk
        rest = count - 2 * chunk
        if rest * per_delta <= GUARD_SECONDS or not self._suspect(per_delta):
            with self._lock:
                remember(_RACED, key, True)
                remember(_SPEED, (self.program, group, "delta", len(self.devices)), per_delta)
            return np.concatenate(
                [first, second, self._blocks(group, "delta", idx[2 * chunk :], vals[2 * chunk :], progress)]
            )
        group_bytes = sum(int(self.floats[g].size) for g in group) * np.dtype(self.floats[group[0]].dtype).itemsize
        quiet = _Capped(progress, 0)  # its entries were counted by the delta chunks
        chunk_v = min(self._chunk(group, "vmap", count, group_bytes), count // 2)
        whole = [self._blocks(group, "vmap", idx[:chunk_v], vals[:chunk_v], quiet)]
        started = _clock()
        whole.append(self._blocks(group, "vmap", idx[chunk_v : 2 * chunk_v], vals[chunk_v : 2 * chunk_v], quiet))
        per_whole = max(_clock() - started, 0.0) / chunk_v
        dropped = SWITCH_MARGIN * (count - 2 * chunk_v) * per_whole < rest * per_delta
        with self._lock:
            remember(_RACED, key, True)
            remember(_SPEED, (self.program, group, "delta", len(self.devices)), per_delta)
            remember(_SPEED, (self.program, group, "vmap", len(self.devices)), per_whole)
            self.timed[group] = (per_delta, per_whole)
            if dropped:
                remember(_DROPPED, (self.program, group), "timed")
                remember(_CHOSEN, (self.program, group, DENSE_REEVAL), ("vmap", self.total_work))
                self._work[group] = self.total_work
                self.dropped.update(dict.fromkeys(group, "timed"))
        if not dropped:
            rest_d = self._blocks(group, "delta", idx[2 * chunk :], vals[2 * chunk :], _Capped(progress, rest))
            return np.concatenate([first, second, rest_d])
        whole.append(self._blocks(group, "vmap", idx[2 * chunk_v :], vals[2 * chunk_v :], _Capped(progress, rest)))
        return np.concatenate(whole)

    def _suspect(self, per_delta: float) -> bool:
        """Whether a delta program measured at ``per_delta`` seconds per evaluation may be
        slower than whole re-evaluation: no faster than the work model's whole cost
        (``PROBE_RATIO``), or ``SWITCH_MARGIN`` times slower than whole re-evaluation of this
        cost already measured on another group (the model checked against a measurement)."""
        n_dev = len(self.devices)
        with self._lock:
            measured = [v for (p, _, s, d), v in _SPEED.items() if p == self.program and s == "vmap" and d == n_dev]
        if measured and per_delta > SWITCH_MARGIN * min(measured):
            return True
        return per_delta >= PROBE_RATIO * self.total_work / WORK_RATE

    def _blocks(
        self, group: tuple[int, ...], strategy: str, idx: np.ndarray, vals: np.ndarray, progress: Any
    ) -> np.ndarray:
        """J at the perturbations ``idx``/``vals`` of ``group`` by ``strategy`` ("delta" or
        "vmap"), in blocks of the group's compiled program.

        A group estimated cheap (``_quick``) starts on its ``QUICK_COMPILE`` program; its
        second block is timed, and the rest of the call moves to the optimized program when
        the clock says that pays (``_tier_up``)."""
        count = int(idx.shape[0])
        if count == 0:
            return np.zeros((0,), np.float64)
        leaves = [self.floats[g] for g in group]
        dtype = np.dtype(leaves[0].dtype)
        group_bytes = sum(int(x.size) for x in leaves) * dtype.itemsize
        chunk = self._chunk(group, strategy, count, group_bytes if strategy == "vmap" else 0)
        # Blocks of a fixed shape per chunk size; the last computes only the chunks it needs.
        tier_key = (self.program, group, strategy, len(self.devices))
        quick = self._quick(group, strategy)
        if quick:
            with self._lock:
                quick = tier_key not in _TIERED_UP
        per_block = 1 if quick else max(1, BLOCK_EVALS // chunk)
        n_blocks = math.ceil(count / (per_block * chunk))
        padded = per_block * chunk * n_blocks
        first = np.asarray(leaves[0]).reshape(-1)[:1].astype(dtype)
        idx_p = np.concatenate([np.asarray(idx, np.int32), np.zeros(padded - count, np.int32)])
        vals_p = np.concatenate([np.asarray(vals, dtype), np.repeat(first, padded - count)])
        idx_p = idx_p.reshape(n_blocks, per_block, chunk)
        vals_p = vals_p.reshape(n_blocks, per_block, chunk)
        block = self._program_for(strategy, quick)
        outs: list[Any] = []
        begun = _clock()
        started = first_block = 0.0
        rest = None
        for b in range(n_blocks):
            left = count - b * per_block * chunk
            if b == 1:  # the program is compiled once the first block is done: time the rest
                outs[0].block_until_ready()
                started = _clock()
                first_block = self._first_block(tier_key, chunk, started - begun, quick)
            if b == 2 and quick and TIER_UP:
                outs[1].block_until_ready()
                per_eval = (_clock() - started) / (per_block * chunk)
                with self._lock:
                    spent = _QUICK_SPENT.get(tier_key, 0.0)
                if _tier_up(per_eval, first_block, per_block * chunk, left, spent):
                    with self._lock:
                        remember(_TIERED_UP, tier_key, True)
                    # The whole call again on the optimized program: the two programs may
                    # round differently, and J(θ + h) and J(θ - h) of one entry (in the two
                    # halves of a call) must come from one of them.
                    rest = self._blocks(group, strategy, idx, vals, _Capped(progress, left))
                    break
            out = block(
                self.program,
                group,
                self.consts,
                self.flat,
                self._sharded(idx_p[b]),
                self._sharded(vals_p[b]),
                np.int32(min(per_block, math.ceil(left / chunk))),
            )
            if progress.enabled:
                out.block_until_ready()
            progress.update(min(per_block * chunk, left))
            outs.append(out)
        if len(outs) == 1 and quick:
            outs[0].block_until_ready()
            self._first_block(tier_key, chunk, _clock() - begun, quick)
        timed = len(outs) > 1 and rest is None  # a tier-up recorded its own program's speed
        if timed:
            outs[-1].block_until_ready()
            speed = (_clock() - started) / (count - per_block * chunk)
        with self._lock:
            if timed:
                remember(_SPEED, (self.program, group, strategy, len(self.devices)), speed)
                if quick:  # the quick program's run time in this process, for ``_tier_up``
                    remember(_QUICK_SPENT, tier_key, _QUICK_SPENT.get(tier_key, 0.0) + speed * count)
            self.evaluations += sum(min(per_block * chunk, count - b * per_block * chunk) for b in range(len(outs)))
            for g in group:
                self.ran[g] = strategy
        if rest is not None:
            return rest
        return np.concatenate([_to_host(o).reshape(-1) for o in outs])[:count]

    def _first_block(self, tier_key: Any, chunk: int, seconds: float, quick: bool) -> float:
        """Seconds of the first block of the quick program of ``tier_key`` at ``chunk``, the
        compilation included: as measured on its first call (``seconds`` then), remembered, as
        later calls find it compiled (``_tier_up`` weighs the compilation it measured)."""
        if not quick:
            return seconds
        with self._lock:
            if (tier_key, chunk) not in _QUICK_FIRST:
                remember(_QUICK_FIRST, (tier_key, chunk), seconds)
            return _QUICK_FIRST[(tier_key, chunk)]

    def _program_for(self, strategy: str, quick: bool) -> Any:
        """The jitted block function of ``strategy`` at the tier ``quick`` (``QUICK_SECONDS``) or
        optimized; on a CPU, for a cost without loops, compiled with ``LEAN_COMPILE`` too."""
        delta = strategy == "delta"
        lean = LEAN and self.devices[0].platform == "cpu" and not self._has_loop() and compat.lean_compile_ok()
        if quick and lean and QUICK_LEAN:
            return _group_delta_block_quick if delta else _group_block_quick
        if quick:
            return _group_delta_block_quick_fused if delta else _group_block_quick_fused
        if lean:
            return _group_delta_block if delta else _group_block
        return _group_delta_block_fused if delta else _group_block_fused

    def _has_loop(self) -> bool:
        """Whether the cost runs a ``scan`` or ``while`` loop (in any nested jaxpr)."""
        if self._loop_in is None:
            self._loop_in = _has_loop(self.program.jaxpr)
        return self._loop_in

    def _loop(self, group: tuple[int, ...], idx: np.ndarray, vals: np.ndarray, progress: Progress) -> np.ndarray:
        """The ``"loop"`` strategy: J compiled alone, called once per perturbation. Every float
        leaf goes in as a host array (the moved one a copy), so every group of the check calls
        the one compiled J, and no call waits on a separate transfer."""
        n_floats = len(self.floats)
        hosts = [np.asarray(x) for x in self.floats]
        rest = self.flat[n_floats:]
        sizes = [int(self.floats[g].size) for g in group]
        ends = np.cumsum(sizes)
        out = np.empty(idx.shape[0], np.float64)
        one = _one_cost if QUICK_LEAN and compat.lean_compile_ok() else _one_cost_fused
        pending: list[Any] = []  # dispatched, read back 64 at a time: no call waits on the last one's sync
        with jax.default_device(self.devices[0]):  # host arrays go where ``devices`` says
            for k, (i, v) in enumerate(zip(idx.tolist(), vals.tolist())):
                j = int(np.searchsorted(ends, i, side="right"))
                moved = hosts[group[j]].copy()
                moved.reshape(-1)[i - (ends[j] - sizes[j])] = v
                flat = [*hosts[: group[j]], moved, *hosts[group[j] + 1 :], *rest]
                pending.append(one(self.program, self.consts, flat))
                if k % 64 == 63:
                    out[k - 63 : k + 1] = [float(x) for x in jax.device_get(pending)]
                    pending = []
                    progress.update(64)  # ticks, and lets a stopping check stop
            if pending:
                out[idx.shape[0] - len(pending) :] = [float(x) for x in jax.device_get(pending)]
        progress.update(idx.shape[0] % 64)
        with self._lock:
            self.evaluations += idx.shape[0]
            for g in group:
                self.ran[g] = "loop"
        return out

    def forget_runs(self) -> None:
        """Forgets how entries were evaluated so far (``describe``'s records): a check that gives up
        its full check for screening reports only how the screened leaves' search ran."""
        with self._lock:
            for record in (self.ran, self.skipped, self.dropped):
                record.clear()

    def describe(self, paths: Sequence[str]) -> str:
        """How the perturbed costs were evaluated, by leaf, in a line of the report."""
        words = {
            "delta": "changes only (delta)",
            "vmap": "whole cost re-evaluated",
            "timed": "whole cost re-evaluated, timed faster than changes only",
            "grouped": "whole cost re-evaluated, changes only would run grouped convolutions",
            "loop": "whole cost, one compiled call per perturbation",
        }
        ran = {i: self.dropped.get(i, how) if how == "vmap" else how for i, how in self.ran.items()}
        parts = []
        for how in ("delta", "vmap", "timed", "grouped", "loop"):
            leaves = [paths[i] for i in sorted(ran) if ran[i] == how]
            if leaves:
                parts.append(f"{words[how]}: {_names(leaves)}")
            if leaves and how == "delta":  # equations whose params this JAX lays out otherwise, or ""
                parts.append(fallback_note(self.program.jaxpr))
        skipped = {paths[i]: n for i, n in sorted(self.skipped.items()) if n}
        if skipped:
            total = sum(skipped.values())
            parts.append(f"{total:,} evaluations skipped, entries J never reads: {_names(list(skipped))}")
        return "; ".join(p for p in parts if p)

    def line_costs(self, group: tuple[int, ...], dirs: np.ndarray, ts: np.ndarray, which: np.ndarray) -> np.ndarray:
        """J(θ + t_k d_{which_k}), ``dirs`` (num_dirs, group size) over the group's raveled leaves.

        Shapes are padded (directions to a power of two, at least 4; points to multiples of
        32) so the probe, screening and Taylor tests of a group share one compiled program.
        """
        k = int(len(ts))
        n_dev = len(self.devices)
        dtype = np.dtype(self.floats[group[0]].dtype)
        dirs = np.asarray(dirs, dtype)
        n_dirs = max(4, _next_pow2(dirs.shape[0]))
        dirs = np.concatenate([dirs, np.zeros((n_dirs - dirs.shape[0], dirs.shape[1]), dtype)])
        group_bytes = dirs.shape[1] * dtype.itemsize
        chunk = min(32, self.chunk_for(group_bytes))
        chunk = int(math.ceil(chunk / n_dev) * n_dev)
        n_chunks = math.ceil(k / chunk)
        pad = n_chunks * chunk - k
        ts = np.concatenate([np.asarray(ts, np.float64), np.zeros(pad)]).astype(dtype)
        which = np.concatenate([np.asarray(which, np.int32), np.zeros(pad, np.int32)])
        out = _group_line_block(
            self.program,
            tuple(group),
            self.consts,
            self.flat,
            self._replicated(dirs),
            self._sharded(ts.reshape(n_chunks, chunk)),
            self._sharded(which.reshape(n_chunks, chunk)),
        )
        with self._lock:
            self.evaluations += k
        return _to_host(out).reshape(-1)[:k]
