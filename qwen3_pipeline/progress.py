"""Progress reporting for long calls: a bar on a terminal, periodic log lines otherwise."""

import logging
import sys
import time
from types import TracebackType
from typing import Any

logger = logging.getLogger("qwen3_pipeline")


class Progress:
    """Report progress of ``total`` units of work.

    On an interactive stderr it draws a tqdm bar; otherwise (Dagster runs, CI, log files) it
    logs one line at most every ``log_every_s`` seconds and one at the end, so long jobs are
    visibly alive without flooding logs.

    Args:
        total: Units of work expected (rows, tokens...).
        description: What is being done, shown in the bar or log line.
        unit: Name of one unit.
        enabled: Set ``False`` to report nothing.
        log_every_s: Minimum seconds between log lines when not on a terminal.

    Example:
        >>> with Progress(3, "embedding", enabled=False) as progress:
        ...     progress.update(3)
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "rows",
        enabled: bool = True,
        log_every_s: float = 10.0,
    ) -> None:
        self.total = total
        self.done = 0
        self._description = description
        self._unit = unit
        self._enabled = enabled
        self._log_every_s = log_every_s
        self._started = time.perf_counter()
        self._last_log = self._started
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, leave=False)

    def update(self, n: int, **postfix: Any) -> None:
        """Record ``n`` more units done; ``postfix`` values are shown beside the bar."""
        self.done += n
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            self._log(now, postfix)

    def _log(self, now: float, postfix: dict[str, Any]) -> None:
        rate = self.done / max(now - self._started, 1e-9)
        extra = "".join(f" {k}={v}" for k, v in postfix.items())
        # The total is an estimate (e.g. the stored row count); never show done/total past it.
        of_total = f"/{self.total}" if self.total >= self.done else ""
        logger.info(
            "%s: %d%s %s (%.1f %s/s)%s",
            self._description,
            self.done,
            of_total,
            self._unit,
            rate,
            self._unit,
            extra,
        )

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
