"""The scan of a plan: the per-batch diff of the source against the stored state.

:class:`Scan` takes the scope's normalised batches one at a time: it casts carry columns to
the table's types (a value that does not fit is bad input, named by key), hashes the texts,
diffs them against the stored index, counts every row, spills the rows to embed and the rows
to update to Arrow IPC files (:class:`Spill`), and tracks which stored keys the scope still
holds (for a rebuild, also which keys of the live table: :class:`LiveKeys`). :func:`read_spill`
streams a spill file back in bounded tables for the apply pass.
"""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwen3_pipeline.core.changes import (
    EMBED_STATUSES,
    UPDATE_STATUSES,
    ExistingIndex,
    RowStatus,
    ScopeTracker,
    blank_mask,
    content_hashes,
    diff,
)
from qwen3_pipeline.core.errors import InputDataError
from qwen3_pipeline.core.schema import MOVED_COLUMN, STATUS_COLUMN, TEXT_COLUMN
from qwen3_pipeline.embedding.interface import TokenCounter
from qwen3_pipeline.engine.failure_records import FailureRecords
from qwen3_pipeline.engine.report import Tally
from qwen3_pipeline.engine.watermark import WatermarkRead, scan_keys
from qwen3_pipeline.sources import Source, SourceConfig, TimeWindow

logger = logging.getLogger("qwen3_pipeline")

# Without a tokenizer the plan estimates tokens from characters (about 4 per Qwen token).
_CHARS_PER_TOKEN_ESTIMATE = 4
_SHOWN = 10


class Spill:
    """Rows appended batch by batch to an Arrow IPC file, written only when there are rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._writer: Any = None

    def write(self, rows: pa.Table) -> None:
        """Append ``rows`` (the file is created with the first non-empty table)."""
        if not rows.num_rows:
            return
        if self._writer is None:
            self._writer = pa.ipc.new_file(str(self.path), rows.schema)
        self._writer.write_table(rows)
        self.rows += rows.num_rows

    def close(self) -> Path | None:
        """Finish the file; its path, or None when no row was written."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        return self.path


def key_codes(keys: pa.Array | pa.ChunkedArray, integer: bool) -> np.ndarray:
    """``int64`` codes of keys: integers as they are, else the 64-bit xxh3 of their text."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if integer:
        return np.asarray(keys.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    values = keys.cast(pa.string()).to_pylist()
    digests = map(xxhash.xxh3_64_intdigest, map(str.encode, values))
    return np.fromiter(digests, dtype=np.uint64, count=len(values)).view(np.int64)


class LiveKeys:
    """The keys of the live table a rebuild replaces, and which of them the source still has.

    A rebuild fills a staging table and swaps it in whole, so every live row whose key the
    source no longer has (or whose text is now blank) is dropped by the swap. The plan counts
    them for the mass-delete guard by a key-only comparison: one 8-byte code per live key
    (an integer key as it is; otherwise, or when the source's keys are of another kind, the
    64-bit hash of the key's text), never the rows themselves.

    Args:
        codes: :func:`key_codes` of the live table's keys (documents, for a chunk table).
        integer: Whether the codes are integer keys (else hashes of the keys' text).
    """

    def __init__(self, codes: np.ndarray, *, integer: bool) -> None:
        self.integer = integer
        self.rows = len(codes)
        self._codes = np.unique(codes)  # sorted, for searchsorted
        self._seen = np.zeros(len(self._codes), dtype=bool)

    def observe(self, keys: pa.Array | pa.ChunkedArray) -> None:
        """Mark the live keys among ``keys`` (source keys the new table will hold) as kept."""
        if not len(keys) or not len(self._codes):
            return
        codes = key_codes(keys, self.integer)
        at = np.searchsorted(self._codes, codes)
        inside = at < len(self._codes)
        at = at[inside]
        self._seen[at[self._codes[at] == codes[inside]]] = True

    @property
    def dropped(self) -> int:
        """Live keys not observed: the rows the swap would drop."""
        return int(len(self._seen) - np.count_nonzero(self._seen))


class Scan:
    """Per-batch diff of the plan: counts, spills the work, tracks the scope's keys.

    Feed it every batch of the scope with :meth:`add`; then :meth:`deletions` lists the
    stored keys to delete (gone from the source, or now blank). For a rebuild, ``live``
    follows which keys of the live table the new table keeps.
    """

    def __init__(
        self,
        *,
        existing: ExistingIndex,
        fingerprint: str,
        carry_names: list[str],
        carry_targets: dict[str, pa.DataType],
        token_counter: TokenCounter | None,
        directory: Path,
        live: LiveKeys | None = None,
        failures: FailureRecords | None = None,
        watermark: WatermarkRead | None = None,
    ) -> None:
        self.existing = existing
        self.watermark = watermark
        self.failures = failures
        self.stale_failures: list[pa.Array] = []
        self.live = live
        self.tracker = ScopeTracker(existing)
        self.fingerprint = fingerprint
        self.carry_names = carry_names
        self.carry_targets = carry_targets
        self.token_counter = token_counter
        self.tally = Tally()
        self.planned = Tally()
        self.embed_spill = Spill(directory / "embed.arrow")
        self.update_spill = Spill(directory / "update.arrow")
        self.blank_keys: list[pa.Array] = []
        self.rows_to_embed = 0
        self.tokens_to_embed = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Diff one normalised batch of the scope: count it, spill its work.

        Raises:
            InputDataError: A carry value does not fit the table's column (keys named).
        """
        batch = self._cast_carry(batch)
        keys = batch.column("key")
        texts = batch.column(TEXT_COLUMN)
        partitions = batch.column("partition_key")
        hashes = content_hashes(texts)
        result = diff(
            keys=keys,
            content_hashes=hashes,
            partition_keys=partitions,
            existing=self.existing,
            fingerprint=self.fingerprint,
            # source_updated_at is compared like a carry column: a row whose updated_at alone
            # changed gets a column update (no model call), so lineage never goes stale.
            carry=batch.select([*self.carry_names, "source_updated_at"]),
        )
        self.tracker.observe(keys, result.existing_rows)
        if self.watermark is not None:
            self.watermark.observe(batch.column("source_updated_at"))
        blank = blank_mask(texts)
        live = ~blank
        if self.live is not None:
            self.live.observe(keys.filter(pa.array(live)))
        status = result.status
        for tally in (self.tally, self.planned):
            tally.add("scanned", partitions)
            tally.add("skipped_empty", partitions, blank)
            tally.add("unchanged", partitions, live & (status == RowStatus.UNCHANGED))
        if blank.any():
            # A row that became blank loses its old vector: it no longer says anything.
            stored_blank = blank & (result.existing_rows >= 0)
            self.blank_keys.append(keys.filter(pa.array(stored_blank)).cast(self.existing.key_type))
        embed = live & result.mask(*EMBED_STATUSES)
        if self.failures is not None and len(self.failures):
            embed = self._hold_back_failed(keys, hashes, partitions, embed, ~embed)
        self.planned.add("inserted", partitions, embed & (status == RowStatus.NEW))
        self.planned.add("updated", partitions, embed & (status != RowStatus.NEW))
        if embed.any():
            take = pa.array(np.flatnonzero(embed))
            rows = pa.Table.from_batches([batch]).take(take)
            rows = rows.append_column("content_hash", hashes.take(take))
            rows = rows.append_column(STATUS_COLUMN, pa.array(status[embed], pa.int8()))
            self.embed_spill.write(rows)
            self._count_tokens(rows.column(TEXT_COLUMN))
        update = live & result.mask(*UPDATE_STATUSES)
        moved = result.moved
        self.planned.add("moved", partitions, update & moved)
        self.planned.add("carry_updated", partitions, update & ~moved)
        if update.any():
            take = pa.array(np.flatnonzero(update))
            columns = ["key", "partition_key", "source_updated_at", *self.carry_names]
            rows = pa.Table.from_batches([batch.select(columns)]).take(take)
            rows = rows.append_column(MOVED_COLUMN, pa.array(moved[update]))
            self.update_spill.write(rows)

    def _hold_back_failed(
        self,
        keys: pa.Array,
        hashes: pa.Array,
        partitions: pa.Array,
        embed: np.ndarray,
        current: np.ndarray,
    ) -> np.ndarray:
        """``embed`` without the rows whose failure record says wait; counts them.

        ``current``: rows not to embed (stored with their current text, or blank): their
        records are stale.
        """
        assert self.failures is not None
        doc_keys = _as_text(keys)
        seen = self.failures.classify(doc_keys, hashes)
        for tally in (self.tally, self.planned):
            tally.add("quarantined", partitions, embed & seen.quarantined)
            tally.add("deferred", partitions, embed & seen.deferred)
            tally.add("retried", partitions, embed & seen.retried)
        stale = current & seen.recorded
        if stale.any():
            self.stale_failures.append(doc_keys.filter(pa.array(stale)))
        return embed & ~seen.held_back

    def _count_tokens(self, texts: pa.ChunkedArray) -> None:
        values = texts.to_pylist()
        self.rows_to_embed += len(values)
        if self.token_counter is not None:
            self.tokens_to_embed += int(np.sum(self.token_counter.count_document_tokens(values)))
        else:
            lengths = pc.utf8_length(texts.combine_chunks()).to_numpy(zero_copy_only=False)
            self.tokens_to_embed += int(
                np.sum(np.ceil(lengths / _CHARS_PER_TOKEN_ESTIMATE)) + len(values)
            )

    def _cast_carry(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        # Cast carry columns to the table's types now, so a value that does not fit is bad
        # input found by the plan (naming the rows), not a failed write half-way through.
        if not self.carry_names:
            return batch
        arrays = list(batch.columns)
        fields = list(batch.schema)
        for name in self.carry_names:
            target = self.carry_targets[name]
            index = batch.schema.get_field_index(name)
            values = batch.column(index)
            if values.type == target:
                continue
            try:
                arrays[index] = values.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                bad = _rows_that_do_not_cast(values, target)
                keys = batch.column("key").take(pa.array(bad)).to_pylist()
                raise InputDataError(
                    f"carry column {name!r} has value(s) that do not fit the table's {target} "
                    f"column (keys {keys}): {e}. Fix or cast them in the source, or rebuild "
                    "the table (rebuild=True / --rebuild). Nothing was written"
                ) from e
            fields[index] = fields[index].with_type(target)
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

    def deletions(
        self, scope: list[str] | None, source: Source, config: SourceConfig, chunk_rows: int
    ) -> tuple[pa.Array, pa.Array]:
        """The stored keys to delete and their stored partitions (after the whole scan)."""
        gone = self.tracker.unseen_keys(scope)
        if isinstance(config.partition, TimeWindow) and len(gone):
            gone = not_in_source(gone, source, config, chunk_rows)
        key_type = self.existing.key_type
        keys = pa.concat_arrays([gone.cast(key_type), *self.blank_keys])
        rows = self.existing.lookup(keys) if len(keys) else np.zeros(0, dtype=np.int64)
        partitions = self.existing.column("partition_key").take(pa.array(rows, pa.int64()))
        return keys, partitions

    def watermark_deletions(
        self, source: Source, config: SourceConfig, chunk_rows: int, watermark: WatermarkRead
    ) -> tuple[pa.Array, pa.Array]:
        """A watermark read's deletes: rows read blank, and (with a key scan) keys gone.

        Without a key scan, a key gone from the source stays stored until a refresh that
        scans keys (or a plain refresh) runs.
        """
        key_type = self.existing.key_type
        parts = list(self.blank_keys)
        if watermark.key_scan:
            seen, watermark.keys_scanned = scan_keys(self.existing, source, config, chunk_rows)
            parts.append(self.existing.keys.filter(pa.array(~seen)).cast(key_type))
        keys = (
            pa.concat_arrays([p.cast(key_type) for p in parts]) if parts else pa.array([], key_type)
        )
        keys = pc.unique(keys) if len(keys) else keys
        rows = self.existing.lookup(keys) if len(keys) else np.zeros(0, dtype=np.int64)
        partitions = self.existing.column("partition_key").take(pa.array(rows, pa.int64()))
        return keys, partitions


def _as_text(keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Keys as the failure log holds them (text)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return keys.cast(pa.string())


def _rows_that_do_not_cast(values: pa.Array, target: pa.DataType) -> list[int]:
    bad: list[int] = []
    for i in range(len(values)):
        try:
            values.slice(i, 1).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad.append(i)
            if len(bad) == _SHOWN:
                break
    return bad


def not_in_source(
    candidates: pa.Array, source: Source, config: SourceConfig, chunk_rows: int
) -> pa.Array:
    """The ``candidates`` keys absent from the whole source (a key-only read of it)."""
    # A key missing from this time window may have moved to another window: only keys absent
    # from the whole source are deleted; a moved row is moved by its new window's refresh.
    present: list[pa.Array] = []
    for raw in source.batches([config.key], chunk_rows):
        column = raw.column(0)
        hit = pc.is_in(column.cast(candidates.type), value_set=candidates)
        present.append(column.filter(hit).cast(candidates.type))
    if not present:
        return candidates
    return candidates.filter(pc.invert(pc.is_in(candidates, value_set=pa.concat_arrays(present))))


def read_spill(path: Path | None, rows: int) -> Iterator[pa.Table]:
    """Stream a plan's spill file in tables of at most ``rows`` rows (one batch read at a time)."""
    if path is None:
        return
    with pa.OSFile(str(path)) as handle:
        reader = pa.ipc.open_file(handle)
        pending: list[pa.RecordBatch] = []
        held = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            pending.append(batch)
            held += batch.num_rows
            while held >= rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, rows)
                rest = table.slice(rows)
                pending = rest.to_batches() if rest.num_rows else []
                held = rest.num_rows
        if held:
            yield pa.Table.from_batches(pending)
