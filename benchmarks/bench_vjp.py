"""jgradcheck.check_vjp against torch.autograd.gradcheck on a layer's hand-written backward.

Layers of a few thousand inputs, the same weights on both sides (dense by default; name
``attention`` on the command line for the second, or both):

* dense: tanh(x @ W + b), x (16, 64), W (64, 64), b (64,): 5,184 inputs, 1,024 outputs;
  planted bug: dW transposed (W is square, so the shapes still match);
* attention: the 4-head softmax attention of examples/fused_attention.py with x (16, 32) and
  Wq, Wk, Wv (32, 32): 3,584 inputs, 512 outputs; planted bug: the softmax backward without
  the row sum (ds = p * dp).

Contenders, each with a correct backward and with the planted bug:

* jgradcheck.check_vjp(layer, layer_vjp, ...) with the hand-written VJP in JAX, float32 inputs
  (it differentiates in float64). Cold: the first call, compilation included (``jax.clear_caches()``
  before it); warm: a second call at new values of the same shapes.
* torch.autograd.gradcheck in float64, slow mode (the full Jacobian both ways) and
  ``fast_mode=True`` (one random projection), on the layer's own autograd and on a
  ``torch.autograd.Function`` with the same hand-written backward (the bug is planted there).

Times are medians of REPEATS runs in this one process, with their spread (min-max), and the
ratio to jgradcheck's warm time on the same backward (torch's slow mode, ~40 s a call on 2 shared
cores, runs once per variant, and so does a failing fast check, which recomputes the slow-mode
Jacobians for its message; jgradcheck's cold call with the bug runs once). Peak RSS is measured per contender in a fresh child process
that imports only that library and runs the correct check once (the import-only baseline is
shown beside it).

Run: python benchmarks/bench_vjp.py [dense] [attention]  (dense alone: about 4 minutes on 2 shared cores)
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import numpy as np

REPEATS = 3
SLOW_REPEATS = 1  # torch's slow mode takes ~40 s a call here: once per variant keeps the run near 5 minutes
N, DIN, DOUT = 16, 64, 64  # dense layer: x (N, DIN), W (DIN, DOUT), b (DOUT,)
T, D, HEADS = 16, 32, 4  # attention: x (T, D), Wq/Wk/Wv (D, D)
DH = D // HEADS


# --------------------------------------------------------------------------------------------
# Data: the same values for both libraries (float32 for JAX, the same values in float64 for torch).
# --------------------------------------------------------------------------------------------
def dense_data(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, DIN))
    w = rng.standard_normal((DIN, DOUT)) / np.sqrt(DIN)
    b = rng.standard_normal(DOUT) * 0.1
    return [a.astype(np.float32) for a in (x, w, b)]


def attention_data(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D))
    ws = [rng.standard_normal((D, D)) / np.sqrt(D) for _ in range(3)]
    return [a.astype(np.float32) for a in (x, *ws)]


# --------------------------------------------------------------------------------------------
# JAX side: the layers and their hand-written VJPs.
# --------------------------------------------------------------------------------------------
def jax_layers():
    import jax
    import jax.numpy as jnp

    def dense(x, w, b):
        return jnp.tanh(x @ w + b)

    def dense_vjp(x, w, b, bug=False):
        y = jnp.tanh(x @ w + b)

        def pullback(dy):
            dz = dy * (1 - y**2)
            dw = x.T @ dz
            return dz @ w.T, dw.T if bug else dw, jnp.sum(dz, axis=0)

        return y, pullback

    def split(a):
        return a.reshape(a.shape[0], HEADS, DH).transpose(1, 0, 2)

    def merge(a):
        return a.transpose(1, 0, 2).reshape(a.shape[1], D)

    def attention(x, wq, wk, wv):
        q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
        return merge(jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(DH), axis=-1) @ v)

    def attention_vjp(x, wq, wk, wv, bug=False):
        q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
        p = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(DH), axis=-1)

        def pullback(g):
            do = split(g)
            dv = p.transpose(0, 2, 1) @ do
            dp = do @ v.transpose(0, 2, 1)
            ds = p * dp if bug else p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
            ds = ds / np.sqrt(DH)
            dq, dk, dv = merge(ds @ k), merge(ds.transpose(0, 2, 1) @ q), merge(dv)
            return dq @ wq.T + dk @ wk.T + dv @ wv.T, x.T @ dq, x.T @ dk, x.T @ dv

        return merge(p @ v), pullback

    return {"dense": (dense, dense_vjp), "attention": (attention, attention_vjp)}


# --------------------------------------------------------------------------------------------
# torch side: the same layers, by autograd and as Functions with the same hand-written backward.
# --------------------------------------------------------------------------------------------
def torch_layers():
    import torch

    def dense(x, w, b):
        return torch.tanh(x @ w + b)

    def make_dense_fn(bug: bool):
        class DenseFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                y = torch.tanh(x @ w + b)
                ctx.save_for_backward(x, w, y)
                return y

            @staticmethod
            def backward(ctx, dy):
                x, w, y = ctx.saved_tensors
                dz = dy * (1 - y**2)
                dw = x.T @ dz
                return dz @ w.T, dw.T if bug else dw, dz.sum(0)

        return DenseFn.apply

    def split(a):
        return a.reshape(a.shape[0], HEADS, DH).transpose(0, 1)

    def merge(a):
        return a.transpose(0, 1).reshape(a.shape[1], D)

    def attention(x, wq, wk, wv):
        q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
        return merge(torch.softmax(q @ k.transpose(1, 2) / np.sqrt(DH), dim=-1) @ v)

    def make_attention_fn(bug: bool):
        class AttentionFn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, wq, wk, wv):
                q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
                p = torch.softmax(q @ k.transpose(1, 2) / np.sqrt(DH), dim=-1)
                ctx.save_for_backward(x, wq, wk, wv, q, k, v, p)
                return merge(p @ v)

            @staticmethod
            def backward(ctx, g):
                x, wq, wk, wv, q, k, v, p = ctx.saved_tensors
                do = split(g)
                dv = p.transpose(1, 2) @ do
                dp = do @ v.transpose(1, 2)
                ds = p * dp if bug else p * (dp - (p * dp).sum(-1, keepdim=True))
                ds = ds / np.sqrt(DH)
                dq, dk, dv = merge(ds @ k), merge(ds.transpose(1, 2) @ q), merge(dv)
                return dq @ wq.T + dk @ wk.T + dv @ wv.T, x.T @ dq, x.T @ dk, x.T @ dv

        return AttentionFn.apply

    return {"dense": (dense, make_dense_fn), "attention": (attention, make_attention_fn)}


DATA = {"dense": dense_data, "attention": attention_data}
BUGS = {"dense": "dW transposed", "attention": "softmax backward without the row sum"}


# --------------------------------------------------------------------------------------------
# One run of each contender: (seconds, passed, what it says).
# --------------------------------------------------------------------------------------------
def run_jgradcheck(layer: str, bug: bool, seed: int) -> tuple[float, bool, str]:
    import jgradcheck

    fn, vjp = jax_layers()[layer]
    start = time.perf_counter()
    report = jgradcheck.check_vjp(fn, functools.partial(vjp, bug=bug), *DATA[layer](seed))
    seconds = time.perf_counter() - start
    bad = [row for row in report.leaves if not row.passed]
    said = "; ".join(
        f"{row.path}: {row.n_failed}/{row.checked} entries fail, worst {row.path}{list(row.worst.index)}"
        + (f" ({row.diagnosis})" if row.diagnosis else "")
        for row in bad
    )
    if report.jacobian:
        e = report.jacobian[0]
        said += f"; e.g. d {e.output} / d {e.path}{list(e.index)}: yours {e.yours:.3g}, numerical {e.numerical:.3g}"
    return seconds, report.passed, said or "passed"


def run_torch(layer: str, how: str, bug: bool, fast: bool) -> tuple[float, bool, str]:
    import torch
    from torch.autograd.gradcheck import GradcheckError

    fn, make = torch_layers()[layer]
    f = fn if how == "autograd" else make(bug)
    inputs = tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in DATA[layer](0))
    start = time.perf_counter()
    try:
        passed = torch.autograd.gradcheck(f, inputs, fast_mode=fast)
        said = "passed"
    except GradcheckError as err:
        passed = False
        text = str(err)
        said = f"{text.splitlines()[0].strip()} ({len(text):,} characters, the Jacobians printed abridged"
        said += "; fast mode then recomputes them in slow mode for the message)" if fast else ")"
    return time.perf_counter() - start, passed, said


# --------------------------------------------------------------------------------------------
# Peak RSS in fresh child processes (run side by side after the timings: RSS does not mind sharing).
# --------------------------------------------------------------------------------------------
def child(argv: list[str]) -> None:
    kind, layer = argv[0], argv[1]
    if kind == "import-jax":
        import jax  # noqa: F401

        import jgradcheck  # noqa: F401
    elif kind == "import-torch":
        import torch  # noqa: F401
    elif kind == "jgradcheck":
        run_jgradcheck(layer, False, 0)
    else:
        run_torch(layer, "function", False, kind == "torch-fast")
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec (the parent's peak would show).
    with open("/proc/self/status") as status:
        print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)  # kB -> MiB


def peak_rss(jobs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    procs = {
        job: subprocess.Popen([sys.executable, __file__, "--child", *job], stdout=subprocess.PIPE, text=True, env=env)
        for job in jobs
    }
    return {job: float(p.communicate()[0].strip().splitlines()[-1]) for job, p in procs.items()}


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------
def spread(ts: list[float]) -> str:
    if len(ts) == 1:
        return f"{ts[0]:7.2f} s (1 run)"
    return f"{np.median(ts):7.2f} s ({min(ts):.2f}-{max(ts):.2f})"


def time_layer(layer: str) -> list[tuple[str, bool, list[float], bool, str | None]]:
    """Every contender on one layer: (name, bug planted, times, passed, what it said)."""
    import jax

    rows: list[tuple[str, bool, list[float], bool, str | None]] = []
    for bug in (False, True):
        cold, warm = [], []
        for r in range(REPEATS if not bug else 1):
            jax.clear_caches()
            cold.append(run_jgradcheck(layer, bug, 2 * r)[0])
        for r in range(REPEATS):
            t, passed, said = run_jgradcheck(layer, bug, 2 * r + 1)
            warm.append(t)
        rows.append(("jgradcheck check_vjp, cold", bug, cold, passed, None))
        rows.append(("jgradcheck check_vjp, warm", bug, warm, passed, said))
    for fast in (False, True):
        for how, bug in (("autograd", False), ("function", False), ("function", True)):
            ts = []
            # A failing fast check recomputes the slow-mode Jacobians for its message: as slow as slow mode.
            for _ in range(REPEATS if fast and not bug else SLOW_REPEATS):
                t, passed, said = run_torch(layer, how, bug, fast)
                ts.append(t)
            rows.append((f"torch gradcheck {'fast' if fast else 'slow'}, {how}", bug, ts, passed, said))
    return rows


def main(layers: list[str]) -> None:
    import jax
    import torch

    import jgradcheck  # noqa: F401

    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, {REPEATS} repeats")
    print("ratio: median time / jgradcheck's warm median on the same backward (correct or with the bug)\n")
    messages: list[str] = []
    for layer in layers:
        n_in = sum(a.size for a in DATA[layer](0))
        n_out = {"dense": N * DOUT, "attention": T * D}[layer]
        print(f"== {layer}: {n_in:,} inputs, {n_out:,} outputs; planted bug: {BUGS[layer]}")
        rows = time_layer(layer)
        ref = {bug: float(np.median(ts)) for name, bug, ts, _, _ in rows if name == "jgradcheck check_vjp, warm"}
        print(f"  {'contender':32s} {'backward':9s} {'time, median (min-max)':26s} {'ratio':>8s}  verdict")
        for name, bug, ts, passed, said in rows:
            verdict = ("caught" if not passed else "MISSED") if bug else ("passed" if passed else "FALSE ALARM")
            ratio = float(np.median(ts)) / ref[bug]
            print(f"  {name:32s} {'bug' if bug else 'correct':9s} {spread(ts):26s} {ratio:7.2f}x  {verdict}")
            if bug and said:
                messages.append(f"  {layer}, {name}: {said}")
        print()
    print("What each says about the planted bug:")
    print("\n".join(messages))
    jobs = [("import-jax", "-"), ("import-torch", "-")]
    jobs += [(kind, layer) for layer in layers for kind in ("jgradcheck", "torch-slow", "torch-fast")]
    rss = peak_rss(jobs)
    print("\nPeak RSS, correct backward, one check in a fresh process (MiB):")
    print(f"  import only: jax + jgradcheck {rss['import-jax', '-']:.0f}, torch {rss['import-torch', '-']:.0f}")
    for layer in layers:
        print(
            f"  {layer}: jgradcheck {rss['jgradcheck', layer]:.0f}, torch slow {rss['torch-slow', layer]:.0f}, "
            f"torch fast {rss['torch-fast', layer]:.0f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main(sys.argv[1:] or ["dense"])
