"""qwen3_pipeline: keep a LanceDB vector table in sync with a source table using Qwen3-Embedding.

The user API is importable from here; each name is imported on first use, so
``import qwen3_pipeline`` loads neither torch, LanceDB nor Dagster. The Dagster and Airflow
drivers have their own fronts: :mod:`qwen3_pipeline.dagster` and :mod:`qwen3_pipeline.airflow`.

Example:
    >>> import qwen3_pipeline
    >>> config = qwen3_pipeline.SourceConfig(key="id", text_columns=["body"])
    >>> config.key
    'id'
"""

import sys
import types
from typing import TYPE_CHECKING, Any

from qwen3_pipeline import compat
from qwen3_pipeline.core.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from qwen3_pipeline.chunking.config import ChunkingConfig
    from qwen3_pipeline.consumers.vector_search import open_vector_table, search
    from qwen3_pipeline.core.spec import EmbeddingSpec
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder
    from qwen3_pipeline.embedding.reranker import Qwen3Reranker
    from qwen3_pipeline.engine.refresh import refresh
    from qwen3_pipeline.engine.report import RefreshReport
    from qwen3_pipeline.sources import (
        ArrowSource,
        DuckDBSource,
        ParquetSource,
        PostgresSource,
        Shards,
        SourceConfig,
    )

__version__ = "0.1.0"

_WHERE = {
    "ArrowSource": "qwen3_pipeline.sources",
    "ChunkingConfig": "qwen3_pipeline.chunking.config",
    "DuckDBSource": "qwen3_pipeline.sources",
    "EmbeddingSpec": "qwen3_pipeline.core.spec",
    "ParquetSource": "qwen3_pipeline.sources",
    "PostgresSource": "qwen3_pipeline.sources",
    "Qwen3Encoder": "qwen3_pipeline.embedding.encoder",
    "Qwen3Reranker": "qwen3_pipeline.embedding.reranker",
    "RefreshReport": "qwen3_pipeline.engine.report",
    "Shards": "qwen3_pipeline.sources",
    "SourceConfig": "qwen3_pipeline.sources",
    "open_vector_table": "qwen3_pipeline.consumers.vector_search",
    "refresh": "qwen3_pipeline.engine.refresh",
    "search": "qwen3_pipeline.consumers.vector_search",
}
__all__ = [
    "ArrowSource",
    "ChunkingConfig",
    "DuckDBSource",
    "EmbeddingSpec",
    "ParquetSource",
    "PostgresSource",
    "Qwen3Encoder",
    "Qwen3Reranker",
    "RefreshReport",
    "Shards",
    "SourceConfig",
    "open_vector_table",
    "refresh",
    "search",
]
__getattr__ = lazy_exports(__name__, _WHERE)


class _Package(types.ModuleType):
    """The package module, guarding its public names against same-named old module paths."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the old path ``qwen3_pipeline.refresh`` makes the import system set the
        # package attribute ``refresh`` to that module; the public name must stay the function.
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
compat.install()
