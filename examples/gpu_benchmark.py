"""How fast is a full check on this machine's accelerator?

Times one full check (every entry, central differences: 2 cost evaluations per parameter) of
an MLP on whatever ``jax.default_backend()`` is (CPU, GPU, TPU). Compilation is excluded: the
check runs once to compile, then is timed at new parameter values of the same shapes, which
reuse the compiled programs. It is compared with the per-coordinate loop of the classic
recipe (one jitted J(θ ± h eᵢ) per call, ``block_until_ready`` each time), timed on a few
hundred coordinates and extrapolated to all of θ.

Run: python examples/gpu_benchmark.py            (--small, the default: ~7k parameters, well under a minute on CPU)
     python examples/gpu_benchmark.py --large    (~235k parameters: for a GPU)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import jgradcheck

SIZES = {"small": ((32, 64, 64, 10), 256), "large": ((784, 256, 128, 10), 512)}  # layer widths, examples
LOOP_COORDS = 300  # coordinates timed in the per-coordinate loop


def init(key, dims):
    params = {}
    for k in range(1, len(dims)):
        key, sub = jax.random.split(key)
        params[f"W{k}"] = jax.random.normal(sub, (dims[k - 1], dims[k])) * jnp.sqrt(2.0 / dims[k - 1])
        params[f"b{k}"] = jnp.full((dims[k],), 0.01)
    return params


def cost(params, x, labels):
    """Mean softmax cross-entropy of a tanh MLP."""
    n_layers = len(params) // 2
    a = x
    for k in range(1, n_layers):
        a = jnp.tanh(a @ params[f"W{k}"] + params[f"b{k}"])
    logits = a @ params[f"W{n_layers}"] + params[f"b{n_layers}"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", action="store_const", dest="size", const="small", help="~7k parameters (default)")
    group.add_argument("--large", action="store_const", dest="size", const="large", help="~235k parameters")
    size = parser.parse_args().size or "small"
    dims, m = SIZES[size]
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (m, dims[0]))
    labels = jax.random.randint(ky, (m,), 0, dims[-1])
    grad = jax.jit(jax.grad(cost))  # a correct gradient: this is about speed
    n = sum(p.size for p in jax.tree_util.tree_leaves(init(kp, dims)))
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), MLP {dims}, {n:,} parameters, m = {m}")

    # Full check: once to compile, then timed at new values of the same shapes.
    jgradcheck.check_grad(cost, grad, init(kp, dims), x, labels, mode="full")
    params = init(jax.random.PRNGKey(1), dims)
    t0 = time.perf_counter()
    report = jgradcheck.check_grad(cost, grad, params, x, labels, mode="full")
    t_check = time.perf_counter() - t0  # the report's numbers are on the host: the work is done
    rate = report.evaluations / t_check
    print(
        f"full check: {'passed' if report.passed else 'FAILED'}, {report.evaluations:,} evaluations in {t_check:.2f} s"
    )
    print(f"  {rate:,.0f} evaluations/s, in {report.precision}")

    # The classic per-coordinate loop, in the same precision, on LOOP_COORDS coordinates.
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        theta, unravel = ravel_pytree(p64)
        x64 = jnp.asarray(x, jnp.float64)

        @jax.jit
        def j_at(theta, i, h):
            return cost(unravel(theta.at[i].add(h)), x64, labels)

        j_at(theta, 0, 1e-5).block_until_ready()  # compile
        coords = jnp.linspace(0, n - 1, LOOP_COORDS).astype(jnp.int32)
        t0 = time.perf_counter()
        for i in coords:
            (j_at(theta, i, 1e-5) - j_at(theta, i, -1e-5)).block_until_ready()
        t_loop = (time.perf_counter() - t0) / LOOP_COORDS * n
    print(f"per-coordinate loop: {2 * n / t_loop:,.0f} evaluations/s (timed on {LOOP_COORDS} coordinates)")
    print(f"  a full check by the loop would take ~{t_loop:.1f} s: jgradcheck is {t_loop / t_check:.1f}x faster")


if __name__ == "__main__":
    main()
