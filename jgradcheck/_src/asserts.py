"""Assertions for pytest and chex tests: thin layers over the checks that raise with the answer first.

A failing assertion's message is at most :data:`MAX_LINES` lines of at most :data:`WIDTH` columns,
built from the report's fields: the verdict, the per-leaf table, the worst entries, the diagnosis
and the one next step. The full report is ``error.report`` (``str(error.report)`` is its table).
Every frame of the library the assertion passes through sets ``__tracebackhide__``, so pytest shows
your test's line and the message, not jgradcheck's source.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from jgradcheck._src.check import check_grad
from jgradcheck._src.derivatives import check_hvp, check_jvp, check_rules, check_vjp
from jgradcheck._src.report import Entry, GradCheckReport, LeafReport

PyTree = Any

# The message fits a terminal or a CI log without wrapping, and a screen without scrolling.
WIDTH = 100
MAX_LINES = 15
# At most this many leaves in the table (failing and inconclusive first; the rest counted), and
# this many worst entries.
MAX_ROWS = 5
MAX_ENTRIES = 3

# The check behind each assertion: named in the message's last line, where the full report is.
_CHECK_OF = {
    "assert_grad_correct": "check_grad",
    "assert_vjp_correct": "check_vjp",
    "assert_jvp_correct": "check_jvp",
    "assert_rules_correct": "check_rules",
    "assert_hvp_correct": "check_hvp",
}

MSG_NEXT_ACROSS = "next: fix what the diagnosis names in {what}; jgradcheck.{check}(...) shows every leaf"
MSG_NEXT_FAILED = "next: fix how {what} computes {leaf} ({entry} first); jgradcheck.{check}(...) shows it all"
MSG_NEXT_FLOAT = "next: pass x64=True ({dtype} differences cannot see a 1% error here), or allow_inconclusive=True"
MSG_NEXT_INCONCLUSIVE = "next: see why above; or pass allow_inconclusive=True to accept an inconclusive check"


class InconclusiveWarning(UserWarning):
    """An assertion called with ``allow_inconclusive=True`` passed on an inconclusive check.

    The check found no disagreement, but could not resolve some leaf finely enough to see a 1%
    error (float32 without promotion, noise, steps that do not converge). The message names the
    leaves and why. Under ``filterwarnings = ["error"]``, let it through with
    ``"ignore::jgradcheck.InconclusiveWarning"`` (or ``"default::..."`` to see it).
    """


def _chex_asserts_disabled() -> bool:
    try:
        from chex._src import asserts_internal  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - chex is a dependency
        return False
    return bool(
        getattr(asserts_internal, "DISABLE_ASSERTIONS", False)
        or getattr(asserts_internal, "_DISABLE_ASSERTIONS", False)
    )


def _raise_unless_passed(
    name: str,
    run: Callable[[], GradCheckReport],
    custom_message: str | None,
    exception_type: type[Exception],
    allow_inconclusive: bool,
) -> None:
    """Chex-style: ``[jgradcheck] Assertion NAME failed: <custom_message>`` then the compact answer."""
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    if _chex_asserts_disabled():
        return
    report = run()
    if report.passed:
        return
    if allow_inconclusive and report.inconclusive:
        # stacklevel 3: the warning points at your call of the assert_* function.
        warnings.warn(InconclusiveWarning(inconclusive_message(name, report)), stacklevel=3)
        return
    error = exception_type(failure_message(name, report, custom_message))
    try:
        error.report = report  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: the message is all it carries
        pass
    raise error


# --- the compact message --------------------------------------------------------------------------


def failure_message(name: str, report: GradCheckReport, custom_message: str | None = None) -> str:
    """The assertion's message: at most :data:`MAX_LINES` lines of at most :data:`WIDTH` columns.

    Args:
      name: the assertion (``"assert_grad_correct"``).
      report: the check's report (failed or inconclusive).
      custom_message: your text, placed on the first line.

    Returns:
      The verdict, the per-leaf table, the worst entries, the diagnosis and the one next step.
    """
    head = f"[jgradcheck] Assertion {name} failed: "
    lines = [head + (custom_message or _short_verdict(report)), _verdict(report)]
    tail = [*_diagnosis(report), _next_step(name, report), _ran(report)]
    entries = _worst(report)
    # The table gets what the other parts leave of the line budget (its header and at least one row).
    room = MAX_LINES - len(lines) - len(tail) - len(entries)
    lines += _table(report, max(2, room))
    lines += entries
    lines += tail
    return "\n".join(_fit(line) for line in lines[:MAX_LINES])


def inconclusive_message(name: str, report: GradCheckReport) -> str:
    """The warning of an assertion that passed as inconclusive: which leaves, and why."""
    why = "; ".join(f"{leaf.path}: {leaf.note}" for leaf in report.inconclusive_leaves if leaf.note)
    leaves = ", ".join(leaf.path for leaf in report.inconclusive_leaves)
    text = (
        f"[jgradcheck] {name} passed as INCONCLUSIVE (allow_inconclusive=True): {report.what} shows no "
        f"disagreement, but finite differences in {report.precision} could not resolve {leaves} "
        f"finely enough to see a 1% error"
    )
    return text + (f" ({why})" if why else "")


def _short_verdict(report: GradCheckReport) -> str:
    if report.failed_leaves:
        return f"FAILED in {_names([leaf.path for leaf in report.failed_leaves])}"
    return f"INCONCLUSIVE in {_names([leaf.path for leaf in report.inconclusive_leaves])}"


def _verdict(report: GradCheckReport) -> str:
    failed = [leaf.path for leaf in report.failed_leaves]
    unresolved = [leaf.path for leaf in report.inconclusive_leaves]
    n = len(report.leaves) - len(report.not_checked)
    if failed:
        text = f"FAILED: {report.what} disagrees with the numerical one in {_names(failed)}"
        text += f" ({len(failed)} of {n} leaves" + (" checked" if report.not_checked else "")
        return text + (f"; {len(unresolved)} inconclusive)" if unresolved else ")")
    return (
        f"INCONCLUSIVE (not a pass): no disagreement, but {_names(unresolved)} could not be resolved "
        f"to 1% in {_dtype(report)}"
    )


def _names(paths: Sequence[str], keep: int = 3) -> str:
    shown = ", ".join(paths[:keep])
    return shown + (f" and {len(paths) - keep} more" if len(paths) > keep else "")


def _dtype(report: GradCheckReport) -> str:
    """The precision's dtype word (``float32``) without the note on promotion."""
    return report.precision.split(" ", 1)[0]


def _table(report: GradCheckReport, room: int) -> list[str]:
    """The per-leaf table: failing and inconclusive leaves first, then the others, in ``room`` lines."""
    order = sorted(report.leaves, key=lambda leaf: {"fail": 0, "inconclusive": 1, "not checked": 3}.get(leaf.status, 2))
    rows = min(len(order), room - 1, MAX_ROWS)
    hidden = order[rows:]
    if hidden and rows == room - 1 and rows > 1:
        rows -= 1  # a line to say what is not shown
        hidden = order[rows:]
    header = ("leaf", "shape", "status", "difference", "worst", "yours", "numerical")
    body = [_row(leaf) for leaf in order[:rows]]
    out = _columns(header, body)
    if hidden:
        words = {"fail": "failing", "inconclusive": "inconclusive", "ok": "ok"}
        counts: dict[str, int] = {}
        for leaf in hidden:
            counts[words.get(leaf.status, leaf.status)] = counts.get(words.get(leaf.status, leaf.status), 0) + 1
        out.append(f"  ... {len(hidden)} more leaves: " + ", ".join(f"{n} {w}" for w, n in counts.items()))
    return out


def _row(leaf: LeafReport) -> tuple[str, ...]:
    status = {"ok": "ok", "fail": "FAIL"}.get(leaf.status, leaf.status)
    if leaf.n_failed:
        status += f" {leaf.n_failed}/{leaf.checked}"
    elif leaf.status == "inconclusive" and leaf.n_unresolved:
        status += f" {leaf.n_unresolved}/{leaf.checked}"
    if leaf.how == "screened":
        status += " dirs"
    w = leaf.worst
    where = "" if w is None else (f"[{', '.join(map(str, w.index))}]" if w.index else "")
    return (
        leaf.path,
        str(leaf.shape),
        status,
        f"{leaf.difference:.2e}" if leaf.status != "not checked" else "-",
        where,
        "" if w is None else _num(w.yours),
        "" if w is None else _num(w.numerical),
    )


def _columns(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns in two-space gutters; the leaf column is shortened (from the left,
    where paths share their prefix) until a row fits :data:`WIDTH`."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    excess = 2 + sum(widths) + 2 * (len(widths) - 1) - WIDTH
    if excess > 0:
        widths[0] = max(len(header[0]), widths[0] - excess)
    out = []
    for r in [header, *body]:
        cells = [_left(r[0], widths[0])] + list(r[1:])
        out.append(("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths))).rstrip())
    return out


def _left(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _num(x: float) -> str:
    return f"{x:.4e}" if math.isfinite(x) else str(x)


def _worst(report: GradCheckReport) -> list[str]:
    """The worst entries: for vector checks the disagreeing Jacobian entries (output and input
    named), else the entries furthest outside their error estimate."""
    if report.jacobian:
        pool = list(report.jacobian)
    elif report.failed_leaves:
        pool = [e for e in report.worst if e.status == "fail"]
    else:
        pool = [leaf.worst for leaf in report.inconclusive_leaves if leaf.worst is not None]
    if not pool:
        return []
    shown = [_entry(e) for e in pool[:MAX_ENTRIES]]
    if len(pool) > MAX_ENTRIES:
        shown[-1] += f"  (+{len(pool) - MAX_ENTRIES} more)"
    return ["  worst: " + shown[0]] + ["         " + s for s in shown[1:]]


def _entry(e: Entry) -> str:
    name = e.name if e.output is None else f"d {e.output} / d {e.name}"
    s = f"{name}  yours {_num(e.yours)}  numerical {_num(e.numerical)}"
    if e.status == "fail" and e.error_estimate > 0 and math.isfinite(e.abs_error):
        s += f"  ({e.abs_error / e.error_estimate:.1e} × tolerance)"
    elif e.status == "inconclusive" and math.isfinite(e.error_estimate):
        s += f"  (numerical only to ± {e.error_estimate:.1e})"
    return s


def _diagnosis(report: GradCheckReport) -> list[str]:
    """What the discrepancy looks like (the report's, else each failing leaf's), or for an
    inconclusive check why; and the first warning. At most three lines."""
    # A finding that spans leaves says it all; else each failing leaf's own.
    if report.diagnosis:
        found = report.diagnosis
    else:
        found = "; ".join(f"{leaf.path}: {leaf.diagnosis}" for leaf in report.failed_leaves if leaf.diagnosis)
    lines = []
    if found:
        lines += _wrap(found, "  diagnosis: ")
    elif not report.failed_leaves:
        why = "; ".join(f"{leaf.path}: {leaf.note}" for leaf in report.inconclusive_leaves if leaf.note)
        if why:
            lines += _wrap(why, "  why: ")
    if report.warnings:
        more = f" (+{len(report.warnings) - 1} more)" if len(report.warnings) > 1 else ""
        lines.append(_fit("  warning: " + report.warnings[0], WIDTH - len(more)) + more)
    return lines


def _wrap(text: str, lead: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=lead, subsequent_indent="    ", max_lines=3, placeholder=" …")


def _next_step(name: str, report: GradCheckReport) -> str:
    check = _CHECK_OF.get(name, "check_grad")
    if report.failed_leaves and report.diagnosis:
        return "  " + MSG_NEXT_ACROSS.format(what=report.what, check=check)
    if report.failed_leaves:
        # Start where yours is furthest outside its tolerance.
        failed = {leaf.path for leaf in report.failed_leaves}
        entry = next((e for e in report.worst if e.status == "fail" and e.path in failed), None)
        path = entry.path if entry is not None else report.failed_leaves[0].path
        where = entry.name if entry is not None else path
        return "  " + MSG_NEXT_FAILED.format(what=report.what, leaf=path, entry=where, check=check)
    if "promoted" not in report.precision and _dtype(report) in ("float32", "float16", "bfloat16"):
        return "  " + MSG_NEXT_FLOAT.format(dtype=_dtype(report))
    return "  " + MSG_NEXT_INCONCLUSIVE


def _ran(report: GradCheckReport) -> str:
    return (
        f"  ran in {report.precision}, {report.method} differences, {report.evaluations:,} evaluations, "
        f"{report.seconds:.2f} s"
    )


def _fit(line: str, width: int = WIDTH) -> str:
    """``line`` cut to ``width`` columns (the full text is in the report)."""
    return line if len(line) <= width else line[: width - 1] + "…"


# --- the assertions -------------------------------------------------------------------------------


def assert_grad_correct(
    cost_fn: Any,
    grad_fn: Any,
    params: PyTree,
    *args: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    allow_inconclusive: bool = False,
    **kwargs: Any,
) -> None:
    """Raises if your gradient disagrees with the numerical one; the message shows the answer first.

    Chex-style: the message starts ``[jgradcheck] Assertion assert_grad_correct failed:``, then
    your ``custom_message``, then at most 15 lines of at most 100 columns: the verdict, the
    per-leaf table, the worst entries, the diagnosis and the one next step. The raised error
    carries the full report as ``error.report``. Honors ``chex.disable_asserts()``.

    Args:
      cost_fn: ``J(params, *args) -> scalar``.
      grad_fn: your gradient function, or the gradient pytree.
      params: the parameter pytree.
      *args: further arguments to both.
      custom_message: text placed on the message's first line.
      exception_type: the exception raised (default ``AssertionError``).
      allow_inconclusive: an inconclusive check (no disagreement found, but some leaf could not
        be resolved to 1%, e.g. float32 with ``x64=False``) passes with an
        :class:`InconclusiveWarning` instead of raising. A failed check still raises.
      **kwargs: passed to :func:`check_grad` (``x64``, ``mode``, ``method``, ``eps``, ``only``
        (the leaves to check), ..., and keyword arguments for your functions).

    Raises:
      AssertionError: (or ``exception_type``) when the check fails or is inconclusive.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p: jnp.sum(p["w"] ** 3)
      >>> jgradcheck.assert_grad_correct(J, lambda p: {"w": 3 * p["w"] ** 2}, {"w": jnp.arange(3.0)})
    """
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    _raise_unless_passed(
        "assert_grad_correct",
        lambda: check_grad(cost_fn, grad_fn, params, *args, **kwargs),
        custom_message,
        exception_type,
        allow_inconclusive,
    )


def assert_vjp_correct(
    fn: Any,
    vjp_fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    allow_inconclusive: bool = False,
    **options: Any,
) -> None:
    """Raises unless :func:`check_vjp` passes; the message shows the answer first (chex style).

    Args:
      fn: the function.
      vjp_fn: your VJP with ``jax.vjp``'s signature, or a custom_vjp rule's ``(fwd, bwd)`` pair.
      *primals: the point.
      custom_message: text placed on the message's first line.
      exception_type: the exception raised (default ``AssertionError``).
      allow_inconclusive: pass an inconclusive check with an :class:`InconclusiveWarning`.
      **options: options of :func:`check_vjp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails or is inconclusive.
    """
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    _raise_unless_passed(
        "assert_vjp_correct",
        lambda: check_vjp(fn, vjp_fn, *primals, **options),
        custom_message,
        exception_type,
        allow_inconclusive,
    )


def assert_jvp_correct(
    fn: Any,
    jvp_fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    allow_inconclusive: bool = False,
    **options: Any,
) -> None:
    """Raises unless :func:`check_jvp` passes; the message shows the answer first (chex style).

    Args:
      fn: the function; jvp_fn: your JVP with ``jax.jvp``'s signature; *primals: the point.
      custom_message: text placed on the message's first line.
      exception_type: the exception raised (default ``AssertionError``).
      allow_inconclusive: pass an inconclusive check with an :class:`InconclusiveWarning`.
      **options: options of :func:`check_jvp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails or is inconclusive.
    """
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    _raise_unless_passed(
        "assert_jvp_correct",
        lambda: check_jvp(fn, jvp_fn, *primals, **options),
        custom_message,
        exception_type,
        allow_inconclusive,
    )


def assert_rules_correct(
    fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    allow_inconclusive: bool = False,
    **options: Any,
) -> None:
    """Raises unless :func:`check_rules` passes (JAX's derivatives of ``fn``, custom rules included).

    Args:
      fn: the function; *primals: the point.
      custom_message: text placed on the message's first line.
      exception_type: the exception raised (default ``AssertionError``).
      allow_inconclusive: pass an inconclusive check with an :class:`InconclusiveWarning`.
      **options: ``modes``, ``order`` and the options of :func:`check_vjp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails or is inconclusive.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> jgradcheck.assert_rules_correct(jnp.tanh, jnp.linspace(-1.0, 1.0, 4), order=2)
    """
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    _raise_unless_passed(
        "assert_rules_correct",
        lambda: check_rules(fn, *primals, **options),
        custom_message,
        exception_type,
        allow_inconclusive,
    )


def assert_hvp_correct(
    cost_fn: Any,
    hvp_fn: Any,
    params: PyTree,
    *args: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    allow_inconclusive: bool = False,
    **options: Any,
) -> None:
    """Raises unless :func:`check_hvp` passes; the message shows the answer first (chex style).

    Args:
      cost_fn: ``J(params, *args)``; hvp_fn: ``hvp_fn(params, v, *args)``; params, *args: the point.
      custom_message: text placed on the message's first line.
      exception_type: the exception raised (default ``AssertionError``).
      allow_inconclusive: pass an inconclusive check with an :class:`InconclusiveWarning`.
      **options: options of :func:`check_hvp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails or is inconclusive.
    """
    __tracebackhide__ = True  # noqa: F841 - read by pytest
    _raise_unless_passed(
        "assert_hvp_correct",
        lambda: check_hvp(cost_fn, hvp_fn, params, *args, **options),
        custom_message,
        exception_type,
        allow_inconclusive,
    )
