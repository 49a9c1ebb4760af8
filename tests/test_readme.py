"""The README and the example must run as shown."""

from __future__ import annotations

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs_and_finds_the_missing_l2_term(capsys):
    block = next(b for b in _python_blocks() if "report = jgradcheck.check_grad" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    report = namespace["report"]
    assert not report.passed
    assert [leaf.path for leaf in report.failed_leaves] == ["W1"]
    assert "missing L2 term" in report.leaf("W1").diagnosis
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "W1" in printed


def test_classic_recipe_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "classic_recipe.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "constant factor: yours ≈ 2 × numerical" in out
    assert out.count("PASSED") >= 3


def test_every_readme_block_runs_as_shown(capsys):
    """All Python blocks, in order, in one namespace: what the README shows runs, and prints
    what its comments say."""
    namespace: dict = {}
    for block in _python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "[jgradcheck] Assertion assert_grad_correct failed: layer 1" in out
    assert "jgradcheck: FAILED - your VJP disagrees with the numerical one in w" in out
    assert "constant factor: yours ≈ 0.5 × numerical (numerical ≈ 2 × yours)" in out
    # The Hessian-vector product, then the NNX, linen and equinox models pass.
    assert [line for line in out.splitlines() if line in ("True", "False")] == ["True"] * 4


def test_reading_a_report_explains_every_column_and_status():
    import jgradcheck
    from jgradcheck._src.report import _leaf_table

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading a report") : text.index("## Frameworks")]
    report = jgradcheck.check_grad(
        lambda p: (p["w"] ** 2).sum(), lambda p: {"w": 2 * p["w"]}, {"w": 1.0 + __import__("numpy").arange(3.0)}
    )
    header = _leaf_table(report.leaves)[0][0].split("  ")
    for column in [c.strip() for c in header if c.strip()]:
        assert f"`{column}`" in section, column
    for word in (
        "PASSED",
        "FAILED",
        "INCONCLUSIVE",
        "FAIL (k)",
        "inconclusive (k)",
        "+k kink",
        "not checked",
        "× tolerance",
        "near a kink",
        "one-sided",
        "allow_inconclusive",
        "evaluated:",
        "(below)",
    ):
        assert word in section, word
