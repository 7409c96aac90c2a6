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
from typing import Any

import numpy as np
import pyarrow as pa

from qwen3_pipeline.changes import RowStatus
from qwen3_pipeline.embedder import BatchDone, Embedder, EncodeResult, engine_info
from qwen3_pipeline.engine.plan import RefreshPlan, read_spill
from qwen3_pipeline.engine.report import MAX_SHOWN_FAILURES, RefreshReport, Tally
from qwen3_pipeline.errors import ConfigError
from qwen3_pipeline.progress import Progress
from qwen3_pipeline.schema import MOVED_COLUMN, STATUS_COLUMN, TEXT_COLUMN
from qwen3_pipeline.sources import SourceConfig, carry_schema, output_schema
from qwen3_pipeline.sources.readers import Source
from qwen3_pipeline.store import VectorStore, begin_rebuild, commit_rebuild

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

    Returns:
        The :class:`RefreshReport`.

    Raises:
        ConfigError: The embedder's spec is not the plan's.
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    try:
        if embedder.spec.fingerprint != plan.spec_fingerprint:
            raise ConfigError(
                f"the plan was made for spec {plan.spec_fingerprint}, the embedder has "
                f"{embedder.spec.fingerprint}; plan again with this embedder"
            )
        return _apply(
            plan,
            source=source,
            config=config,
            embedder=embedder,
            storage_options=storage_options,
            label=source_name or source.name,
            run_id=run_id or uuid.uuid4().hex,
            chunk_rows=chunk_rows,
            version_before=version_before,
            progress=progress,
        )
    finally:
        plan.close()


def _apply(
    plan: RefreshPlan,
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    storage_options: dict[str, str] | None,
    label: str,
    run_id: str,
    chunk_rows: int,
    version_before: int,
    progress: bool,
) -> RefreshReport:
    started = time.perf_counter()
    schema = output_schema(source, config)
    open_args = {
        "key_type": schema.field("key").type,
        "carry_schema": carry_schema(schema),
        "source_key": config.key,
        "storage_options": storage_options,
    }
    if plan.rebuild:
        store = begin_rebuild(plan.table_uri, plan.table_name, embedder.spec, **open_args)
    else:
        store = VectorStore.open(plan.table_uri, plan.table_name, embedder.spec, **open_args)
    work = plan.work
    tally = work.tally
    writer = _Writer(store, embedder, tally, carry_names=list(config.carry), label=label,
                     run_id=run_id)  # fmt: skip
    with Progress(
        plan.rows_to_embed,
        f"embedding into {plan.target_table}",
        tokens_total=plan.tokens_to_embed,
        enabled=progress and plan.rows_to_embed > 0,
    ) as bar:
        for chunk in read_spill(work.embed_file, chunk_rows):
            writer.embed_and_write(
                chunk, on_batch=lambda rows, tokens: bar.update(rows, tokens=tokens)
            )
    for chunk in read_spill(work.update_file, chunk_rows):
        writer.write_updates(chunk)
    if len(work.delete_keys) and store.delete_keys(work.delete_keys) is not None:
        tally.commits += 1
        tally.add("deleted", work.delete_partitions)
    if plan.rebuild:
        store = commit_rebuild(store)
        tally.commits += 1
    if tally.commits:
        store.maybe_optimize()
    report = _report(
        tally,
        engine=engine_info(embedder),
        store=store,
        plan=plan,
        run_id=run_id,
        version_before=version_before,
        seconds=plan.seconds + time.perf_counter() - started,
    )
    logger.info("%s", report.summary())
    return report


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

    def write_updates(self, rows: pa.Table) -> None:
        tally = self.tally
        written = self.store.update_columns(rows.drop_columns([MOVED_COLUMN]))
        tally.commits += written is not None
        moved = np.asarray(rows.column(MOVED_COLUMN).to_numpy(), dtype=bool)
        partitions = rows.column("partition_key")
        tally.add("moved", partitions, moved)
        tally.add("carry_updated", partitions, ~moved)

    def embed_and_write(self, chunk: pa.Table, *, on_batch: BatchDone) -> None:
        """Embed one chunk and upsert it; ``on_batch`` hears of each forward pass."""
        tally, store = self.tally, self.store
        encoded = embed_reporting(self.embedder, chunk.column(TEXT_COLUMN).to_pylist(), on_batch)
        tally.encode = tally.encode + encoded.stats
        partitions = chunk.column("partition_key").combine_chunks()
        tally.add("embedded", partitions)
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
        )
        tally.commits += store.upsert(rows_to_write) is not None


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
    )
