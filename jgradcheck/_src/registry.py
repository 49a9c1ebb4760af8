"""Who hears about a finished check: a small registry the public checks notify.

Each public check (``check_grad``, ``check_vjp``, ``check_jvp``, ``check_rules``, ``check_hvp``) is
wrapped by :func:`recorded`. When it returns, the innermost listener (the pytest plugin of the
session that is running, see ``pytest_plugin.py``) is told its name, its report and its wall time.
Checks made inside another check (``check_vjp`` runs ``check_grad`` once per cotangent,
``check_rules`` runs ``check_vjp`` and ``check_jvp``) are not reported on their own: one call of
yours is one check. Only the innermost listener hears, so a pytest session started inside another
(pytester's in-process runs) does not count its checks twice.

Nothing here imports JAX or pytest; with no listener a check pays one context-variable lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ParamSpec, TypeVar

if TYPE_CHECKING:
    from jgradcheck._src.report import GradCheckReport

P = ParamSpec("P")
R = TypeVar("R")

# listener(name, report, seconds): told about every outermost check that returned a report.
Listener = Callable[[str, "GradCheckReport", float], None]

_LOCK = threading.Lock()
_LISTENERS: list[Listener] = []
# How many recorded checks are running in this context: only depth 0 -> 1 calls are reported.
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("jgradcheck_check_depth", default=0)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within the block, ``listener`` hears about every check that finishes (it shadows any
    listener registered before it, until the block ends).

    Args:
      listener: called as ``listener(name, report, seconds)`` after each outermost check.

    Yields:
      None.
    """
    push(listener)
    try:
        yield
    finally:
        pop(listener)


def push(listener: Listener) -> None:
    """Makes ``listener`` the innermost one (the only one told) until :func:`pop`."""
    with _LOCK:
        _LISTENERS.append(listener)


def pop(listener: Listener) -> None:
    """Removes ``listener`` (the one below it hears again); a listener not registered is ignored."""
    with _LOCK:
        for k in range(len(_LISTENERS) - 1, -1, -1):
            if _LISTENERS[k] is listener:
                del _LISTENERS[k]
                return


def _notify(name: str, report: GradCheckReport, seconds: float) -> None:
    with _LOCK:
        listener = _LISTENERS[-1] if _LISTENERS else None
    if listener is None:
        return
    try:
        listener(name, report, seconds)
    except Exception:  # a listener's bug must never change what a check returns
        pass


def recorded(fn: Callable[P, R]) -> Callable[P, R]:
    """Wraps a public check so that the innermost listener hears when it returns a report.

    The wrapper keeps ``fn``'s name, docstring, signature (``__wrapped__``) and module, and hides its
    own frame from pytest tracebacks.

    Args:
      fn: a function returning a :class:`~jgradcheck.GradCheckReport`.

    Returns:
      The wrapped function.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True  # noqa: F841 - read by pytest
        outermost = _DEPTH.get() == 0
        token = _DEPTH.set(_DEPTH.get() + 1)
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        finally:
            _DEPTH.reset(token)
        if outermost and _LISTENERS:
            _notify(name, result, time.perf_counter() - start)  # type: ignore[arg-type]
        return result

    return wrapper
