"""Downstream consumer assets of an embedding asset: index upkeep and a near-duplicate report.

Both are thin: the logic lives in :mod:`qwen3_pipeline.consumers`. Neither requires the
embedder resource, so neither loads the model (whatever the executor).

Example:
    >>> index = build_vector_index_asset(embedding_asset=document_vectors)  # doctest: +SKIP
    >>> report = build_near_duplicates_asset(  # doctest: +SKIP
    ...     embedding_asset=document_vectors,
    ...     duckdb_path=lambda: Path("data/warehouse.duckdb"),
    ...     index_asset=index,
    ... )
"""

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa

from qwen3_pipeline.consumers import (
    IndexPolicy,
    maintain_vector_index,
    near_duplicate_pairs,
    read_vectors,
    vector_matrix,
    with_labels,
)
from qwen3_pipeline.dagster_defs.vectors import open_vectors
from qwen3_pipeline.errors import ConfigError, UnsafeNameError

DEFAULT_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
    each refresh (through :func:`~qwen3_pipeline.upkeep.optimize_table`: old versions are
    pruned, tagged ones kept). It commits only when there is something to do.

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
            "optimize()."
        ),
    )
    def _vector_index(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        upkeep = maintain_vector_index(lancedb.open_table(table), chosen)
        context.log.info(f"index upkeep of {table}: {upkeep.as_dict()}")
        return dg.MaterializeResult(
            metadata={
                "qwen3/index_action": upkeep.action,
                "qwen3/search_mode": "ann" if upkeep.index_name else "exact",
                "qwen3/index_name": upkeep.index_name,
                "qwen3/unindexed_rows": upkeep.unindexed_rows,
                "qwen3/fragments": upkeep.fragments,
                "qwen3/versions_pruned": upkeep.versions_pruned,
                "qwen3/table_name": table,
                "qwen3/upstream_lance_version": upkeep.version_before,
                "qwen3/lance_version": upkeep.version_after,
                "dagster/row_count": upkeep.row_count,
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


def _markdown_pairs(pairs: pa.Table, limit: int = 10) -> str:
    columns = pairs.column_names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in pairs.slice(0, limit).to_pylist():
        cells = [str(row[c]).replace("|", "\\|").replace("\n", " ")[:80] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
            f"main.{duckdb_table}."
        ),
    )
    def _near_duplicates(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        vectors = open_vectors(
            upstream,
            instance=context.instance,
            index_asset_key=index_asset.key if index_asset is not None else None,
            storage_options=lancedb.options(),
        )
        rows = vectors.count_rows()
        if rows > max_rows:
            raise dg.Failure(
                description=(
                    f"{rows} rows exceed max_rows={max_rows} of the exact near-duplicate "
                    "report (O(n^2)); raise max_rows if the time is acceptable"
                ),
                allow_retries=False,
            )
        labels = [c for c in label_columns if c in vectors.carry_columns]
        data = read_vectors(vectors, labels)
        pairs = near_duplicate_pairs(
            data.column("key"),
            vector_matrix(data.column("vector")),
            threshold=threshold,
            neighbors=neighbors,
        )
        report = with_labels(pairs, data.select(["key", *labels])) if labels else pairs
        stamp = datetime.now(UTC)
        report = report.append_column(
            "lance_version", pa.array([vectors.version] * report.num_rows, pa.int64())
        ).append_column(
            "computed_at", pa.array([stamp] * report.num_rows, pa.timestamp("us", tz="UTC"))
        )
        path = duckdb_path()
        written = replace_duckdb_table(path, duckdb_table, report)
        context.log.info(f"{written} near-duplicate pairs among {rows} rows -> {path}")
        metadata: dict[str, Any] = {
            "dagster/row_count": written,
            "dagster/table_name": f"{path.stem}.main.{duckdb_table}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, str(f.type)) for f in report.schema]
            ),
            "qwen3/rows_compared": rows,
            "qwen3/threshold": threshold,
            "qwen3/lance_version": vectors.version,
            "qwen3/table_name": vectors.name,
            "duckdb_path": dg.MetadataValue.path(str(path)),
            "qwen3/top_pairs": dg.MetadataValue.md(
                _markdown_pairs(report.drop_columns(["lance_version", "computed_at"]))
            ),
        }
        return dg.MaterializeResult(metadata=metadata)

    return _near_duplicates
