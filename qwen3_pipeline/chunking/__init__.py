"""Chunking long documents into token-budgeted, content-defined chunks, and diffing them.

- :mod:`qwen3_pipeline.chunking.config`: :class:`ChunkingConfig`, the settings (cheap to
  import: no tokenizer, splitter or pandas);
- :mod:`qwen3_pipeline.chunking.tokenizer`: :func:`packaged_tokenizer`, the Qwen3 tokenizer
  chunks are counted with;
- :mod:`qwen3_pipeline.chunking.chunker`: :class:`Chunker`, which cuts documents into chunks
  (:class:`Chunk`) made of semantic units (:class:`Unit`);
- :mod:`qwen3_pipeline.chunking.rows`: :func:`chunk_rows`, chunks as an Arrow table;
- :mod:`qwen3_pipeline.chunking.diff`: :func:`diff_chunks` (which stored chunk's vector a new
  chunk can reuse).

Each name is imported on first use, so importing this package (or only its config) loads
neither the splitter nor pandas.
"""

from typing import TYPE_CHECKING

from qwen3_pipeline.core.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from qwen3_pipeline.chunking.chunker import Chunk, Chunker, Unit
    from qwen3_pipeline.chunking.config import (
        ALGORITHM,
        MAX_TOKENS,
        MIN_TOKENS,
        SPLITTERS,
        ChunkingConfig,
        SplitterKind,
    )
    from qwen3_pipeline.chunking.diff import ChunkDiff, diff_chunks
    from qwen3_pipeline.chunking.rows import CHUNK_SCHEMA_FIELDS, chunk_rows
    from qwen3_pipeline.chunking.tokenizer import packaged_tokenizer

_WHERE = {
    "ALGORITHM": "qwen3_pipeline.chunking.config",
    "CHUNK_SCHEMA_FIELDS": "qwen3_pipeline.chunking.rows",
    "Chunk": "qwen3_pipeline.chunking.chunker",
    "ChunkDiff": "qwen3_pipeline.chunking.diff",
    "Chunker": "qwen3_pipeline.chunking.chunker",
    "ChunkingConfig": "qwen3_pipeline.chunking.config",
    "MAX_TOKENS": "qwen3_pipeline.chunking.config",
    "MIN_TOKENS": "qwen3_pipeline.chunking.config",
    "SPLITTERS": "qwen3_pipeline.chunking.config",
    "SplitterKind": "qwen3_pipeline.chunking.config",
    "Unit": "qwen3_pipeline.chunking.chunker",
    "chunk_rows": "qwen3_pipeline.chunking.rows",
    "diff_chunks": "qwen3_pipeline.chunking.diff",
    "packaged_tokenizer": "qwen3_pipeline.chunking.tokenizer",
}
__all__ = [
    "ALGORITHM",
    "CHUNK_SCHEMA_FIELDS",
    "MAX_TOKENS",
    "MIN_TOKENS",
    "SPLITTERS",
    "Chunk",
    "ChunkDiff",
    "Chunker",
    "ChunkingConfig",
    "SplitterKind",
    "Unit",
    "chunk_rows",
    "diff_chunks",
    "packaged_tokenizer",
]
__getattr__ = lazy_exports(__name__, _WHERE)
