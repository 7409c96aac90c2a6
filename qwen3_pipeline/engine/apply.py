"""The apply pass of a refresh: embed and write exactly what the plan listed.

:func:`apply_plan` opens (or creates) the table, then streams the plan's spill files:

1. rows to embed, ``chunk_rows`` at a time: one embed call and one ``merge_insert`` commit
   each (:mod:`.row_writer`; whole documents of a chunk table: :mod:`.chunk_writer`), so a
   crash loses at most the chunks in flight and a re-run skips every row whose hash is
   stored; reading the next chunk, embedding one and committing the one before overlap
   (:mod:`.pipeline`), the commits still one at a time and in order;
2. rows that only moved partition or changed carry-along columns: a column update, no model;
3. deletes, only now that the whole scope was read (a crash can never delete rows that were
   merely not read yet);
4. for a rebuild, the gate (if any) and the swap of the staging table into the live one.

Before the model's first call the drift canary is checked (:mod:`.canary`); the canaries of a
table without any are recorded with its first commit of vectors; a re-projection donor is used
only when the loaded model reproduces its canaries. A plan with nothing to do makes no commit.
Progress has exact totals (rows and tokens from the plan) and an ETA.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import engine_info, start_embedder
from qwen3_pipeline.engine import pipeline
from qwen3_pipeline.engine.canary import (
    Canaries,
    DriftGuard,
    drop_canaries,
    hand_over_canaries,
)
from qwen3_pipeline.engine.options import RefreshRequest
from qwen3_pipeline.engine.plan import RefreshPlan, table_spec_for
from qwen3_pipeline.engine.report import RefreshReport, Tally
from qwen3_pipeline.engine.reproject import Donor, find_donor
from qwen3_pipeline.engine.row_writer import RowWriter, TableWriter
from qwen3_pipeline.engine.scan import read_spill
from qwen3_pipeline.sources import carry_schema, output_schema
from qwen3_pipeline.store import VectorStore, begin_rebuild, commit_rebuild

logger = logging.getLogger("qwen3_pipeline")


def apply_plan(
    plan: RefreshPlan,
    request: RefreshRequest,
    *,
    version_before: int = 0,
    bar: Progress | None = None,
    optimize: bool = True,
    committed_before: bool = False,
) -> RefreshReport:
    """Carry out ``plan`` and return the refresh report; the plan's spill files are removed.

    Args:
        plan: From :func:`~qwen3_pipeline.engine.plan.plan_scope` of ``request``.
        request: The refresh the plan was made for (its embedder's spec must be the plan's).
        version_before: The live table's version before the refresh (for the report).
        bar: The run's progress line (a run over several shards shares one); None opens one
            for this plan when ``request.options.progress``.
        optimize: Compact the table at the end when it has piled up fragments (a run over
            several shards asks only its last apply: compaction runs once per run).
        committed_before: Earlier applies of the same run committed (so the last one
            compacts even if it commits nothing itself).

    Returns:
        The :class:`RefreshReport`.

    Raises:
        ConfigError: The embedder's spec is not the plan's, or a gate without a rebuild.
        EmbeddingDriftError: The loaded model no longer reproduces the table's canaries
            (nothing written).
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    try:
        spec = table_spec_for(request.embedder.spec, request.config)
        if spec.fingerprint != plan.spec_fingerprint:
            raise ConfigError(
                f"the plan was made for spec {plan.spec_fingerprint}, the embedder and source "
                f"configuration make {spec.fingerprint}; plan again with them"
            )
        if request.options.gate is not None and not plan.rebuild:
            raise ConfigError("a gate applies to a rebuild only (rebuild=True / --rebuild)")
        request = _with_run_id(request)
        started = time.perf_counter()
        if plan.rows_to_embed:
            # Before the table is created or written: a model that cannot load, or a Ray
            # cluster that cannot be reached, leaves no (empty) table behind.
            start_embedder(request.embedder)
        store = _open_target(plan, request, spec)
        if plan.rebuild and not plan.table_exists:
            # A new staging table: canaries left by an abandoned one describe nothing here.
            drop_canaries(store.connection, plan.target_table)
        writer, guard = _writer_for(plan, request, store, spec)
        if store.columns_added:
            # New carry columns were added (one commit); the updates below fill them.
            writer.tally.commits += 1
        if bar is None:
            with _progress_of(plan, request) as own_bar:
                _write_embedded(plan, request, writer, own_bar)
        else:
            _write_embedded(plan, request, writer, bar)
        _write_updates_and_deletes(plan, request, writer)
        if plan.work.watermark is not None:
            # After the last commit of rows: the mark never covers rows not yet stored.
            plan.work.watermark.record(run_id=str(request.options.run_id))
        store, decision = _finish_rebuild(plan, request, writer.store)
        if optimize and (writer.tally.commits or committed_before):
            store.maybe_optimize()
        if optimize:
            # After the compaction, so a backfill's index is built once over compacted files.
            store.ensure_key_index()
        report = _report(
            writer.tally,
            gate=decision,
            guard=guard,
            canaries_recorded=0 if guard is None else guard.canaries_recorded,
            engine=engine_info(request.embedder),
            store=store,
            plan=plan,
            run_id=str(request.options.run_id),
            version_before=version_before,
            seconds=plan.seconds + time.perf_counter() - started,
        )
        logger.info("%s", report.summary())
        return report
    finally:
        plan.close()


def _with_run_id(request: RefreshRequest) -> RefreshRequest:
    options = request.options.with_run_id()
    return request if options is request.options else replace(request, options=options)


def _open_target(plan: RefreshPlan, request: RefreshRequest, spec: EmbeddingSpec) -> VectorStore:
    """The table the apply writes: the live one, or a rebuild's staging table (resumed)."""
    schema = output_schema(request.source, request.config)
    open_args: dict[str, Any] = {
        "key_type": schema.field("key").type,
        "carry_schema": carry_schema(schema),
        "source_key": request.config.key,
        "storage_options": request.storage_options,
    }
    if plan.rebuild:
        return begin_rebuild(plan.table_uri, plan.table_name, spec, **open_args)
    return VectorStore.open(plan.table_uri, plan.table_name, spec, **open_args)


def _writer_for(
    plan: RefreshPlan, request: RefreshRequest, store: VectorStore, spec: EmbeddingSpec
) -> tuple[TableWriter[Any, Any], DriftGuard | None]:
    """The writer of the plan's rows, its embedder behind the drift guard when it embeds.

    The guard checks the canaries of the table written: the live table, or a rebuild's
    staging table (a rebuild is judged against its own vectors, never against the live
    table's: it is the way out of a drift).
    """
    config, options = request.config, request.options
    lineage: dict[str, Any] = {
        "carry_names": list(config.carry),
        "label": request.source_label,
        "run_id": str(options.run_id),
    }
    guard = None
    if plan.rows_to_embed:
        # Checked before the model's first call, so nothing is written by a drifted model.
        canaries = Canaries(store.connection, plan.target_table, spec)
        guard = options.drift_guard(
            request.embedder,
            canaries,
            threshold=options.drift_threshold,
            accept_drift=options.accept_drift,
        )
    writer: TableWriter[Any, Any]
    if config.chunking is None:
        row_writer = RowWriter(store, request.embedder, plan.work.tally, **lineage)
        if options.reproject and plan.rows_to_embed:
            row_writer.donor = _donor_for(plan, spec, request.storage_options, guard)
        writer = row_writer
    else:
        # Imported here: the chunking module pulls in pandas and the splitter library.
        from qwen3_pipeline.chunking.chunker import Chunker
        from qwen3_pipeline.engine.chunk_writer import ChunkWriter

        chunk_writer = ChunkWriter(store, request.embedder, plan.work.tally, **lineage)
        chunk_writer.chunker = Chunker(config.chunking)
        writer = chunk_writer
    if guard is not None:
        writer.embedder = guard
        writer.guard = guard
    writer.failures = plan.work.failures
    return writer, guard


def _progress_of(plan: RefreshPlan, request: RefreshRequest) -> Progress:
    return Progress(
        plan.rows_to_embed,
        f"embedding into {plan.target_table}",
        # A chunk table's documents are counted as they are written; the plan's token
        # figure (whole documents, estimated) is not what the model will see.
        tokens_total=None if request.config.chunking is not None else plan.tokens_to_embed,
        enabled=request.options.progress and plan.rows_to_embed > 0,
    )


def _write_embedded(
    plan: RefreshPlan, request: RefreshRequest, writer: TableWriter[Any, Any], bar: Progress
) -> None:
    """Embed and commit the plan's rows, chunk by chunk: read, embed and write overlap.

    The chunks are committed in the order of the spill, each in one commit (see
    :mod:`.pipeline`); ``pipeline.PIPELINE_DEPTH = 0`` runs them one after another.
    """
    chunks = read_spill(plan.work.embed_file, request.options.chunk_rows)
    with pipeline.one_model_call_at_a_time(writer.guard):
        pipeline.run_pipeline(
            chunks,
            prepare=writer.prepare,
            embed=partial(writer.embed, bar=bar),
            write=writer.write,
            depth=pipeline.PIPELINE_DEPTH,
        )


def _write_updates_and_deletes(
    plan: RefreshPlan, request: RefreshRequest, writer: TableWriter[Any, Any]
) -> None:
    """Column updates (moved, carry-only rows), then the deletes: the scope was all read."""
    work, tally, store = plan.work, writer.tally, writer.store
    for chunk in read_spill(work.update_file, request.options.chunk_rows):
        writer.write_updates(chunk)
    if len(work.delete_keys):
        deleted = store.delete_keys(work.delete_keys)
        if deleted is not None:
            tally.commits += 1
            tally.add("deleted", work.delete_partitions)
            if store.chunked:
                tally.total["chunks_deleted"] += deleted.deleted
    if work.failures is not None:
        # Records of rows deleted, or found stored with their current text (a refresh killed
        # between its vector commit and its record commit): nothing left to retry.
        stale = [*work.stale_failures, work.delete_keys.cast(pa.string())]
        work.failures.clear(pa.concat_arrays(stale))


def _finish_rebuild(
    plan: RefreshPlan, request: RefreshRequest, store: VectorStore
) -> tuple[VectorStore, dict[str, Any] | None]:
    """Gate and swap a completed rebuild; returns the live store and the gate's decision."""
    if not plan.rebuild:
        return store, None
    gate = request.options.gate
    decision = None
    if gate is not None:
        from qwen3_pipeline.lifecycle.gate import gate_rebuild

        decision = gate_rebuild(
            gate,
            uri=plan.table_uri,
            live_table=plan.table_name,
            staging_table=store.table_name,
            staging_version=store.version,
            staging_embedder=request.embedder,
            storage_options=request.storage_options,
        )
        logger.info("%s", decision.summary())
    if decision is None or decision.passed:
        staging = store.table_name
        store = commit_rebuild(store)
        plan.work.tally.commits += 1
        warning = hand_over_canaries(store.connection, staging, plan.table_name)
        if warning is not None:
            plan.work.tally.warnings.append(warning)
    else:
        logger.error(
            "gate failed: %s is not swapped in; staging table %s is kept for inspection "
            "(drop it, or re-run the rebuild with another tolerance to resume it)",
            plan.table_name,
            store.table_name,
        )
    return store, None if decision is None else decision.as_dict()


def _donor_for(
    plan: RefreshPlan,
    spec: EmbeddingSpec,
    storage_options: dict[str, str] | None,
    guard: DriftGuard | None,
) -> Donor | None:
    """The table the plan's rows can be re-projected from: the live table of a rebuild first.

    With a drift guard (always, outside tests that inject none), this table's canaries are
    checked and the donor's verified first: both embed a few canary texts, so the model is
    loaded here; this runs only for a plan with rows to embed or re-project.

    Raises:
        EmbeddingDriftError: This table's canaries drifted (and the drift is not accepted).
    """
    import lancedb

    from qwen3_pipeline.store import list_table_names

    db = lancedb.connect(plan.table_uri, storage_options=storage_options)
    # The table being written is no donor of itself (its rows to embed are new or changed).
    names = sorted(list_table_names(db) - {plan.target_table})
    donor = find_donor(
        db,
        names,
        spec,
        prefer=plan.table_name if plan.rebuild else None,
        warnings=plan.work.tally.warnings,
        verify=None if guard is None else _verifier(guard),
    )
    if donor is not None:
        logger.info(
            "re-projecting unchanged rows from table %s (dim %d -> %d) instead of embedding",
            donor.name,
            donor.spec.output_dim,
            spec.output_dim,
        )
    return donor


def _verifier(guard: DriftGuard) -> Callable[[str, EmbeddingSpec], str | None]:
    """``find_donor``'s check of a candidate donor, by the refresh's drift guard."""

    def verify(name: str, donor_spec: EmbeddingSpec) -> str | None:
        # Re-projected rows are written without a model call: this table's canaries are
        # checked before any of them is (as the first embed call would), then the donor's.
        guard.check_now()
        return guard.verify_donor(name, donor_spec)

    return verify


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
        retried=total["retried"],
        quarantined=total["quarantined"],
        deferred=total["deferred"],
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
        warnings=[*tally.warnings, *(guard.warnings if guard is not None else [])],
        read_rows=total["scanned"],
        **({} if plan.work.watermark is None else plan.work.watermark.as_dict()),
    )
