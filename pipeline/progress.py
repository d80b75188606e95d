"""Progress of a long loop in the run's log: how far, how fast, how long to go.

Tokenizing, evaluating, generating and benchmarking can each take minutes; a line every few seconds in the
Prefect run log (the UI shows it) says the run is alive and when it will be done. `Progress` writes through
any `log(message)` callable: the run logger's `info` inside a stage, `print` inside the training process
(whose output the train task forwards to the run log line by line).
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_EVERY_SECONDS = 10.0
"""Least time between two progress lines (the last line always shows)."""


def stage_log() -> Callable[[str], None]:
    """The run logger's `info` inside a Prefect run (this module's logger outside one)."""
    from pipeline.stage import run_logger

    logger = run_logger()
    return lambda message: logger.info("%s", message)


class Progress:
    """Counts done units of a loop and logs '<what>: done/total (share), rate/s, ~eta s left' every few seconds."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "rows",
        log: Callable[[str], None] | None = None,
        every: float = DEFAULT_EVERY_SECONDS,
    ) -> None:
        """In: what the loop does ('tokenize'), the total when known, the unit's name, where lines go (default: the
        run log), and the least seconds between lines."""
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.log = log or stage_log()
        self.done = 0
        self.started = self._last = time.perf_counter()

    def line(self) -> str:
        """The progress line for now."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate else float("inf")
            return (
                f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}), "
                f"{rate:,.1f} {self.unit}/s, ~{left:,.0f} s left"
            )
        return f"{self.what}: {self.done:,} {self.unit}, {rate:,.1f} {self.unit}/s, {elapsed:,.0f} s so far"

    def advance(self, count: int = 1) -> None:
        """Count `count` more units done; logs a line when `every` seconds passed since the last one."""
        self.done += count
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self.log(self.line())

    def finish(self) -> None:
        """Log the final line."""
        self.log(self.line().split(", ~")[0] + " (done)")
