"""Rows in a vector table's schema: built from vectors and lineage, checked before a write.

- :func:`build_rows` assembles full rows (vector plus every lineage column of
  :mod:`qwen3_pipeline.core.schema`) from one embedded chunk of source rows or document chunks;
- :func:`conform_rows` checks rows against the table (key present and unique, known columns,
  every lineage column for a full write) and casts them to its types;
- :func:`key_values` turns keys to look up or delete into distinct values of the key type.

Pure Arrow: no LanceDB call. This module changes when the table's row layout does (the columns
themselves are defined in :mod:`qwen3_pipeline.core.schema`).
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import EmbeddingFailedError, InputDataError
from qwen3_pipeline.core.schema import CHUNK_COLUMNS, LINEAGE_COLUMNS, TIMESTAMP_TYPE
from qwen3_pipeline.core.spec import EmbeddingSpec


def build_rows(
    schema: pa.Schema,
    spec: EmbeddingSpec,
    *,
    table_name: str,
    keys: pa.Array | Sequence[Any],
    vectors: np.ndarray,
    content_hashes: pa.Array | Sequence[str],
    n_tokens: np.ndarray | Sequence[int],
    truncated: np.ndarray | Sequence[bool],
    partition_keys: pa.Array | Sequence[str],
    source: str,
    run_id: str,
    source_updated_at: pa.Array | None = None,
    carry: pa.Table | pa.RecordBatch | None = None,
    embedded_at: datetime | pa.Array | None = None,
    chunks: pa.Table | None = None,
) -> pa.Table:
    """Assemble full rows in the table's schema from one embedded chunk.

    Args:
        schema: The table's schema.
        spec: The spec the table holds (a chunk table when ``spec.chunking`` is set).
        table_name: The table, for messages.
        keys: The rows' keys.
        vectors: ``float32 [n, dim]`` finite vectors (leave failed rows out).
        content_hashes: Content hash per row.
        n_tokens: Tokens per row after truncation.
        truncated: Whether each row was truncated.
        partition_keys: Partition key per row.
        source: Lineage description of the source (asset key or table).
        run_id: The run that embedded the rows.
        source_updated_at: Per-row source timestamps (nulls when absent).
        carry: Carry-along columns, aligned with ``keys``.
        embedded_at: When the rows were embedded (default: now, UTC), one time or one per
            row (a reused chunk vector keeps the time it was embedded).
        chunks: For a chunk table, the chunk columns (``doc_key`` and the ``chunk_*``
            columns), aligned with ``keys`` (the chunk ids).

    Returns:
        The rows, conformed to ``schema`` (:func:`conform_rows`).

    Raises:
        InputDataError: Lengths disagree or a vector has the wrong dimension.
        EmbeddingFailedError: A vector is not finite.
    """
    matrix = np.asarray(vectors, dtype=np.float32)
    n = len(keys)
    dim = spec.output_dim
    if matrix.ndim != 2 or matrix.shape != (n, dim):
        raise InputDataError(
            f"vectors have shape {matrix.shape}, expected ({n}, {dim}) for {n} keys"
        )
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        shown = [pa.array(keys)[int(i)].as_py() for i in bad[:10]]
        raise EmbeddingFailedError(
            f"{len(bad)} vector(s) are not finite (keys {shown}); leave failed rows out"
        )
    if isinstance(embedded_at, pa.Array | pa.ChunkedArray):
        stamps = embedded_at.cast(TIMESTAMP_TYPE)
    else:
        stamp = (embedded_at or datetime.now(UTC)).astimezone(UTC)
        stamps = pa.array([stamp] * n, TIMESTAMP_TYPE)
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys).cast(schema.field("key").type),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim),
        "content_hash": pa.array(content_hashes, pa.string()),
        "spec_fingerprint": pa.array([spec.fingerprint] * n, pa.string()),
        "model_id": pa.array([spec.model] * n, pa.string()),
        "model_revision": pa.array([spec.revision] * n, pa.string()),
        "dim": pa.array(np.full(n, dim, dtype=np.int32)),
        "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32)),
        "truncated": pa.array(np.asarray(truncated, dtype=bool)),
        "partition_key": pa.array(partition_keys, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "source_updated_at": (
            pa.nulls(n, TIMESTAMP_TYPE)
            if source_updated_at is None
            else pa.array(source_updated_at).cast(TIMESTAMP_TYPE)
        ),
        "embedded_at": stamps,
        "run_id": pa.array([run_id] * n, pa.string()),
    }
    chunked = spec.chunking is not None
    if chunked != (chunks is not None):
        raise InputDataError(
            f"build_rows: table {table_name!r} "
            + ("holds chunks: pass chunks=" if chunked else "holds rows, not chunks")
        )
    if chunks is not None:
        for name in CHUNK_COLUMNS:
            columns[name] = chunks.column(name)
    for name, values in columns.items():
        if len(values) != n:
            raise InputDataError(f"build_rows: {name} has {len(values)} rows, keys has {n}")
    if carry is not None:
        if carry.num_rows != n:
            raise InputDataError(f"build_rows: carry has {carry.num_rows} rows, keys has {n}")
        for name in carry.column_names:
            columns[name] = carry.column(name)
    return conform_rows(pa.table(columns), schema, table_name=table_name, full=True)


def conform_rows(rows: pa.Table, schema: pa.Schema, *, table_name: str, full: bool) -> pa.Table:
    """Check ``rows`` against the table's ``schema`` and cast them to its types.

    Args:
        rows: Rows to write, with a ``key`` column.
        schema: The table's schema.
        table_name: The table, for messages.
        full: The rows are whole rows (an upsert): every lineage column is required.

    Returns:
        ``rows`` in the table's column types (their own columns, in their order).

    Raises:
        InputDataError: No key, null or repeated keys, columns the table lacks, lineage
            columns missing from full rows, or values that do not cast.
    """
    if "key" not in rows.column_names:
        raise InputDataError(f"rows need a 'key' column; they have {rows.column_names}")
    unknown = [c for c in rows.column_names if c not in schema.names]
    if unknown:
        raise InputDataError(
            f"column(s) {unknown} are not in table {table_name!r} (columns: {schema.names})"
        )
    if full:
        missing = [c for c in LINEAGE_COLUMNS if c not in rows.column_names]
        if missing:
            raise InputDataError(
                f"rows lack column(s) {missing}; build them with VectorStore.build_rows()"
            )
    keys = rows.column("key")
    if keys.null_count:
        raise InputDataError(f"{keys.null_count} row(s) have a null key; keys are required")
    if pc.count_distinct(keys).as_py() != rows.num_rows:
        counts = pc.value_counts(keys)
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:10]
        raise InputDataError(f"rows repeat key(s) {dupes}; each key may appear once per write")
    target = pa.schema([schema.field(c) for c in rows.column_names], metadata=None)
    try:
        return rows.select(target.names).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise InputDataError(
            f"rows do not fit table {table_name!r}: {e} (table schema: {target})"
        ) from e


def key_values(
    keys: pa.Array | pa.ChunkedArray | Sequence[Any], key_type: pa.DataType
) -> list[Any]:
    """Return the distinct values of ``keys`` as ``key_type`` (for lookups and deletes).

    Example:
        >>> key_values([3, 1, 3], pa.int64())
        [3, 1]

    Raises:
        InputDataError: A key is null, or integer keys meet a string key type (or the reverse).
    """
    array = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys))
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not len(array):
        return []
    if array.null_count:
        raise InputDataError("keys to delete or look up must not be null")
    if pa.types.is_integer(key_type) != pa.types.is_integer(array.type):
        raise InputDataError(f"keys are {array.type} but the table's key is {key_type}")
    return pc.unique(array.cast(key_type)).to_pylist()
