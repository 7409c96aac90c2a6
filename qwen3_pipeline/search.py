"""Read side: open a vector table at a pinned version and search it with the matching queries.

Search needs query vectors from the *same* document-side spec as the table (model, revision,
dim...); :func:`read_table_spec` returns the spec recorded in the table's metadata, and
:func:`check_query_spec` refuses an encoder whose spec differs, so vectors of different models
or dimensions are never compared. The query instruction (``query_task``) may differ freely.
"""

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from qwen3_pipeline.embedder import Embedder
from qwen3_pipeline.errors import ConfigError, SpecMismatchError, StoreError
from qwen3_pipeline.spec import EmbeddingSpec
from qwen3_pipeline.store import META_SPEC, validate_table_name, validate_uri

# Lineage columns left out of search results unless asked for.
_RESULT_HIDDEN = frozenset({"vector", "spec_fingerprint", "model_id", "model_revision", "dim"})


def open_table(
    db_uri: str,
    table: str,
    *,
    version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> Any:
    """Open a LanceDB table read-only-style, optionally checked out at ``version``.

    Args:
        db_uri: LanceDB directory or object-store URI.
        table: Table name.
        version: Lance version to pin (e.g. the one recorded in a Dagster materialization);
            ``None`` reads the latest.
        storage_options: Object-store options.

    Raises:
        StoreError: The table or version does not exist.
    """
    import lancedb

    validate_uri(db_uri)
    validate_table_name(table)
    try:
        handle = lancedb.connect(db_uri, storage_options=storage_options).open_table(table)
        if version is not None:
            handle.checkout(version)
    except (ValueError, OSError, RuntimeError) as e:
        raise StoreError(
            f"cannot open table {table!r} at {db_uri!r}"
            f"{'' if version is None else f' version {version}'}: {e}"
        ) from e
    return handle


def read_table_spec(handle: Any) -> EmbeddingSpec:
    """Return the :class:`EmbeddingSpec` recorded in a vector table's metadata.

    Raises:
        SpecMismatchError: The table has no recorded spec (not written by qwen3_pipeline).
    """
    raw = (handle.schema.metadata or {}).get(META_SPEC.encode())
    if raw is None:
        raise SpecMismatchError(
            f"table {handle.name!r} has no recorded embedding spec; it was not written by "
            "qwen3_pipeline"
        )
    return EmbeddingSpec(**json.loads(raw.decode()))


def check_query_spec(table_spec: EmbeddingSpec, query_spec: EmbeddingSpec) -> None:
    """Refuse query vectors whose document-side spec differs from the table's.

    Raises:
        SpecMismatchError: Model, revision, dim, max_length, prompt or normalisation differ;
            the message says what the table holds.
    """
    if table_spec.fingerprint != query_spec.fingerprint:
        raise SpecMismatchError(
            f"the table was embedded with model={table_spec.model} "
            f"revision={table_spec.revision} dim={table_spec.dim} "
            f"max_length={table_spec.max_length}, but the query encoder uses "
            f"model={query_spec.model} revision={query_spec.revision} dim={query_spec.dim} "
            f"max_length={query_spec.max_length}; search with the table's model and dim"
        )


def query_spec_for(table_spec: EmbeddingSpec, query_task: str | None = None) -> EmbeddingSpec:
    """Return the table's spec with an optional different query instruction."""
    return table_spec if query_task is None else replace(table_spec, query_task=query_task)


def search_vectors(
    handle: Any,
    query_vectors: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    columns: Sequence[str] | None = None,
) -> list[list[dict[str, Any]]]:
    """Return the ``k`` nearest rows of each query vector (cosine), best first.

    Vectors are unit-norm, so the score is ``1 - cosine distance`` (the cosine similarity).

    Args:
        handle: An open table (:func:`open_table`).
        query_vectors: ``[q, dim]`` float32 query vectors.
        k: Results per query.
        where: Optional SQL filter (build it with ``lancedb.expr`` for user values).
        columns: Columns to return (default: key, score and carry-along/lineage columns).

    Raises:
        ConfigError: ``k`` below 1 or vectors of the wrong dimension.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    dim = handle.schema.field("vector").type.list_size
    if query_vectors.ndim != 2 or query_vectors.shape[1] != dim:
        raise ConfigError(
            f"query vectors have shape {query_vectors.shape}; the table has dim {dim}"
        )
    shown = list(columns or [n for n in handle.schema.names if n not in _RESULT_HIDDEN])
    results = []
    for vector in query_vectors:
        query = handle.search(vector.tolist()).distance_type("cosine").limit(k)
        query = query.select([*shown, "_distance"])
        if where:
            query = query.where(where, prefilter=True)
        rows = query.to_list()
        results.append(
            [
                {**{c: row[c] for c in shown}, "score": round(1.0 - float(row["_distance"]), 6)}
                for row in rows
            ]
        )
    return results


def search(
    handle: Any, embedder: Embedder, queries: Sequence[str], *, k: int = 10
) -> list[list[dict[str, Any]]]:
    """Embed ``queries`` with ``embedder`` and search the table with them.

    Example:
        >>> handle = open_table("data/lancedb", "documents")  # doctest: +SKIP
        >>> spec = query_spec_for(read_table_spec(handle))  # doctest: +SKIP
        >>> search(handle, Qwen3Encoder(spec), ["how do I parse JSON?"], k=5)  # doctest: +SKIP

    Raises:
        SpecMismatchError: The embedder's spec differs from the table's.
    """
    check_query_spec(read_table_spec(handle), embedder.spec)
    vectors = embedder.embed_queries(list(queries)).raise_on_failure()
    return search_vectors(handle, vectors, k=k)
