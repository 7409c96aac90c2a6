"""A refresh over several hash shards, one shard at a time, with memory bounded by one shard.

The source is read once and split to disk by shard (:mod:`qwen3_pipeline.sources.split`),
every shard is planned against its own stored state (its delete keys parked on disk), the
mass-delete guard judges the totals, then the shards are applied in order with one progress
line. All shards are planned before the first write, so bad input anywhere still writes
nothing. :func:`~qwen3_pipeline.engine.refresh.run_refresh` chooses this path.
"""

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.engine.apply import apply_plan
from qwen3_pipeline.engine.canary import Canaries
from qwen3_pipeline.engine.options import RefreshRequest
from qwen3_pipeline.engine.plan import RefreshPlan, plan_scope, table_spec_for
from qwen3_pipeline.engine.report import PLAN_COUNTERS, RefreshReport, merge_reports
from qwen3_pipeline.sources import (
    Shards,
    SourceConfig,
    carry_schema,
    output_schema,
    scope_partition_keys,
)
from qwen3_pipeline.sources.split import ShardSplit, split_by_shard
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.store.connection import connect

logger = logging.getLogger("qwen3_pipeline")

_DELETES_FILE = "delete.arrow"


def several_shards(config: SourceConfig) -> bool:
    """Whether ``config`` selects more than one hash shard (the shard-by-shard path)."""
    partition = config.partition
    return isinstance(partition, Shards) and len(partition.partition_keys()) > 1


@dataclass(kw_only=True)
class ShardPlans:
    """Every selected shard planned, before anything is written; close to remove the files.

    Attributes:
        shards: The shards' plans, in the order they are applied.
        totals: One plan standing for all shards (for the mass-delete guard).
        scope: The selected partition keys.
        split_seconds: Time the split of the source took.
        directory: The split's spill directory.
        started: When planning began (``time.perf_counter``), for the report's seconds.
    """

    shards: list["PlannedShard"] = field(default_factory=list)
    totals: RefreshPlan | None = None
    scope: list[str] | None = None
    split_seconds: float = 0.0
    directory: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    def close(self) -> None:
        """Remove every shard's spill files and the split (idempotent)."""
        for shard in self.shards:
            shard.plan.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "ShardPlans":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_shards(request: RefreshRequest) -> ShardPlans | None:
    """Split the source by shard and plan every shard; None when the table must go at once.

    The table is refreshed at once (None) when all shards are selected and it holds rows
    outside their partitions (another shard count, or unpartitioned rows): a shard's scope
    would miss them, while the whole scope moves them without re-embedding.

    Raises:
        InputDataError: Bad input in any shard (nothing written).
        SpecMismatchError: The table holds another spec.
        StoreError: LanceDB could not be read.
    """
    started = time.perf_counter()
    config, options = request.config, request.options
    shards = config.partition
    assert isinstance(shards, Shards)  # checked by several_shards
    stored = _stored_rows_or_none(request, shards)
    if stored is None:
        return None
    directory = Path(tempfile.mkdtemp(prefix="qwen3-shards-", dir=options.spill_dir))
    planned = ShardPlans(
        started=started, scope=scope_partition_keys(config.partition), directory=directory
    )
    try:
        splits = split_by_shard(
            request.source,
            config,
            shards,
            directory,
            batch_rows=options.chunk_rows,
            progress=options.progress,
            expected_rows=stored,
        )
        planned.split_seconds = time.perf_counter() - started
        # Plan every shard before writing anything: bad input in the last shard must leave
        # the table untouched, as it would in a refresh of the whole scope at once.
        for i, split in enumerate(splits, 1):
            logger.info(
                "shard %d/%d (%s): planning %d row(s)", i, len(splits), split.label, split.rows
            )
            shard_request = replace(
                request, source=split.source, config=replace(config, partition=split.shard)
            )
            planned.shards.append(park(plan_scope(shard_request), split, shard_request))
            split.remove_files()  # the plan holds all the apply needs of the shard's rows
        planned.totals = plan_totals([p.plan for p in planned.shards], planned.scope)
    except BaseException:
        planned.close()
        raise
    return planned


def _stored_rows_or_none(request: RefreshRequest, shards: Shards) -> int | None:
    """The table's stored rows; None when rows outside the shards' partitions need a whole run.

    Runs the checks of a plan that need no rows before the source is read: a missing column,
    a spec mismatch or a changed key type fails now rather than after a full split. Keys are
    checked during the split (nulls) and shard by shard (duplicates: equal keys share a
    shard), never over the whole source at once: that aggregate alone would hold every key.
    """
    schema = output_schema(request.source, request.config)
    store = VectorStore.inspect(
        request.db_uri,
        request.table,
        table_spec_for(request.embedder.spec, request.config),
        key_type=schema.field("key").type,
        carry_schema=carry_schema(schema),
        source_key=request.config.key,
        storage_options=request.storage_options,
    )
    stored = store.count_rows() if store is not None else 0
    if store is not None and shards.selects_all:
        outside = stored - store.count_rows(shards.partition_keys())
        if outside:
            logger.info(
                "table %s holds %d row(s) outside the %d shard partitions; refreshing the "
                "whole table at once",
                request.table,
                outside,
                shards.count,
            )
            return None
    return stored


def apply_shards(
    planned: ShardPlans, request: RefreshRequest, *, version_before: int
) -> RefreshReport:
    """Apply every shard's plan in order under one progress line; the merged report.

    Raises:
        EmbeddingDriftError: The model no longer reproduces the table's canaries.
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    version = version_before
    reports: list[RefreshReport] = []
    to_embed = sum(p.plan.rows_to_embed for p in planned.shards)
    if to_embed:
        # Before the first shard writes anything (its deletes, its column updates): a drift
        # found at a later shard's first model call would leave the run half applied.
        _check_drift_first(request)
    tokens = sum(p.plan.tokens_to_embed for p in planned.shards)
    total = len(planned.shards)
    # One progress line for the whole run (exact totals over every shard, one ETA) rather
    # than one per shard.
    with Progress(
        to_embed,
        f"embedding into {request.table}",
        tokens_total=None if request.config.chunking is not None else tokens,
        enabled=request.options.progress and to_embed > 0,
    ) as bar:
        for i, shard in enumerate(planned.shards, 1):
            logger.info(
                "shard %d/%d (%s): applying (%d row(s) to embed)",
                i,
                total,
                shard.split.label,
                shard.plan.rows_to_embed,
            )
            report = apply_plan(
                shard.unpark(),
                shard.request,
                version_before=version,
                bar=bar,
                # Compaction rewrites files across shards: once, after the last one.
                optimize=i == total,
                committed_before=any(r.committed for r in reports),
            )
            version = report.version_after if report.version_after is not None else version
            reports.append(report)
    merged = merge_reports(reports)
    merged = replace(
        merged,
        partition_keys=planned.scope,
        plan_seconds=round(merged.plan_seconds + planned.split_seconds, 6),
        seconds=round(time.perf_counter() - planned.started, 6),
    )
    logger.info("%s (%d shards)", merged.summary(), total)
    return merged


class PlannedShard:
    """A shard's plan, with its delete keys parked in its spill directory until it is applied.

    A plan holds the keys it deletes in memory; with every shard planned before the first is
    applied, that would be the deletes of the whole table (all of it, for an allowed mass
    delete). Parked, a waiting plan holds only counters.
    """

    def __init__(self, plan: RefreshPlan, split: ShardSplit, request: RefreshRequest) -> None:
        self.plan = plan
        self.split = split
        self.request = request
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


def park(plan: RefreshPlan, split: ShardSplit, request: RefreshRequest) -> PlannedShard:
    """Wrap a shard's plan, its delete keys written to its spill directory (see the class)."""
    shard = PlannedShard(plan, split, request)
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


def plan_totals(plans: list[RefreshPlan], scope: list[str] | None) -> RefreshPlan:
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


def _check_drift_first(request: RefreshRequest) -> None:
    """Check the table's drift canaries with the run's model (the model is loaded here).

    Raises:
        EmbeddingDriftError: They drifted and the drift is not accepted.
    """
    options = request.options
    spec = table_spec_for(request.embedder.spec, request.config)
    canaries = Canaries(connect(request.db_uri, request.storage_options), request.table, spec)
    guard = options.drift_guard(
        request.embedder,
        canaries,
        threshold=options.drift_threshold,
        accept_drift=options.accept_drift,
    )
    if guard is not None:
        guard.check_now()
