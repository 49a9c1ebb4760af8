"""Progress fits its place: tqdm on a terminal, a one-line bar without it, plain lines in logs."""

from __future__ import annotations

import io
import re
import sys
import types

import pytest

from jgradcheck._src import progress as progress_mod
from jgradcheck._src.progress import Progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def stderr(monkeypatch):
    """A fake stderr; ``stderr(tty=True)`` makes it a terminal."""

    def make(tty: bool) -> _Stream:
        s = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", s)
        return s

    return make


@pytest.fixture
def no_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


def _overshoot(bar: Progress) -> None:
    """Like a check: planned 800,000 evaluations, then 20 more for a second look at suspects."""
    for _ in range(100):
        bar.update(8_000)
    bar.update(20)
    bar.close()


@pytest.mark.parametrize("tty", [False, True])
def test_disabled_prints_nothing(stderr, capsys, tty):
    s = stderr(tty)
    bar = Progress(800_000, enabled=False)
    _overshoot(bar)
    assert s.getvalue() == ""
    assert capsys.readouterr() == ("", "")
    assert bar.done == 800_020 and not bar.enabled


def test_log_gets_a_few_plain_lines_that_never_pass_the_total(stderr):
    s = stderr(False)
    bar = Progress(800_000, enabled=True)
    assert bar.kind == "lines"
    _overshoot(bar)
    out = s.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 2 <= len(lines) <= 11
    for line in lines:
        done, total = (int(x.replace(",", "")) for x in re.search(r"([\d,]+)/([\d,]+) evals", line).groups())
        assert done <= total
    assert "-" not in out.replace("jgradcheck", "")  # no negative ETA
    # The second look's 20 evaluations are in the total.
    assert lines[-1].startswith("jgradcheck: 800,020/800,020 evals, done in")
    assert "(10%)" in lines[0] and "(90%)" in lines[-2]


def test_log_lines_are_unchanged_by_tqdm(stderr):
    pytest.importorskip("tqdm")
    s = stderr(False)
    bar = Progress(100, enabled=True)
    assert bar.kind == "lines"
    bar.update(100)
    bar.close()
    assert "\r" not in s.getvalue()


def test_terminal_without_tqdm_gets_the_one_line_bar(stderr, no_tqdm):
    s = stderr(True)
    bar = Progress(800_000, enabled=True, label="check")
    assert bar.kind == "bar"
    _overshoot(bar)
    out = s.getvalue()
    assert out.startswith("\rcheck [") and out.endswith("\n")
    last = out.strip().split("\r")[-1]
    assert "800,020/800,020 evals" in last
    assert "800,020/800,000" not in out
    assert "ETA -" not in out and "ETA 0.0 s" in last


def test_terminal_with_tqdm_uses_tqdm(stderr, monkeypatch):
    made = []

    class FakeTqdm:
        def __init__(self, **kw):
            self.kw, self.n, self.closed = kw, 0, False
            made.append(self)

        def update(self, n):
            self.n += n

        def refresh(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(progress_mod, "_tqdm_class", lambda: FakeTqdm)
    stderr(True)
    bar = Progress(800_000, enabled=True)
    assert bar.kind == "tqdm"
    _overshoot(bar)
    (t,) = made
    assert t.kw["total"] == 800_000 and t.total == 800_020 and t.n == 800_020 and t.closed  # the second look added


def test_real_tqdm_on_a_terminal(stderr):
    pytest.importorskip("tqdm")
    s = stderr(True)
    bar = Progress(1000, enabled=True)
    assert bar.kind == "tqdm"
    bar.update(600)
    bar.update(600)
    bar.close()
    assert "1.20k/1.20k" in s.getvalue()  # the 200 beyond the plan are in the total


def test_notebook_uses_tqdm_even_without_a_terminal(stderr, monkeypatch):
    made = []
    monkeypatch.setattr(progress_mod, "_tqdm_class", lambda: lambda **kw: made.append(kw))
    monkeypatch.setattr(progress_mod, "_in_notebook", lambda cls: True)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # a Jupyter kernel
    stderr(False)
    assert Progress(10, enabled=True).kind == "tqdm" and made


def test_close_twice_and_empty_total(stderr):
    s = stderr(False)
    bar = Progress(0, enabled=True)
    bar.update(0)
    bar.close()
    bar.close()
    assert s.getvalue().count("\n") == 1


def test_second_look_announced_is_in_the_total(stderr, no_tqdm):
    s = stderr(False)
    bar = Progress(1000, enabled=True)
    bar.update(1000)
    bar.extend(500)  # a second look at suspect entries, planned once the first pass is in
    bar.update(250)
    bar.update(250)
    bar.close()
    out = s.getvalue()
    assert "1,500/1,500 evals, done in" in out.splitlines()[-1]
    assert "1,000/1,000" not in out  # the first pass was not shown as the end


def test_eta_follows_the_recent_rate(monkeypatch, stderr):
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    stderr(False)
    bar = Progress(2000, enabled=True)
    for _ in range(10):  # 1,000 cheap evaluations in 10 s
        clock[0] += 1.0
        bar.update(100)
    for _ in range(30):  # then 10 times costlier: 100 evaluations in 10 s
        clock[0] += 1.0
        bar.update(10)
    # 700 left at 10 per second: 70 s, not the 700 × (40 s / 1,300) ≈ 22 s of the average since the start.
    assert bar._eta(clock[0]) == pytest.approx(70.0)


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_a_check_shorter_than_after_s_writes_nothing_and_a_longer_one_a_line_every_ten_seconds(stderr, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", clock)
    s = stderr(False)
    short = Progress(1_000, enabled=True, after_s=10.0)
    for _ in range(10):
        clock.t += 0.5
        short.update(100)
    short.close()
    assert s.getvalue() == ""  # 5 s: the many short checks of a test suite stay silent
    slow = Progress(1_000, enabled=True, after_s=10.0)
    for _ in range(60):  # one evaluation a second: no new tenth in most 10 s windows
        clock.t += 1.0
        slow.update(1)
    slow.close()
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("jgradcheck: 10/1,000 evals (1%), 10.0 s elapsed")
    assert len(lines) == 6 + 1  # at 10, 20, ... 60 s, then the last line
    assert lines[-1] == "jgradcheck: 60/1,000 evals, done in 1 min 00 s"


def test_a_stopped_check_says_stopped_not_done(stderr):
    s = stderr(False)
    bar = Progress(1_000, enabled=True)
    bar.update(500)
    bar.close(stopped=True)
    assert s.getvalue().splitlines()[-1].startswith("jgradcheck: 500/1,000 evals, stopped after")


def test_the_default_shows_a_log_progress_only_after_ten_seconds(monkeypatch):
    from jgradcheck._src.options import LONG_CHECK_S, show_progress

    monkeypatch.setattr(sys, "stderr", _Stream(False))
    assert show_progress(None, 10**6) == {"enabled": True, "after_s": LONG_CHECK_S}
    assert show_progress(False, 10**6) == {"enabled": False, "after_s": 0.0}
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    assert show_progress(None, 10**6) == {"enabled": True, "after_s": 0.0}
    assert show_progress(None, 100) == {"enabled": True, "after_s": LONG_CHECK_S}


def test_tqdm_is_not_imported_for_a_log(stderr, monkeypatch):
    imported = []
    monkeypatch.setattr(progress_mod, "_tqdm_class", lambda: imported.append(1))
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    stderr(False)
    assert Progress(10, enabled=True, after_s=10.0).kind == "lines" and not imported  # 0.1 s saved per process
