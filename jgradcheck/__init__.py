"""jgradcheck: are your hand-written JAX derivatives right, and if not, where and how are they wrong."""

from jgradcheck._src.asserts import (
    InconclusiveWarning,
    assert_grad_correct,
    assert_hvp_correct,
    assert_jvp_correct,
    assert_rules_correct,
    assert_vjp_correct,
)
from jgradcheck._src.check import check_grad, numerical_grad
from jgradcheck._src.derivatives import check_hvp, check_jvp, check_rules, check_vjp
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport

__version__ = "0.2.0"

__all__ = (
    "Entry",
    "Grade",
    "GradCheckReport",
    "InconclusiveWarning",
    "LeafReport",
    "assert_grad_correct",
    "assert_hvp_correct",
    "assert_jvp_correct",
    "assert_rules_correct",
    "assert_vjp_correct",
    "check_grad",
    "check_hvp",
    "check_jvp",
    "check_rules",
    "check_vjp",
    "numerical_grad",
)
