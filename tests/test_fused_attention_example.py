"""examples/fused_attention.py: its hand-written backward passes, and each planted bug fails where it should."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

import jgradcheck

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fused_attention.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("example_fused_attention", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The bug, and the leaves it makes fail: the softmax backward feeds dq and dk (so x, wq, wk), not dv.
@pytest.mark.parametrize(
    "bug, failing", [(None, set()), ("softmax_row_sum", {"x", "wq", "wk"}), ("dwk_transposed", {"wk"})]
)
def test_example_backward_is_checked(example, bug, failing):
    x, (wq, wk, wv), _ = example.data()
    vjp_fn = functools.partial(example.attention_vjp, bug=bug)
    report = jgradcheck.check_vjp(example.attention, vjp_fn, x, wq, wk, wv)
    assert {row.path for row in report.leaves if not row.passed} == failing, report
    assert report.passed == (bug is None)
    assert all(e.path in failing and e.output.startswith("out[") for e in report.jacobian)
    if bug == "dwk_transposed":
        assert "transposed" in (report.leaf("wk").diagnosis or "")
