"""Hand-built LanceDB tables of document chunks for the search and check tests (not a test module).

Each chunk's vector is built to have a chosen cosine similarity to a given query vector, so the
nearest chunks are known in advance. A document's text is the concatenation of its chunk texts;
its content hash, the chunk spans and keys are computed here, independently of the engine.
"""

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import xxhash

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.core.schema import table_schema
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.sources import ArrowSource, SourceConfig

CHUNKING = ChunkingConfig(tokens=64).as_json()
ROW_SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
CHUNK_SPEC = ROW_SPEC.with_chunking(CHUNKING)
SOURCE_CONFIG = SourceConfig(key="id", text_columns=("body",), carry=("title",))
CARRY = pa.schema([("title", pa.string())])


def chunk_text(doc_key: Any, seq: int) -> str:
    return f"Document {doc_key}, part {seq}. "


def document_text(doc_key: Any, chunks: int) -> str:
    return "".join(chunk_text(doc_key, seq) for seq in range(chunks))


def title(doc_key: Any) -> str:
    return f"Title {doc_key}"


def _hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def vectors_at(query: np.ndarray, similarities: Sequence[float], seed: int = 0) -> np.ndarray:
    """Unit vectors whose cosine similarity to ``query`` is ``similarities[i]``.

    Each is ``s * q + sqrt(1 - s^2) * u_i`` with the ``u_i`` orthonormal and orthogonal to
    ``q``, so no two vectors coincide even at equal similarity.
    """
    q = np.asarray(query, np.float64) / np.linalg.norm(query)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.column_stack([q, rng.standard_normal((len(q), len(similarities)))]))
    basis[:, 0] = q  # QR may flip the sign of the first column
    out = [s * q + np.sqrt(1.0 - s * s) * basis[:, i + 1] for i, s in enumerate(similarities)]
    return np.asarray(out, np.float32)


def chunk_rows(
    spec: EmbeddingSpec, query: np.ndarray, docs: Mapping[Any, Sequence[float]]
) -> pa.Table:
    """Rows of a chunk table: ``docs`` maps a document key to its chunks' similarities."""
    keys = list(docs)
    key_type = pa.int64() if isinstance(keys[0], int) else pa.string()
    schema = table_schema(spec, key_type=key_type, carry_schema=CARRY, source_key="id")
    owners = [k for k in keys for _ in docs[k]]
    seqs = [seq for k in keys for seq in range(len(docs[k]))]
    texts = [chunk_text(k, s) for k, s in zip(owners, seqs, strict=True)]
    starts = [len(document_text(k, s)) for k, s in zip(owners, seqs, strict=True)]
    vectors = vectors_at(query, [s for k in keys for s in docs[k]])
    n = len(owners)
    columns: dict[str, Any] = {
        "key": [f"{k}#{s}" for k, s in zip(owners, seqs, strict=True)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), spec.output_dim),
        "content_hash": [_hash(document_text(k, len(docs[k]))) for k in owners],
        "spec_fingerprint": [spec.fingerprint] * n,
        "model_id": [spec.model] * n,
        "model_revision": [None] * n,
        "dim": [spec.output_dim] * n,
        "n_tokens": [len(t.split()) + 1 for t in texts],
        "truncated": [False] * n,
        "partition_key": [""] * n,
        "source": ["test"] * n,
        "source_updated_at": [None] * n,
        "embedded_at": [datetime(2024, 1, 1, tzinfo=UTC)] * n,
        "run_id": ["run-1"] * n,
        "doc_key": owners,
        "chunk_seq": seqs,
        "chunk_start": starts,
        "chunk_core_start": starts,
        "chunk_end": [s + len(t) for s, t in zip(starts, texts, strict=True)],
        "chunk_text": texts,
        "chunk_hash": [_hash(t) for t in texts],
        "title": [title(k) for k in owners],
    }
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


def write_chunk_table(
    db: Path,
    name: str,
    query: np.ndarray,
    docs: Mapping[Any, Sequence[float]],
    *,
    spec: EmbeddingSpec = CHUNK_SPEC,
) -> Any:
    """Create LanceDB table ``name`` under ``db`` holding the chunks of ``docs``."""
    rows = chunk_rows(spec, query, docs)
    return lancedb.connect(db).create_table(name, data=rows, schema=rows.schema)


def write_row_table(db: Path, name: str, query: np.ndarray, sims: Sequence[float]) -> Any:
    """A table of whole documents (keys 0..n-1) with the given similarities to ``query``."""
    schema = table_schema(ROW_SPEC, key_type=pa.int64(), carry_schema=CARRY, source_key="id")
    n = len(sims)
    vectors = vectors_at(query, sims)
    texts = [document_text(k, 1) for k in range(n)]
    columns: dict[str, Any] = {
        "key": list(range(n)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), ROW_SPEC.output_dim),
        "content_hash": [_hash(t) for t in texts],
        "spec_fingerprint": [ROW_SPEC.fingerprint] * n,
        "model_id": [ROW_SPEC.model] * n,
        "model_revision": [None] * n,
        "dim": [ROW_SPEC.output_dim] * n,
        "n_tokens": [len(t.split()) + 1 for t in texts],
        "truncated": [False] * n,
        "partition_key": [""] * n,
        "source": ["test"] * n,
        "source_updated_at": [None] * n,
        "embedded_at": [datetime(2024, 1, 1, tzinfo=UTC)] * n,
        "run_id": ["run-1"] * n,
        "title": [title(k) for k in range(n)],
    }
    rows = pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in schema], schema=schema)
    return lancedb.connect(db).create_table(name, data=rows, schema=schema)


def source_of(docs: Mapping[Any, Sequence[float]]) -> ArrowSource:
    """The source whose documents the chunk table of ``docs`` mirrors (read with
    :data:`SOURCE_CONFIG`)."""
    keys = list(docs)
    return ArrowSource(
        pa.table(
            {
                "id": keys,
                "body": [document_text(k, len(docs[k])) for k in keys],
                "title": [title(k) for k in keys],
            }
        )
    )
