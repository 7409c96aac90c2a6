"""Open the vectors of an embedding asset: the helper for downstream users.

Every materialisation of an embedding asset records where its table is (``qwen3/table/uri``,
``qwen3/table/name``) and the Lance version it left (``qwen3/table/lance_version``); when every
check passed on that version, the asset also tags it ``checked-v{N}``
(:mod:`qwen3_pipeline.store.versions`). :func:`open_vectors` opens the table at its newest
checked version, so a downstream asset, notebook or service reads what the pipeline last
produced *and checked* (never a version whose checks failed), even while the next refresh
writes. With the index-upkeep asset, the version it left after indexing exactly that checked
version is read instead (same rows, plus the index). An explicit ``version=`` pins any version.

Example:
    >>> import dagster as dg
    >>> from qwen3_pipeline.consumers.vector_search import search
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

from qwen3_pipeline.consumers.vector_search import VectorTable, open_vector_table
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.metadata import TABLE_NAME, TABLE_URI, TABLE_VERSION
from qwen3_pipeline.store import open_lance_table, resolve_read_version

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
    version: int | None = None,
) -> VectorTable:
    """Open an embedding asset's table at its newest checked version (or at ``version``).

    The table's location comes from the asset's latest materialisation. The version read is
    the newest one tagged checked (:func:`~qwen3_pipeline.store.resolve_read_version`), so a
    materialisation whose checks failed is never served while an older checked version
    exists; a table without any checked version is read at its latest version, with a warning.
    With ``index_asset_key``, when the index-upkeep asset last started from exactly that
    version, the version it left (the same rows, plus the index) is read instead.

    Args:
        asset_key: The embedding asset (e.g. ``"document_vectors"``).
        instance: The Dagster instance (default: ``DagsterInstance.get()``, from
            ``DAGSTER_HOME``).
        index_asset_key: The index-upkeep asset of the same table, to read the indexed version.
        storage_options: Object-store options (credentials) for LanceDB.
        version: A Lance version to read whatever its checks (e.g. the
            ``qwen3/table/lance_version`` of a given materialisation); None reads the newest
            checked version.

    Returns:
        The pinned :class:`~qwen3_pipeline.consumers.vector_search.VectorTable`; search it with
        :func:`qwen3_pipeline.consumers.vector_search.search`, which uses the matching query
        encoder.

    Raises:
        ConfigError: Never materialised, or the recorded table/version is gone.
    """
    instance = instance or dg.DagsterInstance.get()
    found = latest_materialized_vectors(instance, asset_key)
    if version is None:
        live = open_lance_table(found.uri, found.table, storage_options=storage_options)
        version = resolve_read_version(live, None)
        if index_asset_key is not None:
            version = _indexed_version(instance, index_asset_key, found.table, version)
    return open_vector_table(
        found.uri, found.table, version=version, storage_options=storage_options
    )


def _indexed_version(
    instance: dg.DagsterInstance, index_asset_key: CoercibleToAssetKey, table: str, version: int
) -> int:
    # The index upkeep only compacts and indexes: the version it left holds the rows of the
    # version it started from, so it may stand for that (checked) version, never for another.
    entry = instance.get_latest_materialization_event(dg.AssetKey.from_coercible(index_asset_key))
    if entry is None:
        return version
    metadata = _metadata_values(entry)
    started_from = metadata.get("qwen3/upstream_lance_version")
    left = metadata.get("qwen3/lance_version")
    if metadata.get("qwen3/table_name") != table or started_from != version:
        return version
    return left if isinstance(left, int) and left >= version else version
