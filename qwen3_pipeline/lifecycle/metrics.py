"""Ranking metrics of a golden set: recall@k and nDCG@k per query, and a table's means.

- :func:`recall_at_k` and :func:`ndcg_at_k` score one ranking (pure, binary relevance);
- :func:`score_rankings` scores each golden query's ranking (a :class:`QueryResult` each);
- :class:`Evaluation` holds one table's scores on a golden set, their means and the table;
- :class:`RerankComparison` holds one table's scores without and with a reranking stage.

Everything here is pure: rankings come from
:func:`~qwen3_pipeline.lifecycle.gate.evaluate`, which searches a table.
"""

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.lifecycle.golden import GoldenSet, Key

DEFAULT_K = 10
# Ranked keys kept per query in an Evaluation: enough to see what a table answered instead.
SHOWN_KEYS = 5


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
    check_k(k)
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
    check_k(k)
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


def check_k(k: int) -> None:
    """Check that ``k`` is a positive integer.

    Raises:
        ConfigError: It is not.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer (e.g. 10), got {k!r}")


def mean_score(values: Iterable[float]) -> float:
    """The mean of per-query scores (0.0 for none), the same whatever their order."""
    listed = list(values)
    # fsum: the same per-query scores always give the very same mean, whatever their order.
    return math.fsum(listed) / len(listed) if listed else 0.0


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
        reranker: The reranker that reordered the vector candidates (its model), None for the
            vector ranking alone.
        candidates: Vector candidates the reranker scored per query (None without one).
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
    reranker: str | None = None
    candidates: int | None = None

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
        # Only a reranked evaluation names its reranker: a vector one's dict stays as it was.
        if self.reranker is not None:
            out["reranker"] = self.reranker
            out["candidates"] = self.candidates
        if per_query:
            out["per_query"] = [q.as_dict() for q in self.queries]
        return out

    def summary(self) -> str:
        """One line: the table and its means."""
        reranked = (
            ""
            if self.reranker is None
            else f", reranked by {self.reranker} over {self.candidates} candidates"
        )
        return (
            f"{self.table!r} v{self.version} ({self.model}, dim {self.dim}{reranked}): "
            f"recall@{self.k} {self.recall:.3f}, nDCG@{self.k} {self.ndcg:.3f} "
            f"over {len(self.queries)} queries"
        )


@dataclass(frozen=True, kw_only=True)
class RerankComparison:
    """One table's scores on a golden set by vector search alone and with a reranking stage.

    Both rankings come from the same query vectors; the reranked one reorders the vector
    stage's ``candidates`` nearest documents, so with ``candidates == k`` its recall@k equals
    the vector one's and only nDCG@k can move.

    Attributes:
        vector: The vector ranking's evaluation.
        reranked: The reranked ranking's evaluation.
    """

    vector: Evaluation
    reranked: Evaluation

    @property
    def recall_delta(self) -> float:
        """Reranked mean recall@k minus the vector one."""
        return self.reranked.recall - self.vector.recall

    @property
    def ndcg_delta(self) -> float:
        """Reranked mean nDCG@k minus the vector one."""
        return self.reranked.ndcg - self.vector.ndcg

    def as_dict(self, *, per_query: bool = False) -> dict[str, Any]:
        """A JSON-ready dict of both rankings and the change.

        Keys: ``k``, ``candidates``, ``reranker``, ``queries``, both evaluations (``vector``,
        ``reranked``: :meth:`Evaluation.as_dict`), ``recall_delta`` and ``ndcg_delta``.
        """
        return {
            "k": self.vector.k,
            "candidates": self.reranked.candidates,
            "reranker": self.reranked.reranker,
            "queries": len(self.vector.queries),
            "vector": self.vector.as_dict(per_query=per_query),
            "reranked": self.reranked.as_dict(per_query=per_query),
            "recall_delta": round(self.recall_delta, 6),
            "ndcg_delta": round(self.ndcg_delta, 6),
        }

    def summary(self) -> str:
        """One line: both rankings' means and the change reranking made."""
        k, vector, reranked = self.vector.k, self.vector, self.reranked
        return (
            f"{vector.table!r} v{vector.version}: recall@{k} {vector.recall:.3f} -> "
            f"{reranked.recall:.3f} ({self.recall_delta:+.3f}), nDCG@{k} {vector.ndcg:.3f} -> "
            f"{reranked.ndcg:.3f} ({self.ndcg_delta:+.3f}) reranked by {reranked.reranker} "
            f"over {reranked.candidates} candidates, {len(vector.queries)} queries"
        )


def score_rankings(
    golden: GoldenSet, rankings: Sequence[Sequence[Key]], *, k: int = DEFAULT_K
) -> tuple[QueryResult, ...]:
    """Score each golden query's ranking (pure; ``evaluate`` gets the rankings by search).

    Args:
        golden: The golden set.
        rankings: One ranking per golden query, in its order, best first.
        k: Ranked keys scored per query.

    Raises:
        ConfigError: Not one ranking per query, or a bad ``k``.

    Example:
        >>> from qwen3_pipeline.lifecycle.golden import parse_golden_set
        >>> golden = parse_golden_set(['{"query": "q", "relevant": [2]}'])
        >>> score_rankings(golden, [[1, 2, 3]], k=2)[0].found
        1
    """
    check_k(k)
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
