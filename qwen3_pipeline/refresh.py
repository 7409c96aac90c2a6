"""One refresh: bring a vector table to exactly the state of a source scope.

:func:`refresh` = :func:`~qwen3_pipeline.engine.plan.plan_refresh` (read the whole scope,
validate, hash, diff: exact counts, nothing written) -> the mass-delete guard ->
:func:`~qwen3_pipeline.engine.apply.apply_plan` (embed new and changed rows, write in chunks,
delete at the end). Bad input is found by the plan, so it never half-writes; a crash during
the apply loses at most the chunk in flight and a re-run converges; a refresh that finds
nothing to change makes no commit.

A refresh over several hash shards (:class:`~qwen3_pipeline.sources.Shards`) runs shard by
shard, so that its memory is bounded by one shard rather than the table: the source is read
once and split to disk by shard, every shard is planned (each against its own stored state),
the mass-delete guard judges the totals, then the shards are applied in order. All shards are
planned before the first write, so bad input anywhere still writes nothing.
"""

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from qwen3_pipeline.embedder import BatchDone, Embedder, EncodeResult, engine_info
from qwen3_pipeline.engine.apply import apply_plan, embed_reporting
from qwen3_pipeline.engine.canary import DEFAULT_DRIFT_THRESHOLD
from qwen3_pipeline.engine.plan import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_DELETE_SHARE,
    RefreshPlan,
    check_mass_delete,
    plan_refresh,
    table_spec_for,
)
from qwen3_pipeline.engine.report import PLAN_COUNTERS, ROW_COUNTERS, RefreshReport, merge_reports
from qwen3_pipeline.errors import ConfigError, StoreError
from qwen3_pipeline.progress import Progress
from qwen3_pipeline.schema import validate_table_name, validate_uri
from qwen3_pipeline.sources import (
    Shards,
    Source,
    SourceConfig,
    carry_schema,
    output_schema,
    scope_partition_keys,
)
from qwen3_pipeline.sources.split import ShardSplit, split_by_shard
from qwen3_pipeline.spec import EmbeddingSpec
from qwen3_pipeline.store import VectorStore, store_error

if TYPE_CHECKING:
    from qwen3_pipeline.gate import GateConfig

logger = logging.getLogger("qwen3_pipeline")

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_DELETE_SHARE",
    "ROW_COUNTERS",
    "RefreshPlan",
    "RefreshReport",
    "check_mass_delete",
    "plan_refresh",
    "refresh",
    "table_spec_for",
]


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
    allow_mass_delete: bool = False,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    spill_dir: str | None = None,
    progress: bool = True,
    reproject: bool = True,
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
    accept_drift: bool = False,
    gate: "GateConfig | None" = None,
) -> RefreshReport:
    """Bring ``table`` to the state of the source scope, embedding only what changed.

    Args:
        source: Where the rows come from (DuckDB, Parquet, Arrow).
        config: Key, text/template, carry columns, ``updated_at`` and the partition scope
            (``config.partition``: one shard, several, a time window, or None for all).
            Several hash shards (``Shards``) are refreshed one shard at a time (see the
            module docstring), unless ``rebuild``, or unless the table holds rows outside
            the selected shards' partitions when all shards are selected (another shard
            count, or unpartitioned rows: the whole table is then refreshed at once, which
            moves those rows without re-embedding them).
        embedder: The model (``Qwen3Encoder``, or a fake in tests); its spec decides the table.
            It is used as is by every shard (a model is loaded once per run).
        db_uri: LanceDB directory or object-store URI.
        table: Vector table name.
        storage_options: Object-store options (credentials) for LanceDB.
        source_name: Lineage label written on each row (default: the source's name).
        run_id: Lineage id written on each row (default: a new UUID).
        rebuild: Embed the whole source into a new table and swap it in when complete (for a
            spec change); the live table is untouched until the swap.
        chunk_rows: Rows per source batch, and the most rows per embed call and per commit.
        allow_mass_delete: Let the refresh delete more than ``max_delete_share`` of the scope
            (or everything, for an empty source).
        max_delete_share: The largest share of the stored scope a refresh may delete.
        spill_dir: Where the plan spills its work, and a run over several shards its split
            of the source (default: the system temp directory).
        progress: Report progress (bar on a terminal, log lines otherwise).
        reproject: Derive vectors from a table of the same database that holds the same
            model at a larger or equal dim (the live table itself during a rebuild to a
            smaller dim), for rows whose text it holds unchanged, instead of embedding them:
            Matryoshka re-projection, no model call (see :mod:`.engine.reproject`).
        drift_threshold: Before the model's first write, the table's canary texts are
            embedded again; below this minimum cosine to their recorded vectors the refresh
            stops (see :mod:`.engine.canary`).
        accept_drift: Write anyway when the canaries drifted, and re-record them with this
            model (the report says ``drift_accepted``).
        gate: With ``rebuild``: evaluate the live and the completed staging table on a golden
            set (:class:`~qwen3_pipeline.gate.GateConfig`) and swap only if staging scores at
            least as well. The decision is ``report.gate``; when it fails, live is untouched
            and the staging table is kept for inspection (a re-run resumes it).

    Returns:
        The :class:`RefreshReport`.

    Raises:
        InputDataError: Null, duplicate or ill-typed keys, missing columns, a template or a
            carry value that does not fit; found before anything is written.
        MassDeleteError: The refresh would delete too much (nothing written).
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        EmbeddingDriftError: The loaded model no longer reproduces the table's canary vectors
            (nothing written; rebuild, or ``accept_drift=True``).
        ConfigError: A partial rebuild, or a bad setting.
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    if gate is not None and not rebuild:
        raise ConfigError("a gate applies to a rebuild only: pass rebuild=True (--rebuild)")
    if not rebuild and _several_shards(config):
        report = _refresh_by_shard(
            source=source,
            config=config,
            embedder=embedder,
            db_uri=db_uri,
            table=table,
            storage_options=storage_options,
            source_name=source_name,
            run_id=run_id,
            chunk_rows=chunk_rows,
            allow_mass_delete=allow_mass_delete,
            max_delete_share=max_delete_share,
            spill_dir=spill_dir,
            progress=progress,
            reproject=reproject,
            drift_threshold=drift_threshold,
            accept_drift=accept_drift,
        )
        if report is not None:
            return report
    version_before = live_version(db_uri, table, storage_options)
    plan = plan_refresh(
        source=source,
        config=config,
        embedder=embedder,
        db_uri=db_uri,
        table=table,
        storage_options=storage_options,
        rebuild=rebuild,
        chunk_rows=chunk_rows,
        spill_dir=spill_dir,
        progress=progress,
    )
    try:
        check_mass_delete(
            plan, max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete
        )
    except BaseException:
        plan.close()
        raise
    return apply_plan(
        plan,
        source=source,
        config=config,
        embedder=embedder,
        storage_options=storage_options,
        source_name=source_name,
        run_id=run_id,
        chunk_rows=chunk_rows,
        version_before=version_before,
        progress=progress,
        reproject=reproject,
        drift_threshold=drift_threshold,
        accept_drift=accept_drift,
        gate=gate,
    )


def live_version(db_uri: str, table: str, storage_options: dict[str, str] | None) -> int:
    """The live table's version before a refresh writes anything; 0 if it does not exist.

    Read before the store is opened, so that the commits creating a new table (or a rebuild's
    staging table) are not mistaken for the table's state before the refresh.

    Raises:
        UnsafeNameError: The URI or table name is unsafe.
        StoreError: LanceDB could not be read.
    """
    import lancedb

    validate_uri(db_uri)
    validate_table_name(table)
    try:
        db = lancedb.connect(db_uri, storage_options=storage_options)
        return int(db.open_table(table).version)
    except Exception as e:  # LanceDB raises ValueError "Table '...' was not found", or I/O errors
        if "not found" in str(e).lower() and ".lance" not in str(e):
            return 0
        error: StoreError = store_error(e, f"read table {table!r} at {db_uri!r}")
        raise error from e


# --------------------------------------------------------------------------- shard by shard


def _several_shards(config: SourceConfig) -> bool:
    partition = config.partition
    if not isinstance(partition, Shards):
        return False
    return len(partition.partition_keys()) > 1


def _refresh_by_shard(
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    db_uri: str,
    table: str,
    storage_options: dict[str, str] | None,
    source_name: str | None,
    run_id: str | None,
    chunk_rows: int,
    allow_mass_delete: bool,
    max_delete_share: float,
    spill_dir: str | None,
    reproject: bool,
    drift_threshold: float,
    accept_drift: bool,
    progress: bool,
) -> RefreshReport | None:
    """Refresh several shards one at a time; None when the whole scope must be refreshed at once.

    Memory is bounded by one shard: the split holds a bounded buffer, each plan holds one
    shard's stored-state index (released when its diff is done) and spills its work, and the
    planned deletes wait on disk until their shard is applied.
    """
    started = time.perf_counter()
    shards = config.partition
    assert isinstance(shards, Shards)  # checked by _several_shards
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    version_before = live_version(db_uri, table, storage_options)
    # The checks of a plan that need no rows, before the source is read: a missing column, a
    # spec mismatch or a changed key type fails now rather than after a full split. Keys are
    # checked during the split (nulls) and shard by shard (duplicates: equal keys share a
    # shard), never over the whole source at once: that aggregate alone would hold every key.
    schema = output_schema(source, config)
    store = VectorStore.inspect(
        db_uri,
        table,
        table_spec_for(embedder.spec, config),
        key_type=schema.field("key").type,
        carry_schema=carry_schema(schema),
        source_key=config.key,
        storage_options=storage_options,
    )
    stored = store.count_rows() if store is not None else 0
    if store is not None and shards.selects_all:
        # A refresh of the whole table also moves (without re-embedding) or deletes the rows
        # labelled otherwise (another shard count, unpartitioned); a shard's scope would miss
        # them, so such a table is refreshed at once (once: afterwards every label is a shard).
        outside = stored - store.count_rows(shards.partition_keys())
        if outside:
            logger.info(
                "table %s holds %d row(s) outside the %d shard partitions; refreshing the "
                "whole table at once",
                table,
                outside,
                shards.count,
            )
            return None
    run_id = run_id or uuid.uuid4().hex
    scope = scope_partition_keys(config.partition)
    directory = Path(tempfile.mkdtemp(prefix="qwen3-shards-", dir=spill_dir))
    planned: list[_PlannedShard] = []
    reports: list[RefreshReport] = []
    try:
        splits = split_by_shard(
            source,
            config,
            shards,
            directory,
            batch_rows=chunk_rows,
            progress=progress,
            expected_rows=stored,
        )
        split_seconds = time.perf_counter() - started
        total = len(splits)
        # Plan every shard before writing anything: bad input in the last shard must leave
        # the table untouched, as it would in a refresh of the whole scope at once.
        for i, split in enumerate(splits, 1):
            logger.info("shard %d/%d (%s): planning %d row(s)", i, total, split.label, split.rows)
            shard_config = replace(config, partition=split.shard)
            plan = plan_refresh(
                source=split.source,
                config=shard_config,
                embedder=embedder,
                db_uri=db_uri,
                table=table,
                storage_options=storage_options,
                chunk_rows=chunk_rows,
                spill_dir=spill_dir,
                progress=progress,
            )
            planned.append(_park(plan, split, shard_config))
            split.remove_files()  # the plan holds all the apply needs of the shard's rows
        check_mass_delete(
            _plan_totals([p.plan for p in planned], scope),
            max_delete_share=max_delete_share,
            allow_mass_delete=allow_mass_delete,
        )
        version = version_before
        to_embed = sum(p.plan.rows_to_embed for p in planned)
        with Progress(
            to_embed,
            f"embedding into {table}",
            tokens_total=sum(p.plan.tokens_to_embed for p in planned),
            enabled=progress and to_embed > 0,
        ) as bar:
            # One progress line for the whole run (exact totals over every shard, one ETA)
            # rather than one per shard: the applies report nothing themselves.
            reporting = _ReportingEmbedder(embedder, bar)
            for i, shard in enumerate(planned, 1):
                logger.info(
                    "shard %d/%d (%s): applying (%d row(s) to embed)",
                    i,
                    total,
                    shard.split.label,
                    shard.plan.rows_to_embed,
                )
                report = apply_plan(
                    shard.unpark(),
                    source=shard.split.source,
                    config=shard.config,
                    embedder=reporting,
                    storage_options=storage_options,
                    source_name=source_name,
                    run_id=run_id,
                    chunk_rows=chunk_rows,
                    version_before=version,
                    progress=False,
                    reproject=reproject,
                    drift_threshold=drift_threshold,
                    accept_drift=accept_drift,
                )
                version = report.version_after if report.version_after is not None else version
                reports.append(report)
    finally:
        for shard in planned:
            shard.plan.close()
        shutil.rmtree(directory, ignore_errors=True)
    merged = merge_reports(reports)
    merged = replace(
        merged,
        partition_keys=scope,
        plan_seconds=round(merged.plan_seconds + split_seconds, 6),
        seconds=round(time.perf_counter() - started, 6),
    )
    logger.info("%s (%d shards)", merged.summary(), total)
    return merged


_DELETES_FILE = "delete.arrow"


class _ReportingEmbedder:
    """The run's embedder, also reporting every forward pass to the run's progress line.

    It wraps the same embedder object for every shard, so a model is loaded once per run.
    """

    def __init__(self, embedder: Embedder, bar: Progress) -> None:
        self._embedder = embedder
        self._bar = bar
        # The drift canary skips embedders whose vectors are a pure function of the text.
        self.deterministic = bool(getattr(embedder, "deterministic", False))

    @property
    def spec(self) -> EmbeddingSpec:
        """The embedder's spec."""
        return self._embedder.spec

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed with the embedder, reporting each forward pass to the bar and ``on_batch``."""

        def done(rows: int, tokens: int) -> None:
            self._bar.update(rows, tokens=tokens)
            if on_batch is not None:
                on_batch(rows, tokens)

        return embed_reporting(self._embedder, list(texts), done)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries with the embedder."""
        return self._embedder.embed_queries(queries)

    def engine_info(self) -> dict[str, Any]:
        """The embedder's engine facts (engine, workers, model loads)."""
        return engine_info(self._embedder)


class _PlannedShard:
    """A shard's plan, with its delete keys parked in its spill directory until it is applied.

    A plan holds the keys it deletes in memory; with every shard planned before the first is
    applied, that would be the deletes of the whole table (all of it, for an allowed mass
    delete). Parked, a waiting plan holds only counters.
    """

    def __init__(self, plan: RefreshPlan, split: ShardSplit, config: SourceConfig) -> None:
        self.plan = plan
        self.split = split
        self.config = config
        self.parked: Path | None = None

    def unpark(self) -> RefreshPlan:
        """The plan with its delete keys read back."""
        if self.parked is None:
            return self.plan
        with pa.OSFile(str(self.parked)) as handle:
            deletes = pa.ipc.open_file(handle).read_all()
        work = replace(
            self.plan.work,
            delete_keys=deletes.column("key").combine_chunks(),
            delete_partitions=deletes.column("partition_key").combine_chunks(),
        )
        return replace(self.plan, work=work)


def _park(plan: RefreshPlan, split: ShardSplit, config: SourceConfig) -> _PlannedShard:
    shard = _PlannedShard(plan, split, config)
    work = plan.work
    if not len(work.delete_keys) or plan.spill_dir is None:
        return shard
    deletes = pa.table({"key": work.delete_keys, "partition_key": work.delete_partitions})
    path = plan.spill_dir / _DELETES_FILE
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, deletes.schema) as out:
            out.write_table(deletes)
    except BaseException:
        plan.close()
        raise
    # New empty arrays: a zero-length slice would keep the keys' buffers alive.
    emptied = replace(
        work,
        delete_keys=pa.array([], work.delete_keys.type),
        delete_partitions=pa.array([], work.delete_partitions.type),
    )
    shard.plan = replace(plan, work=emptied)
    shard.parked = path
    return shard


def _plan_totals(plans: list[RefreshPlan], scope: list[str] | None) -> RefreshPlan:
    """One plan standing for all shards, for the mass-delete guard (it owns no files)."""
    counts = {name: sum(p.counts[name] for p in plans) for name in PLAN_COUNTERS}
    return replace(
        plans[0],
        counts=counts,
        stored_rows=sum(p.stored_rows for p in plans),
        partition_keys=scope,
        rows_to_embed=sum(p.rows_to_embed for p in plans),
        tokens_to_embed=sum(p.tokens_to_embed for p in plans),
        spill_dir=None,
    )
