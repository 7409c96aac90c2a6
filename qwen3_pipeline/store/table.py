"""The LanceDB vector table: vectors plus lineage, written by key, never mixed across specs.

One row per source key (DESIGN §6)::

    key (int64 | string, not null)   vector FixedSizeList<float32>[dim]
    content_hash  spec_fingerprint  model_id  model_revision  dim  n_tokens  truncated
    partition_key  source  source_updated_at  embedded_at  run_id   + carry-along columns

The columns and metadata are defined in :mod:`qwen3_pipeline.core.schema`. :meth:`VectorStore.open`
refuses a table whose recorded fingerprint differs from the configured spec
(:class:`SpecMismatchError`); :mod:`qwen3_pipeline.store.rebuild` re-embeds into a staging
table and swaps it in with one atomic commit.

Writes: :meth:`VectorStore.upsert` (full rows) and :meth:`VectorStore.update_columns` (some
columns of existing rows) are one ``merge_insert`` commit each; :meth:`VectorStore.delete_keys`
deletes by key with filters built by ``lancedb.expr`` (never pasted SQL). A call with nothing
to do makes no commit (empty input; deletes of keys that are not stored). Concurrent commits
that conflict are retried with bounded exponential backoff (:func:`with_retries`, the one
retry loop of the store), then raise :class:`StoreConflictError`. Every LanceDB exception is
typed at this boundary by :func:`store_error`: conflicts and I/O hiccups are transient, a
missing data file is :class:`StoreCorruptError` (with how to recover), the rest permanent.

Concurrency: the key is declared with ``set_unenforced_primary_key`` and indexed (BTree), so
concurrent ``merge_insert`` calls inserting the same new key are detected as conflicting and
retried instead of both inserting; writers of disjoint keys all land.

LanceDB 0.40 facts this module relies on (checked against the installed package):
``Table.merge_insert(on).when_matched_update_all().when_not_matched_insert_all().execute()``
returns a ``MergeResult`` (``version``, ``num_inserted_rows``, ``num_updated_rows``,
``num_attempts``) and commits even when the input is empty; it accepts a subset of the columns
(partial update); its input's key field must be non-nullable once a primary key is declared.
``Table.delete`` accepts a ``lancedb.expr.Expr`` and commits even when nothing matches.
``create_index(column, config=BTree())`` is the non-deprecated scalar-index API;
``DBConnection.list_tables()`` (paged) replaces ``table_names()``; ``rename_table`` is not
supported by LanceDB OSS; ``create_table(..., mode="overwrite")`` commits a new version of the
existing dataset (history and tags kept); ``optimize(cleanup_older_than=...)`` raises when
a tagged version is older than the cut-off; ``list_versions()`` timestamps are naive local time.
"""

import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingFailedError,
    InputDataError,
    Qwen3PipelineError,
    SpecMismatchError,
    StoreConflictError,
    StoreCorruptError,
    StoreError,
    StoreTransientError,
)
from qwen3_pipeline.core.schema import (
    CHUNK_COLUMNS,
    DOC_KEY_COLUMN,
    LINEAGE_COLUMNS,
    META_FINGERPRINT,
    META_SPEC,
    STATE_COLUMNS,
    TIMESTAMP_TYPE,
    normalize_key_type,
    table_schema,
    validate_table_name,
    validate_uri,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.store.upkeep import optimize_table

log = logging.getLogger(__name__)

_PRIMARY_KEY_METADATA = b"unenforced-primary-key"
# LanceDB's conflict messages: "Retryable commit conflict for version N", "Commit conflict for
# version N", "Too many concurrent writers/writes", "Incompatible transaction: This Merge
# transaction is incompatible with concurrent transaction UpdateConfig at version N" (a writer
# that declared the key or built an index in between: nothing was committed, and the operation
# redone on the latest version succeeds), "... still conflicting after N retries" (LanceDB's own
# merge_insert retries ran out). Matched as phrases, never the bare word "retryable" (which
# "non-retryable" contains).
_CONFLICT = re.compile(
    r"commit conflict|too many concurrent|concurrent write|incompatible with concurrent|"
    r"still conflicting",
    re.IGNORECASE,
)
# A data or manifest file that the table's manifest names but the store no longer has.
_MISSING_FILE = re.compile(r"not found|no such file|does not exist", re.IGNORECASE)
_TRANSIENT_IO = re.compile(
    r"timed? ?out|timeout|connection (reset|refused|closed|aborted)|temporarily|throttl|"
    r"slow ?down|service unavailable|too many requests|\b50[234]\b",
    re.IGNORECASE,
)
_T = TypeVar("_T")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Bounded exponential backoff for commit conflicts.

    Attributes:
        attempts: Tries in total (the first included).
        base_delay_s: Sleep before the second try; doubles each time, with jitter.
        max_delay_s: Longest single sleep.
    """

    attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed try number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


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
        ``set_unenforced_primary_key`` and indexed with a BTree. An existing table is checked:
        same spec fingerprint, same key type, compatible carry columns (carry columns new to
        the configuration are added, all-null, and filled by the next refresh).

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
        missing_carry = store._check_carry(carry_schema)  # every check before any commit
        store._ensure_key()
        if missing_carry:
            store._add_carry(missing_carry)
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
        added. Carry columns the table lacks are left out of :meth:`existing_state`.

        Returns:
            The store, or None when the table does not exist.

        Raises:
            The same errors as :meth:`open`.
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
            missing = {f.name for f in store._check_carry(carry_schema or pa.schema([]))}
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
        import lancedb

        validate_uri(uri)
        validate_table_name(table_name)
        key_type = normalize_key_type(key_type)
        carry_schema = carry_schema or pa.schema([])
        try:
            db = lancedb.connect(
                uri, storage_options=storage_options, read_consistency_interval=timedelta(0)
            )
        except Exception as e:  # lancedb raises several types for bad URIs or credentials
            raise StoreError(f"could not connect to LanceDB at {uri!r}: {e}") from e
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
        table = _open_or_create(db, table_name, schema, policy=policy)
        _check_recorded_spec(table, table_name, spec)
        _check_key_type(
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
        _call(
            lambda: self._db.drop_table(self._table_name, ignore_missing=ignore_missing),
            f"drop {self._table_name!r}",
        )

    def sibling_table(self, table_name: str) -> Any | None:
        """Return the ``lancedb`` table ``table_name`` of this store's database, or None."""
        if table_name not in list_table_names(self._db):
            return None
        return _call(lambda: self._db.open_table(table_name), f"open table {table_name!r}")

    def overwrite(self, target: str) -> None:
        """Replace table ``target`` by this table's rows in one commit (history kept)."""
        schema = self._table.schema
        reader = self._table.search().to_batches(batch_size=8192)
        self._with_retries(
            f"swap rebuilt table into {target!r}",
            lambda: self._db.create_table(target, data=reader, schema=schema, mode="overwrite"),
        )

    def _ensure_key(self) -> None:
        # Writers creating the table at once race to declare the key and index it: the losers
        # get errors LanceDB does not retry ("already set", "incompatible transaction ...
        # Overwrite" when another writer's create committed in between). Re-read the latest
        # version and try again until both are in place, within the retry policy.
        from lancedb.index import BTree

        def declare_and_index() -> None:
            if not self._key_declared():
                self._table.set_unenforced_primary_key("key")
            if not self._key_indexed():
                self._table.create_index("key", config=BTree())

        with_retries(
            self._retry,
            f"declare and index the key of {self._table_name!r}",
            declare_and_index,
            retryable=lambda _: True,
            before_retry=self._table.checkout_latest,
        )

    def _key_indexed(self) -> bool:
        return any(list(ix.columns) == ["key"] for ix in self._table.list_indices())

    def _key_declared(self) -> bool:
        key_field = self._table.schema.field("key")
        return any(_PRIMARY_KEY_METADATA in k for k in (key_field.metadata or {}))

    def _check_carry(self, carry_schema: pa.Schema) -> list[pa.Field]:
        schema = self._table.schema
        missing = []
        for f in carry_schema:
            if f.name not in schema.names:
                missing.append(f.with_nullable(True))
                continue
            have = schema.field(f.name).type
            if have != f.type and not _castable(f.type, have):
                raise InputDataError(
                    f"carry column {f.name!r} is {f.type} in the source but {have} in table "
                    f"{self._table_name!r}; cast it in the source, or rebuild the table "
                    "(rebuild=True / --rebuild)"
                )
        return missing

    def _add_carry(self, fields: list[pa.Field]) -> None:
        names = [f.name for f in fields]
        log.info("adding carry column(s) %s to %s", names, self._table_name)
        self._with_retries(f"add columns {names}", lambda: self._table.add_columns(fields))

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
    def version(self) -> int:
        """The latest committed version of the table."""
        return int(self._table.version)

    def count_rows(self, partition_keys: Sequence[str] | None = None) -> int:
        """Rows in the table, or in the given partitions."""
        if partition_keys is None:
            return int(self._table.count_rows())
        if not partition_keys:
            return 0
        from lancedb.expr import col

        # Expr.to_sql() renders the literals with LanceDB's own escaping.
        return int(self._table.count_rows(col("partition_key").isin(list(partition_keys)).to_sql()))

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
        and the configured carry columns. In a chunk table this is the state of each
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
        if not self._chunked:
            return table
        return table.rename_columns(["key", *table.column_names[1:]])

    def stored_chunks(
        self, doc_keys: pa.Array | Sequence[Any], *, batch_keys: int = 2_000
    ) -> pa.Table:
        """Return the stored chunks of these documents, vectors included (chunk tables only).

        Columns: ``key`` (the *document* key, as
        :func:`~qwen3_pipeline.chunking.chunker.diff_chunks`
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

        # The batches are read inside _call: a missing data file only shows while reading.
        return _call(read, "scan the stored state").select(columns)

    def _state_schema(self, columns: list[str]) -> pa.Schema:
        schema = self._table.schema
        return pa.schema([schema.field(c) for c in columns])

    # ---- building rows

    def build_rows(
        self,
        *,
        keys: pa.Array | Sequence[Any],
        vectors: np.ndarray,
        content_hashes: pa.Array | Sequence[str],
        n_tokens: np.ndarray | Sequence[int],
        truncated: np.ndarray | Sequence[bool],
        partition_keys: pa.Array | Sequence[str],
        source: str,
        run_id: str,
        source_updated_at: pa.Array | None = None,
        carry: pa.Table | pa.RecordBatch | None = None,
        embedded_at: datetime | pa.Array | None = None,
        chunks: pa.Table | None = None,
    ) -> pa.Table:
        """Assemble full rows in the table's schema from one embedded chunk.

        Args:
            keys: The rows' keys.
            vectors: ``float32 [n, dim]`` finite vectors (leave failed rows out).
            content_hashes: Content hash per row.
            n_tokens: Tokens per row after truncation.
            truncated: Whether each row was truncated.
            partition_keys: Partition key per row.
            source: Lineage description of the source (asset key or table).
            run_id: The run that embedded the rows.
            source_updated_at: Per-row source timestamps (nulls when absent).
            carry: Carry-along columns, aligned with ``keys``.
            embedded_at: When the rows were embedded (default: now, UTC), one time or one per
                row (a reused chunk vector keeps the time it was embedded).
            chunks: For a chunk table, the chunk columns (``doc_key`` and the ``chunk_*``
                columns), aligned with ``keys`` (the chunk ids).

        Returns:
            A table ready for :meth:`upsert`.

        Raises:
            InputDataError: Lengths disagree or a vector has the wrong dimension.
            EmbeddingFailedError: A vector is not finite.
        """
        matrix = np.asarray(vectors, dtype=np.float32)
        n = len(keys)
        dim = self._spec.output_dim
        if matrix.ndim != 2 or matrix.shape != (n, dim):
            raise InputDataError(
                f"vectors have shape {matrix.shape}, expected ({n}, {dim}) for {n} keys"
            )
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if len(bad):
            shown = [pa.array(keys)[int(i)].as_py() for i in bad[:10]]
            raise EmbeddingFailedError(
                f"{len(bad)} vector(s) are not finite (keys {shown}); leave failed rows out"
            )
        schema = self._table.schema
        if isinstance(embedded_at, pa.Array | pa.ChunkedArray):
            stamps = embedded_at.cast(TIMESTAMP_TYPE)
        else:
            stamp = (embedded_at or datetime.now(UTC)).astimezone(UTC)
            stamps = pa.array([stamp] * n, TIMESTAMP_TYPE)
        columns: dict[str, pa.Array] = {
            "key": pa.array(keys).cast(schema.field("key").type),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim),
            "content_hash": pa.array(content_hashes, pa.string()),
            "spec_fingerprint": pa.array([self._spec.fingerprint] * n, pa.string()),
            "model_id": pa.array([self._spec.model] * n, pa.string()),
            "model_revision": pa.array([self._spec.revision] * n, pa.string()),
            "dim": pa.array(np.full(n, dim, dtype=np.int32)),
            "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32)),
            "truncated": pa.array(np.asarray(truncated, dtype=bool)),
            "partition_key": pa.array(partition_keys, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "source_updated_at": (
                pa.nulls(n, TIMESTAMP_TYPE)
                if source_updated_at is None
                else pa.array(source_updated_at).cast(TIMESTAMP_TYPE)
            ),
            "embedded_at": stamps,
            "run_id": pa.array([run_id] * n, pa.string()),
        }
        if self._chunked != (chunks is not None):
            raise InputDataError(
                f"build_rows: table {self._table_name!r} "
                + ("holds chunks: pass chunks=" if self._chunked else "holds rows, not chunks")
            )
        if chunks is not None:
            for name in CHUNK_COLUMNS:
                columns[name] = chunks.column(name)
        for name, values in columns.items():
            if len(values) != n:
                raise InputDataError(f"build_rows: {name} has {len(values)} rows, keys has {n}")
        if carry is not None:
            if carry.num_rows != n:
                raise InputDataError(f"build_rows: carry has {carry.num_rows} rows, keys has {n}")
            for name in carry.column_names:
                columns[name] = carry.column(name)
        return self._conform(pa.table(columns), full=True)

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
        sees each document wholly old or wholly new, never a mix.

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

        def run() -> Any:
            return (
                self._table.merge_insert("key")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(scope)
                .execute(data)
            )

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
        array = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys))
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if not len(array):
            return []
        if array.null_count:
            raise InputDataError("keys to delete or look up must not be null")
        key_type = self.key_type
        if pa.types.is_integer(key_type) != pa.types.is_integer(array.type):
            raise InputDataError(f"keys are {array.type} but the table's key is {key_type}")
        return pc.unique(array.cast(key_type)).to_pylist()

    def _conform(self, rows: pa.Table, *, full: bool) -> pa.Table:
        schema = self._table.schema
        if "key" not in rows.column_names:
            raise InputDataError(f"rows need a 'key' column; they have {rows.column_names}")
        unknown = [c for c in rows.column_names if c not in schema.names]
        if unknown:
            raise InputDataError(
                f"column(s) {unknown} are not in table {self._table_name!r} "
                f"(columns: {schema.names})"
            )
        if full:
            missing = [c for c in LINEAGE_COLUMNS if c not in rows.column_names]
            if missing:
                raise InputDataError(
                    f"rows lack column(s) {missing}; build them with VectorStore.build_rows()"
                )
        keys = rows.column("key")
        if keys.null_count:
            raise InputDataError(f"{keys.null_count} row(s) have a null key; keys are required")
        if pc.count_distinct(keys).as_py() != rows.num_rows:
            counts = pc.value_counts(keys)
            dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:10]
            raise InputDataError(f"rows repeat key(s) {dupes}; each key may appear once per write")
        target = pa.schema([schema.field(c) for c in rows.column_names], metadata=None)
        try:
            return rows.select(target.names).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            raise InputDataError(
                f"rows do not fit table {self._table_name!r}: {e} (table schema: {target})"
            ) from e

    def _merge(self, data: pa.Table, *, insert: bool, what: str) -> WriteResult:
        def run() -> Any:
            builder = self._table.merge_insert("key").when_matched_update_all()
            if insert:
                builder = builder.when_not_matched_insert_all()
            return builder.execute(data)

        result, tries = self._with_retries(what, run)
        return _merge_result(result, tries)

    def _with_retries(self, what: str, action: Callable[[], _T]) -> tuple[_T, int]:
        return with_retries(self._retry, f"{what} on table {self._table_name!r}", action)

    # ---- upkeep

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
        stats = _call(self._table.stats, "read table stats")
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


# --------------------------------------------------------------------------- helpers


def list_table_names(db: Any) -> set[str]:
    """Return every table name of a LanceDB connection (all pages of ``list_tables``)."""
    names: set[str] = set()
    token: str | None = None
    while True:
        page = _call(partial(db.list_tables, page_token=token), "list tables")
        names.update(page.tables)
        token = page.page_token
        if not token:
            return names


_CREATION_RACE = re.compile(
    r"not found|does not match existing table schema|already exists", re.IGNORECASE
)


def _open_or_create(db: Any, table_name: str, schema: pa.Schema, *, policy: RetryPolicy) -> Any:
    """Open ``table_name``, or create it empty with ``schema``.

    Writers creating one table at once can catch it half made: listed but not committed yet
    ("not found"), or already altered by the winner (its key declared, so ``exist_ok`` sees
    another schema). Those errors are retried with the conflict backoff.
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


def with_retries(
    policy: "RetryPolicy",
    what: str,
    action: Callable[[], _T],
    *,
    retryable: Callable[[StoreError], bool] | None = None,
    before_retry: Callable[[], Any] | None = None,
) -> tuple[_T, int]:
    """Run a LanceDB action, typing its errors and retrying the retryable ones with backoff.

    The one retry loop of the store. Exceptions are typed by :func:`store_error`; by default
    only commit conflicts are retried, and when the tries run out the last conflict is raised
    as :class:`StoreConflictError` saying what to do.

    Args:
        policy: Tries and backoff.
        what: What is being done, for messages (``"upsert 10 rows on table 'docs'"``).
        action: The call.
        retryable: Which typed errors to retry (default: conflicts).
        before_retry: Called before each retry (e.g. re-read the latest table version).

    Returns:
        The action's result and the number of tries it took.

    Raises:
        StoreConflictError: Conflicts outlasted the retries.
        StoreError: Any other store failure (typed: transient, corrupt or permanent).
    """
    should_retry = retryable or is_conflict
    for attempt in range(1, policy.attempts + 1):
        try:
            return action(), attempt
        except Qwen3PipelineError as e:
            error: Qwen3PipelineError = e
        except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
            error = store_error(e, what)
        if not isinstance(error, StoreError) or not should_retry(error):
            raise error
        if attempt == policy.attempts:
            if is_conflict(error):
                raise StoreConflictError(
                    f"{what} still conflicted with concurrent writers after {attempt} tries; "
                    "serialise writers to this table (a Dagster concurrency pool) and re-run. "
                    f"Last error: {error}"
                ) from error
            raise error
        delay = policy.delay(attempt)
        log.warning("%s failed (try %d), retrying in %.2fs: %s", what, attempt, delay, error)
        time.sleep(delay)
        if before_retry is not None:
            _call(before_retry, "reload the table")
    raise AssertionError("unreachable")


def store_error(error: BaseException, what: str) -> StoreError:
    """Type a LanceDB exception: conflict, missing file, transient I/O, or permanent.

    Example:
        >>> type(store_error(RuntimeError("Retryable commit conflict for version 3"), "x"))
        <class 'qwen3_pipeline.core.errors.StoreConflictError'>
        >>> type(store_error(RuntimeError("non-retryable: schema mismatch"), "x"))
        <class 'qwen3_pipeline.core.errors.StoreError'>
    """
    message = f"LanceDB could not {what}: {error}"
    text = str(error)
    if _CONFLICT.search(text):
        typed: StoreError = StoreConflictError(message)
    elif _MISSING_FILE.search(text) and (".lance" in text or "_versions" in text):
        typed = StoreCorruptError(
            f"{message}. A file of the table is missing (deleted or lost by the object "
            "store); the table cannot be read as it is. Recover by re-running the refresh "
            "with --rebuild (rebuild=True), which re-embeds into a new table and swaps it in, "
            "or restore the missing file from a backup"
        )
    elif _TRANSIENT_IO.search(text) or (
        isinstance(error, OSError) and not isinstance(error, FileNotFoundError)
    ):
        typed = StoreTransientError(message)
    else:
        typed = StoreError(message)
    typed.__cause__ = error
    return typed


def is_conflict(error: BaseException) -> bool:
    """Whether ``error`` is a LanceDB commit conflict (a concurrent writer committed first)."""
    return isinstance(error, StoreConflictError) or bool(_CONFLICT.search(str(error)))


def _call(action: Callable[[], _T], what: str) -> _T:
    try:
        return action()
    except Qwen3PipelineError:
        raise
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError for store failures
        raise store_error(e, what) from e


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    same_family = (
        (pa.types.is_integer(source) and pa.types.is_integer(target))
        or (pa.types.is_floating(source) and pa.types.is_floating(target))
        or (pa.types.is_timestamp(source) and pa.types.is_timestamp(target))
    )
    return same_family


def _check_recorded_spec(table: Any, table_name: str, spec: EmbeddingSpec) -> None:
    meta = table.schema.metadata or {}
    recorded = meta.get(META_FINGERPRINT.encode())
    if recorded is None:
        raise SpecMismatchError(
            f"table {table_name!r} has no recorded embedding spec (it was not written by "
            "qwen3_pipeline); choose another table name, or rebuild it (rebuild=True / "
            "--rebuild) to replace its contents"
        )
    if recorded.decode() == spec.fingerprint:
        return
    described = "another spec"
    raw = meta.get(META_SPEC.encode())
    if raw:
        old = json.loads(raw.decode())
        described = (
            f"model={old.get('model')} revision={old.get('revision')} dim={old.get('dim')} "
            f"max_length={old.get('max_length')}"
        )
    raise SpecMismatchError(
        f"table {table_name!r} was embedded with {described} (fingerprint {recorded.decode()}), "
        f"but the configured spec is model={spec.model} revision={spec.revision} "
        f"dim={spec.dim} max_length={spec.max_length} (fingerprint {spec.fingerprint}). "
        "Vectors of different specs are never mixed: re-run with rebuild=True (CLI: "
        "--rebuild) to re-embed into a new table and swap it in when complete, or use "
        "another table name"
    )


def _check_key_type(table: Any, table_name: str, key_type: pa.DataType, column: str) -> None:
    have = table.schema.field(column).type
    if have != key_type:
        raise InputDataError(
            f"the source key is {key_type} but table {table_name!r} stores {have} keys; keep "
            "the key column's type, or rebuild the table (rebuild=True / --rebuild)"
        )
