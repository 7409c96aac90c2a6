"""Rebuilds: re-embed a table into a staging table, then swap it in with one atomic commit.

A table whose recorded spec differs from the configured one is never mixed: a refresh refuses
it (:class:`~qwen3_pipeline.core.errors.SpecMismatchError`). A rebuild writes the whole
source into ``<table>__rebuild_<fingerprint>`` (deterministic, so an interrupted rebuild
resumes where it stopped) while readers keep using the live table; when the staging table is
complete, :func:`commit_rebuild` tags the live table's version ``before-swap-...`` (the
rollback point), replaces the live table's rows with one overwrite commit (earlier versions and
tags of the live table stay readable for pinned readers) and drops the staging table.

Example:
    >>> staging = begin_rebuild("data/lancedb", "docs", spec, key_type=pa.int64())  # doctest: +SKIP
    >>> # refresh the whole source into staging
    >>> live = commit_rebuild(staging)  # doctest: +SKIP
"""

import logging

import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import rebuild_table_name, validate_table_name
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.store.retries import RetryPolicy
from qwen3_pipeline.store.table import VectorStore
from qwen3_pipeline.store.versions import tag_before_swap

log = logging.getLogger(__name__)


def begin_rebuild(
    uri: str,
    table_name: str,
    spec: EmbeddingSpec,
    *,
    key_type: pa.DataType | str,
    carry_schema: pa.Schema | None = None,
    source_key: str = "key",
    storage_options: dict[str, str] | None = None,
    retry: RetryPolicy | None = None,
) -> VectorStore:
    """Open a staging table to rebuild ``table_name`` with ``spec``.

    Refresh the *whole* source into the returned store (it starts empty, or where an
    interrupted rebuild stopped), then call :func:`commit_rebuild`. The live table is
    untouched until then.

    Args:
        uri: Database URI.
        table_name: The live table to replace.
        spec: The new spec.
        key_type: As in :meth:`VectorStore.open`.
        carry_schema: As in :meth:`VectorStore.open`.
        source_key: As in :meth:`VectorStore.open`.
        storage_options: As in :meth:`VectorStore.open`.
        retry: As in :meth:`VectorStore.open`.

    Returns:
        A store bound to the staging table.
    """
    validate_table_name(table_name)
    staging = VectorStore.open(
        uri,
        rebuild_table_name(table_name, spec),
        spec,
        key_type=key_type,
        carry_schema=carry_schema,
        source_key=source_key,
        storage_options=storage_options,
        retry=retry,
    )
    return staging.staging_for(table_name)


def commit_rebuild(staging: VectorStore) -> VectorStore:
    """Swap the completed staging table in as the live table, then drop the staging table.

    The swap is one atomic commit on the live table (an overwrite that streams the staging
    rows). Right before it, the live table's current version is tagged
    ``before-swap-v{N}-{time}`` (:func:`~qwen3_pipeline.store.versions.tag_before_swap`; once
    per version, so a retried swap adds no tag), the point that
    :func:`~qwen3_pipeline.store.versions.rollback` restores by default. Before that commit the
    live table is intact and the staging table is kept, so re-running the rebuild resumes and
    commits again; after it, the live table holds the new spec, and a staging table left behind
    by a crash is dropped by the next :func:`commit_rebuild` or :func:`abort_rebuild`.

    Returns:
        The store bound to the live table (key declared and indexed again).

    Raises:
        ConfigError: ``staging`` is not a rebuild staging table.
        StoreError: LanceDB failed (the live table is then unchanged).
    """
    target = _require_rebuild(staging)
    live_table = staging.sibling_table(target)
    if live_table is not None:
        # The swap replaces every row: name the live version first, so that `rollback` can
        # restore it in one commit (and upkeep keeps it while the tag lives).
        tag_before_swap(live_table, int(live_table.version))
    staging.overwrite(target)
    live = staging.reopen(target)
    staging.drop()
    log.info("rebuilt %s with spec %s", target, staging.spec.fingerprint)
    return live


def abort_rebuild(staging: VectorStore) -> None:
    """Drop the staging table of an unwanted rebuild (the live table is untouched).

    Raises:
        ConfigError: ``staging`` is not a rebuild staging table.
    """
    _require_rebuild(staging)
    staging.drop(ignore_missing=True)


def _require_rebuild(store: VectorStore) -> str:
    if store.rebuild_target is None:
        raise ConfigError(
            f"{store.table_name!r} is not a rebuild staging table; start one with "
            "store.rebuild.begin_rebuild()"
        )
    return store.rebuild_target
