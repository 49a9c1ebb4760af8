"""jgradcheck: is your hand-written JAX gradient right, and if not, where and how is it wrong."""

from jgradcheck._src.asserts import assert_grad_correct
from jgradcheck._src.check import check_grad, numerical_grad
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport

__version__ = "0.1.0"

__all__ = (
    "Entry",
    "Grade",
    "GradCheckReport",
    "LeafReport",
    "assert_grad_correct",
    "check_grad",
    "numerical_grad",
)
