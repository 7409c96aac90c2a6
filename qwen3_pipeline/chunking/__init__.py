"""Chunking long documents into token-budgeted, content-defined chunks, and diffing them.

- :mod:`qwen3_pipeline.chunking.chunker`: :class:`ChunkingConfig`, :class:`Chunker`,
  the packaged tokenizer, :func:`chunk_rows` (Arrow) and :func:`diff_chunks` (which stored
  chunk's vector a new chunk can reuse).
"""

from qwen3_pipeline.chunking.chunker import (
    Chunk,
    ChunkDiff,
    Chunker,
    ChunkingConfig,
    chunk_rows,
    diff_chunks,
    packaged_tokenizer,
)

__all__ = [
    "Chunk",
    "ChunkDiff",
    "Chunker",
    "ChunkingConfig",
    "chunk_rows",
    "diff_chunks",
    "packaged_tokenizer",
]
