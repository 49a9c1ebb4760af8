"""Where a full check's time goes, program by program: tracing, lowering, compiling, running.

For one model of ``bench_models.py`` (float64, ``check_grad(cost, jax.grad(cost), params, *args)``,
default options), cold then warm in one process, every call of the engine's evaluation methods
(``Engine._blocks``: one group's delta or whole-cost program; ``Engine._loop``;
``Engine.line_costs``: probe, screening, Taylor; ``Engine.unread``; ``Engine.strategy_for``:
the plan's traces) is labelled with its leaves and strategy, and JAX's own compile events
(``jax.monitoring``: jaxpr trace, lowering to MLIR, XLA backend compile) are attributed to the
label of the thread that raised them (groups run in threads). "run" is a label's wall time less
its compile events: the evaluations, plus dispatch and host copies. Compile events outside any
label (your gradient, the check's own small programs) are listed by function name.

With ``--ab NAME=V1,V2``, instead: an engine constant (``jgradcheck._src.engine.NAME``) set to
each value in turn, alternating, ``--repeats`` times, in one process; before each cold check
JAX's caches and the engine's are cleared, so each cold check compiles everything again; wall
and process CPU time (all threads) are printed, the latter steadier on a shared machine.

Usage:
  python benchmarks/bench_programs.py --model transformer
  python benchmarks/bench_programs.py --model gru --warm 1
  python benchmarks/bench_programs.py --model gru --ab CPU_MAX_CHUNK=512,128 --repeats 3
  python benchmarks/bench_programs.py --model cnn --ab LEAN+TIER_UP=0,1 --repeats 3
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

import jax
import numpy as np

import jgradcheck
from jgradcheck._src import engine as engine_mod

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_local = threading.local()
_lock = threading.Lock()
# label -> {"calls", "entries", "wall", "trace", "lower", "compile", "programs"}
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
PATHS: list[str] = []


def _label() -> str | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _listener(event: str, duration: float, **kw) -> None:
    kind = _EVENTS.get(event)
    if kind is None:
        return
    label = _label() or f"(outside) {kw.get('fun_name', '?')}"
    with _lock:
        STATS[label][kind] += duration
        if kind == "compile":
            STATS[label]["programs"] += 1


def _names(group) -> str:
    names = [PATHS[g] if g < len(PATHS) else str(g) for g in group]
    return ",".join(names) if len(names) <= 4 else ",".join(names[:4]) + f",+{len(names) - 4}"


def _wrap(name, label_of):
    original = getattr(engine_mod.Engine, name)

    def wrapped(self, *args, **kwargs):
        label = label_of(*args)
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        nested = bool(stack)
        stack.append(label)
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()
            if not nested:  # time a label once, at its outermost call
                with _lock:
                    STATS[label]["wall"] += time.perf_counter() - t
                    STATS[label]["calls"] += 1
                    if name in ("_blocks", "_loop"):
                        STATS[label]["entries"] += len(args[2 if name == "_blocks" else 1])

    setattr(engine_mod.Engine, name, wrapped)


def _wrap_plan() -> None:
    original = engine_mod.plan_groups

    def wrapped(*args, **kwargs):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append("plan_groups (traces)")
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stack.pop()
            with _lock:
                STATS["plan_groups (traces)"]["wall"] += time.perf_counter() - t
                STATS["plan_groups (traces)"]["calls"] += 1

    engine_mod.plan_groups = wrapped


def install() -> None:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _wrap_plan()
    _wrap("_blocks", lambda group, strategy, *a: f"{strategy} {_names(group)}")
    _wrap("_loop", lambda group, *a: f"loop {_names(group)}")
    _wrap("line_costs", lambda group, *a: f"line {_names(group)}")
    _wrap("unread", lambda group, *a: f"unread {_names(group)}")
    _wrap("strategy_for", lambda group, *a: f"plan {_names(group)}")


def report(title: str, total: float) -> str:
    rows = []
    for label, c in STATS.items():
        comp = c["trace"] + c["lower"] + c["compile"]
        run = max(c["wall"] - comp, 0.0) if c["wall"] else 0.0
        rows.append((comp + run, label, c, comp, run))
    rows.sort(reverse=True)
    out = [
        f"### {title}: {total:.2f} s wall",
        "",
        "| label | calls | entries | programs | trace (s) | lower (s) | XLA compile (s) | run (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sums = collections.Counter()
    for _, label, c, _comp, run in rows:
        out.append(
            f"| {label} | {c['calls']} | {c['entries']:,} | {c['programs']} | {c['trace']:.2f} | {c['lower']:.2f} "
            f"| {c['compile']:.2f} | {run:.2f} | {c['wall']:.2f} |"
        )
        for k in ("trace", "lower", "compile", "programs"):
            sums[k] += c[k]
    out.append(
        f"| **all** | | | {sums['programs']} | {sums['trace']:.2f} | {sums['lower']:.2f} | {sums['compile']:.2f} | | |"
    )
    return "\n".join(out)


def clear_caches() -> None:
    """JAX's compiled programs and the engine's plans, strategies, speeds and chunk sizes."""
    jax.clear_caches()
    for name in (
        "_PLANS",
        "_CHOSEN",
        "_RACED",
        "_DROPPED",
        "_CHUNKS",
        "_SPEED",
        "_MEASURED",
        "_TIERED_UP",
        "_QUICK_FIRST",
    ):
        getattr(engine_mod, name).clear()


def ab(model: str, name: str, values: list[str], repeats: int) -> None:
    """Cold and warm full checks with ``engine.<name>`` at each value, alternating, one process."""
    with jax.enable_x64(True):
        cost, params, args = getattr(bench_models, f"make_{model}")(np.random.default_rng(0))
        grad = jax.grad(cost)
        params2 = jax.tree.map(lambda x: x * 1.01 + 0.001, params)
        got = collections.defaultdict(list)
        for r in range(repeats):
            for v in values:
                for n in name.split("+"):  # NAME+NAME2=...: several constants set to each value
                    kind = type(getattr(engine_mod, n))
                    setattr(engine_mod, n, v in ("1", "true", "True") if kind is bool else kind(v))
                clear_caches()
                t, c = time.perf_counter(), time.process_time()
                rep = jgradcheck.check_grad(cost, grad, params, *args, progress=False, mode="full")
                cold, cold_cpu = time.perf_counter() - t, time.process_time() - c
                t, c = time.perf_counter(), time.process_time()
                rep2 = jgradcheck.check_grad(cost, grad, params2, *args, progress=False, mode="full")
                warm, warm_cpu = time.perf_counter() - t, time.process_time() - c
                got[v].append((cold, warm, cold_cpu, warm_cpu))
                print(
                    f"run {r + 1} {name}={v}: cold {cold:.2f} s (CPU {cold_cpu:.2f}), warm {warm:.2f} s "
                    f"(CPU {warm_cpu:.2f}), passed {rep.passed and rep2.passed}, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        print(
            f"\n| {model}: {name} | cold (s), median of {repeats} (range) | warm (s) | cold CPU (s) | warm CPU (s) |"
            "\n|---|---|---|---|---|"
        )

        def cell(xs):
            return f"{np.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

        for v, ts in got.items():
            print(f"| {v} | " + " | ".join(cell([t[k] for t in ts]) for k in range(4)) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=bench_models.MODELS, default="transformer")
    ap.add_argument("--warm", type=int, default=1, help="warm checks after the cold one")
    ap.add_argument("--quick", action="store_true", help="compile every group at QUICK_COMPILE (an experiment)")
    ap.add_argument("--ab", help="NAME=V1,V2: an engine constant's values, alternated in one process")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.ab:
        name, values = a.ab.split("=")
        print(bench_models.machine_line(), f"load {os.getloadavg()}")
        ab(a.model, name, values.split(","), a.repeats)
        return
    install()
    if a.quick:
        engine_mod.Engine._quick = lambda self, group, strategy: True
    print(bench_models.machine_line(), f"load {os.getloadavg()}")
    with jax.enable_x64(True):
        cost, params, args = getattr(bench_models, f"make_{a.model}")(np.random.default_rng(0))
        PATHS[:] = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        grad = jax.grad(cost)
        t = time.perf_counter()
        rep = jgradcheck.check_grad(cost, grad, params, *args, progress=False, mode="full")
        cold = time.perf_counter() - t
        print(report(f"{a.model} cold (passed: {rep.passed})", cold))
        print()
        for k in range(a.warm):
            STATS.clear()
            params = jax.tree.map(lambda x: x * 1.01 + 0.001, params)
            t = time.perf_counter()
            rep = jgradcheck.check_grad(cost, grad, params, *args, progress=False, mode="full")
            print(report(f"{a.model} warm {k + 1} (passed: {rep.passed})", time.perf_counter() - t))
            print()
        print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
