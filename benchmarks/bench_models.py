"""Full gradient check on the model families researchers write, one process per model.

Models (float64): a transformer encoder block, a GRU written with ``lax.scan``, a small CNN
(``conv_general_dilated``, NHWC), a unit-test-sized MLP 8-16-1 and the 256-128-64-1 MLP of
``bench_core.py``. For each, in one process:

* ``jgradcheck.check_grad(cost, jax.grad(cost), params, *args, mode="full")`` (``--mode``; full,
  every entry, as the loops below; other options default), cold (the first call: tracing and
  compilation included) and warm (new parameter values, same shapes);
* the leanest loop a user can write (the baseline): ``J = jax.jit(lambda t, i, s:
  cost(unravel(t.at[i].add(s)), *args))`` with θ kept on the device, called 2n times as
  ``J(theta, i, +h)`` and ``J(theta, i, -h)`` from Python (i and s passed as arguments), the
  2n results collected and blocked on once at the end, as a user collecting them would; run in
  full when 2n ≤ ``--loop-calls`` (default 2,000), else timed on ``--loop-calls`` calls
  (random coordinates) and extrapolated to 2n, plus its one compilation;
* the host-copy loop (second column): the same J of a flat θ copied on the host for each
  call and read back with ``float()`` after each, timed and extrapolated the same way;
* ``torch.autograd.gradcheck`` (slow mode) on the same function and weights when torch imports:
  run in full when 2n ≤ ``--torch-full``, else its 2n forward evaluations are timed on
  ``--loop-calls`` calls and extrapolated (slow mode is those evaluations plus one backward);
* batched J: 2n evaluations at the speed of ``jax.vmap(J)`` over 128 whole parameter vectors
  (compilation excluded), a floor for whole re-evaluation that counts the elementwise work;
* the FLOP floor: 2n × the FLOPs of one J at the float64 GEMM rate measured in this process:
  XLA's ``cost_analysis``, or the matmul/convolution FLOPs counted from the jaxpr when larger
  (XLA counts a ``scan`` body once, not once per step);
* peak RSS of the process after the two checks (before the loop and torch run).

Usage:
  python benchmarks/bench_models.py                  # every model, each in its own process
  python benchmarks/bench_models.py --repeats 3 --no-torch   # three runs, alternating models
  python benchmarks/bench_models.py --model gru      # one model, prints its row as JSON too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jgradcheck

MODELS = ("transformer", "gru", "cnn", "mlp_small", "mlp_core")


# --------------------------------------------------------------------------------------------
# The models, in JAX. Each maker returns (cost, params, args) with float64 arrays.


def _normal(rng, *shape, scale=None):
    scale = (1.0 / np.sqrt(shape[0])) if scale is None else scale
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float64)


def _layer_norm(x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * g + b


def make_transformer(rng):
    vocab, d, heads, ff, classes, batch, seq = 200, 48, 4, 192, 10, 4, 16
    p = {
        "embed": _normal(rng, vocab, d, scale=0.5),
        "pos": _normal(rng, seq, d, scale=0.1),
        "ln1_g": jnp.ones(d) + _normal(rng, d, scale=0.05),
        "ln1_b": _normal(rng, d, scale=0.05),
        "wq": _normal(rng, d, d),
        "wk": _normal(rng, d, d),
        "wv": _normal(rng, d, d),
        "wo": _normal(rng, d, d),
        "bq": _normal(rng, d, scale=0.05),
        "bk": _normal(rng, d, scale=0.05),
        "bv": _normal(rng, d, scale=0.05),
        "bo": _normal(rng, d, scale=0.05),
        "ln2_g": jnp.ones(d) + _normal(rng, d, scale=0.05),
        "ln2_b": _normal(rng, d, scale=0.05),
        "w1": _normal(rng, d, ff),
        "b1": _normal(rng, ff, scale=0.05),
        "w2": _normal(rng, ff, d),
        "b2": _normal(rng, d, scale=0.05),
        "head": _normal(rng, d, classes),
        "head_b": _normal(rng, classes, scale=0.05),
    }
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32)

    def cost(p, tokens, labels):
        x = p["embed"][tokens] + p["pos"]
        h = _layer_norm(x, p["ln1_g"], p["ln1_b"])
        b, s, _ = h.shape

        def split(t):
            return t.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)

        q, k, v = split(h @ p["wq"] + p["bq"]), split(h @ p["wk"] + p["bk"]), split(h @ p["wv"] + p["bv"])
        a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
        x = x + o @ p["wo"] + p["bo"]
        h = _layer_norm(x, p["ln2_g"], p["ln2_b"])
        x = x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        logits = jnp.mean(x, axis=1) @ p["head"] + p["head_b"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    return cost, p, (tokens, labels)


def make_gru(rng):
    steps, batch, n_in, hidden = 20, 8, 16, 64
    p = {}
    for g in ("z", "r", "h"):
        p[f"w{g}"] = _normal(rng, n_in, hidden)
        p[f"u{g}"] = _normal(rng, hidden, hidden)
        p[f"b{g}"] = _normal(rng, hidden, scale=0.05)
    p["out"] = _normal(rng, hidden)
    p["out_b"] = _normal(rng, 1, scale=0.05)
    xs = _normal(rng, steps, batch, n_in, scale=1.0)
    ys = _normal(rng, batch, scale=1.0)

    def cost(p, xs, ys):
        def step(h, x):
            z = jax.nn.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"])
            r = jax.nn.sigmoid(x @ p["wr"] + h @ p["ur"] + p["br"])
            c = jnp.tanh(x @ p["wh"] + (r * h) @ p["uh"] + p["bh"])
            h = (1 - z) * h + z * c
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], hidden), xs.dtype), xs)
        return jnp.mean((h @ p["out"] + p["out_b"] - ys) ** 2)

    return cost, p, (xs, ys)


def make_cnn(rng):
    batch, size, c_in, c1, c2, classes = 8, 16, 3, 16, 32, 3
    p = {
        "k1": _normal(rng, 3, 3, c_in, c1, scale=0.3),
        "b1": _normal(rng, c1, scale=0.05),
        "k2": _normal(rng, 3, 3, c1, c2, scale=0.1),
        "b2": _normal(rng, c2, scale=0.05),
        "w": _normal(rng, (size // 2) ** 2 * c2, classes),
        "b": _normal(rng, classes, scale=0.05),
    }
    x = _normal(rng, batch, size, size, c_in, scale=1.0)
    labels = jnp.asarray(rng.integers(0, classes, (batch,)), jnp.int32)
    dn = ("NHWC", "HWIO", "NHWC")

    def cost(p, x, labels):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn) + p["b1"])
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn) + p["b2"])
        b, hh, ww, c = h.shape
        h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
        logits = h.reshape(b, -1) @ p["w"] + p["b"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    return cost, p, (x, labels)


def make_mlp_small(rng):
    p = {"w1": _normal(rng, 8, 16), "b1": _normal(rng, 16, scale=0.1), "w2": _normal(rng, 16, 1), "b2": _normal(rng, 1)}
    x = _normal(rng, 32, 8, scale=1.0)
    y = _normal(rng, 32, 1, scale=1.0)

    def cost(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

    return cost, p, (x, y)


def make_mlp_core(rng):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_core

    params, x, y = bench_core.make_problem([256, 128, 64, 1], 64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    return bench_core.cost, params, (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))


# --------------------------------------------------------------------------------------------
# The same models in torch (benchmark-only dependency), evaluated on the same weights.


def torch_cost(name):
    import torch
    import torch.nn.functional as F

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), g, b, eps=1e-5)

    if name == "transformer":

        def f(p, tokens, labels):
            x = p["embed"][tokens] + p["pos"]
            h = ln(x, p["ln1_g"], p["ln1_b"])
            b, s, d = h.shape

            def split(t):
                return t.reshape(b, s, 4, d // 4).transpose(1, 2)

            q, k, v = split(h @ p["wq"] + p["bq"]), split(h @ p["wk"] + p["bk"]), split(h @ p["wv"] + p["bv"])
            a = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d // 4), dim=-1)
            o = (a @ v).transpose(1, 2).reshape(b, s, d)
            x = x + o @ p["wo"] + p["bo"]
            h = ln(x, p["ln2_g"], p["ln2_b"])
            x = x + F.gelu(h @ p["w1"] + p["b1"], approximate="tanh") @ p["w2"] + p["b2"]
            return F.cross_entropy(x.mean(1) @ p["head"] + p["head_b"], labels.long())

    elif name == "gru":

        def f(p, xs, ys):
            h = torch.zeros(xs.shape[1], 64, dtype=xs.dtype)
            for x in xs:
                z = torch.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"])
                r = torch.sigmoid(x @ p["wr"] + h @ p["ur"] + p["br"])
                c = torch.tanh(x @ p["wh"] + (r * h) @ p["uh"] + p["bh"])
                h = (1 - z) * h + z * c
            return torch.mean((h @ p["out"] + p["out_b"] - ys) ** 2)

    elif name == "cnn":

        def f(p, x, labels):
            x = x.permute(0, 3, 1, 2)
            h = F.relu(F.conv2d(x, p["k1"].permute(3, 2, 0, 1), p["b1"], padding=1))
            h = F.relu(F.conv2d(h, p["k2"].permute(3, 2, 0, 1), p["b2"], padding=1))
            h = F.avg_pool2d(h, 2).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            return F.cross_entropy(h @ p["w"] + p["b"], labels.long())

    elif name == "mlp_small":

        def f(p, x, y):
            return torch.mean((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y) ** 2)

    else:

        def f(p, x, y):
            a = x
            for layer in (1, 2):
                a = torch.relu(p[f"W{layer}"] @ a + p[f"b{layer}"])
            z = p["W3"] @ a + p["b3"]
            ce = torch.mean(F.softplus(-z) * y + F.softplus(z) * (1 - y))
            l2 = sum(torch.sum(p[f"W{i}"] ** 2) for i in (1, 2, 3))
            return ce + 0.7 / (2 * x.shape[1]) * l2

    return f


def run_torch(name, params, args, calls, full_limit, j_jax):
    """Seconds for torch.autograd.gradcheck (slow mode), full or extrapolated; None without torch."""
    try:
        import torch
    except ImportError:
        return None, "torch not importable"
    torch.set_num_threads(1)  # spinning OpenMP threads collapse on a shared, loaded machine
    f = torch_cost(name)
    keys = list(params)
    tp = [torch.tensor(np.asarray(params[k]), dtype=torch.float64, requires_grad=True) for k in keys]
    targs = [torch.tensor(np.asarray(a)) for a in args]
    targs = [a.double() if a.is_floating_point() else a for a in targs]

    def fn(*leaves):
        return f(dict(zip(keys, leaves)), *targs)

    got = float(fn(*tp).detach())
    if not np.isclose(got, j_jax, rtol=1e-9):
        return None, f"torch model disagrees with the JAX one ({got} vs {j_jax})"
    n = sum(int(t.numel()) for t in tp)
    if 2 * n <= full_limit:
        t = time.perf_counter()
        ok = torch.autograd.gradcheck(fn, tuple(tp), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=False)
        return time.perf_counter() - t, "full" if ok else "full (reported a mismatch)"
    # Slow mode's numerical Jacobian is 2n forward evaluations with one entry moved in place.
    flat = [t.detach().reshape(-1) for t in tp]
    with torch.no_grad():
        fn(*tp)
        t = time.perf_counter()
        done = 0
        for leaf in flat:
            for i in range(leaf.numel()):
                if done >= calls:
                    break
                v = float(leaf[i])
                leaf[i] = v + 1e-6
                fn(*tp)
                leaf[i] = v - 1e-6
                fn(*tp)
                leaf[i] = v
                done += 2
    return (time.perf_counter() - t) * 2 * n / done, f"extrapolated from {done:,} forward calls"


# --------------------------------------------------------------------------------------------


def gemm_rate():
    a = jnp.ones((256, 256), jnp.float64)
    b = jnp.ones((256, 4096), jnp.float64)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 1.0:
        f(a, b).block_until_ready()
        reps += 1
    return reps * 2 * 256 * 256 * 4096 / (time.perf_counter() - t)


def jaxpr_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs of one J from its jaxpr, loop bodies times their trip count.

    XLA's ``cost_analysis`` counts a ``scan`` body once; this count multiplies it by ``length``.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[d] for d in lc]) if lc else 1
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_ch = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_ch
        for v in eqn.params.values():
            subs = v if isinstance(v, tuple) else (v,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += jaxpr_flops(inner) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def lean_loop_time(cost, params, args, calls):
    """Seconds for the leanest loop (see the module docstring), compilation included."""
    theta, unravel = ravel_pytree(params)
    theta = jax.device_put(theta)
    j = jax.jit(lambda t, i, s: cost(unravel(t.at[i].add(s)), *args))
    t = time.perf_counter()
    j(theta, 0, 1e-7).block_until_ready()
    compile_s = time.perf_counter() - t
    n = int(theta.size)
    coords = np.random.default_rng(1).choice(n, min(n, calls // 2), replace=False).tolist()
    t = time.perf_counter()
    outs = []
    for i in coords:
        outs.append(j(theta, i, 1e-7))
        outs.append(j(theta, i, -1e-7))
    got = np.asarray(jax.device_get(outs))  # one wait, at the end
    elapsed = time.perf_counter() - t
    assert got.shape == (2 * len(coords),)
    return elapsed * n / len(coords) + compile_s


def batched_time(cost, params, args, batch=128):
    """Seconds for 2n evaluations of J at the speed of ``jax.vmap(J)`` over ``batch`` whole
    parameter vectors (compilation excluded): whole re-evaluation at batch speed, every
    elementwise operation counted, which the FLOP floor leaves out."""
    theta, unravel = ravel_pytree(params)
    jb = jax.jit(jax.vmap(lambda t: cost(unravel(t), *args)))
    thetas = theta[None, :] + 1e-7 * jnp.arange(batch, dtype=theta.dtype)[:, None]
    jb(thetas).block_until_ready()
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < 0.5:
        jb(thetas).block_until_ready()
        reps += 1
    return (time.perf_counter() - t) / (reps * batch) * 2 * theta.size


def loop_time(cost, params, args, calls):
    """Seconds for the host-copy loop (θ copied on the host, one sync per call), compilation
    included; J(θ), the jitted J and θ for the FLOP count."""
    theta, unravel = ravel_pytree(params)
    f = jax.jit(lambda th: cost(unravel(th), *args))
    th = np.asarray(theta)
    t = time.perf_counter()
    f(th).block_until_ready()
    compile_s = time.perf_counter() - t
    n = th.size
    coords = np.random.default_rng(0).choice(n, min(n, calls // 2), replace=False)
    t = time.perf_counter()
    for i in coords:
        tp = th.copy()
        tp[i] += 1e-7
        tm = th.copy()
        tm[i] -= 1e-7
        (float(f(tp)) - float(f(tm))) / 2e-7
    return (time.perf_counter() - t) * n / len(coords) + compile_s, float(f(th)), f, th


def run_one(name, calls, torch_full, mode="full", lean_only=False):
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        cost, params, args = globals()[f"make_{name}"](rng)
        n = sum(int(p.size) for p in jax.tree.leaves(params))
        grad = jax.grad(cost)
        t = time.perf_counter()
        rep = jgradcheck.check_grad(cost, grad, params, *args, mode=mode)
        cold = time.perf_counter() - t
        params2 = jax.tree.map(lambda a: a * 1.01 + 0.001, params)
        t = time.perf_counter()
        rep2 = jgradcheck.check_grad(cost, grad, params2, *args, mode=mode)
        warm = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lean = lean_loop_time(cost, params, args, calls)
        if lean_only:  # the check against the lean loop only (--lean-only): the other columns are nan
            batched = loop = floor = rate = j0 = float("nan")
        else:
            batched = batched_time(cost, params, args)
            loop, j0, f, th = loop_time(cost, params, args, calls)
            flops = f.lower(th).compile().cost_analysis()
            flops = flops[0] if isinstance(flops, list) else flops
            rate = gemm_rate()
            counted = jaxpr_flops(jax.make_jaxpr(f)(th).jaxpr)
            floor = 2 * n * max(float(flops["flops"]), counted) / rate
    if torch_full is None or lean_only:
        t_torch, torch_note = None, "skipped (--no-torch)"
    else:
        t_torch, torch_note = run_torch(name, params, args, calls, torch_full, j0)
    return {
        "model": name,
        "n": n,
        "cold": cold,
        "warm": warm,
        "passed": bool(rep.passed and rep2.passed),
        "lean": lean,
        "batched": batched,
        "loop": loop,
        "load": load,
        "torch": t_torch,
        "torch_note": torch_note,
        "floor": floor,
        "gflops": rate / 1e9,
        "rss_mb": rss,
        "evaluations": rep.evaluations,
        "mode": f"{rep.mode.split()[0]}/{rep2.mode.split()[0]}",
    }


def machine_line() -> str:
    """bench_core's machine and versions line, plus torch's version."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_core

    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    return f"{bench_core.machine_line()}; torch {tv}"


def table(rows):
    out = [
        "| model (n) | check cold (s) | check warm (s) | lean loop (s) | host loop (s) | torch gradcheck (s) "
        "| FLOP floor (s) | batched J (s) | lean / cold | lean / warm | warm / floor | warm / batched J | host / cold "
        "| torch / cold | peak RSS (MB) | load | mode (cold/warm) | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tt = "-" if r["torch"] is None else f"{r['torch']:.2f}"
        tc = "-" if r["torch"] is None else f"{r['torch'] / r['cold']:.1f}"
        out.append(
            f"| {r['model']} ({r['n']:,}) | {r['cold']:.2f} | {r['warm']:.2f} | {r['lean']:.2f} | {r['loop']:.2f} "
            f"| {tt} | {r['floor']:.2f} | {r['batched']:.2f} | {r['lean'] / r['cold']:.1f} | {r['lean'] / r['warm']:.1f} "
            f"| {r['warm'] / r['floor']:.2f} | {r['warm'] / r['batched']:.2f} | {r['loop'] / r['cold']:.1f} | {tc} "
            f"| {r['rss_mb']:.0f} "
            f"| {r['load']:.1f} | {r.get('mode', '-')} | {r['passed']} |"
        )
    return "\n".join(out)


def spread(rows):
    """Per model, the range over repeats of the ratios the targets are stated in."""
    out = [
        "| model | runs | lean / cold | lean / warm | warm / floor | warm / batched J | cold (s) | warm (s) "
        "| lean loop (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def rng(vals, fmt):
        return f"{min(vals):{fmt}}-{max(vals):{fmt}}"

    for m in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == m]
        out.append(
            f"| {m} | {len(rs)} | {rng([r['lean'] / r['cold'] for r in rs], '.1f')} "
            f"| {rng([r['lean'] / r['warm'] for r in rs], '.1f')} | {rng([r['warm'] / r['floor'] for r in rs], '.2f')} "
            f"| {rng([r['warm'] / r['batched'] for r in rs], '.2f')} "
            f"| {rng([r['cold'] for r in rs], '.2f')} | {rng([r['warm'] for r in rs], '.2f')} "
            f"| {rng([r['lean'] for r in rs], '.2f')} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, for the multi-process run")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every model, alternating models")
    ap.add_argument("--loop-calls", type=int, default=2000)
    ap.add_argument("--torch-full", type=int, default=4000, help="run gradcheck in full when 2n is at most this")
    ap.add_argument("--no-torch", action="store_true", help="skip torch gradcheck")
    ap.add_argument("--mode", default="full", help="check_grad's mode (default full: every entry, as the loops)")
    ap.add_argument("--lean-only", action="store_true", help="the check and the lean loop only (no host loop, floor)")
    ap.add_argument("--set", default="", help="NAME=V,...: engine constants for an A/B (e.g. LEAN=0,TIER_UP=0)")
    a = ap.parse_args()
    for item in filter(None, a.set.split(",")):
        from jgradcheck._src import engine

        name, v = item.split("=")
        kind = type(getattr(engine, name))
        setattr(engine, name, v in ("1", "true", "True") if kind is bool else kind(v))
    if a.model and a.repeats > 1:  # several runs of one model: the multi-process path, as --models M
        a.models, a.model = a.model, None
    if a.model:
        row = run_one(a.model, a.loop_calls, None if a.no_torch else a.torch_full, a.mode, a.lean_only)
        print(table([row]))
        print(f"torch: {row['torch_note']}; GEMM rate {row['gflops']:.1f} GFLOP/s; {row['evaluations']:,} evaluations")
        print("JSON " + json.dumps(row))
        return
    print(machine_line())
    rows = []
    for rep in range(a.repeats):
        run = []
        print(f"run {rep + 1}, {time.strftime('%H:%M UTC', time.gmtime())}, load {os.getloadavg()}", flush=True)
        for m in a.models.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--model", m, "--loop-calls", str(a.loop_calls)]
            cmd += ["--torch-full", str(a.torch_full), "--mode", a.mode] + (["--no-torch"] if a.no_torch else [])
            cmd += (["--lean-only"] if a.lean_only else []) + (["--set", a.set] if a.set else [])
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("JSON ")]
            if not lines:
                print(f"{m}: failed\n{res.stderr[-2000:]}")
                continue
            row = json.loads(lines[-1][5:])
            run.append(row)
            print(f"{m}: done ({row['torch_note']}; {row['gflops']:.1f} GFLOP/s)", flush=True)
        print(table(run), flush=True)
        rows += run
    if a.repeats > 1:
        print(spread(rows))


if __name__ == "__main__":
    main()
