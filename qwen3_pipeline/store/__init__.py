"""The LanceDB vector store: the table (open, read, write), rebuilds, and upkeep.

- :mod:`qwen3_pipeline.store.table`: :class:`VectorStore` (open with spec checks, stored state,
  upserts, column updates, deletes; one retry helper, errors typed at the LanceDB boundary);
- :mod:`qwen3_pipeline.store.rebuild`: re-embed into a staging table and swap it in;
- :mod:`qwen3_pipeline.store.versions`: checked-version and before-swap tags, the version
  readers read by default, rollback;
- the names and columns of the table are in :mod:`qwen3_pipeline.core.schema`.
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
from qwen3_pipeline.store.versions import (
    RollbackResult,
    checked_versions,
    latest_before_swap_tag,
    latest_checked_version,
    open_lance_table,
    prune_checked_tags,
    resolve_read_version,
    rollback,
    tag_before_swap,
    tag_checked,
)

__all__ = [
    "RetryPolicy",
    "RollbackResult",
    "VectorStore",
    "WriteResult",
    "abort_rebuild",
    "begin_rebuild",
    "checked_versions",
    "commit_rebuild",
    "is_conflict",
    "latest_before_swap_tag",
    "latest_checked_version",
    "list_table_names",
    "open_lance_table",
    "prune_checked_tags",
    "resolve_read_version",
    "rollback",
    "store_error",
    "tag_before_swap",
    "tag_checked",
    "with_retries",
]
