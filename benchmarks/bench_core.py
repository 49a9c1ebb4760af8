"""Full gradient check vs the classic recipe's per-coordinate loop vs the FLOP floor, in one process.

The network is the issue's: 256-128-64-1 (41,217 parameters), 64 examples, ReLU hidden layers,
sigmoid output, cross-entropy + L2, float64. Contenders:

* jgradcheck.check_grad(mode="full"), cold (first call: tracing and compilation included) and
  warm (same shapes, new values: the classic recipe's "check again after training");
* the classic recipe's loop: a jitted J(θ) called 2n times from Python on θ ± ε e_i (ε = 1e-7);
* jgradcheck with ``strategy="vmap"`` (the whole cost re-evaluated per perturbation), warm;
* the FLOP floor: the matmul FLOPs of 2n cost evaluations at this machine's GEMM rate, measured
  here on a float64 GEMM of the network's biggest layer shape batched like the check batches it.

Usage: python benchmarks/bench_core.py [--loop-sample K] [--dims 256,128,64,1] [--m 64]
With --loop-sample K the loop runs K coordinates and is extrapolated to 2n (said in the output).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jgradcheck


def make_problem(dims, m, seed=0):
    key = jax.random.PRNGKey(seed)
    params = {}
    for layer in range(1, len(dims)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"W{layer}"] = jax.random.normal(k1, (dims[layer], dims[layer - 1])) * jnp.sqrt(2.0 / dims[layer - 1])
        params[f"b{layer}"] = 0.1 * jax.random.normal(k2, (dims[layer], 1))
    key, kx, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (dims[0], m))
    y = (jax.random.uniform(ky, (1, m)) > 0.5).astype(jnp.float32)
    return params, x, y


def cost(params, x, y, lambd=0.7):
    n_layers = len(params) // 2
    a = x
    m = x.shape[1]
    for layer in range(1, n_layers):
        a = jax.nn.relu(params[f"W{layer}"] @ a + params[f"b{layer}"])
    z = params[f"W{n_layers}"] @ a + params[f"b{n_layers}"]
    ce = jnp.mean(jax.nn.softplus(-z) * y + jax.nn.softplus(z) * (1 - y))
    l2 = sum(jnp.sum(params[f"W{i}"] ** 2) for i in range(1, n_layers + 1))
    return ce * 1.0 + lambd / (2 * m) * l2


def matmul_flops(dims, m):
    return 2 * m * sum(dims[i] * dims[i + 1] for i in range(len(dims) - 1))


def gemm_rate(dims, m, batch=256):
    """float64 GEMM FLOP/s on the network's biggest layer, batched as the check batches it."""
    i = int(np.argmax([dims[k] * dims[k + 1] for k in range(len(dims) - 1)]))
    a = jnp.ones((dims[i + 1], dims[i]))
    b = jnp.ones((dims[i], m * batch))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:
        f(a, b).block_until_ready()
        reps += 1
    return reps * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t)


def classic_loop(params, x, y, eps, coords):
    theta, unravel = ravel_pytree(params)
    f = jax.jit(lambda th: cost(unravel(th), x, y))
    th = np.asarray(theta)
    f(th).block_until_ready()
    t = time.perf_counter()
    approx = np.zeros(len(coords))
    for k, i in enumerate(coords):
        tp = th.copy()
        tp[i] += eps
        tm = th.copy()
        tm[i] -= eps
        approx[k] = (float(f(tp)) - float(f(tm))) / (2 * eps)
    return time.perf_counter() - t, approx


def machine_line() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores, {cpu}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
        f"numpy {np.__version__}, jgradcheck {jgradcheck.__version__}; devices {jax.devices()}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="256,128,64,1")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--loop-sample", type=int, default=0, help="run the loop on K coordinates and extrapolate")
    args = ap.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    with jax.enable_x64(True):
        params, x, y = make_problem(dims, args.m)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x = x.astype(jnp.float64)
        y = y.astype(jnp.float64)
        grad = jax.jit(jax.grad(cost))
        n = sum(int(p.size) for p in jax.tree.leaves(params))
        print(f"network {dims}, m = {args.m}, n = {n:,} parameters, float64")
        print(machine_line())

        t = time.perf_counter()
        report = jgradcheck.check_grad(cost, grad, params, x, y, mode="full")
        cold = time.perf_counter() - t
        assert report.passed, str(report)
        params2 = jax.tree.map(lambda a: a * 1.01, params)
        t = time.perf_counter()
        report2 = jgradcheck.check_grad(cost, grad, params2, x, y, mode="full")
        warm = time.perf_counter() - t
        assert report2.passed
        evals = report.evaluations

        # The reference engine (whole cost re-evaluated per perturbation), warm: the same check
        # without the delta interpreter, to show where the speed comes from.
        jgradcheck.check_grad(cost, grad, params, x, y, mode="full", strategy="vmap")
        t = time.perf_counter()
        jgradcheck.check_grad(cost, grad, params2, x, y, mode="full", strategy="vmap")
        vmap_warm = time.perf_counter() - t

        rate = gemm_rate(dims, args.m)
        floor = 2 * n * matmul_flops(dims, args.m) / rate

        theta, _ = ravel_pytree(params)
        if args.loop_sample:
            coords = np.random.default_rng(0).choice(n, args.loop_sample, replace=False)
            t_loop, _ = classic_loop(params, x, y, 1e-7, coords)
            loop = t_loop * n / args.loop_sample
            loop_note = f"extrapolated from {args.loop_sample:,} of {n:,} coordinates"
        else:
            loop, _ = classic_loop(params, x, y, 1e-7, range(n))
            loop_note = "all coordinates"

    print()
    print("| contender | time (s) | cost evaluations | vs jgradcheck cold |")
    print("|---|---|---|---|")
    print(f"| jgradcheck full, cold (compile included) | {cold:.2f} | {evals:,} | 1.00 |")
    print(
        f"| jgradcheck full, warm (new values, same shapes) | {warm:.2f} | {report2.evaluations:,} | {warm / cold:.2f} |"
    )
    print(
        f"| jgradcheck full, strategy='vmap' (whole cost per perturbation), warm | {vmap_warm:.2f} | {report2.evaluations:,} | {vmap_warm / cold:.2f} |"
    )
    print(
        f"| classic recipe's loop, jitted J called 2n times ({loop_note}) | {loop:.2f} | {2 * n:,} | {loop / cold:.2f} |"
    )
    print(
        f"| FLOP floor: 2n evals x {matmul_flops(dims, args.m) / 1e6:.2f} MFLOP at {rate / 1e9:.1f} GFLOP/s | {floor:.2f} | {2 * n:,} | {floor / cold:.2f} |"
    )
    print()
    print(f"speed-up over the classic recipe's loop (cold): {loop / cold:.1f}x   (target >= 10x)")
    print(f"cold time / FLOP floor: {cold / floor:.2f}   (target <= 2)")
    print(f"warm time / FLOP floor: {warm / floor:.2f}")
    print(
        f"speed-up over the classic recipe's loop (warm): {loop / warm:.1f}x; delta engine over vmap engine (warm): {vmap_warm / warm:.1f}x"
    )


if __name__ == "__main__":
    main()
