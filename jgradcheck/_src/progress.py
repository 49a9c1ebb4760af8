"""Progress of a long check, shown in the form that fits where stderr goes.

* ``tqdm`` when it is installed and stderr is a terminal or a notebook (``tqdm.auto``: the bar
  JAX users already know, a widget in Jupyter);
* otherwise, on a terminal, a one-line bar with ETA (no dependency);
* otherwise (CI logs, files) a few plain lines, one per tenth of the work and at least one every
  ``LINE_EVERY_S`` seconds, with no carriage returns.

Nothing is ever written unless ``enabled``, and nothing before ``after_s`` seconds (a check's
default: one that ends sooner prints nothing; a long one says where it is, even in a log). The
total is every evaluation the check does: the engine may do more than first planned (a second
look at suspect entries), announced with :meth:`Progress.extend`, or found when they arrive (the
total then grows to the count done:
"800,020/800,000" or "ETA -0.0s" helps no one). The ETA is the work left at the rate measured
over the recent work, not since the start: compilation, and leaves that cost more per entry than
the first ones, would otherwise make it promise too little.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any, TextIO

# Plain-line mode: one line per this fraction of the work (at most 10 lines, plus the last)...
LINE_STEP = 0.1
# ... and one at least this often, however slowly the work goes.
LINE_EVERY_S = 10.0
# Width of the built-in terminal bar, in characters.
BAR_WIDTH = 30
# The ETA's rate is measured over the updates of the last RATE_WINDOW_S seconds (at least the
# last two): recent enough to follow a change in cost per evaluation, long enough to average
# over the engine's blocks.
RATE_WINDOW_S = 20.0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _tqdm_class() -> Any:
    """``tqdm.auto.tqdm`` (a notebook widget under Jupyter), or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm


def _in_notebook(tqdm_cls: Any) -> bool:
    """``tqdm.auto`` builds on its notebook class (a widget) only inside a Jupyter kernel."""
    return any(c.__name__ == "tqdm_notebook" for c in getattr(tqdm_cls, "__mro__", ()))


def duration(s: float) -> str:
    """``12.3 s`` or ``2 min 05 s``: a duration as the progress lines and notes write it."""
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _eta_words(s: float) -> str:
    return duration(s) if s == s else "? s"  # NaN: no rate measured yet


class Progress:
    """Progress of ``total`` cost evaluations on stderr; silent unless ``enabled``.

    Attributes:
      total: evaluations planned, second looks included (:meth:`extend`; never below ``done``
        once shown).
      enabled: whether anything is shown.
      done: evaluations reported so far through :meth:`update`.
      label: the prefix of every line.
      kind: ``"tqdm"``, ``"bar"`` (a terminal without tqdm), ``"lines"`` (not a terminal) or
        ``"off"``.
    """

    def __init__(self, total: int, enabled: bool, label: str = "jgradcheck", after_s: float = 0.0):
        self.total, self.enabled, self.label = int(total), bool(enabled), label
        self.after_s = float(after_s)
        self.done = 0
        self.start = time.perf_counter()
        self._stream: TextIO = sys.stderr
        self._shown = 0  # clamped count already shown (tqdm) or last tenth printed (lines)
        self._last_line = self.start  # when the last plain line was written
        self._written = False  # whether anything was written (close() then ends the display)
        self._closed = False
        self._tqdm: Any = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque([(self.start, 0)])
        self.kind = "off"
        if not self.enabled:
            return
        tty = _isatty(self._stream)
        # Importing tqdm costs about 0.1 s: only where it may be used (a terminal, a notebook's kernel).
        tqdm_cls = _tqdm_class() if tty or "ipykernel" in sys.modules else None
        if tqdm_cls is not None and (tty or _in_notebook(tqdm_cls)):
            self.kind = "tqdm"
            self._tqdm = tqdm_cls(
                total=self.total,
                desc=label,
                unit="evals",
                unit_scale=True,
                file=self._stream,
                leave=True,
                **({"delay": self.after_s} if self.after_s > 0 else {}),
            )
            self._written = True
        else:
            self.kind = "bar" if tty else "lines"

    def _clamped(self) -> int:
        return min(self.done, self.total)

    def extend(self, n: int) -> None:
        """Adds ``n`` evaluations to the total (a second look, planned once the first is in)."""
        self.total += max(0, int(n))
        if self.enabled and not self._closed and self.kind == "tqdm":
            self._tqdm.total = self.total
            self._tqdm.refresh()

    def update(self, n: int) -> None:
        """Records ``n`` more evaluations and shows them (unannounced ones grow the total)."""
        self.done += int(n)
        now = time.perf_counter()
        self._recent.append((now, self.done))
        while len(self._recent) > 2 and now - self._recent[1][0] > RATE_WINDOW_S:
            self._recent.popleft()
        if not self.enabled or self._closed:
            return
        if self.done > self.total:
            self.extend(self.done - self.total)
        if self.kind == "tqdm":
            shown = self._clamped()
            if shown > self._shown:
                self._tqdm.update(shown - self._shown)
                self._shown = shown
        elif now - self.start < self.after_s:
            return
        elif self.kind == "bar":
            self._write_bar()
        else:
            self._write_line(now)

    def _eta(self, elapsed: float) -> float:
        """Seconds left: the evaluations left at the recent rate (see ``RATE_WINDOW_S``)."""
        left = self.total - self._clamped()
        if left <= 0:
            return 0.0
        (t0, d0), (t1, d1) = self._recent[0], self._recent[-1]
        if d1 <= d0 or t1 <= t0:
            return float("nan")
        return left * (t1 - t0) / (d1 - d0)

    def _write_bar(self) -> None:
        self._written = True
        elapsed = time.perf_counter() - self.start
        shown = self._clamped()
        frac = shown / max(1, self.total)
        bar = "#" * int(BAR_WIDTH * frac)
        eta_s = _eta_words(self._eta(elapsed))
        self._stream.write(
            f"\r{self.label} [{bar:<{BAR_WIDTH}}] {shown:,}/{self.total:,} evals  "
            f"{duration(elapsed)} elapsed  ETA {eta_s}   "
        )
        self._stream.flush()

    def _write_line(self, now: float) -> None:
        tenth = int(self._clamped() * round(1 / LINE_STEP) // max(1, self.total))
        if tenth >= round(1 / LINE_STEP):
            return  # the end: close() writes the last line
        if tenth <= self._shown and now - self._last_line < LINE_EVERY_S:
            return  # nothing new, and the last line is recent
        self._shown = max(self._shown, tenth)
        self._last_line = now
        self._written = True
        elapsed = now - self.start
        percent = int(100 * self._clamped() // max(1, self.total))
        self._stream.write(
            f"{self.label}: {self._clamped():,}/{self.total:,} evals ({percent}%), "
            f"{duration(elapsed)} elapsed, about {_eta_words(self._eta(elapsed))} left\n"
        )
        self._stream.flush()

    def close(self, stopped: bool = False) -> None:
        """Ends the display (the last line says how long it took, or that the work ``stopped``
        before its end); idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if not self._written and time.perf_counter() - self.start < self.after_s:
            return  # ended before it was to be shown (``after_s``)
        if self.kind == "tqdm":
            self._tqdm.close()
        elif self.kind == "bar":
            self._stream.write("\n")
            self._stream.flush()
        else:
            elapsed = time.perf_counter() - self.start
            how = "stopped after" if stopped else "done in"
            self._stream.write(f"{self.label}: {self._clamped():,}/{self.total:,} evals, {how} {duration(elapsed)}\n")
            self._stream.flush()
