"""Assertions for pytest and chex tests: thin layers over the checks that raise with the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jgradcheck._src.check import check_grad
from jgradcheck._src.derivatives import check_hvp, check_jvp, check_rules, check_vjp
from jgradcheck._src.report import GradCheckReport

PyTree = Any


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
    name: str, run: Callable[[], GradCheckReport], custom_message: str | None, exception_type: type[Exception]
) -> None:
    """Chex-style: ``[jgradcheck] Assertion NAME failed: <custom_message>`` then the report."""
    if _chex_asserts_disabled():
        return
    report = run()
    if not report.passed:
        head = f"[jgradcheck] Assertion {name} failed: "
        if custom_message:
            head += custom_message + "\n"
        raise exception_type(head + str(report))


def assert_grad_correct(
    cost_fn: Any,
    grad_fn: Any,
    params: PyTree,
    *args: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    **kwargs: Any,
) -> None:
    """Raises if your gradient disagrees with the numerical one; the message is the report.

    Chex-style: the message starts ``[jgradcheck] Assertion assert_grad_correct failed:``,
    then your ``custom_message``, then the report's table. Honors ``chex.disable_asserts()``.

    Args:
      cost_fn: ``J(params, *args) -> scalar``.
      grad_fn: your gradient function, or the gradient pytree.
      params: the parameter pytree.
      *args: further arguments to both.
      custom_message: text placed before the table.
      exception_type: the exception raised (default ``AssertionError``).
      **kwargs: passed to :func:`check_grad` (``x64``, ``mode``, ``method``, ``eps``, ...,
        and keyword arguments for your functions).

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p: jnp.sum(p["w"] ** 3)
      >>> jgradcheck.assert_grad_correct(J, lambda p: {"w": 3 * p["w"] ** 2}, {"w": jnp.arange(3.0)})
    """
    _raise_unless_passed(
        "assert_grad_correct",
        lambda: check_grad(cost_fn, grad_fn, params, *args, **kwargs),
        custom_message,
        exception_type,
    )


def assert_vjp_correct(
    fn: Any,
    vjp_fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    **options: Any,
) -> None:
    """Raises unless :func:`check_vjp` passes; the message is its report (chex style).

    Args:
      fn: the function; vjp_fn: your VJP with ``jax.vjp``'s signature; *primals: the point.
      custom_message: text placed before the table.
      exception_type: the exception raised (default ``AssertionError``).
      **options: options of :func:`check_vjp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.
    """
    _raise_unless_passed(
        "assert_vjp_correct", lambda: check_vjp(fn, vjp_fn, *primals, **options), custom_message, exception_type
    )


def assert_jvp_correct(
    fn: Any,
    jvp_fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    **options: Any,
) -> None:
    """Raises unless :func:`check_jvp` passes; the message is its report (chex style).

    Args:
      fn: the function; jvp_fn: your JVP with ``jax.jvp``'s signature; *primals: the point.
      custom_message: text placed before the table.
      exception_type: the exception raised (default ``AssertionError``).
      **options: options of :func:`check_jvp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.
    """
    _raise_unless_passed(
        "assert_jvp_correct", lambda: check_jvp(fn, jvp_fn, *primals, **options), custom_message, exception_type
    )


def assert_rules_correct(
    fn: Any,
    *primals: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    **options: Any,
) -> None:
    """Raises unless :func:`check_rules` passes (JAX's derivatives of ``fn``, custom rules included).

    Args:
      fn: the function; *primals: the point.
      custom_message: text placed before the table.
      exception_type: the exception raised (default ``AssertionError``).
      **options: ``modes``, ``order`` and the options of :func:`check_vjp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> jgradcheck.assert_rules_correct(jnp.tanh, jnp.linspace(-1.0, 1.0, 4), order=2)
    """
    _raise_unless_passed(
        "assert_rules_correct", lambda: check_rules(fn, *primals, **options), custom_message, exception_type
    )


def assert_hvp_correct(
    cost_fn: Any,
    hvp_fn: Any,
    params: PyTree,
    *args: Any,
    custom_message: str | None = None,
    exception_type: type[Exception] = AssertionError,
    **options: Any,
) -> None:
    """Raises unless :func:`check_hvp` passes; the message is its report (chex style).

    Args:
      cost_fn: ``J(params, *args)``; hvp_fn: ``hvp_fn(params, v, *args)``; params, *args: the point.
      custom_message: text placed before the table.
      exception_type: the exception raised (default ``AssertionError``).
      **options: options of :func:`check_hvp`.

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.
    """
    _raise_unless_passed(
        "assert_hvp_correct",
        lambda: check_hvp(cost_fn, hvp_fn, params, *args, **options),
        custom_message,
        exception_type,
    )
