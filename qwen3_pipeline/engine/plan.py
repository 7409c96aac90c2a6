"""The plan pass of a refresh: read the whole scope once, validate, hash, diff; write nothing.

:func:`plan_refresh` is the single place where bad input is found. It reads every row of the
scope, renders and sanitises the documents, checks keys (null, duplicate, type against the
table), templates and carry-along values (cast to the table's types), hashes the texts and
diffs them against the stored state. It yields a :class:`RefreshPlan` with exact counts (rows
to insert, update, move, carry-update and delete, rows and tokens to embed) and the work
itself, spilled to Arrow IPC files on disk so that memory stays bounded by one read batch plus
the stored-state index, whatever the scope's size. Nothing is written to the vector table:
after a plan, nothing can fail for a reason the source could have told us.

A dry run is the plan printed (``qwen3-pipeline refresh --dry-run``); :mod:`.apply` carries it
out. :func:`check_mass_delete` refuses a plan that would delete too much of the table; for a
rebuild, too much of the live table that its swap replaces (the plan of a rebuild counts the
live rows the new table would not hold, by a key-only read of the live table).
"""

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.changes import (
    ExistingIndex,
)
from qwen3_pipeline.core.errors import ConfigError, MassDeleteError
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.schema import (
    DOC_KEY_COLUMN,
    rebuild_table_name,
    table_schema,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import Embedder, token_counter_of
from qwen3_pipeline.engine.failure_records import FailureRecords
from qwen3_pipeline.engine.options import (
    DEFAULT_MAX_DELETE_SHARE,
    RefreshOptions,
    RefreshRequest,
)
from qwen3_pipeline.engine.report import PLAN_COUNTERS, Tally
from qwen3_pipeline.engine.scan import LiveKeys, Scan, key_codes
from qwen3_pipeline.engine.watermark import (
    KeyScannedIndex,
    WatermarkRead,
    changed_keys,
    plan_watermark,
    scan_stored_keys,
)
from qwen3_pipeline.sources import (
    Source,
    SourceConfig,
    TimeWindow,
    carry_schema,
    output_schema,
    read_batches,
    scope_partition_keys,
    validate_keys,
)
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.store.failure_log import FailureLog

logger = logging.getLogger("qwen3_pipeline")

# Tokens the encoder adds to a chunk besides its text: ``<|endoftext|>``, plus a margin for a
# BPE merge across the chunk's boundary with the document prompt.
_CHUNK_RESERVED_TOKENS = 2


def table_spec_for(spec: EmbeddingSpec, config: SourceConfig) -> EmbeddingSpec:
    """The spec of the vector table that ``config``'s documents embedded by ``spec`` go into.

    Without chunking it is ``spec``. With it, the chunking settings join the spec (and its
    fingerprint: other settings make other vectors, so a change is a rebuild), after checking
    that a full chunk fits the model's ``max_length``.

    Raises:
        ConfigError: Chunks of ``config.chunking.tokens`` would be truncated, or what cutting
            needs (a code splitter's tree-sitter grammar) is not installed.
    """
    if config.chunking is None:
        return spec
    # Checked here, the plan's first step, so nothing (no table, no spec) is written for a
    # run that could not cut its documents. Imported here: the chunker pulls in the splitter.
    from qwen3_pipeline.chunking.chunker import check_chunking

    check_chunking(config.chunking)
    prompt_tokens = len(spec.document_prompt or "")  # an upper bound: >= 1 character per token
    config.chunking.check_fits(spec.max_length, _CHUNK_RESERVED_TOKENS + prompt_tokens)
    return spec.with_chunking(config.chunking.as_json())


@dataclass(frozen=True, kw_only=True)
class PlannedWork:
    """The work a plan lists, for :func:`~qwen3_pipeline.engine.apply.apply_plan`.

    Attributes:
        embed_file: Arrow IPC file of the rows to embed (None when there are none).
        update_file: Arrow IPC file of the rows to update without re-embedding (moved or
            carry-only), or None.
        delete_keys: Stored keys to delete (gone from the source, or now blank).
        delete_partitions: The stored partition of each key in ``delete_keys``.
        tally: Read-side counters (scanned, unchanged, skipped_empty) per partition.
        failures: The table's failure records (what the writers record and clear).
        stale_failures: Keys (as text) stored with their current text that still have a
            failure record (a refresh killed between its two commits): cleared by the apply.
        watermark: A watermark refresh's read and the mark it records after its last commit.
    """

    embed_file: Path | None
    update_file: Path | None
    delete_keys: pa.Array
    delete_partitions: pa.Array
    tally: Tally = field(repr=False)
    failures: FailureRecords | None = field(default=None, repr=False)
    stale_failures: list[pa.Array] = field(default_factory=list, repr=False)
    watermark: WatermarkRead | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class RefreshPlan:
    """What a refresh will do, counted exactly before anything is written.

    The counters are those of the refresh report (``inserted``, ``updated``, ``moved``,
    ``carry_updated``, ``deleted``, ``unchanged``, ``scanned``, ``skipped_empty``) plus the
    work for the model. Close the plan (or use it as a context manager) to remove its spill
    files; :func:`~qwen3_pipeline.engine.apply.apply_plan` does so when it finishes.

    Attributes:
        table_uri: Database URI.
        table_name: The live table.
        target_table: The table the apply writes (the live table, or a rebuild's staging one).
        spec_fingerprint: The configured spec's fingerprint.
        rebuild: Whether the apply rebuilds into a staging table and swaps it in.
        partition_keys: The scope (None: the whole table).
        table_exists: Whether the target table existed when planned.
        stored_rows: Stored rows in the scope of the target table when planned (for a
            rebuild: of the staging table, which a resumed rebuild finds part-filled).
        counts: Planned rows per counter of ``PLAN_COUNTERS``.
        rows_to_embed: Rows the model will embed (for a chunk table: documents to chunk,
            whose chunks not already stored are embedded).
        tokens_to_embed: Tokens those rows cost (after truncation).
        tokens_estimated: True when ``tokens_to_embed`` is an estimate (no tokenizer).
        per_partition: Planned counters per partition key.
        seconds: Time the plan took.
        work: The listed work (spill files, delete keys).
        live_rows: For a rebuild: rows (documents, in a chunk table) of the live table that
            the swap replaces (0 when there is none yet, or it could not be read).
        live_rows_dropped: For a rebuild: live rows the swap would drop, their key gone
            from the source or their text now blank (a key-only comparison).
    """

    table_uri: str
    table_name: str
    target_table: str
    spec_fingerprint: str
    rebuild: bool
    partition_keys: list[str] | None
    table_exists: bool
    stored_rows: int
    counts: dict[str, int]
    rows_to_embed: int
    tokens_to_embed: int
    tokens_estimated: bool
    per_partition: dict[str, dict[str, int]]
    seconds: float
    work: PlannedWork = field(repr=False)
    spill_dir: Path | None = field(default=None, repr=False)
    live_rows: int = 0
    live_rows_dropped: int = 0

    @property
    def delete_share(self) -> float:
        """Share of the stored rows in scope that the plan deletes (0 for an empty table).

        For a rebuild: the share of the live table's rows that the swap would drop.
        """
        if self.rebuild:
            return self.live_rows_dropped / self.live_rows if self.live_rows else 0.0
        return self.counts["deleted"] / self.stored_rows if self.stored_rows else 0.0

    @property
    def source_empty(self) -> bool:
        """Whether the source has no row in scope (as far as the plan read it).

        A watermark read of no changed rows says nothing about that: only its key scan does.
        """
        watermark = self.work.watermark
        if watermark is None or watermark.where is None:
            return self.counts["scanned"] == 0
        return watermark.key_scan and watermark.keys_scanned == 0

    @property
    def has_writes(self) -> bool:
        """Whether applying the plan changes the table (a no-op plan makes no commit)."""
        c = self.counts
        return self.rebuild or bool(
            self.rows_to_embed + c["moved"] + c["carry_updated"] + c["deleted"]
        )

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: the report's counters plus the work for the model.

        A rebuild's plan adds ``live_rows`` and ``live_rows_dropped`` (what the swap drops).
        """
        swap = (
            {"live_rows": self.live_rows, "live_rows_dropped": self.live_rows_dropped}
            if self.rebuild
            else {}
        )
        return {
            **self.counts,
            "rows_to_embed": self.rows_to_embed,
            "tokens_to_embed": self.tokens_to_embed,
            "tokens_estimated": self.tokens_estimated,
            "stored_rows": self.stored_rows,
            "delete_share": round(self.delete_share, 6),
            **swap,
            "rebuild": self.rebuild,
            "table_uri": self.table_uri,
            "table_name": self.table_name,
            "target_table": self.target_table,
            "table_exists": self.table_exists,
            "spec_fingerprint": self.spec_fingerprint,
            "partition_keys": self.partition_keys,
            "per_partition": self.per_partition,
            "plan_seconds": round(self.seconds, 6),
            "read_rows": self.counts["scanned"],
            **({} if self.work.watermark is None else self.work.watermark.as_dict()),
        }

    def summary(self) -> str:
        """One line for logs."""
        c = self.counts
        tokens = f"{'~' if self.tokens_estimated else ''}{self.tokens_to_embed}"
        swap = (
            f"; the swap drops {self.live_rows_dropped} of {self.live_rows} live rows"
            if self.rebuild
            else ""
        )
        return (
            f"plan for {self.table_name}: {c['scanned']} scanned, {c['inserted']} to insert, "
            f"{c['updated']} to update, {c['moved']} to move, {c['carry_updated']} carry "
            f"updates, {c['deleted']} to delete, {c['unchanged']} unchanged, "
            f"{c['skipped_empty']} blank; {self.rows_to_embed} rows / {tokens} tokens to embed"
            f"{swap}"
        )

    def close(self) -> None:
        """Remove the spill files (idempotent)."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def __enter__(self) -> "RefreshPlan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_refresh(
    *,
    source: Source,
    config: SourceConfig,
    embedder: Embedder,
    db_uri: str,
    table: str,
    storage_options: dict[str, str] | None = None,
    options: RefreshOptions | None = None,
    **option_fields: Any,
) -> RefreshPlan:
    """Read, validate, hash and diff the whole scope; return the plan. Writes nothing.

    The keyword front of :func:`plan_scope` (a dry run is this plan printed).

    Args:
        source: Where the rows come from.
        config: Key, text/template, carry columns, ``updated_at`` and the partition scope.
        embedder: The model (its spec decides the table; its tokenizer counts tokens).
        db_uri: LanceDB directory or object-store URI.
        table: Vector table name.
        storage_options: Object-store options for LanceDB.
        options: What the refresh is asked to do (``rebuild``, ``chunk_rows``, ``spill_dir``
            and ``progress`` matter to the plan).
        **option_fields: Fields of :class:`~qwen3_pipeline.engine.options.RefreshOptions`
            replacing those of ``options`` (e.g. ``rebuild=True``).

    Returns:
        The :class:`RefreshPlan` (close it, or apply it, to remove its spill files).

    Raises:
        InputDataError: Null, duplicate or ill-typed keys, missing columns, a template that
            fails on a row, a carry value that does not fit the table's column.
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        ConfigError: A partial rebuild, a bad chunk size, an unsafe name.
        StoreError: LanceDB could not be read.
    """
    request = RefreshRequest(
        source=source,
        config=config,
        embedder=embedder,
        db_uri=db_uri,
        table=table,
        storage_options=storage_options,
        options=RefreshOptions.build(options, option_fields),
    )
    return plan_scope(request)


def plan_scope(request: RefreshRequest) -> RefreshPlan:
    """Read, validate, hash and diff the request's scope; return the plan. Writes nothing.

    Raises:
        InputDataError: Bad keys, columns, templates or carry values (see :func:`plan_refresh`).
        SpecMismatchError: The table holds another spec (use ``rebuild=True``).
        ConfigError: A partial rebuild, an unsafe name.
        StoreError: LanceDB could not be read.
    """
    started = time.perf_counter()
    options = request.options
    scope = scope_partition_keys(request.config.partition)
    if options.rebuild and scope is not None:
        raise ConfigError(
            f"rebuild needs the whole source, but the refresh is scoped to {scope}; "
            "run the rebuild over all partitions"
        )
    spec = table_spec_for(request.embedder.spec, request.config)
    failures = _failure_records(request, spec)
    watermark = plan_watermark(request, spec.fingerprint, scope, failures)
    keys = None
    key_scan = False
    if watermark is not None and watermark.where is not None:
        # Only the changed rows are diffed: their stored state alone is read (with a key scan,
        # that of the stored keys gone from the source too).
        keys = changed_keys(request.source, request.config, watermark.where, options.chunk_rows)
        key_scan = watermark.key_scan
    stored = _StoredScope.read(
        request,
        scope,
        keys=keys,
        full_read=watermark is None or watermark.where is None,
        key_scan=key_scan,
    )
    live, unread = _live_keys(request, stored.source_key_type) if options.rebuild else (None, None)
    directory = Path(tempfile.mkdtemp(prefix="qwen3-plan-", dir=options.spill_dir))
    try:
        scan, work = _scan_source(
            request, stored, scope, directory, live, failures=failures, watermark=watermark
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if unread is not None:
        work.tally.warnings.append(unread)
    planned = scan.planned
    plan = RefreshPlan(
        table_uri=request.db_uri,
        table_name=request.table,
        target_table=stored.target,
        spec_fingerprint=stored.spec.fingerprint,
        rebuild=options.rebuild,
        partition_keys=scope,
        table_exists=stored.exists,
        stored_rows=stored.rows,
        counts={name: int(planned.total[name]) for name in PLAN_COUNTERS},
        rows_to_embed=scan.rows_to_embed,
        tokens_to_embed=scan.tokens_to_embed,
        tokens_estimated=scan.token_counter is None,
        per_partition=planned.per_partition(),
        seconds=time.perf_counter() - started,
        work=work,
        spill_dir=directory,
        live_rows=0 if live is None else live.rows,
        live_rows_dropped=0 if live is None else live.dropped,
    )
    logger.info("%s", plan.summary())
    return plan


def _live_keys(
    request: RefreshRequest, source_key_type: pa.DataType
) -> tuple[LiveKeys | None, str | None]:
    """The keys of the live table a rebuild replaces (None when it does not exist yet).

    Only the key column is read (for a chunk table, the document key of each chunk 0), in
    batches, into one 8-byte code per key. A live table that cannot be read (a rebuild is
    the way out of a damaged table) is not judged: the second value is the warning that the
    report carries.

    Raises:
        StoreError: The database could not be listed.
    """
    from lancedb.expr import col

    from qwen3_pipeline.store import list_table_names, store_error
    from qwen3_pipeline.store.connection import connect

    db = connect(request.db_uri, request.storage_options)
    if request.table not in list_table_names(db):
        return None, None
    try:
        table = db.open_table(request.table)
        chunked = DOC_KEY_COLUMN in table.schema.names
        column = DOC_KEY_COLUMN if chunked else "key"
        integer = pa.types.is_integer(table.schema.field(column).type) and pa.types.is_integer(
            source_key_type
        )
        query = table.search().select([column])
        if chunked:
            query = query.where(col("chunk_seq") == 0)  # every stored document has chunk 0
        codes = [
            key_codes(batch.column(0), integer)
            for batch in query.to_batches(batch_size=65_536)
            if batch.num_rows
        ]
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
        error = store_error(e, f"read the keys of table {request.table!r}")
        warning = (
            f"the live table {request.table!r} could not be read ({error}), so the mass-delete "
            "guard could not count the rows the rebuild's swap drops"
        )
        logger.warning("%s", warning)
        return None, warning
    codes_all = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    return LiveKeys(codes_all, integer=integer), None


@dataclass(frozen=True, kw_only=True)
class _StoredScope:
    """What the table the plan diffs against holds in the scope, checked against the source.

    Attributes:
        spec: The table's spec (the embedder's, plus chunking for a chunk table).
        target: The table written (the live one, or a rebuild's staging table).
        exists: Whether ``target`` exists.
        existing: The stored state (key, hashes, partition, carry) the diff reads.
        carry_targets: The type each carry column will be written as.
        rows: Stored rows in the scope.
        source_key_type: The type of the source's keys.
    """

    spec: EmbeddingSpec
    target: str
    exists: bool
    existing: ExistingIndex
    carry_targets: dict[str, pa.DataType]
    rows: int
    source_key_type: pa.DataType

    @classmethod
    def read(
        cls,
        request: RefreshRequest,
        scope: list[str] | None,
        *,
        keys: pa.Array | None = None,
        full_read: bool = True,
        key_scan: bool = False,
    ) -> "_StoredScope":
        """Check the source's columns and keys and the table's spec; index the stored state.

        Args:
            request: The refresh.
            scope: Its partitions (None: everything).
            keys: Index only the stored rows of these keys (a watermark read's changed rows);
                ``rows`` still counts the whole scope, for the mass-delete guard.
            full_read: The whole source is read: check it for null and duplicate keys first
                (a watermark read checks the rows it reads as it goes).
            key_scan: With ``keys``: compare the stored keys of the scope with the source's
                first (key columns only), and index the gone keys' rows too
                (a :class:`~qwen3_pipeline.engine.watermark.KeyScannedIndex`).
        """
        source, config = request.source, request.config
        spec = table_spec_for(request.embedder.spec, config)
        schema = output_schema(source, config)
        if full_read:
            validate_keys(source, config)
        target = (
            rebuild_table_name(request.table, spec) if request.options.rebuild else request.table
        )
        carry = carry_schema(schema)
        store = VectorStore.inspect(
            request.db_uri,
            target,
            spec,
            key_type=schema.field("key").type,
            carry_schema=carry,
            source_key=config.key,
            storage_options=request.storage_options,
        )
        # Carry values must fit the column they will be written to: the table's, or (for a
        # new table or a new carry column) the type the table will be created with.
        stored_schema = (
            store.schema
            if store is not None
            else table_schema(spec, key_type=schema.field("key").type, carry_schema=carry)
        )
        carry_targets = {
            f.name: stored_schema.field(f.name).type if f.name in stored_schema.names else f.type
            for f in carry
        }
        key_type = stored_schema.field(DOC_KEY_COLUMN if spec.chunking else "key").type
        # Rows can move between time windows, so index the whole table to recognise a row
        # moving in; hash shards are stable per key, so their scope alone is enough.
        time_windows = isinstance(config.partition, TimeWindow)
        if store is None:
            existing = ExistingIndex.empty(key_type, _state_carry(carry_targets))
        elif keys is not None and key_scan:
            # Deletes from key columns alone: the stored state is read for the changed keys
            # and the gone ones, never for the whole scope.
            found = scan_stored_keys(store, scope, source, config)
            state = store.existing_state(scope, keys=found.with_gone(keys))
            existing = KeyScannedIndex(state, found)
        elif keys is not None:
            existing = ExistingIndex(store.existing_state(scope, keys=keys))
        else:
            existing = ExistingIndex(store.existing_state(None if time_windows else scope))
        rows = _stored_in_scope(existing, scope)
        if isinstance(existing, KeyScannedIndex):
            rows = existing.scan.stored  # the scan read every stored key of the scope
        elif keys is not None and store is not None:
            rows = store.count_rows(scope, documents=True)
        return cls(
            spec=spec,
            target=target,
            exists=store is not None,
            existing=existing,
            carry_targets=carry_targets,
            rows=rows,
            source_key_type=schema.field("key").type,
        )


def _scan_source(
    request: RefreshRequest,
    stored: _StoredScope,
    scope: list[str] | None,
    directory: Path,
    live: LiveKeys | None = None,
    *,
    failures: FailureRecords | None = None,
    watermark: WatermarkRead | None = None,
) -> tuple[Scan, PlannedWork]:
    """Read the scope batch by batch into the diff; the work spilled under ``directory``."""
    source, config, options = request.source, request.config, request.options
    scan = Scan(
        existing=stored.existing,
        fingerprint=stored.spec.fingerprint,
        carry_names=list(config.carry),
        carry_targets=stored.carry_targets,
        # A document to chunk is not embedded as one text: its token count (the estimate
        # from characters) only sizes the work, and tokenising whole long documents here
        # would cost as much as chunking them.
        token_counter=None if stored.spec.chunking else token_counter_of(request.embedder),
        directory=directory,
        live=live,
        failures=failures,
        watermark=watermark,
    )
    estimate = max(stored.rows, 0 if live is None else live.rows, 1)
    with Progress(estimate, f"planning {request.table}", enabled=options.progress) as bar:
        where = None if watermark is None else watermark.where
        for batch in read_batches(source, config, batch_rows=options.chunk_rows, where=where):
            scan.add(batch)
            bar.update(batch.num_rows)
    if where is None:
        delete_keys, delete_partitions = scan.deletions(scope, source, config, options.chunk_rows)
    else:
        assert watermark is not None
        delete_keys, delete_partitions = scan.watermark_deletions(
            source, config, options.chunk_rows, watermark
        )
    scan.planned.add("deleted", delete_partitions)
    work = PlannedWork(
        embed_file=scan.embed_spill.close(),
        update_file=scan.update_spill.close(),
        delete_keys=delete_keys,
        delete_partitions=delete_partitions,
        tally=scan.tally,
        watermark=watermark,
        failures=scan.failures,
        # Records of rows the scope no longer holds (never stored, so no delete finds them).
        stale_failures=[
            *scan.stale_failures,
            *(
                [scan.failures.orphans(scope)]
                # A watermark read sees only changed rows: absent ones are not gone.
                if scan.failures is not None and where is None
                else []
            ),
        ],
    )
    return scan, work


def _failure_records(request: RefreshRequest, spec: EmbeddingSpec) -> FailureRecords:
    """The live table's failure records of ``spec``: a rebuild holds no row back."""
    options = request.options
    log = FailureLog.open(request.db_uri, request.table, storage_options=request.storage_options)
    return FailureRecords.read(
        log,
        policy=options.failure_policy,
        spec_fingerprint=spec.fingerprint,
        hold_back=not options.rebuild,
    )


def check_mass_delete(
    plan: RefreshPlan,
    *,
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE,
    allow_mass_delete: bool = False,
) -> None:
    """Refuse a plan that deletes more than ``max_delete_share`` of the stored scope.

    An empty source over a non-empty table is always refused (one broken upstream job must
    not empty a production index), whatever the share, unless ``allow_mass_delete``.

    A rebuild is judged by its swap: the rows of the live table that the new table would not
    hold (``live_rows_dropped`` of ``live_rows``), by the same rules, not by the staging
    table it writes.

    Raises:
        ConfigError: ``max_delete_share`` is not in 0..1.
        MassDeleteError: The plan deletes too much (nothing has been written).

    Example:
        >>> check_mass_delete(plan, max_delete_share=0.5)  # doctest: +SKIP
    """
    if isinstance(max_delete_share, bool) or not 0.0 <= float(max_delete_share) <= 1.0:
        raise ConfigError(f"max_delete_share must be in 0..1, got {max_delete_share!r}")
    if plan.rebuild:
        _check_swap(plan, max_delete_share=max_delete_share, allow_mass_delete=allow_mass_delete)
        return
    if allow_mass_delete or not plan.stored_rows:
        return
    deleted, stored = plan.counts["deleted"], plan.stored_rows
    where = f"table {plan.table_name!r}" + (
        f" (partitions {plan.partition_keys})" if plan.partition_keys else ""
    )
    if plan.source_empty:
        raise MassDeleteError(
            f"the source has no rows in scope but {where} holds {stored} row(s): the refresh "
            "would delete all of them. Check the upstream job that builds the source; if the "
            "source is really empty now, re-run with --allow-mass-delete "
            "(allow_mass_delete=True). Nothing was written"
        )
    if plan.delete_share > max_delete_share:
        raise MassDeleteError(
            f"the refresh would delete {deleted} of the {stored} row(s) of {where} "
            f"({plan.delete_share:.1%}, more than the allowed {max_delete_share:.0%}). Check "
            "the source; if the deletes are intended, re-run with --allow-mass-delete "
            "(allow_mass_delete=True) or raise max_delete_share. Nothing was written"
        )


def _check_swap(plan: RefreshPlan, *, max_delete_share: float, allow_mass_delete: bool) -> None:
    """The mass-delete guard of a rebuild: the live rows its swap would drop."""
    if allow_mass_delete or not plan.live_rows:
        return
    dropped, live = plan.live_rows_dropped, plan.live_rows
    where = f"table {plan.table_name!r}"
    if plan.source_empty:
        raise MassDeleteError(
            f"the source has no rows but {where} holds {live} row(s): the rebuild would swap "
            "in an empty table, deleting all of them. Check the upstream job that builds the "
            "source; if the source is really empty now, re-run with --allow-mass-delete "
            "(allow_mass_delete=True). Nothing was written"
        )
    if plan.delete_share > max_delete_share:
        raise MassDeleteError(
            f"the rebuild would drop {dropped} of the {live} row(s) of {where} when swapped "
            f"in ({plan.delete_share:.1%}, more than the allowed {max_delete_share:.0%}): their "
            "keys are gone from the source or their text is now blank. Check the source; if "
            "the deletes are intended, re-run with --allow-mass-delete (allow_mass_delete=True) "
            "or raise max_delete_share. Nothing was written"
        )


def guard_plan(plan: RefreshPlan, options: RefreshOptions) -> None:
    """The mass-delete guard with the refresh's options (see :func:`check_mass_delete`).

    Raises:
        MassDeleteError: The plan deletes too much (nothing has been written).
    """
    check_mass_delete(
        plan,
        max_delete_share=options.max_delete_share,
        allow_mass_delete=options.allow_mass_delete,
    )


def _state_carry(carry_targets: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(name, t) for name, t in carry_targets.items()])


def _stored_in_scope(existing: ExistingIndex, scope: list[str] | None) -> int:
    if scope is None:
        return len(existing)
    inside = pc.is_in(existing.column("partition_key"), value_set=pa.array(scope, pa.string()))
    return int(pc.sum(pc.fill_null(inside, False).cast(pa.int64())).as_py() or 0)
