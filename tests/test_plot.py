"""report.plot(): which leaves are wrong and how, at a glance; matplotlib stays optional."""

from __future__ import annotations

import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src.report import LeafValues

pytest.importorskip("matplotlib")


def _cost(p, x):
    return jnp.sum(jnp.tanh(x @ p["W"]) * p["v"]) + 0.5 * jnp.sum(p["W"] ** 2)


def _grad(p, x, factor=1.0):
    h = jnp.tanh(x @ p["W"])
    return {"W": factor * (x.T @ ((1 - h**2) * p["v"]) + p["W"]), "v": h.sum(0)}


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    p = {
        "W": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal(4), jnp.float32),
    }
    return p, x


@pytest.fixture(scope="module")
def passing(problem):
    return jgradcheck.check_grad(_cost, _grad, *problem)


@pytest.fixture(scope="module")
def doubled(problem):
    return jgradcheck.check_grad(_cost, lambda p, x: _grad(p, x, factor=2.0), *problem)


def _ticks(ax):
    return {t.get_text().split()[0]: t for t in ax.get_yticklabels()}


def test_passing_report(passing):
    from matplotlib.figure import Figure

    fig = passing.plot()
    assert isinstance(fig, Figure)
    top, scatter = fig.axes
    assert "PASSED" in fig.get_suptitle()
    assert top.get_xscale() == "log"
    assert set(_ticks(top)) == {"W", "v"}
    assert all(t.get_color() != "#c62828" for t in _ticks(top).values())
    assert "all leaves" in scatter.get_title()
    assert {"great (~1e-7)", "double-check (~1e-5)", "bug (>= 1e-3)"} <= {t.get_text() for t in top.texts}


def test_failing_leaf_is_marked(doubled):
    fig = doubled.plot()
    top, scatter, *_ = fig.axes
    assert "FAILED" in fig.get_suptitle() and "W" in fig.get_suptitle()
    ticks = _ticks(top)
    assert ticks["W"].get_color() == "#c62828" and ticks["W"].get_fontweight() == "bold"
    assert ticks["v"].get_color() != "#c62828"
    assert any(t.get_text().startswith("FAIL") for t in top.texts)
    assert scatter.get_title().startswith("W: yours vs numerical")
    assert scatter.get_xlabel().startswith("numerical") and scatter.get_ylabel() == "yours"


def _with_values(report, problem, factor):
    """The report with every entry's values, as a check that records them would give."""
    p, x = problem
    values = []
    for leaf in report.leaves:
        theta = np.asarray(p[leaf.path], np.float64).ravel()
        yours = np.asarray(_grad(p, x, factor)[leaf.path], np.float64).ravel()
        numerical = np.asarray(_grad(p, x)[leaf.path], np.float64).ravel()
        status = np.where(np.abs(yours - numerical) > 1e-6, "fail", "ok")
        values.append(LeafValues(np.arange(theta.size), yours, numerical, np.full(theta.size, 1e-6), theta, status))
    return dataclasses.replace(report, entry_values=tuple(values))


def test_every_entry_when_recorded_and_the_factor_line(doubled, problem):
    report = _with_values(doubled, problem, 2.0)
    assert report == doubled  # the recorded values are not part of equality
    fig = report.plot()
    _, scatter, residual = fig.axes
    labels = scatter.get_legend_handles_labels()[1]
    assert "fails (12)" in labels
    assert any("2 × numerical" in s for s in labels)
    assert residual.get_xlabel() == "parameter value θ"


def test_saves_png(doubled, tmp_path):
    path = tmp_path / "check.png"
    doubled.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_names_the_extra(passing, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "jgradcheck\[plot\]"'):
        passing.plot()


def test_pyplot_state_untouched(passing):
    before = sys.modules.get("matplotlib.pyplot")
    passing.plot()
    assert sys.modules.get("matplotlib.pyplot") is before
