"""A watermark refresh: read only what changed, find deletes from the keys, advance the mark.

With ``SourceConfig.watermark`` set (and not a rebuild), the plan asks
:func:`plan_watermark` what to read:

- no stored mark for the scope (its first watermark refresh, or a mark of another spec): the
  whole scope, as a plain refresh; its mark is recorded afterwards;
- otherwise the rows with ``updated_at > mark - lag``, plus the keys of failed rows due for a
  retry (:class:`~qwen3_pipeline.sources.watermark.RowFilter`, pushed down into the source).
  The stored state is then looked up for those keys only (:func:`changed_keys`), never for
  the whole table.

Deletes: a key scan (:func:`scan_stored_keys`: the source's key column only, against the
stored table's key column only) finds the stored keys the source no longer has; it runs as
``Watermark.key_scan`` says, before the stored state is read, so that state is read for the
changed keys and the gone ones alone (:class:`KeyScannedIndex`), never for the whole scope.
Rows whose text turned blank are deleted whenever they are read. The mass-delete guard judges
both.

The new mark (the largest ``updated_at`` read, never lower than the old one) is written by
the apply after its last commit (:meth:`WatermarkRead.record`), so a refresh killed at any
point leaves the old mark and the next one reads those rows again. A refresh that moves
nothing writes nothing, the mark included.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwen3_pipeline.core.changes import ExistingIndex
from qwen3_pipeline.core.errors import StoreError
from qwen3_pipeline.core.schema import DOC_KEY_COLUMN
from qwen3_pipeline.engine.failure_records import FailureRecords
from qwen3_pipeline.engine.options import RefreshRequest
from qwen3_pipeline.sources import RowFilter, Source, SourceConfig
from qwen3_pipeline.sources.watermark import filtered_batches
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.store.retries import run_typed
from qwen3_pipeline.store.watermark_log import WatermarkLog, WatermarkState, scope_label

logger = logging.getLogger("qwen3_pipeline")

# Keys per batch of a key-only read (8 bytes each for integer keys: small, and few batches).
_KEYS_PER_READ = 65_536
# Integer keys spanning fewer than this many values per key (ids, with gaps) get a direct
# table from key to row: 4 bytes a slot, so at most 8 bytes a key, like their codes.
_DENSE_SPAN = 2


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
        counts_refreshes: Whether the key scan runs every N refreshes (so each refresh
            without one is counted; with ``"every"`` or ``"never"`` nothing is).
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
    counts_refreshes: bool = True
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
        """Store the scope's new state: after the refresh's last commit, never before.

        Nothing is written when nothing moved: a no-op refresh commits nothing, not even here
        (with ``key_scan=N`` each refresh between scans is counted, so it writes its count).
        """
        before = self.before.refreshes_since_key_scan if self.before else 0
        if self.key_scan or self.where is None:
            since_scan = 0
        elif self.counts_refreshes:
            since_scan = before + 1
        else:
            since_scan = before  # key_scan="never": there is nothing to count
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
    log = (
        WatermarkLog.open(request.db_uri, request.table, storage_options=request.storage_options)
        if failures is None
        else WatermarkLog(failures.log.db, request.table)  # one connection for both side tables
    )
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
        counts_refreshes=isinstance(watermark.key_scan, int),
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


@dataclass(frozen=True, kw_only=True)
class KeyScan:
    """What a key scan found, before the stored state is read.

    Attributes:
        gone: Stored keys (the table's key type) the source did not have.
        keys_scanned: Keys read from the source.
        stored: Stored keys (documents, in a chunk table) in the scope.
    """

    gone: pa.Array
    keys_scanned: int
    stored: int

    def with_gone(self, keys: pa.Array) -> pa.Array:
        """``keys`` (a watermark read's changed keys) and the gone keys: the state to read."""
        return pa.concat_arrays([keys.cast(self.gone.type), self.gone])


class KeyScannedIndex(ExistingIndex):
    """The stored state of a watermark plan that scanned keys first.

    It holds the changed keys and the keys the scan found gone (:attr:`scan`), not the whole
    scope: :func:`scan_keys` answers from :attr:`scan` (reading the source's keys again only
    to confirm the gone ones, when there are any).

    Args:
        state: ``VectorStore.existing_state`` of ``scan.with_gone(changed keys)``.
        scan: The key scan.
    """

    def __init__(self, state: pa.Table, scan: KeyScan) -> None:
        super().__init__(state)
        self.scan = scan


def scan_stored_keys(
    store: VectorStore, scope: list[str] | None, source: Source, config: SourceConfig
) -> KeyScan:
    """Compare the stored keys of ``scope`` with the source's: which are gone, how many read.

    Both sides are key columns only (never the text or the stored state): the stored keys
    are held as 8-byte codes, the source's are streamed against them.

    Raises:
        StoreError: The table could not be read, or it holds duplicate keys.
    """
    stored = _stored_keys(store, scope)
    marks = _KeyMarks(stored)
    count = 0
    for batch in source.batches([config.key], _KEYS_PER_READ):
        count += batch.num_rows
        marks.mark(batch.column(0))
    return KeyScan(gone=marks.unseen(), keys_scanned=count, stored=len(stored))


def scan_keys(
    existing: ExistingIndex, source: Source, config: SourceConfig, rows: int
) -> tuple[np.ndarray, int]:
    """Read the source's key column: which stored rows it still holds, and how many keys.

    For a :class:`KeyScannedIndex` (the plan scanned keys before reading the stored state)
    the answer is its scan's, with the gone keys checked once more against the source: a
    key deleted and then written again while the plan read would otherwise be deleted after
    its new row was read, and the mark would then pass it by.

    Returns:
        A mask over ``existing`` (True: the key is in the source) and the keys read.
    """
    if isinstance(existing, KeyScannedIndex):
        gone = existing.scan.gone
        if len(gone):
            confirm = _KeyMarks(gone)
            for batch in source.batches([config.key], max(rows, _KEYS_PER_READ)):
                confirm.mark(batch.column(0))
            gone = confirm.unseen()
        if not len(gone):
            return np.ones(len(existing), dtype=bool), existing.scan.keys_scanned
        still = pc.is_in(existing.keys, value_set=gone)
        seen = ~np.asarray(still.to_numpy(zero_copy_only=False), dtype=bool)
        return seen, existing.scan.keys_scanned
    marks = _KeyMarks(existing.keys)
    count = 0
    for batch in source.batches([config.key], max(rows, _KEYS_PER_READ)):
        count += batch.num_rows
        marks.mark(batch.column(0))
    return marks.seen, count


def _stored_keys(store: VectorStore, scope: list[str] | None) -> pa.Array:
    """The key column of the stored rows in ``scope`` (a chunk table: each document's)."""
    from lancedb.expr import col

    column = DOC_KEY_COLUMN if store.chunked else "key"
    if scope is not None and not scope:
        return pa.array([], store.key_type)
    where = col("chunk_seq") == 0 if store.chunked else None  # every document has chunk 0
    if scope is not None:
        inside = col("partition_key").isin(list(scope))
        where = inside if where is None else where & inside
    query = store.table.search().select([column])
    if where is not None:
        query = query.where(where)

    def read() -> pa.Table:
        reader = query.to_batches(batch_size=_KEYS_PER_READ)
        return pa.Table.from_batches(list(reader), schema=reader.schema)

    keys = run_typed(read, f"read the keys of table {store.table_name!r}").column(0)
    return keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)


class _KeyMarks:
    """Stored keys, and which of them the source's key batches have shown so far.

    The keys become one ``int64`` code each (integer keys as they are, others the 64-bit
    xxh3 of their text). Dense integer keys (ids) get a direct table from code to row; any
    others a sorted array probed by binary search, where a match of hashed text keys is
    checked against the key itself, so a collision never hides a delete. Keys whose codes
    collide among themselves fall back to an exact index of the texts.

    Args:
        keys: The stored keys (unique, non-null; the table's key type).

    Raises:
        StoreError: ``keys`` holds duplicates (the table is corrupt; rebuild it).
    """

    def __init__(self, keys: pa.Array) -> None:
        self.keys = keys
        self.seen = np.zeros(len(keys), dtype=bool)
        self._integer = pa.types.is_integer(keys.type)
        self._low = 0
        self._slots: np.ndarray | None = None
        self._sorted: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._exact: Any = None  # a pandas Index, on the rare collision path only
        if not len(keys):
            return
        codes = _key_codes(keys, self._integer)
        low, high = int(codes.min()), int(codes.max())
        if self._integer and high - low < _DENSE_SPAN * len(codes):
            width = np.int32 if len(codes) < 2**31 else np.int64
            slots: np.ndarray = np.full(high - low + 1, -1, dtype=width)
            slots[codes - low] = np.arange(len(codes))
            if np.count_nonzero(slots >= 0) != len(codes):
                raise _duplicates(keys)
            self._low, self._slots = low, slots
            return
        order = np.argsort(codes, kind="stable")
        ordered = codes[order]
        if np.any(ordered[1:] == ordered[:-1]):
            if self._integer:
                raise _duplicates(keys)
            # Two stored texts with one 64-bit hash (or true duplicates): exact instead.
            import pandas as pd  # only here: importing the engine does not load pandas

            self._exact = pd.Index(keys.to_numpy(zero_copy_only=False), dtype=object)
            if not self._exact.is_unique:
                raise _duplicates(keys)
            return
        self._sorted, self._order = ordered, order

    def mark(self, incoming: pa.Array | pa.ChunkedArray) -> None:
        """Mark the stored keys among ``incoming`` (source keys; nulls are ignored) as seen."""
        if isinstance(incoming, pa.ChunkedArray):
            incoming = incoming.combine_chunks()
        if incoming.null_count:
            incoming = incoming.drop_null()
        if not len(incoming) or not len(self.keys):
            return
        rows = self._rows(incoming.cast(self.keys.type))
        self.seen[rows[rows >= 0]] = True

    def unseen(self) -> pa.Array:
        """The stored keys not seen."""
        return self.keys.filter(pa.array(~self.seen))

    def _rows(self, incoming: pa.Array) -> np.ndarray:
        """The stored row of each incoming key, -1 where it is not stored."""
        if self._exact is not None:
            probe = incoming.to_numpy(zero_copy_only=False)
            return np.asarray(self._exact.get_indexer(probe), dtype=np.int64)
        codes = _key_codes(incoming, self._integer)
        rows = np.full(len(codes), -1, dtype=np.int64)
        if self._slots is not None:
            # Compared before subtracting: a code far outside the range must not wrap into it.
            high = self._low + len(self._slots) - 1
            inside = np.flatnonzero((codes >= self._low) & (codes <= high))
            rows[inside] = self._slots[codes[inside] - self._low]
            return rows
        assert self._sorted is not None
        assert self._order is not None
        at = np.minimum(np.searchsorted(self._sorted, codes), len(self._sorted) - 1)
        hit = np.flatnonzero(self._sorted[at] == codes)
        rows[hit] = self._order[at[hit]]
        if not self._integer and len(hit):
            same = pc.equal(self.keys.take(pa.array(rows[hit])), incoming.take(pa.array(hit)))
            rows[hit[~np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)]] = -1
        return rows


def _key_codes(keys: pa.Array, integer: bool) -> np.ndarray:
    """``int64`` codes of keys: integers as they are, else the 64-bit xxh3 of their text."""
    if integer:
        return np.asarray(keys.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    values = keys.cast(pa.string()).to_pylist()
    digests = map(xxhash.xxh3_64_intdigest, map(str.encode, values))
    return np.fromiter(digests, dtype=np.uint64, count=len(values)).view(np.int64)


def _duplicates(keys: pa.Array) -> StoreError:
    counts = pc.value_counts(keys)
    dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return StoreError(
        f"the vector table holds duplicate keys (e.g. {dupes.slice(0, 10).to_pylist()}); it "
        "was written without a declared key. Rebuild it (rebuild=True / --rebuild)"
    )


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
