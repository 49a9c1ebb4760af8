"""The pytest plugin and the assertions' tracebacks, seen from a pytest run (pytester)."""

from __future__ import annotations

import importlib.metadata
import pathlib

import pytest

from jgradcheck._src import pytest_plugin, registry

pytest_plugins = ["pytester"]

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = "jgradcheck._src.pytest_plugin"


def _installed() -> bool:
    """Whether this environment's jgradcheck metadata has the entry point (an install after it
    was added to pyproject.toml); if not, the runs below load the plugin with ``-p``."""
    eps = importlib.metadata.entry_points(group="pytest11")
    return any(ep.name == "jgradcheck" and ep.value == PLUGIN for ep in eps)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # filterwarnings=error as in this project: the plugin must not warn.
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    plugin = () if _installed() else ("-p", PLUGIN)
    return pytester.runpytest_inprocess(*plugin, "-p", "no:cacheprovider", *args)


_CHECKS = """
import jax.numpy as jnp
import pytest

import jgradcheck


def cost(p):
    return jnp.sum(jnp.sin(p["w"]) * p["b"])


def grad(p):
    return {"w": jnp.cos(p["w"]) * p["b"], "b": jnp.sin(p["w"])}


def buggy(p):
    return {"w": jnp.cos(p["w"]) * p["b"], "b": 2 * jnp.sin(p["w"])}  # db doubled


P = {"w": jnp.array([0.3, -0.7, 1.1]), "b": jnp.array([0.5, 2.0, -1.0])}


def test_passes():
    jgradcheck.assert_grad_correct(cost, grad, P)


def test_rules_is_one_check():
    # check_rules runs check_vjp, which runs check_grad: one check of yours, counted once.
    jgradcheck.assert_rules_correct(jnp.tanh, jnp.linspace(-1.0, 1.0, 3), modes=("rev",))


def test_inconclusive():
    sq = lambda p: jnp.sum(p["w"] ** 2)
    report = jgradcheck.check_grad(sq, lambda p: {"w": 2 * p["w"]}, {"w": jnp.ones(3)}, eps=1e-7, x64=False)
    assert report.inconclusive


def test_planted_bug():
    jgradcheck.assert_grad_correct(cost, buggy, P, custom_message="layer 1")
"""


def test_summary_line_counts_every_check_once(pytester):
    pytester.makepyfile(test_inner=_CHECKS)
    result = _run(pytester)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.re_match_lines(
        [
            r"jgradcheck: 4 checks: 2 passed, 1 failed, 1 inconclusive; slowest \d+\.\d\d s \(check_\w+ in test_inner.py::test_\w+\)"
        ]
    )
    assert len([line for line in result.outlines if line.startswith("jgradcheck: ")]) == 1


def test_failing_assertion_shows_no_library_source(pytester):
    """pytest shows the test's line and the compact message; none of jgradcheck's frames."""
    pytester.makepyfile(test_inner=_CHECKS)
    result = _run(pytester, "-k", "planted_bug", "--tb=long")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "jgradcheck/_src" not in out and "jgradcheck\\_src" not in out
    for name in ("_raise_unless_passed", "def assert_grad_correct", "__tracebackhide__", "run()", "wrapper("):
        assert name not in out, name
    assert '>       jgradcheck.assert_grad_correct(cost, buggy, P, custom_message="layer 1")' in out
    errors = [line[2:] for line in result.outlines if line.startswith("E ")]
    assert errors[0].strip() == "AssertionError: [jgradcheck] Assertion assert_grad_correct failed: layer 1"
    assert errors[1].strip().startswith("FAILED: your gradient disagrees with the numerical one in b")
    assert len(errors) <= 15
    assert all(len(line) <= 100 for line in errors[1:])  # the first carries "AssertionError: "


def test_plots_of_failing_checks_are_saved(pytester, tmp_path):
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_inner=_CHECKS)
    plots = tmp_path / "plots"
    result = _run(pytester, "--jgradcheck-plots", str(plots))
    result.assert_outcomes(passed=3, failed=1)
    saved = sorted(p.name for p in plots.iterdir())
    assert saved == ["test_inner.py_test_planted_bug-check_grad.png"]
    assert (plots / saved[0]).read_bytes()[:4] == b"\x89PNG"
    result.stdout.fnmatch_lines([f"jgradcheck: 4 checks: * 1 plot of failing checks in {plots}"])


def test_no_checks_no_line(pytester):
    pytester.makepyfile(test_inner="def test_nothing():\n    assert True\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    assert not [line for line in result.outlines if line.startswith("jgradcheck:")]


def test_an_inner_session_does_not_count_in_the_outer_one(pytester, request):
    outer = request.config.stash.get(pytest_plugin._KEY, None)
    before = None if outer is None else len(outer.records)
    pytester.makepyfile(test_inner=_CHECKS)
    _run(pytester, "-k", "passes")
    if outer is not None:
        assert len(outer.records) == before
    assert registry._LISTENERS[-1:] == ([] if outer is None else [outer])  # the inner one is gone


def test_the_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"jgradcheck": PLUGIN}
    for hook in ("pytest_addoption", "pytest_configure", "pytest_unconfigure"):
        assert callable(getattr(pytest_plugin, hook))


def test_summary_line_words():
    records = [
        pytest_plugin.CheckRecord("check_grad", "t.py::a", "passed", 0.5),
        pytest_plugin.CheckRecord("check_vjp", "t.py::b", "failed", 2.25),
    ]
    assert pytest_plugin.summary_line(records) == (
        "jgradcheck: 2 checks: 1 passed, 1 failed, 0 inconclusive; slowest 2.25 s (check_vjp in t.py::b)"
    )


def test_the_registry_hears_the_outermost_check_only():
    import jax.numpy as jnp

    import jgradcheck

    heard = []
    with registry.listening(lambda name, report, seconds: heard.append((name, report.status))):
        jgradcheck.check_vjp(jnp.sin, lambda x: (jnp.sin(x), lambda g: (jnp.cos(x) * g,)), jnp.ones(3))
        with registry.listening(lambda *a: heard.append("inner")):
            jgradcheck.check_grad(lambda x: jnp.sum(x**2), lambda x: 2 * x, jnp.ones(2))
    assert heard == [("check_vjp", "passed"), "inner"]


def test_a_listener_that_raises_does_not_change_the_check():
    import jax.numpy as jnp

    import jgradcheck

    def broken(*a):
        raise RuntimeError("a bug in a listener")

    with registry.listening(broken):
        report = jgradcheck.check_grad(lambda x: jnp.sum(x**2), lambda x: 2 * x, jnp.ones(2))
    assert report.passed
