"""Downstream consumer assets of an embedding asset: index upkeep and a near-duplicate report.

Both are thin: the logic lives in :mod:`qwen3_pipeline.consumers.vector_search`. Neither requires
the
embedder resource, so neither loads the model (whatever the executor).

Both skip their work when the vector table is at the Lance version they last processed (with
the same settings): each materialisation records the table it processed (``qwen3/table_uri``,
``qwen3/table_name``), the version (``qwen3/lance_version``: for the index asset, the version
*after* its own commit) and its settings (``qwen3/settings``); the next run reads them back from
the instance's latest materialisation of the asset and compares. A skipped run still
materialises, with ``qwen3/skipped: true``, the reason (``qwen3/reason``), the run whose outputs
are kept (``qwen3/computed_run_id``), the previous metadata carried over and the same data
version, so nothing further downstream becomes stale. Launch with run config
``force: true`` (:class:`ConsumerConfig`) to redo the work anyway.

Example:
    >>> index = build_vector_index_asset(embedding_asset=document_vectors)  # doctest: +SKIP
    >>> report = build_near_duplicates_asset(  # doctest: +SKIP
    ...     embedding_asset=document_vectors,
    ...     duckdb_path=lambda: Path("data/warehouse.duckdb"),
    ...     index_asset=index,
    ... )
"""

# No `from __future__ import annotations`: Dagster reads the `config` annotation at runtime.

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from pydantic import Field

from qwen3_pipeline.consumers.near_duplicates import near_duplicate_report
from qwen3_pipeline.consumers.vector_search import (
    IndexPolicy,
    VectorTable,
    maintain_vector_index,
)
from qwen3_pipeline.core.errors import ConfigError, UnsafeNameError
from qwen3_pipeline.dagster.vectors import open_vectors

DEFAULT_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Metadata keys of the skip decision (see the module docstring).
TABLE_URI = "qwen3/table_uri"
TABLE_NAME = "qwen3/table_name"
LANCE_VERSION = "qwen3/lance_version"
SETTINGS = "qwen3/settings"
SKIPPED = "qwen3/skipped"
REASON = "qwen3/reason"
COMPUTED_RUN_ID = "qwen3/computed_run_id"


class ConsumerConfig(dg.Config):
    """Run config of the consumer assets (the UI launchpad shows it).

    Example:
        Launchpad YAML that recomputes the near-duplicate report::

            ops:
              near_duplicate_documents:
                config:
                  force: true
    """

    force: bool = Field(
        default=False,
        description=(
            "Redo the work even when the vector table is at the version (and the settings are "
            "those) the asset last processed."
        ),
    )


# --------------------------------------------------------------------------- skip decision


@dataclass(frozen=True, kw_only=True)
class ProcessedState:
    """What a consumer asset works on: one vector table at one version, with its settings.

    Attributes:
        uri: Database URI of the vector table.
        table: Table name.
        version: Lance version.
        settings: The asset's own settings that shape its output (JSON types only).
    """

    uri: str
    table: str
    version: int
    settings: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """The materialisation metadata that the next run compares against."""
        return {
            TABLE_URI: self.uri,
            TABLE_NAME: self.table,
            LANCE_VERSION: self.version,
            SETTINGS: dg.MetadataValue.json(self.settings),
        }


@dataclass(frozen=True, kw_only=True)
class PreviousMaterialization:
    """The latest materialisation of a consumer asset, as recorded in the instance.

    Attributes:
        run_id: The run that recorded it.
        metadata: Its metadata as recorded (``MetadataValue`` objects), to carry over.
    """

    run_id: str
    metadata: Mapping[str, Any]

    @property
    def values(self) -> dict[str, Any]:
        """The metadata as plain values."""
        return {key: getattr(value, "value", value) for key, value in self.metadata.items()}

    @property
    def computed_run_id(self) -> str:
        """The run whose outputs it reports (an earlier one when it was itself skipped)."""
        recorded = self.values.get(COMPUTED_RUN_ID)
        return recorded if isinstance(recorded, str) and recorded else self.run_id


@dataclass(frozen=True)
class Decision:
    """Whether to skip the work, and why (the reason is recorded either way)."""

    skip: bool
    reason: str


def previous_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey
) -> PreviousMaterialization | None:
    """Return the latest materialisation of ``asset_key`` (None when there is none)."""
    entry = instance.get_latest_materialization_event(asset_key)
    materialization = entry.asset_materialization if entry is not None else None
    if entry is None or materialization is None:
        return None
    return PreviousMaterialization(run_id=entry.run_id, metadata=dict(materialization.metadata))


def json_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``settings`` as JSON types, so they compare equal to what the instance stores."""
    loaded: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    return loaded


def decide(
    previous: PreviousMaterialization | None, current: ProcessedState, *, force: bool
) -> Decision:
    """Decide whether the work on ``current`` was already done by ``previous`` (pure).

    Args:
        previous: The asset's latest materialisation, if any.
        current: The table, version and settings this run would process.
        force: Redo the work regardless.

    Returns:
        ``skip`` when the previous materialisation processed the same table at the same
        version with the same settings, with the reason for the decision.

    Example:
        >>> now = ProcessedState(uri="db", table="docs", version=3, settings={})
        >>> decide(None, now, force=False)
        Decision(skip=False, reason='first materialization')
    """
    if force:
        return Decision(False, "forced by run config (force: true)")
    if previous is None:
        return Decision(False, "first materialization")
    recorded = previous.values
    since = f"run {previous.computed_run_id[:8]}"
    version = recorded.get(LANCE_VERSION)
    # A bool is an int in Python, and an older materialisation may lack the keys: recompute.
    if not isinstance(version, int) or isinstance(version, bool):
        return Decision(False, f"{since} recorded no table version")
    if (recorded.get(TABLE_URI), recorded.get(TABLE_NAME)) != (current.uri, current.table):
        return Decision(
            False,
            f"table changed since {since}: {recorded.get(TABLE_URI)}/"
            f"{recorded.get(TABLE_NAME)} -> {current.uri}/{current.table}",
        )
    if version != current.version:
        return Decision(
            False, f"table {current.table!r} version {version} -> {current.version} since {since}"
        )
    if recorded.get(SETTINGS) != current.settings:
        return Decision(False, f"settings changed since {since}")
    return Decision(
        True, f"table {current.table!r} version {current.version} unchanged since {since}"
    )


def skipped_metadata(
    previous: PreviousMaterialization,
    current: ProcessedState,
    decision: Decision,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the metadata of a skipped run.

    The previous metadata is carried over (row count, schema, top pairs still describe the
    kept outputs, and the UI's plots do not drop to nothing), then ``overrides`` replace what
    describes this run's own actions.
    """
    return {
        **previous.metadata,
        **current.metadata(),
        SKIPPED: True,
        REASON: decision.reason,
        COMPUTED_RUN_ID: previous.computed_run_id,
        **(overrides or {}),
    }


def computed_metadata(context: dg.AssetExecutionContext, decision: Decision) -> dict[str, Any]:
    """Return the skip-decision metadata of a run that did the work."""
    return {SKIPPED: False, REASON: decision.reason, COMPUTED_RUN_ID: context.run.run_id}


def vector_table_name(embedding_asset: dg.AssetsDefinition) -> str:
    """Return the LanceDB table an asset of :func:`.embedding.build_embedding_asset` writes.

    Raises:
        ConfigError: The asset was not built by the factory.
    """
    spec = embedding_asset.specs_by_key[embedding_asset.key]
    value = (spec.metadata or {}).get("qwen3/table_name")
    name = getattr(value, "value", value)
    if not isinstance(name, str):
        raise ConfigError(
            f"asset {embedding_asset.key.to_user_string()} has no qwen3/table_name metadata; "
            "build it with build_embedding_asset()"
        )
    return name


def build_vector_index_asset(
    *,
    embedding_asset: dg.AssetsDefinition,
    key: dg.AssetKey | str | Sequence[str] | None = None,
    lancedb_key: str = "lancedb",
    policy: IndexPolicy | None = None,
    group_name: str | None = None,
    automation_condition: dg.AutomationCondition | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
) -> dg.AssetsDefinition:
    """Build the asset that keeps the vector table's ANN index.

    Below ``policy.min_rows`` rows it leaves the table unindexed (exact search); past it, it
    builds an IVF-HNSW-SQ cosine index once, then folds new rows in with ``optimize()`` after
    each refresh (through :func:`~qwen3_pipeline.store.upkeep.optimize_table`: old versions are
    pruned, tagged ones kept). It commits only when there is something to do.

    It records the table version after its own commit; a run that finds the live table still
    at that version, with the same policy, skips the upkeep (see the module docstring). Its
    data version is ``lance-v<version>``.

    Args:
        embedding_asset: The embedding asset whose table is indexed.
        key: Asset key (default: the embedding asset's key + ``_index``).
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        policy: Row threshold and index settings.
        group_name: Dagster asset group.
        automation_condition: E.g. ``dg.AutomationCondition.eager()``.
        retry_policy: Retries (LanceDB commit conflicts are transient).
    """
    table = vector_table_name(embedding_asset)
    upstream = embedding_asset.key
    asset_key = (
        dg.AssetKey.from_coercible(key)
        if key is not None
        else dg.AssetKey([*upstream.path[:-1], f"{upstream.path[-1]}_index"])
    )
    chosen = policy or IndexPolicy()
    settings = json_settings({"policy": dataclasses.asdict(chosen)})

    @dg.asset(
        key=asset_key,
        deps=[upstream],
        required_resource_keys={lancedb_key},
        group_name=group_name,
        automation_condition=automation_condition,
        retry_policy=retry_policy,
        kinds={"python", "lancedb"},
        description=(
            f"ANN index upkeep of LanceDB table {table!r}: exact search below "
            f"{chosen.min_rows} rows, then an IVF-HNSW-SQ cosine index kept current with "
            "optimize(). Skipped while the table version is the one it last left."
        ),
    )
    def _vector_index(
        context: dg.AssetExecutionContext, config: ConsumerConfig
    ) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        live = lancedb.open_table(table)
        current = ProcessedState(
            uri=lancedb.resolved_uri(), table=table, version=int(live.version), settings=settings
        )
        previous = previous_materialization(context.instance, context.asset_key)
        decision = decide(previous, current, force=config.force)
        if decision.skip and previous is not None:
            context.log.info(f"index upkeep of {table} skipped: {decision.reason}")
            return dg.MaterializeResult(
                metadata=skipped_metadata(
                    previous,
                    current,
                    decision,
                    # Row count, index name and unindexed rows still hold at this version;
                    # the action and the pruning were the previous run's.
                    overrides={
                        "qwen3/index_action": "skipped",
                        "qwen3/versions_pruned": 0,
                        "qwen3/upstream_lance_version": current.version,
                    },
                ),
                data_version=dg.DataVersion(f"lance-v{current.version}"),
            )
        upkeep = maintain_vector_index(live, chosen)
        context.log.info(f"index upkeep of {table} ({decision.reason}): {upkeep.as_dict()}")
        # The version after this asset's own commit is what the next run compares against.
        after = dataclasses.replace(current, version=upkeep.version_after)
        return dg.MaterializeResult(
            metadata={
                "qwen3/index_action": upkeep.action,
                "qwen3/search_mode": "ann" if upkeep.index_name else "exact",
                "qwen3/index_name": upkeep.index_name,
                "qwen3/unindexed_rows": upkeep.unindexed_rows,
                "qwen3/fragments": upkeep.fragments,
                "qwen3/versions_pruned": upkeep.versions_pruned,
                "qwen3/upstream_lance_version": upkeep.version_before,
                "dagster/row_count": upkeep.row_count,
                **after.metadata(),
                **computed_metadata(context, decision),
            },
            data_version=dg.DataVersion(f"lance-v{upkeep.version_after}"),
        )

    return _vector_index


def replace_duckdb_table(path: Path, table: str, rows: pa.Table) -> int:
    """Create or replace ``main.<table>`` in the DuckDB file ``path`` with ``rows``, atomically.

    Raises:
        UnsafeNameError: ``table`` is not a plain identifier.
    """
    import duckdb

    if not _IDENTIFIER.match(table):
        raise UnsafeNameError(f"DuckDB table name {table!r} is not a plain SQL identifier")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    try:
        con.register("incoming_rows", rows)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f'CREATE OR REPLACE TABLE main."{table}" AS SELECT * FROM incoming_rows')
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return rows.num_rows


def duckdb_table_exists(path: Path, table: str) -> bool:
    """Whether the DuckDB file ``path`` exists and holds ``main.<table>`` (opened read-only)."""
    import duckdb

    if not path.is_file():
        return False
    con = duckdb.connect(str(path), read_only=True)
    try:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_name = ?",
            [table],
        ).fetchone()
    finally:
        con.close()
    return bool(found and found[0])


def _markdown_pairs(pairs: pa.Table, limit: int = 10) -> str:
    columns = pairs.column_names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in pairs.slice(0, limit).to_pylist():
        cells = [str(row[c]).replace("|", "\\|").replace("\n", " ")[:80] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_data_version(state: ProcessedState) -> dg.DataVersion:
    # The report is a function of the table version and the settings (output location
    # included): equal inputs give an equal data version, so a skip marks nothing stale.
    identity = json.dumps([state.uri, state.table, state.settings], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return dg.DataVersion(f"lance-v{state.version}-{digest}")


def build_near_duplicates_asset(
    *,
    embedding_asset: dg.AssetsDefinition,
    duckdb_path: Callable[[], Path],
    key: dg.AssetKey | str | Sequence[str] = "near_duplicate_documents",
    duckdb_table: str = "near_duplicates",
    label_columns: Sequence[str] = ("title",),
    threshold: float = 0.95,
    neighbors: int = 5,
    max_rows: int = 200_000,
    index_asset: dg.AssetsDefinition | None = None,
    lancedb_key: str = "lancedb",
    group_name: str | None = None,
    automation_condition: dg.AutomationCondition | None = None,
) -> dg.AssetsDefinition:
    """Build the asset that writes near-duplicate row pairs to a DuckDB table.

    It reads the vectors at the Lance version the embedding asset (or ``index_asset``) last
    recorded, keeps for each row its ``neighbors`` most similar rows with cosine similarity
    at least ``threshold``, and replaces ``main.<duckdb_table>`` with the pairs (plus the
    ``label_columns`` of both rows and the Lance version read).

    The report is ``O(n^2)``, so a run that would read the version the previous one read,
    with the same settings and output location, skips it and leaves the DuckDB table as it
    is, unless that table is gone (see the module docstring). Its data version is
    ``lance-v<version>-<settings digest>``.

    Args:
        embedding_asset: The embedding asset to read.
        duckdb_path: Returns the DuckDB file at run time.
        key: Asset key.
        duckdb_table: Output table name.
        label_columns: Carry-along columns copied beside each key (if the table has them).
        threshold: Smallest cosine similarity reported.
        neighbors: Neighbours considered per row.
        max_rows: The exact comparison is ``O(n^2)``; larger tables fail with a clear message.
        index_asset: The index-upkeep asset of the same table (read its version, run after it).
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        group_name: Dagster asset group.
        automation_condition: E.g. ``dg.AutomationCondition.eager()``.
    """
    upstream = embedding_asset.key
    deps = [upstream] + ([index_asset.key] if index_asset is not None else [])

    def compute(
        context: dg.AssetExecutionContext, vectors: VectorTable, path: Path
    ) -> dict[str, Any]:
        rows = vectors.count_rows()
        try:
            report = near_duplicate_report(
                vectors,
                label_columns=label_columns,
                threshold=threshold,
                neighbors=neighbors,
                max_rows=max_rows,
            )
        except ConfigError as e:  # too many rows: the same settings fail the same way
            raise dg.Failure(description=str(e), allow_retries=False) from e
        written = replace_duckdb_table(path, duckdb_table, report)
        context.log.info(f"{written} near-duplicate pairs among {rows} rows -> {path}")
        return {
            "dagster/row_count": written,
            "dagster/table_name": f"{path.stem}.main.{duckdb_table}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, str(f.type)) for f in report.schema]
            ),
            "qwen3/rows_compared": rows,
            "qwen3/threshold": threshold,
            "duckdb_path": dg.MetadataValue.path(str(path)),
            "qwen3/top_pairs": dg.MetadataValue.md(
                _markdown_pairs(report.drop_columns(["lance_version", "computed_at"]))
            ),
        }

    @dg.asset(
        key=dg.AssetKey.from_coercible(key),
        deps=deps,
        required_resource_keys={lancedb_key},
        group_name=group_name,
        automation_condition=automation_condition,
        kinds={"python", "duckdb"},
        description=(
            f"Pairs of rows of {upstream.to_user_string()} whose vectors have cosine "
            f"similarity >= {threshold} (up to {neighbors} per row), in DuckDB table "
            f"main.{duckdb_table}. Skipped while the vector version read is unchanged."
        ),
    )
    def _near_duplicates(
        context: dg.AssetExecutionContext, config: ConsumerConfig
    ) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        vectors = open_vectors(
            upstream,
            instance=context.instance,
            index_asset_key=index_asset.key if index_asset is not None else None,
            storage_options=lancedb.options(),
        )
        path = duckdb_path()
        current = ProcessedState(
            uri=vectors.uri,
            table=vectors.name,
            version=vectors.version,
            settings=json_settings(
                {
                    "threshold": threshold,
                    "neighbors": neighbors,
                    "label_columns": list(label_columns),
                    "duckdb_path": str(path),
                    "duckdb_table": duckdb_table,
                }
            ),
        )
        previous = previous_materialization(context.instance, context.asset_key)
        decision = decide(previous, current, force=config.force)
        # The kept output is the point of skipping: if someone dropped it, rebuild it.
        if decision.skip and not duckdb_table_exists(path, duckdb_table):
            decision = Decision(False, f"output table main.{duckdb_table} missing from {path}")
        if decision.skip and previous is not None:
            context.log.info(f"near-duplicate report skipped: {decision.reason}")
            return dg.MaterializeResult(
                metadata=skipped_metadata(previous, current, decision),
                data_version=_report_data_version(current),
            )
        context.log.info(f"near-duplicate report computed: {decision.reason}")
        return dg.MaterializeResult(
            metadata={
                **compute(context, vectors, path),
                **current.metadata(),
                **computed_metadata(context, decision),
            },
            data_version=_report_data_version(current),
        )

    return _near_duplicates
