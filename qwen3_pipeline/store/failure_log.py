"""The failure log of a vector table: rows that could not be embedded, and when to retry them.

The records live in a side table of the same database, ``<table>__failures``, one row per
document (per source row; a chunk table's document, with the first chunk that failed in
``key``). A refresh reads them when it plans (:meth:`FailureLog.read`) to leave out rows that
are quarantined or not due yet, writes one record per failed row after the commit of its chunk
(:meth:`FailureLog.record_failures`; its old vector, if any, stays), and removes the records
of rows that were embedded, deleted, or found stored with their current text
(:meth:`FailureLog.clear`). Every write is a ``merge_insert`` or delete on ``doc_key``:
repeating one changes nothing more, so a refresh killed between its vector commit and its
record commit is followed by one that converges (the row is retried, or its stale record
dropped). :meth:`FailureLog.replay` makes records due now.

Example:
    >>> log = FailureLog.open("data/lancedb", "docs")  # doctest: +SKIP
    >>> log.read().num_rows  # doctest: +SKIP
    3
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.failures import (
    Attempt,
    FailurePolicy,
    FailureStatus,
    RowFailure,
    next_attempt,
)
from qwen3_pipeline.core.schema import TIMESTAMP_TYPE, validate_table_name
from qwen3_pipeline.store.connection import list_table_names
from qwen3_pipeline.store.retries import run_typed, with_retries
from qwen3_pipeline.store.side_tables import SideTable, read_side_table, upsert_side_rows

FAILURES_SUFFIX = "__failures"

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("doc_key", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("step", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("status", pa.string()),
        pa.field("first_failed_at", TIMESTAMP_TYPE),
        pa.field("last_failed_at", TIMESTAMP_TYPE),
        pa.field("next_retry_at", TIMESTAMP_TYPE),
        pa.field("spec_fingerprint", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("partition_key", pa.string()),
    ]
)
"""One failure record. ``doc_key`` is the source row's key as text (the record's identity);
``key`` the row that failed (the same, or a chunk table's chunk key)."""


def failures_table_name(table: str) -> str:
    """The failure log's table name for the vector table ``table``.

    Example:
        >>> failures_table_name("docs")
        'docs__failures'
    """
    return validate_table_name(f"{table}{FAILURES_SUFFIX}")


@dataclass(frozen=True, kw_only=True)
class FailedRow:
    """One row that failed in this refresh, to be recorded.

    Attributes:
        doc_key: The source row's key, as text.
        key: The row that failed (``doc_key``, or the chunk's key in a chunk table).
        failure: Why.
        content_hash: The hash of the text that failed.
        partition_key: The row's partition (how a refresh of one shard finds its records).
    """

    doc_key: str
    key: str
    failure: RowFailure
    content_hash: str
    partition_key: str = ""


def utc_now() -> datetime:
    """The current time, naive UTC (how the records' times are compared)."""
    return datetime.now(UTC).replace(tzinfo=None)


class FailureLog(SideTable):
    """The failure records of one vector table (the side table may not exist yet).

    Args:
        db: A ``lancedb`` connection to the table's database.
        table: The vector table's name.
        retry: Tries and backoff for commit conflicts.
    """

    suffix = FAILURES_SUFFIX

    def exists(self) -> bool:
        """Whether any failure was ever recorded for the table."""
        return self.name in list_table_names(self.db)

    def read(self, spec_fingerprint: str | None = None) -> pa.Table:
        """Every record (of ``spec_fingerprint`` only, when given), sorted by ``doc_key``.

        Records of another spec describe another model's failures: a rebuild with a new
        spec starts without them.
        """
        rows = read_side_table(self.db, self.name, FAILURE_SCHEMA)
        if spec_fingerprint is not None:
            rows = rows.filter(pc.equal(rows["spec_fingerprint"], spec_fingerprint))
        return rows.select(FAILURE_SCHEMA.names).sort_by("doc_key")

    def record_failures(
        self,
        failed: Sequence[FailedRow],
        *,
        previous: pa.Table,
        spec_fingerprint: str,
        policy: FailurePolicy,
        now: datetime | None = None,
    ) -> pa.Table:
        """Write (upsert) the records of rows that failed once more; one commit.

        Args:
            failed: The rows that failed (one per ``doc_key``: the first one counts).
            previous: Their earlier records (any superset, e.g. :meth:`read` at plan time):
                a row whose text is unchanged since counts one more attempt.
            spec_fingerprint: The spec the rows were embedded with.
            policy: Backoff and quarantine.
            now: The time of the failure (default: now).

        Returns:
            The records written.
        """
        if not failed:
            return FAILURE_SCHEMA.empty_table()
        now = now or utc_now()
        earlier = _attempts_by_doc(previous)
        columns: dict[str, list[Any]] = {name: [] for name in FAILURE_SCHEMA.names}
        seen: set[str] = set()
        for row in failed:
            if row.doc_key in seen:
                continue
            seen.add(row.doc_key)
            prior = earlier.get(row.doc_key)
            attempt = next_attempt(
                None if prior is None else prior[0],
                same_text=prior is not None and prior[1] == row.content_hash,
                now=now,
                policy=policy,
            )
            values = {
                "doc_key": row.doc_key,
                "key": row.key,
                "step": row.failure.step,
                "error_type": row.failure.error_type,
                "message": row.failure.message,
                "attempts": attempt.attempts,
                "status": attempt.status,
                "first_failed_at": attempt.first_failed_at,
                "last_failed_at": attempt.last_failed_at,
                "next_retry_at": attempt.next_retry_at,
                "spec_fingerprint": spec_fingerprint,
                "content_hash": row.content_hash,
                "partition_key": row.partition_key,
            }
            for name, value in values.items():
                columns[name].append(value)
        records = pa.table(
            {name: pa.array(columns[name], FAILURE_SCHEMA.field(name).type) for name in columns},
            schema=FAILURE_SCHEMA,
        )
        self._upsert(records)
        return records

    def clear(self, doc_keys: Iterable[str]) -> int:
        """Remove the records of ``doc_keys`` (embedded, deleted or found current); one commit.

        Returns:
            How many keys were asked to be cleared (0: nothing committed).
        """
        keys = sorted(set(doc_keys))
        if not keys or not self.exists():
            return 0
        table = run_typed(lambda: self.db.open_table(self.name), f"open {self.name!r}")
        for start in range(0, len(keys), 1000):
            predicate = _in_predicate(keys[start : start + 1000])
            with_retries(
                self.retry,
                f"clear {len(keys)} failure record(s) in {self.name!r}",
                lambda p=predicate: table.delete(p),  # type: ignore[misc]
            )
        return len(keys)

    def replay(
        self,
        *,
        keys: Sequence[str] | None = None,
        step: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Make records due now: the next refresh sends their rows to the model again.

        A quarantined record goes back to ``retrying`` with its attempts kept, so a row that
        fails again is quarantined again at once; one whose text changes starts afresh.

        Args:
            keys: Only these ``doc_key`` values (None: every record).
            step: Only records of this failure step.
            now: The time they become due (default: now).

        Returns:
            How many records were made due.

        Raises:
            ConfigError: ``keys`` is empty (pass None for every record).
        """
        if keys is not None and not keys:
            raise ConfigError("replay needs at least one key (or keys=None for every record)")
        rows = self.read()
        if keys is not None:
            rows = rows.filter(pc.is_in(rows["doc_key"], pa.array([str(k) for k in keys])))
        if step is not None:
            rows = rows.filter(pc.equal(rows["step"], step))
        if not rows.num_rows:
            return 0
        due = pa.array([now or utc_now()] * rows.num_rows, TIMESTAMP_TYPE)
        rows = rows.set_column(
            rows.schema.get_field_index("next_retry_at"), "next_retry_at", due
        ).set_column(
            rows.schema.get_field_index("status"),
            "status",
            pa.array([str(FailureStatus.RETRYING)] * rows.num_rows, pa.string()),
        )
        self._upsert(rows)
        return rows.num_rows

    def _upsert(self, records: pa.Table) -> None:
        upsert_side_rows(
            self.db, self.name, FAILURE_SCHEMA, records, on="doc_key", retry=self.retry
        )


def _attempts_by_doc(records: pa.Table) -> dict[str, tuple[Attempt, str]]:
    out: dict[str, tuple[Attempt, str]] = {}
    for row in records.to_pylist():
        out[row["doc_key"]] = (
            Attempt(
                attempts=int(row["attempts"]),
                first_failed_at=_naive(row["first_failed_at"]),
                last_failed_at=_naive(row["last_failed_at"]),
                next_retry_at=_naive(row["next_retry_at"]),
                status=row["status"],
            ),
            row["content_hash"],
        )
    return out


def _naive(stamp: datetime) -> datetime:
    return stamp.astimezone(UTC).replace(tzinfo=None) if stamp.tzinfo else stamp


def _in_predicate(keys: Sequence[str]) -> str:
    quoted = ", ".join("'" + key.replace("'", "''") + "'" for key in keys)
    return f"doc_key IN ({quoted})"
