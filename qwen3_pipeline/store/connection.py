"""The tables of a LanceDB database: connect, list every table, open or create one.

This module changes when LanceDB's connection API does. LanceDB 0.40 facts it relies on
(checked against the installed package): ``DBConnection.list_tables()`` is paged and replaces
``table_names()``; ``create_table(..., exist_ok=True)`` opens a table another writer created
first, unless that writer already altered its schema (declared the key); ``rename_table`` is
not supported by LanceDB OSS.
"""

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from functools import partial
from typing import Any

import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError, StoreError
from qwen3_pipeline.store.retries import RetryPolicy, is_conflict, run_typed, with_retries

# A table caught half made by a concurrent creator. LanceDB 0.40 raises no typed error for it
# (a bare ValueError/RuntimeError; lancedb's own db.py tells "not found" apart by the message
# too), so the retry matches the message. Whether a table exists is never decided this way:
# that is list_table_names.
_CREATION_RACE = re.compile(
    r"not found|does not match existing table schema|already exists", re.IGNORECASE
)


METADATA_CACHE_ENV = "QWEN3_PIPELINE_LANCE_METADATA_CACHE_MB"
DEFAULT_METADATA_CACHE_MB = 32


def metadata_cache_bytes(environ: Mapping[str, str] | None = None) -> int:
    """LanceDB's metadata cache per connection: ``QWEN3_PIPELINE_LANCE_METADATA_CACHE_MB``.

    LanceDB keeps the manifest of every version it has seen (and file metadata) in a
    1 GiB cache by default. A fill commits hundreds of versions whose manifests each list
    every fragment, so the cache grew with the table: 82 MiB after a 3M-row backfill, the
    largest part of its growth we could remove. 32 MiB holds what a writer reads (the latest
    manifests, the open files' metadata); LRU evicts the old versions first.

    Raises:
        ConfigError: The variable is not a positive whole number of MiB.

    Example:
        >>> metadata_cache_bytes({"QWEN3_PIPELINE_LANCE_METADATA_CACHE_MB": "64"})
        67108864
    """
    raw = (os.environ if environ is None else environ).get(METADATA_CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_METADATA_CACHE_MB << 20
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(f"{METADATA_CACHE_ENV}={raw!r}: use a positive whole number of MiB")
    return int(raw) << 20


def connect(uri: str, storage_options: dict[str, str] | None) -> Any:
    """Connect to the LanceDB database at ``uri``, every read seeing the latest commit.

    The connection's metadata cache is capped (:func:`metadata_cache_bytes`).

    Args:
        uri: Database directory or object-store URI (``s3://bucket/path``).
        storage_options: Object-store options (credentials, region...).

    Returns:
        The ``lancedb`` connection.

    Raises:
        StoreError: LanceDB refused the URI or the credentials.
        ConfigError: ``QWEN3_PIPELINE_LANCE_METADATA_CACHE_MB`` is not a positive number.
    """
    import lancedb

    # A session of its own per connection, as LanceDB's default: none is shared across a fork.
    session = lancedb.Session(metadata_cache_size_bytes=metadata_cache_bytes())
    try:
        return lancedb.connect(
            uri,
            storage_options=storage_options,
            read_consistency_interval=timedelta(0),
            session=session,
        )
    except Exception as e:  # lancedb raises several types for bad URIs or credentials
        raise StoreError(f"could not connect to LanceDB at {uri!r}: {e}") from e


def list_table_names(db: Any) -> set[str]:
    """Return every table name of a LanceDB connection (all pages of ``list_tables``)."""
    names: set[str] = set()
    token: str | None = None
    while True:
        page = run_typed(partial(db.list_tables, page_token=token), "list tables")
        names.update(page.tables)
        token = page.page_token
        if not token:
            return names


def open_or_create(db: Any, table_name: str, schema: pa.Schema, *, policy: RetryPolicy) -> Any:
    """Open ``table_name``, or create it empty with ``schema``.

    Writers creating one table at once can catch it half made: listed but not committed yet
    ("not found"), or already altered by the winner (its key declared, so ``exist_ok`` sees
    another schema). Those errors are retried with the conflict backoff.

    Args:
        db: The ``lancedb`` connection.
        table_name: The table.
        schema: Its schema, should it be created.
        policy: Tries and backoff for creation races and conflicts.

    Returns:
        The ``lancedb`` table.

    Raises:
        StoreError: LanceDB failed (after the retries, for races).
    """

    def open_or_create() -> Any:
        if table_name in list_table_names(db):
            return db.open_table(table_name)
        return db.create_table(table_name, schema=schema, exist_ok=True)

    table, _ = with_retries(
        policy,
        f"open or create table {table_name!r}",
        open_or_create,
        retryable=lambda e: bool(_CREATION_RACE.search(str(e))) or is_conflict(e),
    )
    return table
