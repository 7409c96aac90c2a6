"""Row failures: what went wrong with one row, and when a failed row is tried again.

A row the model cannot embed keeps its old vector (if any) and gets a failure record
(:class:`~qwen3_pipeline.store.failure_log.FailureLog`). This module holds the pure parts:
:class:`RowFailure` (the step that failed, the error's type and its scrubbed message),
:class:`FailurePolicy` (exponential backoff from ``retry_backoff_s``, doubling, capped; after
``max_attempts`` the row is quarantined) and :func:`next_attempt` (the record after one more
failure).

Example:
    >>> policy = FailurePolicy(max_attempts=3, retry_backoff_s=60)
    >>> [policy.delay_s(n) for n in (1, 2, 3)]
    [60.0, 120.0, 240.0]
    >>> policy.status(2), policy.status(3)
    ('retrying', 'quarantined')
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from qwen3_pipeline.core.errors import ConfigError, redact_secrets

DEFAULT_MAX_ATTEMPTS = 5
"""Failed attempts after which a row is quarantined (not sent to the model again)."""

DEFAULT_RETRY_BACKOFF_S = 300.0
"""Seconds before the first retry of a failed row; each later retry waits twice as long."""

MAX_RETRY_DELAY_S = 86_400.0
"""The longest wait between two attempts (a day), whatever the backoff doubles to."""

MAX_MESSAGE_CHARS = 500
"""Error messages are stored and shown up to this length."""


class FailureStep(StrEnum):
    """Where a row failed.

    ``tokenize`` and ``embed`` are recorded per row. ``render`` (the template) and ``write``
    (the LanceDB commit) cannot fail for one row alone: a template is validated before anything
    is read, and a commit writes a whole chunk of rows or none of them (the refresh stops, and
    the next one redoes the chunk). The names are kept so every record says its step in the
    same terms.
    """

    RENDER = "render"
    TOKENIZE = "tokenize"
    EMBED = "embed"
    WRITE = "write"


class FailureStatus(StrEnum):
    """A failure record's state: tried again when due, or left out until replayed."""

    RETRYING = "retrying"
    QUARANTINED = "quarantined"


class RowFailure(str):
    """Why one row could not be embedded: its message, with the step and the error's type.

    It *is* its message (a ``str``), so code that shows or compares reasons as text keeps
    working; ``step`` and ``error_type`` say more.

    Attributes:
        step: Where it failed (a :class:`FailureStep` value).
        error_type: The exception's class name (``"OutOfMemoryError"``, ``"ValueError"``).
        message: What went wrong, secrets scrubbed, at most :data:`MAX_MESSAGE_CHARS`.

    Example:
        >>> failure = RowFailure("embed", "ValueError", "bad row")
        >>> failure.step, failure.error_type, "bad" in failure
        ('embed', 'ValueError', True)
    """

    step: str
    error_type: str

    def __new__(cls, step: str, error_type: str, message: str) -> "RowFailure":  # noqa: D102
        failure = super().__new__(cls, message)
        failure.step = str(step)
        failure.error_type = error_type
        return failure

    @property
    def message(self) -> str:
        """The message, as a plain ``str``."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return (
            f"RowFailure(step={self.step!r}, error_type={self.error_type!r}, "
            f"message={self.message!r})"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Crosses process boundaries (Ray actors) with its step and type.
        return (RowFailure, (self.step, self.error_type, self.message))

    @classmethod
    def of_error(cls, step: FailureStep, error: BaseException) -> "RowFailure":
        """The failure of one row that raised ``error`` at ``step``.

        Example:
            >>> RowFailure.of_error(FailureStep.EMBED, ValueError("bad row"))
            RowFailure(step='embed', error_type='ValueError', message='bad row')
        """
        return cls(str(step), type(error).__name__, clean_message(str(error)))


def as_row_failure(reason: "RowFailure | str") -> RowFailure:
    """A reason as an embedder reports it (a :class:`RowFailure`, or text from older embedders).

    Example:
        >>> as_row_failure("non-finite vector")
        RowFailure(step='embed', error_type='EmbeddingFailed', message='non-finite vector')
    """
    if isinstance(reason, RowFailure):
        return reason
    return RowFailure(str(FailureStep.EMBED), "EmbeddingFailed", clean_message(str(reason)))


def clean_message(message: str) -> str:
    """``message`` with secrets scrubbed, on one line, cut to :data:`MAX_MESSAGE_CHARS`."""
    one_line = " ".join(redact_secrets(message).split())
    if len(one_line) <= MAX_MESSAGE_CHARS:
        return one_line
    return one_line[: MAX_MESSAGE_CHARS - 1] + "…"


@dataclass(frozen=True, kw_only=True)
class FailurePolicy:
    """When failed rows are tried again, and when they are given up on.

    Attributes:
        max_attempts: Failed attempts after which a row is quarantined: not sent to the model
            again until its text changes or it is replayed.
        retry_backoff_s: Seconds before the first retry; each later one waits twice as long,
            up to :data:`MAX_RETRY_DELAY_S`. 0 retries failed rows on every refresh.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(
                f"max_attempts must be a positive integer (default {DEFAULT_MAX_ATTEMPTS}), "
                f"got {attempts!r}"
            )
        backoff = self.retry_backoff_s
        if (
            isinstance(backoff, bool)
            or not isinstance(backoff, int | float)
            or not 0 <= float(backoff) <= MAX_RETRY_DELAY_S  # NaN fails too
        ):
            raise ConfigError(
                f"retry_backoff_s must be seconds in 0..{MAX_RETRY_DELAY_S:.0f} "
                f"(default {DEFAULT_RETRY_BACKOFF_S:.0f}), got {backoff!r}"
            )

    def delay_s(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(float(self.retry_backoff_s) * 2.0 ** max(attempts - 1, 0), MAX_RETRY_DELAY_S)

    def status(self, attempts: int) -> str:
        """``quarantined`` once ``attempts`` reaches ``max_attempts``, else ``retrying``."""
        if attempts >= self.max_attempts:
            return str(FailureStatus.QUARANTINED)
        return str(FailureStatus.RETRYING)


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """A failure record's counters: how often and since when a row's text has failed.

    Attributes:
        attempts: Failed attempts of this text.
        first_failed_at: When this text first failed (naive UTC).
        last_failed_at: When it last failed.
        next_retry_at: When a refresh may try it again (quarantined rows: never, unless
            replayed; the time is kept for reference).
        status: A :class:`FailureStatus` value.
    """

    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_retry_at: datetime
    status: str


def next_attempt(
    previous: Attempt | None, *, same_text: bool, now: datetime, policy: FailurePolicy
) -> Attempt:
    """The record of a row after it failed once more at ``now``.

    A row whose text changed since its last failure starts counting again.

    Example:
        >>> from datetime import datetime
        >>> policy = FailurePolicy(max_attempts=2, retry_backoff_s=10)
        >>> first = next_attempt(None, same_text=False, now=datetime(2026, 1, 1), policy=policy)
        >>> first.attempts, first.next_retry_at.second, first.status
        (1, 10, 'retrying')
        >>> second = next_attempt(first, same_text=True, now=datetime(2026, 1, 1), policy=policy)
        >>> second.attempts, second.status
        (2, 'quarantined')
    """
    carried = previous if previous is not None and same_text else None
    attempts = 1 if carried is None else carried.attempts + 1
    return Attempt(
        attempts=attempts,
        first_failed_at=now if carried is None else carried.first_failed_at,
        last_failed_at=now,
        next_retry_at=now + timedelta(seconds=policy.delay_s(attempts)),
        status=policy.status(attempts),
    )
