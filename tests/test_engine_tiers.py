"""The engine's compilation tiers: quick programs that move to optimized ones by the clock, and
the CPU's lean programs (no fusion emitters) for costs without loops.

A group estimated cheap starts on its quick program (XLA opt level 0); its second block is timed,
and when the quick evaluations left would cost more than compiling the optimized program, the
call is evaluated again there, whole, and later calls start there. The timing rule runs on a
simulated machine here (``_Machine``: the engine's clock reads simulated seconds that each
program call advances by its compile and block time), so the decisions cannot flake; every
check must still pass a correct gradient and fail a planted bug at its entry.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import compat, engine

_QUICK = (
    "_group_delta_block_quick",
    "_group_block_quick",
    "_group_delta_block_quick_fused",
    "_group_block_quick_fused",
)
_OPTIMIZED = ("_group_delta_block", "_group_block", "_group_delta_block_fused", "_group_block_fused")


def _cost(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 3)


def _grad(p, x):
    z = x @ p["w"]
    return {"w": x.T @ (2 * jnp.tanh(z) * (1 - jnp.tanh(z) ** 2)) + 0.3 * p["w"] ** 2}


_R = np.random.default_rng(3)
_P = {"w": jnp.asarray(_R.standard_normal((4, 6)) * 0.5)}
_X = jnp.asarray(_R.standard_normal((5, 4)))


class _Machine:
    """Simulated seconds for the engine's clock: the first call of each program costs
    ``compile_s`` more, every call of a quick program ``quick_s``, of an optimized one 1 ms.
    With ``quick_offset``, the quick programs' values are moved by it: any of them reaching a
    check's result would make a correct gradient fail."""

    def __init__(self, monkeypatch, compile_s: float, quick_s: float, quick_offset: float = 0.0):
        self.now = 0.0
        self.calls = {"quick": 0, "optimized": 0}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        monkeypatch.setattr(engine, "_clock", lambda: self.now)
        for name in _QUICK + _OPTIMIZED:
            monkeypatch.setattr(engine, name, self._wrap(name, getattr(engine, name), compile_s, quick_s, quick_offset))

    def _wrap(self, name, block, compile_s, quick_s, offset):
        quick = name in _QUICK

        def call(*args):
            with self._lock:
                self.now += (compile_s if name not in self._seen else 0.0) + (quick_s if quick else 1e-3)
                self._seen.add(name)
                self.calls["quick" if quick else "optimized"] += 1
            out = block(*args)
            return out + offset if quick else out

        return call


@pytest.fixture
def tiered(monkeypatch):
    """Every group starts on its quick program, in blocks of one chunk of 4 perturbations (a
    call of 48 has 12 blocks); no loop strategy, no timing race (it reads the clock too)."""
    monkeypatch.setattr(engine, "QUICK_SECONDS", float("inf"))
    monkeypatch.setattr(engine, "LOOP_SECONDS", 0.0)
    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)
    monkeypatch.setattr(engine, "TIER_UP", True)
    monkeypatch.setattr(engine, "_TIERED_UP", {})
    monkeypatch.setattr(engine, "_QUICK_FIRST", {})
    monkeypatch.setattr(engine, "_QUICK_SPENT", {})
    jax.clear_caches()


def _check(grad=_grad, **kw):
    with jax.enable_x64(True):
        return jgradcheck.check_grad(_cost, grad, _P, _X, mode="full", chunk_size=4, progress=False, **kw)


def test_the_rule_weighs_the_quick_time_left_against_compiling_the_optimized_program():
    # Quick: compiled in 1.0 s (its first block of 100 took 1.1 s at 1 ms each).
    # 5,000 evaluations left take 5 s; half saved (2.5 s) > 2 x 1.0 s of compiling: move.
    assert engine._tier_up(per_eval=1e-3, first_block=1.1, block_evals=100, left=5_000)
    # 3,000 left: 1.5 s saved < 2 s of compiling: stay.
    assert not engine._tier_up(per_eval=1e-3, first_block=1.1, block_evals=100, left=3_000)
    # A first block no slower than the others: compiling was free, any time left pays.
    assert engine._tier_up(per_eval=1e-3, first_block=0.05, block_evals=100, left=1)
    assert not engine._tier_up(per_eval=1e-3, first_block=1.1, block_evals=100, left=0)
    # 3,000 left, and 1.5 s of quick running in earlier calls: (3 + 1.5) / 2 s saved > 2 s: move.
    assert engine._tier_up(per_eval=1e-3, first_block=1.1, block_evals=100, left=3_000, spent=1.5)


def test_a_slow_quick_program_moves_to_the_optimized_one_and_none_of_its_values_count(tiered, monkeypatch):
    machine = _Machine(monkeypatch, compile_s=0.01, quick_s=1.0, quick_offset=1.0)
    report = _check()
    assert report.passed, report  # no quick value (all moved by 1.0) reached the verdict
    assert machine.calls["quick"] == 2  # the compiling block and the timed one
    assert machine.calls["optimized"] >= 1
    assert len(engine._TIERED_UP) == 1
    # Later calls of the group (here a warm check) start on the optimized program.
    machine.calls.update(quick=0, optimized=0)
    assert _check().passed
    assert machine.calls == {"quick": 0, "optimized": machine.calls["optimized"]} and machine.calls["optimized"] >= 1


def test_a_move_evaluates_the_whole_call_again_on_the_optimized_program(tiered, monkeypatch):
    # numerical_grad returns the differences as evaluated (a check's second looks could hide a
    # wrong value): none may come from the quick program's blocks before the move.
    with jax.enable_x64(True):
        monkeypatch.setattr(engine, "QUICK_SECONDS", 0.0)
        want = jgradcheck.numerical_grad(_cost, _P, _X, chunk_size=4)["w"]
        monkeypatch.setattr(engine, "QUICK_SECONDS", float("inf"))
        machine = _Machine(monkeypatch, compile_s=0.01, quick_s=1.0, quick_offset=1.0)
        got = jgradcheck.numerical_grad(_cost, _P, _X, chunk_size=4)["w"]
    assert machine.calls["quick"] == 2 and machine.calls["optimized"] >= 1
    np.testing.assert_array_equal(got, want)


def test_a_planted_bug_is_found_at_its_entry_after_a_move(tiered, monkeypatch):
    machine = _Machine(monkeypatch, compile_s=0.01, quick_s=1.0, quick_offset=1.0)

    def wrong(p, x):
        g = _grad(p, x)
        return {"w": g["w"].at[2, 3].multiply(1.02)}

    report = _check(grad=wrong)
    assert machine.calls["optimized"] >= 1 and len(engine._TIERED_UP) == 1
    assert not report.passed
    assert report.worst[0].name == "w[2, 3]"
    assert report.leaf("w").n_failed == 1


def test_a_quick_program_whose_compilation_outweighs_its_run_stays(tiered, monkeypatch):
    machine = _Machine(monkeypatch, compile_s=10.0, quick_s=1e-3)
    assert _check().passed
    assert machine.calls["quick"] >= 12 and machine.calls["optimized"] == 0
    assert engine._TIERED_UP == {}
    # Warm, its first block compiles nothing: the compilation weighed is the one measured then.
    assert _check().passed
    assert machine.calls["optimized"] == 0 and engine._TIERED_UP == {}


def test_a_group_checked_again_moves_once_its_quick_time_adds_up(tiered, monkeypatch):
    # Compiled in 1 s, 0.12 s per block of 4: the first call's 24 blocks left (2.9 s, 1.4 s
    # saved) do not pay for 2 s of compiling; with that call's 3.1 s of quick running counted,
    # the second check's do.
    machine = _Machine(monkeypatch, compile_s=1.0, quick_s=0.12)
    assert _check().passed
    assert machine.calls["optimized"] == 0 and engine._TIERED_UP == {}
    assert _check().passed
    assert machine.calls["optimized"] >= 1 and len(engine._TIERED_UP) == 1


def test_without_tiers_a_quick_group_stays_quick(tiered, monkeypatch):
    monkeypatch.setattr(engine, "TIER_UP", False)
    machine = _Machine(monkeypatch, compile_s=0.01, quick_s=1.0)
    assert _check().passed
    assert machine.calls["optimized"] == 0 and engine._TIERED_UP == {}


def _scan_cost(p, x):
    def step(h, xt):
        h = jnp.tanh(h @ p["w"][:, :4] + xt)
        return h, jnp.sum(h)

    _, ys = jax.lax.scan(step, jnp.zeros(4, x.dtype), x)
    return jnp.sum(ys**2)


def test_loops_are_found_in_nested_jaxprs():
    def traced(f):
        with jax.enable_x64(True):
            return jax.make_jaxpr(f)(_P, _X).jaxpr

    assert not engine._has_loop(traced(_cost))
    assert engine._has_loop(traced(_scan_cost))
    assert engine._has_loop(traced(jax.jit(lambda p, x: _scan_cost(p, x) + 1.0)))  # inside a pjit
    in_cond = lambda p, x: jax.lax.cond(jnp.sum(x) > 0, _scan_cost, lambda p, x: jnp.sum(x * x), p, x)  # noqa: E731
    assert engine._has_loop(traced(in_cond))


@pytest.mark.parametrize("cost, programs", [(_cost, "lean"), (_scan_cost, "fused")])
def test_a_cpu_program_is_lean_unless_the_cost_loops(cost, programs, monkeypatch):
    monkeypatch.setattr(engine, "QUICK_SECONDS", 0.0)
    monkeypatch.setattr(engine, "LOOP_SECONDS", 0.0)
    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)
    used: set[str] = set()
    for name in _OPTIMIZED:
        block = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _b=block, _n=name: used.add(_n) or _b(*a))
    with jax.enable_x64(True):
        jgradcheck.numerical_grad(cost, _P, _X)
    lean = programs == "lean" and compat.lean_compile_ok()  # jaxlib 0.12's XLA has no lean option
    assert used == ({"_group_delta_block"} if lean else {"_group_delta_block_fused"})


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize("strategy", ["delta", "vmap"])
def test_lean_and_fused_programs_give_the_same_derivatives(strategy, x64, monkeypatch):
    monkeypatch.setattr(engine, "QUICK_SECONDS", 0.0)
    monkeypatch.setattr(engine, "LOOP_SECONDS", 0.0)
    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)
    eps = 2.0**-8
    got = {}
    for lean in (True, False):
        monkeypatch.setattr(engine, "LEAN", lean)
        got[lean] = jgradcheck.numerical_grad(_cost, _P, _X, strategy=strategy, x64=x64, eps=eps, float64=True)["w"]
    # Four ulps of J at each of the two points of a central difference, over its step 2h: the
    # two compilations may order the same float operations differently, no more.
    dtype = np.float64 if x64 else np.float32
    with jax.enable_x64(x64):
        j0 = abs(float(_cost(jax.tree.map(lambda v: jnp.asarray(v, dtype), _P), jnp.asarray(_X, dtype))))
    tol = 4 * 2 * float(np.spacing(dtype(2 * j0))) / (2 * eps)
    np.testing.assert_allclose(got[True], got[False], rtol=0, atol=tol)
    assert tol < 1e-3 * float(np.max(np.abs(got[False])))
