"""Jobs launched from the Dagster UI to replace or restore a vector table: rebuild and rollback.

- :func:`build_rebuild_job`: one run of the embedding asset over every partition, tagged to
  rebuild (and, given a golden set, with the gate's settings as tags that the launchpad's run
  config overrides for one run). The engine embeds the whole source into a staging table,
  scores live and staging on the golden set, and swaps staging in only if it is at least as
  good; the scores are the result of the asset's ``rebuild_gate`` check, and a refused swap
  fails the run naming the ``gate_tolerance`` that would pass
  (:mod:`qwen3_pipeline.dagster.rebuild_gate`).
- :func:`build_rollback_job`: restores an earlier version of the table (a tag or a version
  number, :class:`RollbackConfig`; by default the version before the last rebuild's swap) in
  one commit with :func:`qwen3_pipeline.store.rollback`, and records the asset's new state as
  a materialization (versions before and after, the target) of every partition.

Example:
    >>> jobs = [  # doctest: +SKIP
    ...     build_rebuild_job(document_vectors, golden_set="data/golden.jsonl"),
    ...     build_rollback_job(document_vectors),
    ... ]
    >>> defs = dg.Definitions(assets=[document_vectors], jobs=jobs, ...)  # doctest: +SKIP
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from qwen3_pipeline.core.errors import ConfigError, is_transient
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.embedding_asset import DEFAULT_POOL, BadInputFailure
from qwen3_pipeline.dagster.metadata import (
    TABLE_CHECKED_VERSION,
    TABLE_DIM,
    TABLE_FINGERPRINT,
    TABLE_MODEL,
    TABLE_NAME,
    TABLE_ROWS,
    TABLE_URI,
    TABLE_VERSION,
)
from qwen3_pipeline.dagster.rebuild_gate import REBUILD_TAG, GateSettings
from qwen3_pipeline.dagster.resources import LanceDBResource
from qwen3_pipeline.lifecycle.metrics import DEFAULT_K

if TYPE_CHECKING:  # what dg.define_asset_job returns; dagster does not export the name
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

ROLLBACK_PREFIX = "qwen3/rollback/"
# The definition metadata in which build_embedding_asset records its table's name.
ASSET_TABLE_NAME = "qwen3/table_name"


def build_rebuild_job(
    embedding_asset: dg.AssetsDefinition,
    *,
    name: str | None = None,
    golden_set: str | None = None,
    tolerance: float = 0.0,
    k: int = DEFAULT_K,
    description: str | None = None,
) -> "UnresolvedAssetJobDefinition":
    """Build the job that rebuilds ``embedding_asset``'s table, gated when given a golden set.

    Each run covers every partition (the job's tags make it a partition-range run: one model
    load) and rebuilds: the job's tags are ``qwen3/rebuild: true`` and, with a golden set,
    ``qwen3/gate_golden_set``, ``qwen3/gate_tolerance`` and ``qwen3/gate_k``. The asset's run
    config overrides each of them for one run (launchpad, empty config: the job's settings)::

        ops:
          <asset op>:
            config:
              gate_golden_set: <another golden set>
              gate_tolerance: 0.05
              gate_k: 10

    (Tags rather than a default run config: the default run config of a partitioned job is
    given per partition, and a run over a range of partitions never receives it.)

    Args:
        embedding_asset: From :func:`~.embedding_asset.build_embedding_asset` (hash-sharded or
            unpartitioned: a rebuild reads the whole source).
        name: Job name (default ``<asset>_rebuild``, ``<asset>_gated_rebuild`` with a gate).
        golden_set: Path of the golden set the gate scores both tables on (JSONL, see
            :mod:`qwen3_pipeline.lifecycle.golden`); None: an ungated rebuild.
        tolerance: How much lower than live's staging's mean recall@k and nDCG@k may be.
        k: Documents ranked and scored per golden query.
        description: Job description (a default says what a run does).

    Raises:
        ConfigError: A time-partitioned asset (its runs read time windows, a rebuild reads
            the whole source; rebuild it with the CLI's ``refresh --rebuild``).
    """
    partitions_def = embedding_asset.partitions_def
    if isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        raise ConfigError(
            f"asset {embedding_asset.key.to_user_string()} is time-partitioned: its runs read "
            "time windows, and a rebuild reads the whole source; rebuild its table with "
            "`qwen3-pipeline refresh --rebuild` instead"
        )
    asset = embedding_asset.key.to_user_string()
    gated = golden_set is not None
    # Tags, not a default run config: a partitioned job's run config is per partition and
    # never reaches a run over a partition range, while the job's tags reach each of its runs.
    tags = (
        GateSettings(golden_set=golden_set, tolerance=tolerance, k=k).tags()
        if golden_set is not None
        else {REBUILD_TAG: "true"}
    )
    if partitions_def is not None:
        tags |= all_partitions_tags(partitions_def)
    return dg.define_asset_job(
        name or f"{embedding_asset.key.to_python_identifier()}_{'gated_' if gated else ''}rebuild",
        selection=dg.AssetSelection.assets(embedding_asset),
        tags=tags,
        description=description
        or (
            f"Rebuild {asset}'s table into a staging table from the whole source, "
            + (
                "score live and staging on the golden set (the rebuild_gate check) and swap "
                "staging in only if it scores as well; a refused swap fails, live untouched."
                if gated
                else "then swap it in."
            )
        ),
    )


class RollbackConfig(dg.Config):
    """Which version a rollback restores: a tag, a version number, or neither.

    Neither restores the version tagged before the last rebuild's swap (undo the last rebuild).

    Example:
        Launchpad YAML that restores version 12::

            ops:
              rollback_document_vectors:
                config:
                  version: 12
    """

    tag: str | None = Field(
        default=None,
        description=(
            "A tag of the table: before-swap-v12-20250101T120000Z (the version before a "
            "rebuild's swap) or checked-v9 (a version every check passed on)."
        ),
    )
    version: int | None = Field(
        default=None, ge=1, description="A version number of the table (its Lance version)."
    )

    def target(self) -> str | int | None:
        """The tag or version to restore (None: the newest before-swap tag).

        Raises:
            ConfigError: Both a tag and a version.
        """
        if self.tag is not None and self.version is not None:
            raise ConfigError(
                f"give a tag or a version to roll back to, not both (tag {self.tag!r}, "
                f"version {self.version})"
            )
        return self.version if self.version is not None else self.tag


def build_rollback_job(
    embedding_asset: dg.AssetsDefinition,
    *,
    table: str | None = None,
    name: str | None = None,
    lancedb_key: str = "lancedb",
    pool: str | None = DEFAULT_POOL,
) -> dg.JobDefinition:
    """Build the job that rolls ``embedding_asset``'s table back to an earlier version.

    The run restores the version in one commit (nothing is copied;
    :func:`qwen3_pipeline.store.rollback`: the new version counts as checked only if the
    restored one was, and checked tags of the rolled-back versions are retired, so readers
    follow), then records a materialization of the asset, one per partition, with the
    versions before and after, the target and the table's state. Rolling back to the latest
    version commits and records nothing.

    Args:
        embedding_asset: The asset whose table is rolled back.
        table: Its LanceDB table name (default: the one the asset's definition records).
        name: Job name (default ``<asset>_rollback``).
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        pool: Concurrency pool of the step: the embedding asset's (``gpu``), so that a
            rollback never interleaves with a refresh of the table.

    Raises:
        ConfigError: No ``table`` given and none recorded by the asset's definition.
    """
    asset_key = embedding_asset.key
    partitions_def = embedding_asset.partitions_def
    asset = asset_key.to_user_string()
    table = table or embedding_asset.metadata_by_key[asset_key].get(ASSET_TABLE_NAME)
    if not table:
        raise ConfigError(
            f"asset {asset} records no {ASSET_TABLE_NAME!r}: pass table= (its LanceDB table)"
        )

    @dg.op(
        name=f"rollback_{asset_key.to_python_identifier()}",
        out={},
        required_resource_keys={lancedb_key},
        pool=pool,
        description=f"Restore an earlier version of {asset}'s table {table!r} in one commit.",
    )
    def _rollback(
        context: dg.OpExecutionContext, config: RollbackConfig
    ) -> Iterator[dg.AssetMaterialization]:
        lancedb: LanceDBResource = getattr(context.resources, lancedb_key)
        metadata = _roll_back(lancedb, table, config, context.op_execution_context.op.name)
        if not metadata[f"{ROLLBACK_PREFIX}committed"]:
            context.log.info(
                f"table {table!r} is already at version {metadata[TABLE_VERSION]}: nothing "
                "rolled back, nothing recorded"
            )
            return
        context.log.info(
            f"rolled table {table!r} back to version {metadata[f'{ROLLBACK_PREFIX}to_version']} "
            f"as version {metadata[TABLE_VERSION]}"
        )
        # Every partition's rows changed, so every partition records the new state.
        partitions: list[str | None] = (
            list(partitions_def.get_partition_keys()) if partitions_def is not None else [None]
        )
        for partition in partitions:
            yield dg.AssetMaterialization(
                asset_key=asset_key, partition=partition, metadata=metadata
            )

    @dg.job(
        name=name or f"{asset_key.to_python_identifier()}_rollback",
        description=(
            f"Roll {asset}'s table back to an earlier version (a tag or a version number; "
            "default: the version before the last rebuild's swap) and record its new state."
        ),
    )
    def _rollback_job() -> None:
        _rollback()

    return _rollback_job


def _roll_back(
    lancedb: LanceDBResource, table: str, config: RollbackConfig, op_name: str
) -> dict[str, Any]:
    """Roll ``table`` back; the materialization's metadata (failures typed for retries)."""
    from qwen3_pipeline.consumers.vector_search import recorded_spec
    from qwen3_pipeline.store import latest_checked_version, open_lance_table, rollback
    from qwen3_pipeline.store.watermark_log import forget_watermarks

    try:
        lance = open_lance_table(lancedb.resolved_uri(), table, storage_options=lancedb.options())
        result = rollback(lance, config.target())
        # The restored rows are older than the marks: the next watermark refresh reads all.
        forget_watermarks(lancedb.resolved_uri(), table, storage_options=lancedb.options())
        spec = recorded_spec(lance)
        rows = int(lance.count_rows())
        checked_version = latest_checked_version(lance)
    except Exception as e:  # typed errors decide retries; bugs and bad targets are not retried
        if is_transient(e):
            raise
        # The store's message speaks of the CLI's --to; say it in launchpad terms too.
        hint = (
            "In the launchpad, name the version with run config ops: {"
            f"{op_name}: {{config: {{tag: <a tag above>}}}}}} or {{version: <number>}}"
            if isinstance(e, ConfigError)
            else ""
        )
        raise BadInputFailure(e, hint) from e
    return {
        f"{ROLLBACK_PREFIX}target": str(config.target() or "the newest before-swap tag"),
        f"{ROLLBACK_PREFIX}tag": result.tag,
        f"{ROLLBACK_PREFIX}from_version": result.from_version,
        f"{ROLLBACK_PREFIX}to_version": result.to_version,
        f"{ROLLBACK_PREFIX}committed": result.committed,
        f"{ROLLBACK_PREFIX}retired_tags": ", ".join(result.retired_tags) or None,
        TABLE_NAME: table,
        TABLE_URI: lancedb.resolved_uri(),
        TABLE_VERSION: result.version,
        TABLE_ROWS: rows,
        TABLE_CHECKED_VERSION: checked_version,
        TABLE_FINGERPRINT: spec.fingerprint,
        TABLE_MODEL: spec.model,
        TABLE_DIM: spec.output_dim,
        "dagster/row_count": rows,
    }
