"""The examples in the public docstrings run as written."""

from __future__ import annotations

import doctest

import pytest

from jgradcheck._src import asserts, check, derivatives


@pytest.mark.parametrize("module", [check, asserts, derivatives], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
