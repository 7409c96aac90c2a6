"""Data-quality checks of a vector table against its source: plain functions, no orchestrator.

Each check reads the LanceDB table (never the whole vector column, except for the rows it is
asked to verify) and, where it needs to, the source scope, and returns a :class:`CheckOutcome`:
passed or not, a one-line description, and JSON-ready metadata naming the offending keys.

- :func:`check_unique_keys`: no key is stored twice (whole table).
- :func:`check_coverage`: the stored keys of the scope are exactly the source's non-blank keys.
- :func:`check_not_stale`: every stored row of the scope has the source's content hash and
  partition.
- :func:`check_single_spec`: every row, and the table metadata, carry one spec fingerprint.
- :func:`check_unit_vectors`: the rows a refresh wrote (plus a sample of the scope) are finite
  and unit-norm.
- :func:`check_chunks_consistent` (tables of document chunks only): each document's chunks
  are one cut of one version of it.

On a table of document chunks (one row per chunk) coverage and staleness are judged per
document (``doc_key``): coverage compares the stored documents with the source's non-blank
documents (each must have at least one chunk), and every chunk must carry its document's
current content hash and partition. The other checks apply to each chunk row as to any row.

:func:`run_checks` runs them all (:func:`check_names` says which apply to a table) over one
read of the source scope and of the stored state; the Dagster embedding asset calls it in the
same step as the refresh, and other orchestrators can call it the same way.

Example:
    >>> import lancedb  # doctest: +SKIP
    >>> table = lancedb.connect("data/lancedb").open_table("documents")  # doctest: +SKIP
    >>> report = run_checks(table=table, source=source, config=config,  # doctest: +SKIP
    ...                     fingerprint=spec.fingerprint, normalize=True)
    >>> [(o.name, o.passed) for o in report.outcomes]  # doctest: +SKIP
    [('unique_keys', True), ('covers_source', True), ...]
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwen3_pipeline.core.changes import blank_mask, content_hashes
from qwen3_pipeline.core.schema import (
    DOC_KEY_COLUMN,
    META_FINGERPRINT,
    TEXT_COLUMN,
    is_chunk_schema,
)
from qwen3_pipeline.sources import (
    Source,
    SourceConfig,
    read_batches,
    scope_partition_keys,
)

UNIQUE_KEYS = "unique_keys"
COVERS_SOURCE = "covers_source"
NOT_STALE = "not_stale"
SINGLE_SPEC = "single_spec"
UNIT_VECTORS = "unit_vectors"
CHUNKS_CONSISTENT = "chunks_consistent"
NO_QUARANTINED_ROWS = "no_quarantined_rows"
"""A warning-level check run beside :func:`run_checks` (:func:`check_no_quarantined_rows`)."""
# The checks of a table of whole documents; a table of document chunks has one more.
CHECK_NAMES = (UNIQUE_KEYS, COVERS_SOURCE, NOT_STALE, SINGLE_SPEC, UNIT_VECTORS)
CHUNK_CHECK_NAMES = (*CHECK_NAMES, CHUNKS_CONSISTENT)
CHECK_DESCRIPTIONS = {
    UNIQUE_KEYS: "No key is stored twice in the vector table.",
    COVERS_SOURCE: (
        "The stored keys (documents, in a table of chunks) of the refreshed partitions are "
        "exactly the source's keys with non-blank text (nothing missing, nothing extra)."
    ),
    NOT_STALE: (
        "Every stored row (chunk) of the refreshed partitions has the content hash and "
        "partition of its source row."
    ),
    SINGLE_SPEC: "Every row and the table metadata carry the configured spec fingerprint.",
    UNIT_VECTORS: (
        "The vectors written by the run (plus a sample of the refreshed partitions) are "
        "finite and unit-norm."
    ),
    CHUNKS_CONSISTENT: (
        "Each stored document's chunks carry one content hash, are numbered 0..n-1 without "
        "gaps or repeats, and have the keys '<doc_key>#<chunk_seq>'."
    ),
}
DEFAULT_SAMPLE_ROWS = 1_000
DEFAULT_NORM_TOLERANCE = 1e-3
_SHOWN = 10
_SCAN_BATCH = 65_536


@dataclass(frozen=True, kw_only=True)
class CheckOutcome:
    """The result of one check.

    Attributes:
        name: One of :data:`CHUNK_CHECK_NAMES`.
        passed: Whether the table passed.
        description: One line saying what was found.
        metadata: JSON-ready counts and up to ten offending keys.
    """

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CheckReport:
    """All outcomes of :func:`run_checks`, plus a digest of the checked stored state.

    Attributes:
        outcomes: One per check of :func:`check_names` for the table, in that order.
        state_digest: :func:`state_digest` of the stored rows of the scope (a data version).
        stored_rows: Stored rows (chunks, in a table of chunks) in the scope.
        source_rows: Source rows (documents) in the scope with non-blank text.
        rows_by_partition: Stored rows per partition key of the scope.
        stored_documents: Distinct documents stored in the scope (``stored_rows`` in a table
            of whole documents).
    """

    outcomes: list[CheckOutcome]
    state_digest: str
    stored_rows: int
    source_rows: int
    rows_by_partition: dict[str, int] = field(default_factory=dict)
    stored_documents: int = 0

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(o.passed for o in self.outcomes)


# --------------------------------------------------------------------------- reading


def _partition_filter(partition_keys: Sequence[str] | None) -> Any:
    if partition_keys is None:
        return None
    from lancedb.expr import col

    return col("partition_key").isin(list(partition_keys))


def _scan(
    table: Any, columns: list[str], where: Any = None, limit: int | None = None
) -> Iterator[pa.RecordBatch]:
    query = table.search().select(columns)
    if where is not None:
        query = query.where(where)
    if limit is not None:
        query = query.limit(limit)
    yield from query.to_batches(batch_size=_SCAN_BATCH)


def _scan_table(table: Any, columns: list[str], where: Any = None) -> pa.Table:
    schema = pa.schema([table.schema.field(c) for c in columns])
    batches = [b.select(columns) for b in _scan(table, columns, where)]
    return pa.Table.from_batches(batches, schema=schema)


def check_names(*, chunked: bool) -> tuple[str, ...]:
    """The checks :func:`run_checks` reports for a table, in order.

    Args:
        chunked: Whether the table holds document chunks (its spec has ``chunking``).

    Example:
        >>> check_names(chunked=True)[-1]
        'chunks_consistent'
    """
    return CHUNK_CHECK_NAMES if chunked else CHECK_NAMES


def stored_scope(table: Any, partition_keys: Sequence[str] | None) -> pa.Table:
    """Return ``key, content_hash, spec_fingerprint, partition_key`` of the stored scope.

    A table of document chunks adds ``doc_key`` and ``chunk_seq``, which is how the checks
    below tell its rows from whole documents.

    Args:
        table: A ``lancedb`` table written by the refresh engine.
        partition_keys: The partitions to read (``None``: the whole table).
    """
    columns = ["key", "content_hash", "spec_fingerprint", "partition_key"]
    if is_chunk_schema(table.schema):
        columns += [DOC_KEY_COLUMN, "chunk_seq"]
    if partition_keys is not None and not partition_keys:
        return pa.schema([table.schema.field(c) for c in columns]).empty_table()
    return _scan_table(table, columns, _partition_filter(partition_keys))


def source_scope(
    source: Source, config: SourceConfig, *, batch_rows: int = 50_000
) -> tuple[pa.Table, int]:
    """Read the source scope as the engine sees it: ``key, content_hash, partition_key``.

    Rows with blank text are left out (the engine stores no vector for them) and counted.

    Returns:
        The non-blank rows, and the number of blank ones.
    """
    parts: list[pa.Table] = []
    blanks = 0
    for batch in read_batches(source, config, batch_rows=batch_rows):
        texts = batch.column(TEXT_COLUMN)
        blank = blank_mask(texts)
        blanks += int(blank.sum())
        keep = pa.array(~blank)
        parts.append(
            pa.table(
                {
                    "key": batch.column("key").filter(keep),
                    "content_hash": content_hashes(texts.filter(keep)),
                    "partition_key": batch.column("partition_key").filter(keep),
                }
            )
        )
    if not parts:
        schema = pa.schema(
            [("key", pa.string()), ("content_hash", pa.string()), ("partition_key", pa.string())]
        )
        return schema.empty_table(), blanks
    return pa.concat_tables(parts), blanks


def state_digest(stored: pa.Table) -> str:
    """Return a 16-hex-digit digest of stored ``(key, content_hash, spec_fingerprint)`` rows.

    Order-independent (rows are sorted by key first); equal digests mean the same documents
    embedded with the same spec, so it serves as a data version.

    Example:
        >>> t = pa.table({"key": [2, 1], "content_hash": ["b", "a"],
        ...               "spec_fingerprint": ["f", "f"]})
        >>> state_digest(t) == state_digest(t.take([1, 0]))
        True
    """
    hasher = xxhash.xxh3_64()
    if stored.num_rows:
        ordered = stored.take(pc.sort_indices(stored, sort_keys=[("key", "ascending")]))
        rows = pc.binary_join_element_wise(
            ordered.column("key").cast(pa.string()),
            ordered.column("content_hash"),
            ordered.column("spec_fingerprint"),
            "\x1f",
        )
        hasher.update("\x1e".join(rows.to_pylist()).encode("utf-8"))
    return hasher.hexdigest()


# --------------------------------------------------------------------------- checks


def _shown(values: pa.Array | pa.ChunkedArray) -> list[Any]:
    return values.slice(0, _SHOWN).to_pylist()


def check_unique_keys(table: Any) -> CheckOutcome:
    """Check that no key is stored twice anywhere in the table."""
    keys = _scan_table(table, ["key"]).column("key")
    rows = len(keys)
    distinct = pc.count_distinct(keys).as_py() if rows else 0
    if distinct == rows:
        return CheckOutcome(
            name=UNIQUE_KEYS,
            passed=True,
            description=f"{rows} rows, all keys distinct",
            metadata={"rows": rows},
        )
    counts = pc.value_counts(keys)
    repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
    return CheckOutcome(
        name=UNIQUE_KEYS,
        passed=False,
        description=(
            f"{len(repeated)} key(s) are stored more than once (e.g. {repeated[:3]}); "
            "rebuild the table (rebuild=True / --rebuild)"
        ),
        metadata={"rows": rows, "distinct_keys": distinct, "repeated_keys": repeated[:_SHOWN]},
    )


def _is_chunks(stored_rows: pa.Table) -> bool:
    return DOC_KEY_COLUMN in stored_rows.column_names


def _joined(source_rows: pa.Table, stored_rows: pa.Table) -> pa.Table:
    """Source rows full-outer-joined with the stored rows (chunks) by (document) key."""
    if _is_chunks(stored_rows):
        # One joined row per chunk, matched to its document's source row.
        stored_rows = stored_rows.set_column(
            stored_rows.schema.get_field_index("key"), "key", stored_rows.column(DOC_KEY_COLUMN)
        )
    left = source_rows.select(["key", "content_hash", "partition_key"]).rename_columns(
        ["key", "source_hash", "source_partition"]
    )
    right = stored_rows.select(["key", "content_hash", "partition_key"]).rename_columns(
        ["key", "stored_hash", "stored_partition"]
    )
    right = right.append_column("stored", pa.array(np.ones(right.num_rows, dtype=bool)))
    left = left.append_column("in_source", pa.array(np.ones(left.num_rows, dtype=bool)))
    if left.schema.field("key").type != right.schema.field("key").type:
        left = left.set_column(0, "key", left.column("key").cast(right.schema.field("key").type))
    return left.join(right, keys="key", join_type="full outer")


def check_coverage(
    source_rows: pa.Table,
    stored_rows: pa.Table,
    *,
    failures: Sequence[tuple[str, str]] = (),
    recorded: pa.Table | None = None,
) -> CheckOutcome:
    """Check that the stored keys of a scope are exactly the source's non-blank keys.

    On a table of document chunks the stored documents (``doc_key``) are compared instead:
    every non-blank source document has at least one chunk, and no chunk belongs to a
    document the source does not have; the counts and keys in the outcome are documents.

    Args:
        source_rows: :func:`source_scope` of the scope.
        stored_rows: :func:`stored_scope` of the same scope.
        failures: ``(key, reason)`` of rows the refresh could not embed, quoted in the
            description when they explain missing keys.
        recorded: Source keys (as text) whose current text has a failure record
            (:func:`recorded_failures`): accounted for by the failure log, so not missing.
    """
    chunked = _is_chunks(stored_rows)
    joined = _joined(source_rows, stored_rows)
    missing = joined.filter(pc.is_null(joined.column("stored"))).column("key")
    missing, excused = _split_recorded(missing, recorded)
    extra = joined.filter(pc.is_null(joined.column("in_source"))).column("key")
    if chunked:
        extra = pc.unique(extra)  # one per document, not per chunk
    metadata: dict[str, Any] = {
        "source_rows": source_rows.num_rows,
        "stored_rows": stored_rows.num_rows,
        "missing": len(missing),
        "extra": len(extra),
        "missing_keys": _shown(missing),
        "extra_keys": _shown(extra),
        "recorded_failures": len(excused),
    }
    if chunked:
        metadata["stored_documents"] = _document_count(stored_rows)
    if not len(missing) and not len(extra):
        found = (
            f"documents have chunks ({stored_rows.num_rows} chunks)"
            if chunked
            else "rows are stored"
        )
        recorded_note = (
            f" ({len(excused)} without a vector have a failure record: see "
            "no_quarantined_rows and `qwen3-pipeline failures`)"
            if len(excused)
            else ""
        )
        covered = source_rows.num_rows - len(excused)
        return CheckOutcome(
            name=COVERS_SOURCE,
            passed=True,
            description=f"all {covered} source {found}, nothing extra{recorded_note}",
            metadata=metadata,
        )
    why = ""
    if failures:
        metadata["failures"] = [list(f) for f in failures[:_SHOWN]]
        why = (
            f"; {len(failures)} row(s) failed to embed (e.g. {failures[0][0]!r}: {failures[0][1]})"
        )
    return CheckOutcome(
        name=COVERS_SOURCE,
        passed=False,
        description=(
            f"{len(missing)} source document(s) have no chunk and {len(extra)} stored "
            f"document(s) are not in the source{why}"
            if chunked
            else f"{len(missing)} source row(s) have no vector and {len(extra)} stored row(s) "
            f"are not in the source{why}"
        ),
        metadata=metadata,
    )


def recorded_failures(source_rows: pa.Table, records: pa.Table | None) -> pa.Table:
    """The source rows whose *current* text has a failure record: one column ``key`` (text).

    A record for an older text no longer explains anything (the row changed since).
    """
    empty = pa.table({"key": pa.array([], pa.string())})
    if records is None or not records.num_rows or not source_rows.num_rows:
        return empty
    current = pa.table(
        {
            "key": source_rows.column("key").cast(pa.string()),
            "content_hash": source_rows.column("content_hash"),
        }
    )
    failed = records.select(["doc_key", "content_hash"]).rename_columns(["key", "content_hash"])
    return current.join(failed, keys=["key", "content_hash"], join_type="inner").select(["key"])


def _split_recorded(
    keys: pa.Array | pa.ChunkedArray, recorded: pa.Table | None
) -> tuple[pa.Array | pa.ChunkedArray, pa.Array | pa.ChunkedArray]:
    """``keys`` split into (without a failure record, with one)."""
    if recorded is None or not recorded.num_rows or not len(keys):
        return keys, pa.array([], pa.string())
    has = pc.is_in(keys.cast(pa.string()), value_set=recorded["key"])
    return keys.filter(pc.invert(has)), keys.filter(has)


def check_no_quarantined_rows(
    records: pa.Table, partition_keys: Sequence[str] | None = None
) -> CheckOutcome:
    """Check that no row of the scope is quarantined (the model failed it ``max_attempts`` times).

    Meant as a warning: quarantined rows keep their old vector (or have none) until their
    text changes or they are replayed; the metadata names a sample of them and their errors.

    Args:
        records: The table's failure records (``FailureLog.read()``).
        partition_keys: The scope (None: the whole table).
    """
    rows = records
    if partition_keys is not None and rows.num_rows:
        rows = rows.filter(
            pc.is_in(rows["partition_key"], value_set=pa.array(list(partition_keys)))
        )
    quarantined = rows.filter(pc.equal(rows["status"], "quarantined")) if rows.num_rows else rows
    retrying = rows.num_rows - quarantined.num_rows
    sample = [
        {"key": r["doc_key"], "step": r["step"], "error": f"{r['error_type']}: {r['message']}"}
        for r in quarantined.slice(0, _SHOWN).to_pylist()
    ]
    metadata = {"quarantined": quarantined.num_rows, "retrying": retrying, "sample": sample}
    if not quarantined.num_rows:
        return CheckOutcome(
            name=NO_QUARANTINED_ROWS,
            passed=True,
            description=f"no quarantined rows ({retrying} failed row(s) still being retried)",
            metadata=metadata,
        )
    return CheckOutcome(
        name=NO_QUARANTINED_ROWS,
        passed=False,
        description=(
            f"{quarantined.num_rows} row(s) quarantined after repeated failures (e.g. "
            f"{sample[0]['key']!r}: {sample[0]['error']}); fix their text or the model, then "
            "replay them (`qwen3-pipeline replay`, or the `replay` run config)"
        ),
        metadata=metadata,
    )


def check_not_stale(
    source_rows: pa.Table, stored_rows: pa.Table, *, recorded: pa.Table | None = None
) -> CheckOutcome:
    """Check that every stored row of a scope matches its source row's hash and partition.

    On a table of document chunks every chunk is compared with its document's source row;
    the counts are chunks and the keys shown are documents (``doc_key``). A row whose new
    text has a failure record (``recorded``) keeps its old vector on purpose: not stale.
    """
    chunked = _is_chunks(stored_rows)
    joined = _joined(source_rows, stored_rows)
    both = joined.filter(
        pc.and_(pc.is_valid(joined.column("stored")), pc.is_valid(joined.column("in_source")))
    )
    stale = both.filter(pc.not_equal(both.column("source_hash"), both.column("stored_hash")))
    if recorded is not None and recorded.num_rows and stale.num_rows:
        keep = pc.invert(pc.is_in(stale.column("key").cast(pa.string()), value_set=recorded["key"]))
        stale = stale.filter(keep)
    misplaced = both.filter(
        pc.not_equal(both.column("source_partition"), both.column("stored_partition"))
    )
    stale_keys, misplaced_keys = stale.column("key"), misplaced.column("key")
    if chunked:
        stale_keys, misplaced_keys = pc.unique(stale_keys), pc.unique(misplaced_keys)
    metadata = {
        "compared_rows": both.num_rows,
        "stale": stale.num_rows,
        "misplaced": misplaced.num_rows,
        "stale_keys": _shown(stale_keys),
        "misplaced_keys": _shown(misplaced_keys),
    }
    if not stale.num_rows and not misplaced.num_rows:
        return CheckOutcome(
            name=NOT_STALE,
            passed=True,
            description=f"all {both.num_rows} stored rows match their source rows",
            metadata=metadata,
        )
    return CheckOutcome(
        name=NOT_STALE,
        passed=False,
        description=(
            f"{stale.num_rows} stored row(s) have an outdated content hash and "
            f"{misplaced.num_rows} sit in the wrong partition; refresh those partitions"
        ),
        metadata=metadata,
    )


def _document_count(stored_rows: pa.Table) -> int:
    if not stored_rows.num_rows:
        return 0
    return int(pc.count_distinct(stored_rows.column(DOC_KEY_COLUMN)).as_py())


def check_chunks_consistent(stored_rows: pa.Table) -> CheckOutcome:
    """Check that each stored document's chunks are one cut of one version of the document.

    Per ``doc_key``: one ``content_hash`` on all its chunks, ``chunk_seq`` ``0..n-1`` each
    exactly once, and every chunk's key is ``chunk_key(doc_key, chunk_seq)``. The engine
    writes all chunks of a document in one commit, so a failure means a write outside the
    pipeline or a bug: chunks of two versions side by side would both be found by a search.

    Args:
        stored_rows: :func:`stored_scope` of a table of chunks (``key``, ``content_hash``,
            ``doc_key``, ``chunk_seq``).
    """
    docs = stored_rows.group_by(DOC_KEY_COLUMN, use_threads=False).aggregate(
        [
            ("content_hash", "count_distinct", pc.CountOptions(mode="all")),
            ("chunk_seq", "count"),
            ("chunk_seq", "count_distinct"),
            ("chunk_seq", "min"),
            ("chunk_seq", "max"),
        ]
    )
    n = docs.column("chunk_seq_count")
    mixed = docs.filter(pc.greater(docs.column("content_hash_count_distinct"), 1))
    contiguous = pc.and_(
        pc.and_(
            pc.equal(docs.column("chunk_seq_min"), 0),
            pc.equal(docs.column("chunk_seq_max"), pc.subtract(n, 1)),
        ),
        pc.equal(docs.column("chunk_seq_count_distinct"), n),
    )
    gaps = docs.filter(pc.invert(contiguous))
    expected = pc.binary_join_element_wise(
        stored_rows.column(DOC_KEY_COLUMN).cast(pa.string()),
        stored_rows.column("chunk_seq").cast(pa.string()),
        "#",
    )
    wrong = stored_rows.filter(pc.not_equal(stored_rows.column("key"), expected))
    metadata = {
        "documents": docs.num_rows,
        "chunks": stored_rows.num_rows,
        "mixed_versions": mixed.num_rows,
        "broken_sequences": gaps.num_rows,
        "wrong_keys": wrong.num_rows,
        "mixed_version_documents": _shown(mixed.column(DOC_KEY_COLUMN)),
        "broken_sequence_documents": _shown(gaps.column(DOC_KEY_COLUMN)),
        "wrong_chunk_keys": _shown(wrong.column("key")),
    }
    if not mixed.num_rows and not gaps.num_rows and not wrong.num_rows:
        return CheckOutcome(
            name=CHUNKS_CONSISTENT,
            passed=True,
            description=(
                f"{stored_rows.num_rows} chunks of {docs.num_rows} documents, each document "
                "one version numbered 0..n-1"
            ),
            metadata=metadata,
        )
    return CheckOutcome(
        name=CHUNKS_CONSISTENT,
        passed=False,
        description=(
            f"{mixed.num_rows} document(s) mix chunks of different versions (e.g. "
            f"{metadata['mixed_version_documents'][:3]}), {gaps.num_rows} have missing or "
            f"repeated chunk numbers (e.g. {metadata['broken_sequence_documents'][:3]}) and "
            f"{wrong.num_rows} chunk key(s) are not '<doc_key>#<chunk_seq>'; refresh the "
            "affected partitions, or rebuild the table (rebuild=True / --rebuild)"
        ),
        metadata=metadata,
    )


def check_single_spec(table: Any, fingerprint: str) -> CheckOutcome:
    """Check that every row and the table metadata carry the spec ``fingerprint``."""
    values = _scan_table(table, ["spec_fingerprint"]).column("spec_fingerprint")
    counts = {
        str(v["values"]): int(v["counts"])
        for v in (pc.value_counts(values).to_pylist() if len(values) else [])
    }
    recorded_raw = (table.schema.metadata or {}).get(META_FINGERPRINT.encode())
    recorded = recorded_raw.decode() if recorded_raw is not None else None
    others = {k: n for k, n in counts.items() if k != fingerprint}
    metadata = {"expected": fingerprint, "recorded": recorded, "rows_by_fingerprint": counts}
    if not others and recorded == fingerprint:
        return CheckOutcome(
            name=SINGLE_SPEC,
            passed=True,
            description=f"{len(values)} rows, all with spec {fingerprint}",
            metadata=metadata,
        )
    return CheckOutcome(
        name=SINGLE_SPEC,
        passed=False,
        description=(
            f"{sum(others.values())} row(s) carry another spec fingerprint "
            f"({sorted(others)}) and the table records {recorded!r}; expected {fingerprint}. "
            "Rebuild the table (rebuild=True / --rebuild)"
        ),
        metadata=metadata,
    )


def check_unit_vectors(
    table: Any,
    *,
    run_id: str | None = None,
    partition_keys: Sequence[str] | None = None,
    normalize: bool = True,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    tolerance: float = DEFAULT_NORM_TOLERANCE,
) -> CheckOutcome:
    """Check that vectors are finite and (when the spec normalises) unit-norm.

    Reading every vector of a large table would cost more than the refresh, so the check reads
    the rows written by ``run_id`` (what the refresh just embedded) plus the first
    ``sample_rows`` rows of the scope.

    Args:
        table: The ``lancedb`` table.
        run_id: Lineage id of the refresh whose rows are all checked (None: sample only).
        partition_keys: The scope sampled (``None``: the whole table).
        normalize: Whether vectors must be unit-norm (the spec's ``normalize``).
        sample_rows: Rows of the scope checked besides the run's own.
        tolerance: Largest accepted ``| ||v|| - 1 |``.
    """
    from lancedb.expr import col

    scope = _partition_filter(partition_keys)
    if partition_keys is not None and not partition_keys:
        scans: list[Iterator[pa.RecordBatch]] = []
    else:
        scans = []
        sample_where = scope
        if run_id is not None:
            scans.append(_scan(table, ["key", "vector"], col("run_id") == run_id))
            older = col("run_id") != run_id
            sample_where = older if scope is None else scope & older
        if sample_rows:
            scans.append(_scan(table, ["key", "vector"], sample_where, limit=sample_rows))
    checked, bad = 0, 0
    bad_keys: list[Any] = []
    worst = 0.0
    for scan in scans:
        for batch in scan:
            if not batch.num_rows:
                continue
            vectors = batch.column("vector")
            dim = vectors.type.list_size
            matrix = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), np.float32)
            matrix = matrix.reshape(-1, dim)
            finite = np.asarray(np.isfinite(matrix).all(axis=1), dtype=bool)
            norms = np.linalg.norm(np.where(finite[:, None], matrix, 0.0), axis=1)
            off = np.abs(norms - 1.0) if normalize else np.zeros(len(norms))
            wrong = ~finite | (off > tolerance)
            if finite.any():
                worst = max(worst, float(off[finite].max()))
            checked += batch.num_rows
            bad += int(wrong.sum())
            if wrong.any() and len(bad_keys) < _SHOWN:
                bad_keys += batch.column("key").filter(pa.array(wrong)).to_pylist()
    metadata = {
        "checked_rows": checked,
        "bad_rows": bad,
        "bad_keys": bad_keys[:_SHOWN],
        "max_norm_deviation": round(worst, 9),
        "tolerance": tolerance,
    }
    what = "finite and unit-norm" if normalize else "finite"
    if not bad:
        return CheckOutcome(
            name=UNIT_VECTORS,
            passed=True,
            description=f"{checked} checked vectors are {what}",
            metadata=metadata,
        )
    return CheckOutcome(
        name=UNIT_VECTORS,
        passed=False,
        description=f"{bad} of {checked} checked vectors are not {what} (e.g. {bad_keys[:3]})",
        metadata=metadata,
    )


def run_checks(
    *,
    table: Any,
    source: Source,
    config: SourceConfig,
    fingerprint: str,
    normalize: bool = True,
    run_id: str | None = None,
    failures: Sequence[tuple[str, str]] = (),
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    failure_records: pa.Table | None = None,
) -> CheckReport:
    """Run every check over the scope of ``config.partition``.

    The source scope and the stored scope are each read once and shared by the checks that
    compare them. A table of document chunks (told by its schema metadata) is checked per
    document where that is what matters, and gets :func:`check_chunks_consistent` too: the
    outcomes are those of :func:`check_names` for the table, in order.

    Args:
        table: The ``lancedb`` table (at the version to check).
        source: The source the table mirrors.
        config: Source settings; ``config.partition`` is the scope.
        fingerprint: The configured spec fingerprint.
        normalize: Whether the spec normalises vectors.
        run_id: Lineage id of the refresh just made (its vectors are all checked).
        failures: Rows the refresh could not embed (quoted by the coverage check).
        sample_rows: Extra vectors of the scope checked for finiteness and norm.
        failure_records: The table's failure records (``FailureLog.read()``): rows whose
            current text failed are accounted for, not missing or stale.

    Returns:
        The outcomes and a digest of the stored scope.
    """
    partition_keys = scope_partition_keys(config.partition)
    source_rows, _ = source_scope(source, config)
    stored_rows = stored_scope(table, partition_keys)
    chunked = _is_chunks(stored_rows)
    recorded = recorded_failures(source_rows, failure_records)
    outcomes = [
        check_unique_keys(table),
        check_coverage(source_rows, stored_rows, failures=failures, recorded=recorded),
        check_not_stale(source_rows, stored_rows, recorded=recorded),
        check_single_spec(table, fingerprint),
        check_unit_vectors(
            table,
            run_id=run_id,
            partition_keys=partition_keys,
            normalize=normalize,
            sample_rows=sample_rows,
        ),
    ]
    if chunked:
        outcomes.append(check_chunks_consistent(stored_rows))
    partitions = stored_rows.column("partition_key")
    return CheckReport(
        outcomes=outcomes,
        state_digest=state_digest(stored_rows),
        stored_rows=stored_rows.num_rows,
        source_rows=source_rows.num_rows,
        rows_by_partition={
            str(v["values"]): int(v["counts"])
            for v in (pc.value_counts(partitions).to_pylist() if len(partitions) else [])
        },
        stored_documents=_document_count(stored_rows) if chunked else stored_rows.num_rows,
    )
