"""A watermark refresh: read only what changed, find deletes from the keys, advance the mark.

With ``SourceConfig.watermark`` set (and not a rebuild), the plan asks
:func:`plan_watermark` what to read:

- no stored mark for the scope (its first watermark refresh, or a mark of another spec): the
  whole scope, as a plain refresh; its mark is recorded afterwards;
- otherwise the rows with ``updated_at >= mark - lag``, plus the keys of failed rows due for a
  retry (:class:`~qwen3_pipeline.sources.watermark.RowFilter`, pushed down into the source).
  The stored state is then looked up for those keys only (:func:`changed_keys`), never for
  the whole table, unless the refresh also scans keys.

Deletes: a key scan (:func:`scan_keys`: the source's key column only) finds the stored keys
the source no longer has; it runs as ``Watermark.key_scan`` says. Rows whose text turned
blank are deleted whenever they are read. The mass-delete guard judges both.

The new mark (the largest ``updated_at`` read, never lower than the old one) is written by
the apply after its last commit (:meth:`WatermarkRead.record`), so a refresh killed at any
point leaves the old mark and the next one reads those rows again.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.changes import ExistingIndex
from qwen3_pipeline.engine.failure_records import FailureRecords
from qwen3_pipeline.engine.options import RefreshRequest
from qwen3_pipeline.sources import RowFilter, Source, SourceConfig
from qwen3_pipeline.sources.watermark import filtered_batches
from qwen3_pipeline.store.watermark_log import WatermarkLog, WatermarkState, scope_label

logger = logging.getLogger("qwen3_pipeline")

_KEYS_PER_READ = 65_536


@dataclass(kw_only=True)
class WatermarkRead:
    """What one watermark refresh reads, and the state it leaves behind.

    Attributes:
        log: The table's watermark log.
        before: The scope's stored state (None: none yet, or of another spec).
        where: The rows read with their text (None: the whole scope).
        key_scan: Whether this refresh reads the source's keys to find deletes.
        scope: The scope's label.
        column: The ``updated_at`` column.
        spec_fingerprint: The spec of the table written.
        max_read: The largest ``updated_at`` among the rows read (set by the scan).
        keys_scanned: Keys read by the key scan.
    """

    log: WatermarkLog
    before: WatermarkState | None
    where: RowFilter | None
    key_scan: bool
    scope: str
    column: str
    spec_fingerprint: str
    max_read: datetime | None = None
    keys_scanned: int = 0

    @property
    def mark_before(self) -> datetime | None:
        """The stored mark this refresh started from."""
        return None if self.before is None else self.before.mark

    @property
    def mark_after(self) -> datetime | None:
        """The mark once this refresh has committed: never lower than before."""
        marks = [m for m in (self.mark_before, self.max_read) if m is not None]
        return max(marks) if marks else None

    def observe(self, updated_at: pa.Array | pa.ChunkedArray) -> None:
        """Note the ``updated_at`` values of rows read (their largest moves the mark)."""
        if not len(updated_at):
            return
        largest = pc.max(updated_at).as_py()
        if largest is not None and (self.max_read is None or largest > self.max_read):
            self.max_read = largest

    def as_dict(self) -> dict[str, Any]:
        """The figures the plan and the report show."""
        return {
            "keys_scanned": self.keys_scanned,
            "watermark_before": _iso(self.mark_before),
            "watermark_after": _iso(self.mark_after),
        }

    def record(self, *, run_id: str) -> None:
        """Store the scope's new state: after the refresh's last commit, never before."""
        scanned = self.key_scan or self.where is None
        since_scan = (
            0 if scanned else (self.before.refreshes_since_key_scan + 1 if self.before else 1)
        )
        state = WatermarkState(
            scope=self.scope,
            column=self.column,
            mark=self.mark_after,
            refreshes_since_key_scan=since_scan,
            spec_fingerprint=self.spec_fingerprint,
        )
        if self.before == state:
            return  # nothing moved: no commit
        self.log.write(state, run_id=run_id)


def plan_watermark(
    request: RefreshRequest,
    spec_fingerprint: str,
    scope: list[str] | None,
    failures: FailureRecords | None,
) -> WatermarkRead | None:
    """What a watermark refresh of ``request`` reads (None: not a watermark refresh).

    Raises:
        StoreError: The watermark log could not be read.
    """
    config, options = request.config, request.options
    watermark = config.watermark
    if watermark is None or options.rebuild or config.updated_at is None:
        return None
    log = WatermarkLog.open(request.db_uri, request.table, storage_options=request.storage_options)
    label = scope_label(scope)
    before = log.read(label)
    if before is not None and (
        before.spec_fingerprint != spec_fingerprint or before.column != config.updated_at
    ):
        logger.info(
            "the watermark of %s (scope %s) is of another spec or column: reading everything",
            request.table,
            label,
        )
        before = None
    where = None
    key_scan = True
    if before is not None and before.mark is not None:
        where = RowFilter(
            column=config.updated_at,
            since=before.mark - timedelta(seconds=float(watermark.lag_s)),
            key_column=config.key,
            keys=_due_keys(failures, request),
        )
        key_scan = watermark.scans_keys(refreshes_since_scan=before.refreshes_since_key_scan + 1)
    return WatermarkRead(
        log=log,
        before=before,
        where=where,
        key_scan=key_scan,
        scope=label,
        column=config.updated_at,
        spec_fingerprint=spec_fingerprint,
    )


def _due_keys(failures: FailureRecords | None, request: RefreshRequest) -> tuple[Any, ...]:
    """Keys of failed rows due for a retry, typed like the source's key column."""
    if failures is None or not len(failures):
        return ()
    keys = failures.due_keys()
    if not len(keys):
        return ()
    key_type = request.source.schema().field(request.config.key).type
    try:
        return tuple(keys.cast(key_type).to_pylist())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return ()


def changed_keys(source: Source, config: SourceConfig, where: RowFilter, rows: int) -> pa.Array:
    """The keys of the rows ``where`` selects (a key-only read through the same filter)."""
    parts = [
        batch.column(0)
        for batch in filtered_batches(source, [config.key], rows, where)
        if batch.num_rows
    ]
    if not parts:
        return pa.array([], source.schema().field(config.key).type)
    return pa.concat_arrays(parts)


def scan_keys(
    existing: ExistingIndex, source: Source, config: SourceConfig, rows: int
) -> tuple[np.ndarray, int]:
    """Read the source's key column: which stored rows it still holds, and how many keys.

    Returns:
        A mask over ``existing`` (True: the key is in the source) and the keys read.
    """
    seen = np.zeros(len(existing), dtype=bool)
    count = 0
    for batch in source.batches([config.key], rows):
        keys = batch.column(0)
        count += len(keys)
        if keys.null_count:
            keys = keys.drop_null()
        found = existing.lookup(keys.cast(existing.key_type))
        seen[found[found >= 0]] = True
    return seen, count


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
