"""Costs where the delta interpreter could be slower than re-evaluating the whole cost (issue 17).

For each cost, three contenders checking ``jax.grad(cost)`` on ``params`` in float64:

* ``default``: ``jgradcheck.check_grad(cost, grad, params, *args)``;
* ``vmap``: the same with ``strategy="vmap"`` (whole-cost re-evaluation under vmap);
* ``loop``: the leanest loop a user writes in five lines: θ raveled and kept on the device,
  ``J = jax.jit(lambda t, i, s: cost(unravel(t.at[i].add(s)), *args))`` called 2n times
  (J(θ ± h e_i)), blocking once at the end.

Cold: each contender's first call in a process of its own (tracing and compilation included,
none shared with another contender). Warm: in this one process, after one call of each
contender, ``--repeats`` rounds of the three at new parameter values of the same shapes,
interleaved (median, min and max). The table gives each contender's times and its ratio to
``vmap`` (target: default ≤ 1.5x vmap, cold and warm).

Costs: ``conv_transpose`` (kernel (3, 3, 8, 8) and (3, 3, 8, 12), x (2, 12, 12, 8), strides 2,
SAME: 104-137 s and 223 s before issue 17), and three built from primitives the delta rules
do not know: ``sort`` (a sorted hidden layer), ``maxpool_cnn`` (a convolution, ``reduce_window``
max pooling, a dense layer), ``fft`` (the power spectrum of a linear map).

Usage:
  python benchmarks/bench_pathology.py                      # every cost and contender
  python benchmarks/bench_pathology.py --cost sort           # one cost
  python benchmarks/bench_pathology.py --cost sort --cold loop   # one cold call, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jgradcheck

_NHWC = ("NHWC", "HWIO", "NHWC")
COSTS = ("conv_transpose", "conv_transpose_12", "sort", "maxpool_cnn", "fft")
CONTENDERS = ("default", "vmap", "loop")


def _conv_transpose(p, x):
    return jnp.sum(jax.lax.conv_transpose(x, p["k"], (2, 2), "SAME", dimension_numbers=_NHWC) ** 2)


def _sort(p, x):
    h = jnp.sort(jnp.tanh(x @ p["w1"]), axis=-1)
    return jnp.sum(jnp.tanh(h @ p["w2"]) ** 2)


def _maxpool_cnn(p, x):
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=_NHWC) + p["b"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.sum(jax.nn.log_softmax(h.reshape(h.shape[0], -1) @ p["w"]))


def _fft(p, x):
    return jnp.sum(jnp.abs(jnp.fft.rfft(x @ p["w"], axis=0)) ** 2) / x.shape[0]


def make(name: str, seed: int):
    """(cost, params, args) in float64; ``seed`` draws new values of the same shapes."""
    r = np.random.default_rng(seed)

    def a(*shape, s=0.3):
        return jnp.asarray(r.standard_normal(shape) * s, jnp.float64)

    if name.startswith("conv_transpose"):
        out = 12 if name.endswith("_12") else 8
        return _conv_transpose, {"k": a(3, 3, 8, out)}, (a(2, 12, 12, 8, s=1.0),)
    if name == "sort":
        return _sort, {"w1": a(64, 32), "w2": a(32, 8)}, (a(16, 64, s=1.0),)
    if name == "maxpool_cnn":
        return (
            _maxpool_cnn,
            {"k": a(3, 3, 4, 16), "b": a(16), "w": a(8 * 8 * 16, 10, s=0.05)},
            (a(4, 16, 16, 4, s=1.0),),
        )
    if name == "fft":
        return _fft, {"w": a(32, 32)}, (a(64, 32, s=1.0),)
    raise ValueError(name)


def _lean_loop(cost, params, args) -> float:
    """Seconds for the 2n calls of the jitted J (compilation included on the first run)."""
    theta, unravel = ravel_pytree(params)
    n = theta.size
    h = float(np.cbrt(np.finfo(np.float64).eps))
    J = jax.jit(lambda t, i, s: cost(unravel(t.at[i].add(s)), *args))
    start = time.perf_counter()
    out = None
    for i in range(n):
        out = J(theta, i, h)
        out = J(theta, i, -h)
    out.block_until_ready()
    return time.perf_counter() - start


def run(name: str, contender: str, seed: int) -> tuple[float, str]:
    """Seconds of one full check (or of the loop's 2n calls) at the values drawn by ``seed``."""
    cost, params, args = make(name, seed)
    if contender == "loop":
        return _lean_loop(cost, params, args), ""
    kw = {"strategy": "vmap"} if contender == "vmap" else {}
    start = time.perf_counter()
    report = jgradcheck.check_grad(cost, jax.grad(cost), params, *args, **kw)
    seconds = time.perf_counter() - start
    if not report.passed:
        raise SystemExit(f"{name}/{contender}: the check did not pass:\n{report}")
    return seconds, report.evaluated


def warm_rows(name: str, repeats: int) -> list[dict]:
    """In this process: each contender once (compiling), then ``repeats`` rounds of all three
    at new values of the same shapes, interleaved so that a change of load hits all alike."""
    times: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    evaluated = {}
    for c in CONTENDERS:
        evaluated[c] = run(name, c, 0)[1]
    for k in range(repeats):
        for c in CONTENDERS:
            times[c].append(run(name, c, k + 1)[0])
    n = int(ravel_pytree(make(name, 0)[1])[0].size)
    return [
        {
            "cost": name,
            "contender": c,
            "n": n,
            "warm_median": float(np.median(times[c])),
            "warm_min": float(np.min(times[c])),
            "warm_max": float(np.max(times[c])),
            "evaluated": evaluated[c],
        }
        for c in CONTENDERS
    ]


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
        f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
        f"jgradcheck {jgradcheck.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def table(rows: list[dict]) -> str:
    by = {(r["cost"], r["contender"]): r for r in rows}
    lines = [
        "| cost | n | contender | cold s | cold / vmap | warm s (median [min-max]) | warm / vmap | evaluated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["cost"] for r in rows):
        ref = by.get((name, "vmap"))
        for contender in CONTENDERS:
            r = by.get((name, contender))
            if r is None:
                continue
            cold = f"{r['cold'] / ref['cold']:.2f}x" if ref else "-"
            warm = f"{r['warm_median'] / ref['warm_median']:.2f}x" if ref else "-"
            lines.append(
                f"| {name} | {r['n']:,} | {contender} | {r['cold']:.2f} | {cold} | {r['warm_median']:.2f} "
                f"[{r['warm_min']:.2f}-{r['warm_max']:.2f}] | {warm} | {r['evaluated'] or '-'} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cost", choices=COSTS)
    ap.add_argument("--cold", choices=CONTENDERS, help="time this contender's first call only (one process)")
    ap.add_argument("--repeats", type=int, default=3, help="warm rounds after compilation")
    opts = ap.parse_args()
    with jax.enable_x64(True):
        if opts.cold:
            print(json.dumps({"cold": run(opts.cost, opts.cold, 0)[0]}))
            return
        print(machine_line())
        rows = []
        for name in [opts.cost] if opts.cost else COSTS:
            colds = {}
            for c in CONTENDERS:
                cmd = [sys.executable, __file__, "--cost", name, "--cold", c]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                colds[c] = json.loads(out.stdout.strip().splitlines()[-1])["cold"]
            for r in warm_rows(name, opts.repeats):
                r["cold"] = colds[r["contender"]]
                rows.append(r)
                print(
                    f"  {name:18s} {r['contender']:8s} cold {r['cold']:7.2f} s  warm {r['warm_median']:7.2f} s",
                    flush=True,
                )
        print(table(rows))


if __name__ == "__main__":
    main()
