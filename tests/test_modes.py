"""Modes for large models (at small sizes): sample, screen, auto; devices; the progress bar."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck

_N_BIG = 20_000
_RNG = np.random.default_rng(0)
_C = jnp.asarray(_RNG.standard_normal(_N_BIG), jnp.float32)
_PARAMS = {
    "big": jnp.asarray(_RNG.standard_normal(_N_BIG) * 0.5, jnp.float32),
    "small": jnp.array([0.5, -1.0, 2.0]),
}
_PLANTED = 12_345


def _cost(p, c):
    return jnp.sum(jnp.sin(p["big"]) * c) + jnp.sum(p["small"] ** 3)


def _grad(p, c):
    return {"big": jnp.cos(p["big"]) * c, "small": 3 * p["small"] ** 2}


def _one_entry_doubled(p, c):
    g = _grad(p, c)
    return {**g, "big": g["big"].at[_PLANTED].multiply(2.0)}


def _small_one_percent_off(p, c):
    g = _grad(p, c)
    return {**g, "small": g["small"] * 1.01}


def test_sample_mode_checks_a_sample_of_big_leaves_and_small_leaves_whole():
    report = jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, mode="sample", sample_size=16)
    assert report.passed
    assert report.mode == "sample"
    big, small = report.leaf("big"), report.leaf("small")
    assert (big.how, big.checked) == ("sampled", 16)
    assert (small.how, small.checked) == ("entries", 3)
    assert "16/20000" in str(report)


def test_sample_mode_catches_a_leaf_that_is_wrong_everywhere():
    wrong = lambda p, c: {**_grad(p, c), "big": -_grad(p, c)["big"]}  # noqa: E731
    report = jgradcheck.check_grad(_cost, wrong, _PARAMS, _C, mode="sample", sample_size=16)
    assert [leaf.path for leaf in report.failed_leaves] == ["big"]
    assert report.leaf("big").n_failed == 16
    assert "sign flipped" in report.leaf("big").diagnosis


@pytest.fixture(scope="module")
def screened():
    return jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, mode="screen")


def test_screen_mode_passes_a_correct_gradient(screened):
    assert screened.passed
    assert screened.mode == "screen"
    for leaf in screened.leaves:
        assert leaf.how == "screened"
        assert leaf.checked == 4  # screen_directions
        assert leaf.difference < 1e-6
    assert "4 dirs" in str(screened)
    # Far fewer evaluations than the 2 × 20003 of a full check.
    assert screened.evaluations < 1000


def test_screen_mode_fails_a_one_percent_off_leaf():
    report = jgradcheck.check_grad(_cost, _small_one_percent_off, _PARAMS, _C, mode="screen")
    assert not report.passed
    assert [leaf.path for leaf in report.failed_leaves] == ["small"]
    assert report.worst[0].path == "small"
    assert report.leaf("big").how == "screened"
    assert "1.01 × numerical" in report.leaf("small").diagnosis


def test_screen_mode_finds_a_single_wrong_entry_in_a_big_leaf():
    report = jgradcheck.check_grad(_cost, _one_entry_doubled, _PARAMS, _C, mode="screen")
    assert not report.passed
    assert [leaf.path for leaf in report.failed_leaves] == ["big"]
    worst = report.worst[0]
    assert (worst.path, worst.index, worst.status) == ("big", (_PLANTED,), "fail")
    assert worst.yours == pytest.approx(2 * worst.numerical, rel=1e-6)
    assert report.leaf("big").n_failed == 1
    assert report.leaf("big").how == "sampled"  # located, not all 20000 entries checked
    assert report.leaf("big").checked < _N_BIG
    assert report.evaluations < 2 * _N_BIG


def test_auto_mode_screens_above_full_max_size():
    report = jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, full_max_size=100)
    assert report.passed
    assert report.mode.startswith("screen") and "auto" in report.mode
    assert all(leaf.how == "screened" for leaf in report.leaves)
    small = {"w": jnp.arange(3.0)}
    report = jgradcheck.check_grad(lambda p: jnp.sum(p["w"] ** 2), lambda p: {"w": 2 * p["w"]}, small)
    assert report.mode.startswith("full") and "auto" in report.mode


def test_screen_directions_depend_on_the_leaf_path_only(screened):
    def cost3(p, c):
        return _cost({"big": p["big"], "small": p["small"]}, c) + jnp.sum(p["aaa"] ** 2)

    def grad3(p, c):
        return {**_grad({"big": p["big"], "small": p["small"]}, c), "aaa": 2 * p["aaa"]}

    params3 = {**_PARAMS, "aaa": jnp.ones(5)}  # sorts first: shifts the other leaves' positions
    report = jgradcheck.check_grad(cost3, grad3, params3, _C, mode="screen")
    assert [leaf.path for leaf in report.leaves] == ["aaa", "big", "small"]
    for path in ("big", "small"):
        assert report.leaf(path).difference == screened.leaf(path).difference
    # A different seed gives different directions.
    other = jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, mode="screen", seed=1)
    assert other.leaf("big").difference != screened.leaf("big").difference


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jgradcheck

    def cost(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2) + jnp.sum(p["b"] ** 3)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    p = {"w": jnp.asarray(rng.standard_normal((7, 3)), jnp.float32), "b": jnp.arange(1.0, 4.0)}
    devs = jax.devices()
    report = jgradcheck.check_grad(cost, jax.grad(cost), p, x, devices=devs)
    g4 = jgradcheck.numerical_grad(cost, p, x, devices=devs)
    g1 = jgradcheck.numerical_grad(cost, p, x, devices=devs[:1])
    # A unit-test-sized check on one device calls J per perturbation with host arrays only:
    # those calls must run on the device asked for, not the default one.
    from jgradcheck._src import engine
    seen = set()
    def spying(one):
        def spy(*a):
            out = one(*a)
            seen.update(f"{d.platform}:{d.id}" for d in out.devices())
            return out
        return spy
    engine._one_cost = spying(engine._one_cost)
    engine._one_cost_fused = spying(engine._one_cost_fused)  # where XLA has no lean compile
    jgradcheck.numerical_grad(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2), {"w": jnp.arange(4.0)}, devices=devs[2:3])
    print(json.dumps({
        "loop_on": sorted(seen),
        "n": len(devs),
        "devices": list(report.devices),
        "passed": report.passed,
        "g4": {k: np.asarray(v).tolist() for k, v in g4.items()},
        "g1": {k: np.asarray(v).tolist() for k, v in g1.items()},
    }))
    """
)


def test_several_devices_give_the_same_numerical_gradient():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 4
    assert result["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert result["passed"]
    assert result["loop_on"] == ["cpu:2"]
    for k in ("w", "b"):
        np.testing.assert_allclose(result["g4"][k], result["g1"][k], rtol=1e-12, atol=0)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar(capsys, progress):
    params = {"w": jnp.linspace(-1.0, 1.0, 40)}
    cost = lambda p: jnp.sum(jnp.sin(p["w"]))  # noqa: E731
    report = jgradcheck.check_grad(cost, lambda p: {"w": jnp.cos(p["w"])}, params, progress=progress)
    assert report.passed
    err = capsys.readouterr().err
    if progress:  # stderr is not a terminal under pytest: plain lines, no carriage returns
        assert "jgradcheck" in err and "evals" in err and "\r" not in err
    else:
        assert err == ""
    jgradcheck.numerical_grad(cost, params, progress=progress)
    err = capsys.readouterr().err
    assert ("evals" in err) == progress
    if not progress:
        assert err == ""


# --- mode="auto" by time -----------------------------------------------------------------------------


@pytest.fixture
def overrun(monkeypatch):
    """Every full check under a budget is projected at 1234 s once its first block is in (the rule
    itself is tested on a clock below; here, what a check does with its verdict)."""
    from jgradcheck._src.schedule import Budget

    def over(self):
        if not self._first:
            return False
        self.projected, self.done, self.elapsed = 1234.0, sum(self._count.values()), 1.0
        return True

    monkeypatch.setattr(Budget, "over", over)


def _over_budget(capsys, grad, **options):
    """check_grad in auto mode, in blocks of 512 evaluations, projected over its budget."""
    report = jgradcheck.check_grad(_cost, grad, _PARAMS, _C, chunk_size=512, **options)
    return report, capsys.readouterr().err


def test_auto_mode_screens_when_the_full_check_is_projected_over_its_time_budget(capsys, overrun):
    report, err = _over_budget(capsys, _grad)
    assert report.passed, str(report)
    assert report.mode.startswith("screen (auto: a full check of 20,003 entries was projected over time_budget 60 s")
    assert re.search(r"after [\d,]+ of 40,006 evaluations; mode='full' checks every entry\)$", report.mode)
    assert report.leaf("big").how == "screened"
    # The abandoned full check's strategies are not reported as how the entries were evaluated.
    assert report.evaluated == "", report.evaluated
    assert "screening instead" in err and "Pass mode='full' to check every entry" in err
    assert err.count("\n") == 1  # the notice alone: a short check shows no progress


def test_a_check_that_screens_for_time_still_names_a_single_wrong_entry(capsys, overrun):
    report, _ = _over_budget(capsys, _one_entry_doubled)
    assert report.status == "failed" and report.mode.startswith("screen")
    assert [leaf.path for leaf in report.failed_leaves] == ["big"]
    assert report.worst[0].name == f"big[{_PLANTED}]"
    assert report.evaluated.endswith(": big"), report.evaluated  # the search of the failing leaf alone


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_group_finished_before_the_switch_is_not_reported_as_how_screened_entries_ran(monkeypatch, capsys, seed):
    """``small`` (one group) finishes its full check; then ``big`` is projected over the budget.
    The report screens every leaf: it must not say how the abandoned check evaluated entries
    (nor the probe the screening runs first, which goes through the same engine)."""
    from jgradcheck._src.schedule import Budget

    def over(self):
        small = [g for g in self._planned if self._planned[g] < 100]
        if not self._first or not all(self._count[g] >= self._planned[g] for g in small):
            return False
        time.sleep(0.2)  # small's thread records how it ran just after its last tick
        self.projected, self.done, self.elapsed = 1234.0, sum(self._count.values()), 1.0
        return True

    monkeypatch.setattr(Budget, "over", over)
    report, _ = _over_budget(capsys, _grad, seed=seed)
    assert report.passed and report.mode.startswith("screen") and report.leaf("small").how == "screened"
    assert report.evaluated == "", report.evaluated


def test_the_switch_is_silent_with_progress_false(capsys, overrun):
    report, err = _over_budget(capsys, _grad, progress=False)
    assert report.mode.startswith("screen") and err == ""


@pytest.mark.parametrize("options", [{"mode": "full"}, {"time_budget": None}], ids=["mode=full", "no budget"])
def test_full_mode_or_no_budget_never_screens_for_time(capsys, overrun, options):
    budget = options.pop("time_budget", 60.0)
    report = jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, time_budget=budget, chunk_size=512, **options)
    assert report.mode.startswith("full") and report.leaf("big").checked == _N_BIG
    assert "screening instead" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -1.0, "60", True, float("nan")])
def test_a_bad_time_budget_says_what_it_is(bad):
    with pytest.raises(ValueError, match="time_budget must be a positive number of seconds, or None"):
        jgradcheck.check_grad(_cost, _grad, _PARAMS, _C, time_budget=bad)


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_each_group_is_projected_at_its_own_rate_and_unmeasured_ones_count_for_nothing(monkeypatch):
    from jgradcheck._src.schedule import Budget

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    cheap, dear, later = (0,), (1,), (2,)  # e.g. a second layer's weights, a first layer's, a bias
    budget = Budget(60.0, started=clock.t)
    budget.plan({cheap: 2000, dear: 2000, later: 500}, lanes=2)
    clock.t += 2.0  # both first blocks, compiling side by side
    budget.record(cheap, 100)
    budget.record(dear, 10)
    clock.t += 1.0
    budget.record(cheap, 900)  # measured 1 s per 900
    assert not budget.over()  # 3 s of a 60 s budget: too early to judge
    clock.t += 7.0
    assert not budget.over()  # 10 s in, only the cheap group measured: 1 s left, whatever the others cost
    clock.t += 1.0
    budget.record(dear, 1)  # measured 9 s each: 90x slower per evaluation than the cheap group
    assert budget.over()
    # Left: cheap 1,000 x 1/900 s; dear 1,989 x 9 = 17,901 s; later not measured. Over 2 lanes.
    assert budget.projected == pytest.approx(11.0 + (1000 / 900 + 1989 * 9.0) / 2) and budget.done == 1011
    assert budget.elapsed == pytest.approx(11.0) and budget.planned == 4500


def test_the_time_left_is_the_work_over_the_lanes(monkeypatch):
    from jgradcheck._src.schedule import Budget

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    groups = [(i,) for i in range(4)]
    budget = Budget(60.0, started=clock.t)
    budget.plan(dict.fromkeys(groups, 1000), lanes=2)
    clock.t += 10.0
    for g in groups:
        budget.record(g, 100)
    clock.t += 1.0
    for g in groups:
        budget.record(g, 100)  # 0.01 s each: 4 x 800 left, 8 s per group, 32 s over 2 lanes: 16 s
    assert not budget.over() and budget.projected is None  # 11 + 16 = 27 s
    clock.t += 5.0
    for g in groups:
        budget.record(g, 10)  # now 6 s per 110: 4 x 790 left at 0.0545 s, 172 s over 2 lanes
    assert budget.over() and budget.projected == pytest.approx(16.0 + 4 * 790 * (6.0 / 110) / 2)


def test_the_budget_lets_a_check_finish_once_less_time_is_left_than_spent(monkeypatch):
    from jgradcheck._src.schedule import Budget

    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    group = (0,)
    budget = Budget(60.0, started=clock.t)
    budget.plan({group: 1000}, lanes=1)
    clock.t += 5.0
    budget.record(group, 100)
    clock.t += 40.0
    budget.record(group, 500)  # 45 s spent, 400 left at 0.08 s each: 32 s more, 77 s in all
    assert not budget.over() and budget.projected is None
    fresh = Budget(60.0, started=clock.t - 45.0)
    fresh.plan({group: 1000}, lanes=1)
    clock.t += 1.0
    fresh.record(group, 100)
    clock.t += 12.0
    fresh.record(group, 100)  # 58 s spent, 800 left at 0.12 s each: 96 s more
    assert fresh.over() and fresh.projected == pytest.approx(58.0 + 96.0)


def test_ticks_of_work_outside_the_plan_are_not_counted(monkeypatch):
    from jgradcheck._src.schedule import Budget

    budget = Budget(60.0, started=0.0)
    budget.plan({(0,): 10}, lanes=1)
    budget.record(None, 5)
    budget.record((7,), 5)
    assert not budget._first and not budget.over()


# --- screening a leaf whose gradient is exactly 0 -----------------------------------------------------


def _attention_problem(seed, dtype):
    rng = np.random.default_rng(seed)
    d, t = 8, 6
    x = jnp.asarray(rng.standard_normal((2, t, d)), dtype)
    params = {
        "wq": jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), dtype),
        "wk": jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), dtype),
        "bk": jnp.asarray(rng.standard_normal(d) * 0.1, dtype),  # softmax ignores it: its gradient is 0
        "wv": jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), dtype),
    }

    def cost(p, x):
        q, k, v = x @ p["wq"], x @ p["wk"] + p["bk"], x @ p["wv"]
        a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(d), axis=-1)
        return jnp.mean((a @ v) ** 2)

    return cost, params, x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screening_a_leaf_of_gradient_zero_judges_it_against_the_other_leaves(seed, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        cost, params, x = _attention_problem(seed, dtype)
        report = jgradcheck.check_grad(cost, jax.grad(cost), params, x, mode="screen")
    assert report.passed, str(report)
    bk = report.leaf("bk")
    assert bk.how == "screened" and bk.zero and "judged against the scale of the other leaves" in bk.note


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_one_percent_gradient_where_zero_is_due_fails_when_screened(seed):
    cost, params, x = _attention_problem(seed, jnp.float32)
    exact = jax.grad(cost)(params, x)
    scale = float(jnp.sqrt(jnp.mean(exact["wq"] ** 2)))
    signs = jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], 8), jnp.float32)

    def planted(p, x):
        g = jax.grad(cost)(p, x)
        return {**g, "bk": g["bk"] + 0.01 * scale * signs}

    report = jgradcheck.check_grad(cost, planted, params, x, mode="screen")
    assert report.status == "failed" and [leaf.path for leaf in report.failed_leaves] == ["bk"], str(report)
