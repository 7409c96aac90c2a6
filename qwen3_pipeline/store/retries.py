"""LanceDB failures, typed and retried: the store's one retry loop and its error classifier.

Every LanceDB exception is typed at the store's boundary by :func:`store_error`, from its
message: commit conflicts (:class:`StoreConflictError`) and I/O hiccups
(:class:`StoreTransientError`) are transient, a missing data file is
:class:`StoreCorruptError` (with how to recover), the rest permanent (:class:`StoreError`).
Concurrent commits that conflict are retried with bounded exponential backoff
(:func:`with_retries`, a :class:`RetryPolicy`), then raise :class:`StoreConflictError` saying
what to do. :func:`run_typed` runs an action once, typing what it raises.

This module changes when LanceDB's error messages or the retry policy do.
"""

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qwen3_pipeline.core.errors import (
    Qwen3PipelineError,
    StoreConflictError,
    StoreCorruptError,
    StoreError,
    StoreTransientError,
)

log = logging.getLogger(__name__)

# LanceDB's conflict messages: "Retryable commit conflict for version N", "Commit conflict for
# version N", "Too many concurrent writers/writes", "Incompatible transaction: This Merge
# transaction is incompatible with concurrent transaction UpdateConfig at version N" (a writer
# that declared the key or built an index in between: nothing was committed, and the operation
# redone on the latest version succeeds), "... still conflicting after N retries" (LanceDB's own
# merge_insert retries ran out). Matched as phrases, never the bare word "retryable" (which
# "non-retryable" contains).
_CONFLICT = re.compile(
    r"commit conflict|too many concurrent|concurrent write|incompatible with concurrent|"
    r"still conflicting",
    re.IGNORECASE,
)
# A data or manifest file that the table's manifest names but the store no longer has. LanceDB
# 0.40 raises a bare RuntimeError ("LanceError(IO): ... Not found: <path>.lance"), nothing
# typed, so the message (and a Lance path in it) is all there is to match.
_MISSING_FILE = re.compile(r"not found|no such file|does not exist", re.IGNORECASE)
_TRANSIENT_IO = re.compile(
    r"timed? ?out|timeout|connection (reset|refused|closed|aborted)|temporarily|throttl|"
    r"slow ?down|service unavailable|too many requests|\b50[234]\b",
    re.IGNORECASE,
)
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Bounded exponential backoff for commit conflicts.

    Attributes:
        attempts: Tries in total (the first included).
        base_delay_s: Sleep before the second try; doubles each time, with jitter.
        max_delay_s: Longest single sleep.
    """

    attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed try number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


def with_retries(
    policy: RetryPolicy,
    what: str,
    action: Callable[[], _T],
    *,
    retryable: Callable[[StoreError], bool] | None = None,
    before_retry: Callable[[], Any] | None = None,
) -> tuple[_T, int]:
    """Run a LanceDB action, typing its errors and retrying the retryable ones with backoff.

    The one retry loop of the store. Exceptions are typed by :func:`store_error`; by default
    only commit conflicts are retried, and when the tries run out the last conflict is raised
    as :class:`StoreConflictError` saying what to do.

    Args:
        policy: Tries and backoff.
        what: What is being done, for messages (``"upsert 10 rows on table 'docs'"``).
        action: The call.
        retryable: Which typed errors to retry (default: conflicts).
        before_retry: Called before each retry (e.g. re-read the latest table version).

    Returns:
        The action's result and the number of tries it took.

    Raises:
        StoreConflictError: Conflicts outlasted the retries.
        StoreError: Any other store failure (typed: transient, corrupt or permanent).
    """
    should_retry = retryable or is_conflict
    for attempt in range(1, policy.attempts + 1):
        try:
            return action(), attempt
        except Qwen3PipelineError as e:
            error: Qwen3PipelineError = e
        except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
            error = store_error(e, what)
        if not isinstance(error, StoreError) or not should_retry(error):
            raise error
        if attempt == policy.attempts:
            if is_conflict(error):
                raise StoreConflictError(
                    f"{what} still conflicted with concurrent writers after {attempt} tries; "
                    "serialise writers to this table (a Dagster concurrency pool) and re-run. "
                    f"Last error: {error}"
                ) from error
            raise error
        delay = policy.delay(attempt)
        log.warning("%s failed (try %d), retrying in %.2fs: %s", what, attempt, delay, error)
        time.sleep(delay)
        if before_retry is not None:
            run_typed(before_retry, "reload the table")
    raise AssertionError("unreachable")


def store_error(error: BaseException, what: str) -> StoreError:
    """Type a LanceDB exception: conflict, missing file, transient I/O, or permanent.

    Example:
        >>> type(store_error(RuntimeError("Retryable commit conflict for version 3"), "x"))
        <class 'qwen3_pipeline.core.errors.StoreConflictError'>
        >>> type(store_error(RuntimeError("non-retryable: schema mismatch"), "x"))
        <class 'qwen3_pipeline.core.errors.StoreError'>
    """
    message = f"LanceDB could not {what}: {error}"
    text = str(error)
    if _CONFLICT.search(text):
        typed: StoreError = StoreConflictError(message)
    elif _MISSING_FILE.search(text) and (".lance" in text or "_versions" in text):
        typed = StoreCorruptError(
            f"{message}. A file of the table is missing (deleted or lost by the object "
            "store); the table cannot be read as it is. Recover by re-running the refresh "
            "with --rebuild (rebuild=True), which re-embeds into a new table and swaps it in, "
            "or restore the missing file from a backup"
        )
    elif _TRANSIENT_IO.search(text) or (
        isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
    ):
        typed = StoreTransientError(message)
    else:
        typed = StoreError(message)
    typed.__cause__ = error
    return typed


def is_conflict(error: BaseException) -> bool:
    """Whether ``error`` is a LanceDB commit conflict (a concurrent writer committed first)."""
    return isinstance(error, StoreConflictError) or bool(_CONFLICT.search(str(error)))


def run_typed(action: Callable[[], _T], what: str) -> _T:
    """Run a LanceDB action once; what it raises comes out typed by :func:`store_error`.

    Args:
        action: The call.
        what: What is being done, for messages (``"read table stats"``).

    Returns:
        The action's result.

    Raises:
        StoreError: The action failed (typed: conflict, transient, corrupt or permanent); the
            package's own errors pass through unchanged.
    """
    try:
        return action()
    except Qwen3PipelineError:
        raise
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError for store failures
        raise store_error(e, what) from e
