"""The LanceDB vector table: vectors plus lineage, written by key, never mixed across specs.

One row per source key (DESIGN §6)::

    key (int64 | string, not null)   vector FixedSizeList<float32>[dim]
    content_hash  spec_fingerprint  model_id  model_revision  dim  n_tokens  truncated
    partition_key  source  source_updated_at  embedded_at  run_id   + carry-along columns

The schema metadata records the full spec (``EmbeddingSpec.to_json``), its fingerprint, the
package version and the source's key column. :meth:`VectorStore.open` refuses a table whose
recorded fingerprint differs from the configured spec (:class:`SpecMismatchError`); a rebuild
(:meth:`VectorStore.begin_rebuild` / :meth:`VectorStore.commit_rebuild`) re-embeds into a
staging table and swaps it in with one atomic commit.

Writes: :meth:`VectorStore.upsert` (full rows) and :meth:`VectorStore.update_columns` (some
columns of existing rows) are one ``merge_insert`` commit each; :meth:`VectorStore.delete_keys`
deletes by key with filters built by ``lancedb.expr`` (never pasted SQL). A call with nothing
to do makes no commit (empty input; deletes of keys that are not stored). Concurrent commits
that conflict are retried with bounded exponential backoff, then raise
:class:`StoreConflictError`.

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
from importlib import metadata
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.errors import (
    ConfigError,
    EmbeddingFailedError,
    InputDataError,
    SpecMismatchError,
    StoreConflictError,
    StoreError,
    UnsafeNameError,
)
from qwen3_pipeline.sources import LINEAGE_COLUMNS, RESERVED_COLUMNS
from qwen3_pipeline.spec import EmbeddingSpec

log = logging.getLogger(__name__)

META_SPEC = "qwen3_pipeline.spec"
META_FINGERPRINT = "qwen3_pipeline.fingerprint"
META_PACKAGE_VERSION = "qwen3_pipeline.package_version"
META_SOURCE_KEY = "qwen3_pipeline.source_key"
REBUILD_MARKER = "__rebuild_"
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# The columns VectorStore.existing_state always returns (carry-along columns follow).
STATE_COLUMNS = ("key", "content_hash", "spec_fingerprint", "partition_key", "source_updated_at")
_PRIMARY_KEY_METADATA = b"unenforced-primary-key"
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_CONFLICT_MESSAGES = ("commit conflict", "concurrent write", "too many concurrent", "retryable")
_T = TypeVar("_T")


def package_version() -> str:
    """The installed qwen3-pipeline version (recorded in table metadata)."""
    try:
        return metadata.version("qwen3-pipeline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- names


def validate_table_name(name: str) -> str:
    """Return ``name`` if it is a safe table name, else raise :class:`UnsafeNameError`.

    Allowed: letters, digits, ``_``, ``-`` and ``.`` (not first, never ``..``), at most 200
    characters, so a name can never leave the database directory.

    Example:
        >>> validate_table_name("documents_v2")
        'documents_v2'
    """
    if not isinstance(name, str) or not _TABLE_NAME.match(name) or ".." in name:
        raise UnsafeNameError(
            f"table name {name!r} is not allowed: use 1-200 letters, digits, '_', '-' or '.', "
            "starting with a letter, digit or '_', without '..' or path separators"
        )
    return name


def validate_uri(uri: str) -> str:
    """Return ``uri`` if it is a safe database URI, else raise :class:`UnsafeNameError`.

    A local path or ``scheme://...`` URI (``s3://``, ``gs://``, ``az://``, ``file://``...) with
    no ``..`` path component and no control characters.

    Example:
        >>> validate_uri("s3://bucket/vectors")
        's3://bucket/vectors'
    """
    if not isinstance(uri, str) or not uri.strip():
        raise UnsafeNameError(f"database URI must be a non-empty string, got {uri!r}")
    if any(ord(c) < 32 for c in uri):
        raise UnsafeNameError(f"database URI {uri!r} contains control characters")
    match = _URI_SCHEME.match(uri)
    path = match.group(2) if match else uri
    if ".." in re.split(r"[/\\]", path.split("?", 1)[0]):
        raise UnsafeNameError(
            f"database URI {uri!r} has a '..' component; give the directory or bucket path "
            "without parent references"
        )
    return uri


def rebuild_table_name(table_name: str, spec: EmbeddingSpec) -> str:
    """The staging table a rebuild of ``table_name`` to ``spec`` writes into.

    Deterministic, so an interrupted rebuild resumes where it stopped.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> rebuild_table_name("docs", spec) == f"docs__rebuild_{spec.fingerprint}"
        True
    """
    return validate_table_name(f"{table_name}{REBUILD_MARKER}{spec.fingerprint}")


# --------------------------------------------------------------------------- schema


def normalize_key_type(key_type: pa.DataType | str) -> pa.DataType:
    """Map an integer type (or ``"int64"``) to ``int64`` and a string type to ``string``.

    Raises:
        InputDataError: Any other type.
    """
    if isinstance(key_type, str):
        key_type = {"int64": pa.int64(), "string": pa.string(), "str": pa.string()}.get(
            key_type, pa.null()
        )
    if pa.types.is_integer(key_type):
        return pa.int64()
    if (
        pa.types.is_string(key_type)
        or pa.types.is_large_string(key_type)
        or pa.types.is_string_view(key_type)
    ):
        return pa.string()
    raise InputDataError(f"key type {key_type} is not supported; keys are integers or strings")


def table_schema(
    spec: EmbeddingSpec,
    *,
    key_type: pa.DataType | str,
    carry_schema: pa.Schema | None = None,
    source_key: str = "key",
) -> pa.Schema:
    """Return the Arrow schema of a vector table for ``spec`` (lineage columns, then carry).

    Raises:
        ConfigError: A carry column takes a lineage column's name.
        InputDataError: The key type is neither integer nor string.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> table_schema(spec, key_type=pa.int64()).field("vector").type.list_size
        64
    """
    carry = list(carry_schema or [])
    clash = sorted({f.name for f in carry} & RESERVED_COLUMNS)
    if clash:
        raise ConfigError(f"carry column(s) {clash} clash with the vector table's own columns")
    fields = [
        pa.field("key", normalize_key_type(key_type), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), spec.output_dim)),
        pa.field("content_hash", pa.string()),
        pa.field("spec_fingerprint", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("dim", pa.int32()),
        pa.field("n_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("partition_key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("source_updated_at", TIMESTAMP_TYPE),
        pa.field("embedded_at", TIMESTAMP_TYPE),
        pa.field("run_id", pa.string()),
        *(f.with_nullable(True) for f in carry),
    ]
    meta = {
        META_SPEC: spec.to_json(),
        META_FINGERPRINT: spec.fingerprint,
        META_PACKAGE_VERSION: package_version(),
        META_SOURCE_KEY: source_key,
    }
    return pa.schema(fields, metadata=meta)


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
        table = _open_or_create(db, uri, table_name, schema, create=create, policy=policy)
        _check_recorded_spec(table, table_name, spec)
        _check_key_type(table, table_name, key_type)
        store = cls(
            db=db,
            table=table,
            uri=uri,
            table_name=table_name,
            spec=spec,
            carry_names=[f.name for f in carry_schema],
            retry=policy,
            open_args=open_args,
        )
        missing_carry = store._check_carry(carry_schema)  # every check before any commit
        store._ensure_key()
        if missing_carry:
            store._add_carry(missing_carry)
        return store

    @classmethod
    def begin_rebuild(
        cls,
        uri: str,
        table_name: str,
        spec: EmbeddingSpec,
        *,
        key_type: pa.DataType | str,
        carry_schema: pa.Schema | None = None,
        source_key: str = "key",
        storage_options: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> "VectorStore":
        """Open a staging table to rebuild ``table_name`` with ``spec``.

        Refresh the *whole* source into the returned store (it starts empty, or where an
        interrupted rebuild stopped: the staging name is deterministic, see
        :func:`rebuild_table_name`), then call :meth:`commit_rebuild`. The live table is
        untouched until then; readers keep using it.

        Args:
            uri: Database URI.
            table_name: The live table to replace.
            spec: The new spec.
            key_type: As in :meth:`open`.
            carry_schema: As in :meth:`open`.
            source_key: As in :meth:`open`.
            storage_options: As in :meth:`open`.
            retry: As in :meth:`open`.

        Returns:
            A store bound to the staging table.
        """
        validate_table_name(table_name)
        staging = cls.open(
            uri,
            rebuild_table_name(table_name, spec),
            spec,
            key_type=key_type,
            carry_schema=carry_schema,
            source_key=source_key,
            storage_options=storage_options,
            retry=retry,
        )
        staging._rebuild_target = table_name
        return staging

    def commit_rebuild(self) -> "VectorStore":
        """Swap the completed staging table in as the live table, then drop the staging table.

        The swap is one atomic commit on the live table (an overwrite that streams the staging
        rows; earlier versions and tags of the live table are kept for pinned readers). Crash
        behaviour: before that commit the live table is intact and the staging table is kept,
        so re-running the rebuild resumes and commits again; after it, the live table holds
        the new spec, and a staging table left behind by a crash is dropped by the next
        :meth:`commit_rebuild` or :meth:`abort_rebuild`.

        Returns:
            The store bound to the live table (key declared and indexed again).

        Raises:
            ConfigError: This store is not a rebuild staging table.
            StoreError: LanceDB failed (the live table is then unchanged).
        """
        target = self._require_rebuild()
        schema = self._table.schema
        reader = self._table.search().to_batches(batch_size=8192)
        self._with_retries(
            f"swap rebuilt table into {target!r}",
            lambda: self._db.create_table(target, data=reader, schema=schema, mode="overwrite"),
        )
        live = VectorStore.open(self._uri, target, self._spec, retry=self._retry, **self._open_args)
        _call(lambda: self._db.drop_table(self._table_name), f"drop {self._table_name!r}")
        log.info("rebuilt %s with spec %s", target, self._spec.fingerprint)
        return live

    def abort_rebuild(self) -> None:
        """Drop the staging table of an unwanted rebuild (the live table is untouched)."""
        self._require_rebuild()
        _call(
            lambda: self._db.drop_table(self._table_name, ignore_missing=True),
            f"drop {self._table_name!r}",
        )

    def _require_rebuild(self) -> str:
        if self._rebuild_target is None:
            raise ConfigError(
                f"{self._table_name!r} is not a rebuild staging table; start one with "
                "VectorStore.begin_rebuild()"
            )
        return self._rebuild_target

    def _ensure_key(self) -> None:
        # Writers creating the table at once race to declare the key and index it: the losers
        # get non-retryable errors ("already set", "incompatible transaction ... Overwrite"
        # when another writer's create committed in between). Re-read the latest version and
        # try again until both are in place, within the retry policy.
        from lancedb.index import BTree

        for attempt in range(1, self._retry.attempts + 1):
            try:
                if not self._key_declared():
                    self._with_retries(
                        "declare the primary key",
                        lambda: self._table.set_unenforced_primary_key("key"),
                    )
                if not self._key_indexed():
                    self._with_retries(
                        "index the key", lambda: self._table.create_index("key", config=BTree())
                    )
                return
            except StoreError:
                _call(self._table.checkout_latest, "reload the table")
                if self._key_declared() and self._key_indexed():
                    return
                if attempt == self._retry.attempts:
                    raise
                time.sleep(self._retry.delay(attempt))

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
    def spec(self) -> EmbeddingSpec:
        """The spec the table holds."""
        return self._spec

    @property
    def schema(self) -> pa.Schema:
        """The table's current Arrow schema (with the recorded metadata)."""
        return self._table.schema

    @property
    def key_type(self) -> pa.DataType:
        """``int64`` or ``string``."""
        return self._table.schema.field("key").type

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
        and the configured carry columns.

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

        columns = [*STATE_COLUMNS, *self._carry_names]
        where = None
        if partition_keys is not None:
            if not partition_keys:
                return self._state_schema(columns).empty_table()
            where = col("partition_key").isin(list(partition_keys))
        if keys is None:
            return self._scan(columns, where)
        values = self._key_values(keys)
        if not values:
            return self._state_schema(columns).empty_table()
        parts = []
        for start in range(0, len(values), batch_keys):
            match = col("key").isin(values[start : start + batch_keys])
            parts.append(self._scan(columns, match if where is None else where & match))
        return pa.concat_tables(parts)

    def _scan(self, columns: list[str], where: Any) -> pa.Table:
        query = self._table.search().select(columns)
        if where is not None:
            query = query.where(where)
        reader = _call(lambda: query.to_batches(batch_size=65_536), "scan the stored state")
        return pa.Table.from_batches(list(reader), schema=reader.schema).select(columns)

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
        embedded_at: datetime | None = None,
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
            embedded_at: When the rows were embedded (default: now, UTC).

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
        stamp = (embedded_at or datetime.now(UTC)).astimezone(UTC)
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
            "embedded_at": pa.array([stamp] * n, TIMESTAMP_TYPE),
            "run_id": pa.array([run_id] * n, pa.string()),
        }
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
        data = self._conform(rows, full=False)
        return self._merge(data, insert=False, what=f"update {data.num_rows} rows")

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
            present = self._scan(["key"], col("key").isin(chunk))
            if not present.num_rows:
                continue
            matching = col("key").isin(present.column("key").to_pylist())
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
        return WriteResult(
            version=int(result.version),
            inserted=int(result.num_inserted_rows),
            updated=int(result.num_updated_rows),
            deleted=int(result.num_deleted_rows),
            attempts=tries - 1 + int(getattr(result, "num_attempts", 1)),
        )

    def _with_retries(self, what: str, action: Callable[[], _T]) -> tuple[_T, int]:
        policy = self._retry
        for attempt in range(1, policy.attempts + 1):
            try:
                return action(), attempt
            except Exception as e:  # LanceDB surfaces conflicts as RuntimeError/OSError
                if not _is_conflict(e):
                    raise StoreError(f"{what} on table {self._table_name!r} failed: {e}") from e
                if attempt == policy.attempts:
                    raise StoreConflictError(
                        f"{what} on table {self._table_name!r} still conflicted with concurrent "
                        f"writers after {attempt} tries; serialise writers to this table (a "
                        f"Dagster concurrency pool) and re-run. Last error: {e}"
                    ) from e
                delay = policy.delay(attempt)
                log.warning(
                    "%s conflicted (try %d), retrying in %.2fs: %s", what, attempt, delay, e
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

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
        older_than = self._safe_cleanup_age(cleanup_older_than)
        self._with_retries("optimize", lambda: self._table.optimize(cleanup_older_than=older_than))
        log.info("optimized %s (%d fragments before)", self._table_name, fragments)
        return True

    def _safe_cleanup_age(self, wanted: timedelta) -> timedelta:
        tags = self._table.tags.list()
        if not tags:
            return wanted
        tagged = {int(t["version"]) for t in tags.values()}
        stamps = [v["timestamp"] for v in self._table.list_versions() if v["version"] in tagged]
        if not stamps:
            return wanted
        oldest = min(stamps)
        now = datetime.now(oldest.tzinfo)  # list_versions() gives naive local times
        return max(wanted, now - oldest + timedelta(minutes=1))


# --------------------------------------------------------------------------- helpers


def _table_names(db: Any) -> set[str]:
    names: set[str] = set()
    token: str | None = None
    while True:
        page = _call(partial(db.list_tables, page_token=token), "list tables")
        names.update(page.tables)
        token = page.page_token
        if not token:
            return names


_CREATION_RACE_MESSAGES = ("not found", "does not match existing table schema", "already exists")


def _open_or_create(
    db: Any, uri: str, table_name: str, schema: pa.Schema, *, create: bool, policy: RetryPolicy
) -> Any:
    """Open ``table_name``, or create it empty with ``schema``.

    Writers creating one table at once can catch it half made: listed but not committed yet
    ("not found"), or already altered by the winner (its key declared, so ``exist_ok`` sees
    another schema). Those errors are retried with the conflict backoff.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            if table_name in _table_names(db):
                return _call(lambda: db.open_table(table_name), f"open table {table_name!r}")
            if not create:
                raise ConfigError(
                    f"vector table {table_name!r} does not exist under {uri!r}; run a refresh "
                    "first (it creates the table) or check the table name"
                )
            return _call(
                lambda: db.create_table(table_name, schema=schema, exist_ok=True),
                f"create table {table_name!r}",
            )
        except StoreError as e:
            racing = any(m in str(e).lower() for m in _CREATION_RACE_MESSAGES)
            if not racing or attempt == policy.attempts:
                raise
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def _call(action: Callable[[], _T], what: str) -> _T:
    try:
        return action()
    except (SpecMismatchError, InputDataError, ConfigError):
        raise
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError for store failures
        raise StoreError(f"LanceDB could not {what}: {e}") from e


def _is_conflict(error: BaseException) -> bool:
    message = str(error).lower()
    return any(marker in message for marker in _CONFLICT_MESSAGES)


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


def _check_key_type(table: Any, table_name: str, key_type: pa.DataType) -> None:
    have = table.schema.field("key").type
    if have != key_type:
        raise InputDataError(
            f"the source key is {key_type} but table {table_name!r} stores {have} keys; keep "
            "the key column's type, or rebuild the table (rebuild=True / --rebuild)"
        )
