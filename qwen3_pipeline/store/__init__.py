"""The LanceDB vector store: the table (open, read, write), rebuilds, and upkeep.

- :mod:`qwen3_pipeline.store.table`: :class:`VectorStore` (open, stored state, upserts, column
  updates, document replacement, deletes);
- :mod:`qwen3_pipeline.store.rows`: rows built in the table's schema, and checked before a
  write;
- :mod:`qwen3_pipeline.store.schema_evolution`: what an existing table must agree on (spec,
  key type, carry columns) and how it grows (carry columns added, key declared and indexed);
- :mod:`qwen3_pipeline.store.merge_path`: whether a write looks its keys up in the key's
  index or scans the table (whichever is cheaper for the index's unindexed tail);
- :mod:`qwen3_pipeline.store.connection`: connecting, listing every table, open-or-create;
- :mod:`qwen3_pipeline.store.retries`: the one retry loop, and LanceDB errors typed
  (conflict, transient, corrupt, permanent);
- :mod:`qwen3_pipeline.store.rebuild`: re-embed into a staging table and swap it in;
- :mod:`qwen3_pipeline.store.versions`: checked-version and before-swap tags, the version
  readers read by default, rollback;
- the names and columns of the table are in :mod:`qwen3_pipeline.core.schema`.
"""

from qwen3_pipeline.store.connection import list_table_names
from qwen3_pipeline.store.rebuild import abort_rebuild, begin_rebuild, commit_rebuild
from qwen3_pipeline.store.retries import RetryPolicy, is_conflict, store_error, with_retries
from qwen3_pipeline.store.table import VectorStore, WriteResult
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
