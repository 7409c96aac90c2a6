"""Open the vectors a Dagster materialisation recorded: the helper for downstream users.

Every materialisation of an embedding asset records where its table is (``qwen3/table/uri``,
``qwen3/table/name``) and the Lance version it left (``qwen3/table/lance_version``); the
index-upkeep asset records the version after folding those rows into the index
(``qwen3/lance_version``). :func:`open_vectors` opens the table at the newest of these that
holds the latest refresh, so a downstream asset, notebook or service reads exactly what the
pipeline last produced and checked, even while the next refresh writes.

Example:
    >>> import dagster as dg

from qwen3_pipeline.dagster_defs.metadata import TABLE_NAME, TABLE_URI, TABLE_VERSION
    >>> from qwen3_pipeline.consumers import search
    >>> instance = dg.DagsterInstance.get()  # doctest: +SKIP
    >>> vectors = open_vectors("document_vectors", instance=instance)  # doctest: +SKIP
    >>> search(vectors, "parse a date string", k=5).to_pylist()  # doctest: +SKIP

    In an asset::

        @dg.asset(deps=["document_vectors"])
        def answers(context: dg.AssetExecutionContext) -> None:
            vectors = open_vectors("document_vectors", instance=context.instance)
            hits = search(vectors, "retry with backoff", k=10)
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from qwen3_pipeline.consumers import VectorTable, open_vector_table
from qwen3_pipeline.dagster_defs.metadata import TABLE_NAME, TABLE_URI, TABLE_VERSION
from qwen3_pipeline.errors import ConfigError

CoercibleToAssetKey = dg.AssetKey | str | Sequence[str]


@dataclass(frozen=True, kw_only=True)
class MaterializedVectors:
    """Where and at which version the latest materialisation left a vector table.

    Attributes:
        uri: Database URI.
        table: Table name.
        version: The Lance version to read.
        run_id: The Dagster run that produced ``version``.
    """

    uri: str
    table: str
    version: int
    run_id: str


def _metadata_values(entry: Any) -> dict[str, Any]:
    materialization = entry.asset_materialization
    if materialization is None:
        return {}
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def latest_materialized_vectors(
    instance: dg.DagsterInstance,
    asset_key: CoercibleToAssetKey,
    *,
    index_asset_key: CoercibleToAssetKey | None = None,
) -> MaterializedVectors:
    """Return the table location and version recorded by the latest materialisation.

    With ``index_asset_key``, the index asset's recorded version is used when it started from
    the embedding asset's latest version or a later one (same rows, plus the index).

    Raises:
        ConfigError: The asset was never materialised, or its metadata lacks the location.
    """
    key = dg.AssetKey.from_coercible(asset_key)
    entry = instance.get_latest_materialization_event(key)
    if entry is None:
        raise ConfigError(
            f"asset {key.to_user_string()} has no materialisation yet; materialise it first "
            "(e.g. launch a backfill of all its partitions from the UI)"
        )
    metadata = _metadata_values(entry)
    try:
        found = MaterializedVectors(
            uri=str(metadata[TABLE_URI]),
            table=str(metadata[TABLE_NAME]),
            version=int(metadata[TABLE_VERSION]),
            run_id=entry.run_id,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"the latest materialisation of {key.to_user_string()} (run {entry.run_id}) does "
            f"not record a vector table ({e}); is it an embedding asset?"
        ) from e
    if index_asset_key is None:
        return found
    index_entry = instance.get_latest_materialization_event(
        dg.AssetKey.from_coercible(index_asset_key)
    )
    if index_entry is None:
        return found
    return _prefer_index_version(found, _metadata_values(index_entry), index_entry.run_id)


def _prefer_index_version(
    found: MaterializedVectors, index_metadata: Mapping[str, Any], run_id: str
) -> MaterializedVectors:
    started_from = index_metadata.get("qwen3/upstream_lance_version")
    version = index_metadata.get("qwen3/lance_version")
    same_table = index_metadata.get("qwen3/table_name") == found.table
    if not (same_table and isinstance(started_from, int) and isinstance(version, int)):
        return found
    if started_from < found.version:
        return found
    return MaterializedVectors(uri=found.uri, table=found.table, version=version, run_id=run_id)


def open_vectors(
    asset_key: CoercibleToAssetKey,
    *,
    instance: dg.DagsterInstance | None = None,
    index_asset_key: CoercibleToAssetKey | None = None,
    storage_options: dict[str, str] | None = None,
) -> VectorTable:
    """Open an embedding asset's table at the Lance version of its latest materialisation.

    Args:
        asset_key: The embedding asset (e.g. ``"document_vectors"``).
        instance: The Dagster instance (default: ``DagsterInstance.get()``, from
            ``DAGSTER_HOME``).
        index_asset_key: The index-upkeep asset of the same table, to read the indexed version.
        storage_options: Object-store options (credentials) for LanceDB.

    Returns:
        The pinned :class:`~qwen3_pipeline.consumers.VectorTable`; search it with
        :func:`qwen3_pipeline.consumers.search`, which uses the matching query encoder.

    Raises:
        ConfigError: Never materialised, or the recorded table/version is gone.
    """
    found = latest_materialized_vectors(
        instance or dg.DagsterInstance.get(), asset_key, index_asset_key=index_asset_key
    )
    return open_vector_table(
        found.uri, found.table, version=found.version, storage_options=storage_options
    )
