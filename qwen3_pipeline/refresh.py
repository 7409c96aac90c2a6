"""The refresh engine: bring a vector table to exactly the state of a source scope.

One refresh = read -> render -> hash -> diff -> embed changed rows -> write -> delete -> report:

1. The whole source is checked for null and duplicate keys, and the configuration against its
   columns, before anything is written.
2. The stored state of the scope (keys, content hashes, spec fingerprints, partitions, carry
   columns; never vectors) is indexed once.
3. The scope is streamed in batches of ``chunk_rows``: each batch is rendered, hashed and
   diffed; unchanged rows cost a hash lookup. New and changed rows are buffered across batches
   and embedded and upserted ``chunk_rows`` at a time (one commit each); moved and carry-only
   rows are buffered likewise and get a column update (no re-embedding). So a refresh that
   changes 1% of the rows makes about 1% of the commits of a full one.
4. Only after the whole scope was read are rows gone from the source deleted (a crash mid-way
   can never delete rows that were merely not read yet).

Memory is bounded by the chunk size plus the stored-state index of the scope (tens of bytes a
row, never vectors). A crash loses at most the chunk in flight: a re-run skips every row whose
hash is already stored and converges. A refresh that finds nothing to change makes no commit.
"""

import logging
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.changes import (
    UPDATE_STATUSES,
    ExistingIndex,
    RowStatus,
    ScopeTracker,
    blank_mask,
    content_hashes,
    diff,
)
from qwen3_pipeline.embedder import Embedder, EncodeStats
from qwen3_pipeline.errors import ConfigError, StoreError
from qwen3_pipeline.progress import Progress
from qwen3_pipeline.sources import (
    Source,
    SourceConfig,
    TimeWindow,
    carry_schema,
    output_schema,
    read_batches,
    scope_partition_keys,
    validate_keys,
)
from qwen3_pipeline.store import VectorStore, validate_table_name, validate_uri

logger = logging.getLogger("qwen3_pipeline")

DEFAULT_CHUNK_ROWS = 10_000
_SHOWN_FAILURES = 100


@dataclass(frozen=True, kw_only=True)
class RefreshReport:
    """What one refresh did.

    Attributes:
        scanned: Source rows read in the scope.
        unchanged: Rows whose stored vector was already current.
        inserted: New keys embedded and written.
        updated: Existing keys re-embedded (content or spec changed).
        moved: Rows whose partition changed, updated without re-embedding.
        carry_updated: Rows whose carry-along columns changed, updated without re-embedding.
        deleted: Stored rows removed (gone from the source, or now blank).
        skipped_empty: Source rows with empty or whitespace-only text (not embedded).
        truncated: Embedded rows cut to ``max_length`` tokens.
        failed: Rows that could not be embedded (their old vector, if any, is kept).
        embedded_rows: Rows sent to the model.
        tokens: Real tokens embedded.
        padded_tokens: Positions the model computed.
        padding_efficiency: ``tokens / padded_tokens``.
        tokens_per_second: Embedding throughput.
        embed_seconds: Time spent in the model.
        seconds: Wall-clock time of the refresh.
        version_before: Lance version of the live table before the refresh (0 when it did not
            exist: the commits creating it count as the refresh's own).
        version_after: Lance version after it.
        committed: Whether the refresh made any commit.
        table_uri: Database URI.
        table_name: Table name.
        spec_fingerprint: Fingerprint of the spec the vectors follow.
        partition_keys: The partitions refreshed (None: the whole table).
        per_partition: Counters per partition key.
        failures: ``(key, reason)`` of failed rows (first 100).
        run_id: Lineage id written on every row this refresh wrote.
    """

    scanned: int = 0
    unchanged: int = 0
    inserted: int = 0
    updated: int = 0
    moved: int = 0
    carry_updated: int = 0
    deleted: int = 0
    skipped_empty: int = 0
    truncated: int = 0
    failed: int = 0
    embedded_rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    padding_efficiency: float = 1.0
    tokens_per_second: float = 0.0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    version_before: int = 0
    version_after: int | None = None
    committed: bool = False
    table_uri: str = ""
    table_name: str = ""
    spec_fingerprint: str = ""
    partition_keys: list[str] | None = None
    per_partition: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    run_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)


class _Tally:
    """Mutable counters of a refresh in progress, per partition and in total."""

    def __init__(self) -> None:
        self.by_partition: dict[str, Counter[str]] = defaultdict(Counter)
        self.total: Counter[str] = Counter()
        self.encode = EncodeStats()
        self.failures: list[tuple[str, str]] = []
        self.commits = 0

    def add(
        self, name: str, partitions: pa.Array | pa.ChunkedArray, mask: np.ndarray | None = None
    ) -> None:
        """Count rows (those where ``mask`` is true) under ``name``, per partition label."""
        if mask is not None:
            if not mask.any():
                return
            partitions = partitions.filter(pa.array(mask))
        if not len(partitions):
            return
        for item in pc.value_counts(partitions).to_pylist():
            label, count = item["values"], item["counts"]
            self.by_partition[label][name] += count
            self.total[name] += count


def refresh(
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    db_uri: str,
    table: str,
    storage_options: dict[str, str] | None = None,
    source_name: str | None = None,
    run_id: str | None = None,
    rebuild: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> RefreshReport:
    """Bring ``table`` to the state of the source scope, embedding only what changed.

    Args:
        source: Where the rows come from (DuckDB, Parquet, Arrow).
        config: Key, text/template, carry columns, ``updated_at`` and the partition scope
            (``config.partition``: one shard, several, a time window, or None for all).
        embedder: The model (``Qwen3Encoder``, or a fake in tests); its spec decides the table.
        db_uri: LanceDB directory or object-store URI.
        table: Vector table name.
        storage_options: Object-store options (credentials) for LanceDB.
        source_name: Lineage label written on each row (default: the source's name).
        run_id: Lineage id written on each row (default: a new UUID).
        rebuild: Embed the whole source into a new table and swap it in when complete (for a
            spec change); the live table is untouched until the swap.
        chunk_rows: Rows per source batch, and the most rows per embed call and per commit
            (rows to write are gathered across batches up to this size).
        progress: Report progress (bar on a terminal, log lines otherwise).

    Returns:
        The :class:`RefreshReport`.

    Raises:
        InputDataError: Null or duplicate keys, missing columns, a key type change.
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        ConfigError: A partial rebuild, or a bad chunk size.
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    started = time.perf_counter()
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    scope = scope_partition_keys(config.partition)
    if rebuild and scope is not None:
        raise ConfigError(
            f"rebuild needs the whole source, but the refresh is scoped to {scope}; "
            "run the rebuild over all partitions"
        )
    spec = embedder.spec
    schema = output_schema(source, config)
    validate_keys(source, config)
    version_before = _live_version(db_uri, table, storage_options)
    open_store = VectorStore.begin_rebuild if rebuild else VectorStore.open
    store = open_store(
        db_uri,
        table,
        spec,
        key_type=schema.field("key").type,
        carry_schema=carry_schema(schema),
        source_key=config.key,
        storage_options=storage_options,
    )
    run_id = run_id or uuid.uuid4().hex
    label = source_name or source.name
    # Rows can move between time windows, so index the whole table to recognise a row moving
    # in; hash shards are stable per key, so their scope alone is enough.
    time_windows = isinstance(config.partition, TimeWindow)
    existing = ExistingIndex(store.existing_state(None if time_windows else scope))
    tracker = ScopeTracker(existing)
    tally = _Tally()
    writer = _Writer(
        store, embedder, tally,
        chunk_rows=chunk_rows, carry_names=list(config.carry), source_label=label, run_id=run_id,
    )  # fmt: skip
    blank_keys: list[pa.Array] = []
    total_rows = _estimate_rows(store, scope, existing)
    with Progress(total_rows, f"refreshing {table}", enabled=progress) as bar:
        for batch in read_batches(source, config, batch_rows=chunk_rows):
            _refresh_chunk(batch, existing, tracker, tally, writer, blank_keys)
            bar.update(batch.num_rows, embedded=tally.total["embedded"])
        writer.flush()
    gone = tracker.unseen_keys(scope)
    if time_windows and len(gone):
        gone = _not_in_source(gone, source, config, chunk_rows)
    _delete(store, pa.concat_arrays([gone.cast(existing.key_type), *blank_keys]), existing, tally)
    if rebuild:
        store = store.commit_rebuild()
        tally.commits += 1
    if tally.commits:
        store.maybe_optimize()
    return _report(
        tally,
        store=store,
        spec_fingerprint=spec.fingerprint,
        scope=scope,
        run_id=run_id,
        version_before=version_before,
        seconds=time.perf_counter() - started,
    )


def _refresh_chunk(
    batch: pa.RecordBatch,
    existing: ExistingIndex,
    tracker: ScopeTracker,
    tally: _Tally,
    writer: "_Writer",
    blank_keys: list[pa.Array],
) -> None:
    keys = batch.column("key")
    texts = batch.column("text")
    partitions = batch.column("partition_key")
    hashes = content_hashes(texts)
    result = diff(
        keys=keys,
        content_hashes=hashes,
        partition_keys=partitions,
        existing=existing,
        fingerprint=writer.fingerprint,
        carry=batch.select(writer.carry_names) if writer.carry_names else None,
    )
    tracker.observe(keys, result.existing_rows)
    blank = blank_mask(texts)
    tally.add("scanned", partitions)
    tally.add("skipped_empty", partitions, blank)
    if blank.any():
        # A row that became blank loses its old vector: it no longer says anything.
        stored_blank = blank & (result.existing_rows >= 0)
        blank_keys.append(keys.filter(pa.array(stored_blank)).cast(existing.key_type))
    status = result.status
    live = ~blank
    tally.add("unchanged", partitions, live & (status == RowStatus.UNCHANGED))
    embed_rows = np.flatnonzero(
        live & result.mask(RowStatus.NEW, RowStatus.CHANGED, RowStatus.RESPEC)
    )
    if embed_rows.size:
        take = pa.array(embed_rows)
        rows = pa.Table.from_batches([batch]).take(take)
        rows = rows.append_column("content_hash", hashes.take(take))
        rows = rows.append_column("status", pa.array(status[embed_rows], pa.int8()))
        writer.add_embed(rows)
    update_rows = np.flatnonzero(live & result.mask(*UPDATE_STATUSES))
    if update_rows.size:
        take = pa.array(update_rows)
        columns = ["key", "partition_key", "source_updated_at", *writer.carry_names]
        rows = pa.Table.from_batches([batch.select(columns)]).take(take)
        rows = rows.append_column("moved", pa.array(result.moved[update_rows]))
        writer.add_update(rows)


class _Writer:
    """Buffers the rows to embed and the rows to update across read batches.

    Rows are written in chunks of ``chunk_rows`` (one embed call and one commit each), so a
    refresh that changes 1% of the rows makes about 1% of the commits of a full one, and the
    buffers never hold more than a chunk plus one read batch.
    """

    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        tally: _Tally,
        *,
        chunk_rows: int,
        carry_names: list[str],
        source_label: str,
        run_id: str,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tally = tally
        self.chunk_rows = chunk_rows
        self.carry_names = carry_names
        self.source_label = source_label
        self.run_id = run_id
        self.fingerprint = store.spec.fingerprint
        self._embed: list[pa.Table] = []
        self._update: list[pa.Table] = []

    def add_embed(self, rows: pa.Table) -> None:
        self._embed.append(rows)
        while sum(t.num_rows for t in self._embed) >= self.chunk_rows:
            self._embed_and_write(self._take(self._embed, self.chunk_rows))

    def add_update(self, rows: pa.Table) -> None:
        self._update.append(rows)
        while sum(t.num_rows for t in self._update) >= self.chunk_rows:
            self._write_updates(self._take(self._update, self.chunk_rows))

    def flush(self) -> None:
        """Write whatever is buffered (at the end of the scan)."""
        while self._embed:
            self._embed_and_write(self._take(self._embed, self.chunk_rows))
        while self._update:
            self._write_updates(self._take(self._update, self.chunk_rows))

    @staticmethod
    def _take(buffer: list[pa.Table], rows: int) -> pa.Table:
        table = pa.concat_tables(buffer) if len(buffer) > 1 else buffer[0]
        buffer.clear()
        if table.num_rows > rows:
            buffer.append(table.slice(rows))
            table = table.slice(0, rows)
        return table

    def _write_updates(self, rows: pa.Table) -> None:
        tally = self.tally
        written = self.store.update_columns(rows.drop_columns(["moved"]))
        tally.commits += written is not None
        moved = np.asarray(rows.column("moved").to_numpy(), dtype=bool)
        partitions = rows.column("partition_key")
        tally.add("moved", partitions, moved)
        tally.add("carry_updated", partitions, ~moved)

    def _embed_and_write(self, chunk: pa.Table) -> None:
        tally, store = self.tally, self.store
        encoded = self.embedder.embed_documents(chunk.column("text").to_pylist())
        tally.encode = tally.encode + encoded.stats
        partitions = chunk.column("partition_key").combine_chunks()
        tally.add("embedded", partitions)
        ok = np.ones(chunk.num_rows, dtype=bool)
        if encoded.failures:
            failed_keys = chunk.column("key").to_pylist()
            for index, reason in encoded.failures.items():
                ok[index] = False
                if len(tally.failures) < _SHOWN_FAILURES:
                    tally.failures.append((str(failed_keys[index]), reason))
            tally.add("failed", partitions, ~ok)
            logger.error("%d row(s) could not be embedded; their old vectors are kept", (~ok).sum())
        keep = pa.array(np.flatnonzero(ok))
        written = chunk.take(keep) if not ok.all() else chunk
        statuses = np.asarray(written.column("status").to_numpy(), dtype=np.int8)
        kept_partitions = partitions.take(keep) if not ok.all() else partitions
        tally.add("inserted", kept_partitions, statuses == RowStatus.NEW)
        tally.add("updated", kept_partitions, statuses != RowStatus.NEW)
        tally.add("truncated", kept_partitions, encoded.truncated[ok])
        carry = written.select(self.carry_names) if self.carry_names else None
        rows_to_write = store.build_rows(
            keys=written.column("key").combine_chunks(),
            vectors=encoded.vectors[ok],
            content_hashes=written.column("content_hash").combine_chunks(),
            n_tokens=encoded.n_tokens[ok],
            truncated=encoded.truncated[ok],
            partition_keys=written.column("partition_key").combine_chunks(),
            source=self.source_label,
            run_id=self.run_id,
            source_updated_at=written.column("source_updated_at").combine_chunks(),
            carry=carry,
        )
        tally.commits += store.upsert(rows_to_write) is not None


def _not_in_source(
    candidates: pa.Array, source: Source, config: SourceConfig, chunk_rows: int
) -> pa.Array:
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


def _delete(store: VectorStore, keys: pa.Array, existing: ExistingIndex, tally: _Tally) -> None:
    if not len(keys):
        return
    rows = existing.lookup(keys)
    labels = existing.column("partition_key").take(pa.array(rows[rows >= 0]))
    written = store.delete_keys(keys)
    if written is not None:
        tally.commits += 1
        tally.add("deleted", labels)


def _live_version(db_uri: str, table: str, storage_options: dict[str, str] | None) -> int:
    """The live table's version before this refresh writes anything; 0 if it does not exist.

    Read before the store is opened, so that the commits creating a new table (or a rebuild's
    staging table) are not mistaken for the table's state before the refresh.
    """
    import lancedb

    validate_uri(db_uri)
    validate_table_name(table)
    try:
        db = lancedb.connect(db_uri, storage_options=storage_options)
        return int(db.open_table(table).version)
    except Exception as e:  # LanceDB raises ValueError "Table '...' was not found", or I/O errors
        if "not found" in str(e).lower():
            return 0
        raise StoreError(f"could not read table {table!r} at {db_uri!r}: {e}") from e


def _estimate_rows(store: VectorStore, scope: list[str] | None, existing: ExistingIndex) -> int:
    # The progress total: the stored row count is the best cheap guess of the source size.
    return max(len(existing), 1) if scope is None else max(store.count_rows(scope), 1)


def _report(
    tally: _Tally,
    *,
    store: VectorStore,
    spec_fingerprint: str,
    scope: list[str] | None,
    run_id: str,
    version_before: int,
    seconds: float,
) -> RefreshReport:
    total, encode = tally.total, tally.encode
    return RefreshReport(
        scanned=total["scanned"],
        unchanged=total["unchanged"],
        inserted=total["inserted"],
        updated=total["updated"],
        moved=total["moved"],
        carry_updated=total["carry_updated"],
        deleted=total["deleted"],
        skipped_empty=total["skipped_empty"],
        truncated=total["truncated"],
        failed=total["failed"],
        embedded_rows=encode.rows,
        tokens=encode.real_tokens,
        padded_tokens=encode.padded_tokens,
        padding_efficiency=round(encode.padding_efficiency, 6),
        tokens_per_second=round(encode.tokens_per_second, 3),
        embed_seconds=round(encode.seconds, 6),
        seconds=round(seconds, 6),
        version_before=version_before,
        version_after=store.version,
        committed=tally.commits > 0,
        table_uri=store.uri,
        table_name=store.table_name,
        spec_fingerprint=spec_fingerprint,
        partition_keys=scope,
        per_partition={k: dict(v) for k, v in sorted(tally.by_partition.items())},
        failures=list(tally.failures),
        run_id=run_id,
    )
