"""The LanceDB vector table: vectors plus lineage, written by key, never mixed across specs.

One row per source key, its lineage stored beside the vector::

    key (int64 | string, not null)   vector FixedSizeList<float32>[dim]
    content_hash  spec_fingerprint  model_id  model_revision  dim  n_tokens  truncated
    partition_key  source  source_updated_at  embedded_at  run_id   + carry-along columns

The columns and metadata are defined in :mod:`qwen3_pipeline.core.schema`; rows are built and
checked by :mod:`qwen3_pipeline.store.rows`. :meth:`VectorStore.open` refuses a table whose
recorded fingerprint differs from the configured spec (:class:`SpecMismatchError`, see
:mod:`qwen3_pipeline.store.schema_evolution`); :mod:`qwen3_pipeline.store.rebuild` re-embeds
into a staging table and swaps it in with one atomic commit.

Writes: :meth:`VectorStore.upsert` (full rows) and :meth:`VectorStore.update_columns` (some
columns of existing rows) are one ``merge_insert`` commit each; :meth:`VectorStore.delete_keys`
deletes by key with filters built by ``lancedb.expr`` (never pasted SQL). A call with nothing
to do makes no commit (empty input; deletes of keys that are not stored). Concurrent commits
that conflict are retried with bounded exponential backoff, then raise
:class:`StoreConflictError`, and every LanceDB exception is typed at this boundary
(:mod:`qwen3_pipeline.store.retries`).

Concurrency: the key is declared with ``set_unenforced_primary_key``, so concurrent
``merge_insert`` calls inserting the same new key are detected as conflicting and retried
instead of both inserting; writers of disjoint keys all land. The key's BTree index is built
after a run's last commit (:meth:`VectorStore.ensure_key_index`); each write looks its keys up
in it or scans the table, whichever is cheaper (:mod:`qwen3_pipeline.store.merge_path`).

LanceDB 0.40 facts this module relies on (checked against the installed package):
``Table.merge_insert(on).when_matched_update_all().when_not_matched_insert_all().execute()``
returns a ``MergeResult`` (``version``, ``num_inserted_rows``, ``num_updated_rows``,
``num_attempts``) and commits even when the input is empty; it accepts a subset of the columns
(partial update); its input's key field must be non-nullable once a primary key is declared.
``Table.delete`` accepts a ``lancedb.expr.Expr`` and commits even when nothing matches.
``create_table(..., mode="overwrite")`` commits a new version of the existing dataset (history
and tags kept); ``optimize(cleanup_older_than=...)`` raises when a tagged version is older than
the cut-off; ``list_versions()`` timestamps are naive local time.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError, InputDataError
from qwen3_pipeline.core.schema import (
    DOC_KEY_COLUMN,
    STATE_COLUMNS,
    normalize_key_type,
    table_schema,
    validate_table_name,
    validate_uri,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.store.connection import connect, list_table_names, open_or_create
from qwen3_pipeline.store.merge_path import key_index_coverage, merge_uses_index
from qwen3_pipeline.store.retries import RetryPolicy, run_typed, with_retries
from qwen3_pipeline.store.rows import build_rows, conform_rows, key_values
from qwen3_pipeline.store.schema_evolution import (
    add_carry_columns,
    check_key_type,
    check_recorded_spec,
    ensure_key,
    ensure_key_index,
    missing_carry_columns,
)
from qwen3_pipeline.store.upkeep import optimize_table

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class WriteResult:
    """What one committed write did.

    Attributes:
        version: The table version the commit created.
        inserted: Rows inserted.
        updated: Rows updated in place (by key).
        deleted: Rows deleted.
        attempts: Tries it took (LanceDB's own conflict retries plus ours).
    """

    version: int
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    attempts: int = 1


# --------------------------------------------------------------------------- the store


def _merge_result(result: Any, tries: int) -> "WriteResult":
    return WriteResult(
        version=int(result.version),
        inserted=int(result.num_inserted_rows),
        updated=int(result.num_updated_rows),
        deleted=int(result.num_deleted_rows),
        # LanceDB retries conflicts inside merge_insert too; count its attempts with ours.
        attempts=tries - 1 + int(getattr(result, "num_attempts", 1)),
    )


class VectorStore:
    """A LanceDB vector table with lineage, bound to one :class:`EmbeddingSpec`.

    Build it with :meth:`open` (or :meth:`begin_rebuild`), not the constructor.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> store = VectorStore.open("/tmp/lancedb", "docs", spec,  # doctest: +SKIP
        ...                          key_type=pa.int64())
        >>> store.upsert(rows)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        db: Any,
        table: Any,
        uri: str,
        table_name: str,
        spec: EmbeddingSpec,
        carry_names: Sequence[str],
        retry: RetryPolicy,
        open_args: dict[str, Any],
        rebuild_target: str | None = None,
    ) -> None:
        self._db = db
        self._table = table
        self._uri = uri
        self._table_name = table_name
        self._spec = spec
        self._carry_names = tuple(carry_names)
        self._retry = retry
        self._open_args = open_args
        self._rebuild_target = rebuild_target
        # Carry columns the configuration has and the table lacks (an inspecting store: the
        # table is not altered, its stored state shows them all-null), and those this store
        # added to the table when it was opened (a commit of its own).
        self._absent_carry: tuple[pa.Field, ...] = ()
        self._columns_added: tuple[str, ...] = ()
        # A table of document chunks: ``key`` is the chunk id, ``doc_key`` the document key.
        self._chunked = spec.chunking is not None
        self._doc_key = DOC_KEY_COLUMN if self._chunked else "key"

    # ---- opening

    @classmethod
    def open(
        cls,
        uri: str,
        table_name: str,
        spec: EmbeddingSpec,
        *,
        key_type: pa.DataType | str,
        carry_schema: pa.Schema | None = None,
        source_key: str = "key",
        storage_options: dict[str, str] | None = None,
        create: bool = True,
        retry: RetryPolicy | None = None,
    ) -> "VectorStore":
        """Open (or create) the vector table ``table_name`` under ``uri`` for ``spec``.

        A new table is created empty with :func:`table_schema`, its key declared with
        ``set_unenforced_primary_key`` (indexed later: :meth:`ensure_key_index`). An existing
        table is checked:
        same spec fingerprint, same key type, compatible carry columns (carry columns new to
        the configuration are added, all-null, as one commit: :attr:`columns_added`; the
        refresh that planned against :meth:`inspect` then fills them by a column update).

        Args:
            uri: Database directory or object-store URI (``s3://bucket/path``).
            table_name: Table name (see :func:`validate_table_name`).
            spec: The embedding spec the table must hold.
            key_type: Type of the source key (integer types map to int64, strings to string).
            carry_schema: Carry-along columns and their types (``sources.carry_schema``).
            source_key: Name of the key column in the source (recorded in the metadata).
            storage_options: Object-store options (credentials, region...).
            create: Create the table when it does not exist (else raise).
            retry: Conflict retry policy.

        Returns:
            The store.

        Raises:
            UnsafeNameError: ``uri`` or ``table_name`` is unsafe.
            SpecMismatchError: The table was built with another spec (or by something else).
            InputDataError: The key type or a carry column type differs from the table's.
            ConfigError: The table does not exist and ``create`` is False.
            StoreError: LanceDB failed.
        """
        store = cls._connect(
            uri,
            table_name,
            spec,
            key_type=key_type,
            carry_schema=carry_schema,
            source_key=source_key,
            storage_options=storage_options,
            create=create,
            retry=retry,
        )
        if store is None:
            raise ConfigError(
                f"vector table {table_name!r} does not exist under {uri!r}; run a refresh "
                "first (it creates the table) or check the table name"
            )
        # Every check before any commit.
        missing_carry = missing_carry_columns(
            store._table, table_name, carry_schema or pa.schema([])
        )
        ensure_key(store._table, table_name, policy=store._retry)
        if missing_carry:
            add_carry_columns(store._table, table_name, missing_carry, policy=store._retry)
            store._columns_added = tuple(f.name for f in missing_carry)
        return store

    @classmethod
    def inspect(
        cls,
        uri: str,
        table_name: str,
        spec: EmbeddingSpec,
        *,
        key_type: pa.DataType | str,
        carry_schema: pa.Schema | None = None,
        source_key: str = "key",
        storage_options: dict[str, str] | None = None,
    ) -> "VectorStore | None":
        """Open an existing table for reading and run every check of :meth:`open`; write nothing.

        The refresh plan reads through it: no table is created, no key declared, no column
        added. Carry columns the table lacks appear in :meth:`existing_state` all-null (what
        :meth:`open` will add), so the diff sees every non-null source value of a new carry
        column as a carry change and the refresh fills the column.

        Returns:
            The store, or None when the table does not exist.

        Raises:
            UnsafeNameError: ``uri`` or ``table_name`` is unsafe.
            SpecMismatchError: The table was built with another spec (or by something else).
            InputDataError: The key type or a carry column type differs from the table's.
            StoreError: LanceDB failed.
        """
        store = cls._connect(
            uri,
            table_name,
            spec,
            key_type=key_type,
            carry_schema=carry_schema,
            source_key=source_key,
            storage_options=storage_options,
            create=False,
            retry=None,
        )
        if store is not None:
            carry = carry_schema or pa.schema([])
            store._absent_carry = tuple(missing_carry_columns(store._table, table_name, carry))
            missing = {f.name for f in store._absent_carry}
            store._carry_names = tuple(n for n in store._carry_names if n not in missing)
        return store

    @classmethod
    def _connect(
        cls,
        uri: str,
        table_name: str,
        spec: EmbeddingSpec,
        *,
        key_type: pa.DataType | str,
        carry_schema: pa.Schema | None,
        source_key: str,
        storage_options: dict[str, str] | None,
        create: bool,
        retry: RetryPolicy | None,
    ) -> "VectorStore | None":
        validate_uri(uri)
        validate_table_name(table_name)
        key_type = normalize_key_type(key_type)
        carry_schema = carry_schema or pa.schema([])
        db = connect(uri, storage_options)
        open_args = {
            "key_type": key_type,
            "carry_schema": carry_schema,
            "source_key": source_key,
            "storage_options": storage_options,
        }
        policy = retry or RetryPolicy()
        schema = table_schema(
            spec, key_type=key_type, carry_schema=carry_schema, source_key=source_key
        )
        if not create and table_name not in list_table_names(db):
            return None
        table = open_or_create(db, table_name, schema, policy=policy)
        check_recorded_spec(table, table_name, spec)
        check_key_type(
            table, table_name, key_type, DOC_KEY_COLUMN if spec.chunking is not None else "key"
        )
        return cls(
            db=db,
            table=table,
            uri=uri,
            table_name=table_name,
            spec=spec,
            carry_names=[f.name for f in carry_schema],
            retry=policy,
            open_args=open_args,
        )

    @property
    def rebuild_target(self) -> str | None:
        """The live table a rebuild staging store replaces (None for a live table)."""
        return self._rebuild_target

    def staging_for(self, target: str) -> "VectorStore":
        """Mark this store as the rebuild staging table of ``target`` (see ``store.rebuild``)."""
        self._rebuild_target = target
        return self

    def reopen(self, table_name: str) -> "VectorStore":
        """Open ``table_name`` in the same database with this store's spec and settings."""
        return VectorStore.open(
            self._uri, table_name, self._spec, retry=self._retry, **self._open_args
        )

    def drop(self, *, ignore_missing: bool = False) -> None:
        """Drop this store's table (used for rebuild staging tables)."""
        run_typed(
            lambda: self._db.drop_table(self._table_name, ignore_missing=ignore_missing),
            f"drop {self._table_name!r}",
        )

    def sibling_table(self, table_name: str) -> Any | None:
        """Return the ``lancedb`` table ``table_name`` of this store's database, or None."""
        if table_name not in list_table_names(self._db):
            return None
        return run_typed(lambda: self._db.open_table(table_name), f"open table {table_name!r}")

    def overwrite(self, target: str) -> None:
        """Replace table ``target`` by this table's rows in one commit (history kept)."""
        schema = self._table.schema
        reader = self._table.search().to_batches(batch_size=8192)
        self._with_retries(
            f"swap rebuilt table into {target!r}",
            lambda: self._db.create_table(target, data=reader, schema=schema, mode="overwrite"),
        )

    # ---- facts

    @property
    def uri(self) -> str:
        """The database URI."""
        return self._uri

    @property
    def table_name(self) -> str:
        """The table this store writes (the staging table during a rebuild)."""
        return self._table_name

    @property
    def table(self) -> Any:
        """The underlying ``lancedb`` table (for search and downstream readers)."""
        return self._table

    @property
    def connection(self) -> Any:
        """The ``lancedb`` connection of the table's database."""
        return self._db

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the table holds."""
        return self._spec

    @property
    def schema(self) -> pa.Schema:
        """The table's current Arrow schema (with the recorded metadata)."""
        return self._table.schema

    @property
    def key_type(self) -> pa.DataType:
        """The source key's type, ``int64`` or ``string`` (a chunk table's ``doc_key``)."""
        return self._table.schema.field(self._doc_key).type

    @property
    def chunked(self) -> bool:
        """Whether the table holds one row per chunk of a document (``spec.chunking``)."""
        return self._chunked

    @property
    def carry_columns(self) -> tuple[str, ...]:
        """The configured carry-along columns."""
        return self._carry_names

    @property
    def columns_added(self) -> tuple[str, ...]:
        """The carry columns :meth:`open` added to the table (one commit), in order."""
        return self._columns_added

    @property
    def version(self) -> int:
        """The latest committed version of the table."""
        return int(self._table.version)

    def count_rows(
        self, partition_keys: Sequence[str] | None = None, *, documents: bool = False
    ) -> int:
        """Rows in the table, or in the given partitions.

        Args:
            partition_keys: Only these partitions (None: the whole table).
            documents: In a chunk table, count documents (their chunk 0) rather than chunks.
        """
        if partition_keys is not None and not partition_keys:
            return 0
        from lancedb.expr import col

        where = None
        if partition_keys is not None:
            where = col("partition_key").isin(list(partition_keys))
        if documents and self._chunked:
            first = col("chunk_seq") == 0
            where = first if where is None else where & first
        # Expr.to_sql() renders the literals with LanceDB's own escaping.
        if where is None:
            return int(self._table.count_rows())
        return int(self._table.count_rows(where.to_sql()))

    # ---- reading

    def existing_state(
        self,
        partition_keys: Sequence[str] | None = None,
        *,
        keys: pa.Array | Sequence[Any] | None = None,
        batch_keys: int = 10_000,
    ) -> pa.Table:
        """Return the stored state of a scope: everything a diff needs, never the vectors.

        Columns: ``key, content_hash, spec_fingerprint, partition_key, source_updated_at``
        and the configured carry columns (all-null for a carry column the table lacks, see
        :meth:`inspect`). In a chunk table this is the state of each
        *document* (read from its chunk 0, which every stored document has; ``key`` is the
        document key), so the diff works on documents exactly as on rows.

        Args:
            partition_keys: Only rows in these partitions (``None``: the whole table).
            keys: Only rows with these keys (e.g. keys a partition scan did not find, to
                detect rows that moved in from another partition). Combined with
                ``partition_keys`` by AND when both are given.
            batch_keys: Keys per query when ``keys`` is long.

        Returns:
            An Arrow table (possibly empty) with the columns above.
        """
        from lancedb.expr import col

        columns = [self._doc_key, *STATE_COLUMNS[1:], *self._carry_names]
        where = col("chunk_seq") == 0 if self._chunked else None

        def both(a: Any, b: Any) -> Any:
            return b if a is None else a & b

        if partition_keys is not None:
            if not partition_keys:
                return self._as_state(self._state_schema(columns).empty_table())
            where = both(where, col("partition_key").isin(list(partition_keys)))
        if keys is None:
            return self._as_state(self._scan(columns, where))
        values = self._key_values(keys)
        if not values:
            return self._as_state(self._state_schema(columns).empty_table())
        parts = []
        for start in range(0, len(values), batch_keys):
            match = col(self._doc_key).isin(values[start : start + batch_keys])
            parts.append(self._scan(columns, both(where, match)))
        return self._as_state(pa.concat_tables(parts))

    def _as_state(self, table: pa.Table) -> pa.Table:
        if self._chunked:
            table = table.rename_columns(["key", *table.column_names[1:]])
        for f in self._absent_carry:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table

    def stored_chunks(
        self, doc_keys: pa.Array | Sequence[Any], *, batch_keys: int = 2_000
    ) -> pa.Table:
        """Return the stored chunks of these documents, vectors included (chunk tables only).

        Columns: ``key`` (the *document* key, as
        :func:`~qwen3_pipeline.chunking.diff.diff_chunks`
        expects), ``chunk_hash``, ``vector``, ``n_tokens``, ``truncated``, ``embedded_at``.
        """
        from lancedb.expr import col

        self._require_chunked("stored_chunks")
        columns = [DOC_KEY_COLUMN, "chunk_hash", "vector", "n_tokens", "truncated", "embedded_at"]
        values = self._key_values(doc_keys)
        parts = [self._state_schema(columns).empty_table()]
        for start in range(0, len(values), batch_keys):
            match = col(DOC_KEY_COLUMN).isin(values[start : start + batch_keys])
            parts.append(self._scan(columns, match))
        table = pa.concat_tables(parts)
        return table.rename_columns(["key", *columns[1:]])

    def _require_chunked(self, what: str) -> None:
        if not self._chunked:
            raise ConfigError(
                f"{what} needs a table of document chunks; {self._table_name!r} "
                "holds one row per source row"
            )

    def _scan(self, columns: list[str], where: Any) -> pa.Table:
        query = self._table.search().select(columns)
        if where is not None:
            query = query.where(where)

        def read() -> pa.Table:
            reader = query.to_batches(batch_size=65_536)
            return pa.Table.from_batches(list(reader), schema=reader.schema)

        # The batches are read inside run_typed: a missing data file only shows while reading.
        return run_typed(read, "scan the stored state").select(columns)

    def _state_schema(self, columns: list[str]) -> pa.Schema:
        schema = self._table.schema
        return pa.schema([schema.field(c) for c in columns])

    # ---- building rows

    def build_rows(self, **columns: Any) -> pa.Table:
        """Assemble full rows in this table's schema from one embedded chunk.

        Args:
            **columns: The keyword arguments of :func:`qwen3_pipeline.store.rows.build_rows`
                after ``table_name`` (``keys``, ``vectors``, ``content_hashes``, ``n_tokens``,
                ``truncated``, ``partition_keys``, ``source``, ``run_id`` and the optional
                ``source_updated_at``, ``carry``, ``embedded_at``, ``chunks``).

        Returns:
            A table ready for :meth:`upsert`.

        Raises:
            InputDataError: Lengths disagree or a vector has the wrong dimension.
            EmbeddingFailedError: A vector is not finite.
        """
        return build_rows(self._table.schema, self._spec, table_name=self._table_name, **columns)

    # ---- writing

    def upsert(self, rows: pa.Table) -> WriteResult | None:
        """Insert or replace full rows by key, as one commit.

        The caller chunks (bounded memory; a crash loses at most the chunk in flight).

        Args:
            rows: Rows with every lineage column (:meth:`build_rows`); carry columns the rows
                lack are left as they are for updated rows and null for inserted ones.

        Returns:
            What was written, or None (and no commit) when ``rows`` is empty.

        Raises:
            InputDataError: Missing columns, duplicate keys in ``rows``, or bad types.
            StoreConflictError: Concurrent commits kept conflicting.
            StoreError: LanceDB failed.
        """
        if rows.num_rows == 0:
            return None
        data = self._conform(rows, full=True)
        return self._merge(data, insert=True, what=f"upsert {data.num_rows} rows")

    def update_columns(self, rows: pa.Table) -> WriteResult | None:
        """Update some columns of rows that exist, by key, without touching their vectors.

        For rows that moved partition or whose carry-along columns changed: pass ``key`` plus
        the columns to set (e.g. ``partition_key`` and the carry columns). Keys not in the
        table are ignored (nothing is inserted), but the call still commits: pass only rows
        the diff found stored. Likewise :meth:`upsert` commits rows identical to the stored
        ones; send only what the diff classified as changed.

        Returns:
            What was written, or None (and no commit) when ``rows`` is empty.

        Raises:
            InputDataError: No key column, unknown columns, duplicate keys or bad types.
            StoreConflictError: Concurrent commits kept conflicting.
        """
        if rows.num_rows == 0:
            return None
        if self._chunked:
            return self._update_documents(rows)
        data = self._conform(rows, full=False)
        return self._merge(data, insert=False, what=f"update {data.num_rows} rows")

    def _update_documents(self, rows: pa.Table) -> WriteResult | None:
        # In a chunk table ``rows`` are keyed by document: every chunk of each document gets
        # its document's new values, all in one commit (no reader sees half a document moved).
        from lancedb.expr import col

        if "key" not in rows.column_names:
            raise InputDataError(f"rows need a 'key' column; they have {rows.column_names}")
        values = self._key_values(rows.column("key"))
        stored = self._scan(["key", DOC_KEY_COLUMN], col(DOC_KEY_COLUMN).isin(values))
        if not stored.num_rows:
            return None
        doc_keys = rows.column("key").cast(self.key_type)
        owner = pc.index_in(stored.column(DOC_KEY_COLUMN), value_set=doc_keys)
        updates = rows.drop_columns(["key"]).take(owner)
        data = self._conform(updates.add_column(0, "key", stored.column("key")), full=False)
        return self._merge(data, insert=False, what=f"update {data.num_rows} chunks")

    def replace_documents(
        self, rows: pa.Table, doc_keys: pa.Array | pa.ChunkedArray | Sequence[Any]
    ) -> WriteResult | None:
        """Replace every chunk of the documents ``doc_keys`` by ``rows``, as one commit.

        Chunk tables only. One ``merge_insert`` upserts ``rows`` by chunk id and deletes the
        stored chunks of ``doc_keys`` that ``rows`` does not have, so a reader at any version
        sees each document wholly old or wholly new, never a mix. The deletes make LanceDB
        join the whole table, so the merge asks for them only when some stored chunk of
        ``doc_keys`` is missing from ``rows`` (read first, by ``doc_key``); a fill, and edits
        that keep or add chunks, cost what the rows written cost. Should another writer commit
        a longer version of one of these documents between that read and the merge, one
        version holds both writers' chunks of it; the merge's update count shows it, and the
        documents are written again at once with the by-source delete.

        Args:
            rows: Full chunk rows (:meth:`build_rows` with ``chunks=``) of some of ``doc_keys``.
            doc_keys: The documents replaced; one without rows in ``rows`` loses its chunks.

        Returns:
            What was written (counts are chunks), or None (and no commit) without documents.

        Raises:
            ConfigError: The table holds rows, not chunks.
            InputDataError: A row of ``rows`` belongs to a document not in ``doc_keys``, or
                the rows do not fit the table.
            StoreConflictError: Concurrent commits kept conflicting.
        """
        from lancedb.expr import col

        self._require_chunked("replace_documents")
        values = self._key_values(doc_keys)
        if not values:
            return None
        data = self._conform(rows, full=True)
        if data.num_rows:
            outside = pc.invert(pc.is_in(data.column(DOC_KEY_COLUMN), pa.array(values)))
            if pc.any(outside).as_py():
                raise InputDataError("replace_documents: rows hold documents not in doc_keys")
        scope = col(DOC_KEY_COLUMN).isin(values)
        new_keys = data.column("key")

        def run() -> Any:
            # Read on every try, at the version the merge joins against (a retry follows
            # other writers' commits).
            stored = self._scan(["key"], scope).column("key")
            kept = int(pc.sum(pc.is_in(stored, value_set=new_keys)).as_py() or 0)
            if kept < len(stored):
                # Some stored chunks are not among the new rows (a document got shorter, or
                # lost every chunk): deleted in the same commit. LanceDB then joins every
                # row of the table, with every column (about 100 + 4 x dim bytes a stored
                # chunk for the commit: 2 GiB at 4M chunks of dim 64), so only then.
                return self._merge_builder(insert=True, delete_by_source=scope).execute(data)
            result = self._merge_builder(insert=True).execute(data)
            if int(result.num_updated_rows) != kept:
                # Another writer changed these documents between the read and the commit
                # (LanceDB retried the merge on its version), and may have left chunks the
                # new rows do not have: replace them again, deleting by source.
                log.warning("documents of %s changed during a commit: rewritten", self._table_name)
                return self._merge_builder(insert=True, delete_by_source=scope).execute(data)
            return result

        result, tries = self._with_retries(f"replace {len(values)} documents", run)
        return _merge_result(result, tries)

    def delete_keys(
        self, keys: pa.Array | pa.ChunkedArray | Sequence[Any], *, batch_size: int = 2_000
    ) -> WriteResult | None:
        """Delete the rows with these keys, one commit per batch of keys that exist.

        Filters are built with ``lancedb.expr`` (typed literals, escaped by LanceDB), so any
        key, quotes and backslashes included, matches only itself. Keys that are not stored
        are skipped without a commit.

        Returns:
            Rows deleted and the last version, or None when nothing was stored under ``keys``.

        Raises:
            StoreConflictError: Concurrent commits kept conflicting.
        """
        from lancedb.expr import col

        values = self._key_values(keys)
        deleted, version, attempts = 0, None, 0
        for start in range(0, len(values), batch_size):
            chunk = values[start : start + batch_size]
            # A chunk table deletes whole documents: every chunk of these document keys.
            present = self._scan([self._doc_key], col(self._doc_key).isin(chunk))
            if not present.num_rows:
                continue
            matching = col(self._doc_key).isin(pc.unique(present.column(self._doc_key)).to_pylist())
            result, tries = self._with_retries(
                f"delete {present.num_rows} keys", partial(self._table.delete, matching)
            )
            deleted += int(result.num_deleted_rows)
            version = int(result.version)
            attempts += tries
        if version is None:
            return None
        return WriteResult(version=version, deleted=deleted, attempts=attempts)

    def _key_values(self, keys: pa.Array | pa.ChunkedArray | Sequence[Any]) -> list[Any]:
        return key_values(keys, self.key_type)

    def _conform(self, rows: pa.Table, *, full: bool) -> pa.Table:
        return conform_rows(rows, self._table.schema, table_name=self._table_name, full=full)

    def _merge(self, data: pa.Table, *, insert: bool, what: str) -> WriteResult:
        result, tries = self._with_retries(
            what, lambda: self._merge_builder(insert=insert).execute(data)
        )
        return _merge_result(result, tries)

    def _merge_builder(self, *, insert: bool, delete_by_source: Any = None) -> Any:
        """A merge by key updating matched rows; inserting the others when ``insert``.

        With ``delete_by_source`` (a filter), the stored rows it matches that the input lacks
        are deleted in the same commit; LanceDB then joins every row of the table, so there
        is no join to choose. Otherwise the join is chosen here, when the merge is built (on
        every try: a retry follows other writers' commits), by
        :func:`~qwen3_pipeline.store.merge_path.merge_uses_index`.
        """
        builder = self._table.merge_insert("key").when_matched_update_all()
        if insert:
            builder = builder.when_not_matched_insert_all()
        if delete_by_source is not None:
            return builder.when_not_matched_by_source_delete(delete_by_source)
        return builder.use_index(merge_uses_index(key_index_coverage(self._table)))

    def _with_retries(self, what: str, action: Callable[[], _T]) -> tuple[_T, int]:
        return with_retries(self._retry, f"{what} on table {self._table_name!r}", action)

    # ---- upkeep

    def ensure_key_index(self) -> bool:
        """Index the key (BTree) if it is not yet; returns whether it built the index.

        The refresh calls it after its last commit and compaction (see
        :func:`~qwen3_pipeline.store.schema_evolution.ensure_key_index` for why not earlier).

        Raises:
            StoreError: LanceDB kept failing within the retry policy.
        """
        built = ensure_key_index(self._table, self._table_name, policy=self._retry)
        if built:
            log.info("indexed the key of %s", self._table_name)
        return built

    def maybe_optimize(
        self, *, max_fragments: int = 64, cleanup_older_than: timedelta = timedelta(days=7)
    ) -> bool:
        """Compact files, update indices and prune old versions once fragments pile up.

        Runs ``optimize()`` only when the table has more than ``max_fragments`` fragments
        (each ``merge_insert`` commit adds some). Versions older than ``cleanup_older_than``
        are pruned, except that the cut-off never passes the oldest tagged version: LanceDB
        raises on tagged versions older than the cut-off, so those (and anything after them)
        are kept.

        Returns:
            True when it optimised.
        """
        stats = run_typed(self._table.stats, "read table stats")
        fragments = int(stats["fragment_stats"]["num_fragments"])
        if fragments <= max_fragments:
            return False
        optimize_table(
            self._table,
            cleanup_older_than=cleanup_older_than,
            retry=partial(self._with_retries, "optimize"),
        )
        log.info("optimized %s (%d fragments before)", self._table_name, fragments)
        return True
