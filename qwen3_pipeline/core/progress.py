"""Progress reporting for long calls: a bar on a terminal, periodic log lines otherwise."""

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from qwen3_pipeline.core.errors import ConfigError

logger = logging.getLogger("qwen3_pipeline")

PROGRESS_SECONDS_ENV = "QWEN3_PIPELINE_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 10.0


def progress_interval(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between progress log lines: ``QWEN3_PIPELINE_PROGRESS_SECONDS``, default 10.

    Raises:
        ConfigError: The variable is not a positive number.

    Example:
        >>> progress_interval({"QWEN3_PIPELINE_PROGRESS_SECONDS": "2.5"})
        2.5
    """
    raw = (os.environ if environ is None else environ).get(PROGRESS_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_PROGRESS_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{PROGRESS_SECONDS_ENV}={raw!r}: use a positive number of seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """Format seconds for a log line: ``45s``, ``3m12s``, ``2h05m``.

    Example:
        >>> format_duration(45.2), format_duration(192), format_duration(7500)
        ('45s', '3m12s', '2h05m')
    """
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """Report progress of ``total`` units of work (and optionally of ``tokens_total`` tokens).

    On an interactive stderr it draws a tqdm bar; otherwise (Dagster runs, CI, log files) it
    logs one line at most every ``log_every_s`` seconds and one at the end, so long jobs are
    visibly alive without flooding logs. With exact totals (a refresh plan's rows and tokens)
    the line shows done/total, the rate and an ETA; with an estimate it never shows a total
    that was already passed.

    Args:
        total: Units of work expected (rows...).
        description: What is being done, shown in the bar or log line.
        unit: Name of one unit.
        tokens_total: Tokens expected, when known; the ETA is then computed from tokens.
        enabled: Set ``False`` to report nothing.
        log_every_s: Minimum seconds between log lines when not on a terminal (default:
            :func:`progress_interval`).

    Example:
        >>> with Progress(3, "embedding", tokens_total=30, enabled=False) as progress:
        ...     progress.update(3, tokens=30)
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "rows",
        tokens_total: int | None = None,
        enabled: bool = True,
        log_every_s: float | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.tokens_total = tokens_total
        self.tokens_done = 0
        self._description = description
        self._unit = unit
        self._enabled = enabled
        self._log_every_s = progress_interval() if log_every_s is None else log_every_s
        self._started = time.perf_counter()
        self._last_log = self._started
        # The rate behind the ETA is measured from the first report on: the time before it
        # (a model loading, the drift canary) says nothing about the pace of the work.
        self._first: tuple[float, int, int] | None = None
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, leave=False)

    def update(self, n: int, *, tokens: int = 0, **postfix: Any) -> None:
        """Record ``n`` more units (and ``tokens``) done; ``postfix`` values are shown too."""
        self.done += n
        self.tokens_done += tokens
        if self._first is None:
            self._first = (time.perf_counter(), self.done, self.tokens_done)
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if tokens:
                postfix = {"tokens": self.tokens_done, **postfix}
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            self._log(now, postfix)

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the pace since the first report; None until a pace is measured.

        Example:
            >>> progress = Progress(100, "work", enabled=False)
            >>> progress.update(1)
            >>> progress.eta_seconds() is None  # one report: no pace yet
            True
        """
        if self._first is None:
            return None
        since, done, tokens = self._first
        elapsed = (now or time.perf_counter()) - since
        if self.tokens_total and self.tokens_done > tokens:
            left = max(self.tokens_total - self.tokens_done, 0)
            return left * elapsed / (self.tokens_done - tokens)
        if self.done > done and self.total >= self.done:
            return (self.total - self.done) * elapsed / (self.done - done)
        return None

    def _log(self, now: float, postfix: dict[str, Any]) -> None:
        elapsed = max(now - self._started, 1e-9)
        # The total may be an estimate (e.g. the stored row count); never show done/total past it.
        of_total = f"/{self.total}" if self.total >= self.done else ""
        parts = [f"{self.done}{of_total} {self._unit}"]
        if self.tokens_total is not None:
            parts.append(f"{self.tokens_done}/{self.tokens_total} tokens")
            rate = f"{self.tokens_done / elapsed:.0f} tokens/s"
        else:
            rate = f"{self.done / elapsed:.1f} {self._unit}/s"
        eta = self.eta_seconds(now)
        tail = f", ETA {format_duration(eta)}" if eta is not None and self.done < self.total else ""
        if self.total >= self.done and self.total:
            share = (
                self.tokens_done / self.tokens_total
                if self.tokens_total
                else self.done / self.total
            )
            parts.insert(0, f"{min(share, 1.0):.0%}")
        extra = "".join(f" {k}={v}" for k, v in postfix.items())
        logger.info("%s: %s (%s%s)%s", self._description, ", ".join(parts), rate, tail, extra)

    def close(self) -> None:
        """Close the bar, or log the final line when the call was long enough to log."""
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and time.perf_counter() - self._started >= self._log_every_s:
            self._log(time.perf_counter(), {})

    def __enter__(self) -> "Progress":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextmanager
def engine_logs_at_info() -> Iterator[None]:
    """Let the engine's INFO progress lines through while the block runs, then restore.

    The engine reports progress on the ``qwen3_pipeline`` logger at INFO; an orchestrator's
    task or run log shows them whatever level its own logging gives that logger.
    """
    engine = logging.getLogger("qwen3_pipeline")
    previous = engine.level
    if engine.getEffectiveLevel() > logging.INFO:
        engine.setLevel(logging.INFO)
    try:
        yield
    finally:
        engine.setLevel(previous)
