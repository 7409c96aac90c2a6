"""Which stored chunk's vector a new chunk can reuse: the chunk-level diff of re-cut documents.

:func:`diff_chunks` matches the new chunks of changed documents (from
:func:`~qwen3_pipeline.chunking.rows.chunk_rows`) with their stored chunks by document key and
chunk text hash: a chunk whose text is already stored keeps its vector, the rest are embedded,
and stored chunks no new chunk matches are stale.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from qwen3_pipeline.core.errors import InputDataError


@dataclass(frozen=True, kw_only=True)
class ChunkDiff:
    """How the new chunks of re-chunked documents relate to their stored chunks.

    Attributes:
        stored_row: Per new chunk, the stored row it is the same chunk as (same key, same
            text; the n-th copy of a text matches the n-th stored copy), or -1. Such a row
            keeps its vector; only its ``chunk_seq``/span may need an update.
        vector_row: Per new chunk, a stored row of the same document with the same text
            (``stored_row`` when there is one), or -1: the chunk needs embedding.
        stale_rows: Stored rows of the documents in ``new`` that no new chunk is the same
            chunk as: to delete once their vectors were copied where ``vector_row`` says.
    """

    stored_row: np.ndarray
    vector_row: np.ndarray
    stale_rows: np.ndarray

    @property
    def embed(self) -> np.ndarray:
        """Mask of the new chunks that need embedding (text not stored for their document)."""
        return self.vector_row < 0

    @property
    def n_embed(self) -> int:
        """How many new chunks need embedding."""
        return int(self.embed.sum())


def diff_chunks(new: pa.Table, stored: pa.Table) -> ChunkDiff:
    """Match the new chunks of changed documents with the stored chunks (chunk-level reuse).

    Only the documents in ``new`` are compared: stored chunks of other keys are neither
    matched nor stale (whole documents that disappeared or became blank are the engine's
    key-level deletions).

    Args:
        new: Rows from :func:`chunk_rows` (columns ``key`` and ``chunk_hash`` are used).
        stored: The stored chunks, at least ``key`` and ``chunk_hash``; row ``i`` of it is
            what the result's row numbers refer to.

    Returns:
        The matches; see :class:`ChunkDiff`.

    Raises:
        InputDataError: A table lacks ``key`` or ``chunk_hash``, or the key types differ
            (a string key against an integer one).

    Example:
        >>> new = pa.table({"key": [1, 1, 1], "chunk_hash": ["a", "x", "c"]})
        >>> old = pa.table({"key": [1, 1, 2], "chunk_hash": ["a", "b", "x"]})
        >>> d = diff_chunks(new, old)
        >>> d.stored_row.tolist(), d.vector_row.tolist(), d.stale_rows.tolist()
        ([0, -1, -1], [0, -1, -1], [1])
    """
    for name, table in (("new", new), ("stored", stored)):
        missing = [c for c in ("key", "chunk_hash") if c not in table.column_names]
        if missing:
            raise InputDataError(f"diff_chunks: the {name} chunks lack column(s) {missing}")
    new_key, old_key = new.column("key").type, stored.column("key").type
    if pa.types.is_integer(new_key) != pa.types.is_integer(old_key):
        raise InputDataError(
            f"diff_chunks: new keys are {new_key} but stored keys are {old_key}; the key "
            "column's type changed, so rebuild the table"
        )
    new_df = _chunk_frame(new)
    old_df = _chunk_frame(stored)
    keys_in_scope = old_df["key"].isin(pd.unique(new_df["key"]))
    old_df = old_df[keys_in_scope]
    same = new_df.merge(old_df, on=["key", "chunk_hash", "occurrence"], how="left")
    stored_row = same["row_y"].fillna(-1).to_numpy(dtype=np.int64)
    first = old_df.drop_duplicates(["key", "chunk_hash"])
    any_copy = new_df.merge(first, on=["key", "chunk_hash"], how="left")
    vector_row = np.where(
        stored_row >= 0, stored_row, any_copy["row_y"].fillna(-1).to_numpy(dtype=np.int64)
    )
    matched = np.zeros(stored.num_rows, dtype=bool)
    matched[stored_row[stored_row >= 0]] = True
    in_scope = np.zeros(stored.num_rows, dtype=bool)
    in_scope[old_df["row"].to_numpy(dtype=np.int64)] = True
    return ChunkDiff(
        stored_row=stored_row,
        vector_row=vector_row,
        stale_rows=np.flatnonzero(in_scope & ~matched).astype(np.int64),
    )


def _chunk_frame(table: pa.Table) -> pd.DataFrame:
    """``key``, ``chunk_hash``, ``occurrence`` (n-th copy of that text) and ``row``."""
    frame = pd.DataFrame(
        {
            "key": table.column("key").to_pandas(),
            "chunk_hash": table.column("chunk_hash").to_pandas(),
        }
    )
    frame["occurrence"] = frame.groupby(["key", "chunk_hash"], sort=False).cumcount()
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    return frame
