"""The chunk writer of the apply pass: replace whole documents of a chunk table.

See :class:`ChunkWriter`. The chunk diff (which stored chunk a new chunk's vector can come
from) is :func:`~qwen3_pipeline.chunking.chunker.diff_chunks`.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.chunking.chunker import Chunker
from qwen3_pipeline.chunking.diff import diff_chunks
from qwen3_pipeline.chunking.rows import chunk_rows
from qwen3_pipeline.core.changes import RowStatus
from qwen3_pipeline.core.failures import RowFailure, as_row_failure
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.schema import (
    CHUNK_COLUMNS,
    DOC_KEY_COLUMN,
    STATUS_COLUMN,
    TEXT_COLUMN,
    TIMESTAMP_TYPE,
    chunk_key,
)
from qwen3_pipeline.embedding.interface import EncodeResult, embed_reporting
from qwen3_pipeline.engine.report import MAX_SHOWN_FAILURES
from qwen3_pipeline.engine.row_writer import TableWriter
from qwen3_pipeline.store.failure_log import FailedRow

logger = logging.getLogger("qwen3_pipeline")


@dataclass(kw_only=True)
class _ChunkVectors:
    """One batch's chunk vectors in chunk order, reused or embedded.

    Made by :meth:`ChunkWriter.prepare` with the reused vectors in place; the model's are
    filled in by :meth:`ChunkWriter.write`.

    Attributes:
        vectors: One row per chunk.
        n_tokens: Tokens per chunk (the stored figure for a reused chunk).
        truncated: Whether the chunk was truncated.
        stamps: When each vector was computed (a reused chunk keeps its stored time).
        embedded: Chunk rows sent to the model.
        failures: Index into ``embedded`` -> why the model failed on it.
    """

    vectors: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    stamps: np.ndarray
    embedded: np.ndarray
    failures: dict[int, "RowFailure | str"] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class PreparedDocs:
    """One batch of documents cut into chunks, the stored vectors they keep in place.

    Attributes:
        docs: The documents as the plan spilled them.
        chunks: Their chunks (``key`` is the document key).
        owner: Per chunk, the row of its document in ``docs``.
        vectors: The chunk vectors, those reused from the table already in place.
        texts: The texts of the chunks to embed (``vectors.embedded``), in that order.
    """

    docs: pa.Table
    chunks: pa.Table
    owner: np.ndarray
    vectors: _ChunkVectors
    texts: list[str]


@dataclass(frozen=True, kw_only=True)
class EmbeddedDocs:
    """One batch of documents after the model: what :meth:`ChunkWriter.write` commits.

    Attributes:
        prepared: The batch before the model.
        encoded: What the model gave for ``prepared.texts`` (None: every chunk was reused).
    """

    prepared: PreparedDocs
    encoded: EncodeResult | None


class ChunkWriter(TableWriter[PreparedDocs, EmbeddedDocs]):
    """Writes documents of a chunk table: chunk, reuse stored chunks, one commit per batch.

    Each changed document is cut again; a chunk whose text is already stored for that
    document keeps its stored vector (no model call), the others are embedded, and the batch's
    documents are replaced in one commit (their chunks that are no longer cut are deleted in
    the same commit), so every document is wholly old or wholly new at every version. A
    document with a chunk the model could not embed keeps all its old chunks.

    Cutting the documents and reading their stored chunks is :meth:`prepare`: the documents
    of two batches are distinct, so reading one batch's stored chunks while the batch before
    it is being committed finds the same rows at either version.
    """

    chunker: Chunker

    def prepare(self, rows: pa.Table) -> PreparedDocs:
        """Cut the documents, read their stored chunks, put the reusable vectors in place."""
        doc_keys = rows.column("key").combine_chunks()
        chunks = chunk_rows(self.chunker, doc_keys, rows.column(TEXT_COLUMN))
        owner = np.asarray(pc.index_in(chunks.column("key"), value_set=doc_keys), dtype=np.int64)
        statuses = np.asarray(rows.column(STATUS_COLUMN).to_numpy(), dtype=np.int8)
        stored = self.store.stored_chunks(doc_keys.filter(pa.array(statuses != RowStatus.NEW)))
        matched = diff_chunks(chunks, stored)
        n, dim = chunks.num_rows, self.store.spec.output_dim
        vectors = _ChunkVectors(
            vectors=np.zeros((n, dim), dtype=np.float32),
            n_tokens=np.zeros(n, dtype=np.int32),
            truncated=np.zeros(n, dtype=bool),
            stamps=np.full(n, np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us")),
            embedded=np.flatnonzero(matched.embed),
        )
        reused = np.flatnonzero(~matched.embed)
        if len(reused):
            source_rows = matched.vector_row[reused]
            flat = stored.column("vector").combine_chunks().flatten()
            stored_vectors = flat.to_numpy(zero_copy_only=False).reshape(-1, dim)
            vectors.vectors[reused] = stored_vectors[source_rows]
            vectors.n_tokens[reused] = stored.column("n_tokens").to_numpy()[source_rows]
            vectors.truncated[reused] = stored.column("truncated").to_numpy()[source_rows]
            vectors.stamps[reused] = stored.column("embedded_at").to_numpy()[source_rows]
        texts = chunks.column("chunk_text").take(pa.array(vectors.embedded)).to_pylist()
        return PreparedDocs(docs=rows, chunks=chunks, owner=owner, vectors=vectors, texts=texts)

    def embed(self, prepared: PreparedDocs, bar: Progress) -> EmbeddedDocs:
        """Embed the new chunks of one batch; ``bar`` counts its documents and tokens."""
        encoded = None
        if prepared.texts:
            encoded = embed_reporting(
                self.embedder, prepared.texts, lambda rows, tokens: bar.update(0, tokens=tokens)
            )
        # Documents are counted here, as their chunks are embedded, so that the progress line
        # has one writer (this thread); the batch is committed right after.
        bar.update(prepared.docs.num_rows)
        return EmbeddedDocs(prepared=prepared, encoded=encoded)

    def write(self, embedded: EmbeddedDocs) -> None:
        """Replace the batch's documents (one commit), then record those that failed."""
        tally, prepared, encoded = self.tally, embedded.prepared, embedded.encoded
        docs, chunks, owner = prepared.docs, prepared.chunks, prepared.owner
        vectors = prepared.vectors
        if encoded is not None:
            # Filled in here, not by the model's thread: the calling thread only embeds.
            tally.encode = tally.encode + encoded.stats
            vectors.vectors[vectors.embedded] = encoded.vectors
            vectors.n_tokens[vectors.embedded] = encoded.n_tokens
            vectors.truncated[vectors.embedded] = encoded.truncated
            vectors.failures = dict(encoded.failures)
        embed = np.zeros(chunks.num_rows, dtype=bool)
        embed[vectors.embedded] = True
        doc_keys = docs.column("key").combine_chunks()
        statuses = np.asarray(docs.column(STATUS_COLUMN).to_numpy(), dtype=np.int8)
        doc_ok = np.ones(docs.num_rows, dtype=bool)
        failed = self._failed_documents(
            vectors.failures, vectors.embedded, owner, chunks, docs, doc_ok
        )
        row_ok = doc_ok[owner]
        partitions = docs.column("partition_key").combine_chunks()
        chunk_partitions = partitions.take(pa.array(owner))
        tally.add("embedded", chunk_partitions, embed)
        tally.add("failed", partitions, ~doc_ok)
        tally.add("inserted", partitions, doc_ok & (statuses == RowStatus.NEW))
        tally.add("updated", partitions, doc_ok & (statuses != RowStatus.NEW))
        tally.add("truncated", chunk_partitions, vectors.truncated & row_ok)
        rows = self._rows(docs, chunks, owner, row_ok, vectors)
        written = self.store.replace_documents(rows, doc_keys.filter(pa.array(doc_ok)))
        if written is not None:
            tally.commits += 1
            tally.total["chunks_deleted"] += written.deleted
            if self.guard is not None and rows.num_rows:
                self.guard.after_commit((), run_id=self.run_id)
        tally.total["chunks_written"] += rows.num_rows
        tally.total["chunks_reused"] += int((~embed & row_ok).sum())
        self.record_outcome(
            failed, doc_keys.filter(pa.array(doc_ok)), partitions.filter(pa.array(~doc_ok))
        )

    def _rows(
        self,
        docs: pa.Table,
        chunks: pa.Table,
        owner: np.ndarray,
        row_ok: np.ndarray,
        vectors: "_ChunkVectors",
    ) -> pa.Table:
        """The chunk rows to write: those of the documents whose every chunk has a vector."""
        kept = chunks.filter(pa.array(row_ok))
        kept_owner = pa.array(owner[row_ok])
        chunk_ids = pa.array(
            [
                chunk_key(k, seq)
                for k, seq in zip(
                    kept.column("key").to_pylist(),
                    kept.column("chunk_seq").to_pylist(),
                    strict=True,
                )
            ],
            pa.string(),
        )
        chunk_columns = kept.rename_columns(
            [DOC_KEY_COLUMN if c == "key" else c for c in kept.column_names]
        )
        return self.store.build_rows(
            keys=chunk_ids,
            vectors=vectors.vectors[row_ok],
            content_hashes=docs.column("content_hash").combine_chunks().take(kept_owner),
            n_tokens=vectors.n_tokens[row_ok],
            truncated=vectors.truncated[row_ok],
            partition_keys=docs.column("partition_key").combine_chunks().take(kept_owner),
            source=self.label,
            run_id=self.run_id,
            source_updated_at=docs.column("source_updated_at").combine_chunks().take(kept_owner),
            carry=docs.select(self.carry_names).take(kept_owner) if self.carry_names else None,
            embedded_at=pa.array(vectors.stamps[row_ok]).cast(TIMESTAMP_TYPE),
            chunks=chunk_columns.select(list(CHUNK_COLUMNS)),
        )

    def _failed_documents(
        self,
        failures: Mapping[int, "RowFailure | str"],
        embed_rows: np.ndarray,
        owner: np.ndarray,
        chunks: pa.Table,
        docs: pa.Table,
        doc_ok: np.ndarray,
    ) -> list[FailedRow]:
        """Mark the documents with a chunk the model failed on; one record each (its first)."""
        if not failures:
            return []
        seqs = chunks.column("chunk_seq")
        doc_keys = docs.column("key").cast(pa.string())
        hashes = docs.column("content_hash")
        failed: dict[int, FailedRow] = {}
        for index, reason in sorted(failures.items()):
            row = int(embed_rows[index])
            doc = int(owner[row])
            doc_ok[doc] = False
            if doc in failed:
                continue
            failure = as_row_failure(reason)
            key = doc_keys[doc].as_py()
            seq = seqs[row].as_py()
            failed[doc] = FailedRow(
                doc_key=key,
                key=chunk_key(key, seq),
                failure=RowFailure(
                    failure.step, failure.error_type, f"chunk {seq}: {failure.message}"
                ),
                content_hash=hashes[doc].as_py(),
                partition_key=docs.column("partition_key")[doc].as_py(),
            )
            if len(self.tally.failures) < MAX_SHOWN_FAILURES:
                self.tally.failures.append((key, failed[doc].failure.message))
        logger.error(
            "%d document(s) have chunks that could not be embedded; they keep their old chunks",
            int((~doc_ok).sum()),
        )
        return [failed[doc] for doc in sorted(failed)]
