"""Gated blue/green upgrades: score the live and the staging table on a golden set.

A rebuild to another model or spec (Qwen3-Embedding 0.6B → 4B, another dim, other chunking)
fills a staging table beside the live one. Before it is swapped in, both tables answer the
queries of a *golden set* (:mod:`qwen3_pipeline.lifecycle.golden`: queries with the documents
known to answer them), and the swap happens only when staging is at least as good:

- :func:`evaluate` searches one pinned table with the query embedder of its own spec and
  averages the metrics over the queries (an :class:`Evaluation`, scored by
  :mod:`qwen3_pipeline.lifecycle.metrics`).
- :func:`evaluate_with_rerank` scores one table by vector search alone and with a reranking
  stage (a :class:`RerankComparison`: both evaluations and the deltas).
- :func:`decide` compares the two evaluations (a :class:`GateDecision`): staging passes when
  neither its mean recall@k nor its mean nDCG@k is more than ``tolerance`` below live's; with
  no live table (a first build) it passes.
- :func:`gate_rebuild` does both for a completed rebuild (:class:`GateConfig`).

The golden-set and metric names are re-exported here, where they were first defined.

Example:
    >>> golden = load_golden_set("golden.jsonl")  # doctest: +SKIP
    >>> live = evaluate(open_vector_table(uri, "docs"), golden, small_encoder)  # doctest: +SKIP
    >>> staging = evaluate(open_vector_table(uri, "docs_4b"), golden, big_encoder)  # doctest: +SKIP
    >>> print(decide(live, staging, tolerance=0.01).summary())  # doctest: +SKIP
    gate passed: staging 'docs_4b' v3 recall@10 0.912 (+0.041), nDCG@10 0.804 (+0.052) vs ...
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from qwen3_pipeline.consumers.vector_search import VectorTable, rerank_plan, search
from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingFailedError,
    GateFailedError,
    SpecMismatchError,
)
from qwen3_pipeline.core.schema import DOC_KEY_COLUMN
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult
from qwen3_pipeline.embedding.options import EncoderOptions
from qwen3_pipeline.embedding.reranker import Reranker
from qwen3_pipeline.lifecycle.golden import (
    GoldenQuery,
    GoldenSet,
    Key,
    load_golden_set,
    parse_golden_set,
)
from qwen3_pipeline.lifecycle.metrics import (
    DEFAULT_K,
    SHOWN_KEYS,
    Evaluation,
    QueryResult,
    RerankComparison,
    check_k,
    mean_score,
    ndcg_at_k,
    recall_at_k,
    score_rankings,
)

__all__ = [
    "DEFAULT_K",
    "SHOWN_KEYS",
    "SHOWN_REGRESSIONS",
    "Evaluation",
    "GateConfig",
    "GateDecision",
    "GoldenQuery",
    "GoldenSet",
    "Key",
    "QueryResult",
    "RerankComparison",
    "check_golden_keys",
    "decide",
    "evaluate",
    "evaluate_with_rerank",
    "gate_rebuild",
    "load_golden_set",
    "ndcg_at_k",
    "parse_golden_set",
    "recall_at_k",
    "reranker_name",
    "score_rankings",
]

# Queries listed in GateDecision.as_dict() as the worst regressions from live to staging.
SHOWN_REGRESSIONS = 5
# Golden keys looked up in the staging table per query of the table (an IN list each).
_KEY_LOOKUP_BATCH = 1_000
# Means are compared with this slack: 0.8 - 0.1 is 0.7000000000000001 in floating point, and a
# tolerance of 0.1 must let a mean of 0.7 through against 0.8.
_EPSILON = 1e-9


def evaluate(
    vectors: VectorTable,
    golden: GoldenSet,
    embedder: Embedder,
    *,
    k: int = DEFAULT_K,
    rerank: Reranker | None = None,
    candidates: int | None = None,
    text_column: str | None = None,
    rerank_instruction: str | None = None,
) -> Evaluation:
    """Search ``vectors`` with every golden query and score the rankings.

    The queries are embedded in one ``embedder.embed_queries`` call (the encoder batches them),
    then each is searched as :func:`~qwen3_pipeline.consumers.vector_search.search` does: exact
    or ANN cosine search, and on a table of document chunks each document ranked by its best
    chunk. With ``rerank`` the search is search's two-stage one: the ``candidates`` nearest
    documents reordered by the reranker (:func:`evaluate_with_rerank` scores both rankings).

    Args:
        vectors: The pinned table (live or staging).
        golden: The golden set; its keys must have the table's key type.
        embedder: The query embedder of this table's spec (same model, dim and fingerprint;
            chunking aside). Live and staging tables each need their own.
        k: Documents ranked and scored per query.
        rerank: Rerank the vector candidates with this reranker (None: the vector ranking).
        candidates: Vector candidates the reranker scores (default ``max(k, 50)``).
        text_column: The text the reranker reads (default ``chunk_text`` on a chunk table;
            required on a table of whole documents, which stores text only as a carry column).
        rerank_instruction: The reranker's ``Instruct`` (None: its default).

    Returns:
        The table's :class:`Evaluation` (naming the reranker when there is one).

    Raises:
        SpecMismatchError: ``embedder`` follows another spec than the table.
        ConfigError: A bad ``k``, golden keys of another type than the table's keys, or a
            bad reranking option (checked before any query is embedded).
        EmbeddingFailedError: A query could not be embedded.
        StoreError: LanceDB failed to search the table.
    """
    started = time.perf_counter()
    # The reranking options are checked before the model embeds anything.
    pool = _check_rerank(vectors, k, rerank, candidates, text_column, rerank_instruction)
    key_column, embedded = _embed_golden(vectors, golden, embedder, k)
    return _scored(
        vectors,
        golden,
        embedded,
        key_column,
        k,
        started,
        rerank=rerank,
        candidates=pool,
        text_column=text_column,
        rerank_instruction=rerank_instruction,
    )


def evaluate_with_rerank(
    vectors: VectorTable,
    golden: GoldenSet,
    embedder: Embedder,
    reranker: Reranker,
    *,
    k: int = DEFAULT_K,
    candidates: int | None = None,
    text_column: str | None = None,
    rerank_instruction: str | None = None,
) -> RerankComparison:
    """Score ``vectors`` on the golden set by vector search alone and with ``reranker``.

    The queries are embedded once; both rankings search with those vectors (the reranked
    one is :func:`~qwen3_pipeline.consumers.vector_search.search` with ``rerank=``), so the
    difference between the two is the reranking stage alone.

    Args:
        vectors: The pinned table.
        golden: The golden set; its keys must have the table's key type.
        embedder: The query embedder of this table's spec.
        reranker: The reranker (a :class:`~qwen3_pipeline.embedding.reranker.Qwen3Reranker`,
            its Dagster resource, or anything with its ``score`` method).
        k: Documents ranked and scored per query.
        candidates: Vector candidates the reranker scores (default ``max(k, 50)``).
        text_column: The text the reranker reads (see :func:`evaluate`).
        rerank_instruction: The reranker's ``Instruct`` (None: its default).

    Returns:
        Both evaluations, side by side (:class:`RerankComparison`).

    Raises:
        SpecMismatchError: ``embedder`` follows another spec than the table.
        ConfigError: A bad ``k`` or reranking option, or golden keys of the wrong type.
        EmbeddingFailedError: A query could not be embedded.
        StoreError: LanceDB failed to search the table.

    Example:
        >>> comparison = evaluate_with_rerank(  # doctest: +SKIP
        ...     vectors, golden, encoder, Qwen3Reranker("Qwen/Qwen3-Reranker-0.6B"),
        ...     k=10, candidates=50, text_column="text")
        >>> print(comparison.summary())  # doctest: +SKIP
        'docs' v7: recall@10 0.712 -> 0.803 (+0.091), nDCG@10 0.540 -> 0.655 (+0.115) ...
    """
    started = time.perf_counter()
    # The reranking options are checked before the model embeds anything.
    pool = _check_rerank(vectors, k, reranker, candidates, text_column, rerank_instruction)
    key_column, embedded = _embed_golden(vectors, golden, embedder, k)
    embedding = time.perf_counter() - started
    vector = _scored(vectors, golden, embedded, key_column, k, started)
    # Each evaluation's time counts the shared query embedding once, plus its own searches.
    reranked = _scored(
        vectors,
        golden,
        embedded,
        key_column,
        k,
        time.perf_counter() - embedding,
        rerank=reranker,
        candidates=pool,
        text_column=text_column,
        rerank_instruction=rerank_instruction,
    )
    return RerankComparison(vector=vector, reranked=reranked)


def _embed_golden(
    vectors: VectorTable, golden: GoldenSet, embedder: Embedder, k: int
) -> tuple[str, "_EmbeddedQueries"]:
    """Check the inputs, then embed every golden query in one call."""
    check_k(k)
    _check_embedder(vectors, embedder)
    key_column = DOC_KEY_COLUMN if vectors.chunked else "key"
    _check_key_type(vectors, key_column, golden)
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
    return key_column, _EmbeddedQueries(
        embedder.spec, dict(zip(texts, encoded.vectors, strict=True))
    )


def _check_rerank(
    vectors: VectorTable,
    k: int,
    rerank: Reranker | None,
    candidates: int | None,
    text_column: str | None,
    instruction: str | None,
) -> int | None:
    """The reranker's candidate count, its options checked before the model or a search runs."""
    if rerank is None:
        # search() would refuse them too, but only once every query has been embedded.
        given = [
            n
            for n, v in (
                ("candidates", candidates),
                ("text_column", text_column),
                ("rerank_instruction", instruction),
            )
            if v is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with rerank= (a reranker)")
        return None
    check_k(k)
    key_column = DOC_KEY_COLUMN if vectors.chunked else "key"
    plan = rerank_plan(
        vectors, k=k, candidates=candidates, text_column=text_column, columns=[key_column]
    )
    return plan.candidates


def _scored(
    vectors: VectorTable,
    golden: GoldenSet,
    embedded: "_EmbeddedQueries",
    key_column: str,
    k: int,
    started: float,
    *,
    rerank: Reranker | None = None,
    candidates: int | None = None,
    text_column: str | None = None,
    rerank_instruction: str | None = None,
) -> Evaluation:
    """Search every golden query (through search(), reranked or not) and score the rankings."""
    options: dict[str, Any] = {}
    if rerank is not None:
        options = {
            "rerank": rerank,
            "candidates": candidates,
            "text_column": text_column,
            "rerank_instruction": rerank_instruction,
        }
    rankings = [
        search(vectors, item.query, k=k, embedder=embedded, columns=[key_column], **options)
        .column(key_column)
        .to_pylist()
        for item in golden.queries
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
        recall=mean_score(r.recall for r in results),
        ndcg=mean_score(r.ndcg for r in results),
        queries=results,
        seconds=time.perf_counter() - started,
        reranker=None if rerank is None else reranker_name(rerank),
        candidates=candidates if rerank is not None else None,
    )


def reranker_name(reranker: Reranker) -> str:
    """What an evaluation calls a reranker: its ``model`` (hub id or path), else its type.

    Example:
        >>> class Overlap:
        ...     def score(self, query, documents, instruction=None):
        ...         return [0.0 for _ in documents]
        >>> reranker_name(Overlap())
        'Overlap'
    """
    model = getattr(reranker, "model", None)
    return model if isinstance(model, str) and model else type(reranker).__name__


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
    kind = "an integer" if golden.key_type is int else "a string"
    column = f"{key_column} (the document keys of this chunk table)" if vectors.chunked else "key"
    raise ConfigError(
        f"golden set {golden.source!r} lists {kind} keys (line {item.line}: "
        f"{item.relevant[0]!r}) but table {vectors.name!r} has {arrow_type} keys in column "
        f"{column}; no key would ever match. Write the keys as JSON "
        f"{'numbers' if table_type is int else 'strings'}, as the source's key column holds them"
    )


def check_golden_keys(vectors: VectorTable, golden: GoldenSet) -> None:
    """Refuse a golden set whose relevant keys are not all in ``vectors``.

    A key the table does not hold can never be found: a query whose keys are all missing
    scores 0 on both tables, and a gate over such a set passes any rebuild at 0.000 >= 0.000.
    The gate checks the staging table, which holds the whole current source (a live table
    may lack documents added since, and that only lowers its score). On a table of document
    chunks the keys are document keys (``doc_key``).

    Raises:
        ConfigError: Keys of another type than the table's, or keys the table does not hold
            (the message names a few and says how many).
        StoreError: LanceDB failed to read the key column.
    """
    from lancedb.expr import col

    from qwen3_pipeline.store import store_error

    key_column = DOC_KEY_COLUMN if vectors.chunked else "key"
    _check_key_type(vectors, key_column, golden)
    wanted = list(dict.fromkeys(key for item in golden.queries for key in item.relevant))
    found: set[Key] = set()
    try:
        for start in range(0, len(wanted), _KEY_LOOKUP_BATCH):
            part = wanted[start : start + _KEY_LOOKUP_BATCH]
            query = vectors.table.search().where(col(key_column).isin(part)).select([key_column])
            for batch in query.to_batches(batch_size=65_536):
                found.update(batch.column(key_column).to_pylist())
    except Exception as e:  # a missing data file, I/O: typed at the LanceDB boundary
        raise store_error(e, f"read the keys of table {vectors.name!r}") from e
    missing = [key for key in wanted if key not in found]
    if not missing:
        return
    lines = {key: item.line for item in reversed(golden.queries) for key in item.relevant}
    shown = ", ".join(f"{key!r} (line {lines[key]})" for key in missing[:SHOWN_KEYS])
    more = f" and {len(missing) - SHOWN_KEYS} more" if len(missing) > SHOWN_KEYS else ""
    raise ConfigError(
        f"golden set {golden.source!r} lists {len(missing)} of its {len(wanted)} relevant "
        f"key(s) that table {vectors.name!r} does not hold: {shown}{more}. A key that is "
        "not in the table can never be found (such a gate would pass anything); fix or "
        "remove those keys (they are the source's key values"
        f"{', document keys of a chunk table' if vectors.chunked else ''})"
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


def check_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float, checked: a number from 0 to 1.

    Raises:
        ConfigError: It is not (a percentage such as 5 instead of 0.05, a string...).
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
    return float(tolerance)


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
    tolerance = check_tolerance(tolerance)
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


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """A gate on a rebuild: swap the staging table in only if it scores as well as live.

    Args:
        golden: The golden set (:func:`load_golden_set`).
        tolerance: How much lower than live's mean recall@k and nDCG@k staging may score.
        k: Documents ranked and scored per query.
        live_embedder: The query embedder of the live table's spec; None builds a Qwen3
            encoder for it (another model than the rebuild's, for a model upgrade) with
            ``live_encoder``, and frees it once the live table is scored.
        live_encoder: How to build that encoder: the run's device, dtype and batch budget
            (default: ``auto`` for each).

    Raises:
        ConfigError: ``tolerance`` is not from 0 to 1, or ``k`` not a positive integer.

    Example:
        >>> golden = parse_golden_set(['{"query": "q", "relevant": [1]}'])
        >>> GateConfig(golden=golden, live_encoder=EncoderOptions(device="cpu")).live_encoder.device
        'cpu'
    """

    golden: GoldenSet
    tolerance: float = 0.0
    k: int = DEFAULT_K
    live_embedder: Embedder | None = None
    live_encoder: EncoderOptions = field(default_factory=EncoderOptions)

    def __post_init__(self) -> None:
        # Checked here, before the rebuild embeds anything, not by the gate hours later.
        object.__setattr__(self, "tolerance", check_tolerance(self.tolerance))
        check_k(self.k)


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
    spec: for the live table ``config.live_embedder``, or an encoder built here with
    ``config.live_encoder`` and closed before this returns (or raises).

    Raises:
        ConfigError: Golden keys of another type than the tables' keys, relevant keys that
            the staging table does not hold (:func:`check_golden_keys`), or a bad setting.
        EmbeddingFailedError: A query could not be embedded.
        ModelLoadError: The live table's encoder could not be loaded.
        StoreError: LanceDB failed.
    """
    import lancedb

    from qwen3_pipeline.consumers.vector_search import open_vector_table
    from qwen3_pipeline.store import list_table_names

    staging = open_vector_table(
        uri, staging_table, version=staging_version, storage_options=storage_options
    )
    check_golden_keys(staging, config.golden)
    staged = evaluate(staging, config.golden, staging_embedder, k=config.k)
    live_eval = None
    db = lancedb.connect(uri, storage_options=storage_options)
    if live_table in list_table_names(db):
        live = open_vector_table(uri, live_table, storage_options=storage_options)
        if config.live_embedder is not None:
            live_eval = evaluate(live, config.golden, config.live_embedder, k=config.k)
        else:
            # A second model beside the rebuild's: on the run's device, and freed right after.
            built = config.live_encoder.build(live.spec)
            try:
                live_eval = evaluate(live, config.golden, built, k=config.k)
            finally:
                _close(built)
    return decide(live_eval, staged, tolerance=config.tolerance)


def _close(embedder: Embedder) -> None:
    close = getattr(embedder, "close", None)
    if close is not None:
        close()
