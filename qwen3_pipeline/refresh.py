"""One refresh: bring a vector table to exactly the state of a source scope.

:func:`refresh` = :func:`~qwen3_pipeline.engine.plan.plan_refresh` (read the whole scope,
validate, hash, diff: exact counts, nothing written) -> the mass-delete guard ->
:func:`~qwen3_pipeline.engine.apply.apply_plan` (embed new and changed rows, write in chunks,
delete at the end). Bad input is found by the plan, so it never half-writes; a crash during
the apply loses at most the chunk in flight and a re-run converges; a refresh that finds
nothing to change makes no commit.
"""

import logging

from qwen3_pipeline.embedder import Embedder
from qwen3_pipeline.engine.apply import apply_plan
from qwen3_pipeline.engine.plan import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_DELETE_SHARE,
    RefreshPlan,
    check_mass_delete,
    plan_refresh,
)
from qwen3_pipeline.engine.report import ROW_COUNTERS, RefreshReport
from qwen3_pipeline.errors import StoreError
from qwen3_pipeline.schema import validate_table_name, validate_uri
from qwen3_pipeline.sources import Source, SourceConfig
from qwen3_pipeline.store import store_error

logger = logging.getLogger("qwen3_pipeline")

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_DELETE_SHARE",
    "ROW_COUNTERS",
    "RefreshPlan",
    "RefreshReport",
    "check_mass_delete",
    "plan_refresh",
    "refresh",
]


def refresh(
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    db_uri: str,
    table: str,
    storage_options: dict[str, str] | None = None,
    source_name: str | None = None,
    run_id: str | None = None,
    rebuild: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    allow_mass_delete: bool = False,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    spill_dir: str | None = None,
    progress: bool = True,
) -> RefreshReport:
    """Bring ``table`` to the state of the source scope, embedding only what changed.

    Args:
        source: Where the rows come from (DuckDB, Parquet, Arrow).
        config: Key, text/template, carry columns, ``updated_at`` and the partition scope
            (``config.partition``: one shard, several, a time window, or None for all).
        embedder: The model (``Qwen3Encoder``, or a fake in tests); its spec decides the table.
        db_uri: LanceDB directory or object-store URI.
        table: Vector table name.
        storage_options: Object-store options (credentials) for LanceDB.
        source_name: Lineage label written on each row (default: the source's name).
        run_id: Lineage id written on each row (default: a new UUID).
        rebuild: Embed the whole source into a new table and swap it in when complete (for a
            spec change); the live table is untouched until the swap.
        chunk_rows: Rows per source batch, and the most rows per embed call and per commit.
        allow_mass_delete: Let the refresh delete more than ``max_delete_share`` of the scope
            (or everything, for an empty source).
        max_delete_share: The largest share of the stored scope a refresh may delete.
        spill_dir: Where the plan spills its work (default: the system temp directory).
        progress: Report progress (bar on a terminal, log lines otherwise).

    Returns:
        The :class:`RefreshReport`.

    Raises:
        InputDataError: Null, duplicate or ill-typed keys, missing columns, a template or a
            carry value that does not fit; found before anything is written.
        MassDeleteError: The refresh would delete too much (nothing written).
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        ConfigError: A partial rebuild, or a bad setting.
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    version_before = live_version(db_uri, table, storage_options)
    plan = plan_refresh(
        source=source,
        config=config,
        embedder=embedder,
        db_uri=db_uri,
        table=table,
        storage_options=storage_options,
        rebuild=rebuild,
        chunk_rows=chunk_rows,
        spill_dir=spill_dir,
        progress=progress,
    )
    try:
        check_mass_delete(
            plan, max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete
        )
    except BaseException:
        plan.close()
        raise
    return apply_plan(
        plan,
        source=source,
        config=config,
        embedder=embedder,
        storage_options=storage_options,
        source_name=source_name,
        run_id=run_id,
        chunk_rows=chunk_rows,
        version_before=version_before,
        progress=progress,
    )


def live_version(db_uri: str, table: str, storage_options: dict[str, str] | None) -> int:
    """The live table's version before a refresh writes anything; 0 if it does not exist.

    Read before the store is opened, so that the commits creating a new table (or a rebuild's
    staging table) are not mistaken for the table's state before the refresh.

    Raises:
        UnsafeNameError: The URI or table name is unsafe.
        StoreError: LanceDB could not be read.
    """
    import lancedb

    validate_uri(db_uri)
    validate_table_name(table)
    try:
        db = lancedb.connect(db_uri, storage_options=storage_options)
        return int(db.open_table(table).version)
    except Exception as e:  # LanceDB raises ValueError "Table '...' was not found", or I/O errors
        if "not found" in str(e).lower() and ".lance" not in str(e):
            return 0
        error: StoreError = store_error(e, f"read table {table!r} at {db_uri!r}")
        raise error from e
