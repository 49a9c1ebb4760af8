"""The pytest plugin: one summary line of every check the session ran, and the plots of failing ones.

Registered as the ``jgradcheck`` entry point in the ``pytest11`` group, so pytest loads it wherever
jgradcheck is installed (``-p no:jgradcheck`` turns it off). It listens to the registry the public
checks notify (``registry.py``): every ``check_grad``, ``check_vjp``, ``check_jvp``, ``check_rules``
and ``check_hvp`` you call (through an ``assert_*`` or not) is one check, attributed to the test that
ran it. At the end of the session, if any check ran::

    jgradcheck: 12 checks: 9 passed, 2 failed, 1 inconclusive; slowest 3.21 s (check_vjp in tests/test_x.py::test_y)

With ``--jgradcheck-plots DIR`` the plot of every failing check (``report.plot``, needs matplotlib)
is saved into ``DIR``, one PNG per check named after its test, for your CI's artifacts.

PYTEST_DONT_REWRITE: this module has no asserts; the marker lets ``-p jgradcheck._src.pytest_plugin``
load it after it was imported without pytest warning that it cannot be rewritten.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import TYPE_CHECKING, Any

import pytest

from jgradcheck._src import registry

if TYPE_CHECKING:
    from jgradcheck._src.report import GradCheckReport

# A check made outside any test (at import or collection time) is attributed to this.
OUTSIDE = "(outside a test)"
# File names of plots: the test's node id with anything but these characters replaced.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_NAME = 120


@dataclasses.dataclass(frozen=True)
class CheckRecord:
    """One check the session ran.

    Attributes:
      name: the check (``"check_grad"``, ``"check_vjp"``, ...).
      nodeid: the test that ran it, or :data:`OUTSIDE`.
      status: the report's ``status``: ``"passed"``, ``"failed"`` or ``"inconclusive"``.
      seconds: its wall time, compilation included.
    """

    name: str
    nodeid: str
    status: str
    seconds: float


class Collector:
    """Hears every check of one pytest session; writes the summary line and the plots."""

    def __init__(self, plots: str | None) -> None:
        self.plots = plots
        self.records: list[CheckRecord] = []
        self.failing: list[tuple[CheckRecord, GradCheckReport]] = []
        self.nodeid: str | None = None

    def __call__(self, name: str, report: GradCheckReport, seconds: float) -> None:
        record = CheckRecord(name, self.nodeid or OUTSIDE, report.status, seconds)
        self.records.append(record)
        if self.plots is not None and record.status == "failed":
            self.failing.append((record, report))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        self.nodeid = item.nodeid
        yield
        self.nodeid = None

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.records:
            return
        saved, problem = self.save_plots()
        line = summary_line(self.records)
        if self.plots is not None:
            line += f"; {saved} plot{'s' if saved != 1 else ''} of failing checks in {self.plots}"
        terminalreporter.write_line(line)
        if problem:
            terminalreporter.write_line(f"jgradcheck: plots not saved: {problem}")

    def save_plots(self) -> tuple[int, str | None]:
        """Saves the plot of every failing check into ``self.plots``; (how many, what went wrong)."""
        if self.plots is None or not self.failing:
            return 0, None
        os.makedirs(self.plots, exist_ok=True)
        saved, problem, used = 0, None, set()
        for k, (record, report) in enumerate(self.failing):
            stem = _UNSAFE.sub("_", f"{record.nodeid}-{record.name}").strip("_")[-_MAX_NAME:]
            name = stem if stem not in used else f"{stem}-{k}"
            used.add(name)
            try:
                with warnings.catch_warnings():  # a plotting library's warning must not fail the run
                    warnings.simplefilter("ignore")
                    report.plot(os.path.join(self.plots, name + ".png"))
            except ImportError as e:  # matplotlib missing: say so once, in the summary
                return saved, str(e)
            except Exception as e:  # one bad figure must not lose the others
                problem = f"{record.nodeid}: {type(e).__name__}: {e}"
                continue
            saved += 1
        return saved, problem


def summary_line(records: list[CheckRecord]) -> str:
    """``jgradcheck: N checks: P passed, F failed, I inconclusive; slowest S s (NAME in TEST)``."""
    counts = {s: sum(r.status == s for r in records) for s in ("passed", "failed", "inconclusive")}
    slowest = max(records, key=lambda r: r.seconds)
    n = len(records)
    return (
        f"jgradcheck: {n} check{'s' if n != 1 else ''}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['inconclusive']} inconclusive; slowest {slowest.seconds:.2f} s ({slowest.name} in {slowest.nodeid})"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jgradcheck", "jgradcheck: hand-written JAX derivatives checked")
    group.addoption(
        "--jgradcheck-plots",
        metavar="DIR",
        default=None,
        help="save the plot of every failing jgradcheck check into DIR, one PNG per check (needs matplotlib).",
    )


_KEY = pytest.StashKey[Collector]()


def pytest_configure(config: pytest.Config) -> None:
    collector = Collector(config.getoption("jgradcheck_plots"))
    config.stash[_KEY] = collector
    config.pluginmanager.register(collector, "jgradcheck-collector")
    registry.push(collector)


def pytest_unconfigure(config: pytest.Config) -> None:
    collector = config.stash.get(_KEY, None)
    if collector is not None:
        registry.pop(collector)
        config.pluginmanager.unregister(collector)
        del config.stash[_KEY]
