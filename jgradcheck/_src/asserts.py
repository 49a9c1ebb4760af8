"""``assert_grad_correct``: a thin layer over ``check_grad`` for pytest and chex tests."""

from __future__ import annotations

from typing import Any

from jgradcheck._src.check import check_grad

PyTree = Any


def _chex_asserts_disabled() -> bool:
    try:
        from chex._src import asserts_internal
    except ImportError:  # pragma: no cover - chex is a dependency
        return False
    return bool(
        getattr(asserts_internal, "DISABLE_ASSERTIONS", False)
        or getattr(asserts_internal, "_DISABLE_ASSERTIONS", False)
    )


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
      **kwargs: passed to :func:`check_grad` (``x64``, ``mode``, ``method``, ``eps``, ...).

    Raises:
      AssertionError: (or ``exception_type``) when the check fails.

    Examples:
      >>> import jax.numpy as jnp, jgradcheck
      >>> J = lambda p: jnp.sum(p["w"] ** 3)
      >>> jgradcheck.assert_grad_correct(J, lambda p: {"w": 3 * p["w"] ** 2}, {"w": jnp.arange(3.0)})
    """
    if _chex_asserts_disabled():
        return
    report = check_grad(cost_fn, grad_fn, params, *args, **kwargs)
    if not report.passed:
        head = "[jgradcheck] Assertion assert_grad_correct failed: "
        if custom_message:
            head += custom_message + "\n"
        raise exception_type(head + str(report))
