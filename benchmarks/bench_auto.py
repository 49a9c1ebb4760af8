"""``mode="auto"`` on ~400k-parameter MLPs: the default check's time, what it did, and how well
the time budget's projection matches a full check.

Models (float64, the cost of ``bench_core.py``: ReLU layers, a logistic output, L2):

* ``wide``: 256-512-512-1, m = 128 (394,753 parameters). A changed first-layer weight changes a
  whole row of the 512x512 layer's input, so every perturbation costs about a forward pass: a
  full check takes many minutes on a CPU.
* ``wider``: 256-768-384-1, m = 256 (492,673 parameters): the same, twice the examples.
* ``narrow``: 1024-384-16-1, m = 64 (399,777 parameters). Most entries are in the first layer
  and their changes stay one hidden unit wide until the 16-unit layer: a full check is seconds.

For each, in one process: ``check_grad(cost, grad, params, x, y)`` with default options (``mode="auto"``,
``time_budget=60``), cold and again (compiled programs reused), with the correct gradient, a single doubled entry of ``W2`` and
``W1`` 1% off: time, verdict, the report's mode line, the worst entry, whether it said on stderr
that it screens. With ``--full``, the time of ``mode="full"`` on the correct gradient too (what
the budget saved, or would have cost).

Usage: python benchmarks/bench_auto.py [--models wider,wide,narrow] [--full]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import cost, machine_line, make_problem  # noqa: E402

import jgradcheck  # noqa: E402

exact = jax.grad(cost)


def doubled(p, x, y):
    g = exact(p, x, y)
    return {**g, "W2": g["W2"].at[7, 33].multiply(2.0)}


def off(p, x, y):
    g = exact(p, x, y)
    return {**g, "W1": g["W1"] * 1.01}


MODELS = {
    "wider": ([256, 768, 384, 1], 256),
    "wide": ([256, 512, 512, 1], 128),
    "narrow": ([1024, 384, 16, 1], 64),
}


def timed(fn, *args, **kw):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        t = time.perf_counter()
        report = fn(*args, **kw)
        dt = time.perf_counter() - t
    return report, dt, err.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="wider,wide,narrow")
    ap.add_argument("--full", action="store_true")
    a = ap.parse_args()
    print(machine_line())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    rows = []
    for name in a.models.split(","):
        dims, m = MODELS[name]
        with jax.enable_x64(True):
            params, x, y = make_problem(dims, m)
        n = sum(int(p.size) for p in jax.tree.leaves(params))
        for label, grad in (
            ("correct, cold", exact),
            ("correct, again", exact),
            ("W2[7, 33] doubled", doubled),
            ("W1 1% off", off),
        ):
            report, dt, err = timed(jgradcheck.check_grad, cost, grad, params, x, y)
            worst = next((e.name for e in report.worst if e.status == "fail"), "-")
            failed = ",".join(leaf.path for leaf in report.failed_leaves) or "-"
            rows.append((name, n, label, dt, report.status, failed, worst, report.mode, "screening instead" in err))
            print(f"{name} ({n:,}) {label}: {dt:.1f} s, {report.status}, failed leaves {failed}, worst {worst}")
            print(f"    mode: {report.mode}")
            for line in err.strip().splitlines():
                print(f"    stderr: {line}")
        if a.full:
            _, full_s, _ = timed(jgradcheck.check_grad, cost, exact, params, x, y, mode="full", progress=False)
            print(f"{name}: mode='full' took {full_s:.1f} s")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print()
    print("| model | n | gradient | time (s) | status | failed leaves | worst entry | said on stderr it screens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, label, dt, status, failed, worst, _, noticed in rows:
        print(f"| {name} | {n:,} | {label} | {dt:.1f} | {status} | {failed} | {worst} | {'yes' if noticed else 'no'} |")


if __name__ == "__main__":
    main()
