"""Watermark change capture: read only the rows whose ``updated_at`` moved past a stored mark.

A refresh with ``SourceConfig(updated_at="col", watermark=Watermark(...))`` reads, with their
text, only the rows where ``col > mark - lag`` (plus the keys of failed rows due for a retry):
a :class:`RowFilter` the source applies where the data lives (a ``WHERE`` in DuckDB and
PostgreSQL, DuckDB's ``read_parquet`` with the same ``WHERE`` for Parquet, an Arrow filter in
memory). Deletes are found by a key-only read of the source (:attr:`Watermark.key_scan`).

Behaviour at the edges (each tested):

- **Null ``updated_at``**: a row with a null time is never selected by the mark. It is read by
  the first watermark refresh of a scope (which reads everything) and by any plain refresh
  (no watermark), the way to reconcile everything; the key scan still sees it (it is not
  deleted).
- **``updated_at`` moving backwards** (an edit stamped earlier than ``mark - lag``): not read
  by the watermark; a plain refresh picks it up. Late commits within ``lag`` seconds of the
  mark are read: set ``lag`` to the longest time a writer's transaction can stay open (with
  no lag, a row committed after the refresh with a time equal to the mark is not read).
- The mark of a scope is the largest ``updated_at`` of the rows it read, and it is stored only
  after the refresh's last commit: a refresh killed at any point leaves the old mark, and the
  next one reads those rows again (those already stored are unchanged: no model call).

Example:
    >>> Watermark(lag_s=60, key_scan=4).scans_keys(refreshes_since_scan=4)
    True
    >>> Watermark(key_scan="never").scans_keys(refreshes_since_scan=100)
    False
"""

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError

logger = logging.getLogger("qwen3_pipeline")

KEY_SCAN_EVERY = "every"
KEY_SCAN_NEVER = "never"


@dataclass(frozen=True, kw_only=True)
class Watermark:
    """Read only changed rows, by a high-water mark on ``SourceConfig.updated_at``.

    Attributes:
        lag_s: Seconds subtracted from the stored mark before reading, so rows committed late
            with an earlier ``updated_at`` (a long transaction) are still read.
        key_scan: When a refresh reads the source's keys (the key column only) to find
            deletes: ``"every"`` refresh (the default), every N-th refresh (an int >= 1),
            or ``"never"`` (deletes then come only from plain refreshes).
    """

    lag_s: float = 0.0
    key_scan: str | int = KEY_SCAN_EVERY

    def __post_init__(self) -> None:
        lag = self.lag_s
        if isinstance(lag, bool) or not isinstance(lag, int | float) or not 0 <= lag < 10**9:
            raise ConfigError(f"watermark lag must be seconds >= 0, got {lag!r}")
        scan = self.key_scan
        if isinstance(scan, str) and scan.isdigit():
            object.__setattr__(self, "key_scan", int(scan))
            scan = int(scan)
        valid = scan in (KEY_SCAN_EVERY, KEY_SCAN_NEVER) or (
            isinstance(scan, int) and not isinstance(scan, bool) and scan >= 1
        )
        if not valid:
            raise ConfigError(
                f"key_scan must be 'every', 'never' or a number of refreshes >= 1, got {scan!r}"
            )

    def scans_keys(self, *, refreshes_since_scan: int) -> bool:
        """Whether this refresh reads the source's keys, ``refreshes_since_scan`` after the last.

        Args:
            refreshes_since_scan: Watermark refreshes of the scope since its last key scan,
                this one included.
        """
        if self.key_scan == KEY_SCAN_EVERY:
            return True
        if self.key_scan == KEY_SCAN_NEVER:
            return False
        return refreshes_since_scan >= int(self.key_scan)


@dataclass(frozen=True)
class RowFilter:
    """Rows where ``column > since``, or whose ``key_column`` value is one of ``keys``.

    Attributes:
        column: The ``updated_at`` column.
        since: Rows later than this time are read (UTC, tz-aware).
        key_column: The key column.
        keys: Keys read whatever their time (failed rows due for a retry); may be empty.
    """

    column: str
    since: datetime
    key_column: str
    keys: tuple[Any, ...] = ()

    def mask(self, batch: pa.RecordBatch | pa.Table) -> pa.Array:
        """The filter over in-memory rows (nulls are not selected)."""
        moments = batch.column(self.column)
        if isinstance(moments, pa.ChunkedArray):
            moments = moments.combine_chunks()
        selected = pc.greater(_utc(moments), pa.scalar(self.since, pa.timestamp("us", "UTC")))
        if self.keys:
            keys = batch.column(self.key_column)
            listed = pc.is_in(keys, value_set=pa.array(list(self.keys)).cast(keys.type))
            selected = pc.or_kleene(selected, listed)
        return pc.fill_null(selected, False)

    def sql(
        self, column_type: pa.DataType, quote: Any, *, placeholder: str = "?"
    ) -> tuple[str, list[Any]]:
        """A SQL ``WHERE`` clause and its parameters (``?`` or ``%s`` placeholders).

        A naive timestamp column is compared with the naive UTC time (how the engine reads
        naive times), a tz-aware one with the aware time.
        """
        since: datetime = self.since
        if not (pa.types.is_timestamp(column_type) and column_type.tz):
            since = since.astimezone(UTC).replace(tzinfo=None)
        clause = f"{quote(self.column)} > {placeholder}"
        params: list[Any] = [since]
        if self.keys:
            marks = ", ".join([placeholder] * len(self.keys))
            clause = f"({clause} OR {quote(self.key_column)} IN ({marks}))"
            params.extend(self.keys)
        return clause, params


def _utc(values: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(values.type):
        if values.type.tz is None:
            return values.cast(pa.timestamp(values.type.unit, "UTC"))
        return values
    return values.cast(pa.timestamp("us", "UTC"))


def filtered_batches(
    source: Any, columns: Sequence[str], batch_rows: int, where: RowFilter
) -> Iterator[pa.RecordBatch]:
    """The rows of ``source`` that ``where`` selects, read where the data lives if it can.

    A source with ``batches_where(columns, batch_rows, where)`` (every source of this
    package) filters itself; any other source is read whole and filtered in memory (correct,
    not cheaper than a full read: a warning says so).
    """
    own = getattr(source, "batches_where", None)
    if callable(own):
        yield from own(columns, batch_rows, where)
        return
    logger.warning(
        "source %s cannot filter by %s itself: reading it whole and filtering in memory "
        "(implement batches_where() to push the watermark down)",
        getattr(source, "name", source),
        where.column,
    )
    wanted = list(dict.fromkeys([*columns, where.column, where.key_column]))
    for batch in source.batches(wanted, batch_rows):
        kept = batch.filter(where.mask(batch))
        if kept.num_rows:
            yield kept.select(list(columns))
