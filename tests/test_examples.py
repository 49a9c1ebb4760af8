"""examples/test_with_chex.py, the test file users copy, passes as shipped."""

from __future__ import annotations

import importlib.util
import os
import unittest

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "test_with_chex.py")


def test_chex_example_passes():
    spec = importlib.util.spec_from_file_location("example_test_with_chex", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    suite = unittest.TestLoader().loadTestsFromTestCase(module.GradientTest)
    result = unittest.TestResult()
    suite.run(result)
    assert result.testsRun == 4
    assert result.wasSuccessful(), result.failures + result.errors
