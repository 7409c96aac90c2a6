"""Split a source by hash shard in one pass, to local Arrow IPC files (one source per shard).

A refresh over many shards processes them one at a time, so that its memory is bounded by a
shard rather than the table. Reading each shard from the source would scan the whole source
once per shard (a shard filter hashes the keys of every row it reads), so the source is read
once instead and each row is appended to its shard's files. Only the columns the
configuration needs are kept, in the source's own types; each shard is then an
:class:`~qwen3_pipeline.sources.readers.ArrowIPCSource` standing in for the original source.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError, InputDataError, SourceReadError
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.sources.documents import SourceConfig, output_schema
from qwen3_pipeline.sources.partitions import Shard, Shards, shard_indices
from qwen3_pipeline.sources.readers import ArrowIPCSource, Source

logger = logging.getLogger("qwen3_pipeline")

# Rows are buffered per shard and written out once the buffers hold this much, so the split
# writes few, large record batches while holding one file open at a time (a split into
# thousands of shards must not need thousands of file descriptors).
DEFAULT_BUFFER_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardSplit:
    """One shard of a split source.

    Attributes:
        shard: The shard (index and count).
        source: Its rows, as a source standing in for the original one.
        rows: How many rows it holds.
    """

    shard: Shard
    source: ArrowIPCSource
    rows: int

    @property
    def label(self) -> str:
        """The shard's partition key (``"shard-03-of-16"``)."""
        return self.shard.label

    def remove_files(self) -> None:
        """Delete the shard's files (its schema and name stay usable, its rows are gone)."""
        for path in self.source.paths:
            path.unlink(missing_ok=True)


def split_by_shard(
    source: Source,
    config: SourceConfig,
    shards: Shards,
    directory: Path,
    *,
    batch_rows: int,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: bool = True,
    expected_rows: int = 0,
) -> list[ShardSplit]:
    """Read ``source`` once and write each row of a selected shard to that shard's files.

    The shard of a row is computed exactly as :func:`~qwen3_pipeline.sources.read_batches`
    computes it (the key cast to the key type, then :func:`shard_indices`); rows of shards not
    in ``shards`` are dropped. Within a shard, rows keep their source order.

    Null keys are counted over the whole source and refused after the pass (a row without a
    key has no shard). Duplicate keys are left to each shard's own check
    (:func:`~qwen3_pipeline.sources.validate_keys` over its files): equal keys always fall in
    the same shard, so checking shard by shard finds every duplicate while holding one
    shard's keys, not the whole source's.

    Args:
        source: Where the rows come from.
        config: Which columns are needed (``config.columns``) and which is the key.
        shards: The shards to keep (all of them when ``shards.indices`` is None).
        directory: An existing, empty directory for the files (the caller removes it).
        batch_rows: Rows per batch read from the source (and per batch the shards yield).
        buffer_bytes: Buffered bytes, over all shards, that trigger writing them out.
        progress: Report progress while reading.
        expected_rows: Rows the source is expected to hold (for progress; 0 if unknown).

    Returns:
        One :class:`ShardSplit` per selected shard, in shard order.

    Raises:
        ConfigError: ``batch_rows`` or ``buffer_bytes`` is not positive.
        InputDataError: Missing columns, unusable types, null keys (after the whole pass,
            with their count) or a key that does not fit the key type (nothing has been
            written to any table).
        SourceReadError: The source could not be read, or a batch did not match its schema.
    """
    for name, value in (("batch_rows", batch_rows), ("buffer_bytes", buffer_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    key_type = output_schema(source, config).field("key").type
    columns = list(config.columns)
    full = source.schema()
    schema = pa.schema([full.field(c) for c in columns])
    indices = tuple(range(shards.count)) if shards.indices is None else shards.indices
    writer = _ShardWriter(directory, shards.count, indices, schema)
    null_keys = 0
    with Progress(
        expected_rows, f"splitting {source.name} into {len(indices)} shards", enabled=progress
    ) as bar:
        for raw in source.batches(columns, batch_rows):
            batch = _conform(raw, schema, source.name)
            bar.update(batch.num_rows)
            keys = batch.column(config.key)
            if keys.null_count:
                null_keys += keys.null_count
                present = pc.is_valid(keys)
                batch, keys = batch.filter(present), keys.filter(present)
            writer.add(batch, shard_indices(_keys(keys, key_type, config.key), shards.count))
            if writer.held_bytes >= buffer_bytes:
                writer.flush()
    if null_keys:
        raise InputDataError(
            f"key column {config.key!r} of {source.name} must be unique and non-null: "
            f"{null_keys} row(s) have a null key. Fix the source (e.g. filter or deduplicate in "
            "the dbt model) and re-run"
        )
    writer.flush()
    splits = [
        ShardSplit(
            Shard(index, shards.count),
            ArrowIPCSource(writer.paths[index], schema=schema, name=source.name),
            writer.rows[index],
        )
        for index in indices
    ]
    logger.info(
        "split %s into %d of %d shard(s): %d rows",
        source.name,
        len(splits),
        shards.count,
        sum(s.rows for s in splits),
    )
    return splits


class _ShardWriter:
    """Buffers rows per shard; each flush writes every non-empty buffer to a new file."""

    def __init__(
        self, directory: Path, count: int, indices: tuple[int, ...], schema: pa.Schema
    ) -> None:
        self.directory = directory
        self.schema = schema
        self.count = count
        self.selected = np.zeros(count, dtype=bool)
        self.selected[list(indices)] = True
        self.buffers: dict[int, list[pa.RecordBatch]] = {i: [] for i in indices}
        self.paths: dict[int, list[Path]] = {i: [] for i in indices}
        self.rows: dict[int, int] = dict.fromkeys(indices, 0)
        self.held_bytes = 0
        self._files = 0

    def add(self, batch: pa.RecordBatch, shard: np.ndarray) -> None:
        keep = np.flatnonzero(self.selected[shard])
        if not len(keep):
            return
        # One take per batch, grouping rows by shard (a stable sort keeps the source order
        # within a shard); each shard's rows are then a zero-copy slice of it.
        order = keep[np.argsort(shard[keep], kind="stable")]
        grouped = batch.take(pa.array(order))
        counts = np.bincount(shard[order], minlength=self.count)
        start = 0
        for index in np.flatnonzero(counts):
            n = int(counts[index])
            self.buffers[int(index)].append(grouped.slice(start, n))
            self.rows[int(index)] += n
            start += n
        self.held_bytes += grouped.nbytes

    def flush(self) -> None:
        for index, pending in self.buffers.items():
            if not pending:
                continue
            path = self.directory / f"{index:05d}-{self._files:06d}.arrow"
            self._files += 1
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.schema) as out:
                for batch in pending:
                    out.write_batch(batch)
            self.paths[index].append(path)
            pending.clear()
        self.held_bytes = 0


def _conform(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> pa.RecordBatch:
    # Every file of a shard has one schema: the source's declared types, which are also what
    # the normalisation of the shard's rows will see.
    if batch.schema.equals(schema):
        return batch
    try:
        arrays = [
            column if column.type == target.type else column.cast(target.type)
            for column, target in zip(batch.columns, schema, strict=True)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise SourceReadError(
            f"{where} yielded a batch with schema {batch.schema} that does not match its "
            f"declared schema {schema}: {e}. Fix or regenerate the source and re-run (nothing "
            "was written)"
        ) from e


def _keys(keys: pa.Array | pa.ChunkedArray, key_type: pa.DataType, column: str) -> pa.Array:
    # As the normalisation of a batch does before hashing: dictionaries decoded, integers
    # widened to int64 (the canonical form of a key is its decimal string).
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    try:
        return keys.cast(key_type)
    except pa.ArrowInvalid as e:
        raise InputDataError(f"key column {column!r} does not fit {key_type}: {e}") from e
