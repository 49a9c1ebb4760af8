"""A cost that changes at run time is refused with the run-time message, on every engine path.

``probe.noise_from`` compares J(θ) evaluated twice in the first call of a group's program (or of
the line program in screen mode); a cost whose program is the same at every trace but whose
value is not (a host callback reading a counter, NumPy's global random state, the time) is only
seen there. ``MSG_NONDETERMINISTIC_TRACE`` (a program that changes between traces) is tested in
``test_core.py`` and ``test_never_blind.py``; this is the other one.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import engine
from jgradcheck._src.problem import MSG_NONDETERMINISTIC, MSG_NONDETERMINISTIC_TRACE

_COUNTER = itertools.count()


def _counter(a):
    """A host function whose value changes at every call (the same function at every trace)."""
    return np.asarray(float(next(_COUNTER)), a.dtype)


def _constant(a):
    return np.asarray(0.5, a.dtype)


def _cost_with(host):
    def cost(w):
        extra = jax.pure_callback(host, jax.ShapeDtypeStruct((), w.dtype), w[0], vmap_method="sequential")
        return jnp.sum(w**2) + extra

    return cost


_PREFIX = MSG_NONDETERMINISTIC.split("{a}")[0]  # "cost_fn is not deterministic: two evaluations ..."
_W = jnp.linspace(0.5, 2.0, 6)

# (strategy, whether the engine batches): "delta" on a tiny cost calls J once per perturbation
# ("loop"); LOOP_SECONDS = 0 sends it to a batched program; "vmap" always batches. Screen mode
# probes through the line program instead.
_PATHS = [("delta", False, "full"), ("delta", True, "full"), ("vmap", True, "full"), ("delta", True, "screen")]


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize(("strategy", "batched", "mode"), _PATHS, ids=["loop", "delta", "vmap", "screen"])
def test_a_cost_that_changes_at_run_time_is_refused_with_the_run_time_message(
    strategy, batched, mode, x64, monkeypatch
):
    if batched:
        monkeypatch.setattr(engine, "LOOP_SECONDS", 0.0)
    ran: list[str] = []
    blocks, loop = engine.Engine._blocks, engine.Engine._loop
    monkeypatch.setattr(engine.Engine, "_blocks", lambda self, *a: ran.append("batched") or blocks(self, *a))
    monkeypatch.setattr(engine.Engine, "_loop", lambda self, *a: ran.append("loop") or loop(self, *a))
    line = engine.Engine.line_costs
    monkeypatch.setattr(engine.Engine, "line_costs", lambda self, *a: ran.append("line") or line(self, *a))
    with pytest.raises(ValueError) as info:
        jgradcheck.check_grad(_cost_with(_counter), lambda w: 2 * w, _W, strategy=strategy, mode=mode, x64=x64)
    text = str(info.value)
    assert text.startswith(_PREFIX), text
    assert text != MSG_NONDETERMINISTIC_TRACE and "{" not in text
    a, b = (float(s) for s in text[len(_PREFIX) :].split(". ")[0].split(" and "))
    assert a != b  # the two values of J(θ) it saw, as numbers
    # J(θ) twice came from the path this case is about: the first evaluations of the check.
    assert ran[:1] == ["line" if mode == "screen" else "batched" if batched else "loop"], ran


@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
@pytest.mark.parametrize(("strategy", "batched", "mode"), _PATHS, ids=["loop", "delta", "vmap", "screen"])
def test_the_same_callback_with_a_constant_value_passes(strategy, batched, mode, x64, monkeypatch):
    if batched:
        monkeypatch.setattr(engine, "LOOP_SECONDS", 0.0)
    report = jgradcheck.check_grad(_cost_with(_constant), lambda w: 2 * w, _W, strategy=strategy, mode=mode, x64=x64)
    assert report.passed, str(report)
