"""Schedules and automation for an embedding asset.

A periodic refresh of all partitions in one run, and declarative automation when the
upstream model updates:

- :func:`build_refresh_schedule`: every tick (hourly by default) launches *one* run covering
  every hash shard (a partition-range run, so the model is loaded once) or, for time
  partitions, the latest window.
- :func:`build_automation_sensor`: evaluates the assets' ``AutomationCondition`` (the demo uses
  ``eager()``: refresh when the dbt model updates). It emits backfills, so a request for many
  partitions honours the asset's ``BackfillPolicy.single_run()`` and becomes one run.

Example:
    >>> schedule = build_refresh_schedule(  # doctest: +SKIP
    ...     name="document_vectors_hourly", embedding_asset=document_vectors
    ... )
"""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

# Dagster's run tags for a partition-range run (what a single-run backfill sets).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
HOURLY = "0 * * * *"


def all_partitions_tags(partitions_def: dg.PartitionsDefinition) -> dict[str, str]:
    """Run tags that make one run materialise every partition of ``partitions_def``.

    Example:
        >>> all_partitions_tags(dg.StaticPartitionsDefinition(["a", "b", "c"]))
        {'dagster/asset_partition_range_start': 'a', 'dagster/asset_partition_range_end': 'c'}
    """
    keys = partitions_def.get_partition_keys()
    return {PARTITION_RANGE_START_TAG: keys[0], PARTITION_RANGE_END_TAG: keys[-1]}


def build_refresh_schedule(
    *,
    name: str,
    embedding_asset: dg.AssetsDefinition,
    downstream: Sequence[dg.AssetsDefinition] = (),
    cron_schedule: str = HOURLY,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    execution_timezone: str = "UTC",
    run_config: Mapping[str, Any] | None = None,
    job_name: str | None = None,
) -> dg.ScheduleDefinition:
    """Build a schedule that refreshes ``embedding_asset`` (and ``downstream``) on a cron.

    Hash-sharded assets get one run over all shards (partition range); time-partitioned
    assets get the latest complete window; unpartitioned ones a plain run.

    Args:
        name: Schedule name; its job is ``<name>_job``.
        embedding_asset: The embedding asset.
        downstream: Unpartitioned consumer assets to run after it in the same run.
        cron_schedule: When (default hourly, on the hour).
        default_status: Whether it starts running when the code location loads.
        execution_timezone: Timezone of the cron.
        run_config: Run config of each run (e.g. ``full_reconcile: true`` for the embedding
            asset's op, for a nightly reconcile beside an hourly watermark refresh).
        job_name: The job's name (default ``<name>_job``).
    """
    job = dg.define_asset_job(
        job_name or f"{name}_job",
        selection=dg.AssetSelection.assets(embedding_asset, *downstream),
        description=f"Refresh {embedding_asset.key.to_user_string()} and its consumers.",
    )
    partitions_def = embedding_asset.partitions_def

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron_schedule,
        default_status=default_status,
        execution_timezone=execution_timezone,
        description=(
            f"Refresh {embedding_asset.key.to_user_string()} on {cron_schedule!r}: "
            "every partition in one run (one model load)."
        ),
    )
    def _refresh_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tick = (
            context.scheduled_execution_time.isoformat()
            if context.scheduled_execution_time
            else None
        )
        config = dict(run_config or {})
        if partitions_def is None:
            return dg.RunRequest(run_key=tick, run_config=config)
        if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
            latest = partitions_def.get_last_partition_key()
            if latest is None:
                return dg.RunRequest(run_key=tick, run_config=config)
            return dg.RunRequest(run_key=tick, partition_key=latest, run_config=config)
        return dg.RunRequest(
            run_key=tick, tags=all_partitions_tags(partitions_def), run_config=config
        )

    return _refresh_schedule


def build_automation_sensor(
    *,
    name: str,
    assets: Sequence[dg.AssetsDefinition],
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds: int = 30,
) -> dg.AutomationConditionSensorDefinition:
    """Build the sensor that evaluates the automation conditions of ``assets``.

    Backfills are emitted (a multi-partition request becomes one single-run backfill).
    """
    return dg.AutomationConditionSensorDefinition(
        name,
        target=dg.AssetSelection.assets(*assets),
        default_status=default_status,
        minimum_interval_seconds=minimum_interval_seconds,
        emit_backfills=True,
        description="Refresh the vectors when their upstream dbt model updates.",
    )
