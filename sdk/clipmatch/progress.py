"""A one-line progress bar with rate and ETA, on stderr; used by indexing and training.

On a terminal the line is redrawn in place (at most every ``interval_s``);
when stderr is a file or a pipe (a CI log, ``nohup``), a full line is
written every ``log_interval_s`` instead, so logs stay readable.

    index [########------------]  4096/10000  41%  812 images/s  eta 0:07
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 20


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = "", unit: str = "it",
                 stream: TextIO | None = None, interval_s: float = 0.2, log_interval_s: float = 5.0):
        self.total, self.done, self.enabled, self.desc, self.unit = total, initial, enabled, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if self.tty else log_interval_s
        self.start, self.first, self.last_print = time.perf_counter(), initial, float("-inf")
        self.loss: float | None = None
        self.shown = -1  # the count the last line showed
        self.closed = False

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else time.perf_counter()) - self.start, 1e-9)
        rate = (self.done - self.first) / elapsed
        left = self.total - self.done
        eta = 0.0 if left <= 0 else (left / rate if rate > 0 else float("inf"))
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * _WIDTH)
        width = len(str(self.total))
        loss = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        return (f"{self.desc} [{'#' * filled}{'-' * (_WIDTH - filled)}] {self.done:>{width}}/{self.total}"
                f" {frac:4.0%}  {rate:.{0 if rate >= 100 else 1}f} {self.unit}/s  eta {_clock(eta)}{loss}")

    def update(self, n: int = 1, *, loss: float | None = None) -> None:
        self.done += n
        if loss is not None:
            self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        now = time.perf_counter()
        if self.enabled and (now - self.last_print >= self.interval_s or self.done >= self.total):
            self.last_print = now
            self._write(self.line(now))

    def _write(self, text: str) -> None:
        self.shown = self.done
        self.stream.write(f"\r{text}  " if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and not self.closed:
            self.closed = True
            if self.shown != self.done:
                self._write(self.line())  # where it stopped
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
