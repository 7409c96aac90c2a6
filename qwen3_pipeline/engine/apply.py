"""The apply pass of a refresh: embed and write exactly what the plan listed.

:func:`apply_plan` opens (or creates) the table, then streams the plan's spill files:

1. rows to embed, ``chunk_rows`` at a time: one embed call and one ``merge_insert`` commit
   each, so a crash loses at most the chunk in flight and a re-run skips every row whose hash
   is already stored;
2. rows that only moved partition or changed carry-along columns: a column update, no model;
3. deletes, only now that the whole scope was read (a crash can never delete rows that were
   merely not read yet);
4. for a rebuild, the swap of the staging table into the live one.

A plan with nothing to do makes no commit. Progress has exact totals (rows and tokens from the
plan) and an ETA.
"""

import inspect
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.changes import RowStatus
from qwen3_pipeline.embedder import BatchDone, Embedder, EncodeResult, EncodeStats, engine_info
from qwen3_pipeline.engine.canary import DEFAULT_DRIFT_THRESHOLD, Canaries, DriftGuard
from qwen3_pipeline.engine.plan import RefreshPlan, read_spill, table_spec_for
from qwen3_pipeline.engine.report import MAX_SHOWN_FAILURES, RefreshReport, Tally
from qwen3_pipeline.engine.reproject import Donor, Reprojected, find_donor
from qwen3_pipeline.errors import ConfigError, StoreError
from qwen3_pipeline.progress import Progress
from qwen3_pipeline.schema import (
    CHUNK_COLUMNS,
    DOC_KEY_COLUMN,
    MOVED_COLUMN,
    STATUS_COLUMN,
    TEXT_COLUMN,
    TIMESTAMP_TYPE,
    chunk_key,
)
from qwen3_pipeline.sources import SourceConfig, carry_schema, output_schema
from qwen3_pipeline.sources.readers import Source
from qwen3_pipeline.spec import EmbeddingSpec
from qwen3_pipeline.store import VectorStore, begin_rebuild, commit_rebuild

if TYPE_CHECKING:  # the chunking module (pandas, the splitter) loads only for chunk tables
    from qwen3_pipeline.chunking import Chunker
    from qwen3_pipeline.gate import GateConfig

logger = logging.getLogger("qwen3_pipeline")


def apply_plan(
    plan: RefreshPlan,
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    storage_options: dict[str, str] | None = None,
    source_name: str | None = None,
    run_id: str | None = None,
    chunk_rows: int,
    version_before: int = 0,
    progress: bool = True,
    reproject: bool = True,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    accept_drift: bool = False,
    gate: "GateConfig | None" = None,
) -> RefreshReport:
    """Carry out ``plan`` and return the refresh report; the plan's spill files are removed.

    Args:
        plan: From :func:`~qwen3_pipeline.engine.plan.plan_refresh` with the same arguments.
        source: The source the plan read (for its schema and lineage name).
        config: The source configuration the plan used.
        embedder: The model; its spec must be the plan's.
        storage_options: Object-store options for LanceDB.
        source_name: Lineage label written on each row (default: the source's name).
        run_id: Lineage id written on each row (default: a new UUID).
        chunk_rows: The most rows per embed call and per commit.
        version_before: The live table's version before the refresh (for the report).
        progress: Report progress (bar on a terminal, log lines otherwise).
        reproject: Re-project rows from a donor table when one qualifies (see
            :func:`~qwen3_pipeline.engine.reproject.find_donor`).
        drift_threshold: Minimum cosine between the table's recorded canary vectors and the
            loaded model's (see :mod:`~qwen3_pipeline.engine.canary`).
        accept_drift: Write even when the canaries drifted, and re-record them.
        gate: For a rebuild, evaluate live and staging on a golden set before the swap and
            swap only if staging scores as well (the decision is ``report.gate``; a failed
            gate leaves live untouched and keeps the staging table for inspection).

    Returns:
        The :class:`RefreshReport`.

    Raises:
        ConfigError: The embedder's spec is not the plan's.
        EmbeddingDriftError: The loaded model no longer reproduces the table's canaries
            (nothing written).
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    try:
        spec = table_spec_for(embedder.spec, config)
        if spec.fingerprint != plan.spec_fingerprint:
            raise ConfigError(
                f"the plan was made for spec {plan.spec_fingerprint}, the embedder and source "
                f"configuration make {spec.fingerprint}; plan again with them"
            )
        return _apply(
            plan,
            source=source,
            config=config,
            embedder=embedder,
            spec=spec,
            storage_options=storage_options,
            label=source_name or source.name,
            run_id=run_id or uuid.uuid4().hex,
            chunk_rows=chunk_rows,
            version_before=version_before,
            progress=progress,
            reproject=reproject,
            drift_threshold=drift_threshold,
            accept_drift=accept_drift,
            gate=gate,
        )
    finally:
        plan.close()


def _apply(
    plan: RefreshPlan,
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    spec: EmbeddingSpec,
    storage_options: dict[str, str] | None,
    label: str,
    run_id: str,
    chunk_rows: int,
    version_before: int,
    progress: bool,
    reproject: bool,
    drift_threshold: float,
    accept_drift: bool,
    gate: "GateConfig | None",
) -> RefreshReport:
    started = time.perf_counter()
    if gate is not None and not plan.rebuild:
        raise ConfigError("a gate applies to a rebuild only (rebuild=True / --rebuild)")
    schema = output_schema(source, config)
    open_args = {
        "key_type": schema.field("key").type,
        "carry_schema": carry_schema(schema),
        "source_key": config.key,
        "storage_options": storage_options,
    }
    if plan.rebuild:
        store = begin_rebuild(plan.table_uri, plan.table_name, spec, **open_args)
    else:
        store = VectorStore.open(plan.table_uri, plan.table_name, spec, **open_args)
    work = plan.work
    tally = work.tally
    writer_type = _DocumentWriter if config.chunking is not None else _Writer
    writer = writer_type(store, embedder, tally, carry_names=list(config.carry), label=label,
                         run_id=run_id)  # fmt: skip
    if reproject and plan.rows_to_embed and config.chunking is None:
        writer.donor = _donor_for(plan, spec, storage_options)
    guard = None
    if plan.rows_to_embed:
        # Checked before the model's first call, so nothing is written by a drifted model.
        canaries = Canaries(store.connection, plan.table_name, spec)
        guard = DriftGuard(embedder, canaries, threshold=drift_threshold, accept_drift=accept_drift)
        writer.embedder = guard
    if isinstance(writer, _DocumentWriter) and config.chunking is not None:
        from qwen3_pipeline.chunking import Chunker

        writer.chunker = Chunker(config.chunking)
    with Progress(
        plan.rows_to_embed,
        f"embedding into {plan.target_table}",
        # A chunk table's documents are counted as they are written; the plan's token
        # figure (whole documents, estimated) is not what the model will see.
        tokens_total=None if config.chunking is not None else plan.tokens_to_embed,
        enabled=progress and plan.rows_to_embed > 0,
    ) as bar:
        for chunk in read_spill(work.embed_file, chunk_rows):
            writer.embed_and_write(chunk, bar)
    for chunk in read_spill(work.update_file, chunk_rows):
        writer.write_updates(chunk)
    if len(work.delete_keys):
        deleted = store.delete_keys(work.delete_keys)
        if deleted is not None:
            tally.commits += 1
            tally.add("deleted", work.delete_partitions)
            if store.chunked:
                tally.total["chunks_deleted"] += deleted.deleted
    decision = None
    if plan.rebuild and gate is not None:
        from qwen3_pipeline.gate import gate_rebuild

        decision = gate_rebuild(
            gate,
            uri=plan.table_uri,
            live_table=plan.table_name,
            staging_table=store.table_name,
            staging_version=store.version,
            staging_embedder=embedder,
            storage_options=storage_options,
        )
        logger.info("%s", decision.summary())
    swapped = plan.rebuild and (decision is None or decision.passed)
    if swapped:
        store = commit_rebuild(store)
        tally.commits += 1
    elif plan.rebuild:
        logger.error(
            "gate failed: %s is not swapped in; staging table %s is kept for inspection "
            "(drop it, or re-run the rebuild with another tolerance to resume it)",
            plan.table_name,
            store.table_name,
        )
    wrote_live = not plan.rebuild or swapped
    canaries_recorded = (
        0
        if guard is None or not wrote_live
        else guard.record_if_needed(run_id=run_id, wrote=tally.encode.rows > 0)
    )
    if tally.commits:
        store.maybe_optimize()
    report = _report(
        tally,
        gate=None if decision is None else decision.as_dict(),
        guard=guard,
        canaries_recorded=canaries_recorded,
        engine=engine_info(embedder),
        store=store,
        plan=plan,
        run_id=run_id,
        version_before=version_before,
        seconds=plan.seconds + time.perf_counter() - started,
    )
    logger.info("%s", report.summary())
    return report


def _donor_for(
    plan: RefreshPlan, spec: EmbeddingSpec, storage_options: dict[str, str] | None
) -> Donor | None:
    """The table the plan's rows can be re-projected from: the live table of a rebuild first."""
    import lancedb

    from qwen3_pipeline.store import list_table_names

    db = lancedb.connect(plan.table_uri, storage_options=storage_options)
    # The table being written is no donor of itself (its rows to embed are new or changed).
    names = list_table_names(db) - {plan.target_table}
    donor = find_donor(db, sorted(names), spec, prefer=plan.table_name if plan.rebuild else None)
    if donor is not None:
        logger.info(
            "re-projecting unchanged rows from table %s (dim %d -> %d) instead of embedding",
            donor.name,
            donor.spec.output_dim,
            spec.output_dim,
        )
    return donor


class _Writer:
    """Embeds and writes the plan's rows chunk by chunk, counting what landed."""

    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        tally: Tally,
        *,
        carry_names: list[str],
        label: str,
        run_id: str,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tally = tally
        self.carry_names = carry_names
        self.label = label
        self.run_id = run_id
        self.donor: Donor | None = None

    def write_updates(self, rows: pa.Table) -> None:
        tally = self.tally
        written = self.store.update_columns(rows.drop_columns([MOVED_COLUMN]))
        tally.commits += written is not None
        moved = np.asarray(rows.column(MOVED_COLUMN).to_numpy(), dtype=bool)
        partitions = rows.column("partition_key")
        tally.add("moved", partitions, moved)
        tally.add("carry_updated", partitions, ~moved)

    def embed_and_write(self, chunk: pa.Table, bar: Progress) -> None:
        """Embed one chunk of rows and upsert it; ``bar`` hears of each forward pass."""
        tally, store = self.tally, self.store

        def on_batch(rows: int, tokens: int) -> None:
            bar.update(rows, tokens=tokens)

        partitions = chunk.column("partition_key").combine_chunks()
        reprojected = None
        if self.donor is not None:
            try:
                reprojected = self.donor.lookup(chunk.column("key"), chunk.column("content_hash"))
            except StoreError as e:
                # Re-projection only saves work: a donor that cannot be read is dropped.
                logger.warning("not re-projecting from %s: %s", self.donor.name, e)
                self.donor = None
        if reprojected is not None:
            tally.add("reprojected", partitions, reprojected.found)
            bar.update(int(reprojected.found.sum()))
        to_embed = (
            np.ones(chunk.num_rows, dtype=bool) if reprojected is None else ~reprojected.found
        )
        texts = chunk.column(TEXT_COLUMN).filter(pa.array(to_embed)).to_pylist()
        encoded = _merge_reprojected(
            embed_reporting(self.embedder, texts, on_batch) if texts else None,
            reprojected,
            to_embed,
            store.spec.output_dim,
        )
        if texts:
            tally.encode = tally.encode + encoded.stats
        tally.add("embedded", partitions, to_embed)
        ok = np.ones(chunk.num_rows, dtype=bool)
        if encoded.failures:
            failed_keys = chunk.column("key").to_pylist()
            for index, reason in encoded.failures.items():
                ok[index] = False
                if len(tally.failures) < MAX_SHOWN_FAILURES:
                    tally.failures.append((str(failed_keys[index]), reason))
            tally.add("failed", partitions, ~ok)
            logger.error("%d row(s) could not be embedded; their old vectors are kept", (~ok).sum())
        keep = pa.array(np.flatnonzero(ok))
        written = chunk.take(keep) if not ok.all() else chunk
        statuses = np.asarray(written.column(STATUS_COLUMN).to_numpy(), dtype=np.int8)
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
            source=self.label,
            run_id=self.run_id,
            source_updated_at=written.column("source_updated_at").combine_chunks(),
            carry=carry,
            embedded_at=(
                None if encoded.embedded_at is None else encoded.embedded_at.filter(pa.array(ok))
            ),
        )
        tally.commits += store.upsert(rows_to_write) is not None


@dataclass(frozen=True, kw_only=True)
class _Vectors:
    """One chunk's vectors, embedded or re-projected, in row order."""

    vectors: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    failures: dict[int, str]
    stats: EncodeStats
    embedded_at: pa.Array | None


def _merge_reprojected(
    encoded: EncodeResult | None,
    reprojected: "Reprojected | None",
    embedded: np.ndarray,
    dim: int,
) -> _Vectors:
    """Put the model's rows (where ``embedded``) and the re-projected ones back in row order."""
    n = len(embedded)
    vectors = np.zeros((n, dim), dtype=np.float32)
    n_tokens = np.zeros(n, dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(embedded)
    failures: dict[int, str] = {}
    if encoded is not None:
        vectors[rows] = encoded.vectors
        n_tokens[rows] = encoded.n_tokens
        truncated[rows] = encoded.truncated
        failures = {int(rows[i]): reason for i, reason in encoded.failures.items()}
    embedded_at = None
    if reprojected is not None:
        found = reprojected.found
        vectors[found] = reprojected.vectors
        n_tokens[found] = reprojected.n_tokens
        truncated[found] = reprojected.truncated
        # A re-projected vector keeps the time the model computed it; embedded rows: now.
        stamps = np.full(n, np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us"))
        stamps[found] = reprojected.embedded_at.cast(pa.timestamp("us")).to_numpy(
            zero_copy_only=False
        )
        embedded_at = pa.array(stamps).cast(TIMESTAMP_TYPE)
    stats = encoded.stats if encoded is not None else EncodeStats()
    return _Vectors(
        vectors=vectors,
        n_tokens=n_tokens,
        truncated=truncated,
        failures=failures,
        stats=stats,
        embedded_at=embedded_at,
    )


class _DocumentWriter(_Writer):
    """Writes documents of a chunk table: chunk, reuse stored chunks, one commit per batch.

    Each changed document is cut again; a chunk whose text is already stored for that
    document keeps its stored vector (no model call), the others are embedded, and the batch's
    documents are replaced in one commit (their chunks that are no longer cut are deleted in
    the same commit), so every document is wholly old or wholly new at every version. A
    document with a chunk the model could not embed keeps all its old chunks.
    """

    chunker: "Chunker"

    def embed_and_write(self, docs: pa.Table, bar: Progress) -> None:
        """Chunk, embed what is new and replace one batch of documents; ``bar`` counts them."""
        from qwen3_pipeline.chunking import chunk_rows, diff_chunks

        tally, store = self.tally, self.store
        doc_keys = docs.column("key").combine_chunks()
        chunks = chunk_rows(self.chunker, doc_keys, docs.column(TEXT_COLUMN))
        owner = np.asarray(pc.index_in(chunks.column("key"), value_set=doc_keys), dtype=np.int64)
        statuses = np.asarray(docs.column(STATUS_COLUMN).to_numpy(), dtype=np.int8)
        stored = store.stored_chunks(doc_keys.filter(pa.array(statuses != RowStatus.NEW)))
        matched = diff_chunks(chunks, stored)
        embed = matched.embed
        embed_rows = np.flatnonzero(embed)
        n, dim = chunks.num_rows, store.spec.output_dim
        vectors = np.zeros((n, dim), dtype=np.float32)
        n_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        stamps = np.full(n, np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us"))
        reused = np.flatnonzero(~embed)
        if len(reused):
            source_rows = matched.vector_row[reused]
            stored_vectors = stored.column("vector").combine_chunks()
            flat = stored_vectors.flatten().to_numpy(zero_copy_only=False)
            vectors[reused] = flat.reshape(-1, dim)[source_rows]
            n_tokens[reused] = stored.column("n_tokens").to_numpy()[source_rows]
            truncated[reused] = stored.column("truncated").to_numpy()[source_rows]
            stamps[reused] = stored.column("embedded_at").to_numpy()[source_rows]
        doc_ok = np.ones(docs.num_rows, dtype=bool)
        if len(embed_rows):
            texts = chunks.column("chunk_text").take(pa.array(embed_rows)).to_pylist()
            encoded = embed_reporting(
                self.embedder, texts, lambda rows, tokens: bar.update(0, tokens=tokens)
            )
            tally.encode = tally.encode + encoded.stats
            vectors[embed_rows] = encoded.vectors
            n_tokens[embed_rows] = encoded.n_tokens
            truncated[embed_rows] = encoded.truncated
            self._record_failures(encoded.failures, embed_rows, owner, chunks, doc_keys, doc_ok)
        chunk_partitions = docs.column("partition_key").combine_chunks().take(pa.array(owner))
        tally.add("embedded", chunk_partitions, embed)
        partitions = docs.column("partition_key").combine_chunks()
        tally.add("failed", partitions, ~doc_ok)
        tally.add("inserted", partitions, doc_ok & (statuses == RowStatus.NEW))
        tally.add("updated", partitions, doc_ok & (statuses != RowStatus.NEW))
        row_ok = doc_ok[owner]
        tally.add("truncated", chunk_partitions, truncated & row_ok)
        kept = chunks.filter(pa.array(row_ok))
        kept_owner = pa.array(owner[row_ok])
        chunk_ids = pa.array(
            [
                chunk_key(k, seq)
                for k, seq in zip(
                    kept.column("key").to_pylist(),
                    kept.column("chunk_seq").to_pylist(),
                    strict=True,
                )
            ],
            pa.string(),
        )
        chunk_columns = kept.rename_columns(
            [DOC_KEY_COLUMN if c == "key" else c for c in kept.column_names]
        )
        rows = store.build_rows(
            keys=chunk_ids,
            vectors=vectors[row_ok],
            content_hashes=docs.column("content_hash").combine_chunks().take(kept_owner),
            n_tokens=n_tokens[row_ok],
            truncated=truncated[row_ok],
            partition_keys=partitions.take(kept_owner),
            source=self.label,
            run_id=self.run_id,
            source_updated_at=docs.column("source_updated_at").combine_chunks().take(kept_owner),
            carry=docs.select(self.carry_names).take(kept_owner) if self.carry_names else None,
            embedded_at=pa.array(stamps[row_ok]).cast(TIMESTAMP_TYPE),
            chunks=chunk_columns.select(list(CHUNK_COLUMNS)),
        )
        written = store.replace_documents(rows, doc_keys.filter(pa.array(doc_ok)))
        if written is not None:
            tally.commits += 1
            tally.total["chunks_deleted"] += written.deleted
        tally.total["chunks_written"] += rows.num_rows
        tally.total["chunks_reused"] += int((~embed & row_ok).sum())
        bar.update(docs.num_rows)

    def _record_failures(
        self,
        failures: Mapping[int, str],
        embed_rows: np.ndarray,
        owner: np.ndarray,
        chunks: pa.Table,
        doc_keys: pa.Array,
        doc_ok: np.ndarray,
    ) -> None:
        if not failures:
            return
        seqs = chunks.column("chunk_seq")
        for index, reason in failures.items():
            row = int(embed_rows[index])
            doc = int(owner[row])
            doc_ok[doc] = False
            if len(self.tally.failures) < MAX_SHOWN_FAILURES:
                key = doc_keys[doc].as_py()
                self.tally.failures.append((str(key), f"chunk {seqs[row].as_py()}: {reason}"))
        logger.error(
            "%d document(s) have chunks that could not be embedded; they keep their old chunks",
            int((~doc_ok).sum()),
        )


def embed_reporting(
    embedder: Embedder, texts: list[str], on_batch: BatchDone | None
) -> EncodeResult:
    """Embed ``texts``, reporting each forward pass to ``on_batch`` (when given).

    An embedder written before ``on_batch`` existed (its ``embed_documents`` takes only the
    texts) still works: progress is then reported once, when the call returns.
    """
    if on_batch is None:
        return embedder.embed_documents(texts)
    if "on_batch" in inspect.signature(embedder.embed_documents).parameters:
        return embedder.embed_documents(texts, on_batch=on_batch)
    result = embedder.embed_documents(texts)
    on_batch(len(texts), int(result.stats.real_tokens))
    return result


def _report(
    tally: Tally,
    *,
    gate: dict[str, Any] | None,
    guard: DriftGuard | None,
    canaries_recorded: int,
    engine: dict[str, Any],
    store: VectorStore,
    plan: RefreshPlan,
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
        reprojected=total["reprojected"],
        embedded_rows=encode.rows,
        tokens=encode.real_tokens,
        padded_tokens=encode.padded_tokens,
        padding_efficiency=round(encode.padding_efficiency, 6),
        tokens_per_second=round(encode.tokens_per_second, 3),
        embed_seconds=round(encode.seconds, 6),
        plan_seconds=round(plan.seconds, 6),
        seconds=round(seconds, 6),
        version_before=version_before,
        version_after=store.version,
        committed=tally.commits > 0,
        table_uri=store.uri,
        table_name=store.table_name,
        spec_fingerprint=plan.spec_fingerprint,
        partition_keys=plan.partition_keys,
        per_partition=tally.per_partition(),
        failures=list(tally.failures),
        run_id=run_id,
        engine=str(engine["engine"]),
        workers=int(engine["workers"]),
        model_loads=int(engine["model_loads"]),
        model_loaded=int(engine["model_loads"]) > 0,
        canary_min_cosine=(
            None if guard is None or guard.result is None else round(guard.result.min_cosine, 8)
        ),
        drift_accepted=guard is not None and guard.drift_accepted,
        gate=gate,
        canaries_recorded=canaries_recorded,
        chunked=store.chunked,
        chunks_written=total["chunks_written"],
        chunks_reused=total["chunks_reused"],
        chunks_deleted=total["chunks_deleted"],
    )
