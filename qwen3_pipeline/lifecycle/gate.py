"""Gated blue/green upgrades: score the live and the staging table on a golden set.

A rebuild to another model or spec (Qwen3-Embedding 0.6B → 4B, another dim, other chunking)
fills a staging table beside the live one. Before it is swapped in, both tables answer the
queries of a *golden set* (queries with the documents known to answer them), and the swap
happens only when staging is at least as good:

- :func:`load_golden_set` reads the golden set, JSONL with one
  ``{"query": "...", "relevant": [key, ...]}`` per line, strictly: every problem is a
  :class:`~qwen3_pipeline.core.errors.ConfigError` naming its line (:func:`parse_golden_set` does
  the same for lines already in memory).
- :func:`recall_at_k` and :func:`ndcg_at_k` score one ranking (pure, binary relevance).
- :func:`evaluate` searches one pinned table with the query embedder of its own spec and
  averages the metrics over the queries (an :class:`Evaluation`).
- :func:`decide` compares the two evaluations (a :class:`GateDecision`): staging passes when
  neither its mean recall@k nor its mean nDCG@k is more than ``tolerance`` below live's; with
  no live table (a first build) it passes.

Keys are the table's keys, of its type: on a table of whole documents the ``key`` column, on a
table of document chunks the document key ``doc_key`` (search there ranks documents by their
best chunk). Integer keys are written as JSON numbers, string keys as JSON strings.

Example:
    >>> golden = load_golden_set("golden.jsonl")  # doctest: +SKIP
    >>> live = evaluate(open_vector_table(uri, "docs"), golden, small_encoder)  # doctest: +SKIP
    >>> staging = evaluate(open_vector_table(uri, "docs_4b"), golden, big_encoder)  # doctest: +SKIP
    >>> print(decide(live, staging, tolerance=0.01).summary())  # doctest: +SKIP
    gate passed: staging 'docs_4b' v3 recall@10 0.912 (+0.041), nDCG@10 0.804 (+0.052) vs ...
"""

import json
import math
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qwen3_pipeline.consumers.vector_search import VectorTable, search
from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingFailedError,
    GateFailedError,
    SpecMismatchError,
)
from qwen3_pipeline.core.schema import DOC_KEY_COLUMN
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult

Key = int | str
DEFAULT_K = 10
# Ranked keys kept per query in an Evaluation: enough to see what a table answered instead.
SHOWN_KEYS = 5
# Queries listed in GateDecision.as_dict() as the worst regressions from live to staging.
SHOWN_REGRESSIONS = 5
# Means are compared with this slack: 0.8 - 0.1 is 0.7000000000000001 in floating point, and a
# tolerance of 0.1 must let a mean of 0.7 through against 0.8.
_EPSILON = 1e-9
_EXAMPLE_LINE = '{"query": "how do I reset my password?", "relevant": ["kb-17", "kb-42"]}'


# --------------------------------------------------------------------------- golden set


@dataclass(frozen=True, kw_only=True)
class GoldenQuery:
    """One query of a golden set and the keys of the documents that answer it.

    Attributes:
        query: The query text, as it will be embedded.
        relevant: Keys of the relevant documents, in the file's order (no repeats).
        line: The line of the golden-set file it came from (1-based).
    """

    query: str
    relevant: tuple[Key, ...]
    line: int


@dataclass(frozen=True, kw_only=True)
class GoldenSet:
    """Queries with their relevant document keys; build it with :func:`load_golden_set`.

    Attributes:
        queries: The queries, in the file's order, each query once.
        source: Where the set came from (the file path), for messages and reports.
    """

    queries: tuple[GoldenQuery, ...]
    source: str = "<golden set>"

    def __post_init__(self) -> None:
        if not self.queries:
            raise ConfigError(f"golden set {self.source!r} holds no query; it needs at least one")

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[GoldenQuery]:
        return iter(self.queries)

    @property
    def key_type(self) -> type:
        """``int`` or ``str``: the one type of every relevant key in the set."""
        return type(self.queries[0].relevant[0])


def load_golden_set(path: str | Path) -> GoldenSet:
    """Read and validate a golden set: JSONL, one query object per line.

    Each non-blank line is ``{"query": "<text>", "relevant": [<key>, ...]}``: a non-empty
    query, and a non-empty list of the keys (integers or strings, one type in the whole file)
    of the documents that answer it. Other fields are allowed and ignored (an id, a note).
    Blank lines are skipped; line numbers in errors count them.

    Args:
        path: The JSONL file (UTF-8).

    Returns:
        The golden set, in the file's order.

    Raises:
        ConfigError: The file cannot be read, or a line is invalid (not JSON, no query, an
            empty relevant list, a repeated query, a key of another type...), or the file holds
            no query. The message names the file and the line.

    Example:
        >>> golden = load_golden_set("golden.jsonl")  # doctest: +SKIP
        >>> len(golden), golden.key_type  # doctest: +SKIP
        (120, <class 'str'>)
    """
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read golden set {where!r} ({e.strerror or e}); pass the path of a JSONL "
            f"file with one query per line, like {_EXAMPLE_LINE}"
        ) from e
    texts: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            # A byte-order mark (Windows editors) may open the file; it is not part of the JSON.
            texts.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"golden set {where!r} line {number}: not UTF-8 (byte {e.start + 1}); save the "
                "file as UTF-8"
            ) from e
    return parse_golden_set(texts, source=where)


def parse_golden_set(lines: Iterable[str], *, source: str = "<golden set>") -> GoldenSet:
    """Validate the lines of a golden set (pure; :func:`load_golden_set` reads the file).

    Args:
        lines: The lines, in order (line 1 first), with or without their line endings.
        source: Where the lines came from, for messages.

    Returns:
        The golden set.

    Raises:
        ConfigError: As :func:`load_golden_set`.

    Example:
        >>> golden = parse_golden_set(['{"query": "q", "relevant": [3, 1]}', ""])
        >>> golden.queries[0].relevant, golden.key_type
        ((3, 1), <class 'int'>)
    """
    queries: list[GoldenQuery] = []
    seen: dict[str, int] = {}
    first_key: tuple[Key, int] | None = None  # the first key read, and its line
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = _parse_line(text, number, source)
        duplicate = seen.get(item.query.strip())
        if duplicate is not None:
            raise ConfigError(
                f"golden set {source!r} line {number}: query {item.query!r} repeats line "
                f"{duplicate}; list each query once, with all its relevant keys on one line"
            )
        seen[item.query.strip()] = number
        first_key = first_key or (item.relevant[0], number)
        _check_one_key_type(item, first_key, source)
        queries.append(item)
    if not queries:
        raise ConfigError(
            f"golden set {source!r} holds no query (it is empty or only blank lines); write one "
            f"JSON object per line, like {_EXAMPLE_LINE}"
        )
    return GoldenSet(queries=tuple(queries), source=source)


def _parse_line(text: str, number: int, source: str) -> GoldenQuery:
    where = f"golden set {source!r} line {number}"
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one object per "
            f"line, like {_EXAMPLE_LINE}"
        ) from e
    if not isinstance(item, dict):
        raise ConfigError(
            f"{where}: expected a JSON object with 'query' and 'relevant', got "
            f"{type(item).__name__} {item!r:.60}; write one object per line, like {_EXAMPLE_LINE}"
        )
    query = item.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(
            f"{where}: 'query' must be a non-empty string, got {query!r:.60}; give the "
            "query text as users would type it"
        )
    relevant = item.get("relevant")
    if not isinstance(relevant, list) or not relevant:
        raise ConfigError(
            f"{where}: 'relevant' of query {query!r:.60} must be a non-empty list of document "
            f"keys, got {relevant!r:.60}; list the key of at least one document that answers "
            "it, or drop the line"
        )
    keys: list[Key] = []
    for key in relevant:
        # bool is an int in Python, and JSON true is never a table key.
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ConfigError(
                f"{where}: relevant key {key!r:.60} of query {query!r:.60} is a JSON "
                f"{_json_type(key)}; keys are integers or strings (the table's key, or "
                "doc_key on a table of document chunks)"
            )
        if key in keys:
            raise ConfigError(
                f"{where}: relevant key {key!r} of query {query!r:.60} is listed twice; list "
                "each key once"
            )
        keys.append(key)
    return GoldenQuery(query=query, relevant=tuple(keys), line=number)


def _check_one_key_type(item: GoldenQuery, first: tuple[Key, int], source: str) -> None:
    # A table has one key type, and 12 never equals "12": a mixed set would silently score
    # the keys of the other type as never found.
    first_key, first_line = first
    for key in item.relevant:
        if type(key) is not type(first_key):
            raise ConfigError(
                f"golden set {source!r} line {item.line}: relevant key {key!r} is "
                f"{_kind(key)} but key {first_key!r} (line {first_line}) is {_kind(first_key)}; "
                "a table has one key type, so write every key as a JSON number for integer keys "
                "or as a JSON string for string keys"
            )


def _json_type(value: Any) -> str:
    names = {bool: "boolean", float: "number (not an integer)", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _kind(key: Key) -> str:
    return "an integer" if isinstance(key, int) else "a string"


# --------------------------------------------------------------------------- metrics


def recall_at_k(ranked_keys: Sequence[Key], relevant: Collection[Key], k: int = DEFAULT_K) -> float:
    """The share of the relevant keys found among the first ``k`` ranked keys (pure).

    Args:
        ranked_keys: Keys as a search returned them, best first (a repeat counts once).
        relevant: The keys that answer the query (at least one).
        k: How many ranked keys count.

    Returns:
        A value in [0, 1]; 1 when every relevant key is in the top ``k``. With more relevant
        keys than ``k`` it cannot reach 1 (the usual definition: divide by all relevant keys).

    Raises:
        ConfigError: ``k`` is not a positive integer, or ``relevant`` is empty.

    Example:
        >>> recall_at_k(["a", "x", "b", "y"], {"a", "b", "c", "d"}, k=3)
        0.5
    """
    wanted = _relevant_set(relevant)
    _check_k(k)
    return len(wanted.intersection(ranked_keys[:k])) / len(wanted)


def ndcg_at_k(ranked_keys: Sequence[Key], relevant: Collection[Key], k: int = DEFAULT_K) -> float:
    """Normalised discounted cumulative gain of the first ``k`` ranked keys (pure).

    Binary relevance: a relevant key at rank ``r`` (1-based) gains ``1 / log2(r + 1)``, counted
    at its first occurrence only. The sum is divided by the ideal one, every relevant key ranked
    first: ``min(len(relevant), k)`` gains at ranks 1, 2, ...

    Args:
        ranked_keys: Keys as a search returned them, best first.
        relevant: The keys that answer the query (at least one).
        k: How many ranked keys count.

    Returns:
        A value in [0, 1]; 1 when the top of the ranking is exactly the relevant keys.

    Raises:
        ConfigError: ``k`` is not a positive integer, or ``relevant`` is empty.

    Example:
        >>> round(ndcg_at_k(["x", "a"], {"a"}, k=10), 4)  # 1 / log2(3)
        0.6309
    """
    wanted = _relevant_set(relevant)
    _check_k(k)
    gained: set[Key] = set()
    dcg = 0.0
    for rank, key in enumerate(ranked_keys[:k], start=1):
        if key in wanted and key not in gained:
            gained.add(key)
            dcg += 1.0 / math.log2(rank + 1)
    ideal = math.fsum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
    return dcg / ideal


def _relevant_set(relevant: Collection[Key]) -> frozenset[Key]:
    wanted = frozenset(relevant)
    if not wanted:
        raise ConfigError("relevant is empty; a query needs at least one relevant key to score")
    return wanted


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer (e.g. 10), got {k!r}")


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    # fsum: the same per-query scores always give the very same mean, whatever their order.
    return math.fsum(listed) / len(listed) if listed else 0.0


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class QueryResult:
    """How one table answered one golden query.

    Attributes:
        query: The query text.
        recall: recall@k of the query.
        ndcg: nDCG@k of the query.
        found: Relevant keys among the top ``k``.
        relevant: Relevant keys listed in the golden set.
        top_keys: The first :data:`SHOWN_KEYS` ranked keys, best first.
    """

    query: str
    recall: float
    ndcg: float
    found: int
    relevant: int
    top_keys: tuple[Key, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "query": self.query,
            "recall": round(self.recall, 6),
            "ndcg": round(self.ndcg, 6),
            "found": self.found,
            "relevant": self.relevant,
            "top_keys": list(self.top_keys),
        }


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """One table's scores on a golden set.

    Attributes:
        table: Table name.
        uri: Database URI.
        version: The Lance version searched.
        model: The model of the table's vectors.
        dim: Their dimension.
        spec_fingerprint: The table's spec fingerprint.
        chunked: Whether the table holds document chunks (ranked by best chunk per document).
        golden_set: Where the golden set came from.
        k: Ranked documents scored per query.
        recall: Mean recall@k over the queries.
        ndcg: Mean nDCG@k over the queries.
        queries: Per-query results, in the golden set's order.
        seconds: Wall-clock time of the evaluation (embedding the queries included).
    """

    table: str
    uri: str
    version: int
    model: str
    dim: int
    spec_fingerprint: str
    chunked: bool
    golden_set: str
    k: int
    recall: float
    ndcg: float
    queries: tuple[QueryResult, ...]
    seconds: float

    def as_dict(self, *, per_query: bool = False) -> dict[str, Any]:
        """A JSON-ready dict of the means and the table; ``per_query`` adds every query."""
        out: dict[str, Any] = {
            "table": self.table,
            "uri": self.uri,
            "version": self.version,
            "model": self.model,
            "dim": self.dim,
            "spec_fingerprint": self.spec_fingerprint,
            "chunked": self.chunked,
            "golden_set": self.golden_set,
            "k": self.k,
            "queries": len(self.queries),
            "recall": round(self.recall, 6),
            "ndcg": round(self.ndcg, 6),
            "seconds": round(self.seconds, 3),
        }
        if per_query:
            out["per_query"] = [q.as_dict() for q in self.queries]
        return out

    def summary(self) -> str:
        """One line: the table and its means."""
        return (
            f"{self.table!r} v{self.version} ({self.model}, dim {self.dim}): "
            f"recall@{self.k} {self.recall:.3f}, nDCG@{self.k} {self.ndcg:.3f} "
            f"over {len(self.queries)} queries"
        )


def score_rankings(
    golden: GoldenSet, rankings: Sequence[Sequence[Key]], *, k: int = DEFAULT_K
) -> tuple[QueryResult, ...]:
    """Score each golden query's ranking (pure; :func:`evaluate` gets the rankings by search).

    Args:
        golden: The golden set.
        rankings: One ranking per golden query, in its order, best first.
        k: Ranked keys scored per query.

    Raises:
        ConfigError: Not one ranking per query, or a bad ``k``.

    Example:
        >>> golden = parse_golden_set(['{"query": "q", "relevant": [2]}'])
        >>> score_rankings(golden, [[1, 2, 3]], k=2)[0].found
        1
    """
    _check_k(k)
    if len(rankings) != len(golden):
        raise ConfigError(f"{len(rankings)} rankings for {len(golden)} golden queries")
    results = []
    for item, ranked in zip(golden.queries, rankings, strict=True):
        top = list(ranked[:k])
        results.append(
            QueryResult(
                query=item.query,
                recall=recall_at_k(top, item.relevant, k),
                ndcg=ndcg_at_k(top, item.relevant, k),
                found=len(set(item.relevant).intersection(top)),
                relevant=len(item.relevant),
                top_keys=tuple(top[:SHOWN_KEYS]),
            )
        )
    return tuple(results)


def evaluate(
    vectors: VectorTable, golden: GoldenSet, embedder: Embedder, *, k: int = DEFAULT_K
) -> Evaluation:
    """Search ``vectors`` with every golden query and score the rankings.

    The queries are embedded in one ``embedder.embed_queries`` call (the encoder batches them),
    then each is searched as :func:`~qwen3_pipeline.consumers.vector_search.search` does: exact or
    ANN
    cosine search, and on a table of document chunks each document ranked by its best chunk.

    Args:
        vectors: The pinned table (live or staging).
        golden: The golden set; its keys must have the table's key type.
        embedder: The query embedder of this table's spec (same model, dim and fingerprint;
            chunking aside). Live and staging tables each need their own.
        k: Documents ranked and scored per query.

    Returns:
        The table's :class:`Evaluation`.

    Raises:
        SpecMismatchError: ``embedder`` follows another spec than the table.
        ConfigError: A bad ``k``, or golden keys of another type than the table's keys.
        EmbeddingFailedError: A query could not be embedded.
        StoreError: LanceDB failed to search the table.
    """
    _check_k(k)
    _check_embedder(vectors, embedder)
    key_column = DOC_KEY_COLUMN if vectors.chunked else "key"
    _check_key_type(vectors, key_column, golden)
    started = time.perf_counter()
    texts = [item.query for item in golden.queries]
    encoded = embedder.embed_queries(texts)
    if encoded.failures:
        shown = "; ".join(f"{texts[i]!r:.60}: {why}" for i, why in list(encoded.failures.items()))
        raise EmbeddingFailedError(
            f"{len(encoded.failures)} golden query(ies) could not be embedded for table "
            f"{vectors.name!r}: {shown:.500}"
        )
    # consumers.search embeds its query itself; handing it the vectors embedded above keeps
    # one batched model call for the whole golden set, and search's own checks and
    # best-chunk-per-document ranking stay the one implementation.
    embedded = _EmbeddedQueries(embedder.spec, dict(zip(texts, encoded.vectors, strict=True)))
    rankings = [
        search(vectors, text, k=k, embedder=embedded, columns=[key_column])
        .column(key_column)
        .to_pylist()
        for text in texts
    ]
    results = score_rankings(golden, rankings, k=k)
    return Evaluation(
        table=vectors.name,
        uri=vectors.uri,
        version=vectors.version,
        model=vectors.spec.model,
        dim=vectors.spec.output_dim,
        spec_fingerprint=vectors.spec.fingerprint,
        chunked=vectors.chunked,
        golden_set=golden.source,
        k=k,
        recall=_mean(r.recall for r in results),
        ndcg=_mean(r.ndcg for r in results),
        queries=results,
        seconds=time.perf_counter() - started,
    )


def _check_embedder(vectors: VectorTable, embedder: Embedder) -> None:
    # search() checks this too, but only after all queries were embedded: a staging table
    # handed the live table's encoder should fail before a model pass, and say which table.
    asked = embedder.spec.with_chunking(None).fingerprint
    held = vectors.spec.with_chunking(None).fingerprint
    if asked != held:
        raise SpecMismatchError(
            f"the gate's query embedder for table {vectors.name!r} follows spec "
            f"{embedder.spec.fingerprint} (model {embedder.spec.model}, dim {embedder.spec.dim}) "
            f"but the table holds {vectors.spec.fingerprint} (model {vectors.spec.model}, dim "
            f"{vectors.spec.dim}); evaluate each table with the encoder of its own spec"
        )


def _check_key_type(vectors: VectorTable, key_column: str, golden: GoldenSet) -> None:
    arrow_type = vectors.table.schema.field(key_column).type
    if pa.types.is_integer(arrow_type):
        table_type: type = int
    elif pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        table_type = str
    else:
        return  # no other key type exists today; compare values as they come
    if golden.key_type is table_type:
        return
    item = golden.queries[0]
    column = f"{key_column} (the document keys of this chunk table)" if vectors.chunked else "key"
    raise ConfigError(
        f"golden set {golden.source!r} lists {_kind(item.relevant[0])} keys (line {item.line}: "
        f"{item.relevant[0]!r}) but table {vectors.name!r} has {arrow_type} keys in column "
        f"{column}; no key would ever match. Write the keys as JSON "
        f"{'numbers' if table_type is int else 'strings'}, as the source's key column holds them"
    )


class _EmbeddedQueries:
    """An :class:`Embedder` that hands out query vectors embedded beforehand, by query text."""

    def __init__(self, spec: EmbeddingSpec, vectors: dict[str, np.ndarray]) -> None:
        self._spec = spec
        self._vectors = vectors

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec of the embedder that made the vectors."""
        return self._spec

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Not supported: only golden queries were embedded."""
        raise NotImplementedError("the gate embeds queries only")

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """The vectors of ``queries``, each embedded beforehand."""
        n = len(queries)
        return EncodeResult(
            vectors=np.stack([self._vectors[q] for q in queries]),
            n_tokens=np.zeros(n, dtype=np.int64),
            truncated=np.zeros(n, dtype=bool),
        )


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True, kw_only=True)
class GateDecision:
    """Whether the staging table may replace the live one, and why.

    Attributes:
        passed: Swap staging in.
        reason: One sentence saying why (which metric fell, by how much, against what).
        tolerance: The largest drop of a mean metric allowed.
        live: The live table's evaluation; None on a first build.
        staging: The staging table's evaluation.
    """

    passed: bool
    reason: str
    tolerance: float
    live: Evaluation | None
    staging: Evaluation

    @property
    def recall_delta(self) -> float | None:
        """Staging's mean recall@k minus live's (None without a live table)."""
        return None if self.live is None else self.staging.recall - self.live.recall

    @property
    def ndcg_delta(self) -> float | None:
        """Staging's mean nDCG@k minus live's (None without a live table)."""
        return None if self.live is None else self.staging.ndcg - self.live.ndcg

    def regressions(self, limit: int = SHOWN_REGRESSIONS) -> list[dict[str, Any]]:
        """The queries staging answers worse than live (by nDCG@k), worst first, at most ``limit``.

        Example:
            >>> decision.regressions(1)  # doctest: +SKIP
            [{'query': 'reset password', 'live_ndcg': 1.0, 'staging_ndcg': 0.63, ...}]
        """
        if self.live is None:
            return []
        pairs = zip(self.live.queries, self.staging.queries, strict=True)
        worse = [(s.ndcg - v.ndcg, v, s) for v, s in pairs if s.ndcg < v.ndcg - _EPSILON]
        worse.sort(key=lambda t: t[0])
        return [
            {
                "query": v.query,
                "live_ndcg": round(v.ndcg, 6),
                "staging_ndcg": round(s.ndcg, 6),
                "live_recall": round(v.recall, 6),
                "staging_recall": round(s.recall, 6),
                "live_top_keys": list(v.top_keys),
                "staging_top_keys": list(s.top_keys),
            }
            for _, v, s in worse[:limit]
        ]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for the refresh report and orchestrator metadata.

        Keys: ``passed``, ``reason``, ``tolerance``, ``k``, ``queries``, ``live`` and
        ``staging`` (:meth:`Evaluation.as_dict`; ``live`` is None on a first build),
        ``recall_delta`` and ``ndcg_delta`` (staging minus live, None on a first build), and
        ``regressions`` (:meth:`regressions`).
        """
        recall_delta, ndcg_delta = self.recall_delta, self.ndcg_delta
        return {
            "passed": self.passed,
            "reason": self.reason,
            "tolerance": self.tolerance,
            "k": self.staging.k,
            "queries": len(self.staging.queries),
            "live": None if self.live is None else self.live.as_dict(),
            "staging": self.staging.as_dict(),
            "recall_delta": None if recall_delta is None else round(recall_delta, 6),
            "ndcg_delta": None if ndcg_delta is None else round(ndcg_delta, 6),
            "regressions": self.regressions(),
        }

    def summary(self) -> str:
        """One line: the verdict, both tables and their means."""
        verdict = "passed" if self.passed else "FAILED"
        staging, k = self.staging, self.staging.k
        head = f"gate {verdict}: staging {staging.table!r} v{staging.version}"
        if self.live is None:
            return (
                f"{head} recall@{k} {staging.recall:.3f}, nDCG@{k} {staging.ndcg:.3f}; "
                "no live table to compare with (first build)"
            )
        live = self.live
        return (
            f"{head} recall@{k} {staging.recall:.3f} ({staging.recall - live.recall:+.3f}), "
            f"nDCG@{k} {staging.ndcg:.3f} ({staging.ndcg - live.ndcg:+.3f}) vs live "
            f"{live.table!r} v{live.version}; tolerance {self.tolerance:g}, "
            f"{len(staging.queries)} queries"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`~qwen3_pipeline.core.errors.GateFailedError` when the gate failed.

        Raises:
            GateFailedError: Staging scored worse than live beyond the tolerance.
        """
        if not self.passed:
            live = "" if self.live is None else f" (live {self.live.table!r} v{self.live.version})"
            raise GateFailedError(
                f"the gate kept staging {self.staging.table!r} v{self.staging.version} out"
                f"{live}: {self.reason}. See the regressed queries in the gate report, or raise "
                "the tolerance if this drop is acceptable"
            )


def decide(live: Evaluation | None, staging: Evaluation, *, tolerance: float = 0.0) -> GateDecision:
    """Decide whether ``staging`` may replace ``live`` (pure).

    Staging passes when its mean recall@k is at least live's minus ``tolerance`` and its mean
    nDCG@k is too. With no live table (a first build) there is nothing to protect: it passes.

    Args:
        live: The live table's evaluation, None when there is no live table.
        staging: The staging table's evaluation, on the same golden set and ``k``.
        tolerance: The largest drop of either mean allowed, 0..1 (0: never worse).

    Returns:
        The decision, with its reason.

    Raises:
        ConfigError: A bad tolerance, or evaluations of different golden sets or ``k``.

    Example:
        >>> def scored(recall, ndcg):
        ...     return Evaluation(table="t", uri="db", version=1, model="m", dim=32,
        ...         spec_fingerprint="f", chunked=False, golden_set="g", k=10,
        ...         recall=recall, ndcg=ndcg, queries=(), seconds=0.0)
        >>> decide(scored(0.8, 0.7), scored(0.75, 0.72), tolerance=0.05).passed
        True
        >>> decide(scored(0.8, 0.7), scored(0.75, 0.72)).reason
        'staging recall@10 0.750 is 0.050 below live 0.800, more than the tolerance 0'
    """
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not 0.0 <= tolerance <= 1.0
    ):
        raise ConfigError(
            f"tolerance must be a number from 0 to 1 (the largest drop of mean recall@k or "
            f"nDCG@k allowed; 0 means staging may not be worse), got {tolerance!r}"
        )
    tolerance = float(tolerance)
    k = staging.k
    if live is None:
        reason = (
            f"no live table to compare with (first build): staging recall@{k} "
            f"{staging.recall:.3f}, nDCG@{k} {staging.ndcg:.3f}"
        )
        return GateDecision(
            passed=True, reason=reason, tolerance=tolerance, live=None, staging=staging
        )
    _check_comparable(live, staging)
    failures = [
        f"staging {name}@{k} {new:.3f} is {old - new:.3f} below live {old:.3f}, more than the "
        f"tolerance {tolerance:g}"
        for name, old, new in (
            ("recall", live.recall, staging.recall),
            ("nDCG", live.ndcg, staging.ndcg),
        )
        if new < old - tolerance - _EPSILON
    ]
    if failures:
        return GateDecision(
            passed=False,
            reason="; ".join(failures),
            tolerance=tolerance,
            live=live,
            staging=staging,
        )
    reason = (
        f"staging recall@{k} {staging.recall:.3f} ({staging.recall - live.recall:+.3f}) and "
        f"nDCG@{k} {staging.ndcg:.3f} ({staging.ndcg - live.ndcg:+.3f}) are at least "
        f"live's ({live.recall:.3f}, {live.ndcg:.3f}) minus the tolerance {tolerance:g}"
    )
    return GateDecision(passed=True, reason=reason, tolerance=tolerance, live=live, staging=staging)


def _check_comparable(live: Evaluation, staging: Evaluation) -> None:
    # Means over other queries or another k say nothing about which table is better.
    if live.k != staging.k:
        raise ConfigError(
            f"live {live.table!r} was evaluated at k={live.k} but staging {staging.table!r} at "
            f"k={staging.k}; evaluate both with the same k"
        )
    if [q.query for q in live.queries] != [q.query for q in staging.queries]:
        raise ConfigError(
            f"live {live.table!r} ({live.golden_set!r}, {len(live.queries)} queries) and staging "
            f"{staging.table!r} ({staging.golden_set!r}, {len(staging.queries)} queries) were "
            "evaluated on different golden sets; evaluate both on the same one"
        )


# --------------------------------------------------------------------------- the rebuild's gate


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """A gate on a rebuild: swap the staging table in only if it scores as well as live.

    Args:
        golden: The golden set (:func:`load_golden_set`).
        tolerance: How much lower than live's mean recall@k and nDCG@k staging may score.
        k: Documents ranked and scored per query.
        live_embedder: The query embedder of the live table's spec; None builds a Qwen3
            encoder for it (another model than the rebuild's, for a model upgrade).
    """

    golden: GoldenSet
    tolerance: float = 0.0
    k: int = DEFAULT_K
    live_embedder: Embedder | None = None


def gate_rebuild(
    config: GateConfig,
    *,
    uri: str,
    live_table: str,
    staging_table: str,
    staging_version: int,
    staging_embedder: Embedder,
    storage_options: dict[str, str] | None = None,
) -> GateDecision:
    """Evaluate the live table (if any) and the completed staging table, and decide.

    The live table is read as readers see it (its newest checked version); the staging table
    at the version the rebuild completed. Each is searched with the query encoder of its own
    spec.

    Raises:
        ConfigError: Golden keys of another type than the tables' keys, or a bad setting.
        EmbeddingFailedError: A query could not be embedded.
        StoreError: LanceDB failed.
    """
    import lancedb

    from qwen3_pipeline.consumers.vector_search import open_vector_table
    from qwen3_pipeline.store import list_table_names

    staging = open_vector_table(
        uri, staging_table, version=staging_version, storage_options=storage_options
    )
    staged = evaluate(staging, config.golden, staging_embedder, k=config.k)
    live_eval = None
    db = lancedb.connect(uri, storage_options=storage_options)
    if live_table in list_table_names(db):
        live = open_vector_table(uri, live_table, storage_options=storage_options)
        embedder = config.live_embedder or live.query_embedder()
        live_eval = evaluate(live, config.golden, embedder, k=config.k)
    return decide(live_eval, staged, tolerance=config.tolerance)
