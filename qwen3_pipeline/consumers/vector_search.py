"""Reading the vectors downstream: pinned tables, search, ANN index upkeep, near duplicates.

Orchestrator-neutral; the Dagster consumer assets (:mod:`qwen3_pipeline.dagster.consumer_assets`)
are thin wrappers, and :func:`qwen3_pipeline.dagster.vectors.open_vectors` finds the version
to pin from the latest Dagster materialisation.

- :func:`open_vector_table` opens a vector table at its newest checked version (or a pinned
  one), with the :class:`~qwen3_pipeline.core.spec.EmbeddingSpec` its vectors were made with; see
  :func:`~qwen3_pipeline.store.versions.resolve_read_version`.
- :func:`search` embeds a query with the matching query encoder (same model, dim and
  fingerprint; the query instruction of the recorded spec) and returns the nearest rows; on a
  table of document chunks, the nearest documents (each with its best chunk), or with
  ``chunks=True`` the nearest chunks. With ``rerank=`` (a
  :class:`~qwen3_pipeline.embedding.reranker.Qwen3Reranker`) it is two-stage: the nearest
  ``candidates`` are scored by the reranker and the best ``k`` by its score returned;
  :func:`rerank_plan` checks those options before any model loads.
- :func:`maintain_vector_index` keeps an ANN index on the vectors: none below a row threshold
  (exact search is fast there), created once the table passes it, then
  :func:`~qwen3_pipeline.store.upkeep.optimize_table` to fold new rows into it after refreshes
  (tagged versions are never pruned).
- :func:`near_duplicate_pairs` finds pairs of rows whose vectors are nearly identical.

Example:
    >>> vectors = open_vector_table("data/lancedb", "documents", version=12)  # doctest: +SKIP
    >>> search(vectors, "how do I parse JSON?", k=3).column("key").to_pylist()  # doctest: +SKIP
    ['json:loads', 'json:', 'json.decoder:JSONDecoder.decode']
"""

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError, SpecMismatchError
from qwen3_pipeline.core.schema import (
    DOC_KEY_COLUMN,
    META_SPEC,
    RESERVED_COLUMNS,
    SEARCH_OUTPUT_COLUMNS,
    validate_table_name,
    validate_uri,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import Embedder
from qwen3_pipeline.embedding.reranker import Reranker
from qwen3_pipeline.store import checked_versions, resolve_read_version, store_error
from qwen3_pipeline.store.upkeep import fragment_count, optimize_table

logger = logging.getLogger(__name__)

VECTOR_COLUMN = "vector"
DistanceType = Literal["cosine", "dot", "l2"]
IndexAction = Literal["brute_force", "compacted", "created", "optimized", "up_to_date"]
# Result columns of search(): the key, the carry-along columns and these lineage columns.
_SEARCH_LINEAGE = ("partition_key", "source_updated_at", "embedded_at")
# On a chunk table, also which chunk matched: where it sits in the document, and its text.
_SEARCH_CHUNK = ("chunk_seq", "chunk_start", "chunk_end", "chunk_text")
# A document search first fetches this many nearest chunks per wanted document, and doubles
# the fetch while fewer than k distinct documents come back (long documents crowd the top).
_CHUNK_OVERFETCH = 4
# A reranked search scores this many vector candidates unless told otherwise (at least k).
DEFAULT_RERANK_CANDIDATES = 50
# The reranker's score in a reranked search's results (beside the vector stage's similarity).
RERANK_SCORE_COLUMN = "rerank_score"


# --------------------------------------------------------------------------- pinned tables


class VectorTable:
    """A LanceDB vector table opened at one version, with the spec of its vectors.

    Build it with :func:`open_vector_table` (or, from Dagster materialisations,
    :func:`qwen3_pipeline.dagster.vectors.open_vectors`).

    Attributes:
        table: The ``lancedb`` table, checked out at :attr:`version`.
        uri: Database URI.
        name: Table name.
        version: The Lance version read.
        spec: The embedding spec recorded in the table's metadata.
        checked: Whether :attr:`version` is tagged checked (every check passed on it).
        chunked: Whether the table holds document chunks (one row per chunk, ``spec.chunking``
            set) rather than one row per document.
    """

    def __init__(
        self,
        *,
        table: Any,
        uri: str,
        name: str,
        version: int,
        spec: EmbeddingSpec,
        checked: bool = False,
    ):
        self.table = table
        self.uri = uri
        self.name = name
        self.version = version
        self.spec = spec
        self.checked = checked
        self.chunked = spec.chunking is not None
        self._query_embedder: Embedder | None = None

    def __repr__(self) -> str:
        return (
            f"VectorTable(uri={self.uri!r}, name={self.name!r}, version={self.version}, "
            f"checked={self.checked}, model={self.spec.model!r}, dim={self.spec.dim})"
        )

    @property
    def carry_columns(self) -> list[str]:
        """The carry-along columns stored beside the vectors (title, url...).

        A column named like a search output (a table written before such names were refused,
        see :data:`~qwen3_pipeline.core.schema.SEARCH_OUTPUT_COLUMNS`) is left out: search
        results never hold it, so its value is never mistaken for the score.
        """
        return [
            f.name
            for f in self.table.schema
            if f.name not in RESERVED_COLUMNS and f.name not in SEARCH_OUTPUT_COLUMNS
        ]

    def query_embedder(self, **encoder_options: Any) -> Embedder:
        """Return (building once) a Qwen3 encoder for this table's spec, for queries.

        Args:
            **encoder_options: Passed to :class:`qwen3_pipeline.embedding.encoder.Qwen3Encoder`
                (``device``, ``dtype``...).
        """
        if self._query_embedder is None:
            from qwen3_pipeline.embedding.encoder import Qwen3Encoder

            self._query_embedder = Qwen3Encoder(self.spec, progress=False, **encoder_options)
        return self._query_embedder

    def count_rows(self) -> int:
        """Rows at this version."""
        return int(self.table.count_rows())


def recorded_spec(table: Any) -> EmbeddingSpec:
    """Return the :class:`EmbeddingSpec` recorded in a vector table's schema metadata.

    Raises:
        SpecMismatchError: The table has no recorded spec (not written by qwen3_pipeline).
    """
    raw = (table.schema.metadata or {}).get(META_SPEC.encode())
    if raw is None:
        raise SpecMismatchError(
            "this table has no recorded embedding spec; it was not written by qwen3_pipeline"
        )
    return EmbeddingSpec.from_json(raw.decode())


def open_vector_table(
    uri: str,
    table: str,
    *,
    version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> VectorTable:
    """Open a vector table at ``version`` when given, else at its newest checked version.

    The table is always checked out at one version, so a reader sees the same rows even while
    the next refresh writes. By default that is the newest version tagged checked (every check
    of the embedding asset passed on it): a version whose checks failed is never served while
    an older checked one exists. A table without any checked version (written by the CLI or the
    Python API, which run no checks) is read at its latest version, with a warning.

    Args:
        uri: Database directory or URI.
        table: Table name.
        version: Lance version to read (an explicit pin, checked or not); None reads the
            newest checked version (see :func:`~qwen3_pipeline.store.resolve_read_version`).
        storage_options: Object-store options.

    Raises:
        ConfigError: The table or version does not exist.
        SpecMismatchError: The table was not written by qwen3_pipeline.
    """
    import lancedb

    validate_uri(uri)
    validate_table_name(table)
    db = lancedb.connect(uri, storage_options=storage_options)
    try:
        opened = db.open_table(table)
        version = resolve_read_version(opened, version)
        opened.checkout(version)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise ConfigError(
            f"cannot open vector table {table!r} at {uri!r} (version {version}): {e}"
        ) from e
    return VectorTable(
        table=opened,
        uri=uri,
        name=table,
        version=int(opened.version),
        spec=recorded_spec(opened),
        checked=int(opened.version) in checked_versions(opened),
    )


def search(
    vectors: VectorTable,
    query: str,
    *,
    k: int = 10,
    embedder: Embedder | None = None,
    where: Any = None,
    columns: list[str] | None = None,
    chunks: bool = False,
    rerank: Reranker | None = None,
    candidates: int | None = None,
    text_column: str | None = None,
    rerank_instruction: str | None = None,
) -> pa.Table:
    """Return the ``k`` rows (or documents) nearest to ``query`` (cosine), best first.

    The query is embedded in the instruction format of the table's recorded spec, by
    ``embedder`` if given (its spec must match the table's, chunking aside: how documents were
    cut does not change how a text is embedded), else by :meth:`VectorTable.query_embedder`
    (loads the model once per table object).

    On a table of document chunks the result is ``k`` documents: each document's nearest chunk
    (``doc_key``, which chunk and its text), never two chunks of one document. The nearest
    ``4 * k`` chunks are fetched, and the fetch doubles until they span ``k`` documents or the
    table (after ``where``) has no more chunks. ``chunks=True`` returns the ``k`` nearest chunk
    rows instead, several of one document included.

    With ``rerank`` (a :class:`~qwen3_pipeline.embedding.reranker.Qwen3Reranker`, or anything
    with its ``score`` method) search is two-stage: the ``candidates`` nearest rows (documents,
    each with its best chunk, on a chunk table) are fetched by vector, the reranker scores
    each against the query, and the ``k`` best by that score are returned, best first, with
    both scores: ``similarity`` (of the vector stage) and ``rerank_score``. On a chunk table
    the reranker reads the matched chunk's text; a table of whole documents stores no text,
    so ``text_column`` names a carry-along column holding it (carry the text column when the
    table is built, e.g. ``SourceConfig(..., carry=("body",))``). A null text is scored as an
    empty document.

    Args:
        vectors: The pinned table.
        query: The query text.
        k: Rows (documents, on a chunk table) to return.
        embedder: The query embedder; None builds the matching Qwen3 encoder.
        where: An optional ``lancedb.expr`` filter (never a pasted SQL string), applied to the
            rows (chunks) before the nearest are chosen.
        columns: Columns to return besides the scores (never the vector). Default: key,
            carry-along and time lineage columns; on a chunk table ``doc_key``, ``chunk_seq``,
            ``chunk_start``, ``chunk_end``, ``chunk_text`` instead of the key (with it too when
            ``chunks=True``). A document search always returns ``doc_key``.
        chunks: On a chunk table, return the nearest chunks rather than documents.
        rerank: Rerank the vector candidates with this reranker (None: vector order).
        candidates: How many vector candidates the reranker scores (at least ``k``); default
            ``max(k, 50)``. Only with ``rerank``.
        text_column: The column whose text the reranker reads; default ``chunk_text`` on a
            chunk table, required on a table of whole documents. Only with ``rerank``.
        rerank_instruction: What relevance means to the reranker (its ``Instruct``); None is
            the reranker's default (the model card's web-search task). Only with ``rerank``.

    Returns:
        An Arrow table with the requested columns and ``similarity`` (1 - cosine distance),
        then ``rerank_score`` when reranked.

    Raises:
        SpecMismatchError: ``embedder`` follows another spec than the table.
        ConfigError: ``k`` is not positive, ``chunks=True`` on a table of whole documents
            (its rows are already documents; asking for chunks there is a mistake worth
            hearing about, e.g. a table built without chunking), ``columns`` asks for a name
            search adds itself, or the table stores a ``_distance`` column (it cannot be
            searched until that column is dropped); with ``rerank``: fewer ``candidates``
            than ``k``, no ``text_column`` on a table of whole documents or one the table
            does not store; a reranking option without ``rerank``.

    Example:
        >>> hits = search(vectors, "retry with backoff", k=5)  # doctest: +SKIP
        >>> hits.column_names  # a chunk table with carry column "title"  # doctest: +SKIP
        ['doc_key', 'chunk_seq', 'chunk_start', 'chunk_end', 'chunk_text', 'title',
         'partition_key', 'source_updated_at', 'embedded_at', 'similarity']
        >>> reranker = Qwen3Reranker("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
        >>> search(vectors, "retry with backoff", k=5, rerank=reranker, candidates=50)
        ... # doctest: +SKIP
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if chunks and not vectors.chunked:
        raise ConfigError(
            f"chunks=True needs a table of document chunks, but {vectors.name!r} holds one row "
            "per document (its spec has no chunking); search it without chunks=True"
        )
    _check_output_names(vectors, columns)
    documents = vectors.chunked and not chunks
    if documents:
        wanted = columns or [
            DOC_KEY_COLUMN,
            *_SEARCH_CHUNK,
            *vectors.carry_columns,
            *_SEARCH_LINEAGE,
        ]
        if DOC_KEY_COLUMN not in wanted:
            wanted = [DOC_KEY_COLUMN, *wanted]
    else:
        hit = [DOC_KEY_COLUMN, *_SEARCH_CHUNK] if vectors.chunked else []
        wanted = columns or ["key", *hit, *vectors.carry_columns, *_SEARCH_LINEAGE]
    if rerank is None:
        _refuse_rerank_options(candidates, text_column, rerank_instruction)
        vector = _query_vector(vectors, query, embedder)
        return _vector_hits(vectors, vector, wanted, where, k, documents=documents)
    if not isinstance(rerank, Reranker):
        raise ConfigError(
            f"rerank must have a score(query, documents, instruction) method (a Qwen3Reranker), "
            f"got {type(rerank).__name__}"
        )
    plan = rerank_plan(vectors, k=k, candidates=candidates, text_column=text_column, columns=wanted)
    vector = _query_vector(vectors, query, embedder)
    read = wanted if plan.text_column in wanted else [*wanted, plan.text_column]
    hits = _vector_hits(vectors, vector, read, where, plan.candidates, documents=documents)
    return _reranked(hits, query, rerank, rerank_instruction, plan.text_column, wanted, k)


def _vector_hits(
    vectors: VectorTable,
    vector: np.ndarray,
    wanted: list[str],
    where: Any,
    k: int,
    *,
    documents: bool,
) -> pa.Table:
    """The ``k`` nearest rows, or on a chunk table the ``k`` nearest documents, with similarity."""
    if not documents:
        return _with_similarity(_nearest(vectors, vector, wanted, where, k), wanted)
    limit = _CHUNK_OVERFETCH * k
    while True:
        found = _nearest(vectors, vector, wanted, where, limit)
        best = _best_chunk_per_document(found)
        if best.num_rows >= k or found.num_rows < limit:
            return _with_similarity(best.slice(0, k), wanted)
        limit *= 2


@dataclass(frozen=True, kw_only=True)
class RerankPlan:
    """What the reranking stage of a search reads.

    Attributes:
        candidates: Vector candidates the reranker scores.
        text_column: The column holding each candidate's text.
    """

    candidates: int
    text_column: str


def rerank_plan(
    vectors: VectorTable,
    *,
    k: int,
    candidates: int | None = None,
    text_column: str | None = None,
    columns: list[str] | None = None,
) -> RerankPlan:
    """Check a reranked search's options against the table, before any model loads.

    :func:`search` runs it; a driver that builds the reranker itself (the CLI) runs it first,
    so a bad option is refused before a checkpoint is read.

    Args:
        vectors: The pinned table.
        k: Results wanted.
        candidates: Vector candidates to rerank (None: ``max(k, 50)``).
        text_column: The text the reranker reads (None: ``chunk_text`` on a chunk table).
        columns: The result columns (None: the table's carry columns are among them).

    Returns:
        The number of candidates and the text column.

    Raises:
        ConfigError: ``candidates`` below ``k``; no ``text_column`` on a table of whole
            documents, or one the table does not store; a result column already named
            ``rerank_score``.

    Example:
        >>> rerank_plan(vectors, k=5).candidates  # doctest: +SKIP
        50
    """
    pool = max(k, DEFAULT_RERANK_CANDIDATES) if candidates is None else candidates
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < k:
        raise ConfigError(
            f"candidates must be an integer of at least k={k} (the reranker picks the k best "
            f"of them), got {candidates!r}"
        )
    if text_column is None:
        if not vectors.chunked:
            raise ConfigError(
                f"reranking needs each candidate's text, but {vectors.name!r} holds whole "
                "documents and stores no text: name a carry-along column holding it "
                f"(text_column=; carried here: {vectors.carry_columns}), or carry the text "
                "column when the table is built"
            )
        text_column = "chunk_text"
    if text_column not in vectors.table.schema.names or text_column == VECTOR_COLUMN:
        raise ConfigError(
            f"text_column={text_column!r} is not a text column of {vectors.name!r} "
            f"(carried here: {vectors.carry_columns})"
        )
    if RERANK_SCORE_COLUMN in (columns or vectors.carry_columns):
        raise ConfigError(
            f"a reranked search adds the column {RERANK_SCORE_COLUMN!r}; the table or columns= "
            "name one already: leave it out of columns= (or rename the carry column)"
        )
    return RerankPlan(candidates=pool, text_column=text_column)


def _refuse_rerank_options(
    candidates: int | None, text_column: str | None, instruction: str | None
) -> None:
    named = (
        ("candidates", candidates),
        ("text_column", text_column),
        ("rerank_instruction", instruction),
    )
    given = [name for name, value in named if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with rerank= (a reranker)")


def _reranked(
    hits: pa.Table,
    query: str,
    reranker: Reranker,
    instruction: str | None,
    text_column: str,
    wanted: list[str],
    k: int,
) -> pa.Table:
    """The ``k`` hits the reranker scores best, with its score beside the vector similarity."""
    texts = [text or "" for text in hits.column(text_column).to_pylist()]
    scores = np.asarray(reranker.score(query, texts, instruction), np.float32)
    if scores.shape != (hits.num_rows,):
        raise ConfigError(f"the reranker returned {scores.size} scores for {hits.num_rows} texts")
    # A stable sort on the negated score: ties keep the vector stage's order.
    order = np.argsort(-scores, kind="stable")[:k]
    best = hits.take(pa.array(order, pa.int64())).select([*wanted, "similarity"])
    return best.append_column(RERANK_SCORE_COLUMN, pa.array(scores[order], pa.float32()))


def _check_output_names(vectors: VectorTable, columns: list[str] | None) -> None:
    """Refuse requested or stored columns that collide with what search adds to its rows."""
    asked = sorted(set(columns or ()) & set(SEARCH_OUTPUT_COLUMNS))
    if asked:
        raise ConfigError(
            f"columns {asked} are names search adds to its results "
            f"{list(SEARCH_OUTPUT_COLUMNS)}; 'similarity' is always returned, ask for stored "
            "columns only"
        )
    if "_distance" in vectors.table.schema.names:
        raise ConfigError(
            f"table {vectors.name!r} stores a column '_distance', the name LanceDB gives the "
            "distance of a vector search, so it cannot be searched (it was written before "
            "such carry columns were refused). Drop the column (lancedb: "
            "table.drop_columns(['_distance'])) or rebuild the table from a source that "
            "renames it"
        )


def _query_vector(vectors: VectorTable, query: str, embedder: Embedder | None) -> np.ndarray:
    model = embedder or vectors.query_embedder()
    # Chunking decides which texts became rows, not how a text is embedded: an embedder made
    # for whole documents embeds queries for a chunk table of the same model and dim alike.
    asked = model.spec.with_chunking(None).fingerprint
    held = vectors.spec.with_chunking(None).fingerprint
    if asked != held:
        raise SpecMismatchError(
            f"the query embedder follows spec {model.spec.fingerprint} (model "
            f"{model.spec.model}, dim {model.spec.dim}) but table {vectors.name!r} holds "
            f"{vectors.spec.fingerprint} (model {vectors.spec.model}, dim {vectors.spec.dim}); "
            "search with the table's own spec (omit embedder=) or rebuild the table"
        )
    encoded = model.embed_queries([query])
    return encoded.raise_on_failure()[0]


def _nearest(
    vectors: VectorTable, vector: np.ndarray, wanted: list[str], where: Any, limit: int
) -> pa.Table:
    builder = (
        vectors.table.search(vector, vector_column_name=VECTOR_COLUMN)
        .distance_type("cosine")
        .select([*wanted, "_distance"])
        .limit(limit)
    )
    if where is not None:
        builder = builder.where(where)
    try:
        found = builder.to_arrow()
    except Exception as e:  # a missing data file, I/O: typed at the LanceDB boundary
        raise store_error(e, f"search table {vectors.name!r}") from e
    return found


def _best_chunk_per_document(found: pa.Table) -> pa.Table:
    if not found.num_rows:
        return found
    # Nearest first (a stable sort, so ties keep LanceDB's order): then each document's first
    # row is its best chunk, and the documents come out best first.
    found = found.take(pc.sort_indices(found, sort_keys=[("_distance", "ascending")]))
    rows = pa.table(
        {"doc": found.column(DOC_KEY_COLUMN), "row": pa.array(np.arange(found.num_rows))}
    )
    firsts = rows.group_by("doc", use_threads=False).aggregate([("row", "min")])
    return found.take(np.sort(firsts.column("row_min").to_numpy()))


def _with_similarity(found: pa.Table, wanted: list[str]) -> pa.Table:
    similarity = pa.array(1.0 - found.column("_distance").to_numpy(), pa.float32())
    return found.select(wanted).append_column("similarity", similarity)


def read_vectors(vectors: VectorTable, columns: list[str] | None = None) -> pa.Table:
    """Read the key, the vectors and ``columns`` of the whole pinned table."""
    wanted = ["key", VECTOR_COLUMN, *(columns or [])]
    try:
        batches = list(vectors.table.search().select(wanted).to_batches(batch_size=65_536))
    except Exception as e:  # a missing data file, I/O: typed at the LanceDB boundary
        raise store_error(e, f"read table {vectors.name!r}") from e
    schema = pa.schema([vectors.table.schema.field(c) for c in wanted])
    return pa.Table.from_batches([b.select(wanted) for b in batches], schema=schema)


def vector_matrix(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Return a FixedSizeList<float32> column as a float32 ``[n, dim]`` NumPy matrix."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    dim = values.type.list_size
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


# --------------------------------------------------------------------------- ANN index


@dataclass(frozen=True, kw_only=True)
class IndexPolicy:
    """When and how the vector index is kept.

    Attributes:
        min_rows: Below this many rows no index is built: exact (brute-force) search over a
            few tens of thousands of vectors takes milliseconds and has perfect recall.
        distance_type: The index's metric; the vectors are unit-norm, so cosine.
        target_partition_size: Rows per IVF partition (None: LanceDB's default).
        max_fragments: Compact the files once a table without index has more fragments.
        cleanup_older_than: Versions older than this are pruned (tagged versions and those
            after the oldest tag are kept); keep it longer than any reader pins a version.
    """

    min_rows: int = 50_000
    distance_type: DistanceType = "cosine"
    target_partition_size: int | None = None
    max_fragments: int = 32
    cleanup_older_than: timedelta = timedelta(days=7)


@dataclass(frozen=True, kw_only=True)
class IndexUpkeep:
    """What :func:`maintain_vector_index` did.

    Attributes:
        action: ``brute_force`` (no index needed, nothing done), ``compacted``, ``created``,
            ``optimized`` (new rows folded into the index, files compacted) or ``up_to_date``.
        row_count: Rows in the table.
        unindexed_rows: Rows not yet in the index after the upkeep (0 without an index).
        fragments: Data fragments before the upkeep.
        index_name: The vector index, if any.
        version_before: Lance version before.
        version_after: Lance version after.
        versions_pruned: Old versions removed by the upkeep.
    """

    action: IndexAction
    row_count: int
    unindexed_rows: int
    fragments: int
    index_name: str | None
    version_before: int
    version_after: int
    versions_pruned: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def plan_index_action(
    *,
    row_count: int,
    has_index: bool,
    unindexed_rows: int,
    fragments: int,
    policy: IndexPolicy,
) -> IndexAction:
    """Decide the upkeep action from the table's state (pure).

    Example:
        >>> plan_index_action(row_count=10, has_index=False, unindexed_rows=0, fragments=1,
        ...                   policy=IndexPolicy(min_rows=100))
        'brute_force'
    """
    if not has_index:
        if row_count >= policy.min_rows:
            return "created"
        return "compacted" if fragments > policy.max_fragments else "brute_force"
    if unindexed_rows > 0 or fragments > policy.max_fragments:
        return "optimized"
    return "up_to_date"


def _vector_index(table: Any) -> Any:
    for index in table.list_indices():
        if list(index.columns) == [VECTOR_COLUMN]:
            return index
    return None


def maintain_vector_index(table: Any, policy: IndexPolicy | None = None) -> IndexUpkeep:
    """Create or refresh the ANN index of a vector table according to ``policy``.

    Commits only when there is something to do: a table without new rows is left at its
    version. Compaction and pruning go through :func:`~qwen3_pipeline.store.upkeep.optimize_table`,
    so tagged versions are kept and never make it fail.

    Args:
        table: The live ``lancedb`` table (latest version).
        policy: Thresholds and index settings.

    Returns:
        What was done.

    Raises:
        StoreError: LanceDB could not optimize the table.
    """
    from lancedb.index import IvfHnswSq

    policy = policy or IndexPolicy()
    version_before = int(table.version)
    row_count = int(table.count_rows())
    fragments = fragment_count(table)
    index = _vector_index(table)
    versions_pruned = 0
    action = plan_index_action(
        row_count=row_count,
        has_index=index is not None,
        unindexed_rows=int(index.num_unindexed_rows) if index is not None else 0,
        fragments=fragments,
        policy=policy,
    )
    if action == "created":
        config = IvfHnswSq(
            distance_type=policy.distance_type,
            target_partition_size=policy.target_partition_size,
        )
        table.create_index(VECTOR_COLUMN, config=config)
        logger.info("created a vector index on %d rows", row_count)
    elif action in ("optimized", "compacted"):
        upkeep = optimize_table(table, cleanup_older_than=policy.cleanup_older_than)
        versions_pruned = upkeep.versions_pruned
    index = _vector_index(table)
    return IndexUpkeep(
        action=action,
        row_count=row_count,
        unindexed_rows=int(index.num_unindexed_rows) if index is not None else 0,
        fragments=fragments,
        index_name=index.name if index is not None else None,
        version_before=version_before,
        version_after=int(table.version),
        versions_pruned=versions_pruned,
    )


# --------------------------------------------------------------------------- near duplicates


def near_duplicate_pairs(
    keys: pa.Array | pa.ChunkedArray,
    vectors: np.ndarray,
    *,
    threshold: float = 0.95,
    neighbors: int = 5,
    max_block_cells: int = 32_000_000,
) -> pa.Table:
    """Return pairs of rows whose cosine similarity is at least ``threshold``.

    Exact and blockwise: each block of rows is multiplied by all vectors (memory
    ``block x n`` floats, at most ``max_block_cells``), and each row keeps its ``neighbors``
    most similar other rows; a pair is reported once. Cost is ``O(n^2 dim)``, fine for a few
    hundred thousand rows on a GPU-less machine.

    Args:
        keys: Row keys, aligned with ``vectors``.
        vectors: ``[n, dim]`` float32 vectors (normalised here if they are not).
        threshold: Smallest similarity reported.
        neighbors: Most neighbours considered per row.
        max_block_cells: Bound on the similarity block held in memory.

    Returns:
        Columns ``key_a, key_b, similarity`` (``key_a`` is the row that comes first in
        ``keys``), most similar first.

    Example:
        >>> v = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
        >>> near_duplicate_pairs(pa.array(["a", "b", "c"]), v).to_pylist()
        [{'key_a': 'a', 'key_b': 'b', 'similarity': 1.0}]
    """
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    matrix = np.asarray(vectors, dtype=np.float32)
    n = len(matrix)
    if n != len(keys):
        raise ConfigError(f"{len(keys)} keys but {n} vectors")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix = (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    k = min(neighbors, n - 1)
    block = max(1, max_block_cells // max(n, 1))
    for start in range(0, n if k > 0 else 0, block):
        stop = min(n, start + block)
        sims = matrix[start:stop] @ matrix.T
        rows = np.arange(stop - start)
        sims[rows, rows + start] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(sims, top, axis=1)
        hit_rows, hit_cols = np.nonzero(values >= threshold)
        a = hit_rows + start
        b = top[hit_rows, hit_cols]
        first.append(np.minimum(a, b))
        second.append(np.maximum(a, b))
        scores.append(values[hit_rows, hit_cols])
    if not first or not sum(len(f) for f in first):
        return pa.table(
            {
                "key_a": pa.array([], keys.type),
                "key_b": pa.array([], keys.type),
                "similarity": pa.array([], pa.float32()),
            }
        )
    a_all, b_all, s_all = np.concatenate(first), np.concatenate(second), np.concatenate(scores)
    _, unique = np.unique(a_all.astype(np.int64) * n + b_all, return_index=True)
    order = unique[np.lexsort((a_all[unique], -s_all[unique]))]
    return pa.table(
        {
            "key_a": keys.take(pa.array(a_all[order])),
            "key_b": keys.take(pa.array(b_all[order])),
            "similarity": pa.array(np.round(s_all[order], 6), pa.float32()),
        }
    )


def with_labels(pairs: pa.Table, labels: pa.Table) -> pa.Table:
    """Add ``<column>_a``/``<column>_b`` label columns (e.g. titles) to near-duplicate pairs.

    Args:
        pairs: Output of :func:`near_duplicate_pairs`.
        labels: ``key`` plus the label columns.
    """
    out = pairs
    for side in ("a", "b"):
        renamed = labels.rename_columns(
            [f"key_{side}" if c == "key" else f"{c}_{side}" for c in labels.column_names]
        )
        out = out.join(renamed, keys=f"key_{side}", join_type="left outer")
    return out.sort_by([("similarity", "descending"), ("key_a", "ascending")])
