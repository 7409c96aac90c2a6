"""Chunked documents as an Arrow table: one row per chunk, the engine's input for embedding.

:func:`chunk_rows` runs a :class:`~qwen3_pipeline.chunking.chunker.Chunker` over documents and
lays the chunks out in :data:`CHUNK_SCHEMA_FIELDS` (the chunk columns of a chunk table, then
the document hash and tokens).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from qwen3_pipeline.chunking.chunker import Chunker, sanitized_document
from qwen3_pipeline.core.changes import content_hash
from qwen3_pipeline.core.errors import InputDataError
from qwen3_pipeline.core.schema import CHUNK_FIELDS

# The chunk columns of a chunk table (schema.CHUNK_FIELDS), then the document hash and tokens.
CHUNK_SCHEMA_FIELDS = (
    *CHUNK_FIELDS,
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
)


def chunk_rows(
    chunker: Chunker,
    keys: pa.Array | pa.ChunkedArray | Sequence[Any],
    texts: pa.Array | pa.ChunkedArray | Sequence[str],
) -> pa.Table:
    """Chunk documents into one row per chunk, the engine's input for embedding.

    Args:
        chunker: The source's chunker.
        keys: The document keys, aligned with ``texts`` (an Arrow array keeps its type).
        texts: The rendered documents (sanitised or not, see :meth:`Chunker.chunk_many`).

    Returns:
        Columns ``key`` then :data:`CHUNK_SCHEMA_FIELDS`: ``chunk_seq``, ``chunk_start``,
        ``chunk_core_start``, ``chunk_end`` (code-point span in the sanitised document),
        ``chunk_text``, ``chunk_hash`` (of the chunk text), ``content_hash`` (of the whole
        sanitised document, as :func:`~qwen3_pipeline.core.changes.content_hash`) and ``n_tokens``.
        Documents without chunks (blank) have no rows.

    Raises:
        InputDataError: ``keys`` and ``texts`` differ in length, or a text is not a string.

    Example:
        >>> from qwen3_pipeline.chunking.config import ChunkingConfig
        >>> rows = chunk_rows(Chunker(ChunkingConfig(tokens=64)), [7], ["Hello."])
        >>> rows.column("key").to_pylist(), rows.column("chunk_seq").to_pylist()
        ([7], [0])
    """
    key_array = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(keys)
    if isinstance(texts, pa.Array | pa.ChunkedArray):
        texts = texts.to_pylist()
    if len(key_array) != len(texts):
        raise InputDataError(f"chunk_rows got {len(key_array)} keys for {len(texts)} texts")
    docs = [sanitized_document(t) for t in texts]
    per_doc = chunker.chunk_many(docs)
    owner = np.fromiter(
        (d for d, chunks in enumerate(per_doc) for _ in chunks),
        dtype=np.int64,
        count=sum(map(len, per_doc)),
    )
    flat = [c for chunks in per_doc for c in chunks]
    doc_hashes = [content_hash(docs[d]) if per_doc[d] else "" for d in range(len(docs))]
    columns = {
        "chunk_seq": [c.seq for c in flat],
        "chunk_start": [c.start for c in flat],
        "chunk_core_start": [c.core_start for c in flat],
        "chunk_end": [c.end for c in flat],
        "chunk_text": [c.text for c in flat],
        "chunk_hash": [c.hash for c in flat],
        "content_hash": [doc_hashes[d] for d in owner.tolist()],
        "n_tokens": [c.tokens for c in flat],
    }
    arrays = [key_array.take(pa.array(owner))]
    arrays += [pa.array(columns[f.name], f.type) for f in CHUNK_SCHEMA_FIELDS]
    schema = pa.schema([pa.field("key", key_array.type), *CHUNK_SCHEMA_FIELDS])
    return pa.Table.from_arrays(arrays, schema=schema)
