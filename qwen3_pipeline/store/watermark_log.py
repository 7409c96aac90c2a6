"""The watermarks of a vector table: per scope, how far a watermark refresh has read.

One row per scope (``"*"`` for the whole table, else the scope's partition keys) in the side
table ``<table>__watermarks``: the ``updated_at`` column, the mark (the largest
``updated_at`` the scope's refreshes have read and committed), how many watermark refreshes
ran since the last key scan, and the spec the mark was reached with (a mark of another spec,
after a rebuild with a new model, is not used). A refresh writes its scope's row only after
its last commit of vectors, so the mark never covers rows that are not stored.

Example:
    >>> scope_label(None), scope_label(["shard-01-of-08", "shard-00-of-08"])
    ('*', 'shard-00-of-08,shard-01-of-08')
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.schema import TIMESTAMP_TYPE, validate_table_name
from qwen3_pipeline.store.retries import run_typed
from qwen3_pipeline.store.side_tables import (
    SideTable,
    read_side_table,
    side_table_exists,
    upsert_side_rows,
)

WATERMARKS_SUFFIX = "__watermarks"

WATERMARK_SCHEMA = pa.schema(
    [
        pa.field("scope", pa.string(), nullable=False),
        pa.field("column", pa.string()),
        pa.field("mark", TIMESTAMP_TYPE),
        pa.field("refreshes_since_key_scan", pa.int32()),
        pa.field("spec_fingerprint", pa.string()),
        pa.field("recorded_at", TIMESTAMP_TYPE),
        pa.field("run_id", pa.string()),
    ]
)


def watermarks_table_name(table: str) -> str:
    """The watermark side table's name for ``table``.

    Example:
        >>> watermarks_table_name("docs")
        'docs__watermarks'
    """
    return validate_table_name(f"{table}{WATERMARKS_SUFFIX}")


def scope_label(partition_keys: Sequence[str] | None) -> str:
    """The scope a mark belongs to: ``"*"`` (everything) or its sorted partition keys."""
    return "*" if partition_keys is None else ",".join(sorted(partition_keys))


@dataclass(frozen=True, kw_only=True)
class WatermarkState:
    """How far the watermark refreshes of one scope have read.

    Attributes:
        scope: :func:`scope_label` of the scope.
        column: The ``updated_at`` column the mark is of.
        mark: The largest ``updated_at`` read and committed (UTC), or None (nothing read
            with a time yet).
        refreshes_since_key_scan: Watermark refreshes since the scope's last key scan.
        spec_fingerprint: The spec of the table the mark was reached with.
    """

    scope: str
    column: str
    mark: datetime | None
    refreshes_since_key_scan: int
    spec_fingerprint: str


class WatermarkLog(SideTable):
    """The watermark side table of one vector table.

    Args:
        db: A ``lancedb`` connection to the table's database.
        table: The vector table's name.
        retry: Tries and backoff for commit conflicts.
    """

    suffix = WATERMARKS_SUFFIX

    def read(self, scope: str) -> WatermarkState | None:
        """The state of ``scope``, or None when no watermark refresh of it has committed."""
        rows = read_side_table(self.db, self.name, WATERMARK_SCHEMA)
        rows = rows.filter(pc.equal(rows["scope"], scope)) if rows.num_rows else rows
        if not rows.num_rows:
            return None
        row = rows.slice(rows.num_rows - 1).to_pylist()[0]
        mark = row["mark"]
        return WatermarkState(
            scope=row["scope"],
            column=row["column"],
            mark=None if mark is None else mark.astimezone(UTC),
            refreshes_since_key_scan=int(row["refreshes_since_key_scan"] or 0),
            spec_fingerprint=row["spec_fingerprint"],
        )

    def write(self, state: WatermarkState, *, run_id: str) -> None:
        """Store ``state`` (one commit; writing it again changes nothing more)."""
        row = pa.table(
            {
                "scope": pa.array([state.scope], pa.string()),
                "column": pa.array([state.column], pa.string()),
                "mark": pa.array([state.mark], TIMESTAMP_TYPE),
                "refreshes_since_key_scan": pa.array([state.refreshes_since_key_scan], pa.int32()),
                "spec_fingerprint": pa.array([state.spec_fingerprint], pa.string()),
                "recorded_at": pa.array([datetime.now(UTC)], TIMESTAMP_TYPE),
                "run_id": pa.array([run_id], pa.string()),
            },
            schema=WATERMARK_SCHEMA,
        )
        upsert_side_rows(self.db, self.name, WATERMARK_SCHEMA, row, on="scope", retry=self.retry)

    def forget(self) -> bool:
        """Drop every mark of the table; the next watermark refresh reads everything.

        For a rollback: rows restored to an older version would not be read again by a
        watermark whose mark is past their ``updated_at``.

        Returns:
            Whether there were marks to drop.
        """
        if not side_table_exists(self.db, self.name):
            return False
        run_typed(lambda: self.db.drop_table(self.name), f"drop {self.name!r}")
        return True


def forget_watermarks(
    uri: str, table: str, *, storage_options: dict[str, str] | None = None
) -> bool:
    """:meth:`WatermarkLog.forget` for ``table`` in the database at ``uri``."""
    return WatermarkLog.open(uri, table, storage_options=storage_options).forget()
