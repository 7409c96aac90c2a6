"""The LanceDB vector store: the table (open, read, write), rebuilds, and upkeep.

- :mod:`qwen3_pipeline.store.table`: :class:`VectorStore` (open with spec checks, stored state,
  upserts, column updates, deletes; one retry helper, errors typed at the LanceDB boundary);
- :mod:`qwen3_pipeline.store.rebuild`: re-embed into a staging table and swap it in;
- the names and columns of the table are in :mod:`qwen3_pipeline.schema`.
"""

from qwen3_pipeline.store.rebuild import abort_rebuild, begin_rebuild, commit_rebuild
from qwen3_pipeline.store.table import (
    RetryPolicy,
    VectorStore,
    WriteResult,
    is_conflict,
    list_table_names,
    store_error,
    with_retries,
)

__all__ = [
    "RetryPolicy",
    "VectorStore",
    "WriteResult",
    "abort_rebuild",
    "begin_rebuild",
    "commit_rebuild",
    "is_conflict",
    "list_table_names",
    "store_error",
    "with_retries",
]
