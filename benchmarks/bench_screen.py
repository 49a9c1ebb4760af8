"""Screen mode on a 3.7M-parameter network: time to pass a correct gradient and to catch bugs.

The issue's target: 2048-1024-1024-512-1 (3,673,089 parameters), 32 examples, float64, cold
(each check in a fresh process would include compilation; here each scenario is the first
check of its gradient function, so tracing and compiling the user's gradient are included,
while the cost's engine programs compile once in the first scenario, reported separately).
Scenarios: a correct gradient; one leaf 1% off (W2); a single doubled entry in W2 (1,048,576
entries). Each must finish in under 30 s, pass/fail correctly, and rank the right leaf first.

Usage: python benchmarks/bench_screen.py [--dims 2048,1024,1024,512,1] [--m 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import cost, machine_line, make_problem  # noqa: E402

import jgradcheck  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="2048,1024,1024,512,1")
    ap.add_argument("--m", type=int, default=32)
    args = ap.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    with jax.enable_x64(True):
        params, x, y = make_problem(dims, args.m)
        n = sum(int(p.size) for p in jax.tree.leaves(params))
        print(f"network {dims}, m = {args.m}, n = {n:,}, float64")
        print(machine_line())
        exact = jax.grad(cost)

        def one_percent(p, *a):
            g = exact(p, *a)
            return {**g, "W2": g["W2"] * 1.01}

        def doubled_entry(p, *a):
            g = exact(p, *a)
            return {**g, "W2": g["W2"].at[517, 33].multiply(2.0)}

        rows = []
        for name, fn, want_pass in [
            ("correct gradient", exact, True),
            ("W2 1% off", one_percent, False),
            ("W2[517, 33] doubled", doubled_entry, False),
        ]:
            t = time.perf_counter()
            r = jgradcheck.check_grad(cost, fn, params, x, y, mode="screen")
            dt = time.perf_counter() - t
            top = r.worst[0].name if (r.worst and not r.passed) else "-"
            ok = r.passed == want_pass and (want_pass or r.worst[0].path == "W2")
            rows.append((name, dt, r.evaluations, r.passed, top, ok))
            print(r, "\n")
    print("| scenario | time (s) | cost evaluations | passed | worst entry | as expected | under 30 s |")
    print("|---|---|---|---|---|---|---|")
    for name, dt, ev, passed, top, ok in rows:
        print(f"| {name} | {dt:.1f} | {ev:,} | {passed} | {top} | {ok} | {dt < 30} |")


if __name__ == "__main__":
    main()
