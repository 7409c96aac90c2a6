"""One refresh: bring a vector table to exactly the state of a source scope.

Every path (a whole scope, several shards, a rebuild, a run resumed after a crash, the CLI,
Dagster, Airflow) runs the same sequence in :func:`run_refresh`:

1. **validate**: the options when built (:class:`~.options.RefreshOptions`), the names, the
   source's columns and keys, the table's spec;
2. **plan** (:func:`~.plan.plan_scope`): read the whole scope, hash, diff; exact counts, the
   work spilled to disk, nothing written (over several shards: every shard planned first,
   :mod:`.shards`);
3. **guard** (:func:`~.plan.guard_plan`): refuse a plan that deletes too much (a rebuild: too
   much of the live table its swap replaces);
4. **canary**: before the model's first write, the drift guard re-embeds the table's canary
   texts (:mod:`.canary`);
5. **apply** (:func:`~.apply.apply_plan`): embed new and changed rows, write in chunks,
   delete at the end, swap a rebuild in.

Bad input is found by the plan, so it never half-writes; a crash during the apply loses at
most the chunk in flight and a re-run converges; a refresh that finds nothing to change makes
no commit.
"""

from dataclasses import replace
from typing import Any

from qwen3_pipeline.core.errors import StoreError
from qwen3_pipeline.core.schema import validate_table_name, validate_uri
from qwen3_pipeline.embedding.interface import Embedder
from qwen3_pipeline.engine.apply import apply_plan
from qwen3_pipeline.engine.options import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_DELETE_SHARE,
    RefreshOptions,
    RefreshRequest,
)
from qwen3_pipeline.engine.plan import (
    RefreshPlan,
    check_mass_delete,
    guard_plan,
    plan_refresh,
    plan_scope,
    table_spec_for,
)
from qwen3_pipeline.engine.report import ROW_COUNTERS, RefreshReport
from qwen3_pipeline.engine.shards import apply_shards, plan_shards, several_shards
from qwen3_pipeline.sources import Source, SourceConfig
from qwen3_pipeline.store import list_table_names, store_error
from qwen3_pipeline.store.rebuild_lock import rebuild_lock

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_DELETE_SHARE",
    "ROW_COUNTERS",
    "RefreshOptions",
    "RefreshPlan",
    "RefreshReport",
    "RefreshRequest",
    "check_mass_delete",
    "live_version",
    "plan_refresh",
    "refresh",
    "run_refresh",
    "table_spec_for",
]


def refresh(
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    db_uri: str,
    table: str,
    storage_options: dict[str, str] | None = None,
    options: RefreshOptions | None = None,
    **option_fields: Any,
) -> RefreshReport:
    """Bring ``table`` to the state of the source scope, embedding only what changed.

    Args:
        source: Where the rows come from (DuckDB, Parquet, Arrow, PostgreSQL).
        config: Key, text/template, carry columns, ``updated_at``, chunking and the partition
            scope (``config.partition``: one shard, several, a time window, or None for all).
            Several hash shards are refreshed one shard at a time (memory bounded by one
            shard, see :mod:`.shards`), unless ``rebuild``, or unless the table holds rows
            outside the selected shards' partitions when all shards are selected.
        embedder: The model (``Qwen3Encoder``, or a fake in tests); its spec decides the table.
            It is used as is by every shard (a model is loaded once per run).
        db_uri: LanceDB directory or object-store URI.
        table: Vector table name.
        storage_options: Object-store options (credentials) for LanceDB.
        options: What the refresh is asked to do (:class:`~.options.RefreshOptions`:
            rebuild, guard, drift, re-projection, gate, chunk size, spill dir, progress,
            lineage labels); default: all defaults.
        **option_fields: Fields of :class:`~.options.RefreshOptions` replacing those of
            ``options``, e.g. ``rebuild=True``, ``allow_mass_delete=True``, ``run_id=...``.

    Returns:
        The :class:`~.report.RefreshReport`.

    Raises:
        InputDataError: Null, duplicate or ill-typed keys, missing columns, a template or a
            carry value that does not fit; found before anything is written.
        MassDeleteError: The refresh would delete too much (nothing written).
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        EmbeddingDriftError: The loaded model no longer reproduces the table's canary vectors
            (nothing written; rebuild, or ``accept_drift=True``).
        ConfigError: A partial rebuild, or a bad setting.
        StoreError: LanceDB failed (the table stays at its last committed version).
        TypeError: ``option_fields`` names no field of ``RefreshOptions``.

    Example:
        >>> from qwen3_pipeline import ArrowSource, SourceConfig, refresh
        >>> from qwen3_pipeline.testing import FakeEmbedder
        >>> from qwen3_pipeline.core.spec import EmbeddingSpec
        >>> import pyarrow as pa, tempfile
        >>> rows = pa.table({"id": [1, 2], "body": ["first text", "second text"]})
        >>> report = refresh(
        ...     source=ArrowSource(rows),
        ...     config=SourceConfig(key="id", text_columns=["body"]),
        ...     embedder=FakeEmbedder(EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)),
        ...     db_uri=tempfile.mkdtemp(),
        ...     table="docs",
        ...     progress=False,
        ... )
        >>> report.inserted, report.committed
        (2, True)
    """
    request = RefreshRequest(
        source=source,
        config=config,
        embedder=embedder,
        db_uri=db_uri,
        table=table,
        storage_options=storage_options,
        options=RefreshOptions.build(options, option_fields).with_run_id(),
    )
    return run_refresh(request)


def run_refresh(request: RefreshRequest) -> RefreshReport:
    """Run one refresh: validate -> plan -> guard -> canary -> apply (see the module docstring).

    Raises:
        InputDataError: Bad keys, columns, templates or carry values (nothing written).
        MassDeleteError: The refresh would delete too much (nothing written).
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        EmbeddingDriftError: The loaded model no longer reproduces the table's canaries.
        ConfigError: A partial rebuild, or a bad setting.
        StoreConflictError: Another rebuild of the table is running (a rebuild only).
        StoreError: LanceDB failed (the table stays at its last committed version).
    """
    options = request.options.with_run_id()  # one run id for every shard of the run
    request = replace(request, options=options)
    if options.rebuild:
        with rebuild_lock(request.db_uri, request.table):
            return _run_refresh(request)
    return _run_refresh(request)


def _run_refresh(request: RefreshRequest) -> RefreshReport:
    options = request.options
    version_before = live_version(request.db_uri, request.table, request.storage_options)
    # A watermark refresh reads only changed rows: one plan over the scope, no per-shard split
    # (whose reason, bounding memory over a whole table, does not apply).
    if not options.rebuild and request.config.watermark is None and several_shards(request.config):
        shard_plans = plan_shards(request)
        if shard_plans is not None:
            with shard_plans:
                assert shard_plans.totals is not None  # set once every shard is planned
                guard_plan(shard_plans.totals, options)
                return apply_shards(shard_plans, request, version_before=version_before)
    with plan_scope(request) as plan:
        guard_plan(plan, options)
        return apply_plan(plan, request, version_before=version_before)


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
        if table not in list_table_names(db):
            return 0
        return int(db.open_table(table).version)
    except StoreError:
        raise
    except Exception as e:  # LanceDB raises OSError/RuntimeError for unreadable storage
        error: StoreError = store_error(e, f"read table {table!r} at {db_uri!r}")
        raise error from e
