"""Options of a check: validated once, then carried as one frozen value."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from typing import Any

import numpy as np

MSG_MODE = "mode must be one of 'auto', 'full', 'screen', 'sample'; got {mode!r}."
MSG_METHOD = "method must be one of 'central', 'central4', 'richardson'; got {method!r}."
MSG_COUNT = "{name} must be a positive integer; got {value!r}."
MSG_POSITIVE = "{name} must be a positive number; got {value!r}."
MSG_NONNEGATIVE = "{name} must be a non-negative number; got {value!r}."
MSG_NO_DEVICES = "devices is empty; pass None (all local devices) or a non-empty list such as jax.devices()[:1]."
MSG_STRATEGY = "strategy must be 'delta' or 'vmap'; got {strategy!r}."
MSG_BUDGET = (
    "time_budget must be a positive number of seconds, or None for no limit; got {value!r}. It is the "
    "longest a full check may take under mode='auto' before it screens instead."
)
MSG_EPS = "eps must be a positive finite number (an absolute step); got {eps!r}."


@dataclasses.dataclass(frozen=True)
class Options:
    eps: float | None
    method: str
    safety: float
    rtol: float
    atol: float
    refine: bool
    max_refine: int


def check_options(**options: Any) -> None:
    """Counts must be positive integers, factors positive, tolerances non-negative."""
    for name in ("sample_size", "screen_directions", "top_k", "max_refine", "full_max_size", "chunk_size"):
        if name in options and options[name] is not None:
            v = options[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
                raise ValueError(MSG_COUNT.format(name=name, value=v))
    if "safety" in options and not (isinstance(options["safety"], numbers.Real) and float(options["safety"]) > 0):
        raise ValueError(MSG_POSITIVE.format(name="safety", value=options["safety"]))
    for name in ("rtol", "atol"):
        if name in options and not (isinstance(options[name], numbers.Real) and float(options[name]) >= 0):
            raise ValueError(MSG_NONNEGATIVE.format(name=name, value=options[name]))
    devices = options.get("devices")
    if devices is not None and len(list(devices)) == 0:
        raise ValueError(MSG_NO_DEVICES)


def _is_real(value: Any) -> bool:
    """A real number (NumPy scalars welcome), not a bool: ``True`` is no step or budget."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_eps(eps: Any) -> float | None:
    """A user step: a positive finite real number (NumPy scalars welcome, bools not)."""
    if eps is None:
        return None
    if not (_is_real(eps) and math.isfinite(eps) and float(eps) > 0):
        raise ValueError(MSG_EPS.format(eps=eps))
    return float(eps)


# A check with the default ``progress=None`` shows nothing for its first LONG_CHECK_S seconds; after
# that it says where it is (a bar on a terminal, a line every ~10 s in a log), so a long check is never
# silent, and the many short ones of a test suite never write anything.
LONG_CHECK_S = 10.0


def show_progress(progress: bool | None, n: int) -> dict[str, Any]:
    """How to show the progress of ``n`` evaluations: ``Progress``'s ``enabled`` and ``after_s``.

    True: from the start; False: never; None (the default): from the start on a terminal for more
    than 50,000 evaluations, otherwise only once the check has run for ``LONG_CHECK_S`` seconds.
    """
    if progress is not None:
        return {"enabled": bool(progress), "after_s": 0.0}
    at_once = sys.stderr.isatty() and n > 50_000
    return {"enabled": True, "after_s": 0.0 if at_once else LONG_CHECK_S}


def check_budget(time_budget: Any) -> float | None:
    """``time_budget``: None (no limit) or a positive number of seconds."""
    if time_budget is None:
        return None
    if not (_is_real(time_budget) and float(time_budget) > 0):  # inf: no limit, as None
        raise ValueError(MSG_BUDGET.format(value=time_budget))
    return float(time_budget)


# XLA:CPU's backend optimization level 0: 0.5-0.65x the compile time, 1.1-4x the run time
# (GEMMs and convolutions are library calls; generated elementwise loops slow down most).
# Measured on a 2-core CPU: 0.1 s against 0.2 s for a unit-test MLP's program, 0.4-0.9 s
# against 0.7-1.4 s for the delta interpreter's programs of a transformer block or a CNN.
# Used where compiling is most of the cost: cheap groups of perturbations, your gradient
# (run once) when J is small.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
# ... and, for a program without loops, without XLA:CPU's fusion emitters too: small programs
# compile in 0.3-0.5x the time of QUICK_COMPILE alone (jax.grad of an 8-8-1 MLP 79 → 30 ms, of an
# attention layer 107 → 36 ms; ``benchmarks/results_compile.md``); a scan's program ran 1.7x
# slower that way, so loops keep QUICK_COMPILE.
QUICK_LEAN_COMPILE = {**QUICK_COMPILE, "xla_cpu_use_fusion_emitters": False}
