"""A test suite of small checks: check_rules against jax.test_util.check_grads, op by op.

The cases are the op list of ``tests/test_oplist.py`` (in the spirit of JAX's
``tests/lax_autodiff_test.py``: each operation at small shapes, inside its domain, some to
order 2). Each case is checked by

* ``jgradcheck.check_rules(fn, *primals, order=..., modes=...)`` (integer inputs as they are; a
  case that does not pass is counted: JAX's rules are right, so there should be none), and
* ``jax.test_util.check_grads(f, floats, order=..., modes=...)`` with the integer inputs bound
  (it cannot take them), its default tolerances; a case it rejects is still timed and counted.

All in one process: first a cold pass (the first check of each op in the process, compilation
included; which of the two runs first alternates by case, as the first pays JAX's compiles of
the op's primitives and of its jitted functions, which the second reuses), then REPEATS warm passes, interleaved case by case, which of the two runs first
alternating by pass. Per case the median of the warm passes; the table gives the median and p90
over cases, the total, and the ratio check_rules / check_grads.

Run: python benchmarks/bench_suite.py [--dtype float32|float64] [--n N]  (about 3 minutes for the
float32 list on 2 shared cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
from test_oplist import CASES, _inputs  # noqa: E402

import jgradcheck  # noqa: E402

REPEATS = 3


def _grads_args(case, primals):
    """check_grads differentiates every argument: bind the integer ones."""
    floats = [k for k, p in enumerate(primals) if np.issubdtype(np.asarray(p).dtype, np.floating)]

    def f(*fl):
        full = list(primals)
        for k, x in zip(floats, fl):
            full[k] = x
        return case.fn(*full)

    return f, tuple(primals[k] for k in floats)


def _time(fn) -> tuple[float, bool]:
    start = time.perf_counter()
    try:
        ok = fn() is not False
    except Exception:  # noqa: BLE001 - timed all the same, counted as rejected
        ok = False
    return time.perf_counter() - start, ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--n", type=int, default=0, help="first N cases only (0: all)")
    a = ap.parse_args()
    cases = [c for c in CASES if a.dtype in c.dtypes]
    cases = cases[: a.n] if a.n else cases
    built = []
    for c in cases:
        primals = _inputs(c, a.dtype)
        g, fl = _grads_args(c, primals)

        def rules(c=c, p=primals) -> bool:
            return jgradcheck.check_rules(c.fn, *p, order=c.order, modes=c.modes).status == "passed"

        grads = lambda c=c, g=g, fl=fl: check_grads(g, fl, order=c.order, modes=c.modes)  # noqa: E731
        built.append((c.name, rules, grads))

    def one_pass(rules_first: bool | None) -> tuple[np.ndarray, np.ndarray, int, int]:
        tr, tg, bad_r, bad_g = [], [], 0, 0
        for k, (_, rules, grads) in enumerate(built):
            if rules_first or (rules_first is None and k % 2 == 0):
                (r, okr), (g, okg) = _time(rules), _time(grads)
            else:
                (g, okg), (r, okr) = _time(grads), _time(rules)
            tr.append(r)
            tg.append(g)
            bad_r += not okr
            bad_g += not okg
        return np.array(tr), np.array(tg), bad_r, bad_g

    cold_r, cold_g, bad_r, bad_g = one_pass(None)
    warm = [one_pass(bool(k % 2)) for k in range(REPEATS)]
    wr = np.median(np.stack([w[0] for w in warm]), axis=0)
    wg = np.median(np.stack([w[1] for w in warm]), axis=0)
    spread_r = [float(w[0].sum()) for w in warm]
    spread_g = [float(w[1].sum()) for w in warm]

    print(f"# bench_suite: {len(built)} cases of tests/test_oplist.py in {a.dtype}")
    print(
        f"# jax {jax.__version__}, jgradcheck {jgradcheck.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"# check_rules did not pass {bad_r} case(s), check_grads rejected {bad_g} (cold pass)")
    print()
    print("| pass | check_rules median | p90 | total | check_grads median | p90 | total | ratio median | ratio total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, g in (("cold", cold_r, cold_g), ("warm", wr, wg)):
        print(
            f"| {name} | {np.median(r):.3f} s | {np.percentile(r, 90):.3f} s | {r.sum():.2f} s | "
            f"{np.median(g):.3f} s | {np.percentile(g, 90):.3f} s | {g.sum():.2f} s | "
            f"{np.median(r) / np.median(g):.1f}x | {r.sum() / g.sum():.1f}x |"
        )
    print()
    print(
        f"warm totals per pass: check_rules {', '.join(f'{s:.1f}' for s in spread_r)} s; "
        f"check_grads {', '.join(f'{s:.1f}' for s in spread_g)} s"
    )
    print()
    print("| case | cold rules | cold grads | warm rules | warm grads |")
    print("|---|---|---|---|---|")
    for (name, _, _), cr, cg, r, g in zip(built, cold_r, cold_g, wr, wg):
        print(f"| {name} | {cr:.3f} | {cg:.3f} | {r:.3f} | {g:.3f} |")


if __name__ == "__main__":
    main()
