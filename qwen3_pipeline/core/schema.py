"""The vector table's names and schema: lineage columns, metadata keys, reserved names.

One row per source key, its lineage stored beside the vector::

    key (int64 | string, not null)   vector FixedSizeList<float32>[dim]
    content_hash  spec_fingerprint  model_id  model_revision  dim  n_tokens  truncated
    partition_key  source  source_updated_at  embedded_at  run_id   + carry-along columns

The schema metadata records the full spec (``EmbeddingSpec.to_json``), its fingerprint, the
package version and the source's key column.

Names. The lineage columns are reserved: a carry-along column may take any other name. The
engine's own working columns live in a namespace no user column can enter: they start with
``INTERNAL_PREFIX`` (``"__qwen3_"``), and carry names with that prefix are refused.
"""

import re
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError, InputDataError, UnsafeNameError
from qwen3_pipeline.core.spec import EmbeddingSpec

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# The vector table's own columns in table order (lineage beside each vector).
LINEAGE_COLUMNS = (
    "key",
    "vector",
    "content_hash",
    "spec_fingerprint",
    "model_id",
    "model_revision",
    "dim",
    "n_tokens",
    "truncated",
    "partition_key",
    "source",
    "source_updated_at",
    "embedded_at",
    "run_id",
)
# A table of document chunks (``EmbeddingSpec.chunking`` set) has one row per chunk: ``key``
# is the chunk's id (``chunk_key``: document key, '#', chunk_seq), and these columns follow the
# lineage columns. ``content_hash`` is then the whole document's hash, ``n_tokens`` the chunk's.
DOC_KEY_COLUMN = "doc_key"
CHUNK_COLUMNS = (
    DOC_KEY_COLUMN,
    "chunk_seq",
    "chunk_start",
    "chunk_core_start",
    "chunk_end",
    "chunk_text",
    "chunk_hash",
)
# The chunk's own columns (after doc_key), as the chunker makes them (chunking.chunk_rows).
CHUNK_FIELDS = (
    pa.field("chunk_seq", pa.int32(), nullable=False),
    pa.field("chunk_start", pa.int64(), nullable=False),
    pa.field("chunk_core_start", pa.int64(), nullable=False),
    pa.field("chunk_end", pa.int64(), nullable=False),
    pa.field("chunk_text", pa.string(), nullable=False),
    pa.field("chunk_hash", pa.string(), nullable=False),
)
RESERVED_COLUMNS = frozenset(LINEAGE_COLUMNS) | frozenset(CHUNK_COLUMNS)
# Names that reading a table adds to its rows, so no stored column may take them: search's
# scores (``similarity``; ``rerank_score`` of a reranked search), LanceDB's scores
# (``_distance`` of a vector search, ``_score`` of a full-text search, ``_relevance_score`` of a
# reranked hybrid search) and Lance's row system columns. A carry column named so would make the
# table unsearchable ("Duplicate column name") or be silently replaced by the score in search
# results.
SEARCH_OUTPUT_COLUMNS = (
    "similarity",
    "rerank_score",
    "_distance",
    "_score",
    "_relevance_score",
    "_rowid",
    "_rowaddr",
    "_rowoffset",
    "_row_created_at_version",
    "_row_last_updated_at_version",
)
# Working columns of the engine (never stored, never a user's name).
INTERNAL_PREFIX = "__qwen3_"
TEXT_COLUMN = f"{INTERNAL_PREFIX}text"
STATUS_COLUMN = f"{INTERNAL_PREFIX}status"
MOVED_COLUMN = f"{INTERNAL_PREFIX}moved"
META_SPEC = "qwen3_pipeline.spec"
META_FINGERPRINT = "qwen3_pipeline.fingerprint"
META_PACKAGE_VERSION = "qwen3_pipeline.package_version"
META_SOURCE_KEY = "qwen3_pipeline.source_key"
META_CHUNKING = "qwen3_pipeline.chunking"
REBUILD_MARKER = "__rebuild_"
# The columns VectorStore.existing_state always returns (carry-along columns follow).
STATE_COLUMNS = ("key", "content_hash", "spec_fingerprint", "partition_key", "source_updated_at")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)


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


def local_database(uri: str) -> Path | None:
    """The directory a database URI names, or None for an object-store or other ``scheme://``.

    Example:
        >>> local_database("s3://bucket/db") is None, local_database("data/lancedb").name
        (True, 'lancedb')
    """
    return None if "://" in uri else Path(uri).expanduser()


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


def chunk_key(doc_key: object, seq: int) -> str:
    """The primary key of chunk ``seq`` of document ``doc_key``: ``"<doc_key>#<seq>"``.

    Unique even when document keys contain ``#``: the sequence number follows the last one.

    Example:
        >>> chunk_key(42, 0), chunk_key("a#b", 3)
        ('42#0', 'a#b#3')
    """
    return f"{doc_key}#{seq}"


def table_schema(
    spec: EmbeddingSpec,
    *,
    key_type: pa.DataType | str,
    carry_schema: pa.Schema | None = None,
    source_key: str = "key",
) -> pa.Schema:
    """Return the Arrow schema of a vector table for ``spec`` (lineage columns, then carry).

    With ``spec.chunking`` set the table holds one row per chunk: ``key`` is a string chunk id,
    the document key (of ``key_type``) is ``doc_key``, and the chunk columns
    (:data:`CHUNK_COLUMNS`) come before the carry columns.

    Raises:
        ConfigError: A carry column takes a lineage column's name.
        InputDataError: The key type is neither integer nor string.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> table_schema(spec, key_type=pa.int64()).field("vector").type.list_size
        64
    """
    carry = list(carry_schema or [])
    check_carry_names([f.name for f in carry])
    chunked = spec.chunking is not None
    doc_key_type = normalize_key_type(key_type)
    fields = [
        pa.field("key", pa.string() if chunked else doc_key_type, nullable=False),
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
        *(_chunk_fields(doc_key_type) if chunked else []),
        *(f.with_nullable(True) for f in carry),
    ]
    meta = {
        META_SPEC: spec.to_json(),
        META_FINGERPRINT: spec.fingerprint,
        META_PACKAGE_VERSION: package_version(),
        META_SOURCE_KEY: source_key,
        **({META_CHUNKING: spec.chunking} if chunked and spec.chunking else {}),
    }
    return pa.schema(fields, metadata=meta)


def _chunk_fields(doc_key_type: pa.DataType) -> list[pa.Field]:
    return [pa.field(DOC_KEY_COLUMN, doc_key_type, nullable=False), *CHUNK_FIELDS]


def is_chunk_schema(schema: pa.Schema) -> bool:
    """Whether ``schema`` is a table of document chunks (its metadata records the chunking).

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> is_chunk_schema(table_schema(spec, key_type="int64"))
        False
        >>> is_chunk_schema(table_schema(spec.with_chunking('{"tokens":256}'), key_type="int64"))
        True
    """
    return META_CHUNKING.encode() in (schema.metadata or {})


def check_carry_names(names: "tuple[str, ...] | list[str]") -> None:
    """Refuse carry-along names that are lineage columns, search outputs or the engine's.

    Lineage and chunk columns (:data:`RESERVED_COLUMNS`) are stored by the engine; the names
    reading a table adds to its rows (:data:`SEARCH_OUTPUT_COLUMNS`: ``similarity``,
    ``_distance``...) would break search or be replaced in its results; names starting with
    :data:`INTERNAL_PREFIX` are the engine's working columns.

    Raises:
        ConfigError: A name is reserved (the message lists which and why).

    Example:
        >>> check_carry_names(["title", "status", "text"])  # any non-lineage name works
    """
    reserved = sorted(set(names) & RESERVED_COLUMNS)
    if reserved:
        raise ConfigError(
            f"carry column(s) {reserved} clash with the vector table's lineage or chunk "
            f"columns {sorted(RESERVED_COLUMNS)}; rename them in the source (e.g. in the dbt "
            "model)"
        )
    outputs = sorted(set(names) & set(SEARCH_OUTPUT_COLUMNS))
    if outputs:
        raise ConfigError(
            f"carry column(s) {outputs} take names that search adds to its results "
            f"{list(SEARCH_OUTPUT_COLUMNS)} (a stored '_distance' makes the table unsearchable, "
            "a stored 'similarity' would be replaced by the score); rename them in the source "
            "(e.g. in the dbt model)"
        )
    internal = sorted(n for n in names if n.startswith(INTERNAL_PREFIX))
    if internal:
        raise ConfigError(
            f"carry column(s) {internal} start with {INTERNAL_PREFIX!r}, which is reserved for "
            "the engine's working columns; rename them in the source"
        )
