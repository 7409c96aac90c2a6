"""The golden-set evaluation with and without reranking: the gate's API and the demo's asset.

A scripted reranker (word overlap, deterministic) shows reranking lift a known vector ranking;
the tiny random-weight Qwen3 reranker checks that the real model runs through the same path
(its scores are meaningless, so only the shape of the result is checked).
"""

import json
import re

import dagster as dg
import pyarrow as pa
import pytest

from qwen3_pipeline.consumers.vector_search import open_vector_table
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster import consumer_assets as consumers
from qwen3_pipeline.dagster.embedding_asset import build_embedding_asset
from qwen3_pipeline.dagster.reranker_resource import Qwen3RerankerResource
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, LanceDBResource
from qwen3_pipeline.demo import location
from qwen3_pipeline.embedding.reranker import Qwen3Reranker
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.lifecycle.gate import evaluate, evaluate_with_rerank, reranker_name
from qwen3_pipeline.lifecycle.golden import parse_golden_set
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder
from tests.reranker_reference import build_tiny_reranker_checkpoint

SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
# The text is embedded and also carried, so the reranker can read it from the table.
CONFIG = SourceConfig(key="id", text_columns=("body",), carry=("text",))
BODIES = [f"Document {i} explains topic {i * 7 % 13} with example {i * 3}." for i in range(20)]
K = 3


class OverlapReranker:
    """Scores a document by the share of the query's words it contains (deterministic)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, query, documents, instruction=None):
        self.calls.append(len(documents))
        words = set(_words(query))
        return [len(words & set(_words(doc))) / len(words) for doc in documents]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _source() -> ArrowSource:
    ids = list(range(len(BODIES)))
    return ArrowSource(pa.table({"id": ids, "body": BODIES, "text": BODIES}))


@pytest.fixture
def vectors(tmp_path):
    refresh(
        source=_source(),
        config=CONFIG,
        embedder=FakeEmbedder(SPEC),
        db_uri=str(tmp_path),
        table="docs",
        progress=False,
    )
    return open_vector_table(str(tmp_path), "docs")


# Each query is a document's own text: word overlap ranks that document first, while the fake
# embedder's query vectors (of the query prompt + text) rank it arbitrarily.
GOLDEN_LINES = [json.dumps({"query": BODIES[i], "relevant": [i]}) for i in (2, 5, 11, 17)]
GOLDEN = parse_golden_set(GOLDEN_LINES)


def test_reranking_lifts_a_known_vector_ranking(vectors):
    embedder, reranker = FakeEmbedder(SPEC), OverlapReranker()
    comparison = evaluate_with_rerank(
        vectors, GOLDEN, embedder, reranker, k=K, candidates=20, text_column="text"
    )
    assert embedder.calls == [len(GOLDEN)]  # both rankings share one embedding call
    assert reranker.calls == [20] * len(GOLDEN)
    # The vector half is exactly what evaluate() without a reranker reports.
    alone = evaluate(vectors, GOLDEN, FakeEmbedder(SPEC), k=K)
    assert [q.top_keys for q in comparison.vector.queries] == [q.top_keys for q in alone.queries]
    assert (comparison.vector.recall, comparison.vector.ndcg) == (alone.recall, alone.ndcg)
    assert comparison.vector.recall < 1.0  # the fake vectors miss some known items
    # Reranked over all 20 documents, every known item comes first.
    assert (comparison.reranked.recall, comparison.reranked.ndcg) == (1.0, 1.0)
    assert [q.top_keys[0] for q in comparison.reranked.queries] == [2, 5, 11, 17]
    assert comparison.recall_delta == pytest.approx(1.0 - alone.recall)
    assert comparison.ndcg_delta == pytest.approx(1.0 - alone.ndcg)
    assert (comparison.reranked.reranker, comparison.reranked.candidates) == ("OverlapReranker", 20)
    assert comparison.vector.reranker is None
    assert comparison.vector.candidates is None
    as_dict = comparison.as_dict(per_query=True)
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert (as_dict["k"], as_dict["candidates"], as_dict["reranker"]) == (K, 20, "OverlapReranker")
    assert as_dict["reranked"]["recall"] == 1.0
    assert "reranker" not in as_dict["vector"]
    assert "reranked by OverlapReranker over 20 candidates" in comparison.summary()


def test_evaluate_with_rerank_returns_the_reranked_evaluation(vectors):
    reranked = evaluate(
        vectors, GOLDEN, FakeEmbedder(SPEC), k=K, rerank=OverlapReranker(), text_column="text"
    )
    assert (reranked.recall, reranked.ndcg) == (1.0, 1.0)
    assert reranked.candidates == 50  # search's default, max(k, 50)
    assert "reranked by OverlapReranker over 50 candidates" in reranked.summary()


def test_reranking_only_the_k_nearest_cannot_change_recall(vectors):
    comparison = evaluate_with_rerank(
        vectors,
        GOLDEN,
        FakeEmbedder(SPEC),
        OverlapReranker(),
        k=K,
        candidates=K,
        text_column="text",
    )
    assert comparison.reranked.recall == comparison.vector.recall
    assert comparison.reranked.ndcg >= comparison.vector.ndcg


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rerank": OverlapReranker()}, "text_column"),  # a row table stores no text
        ({"rerank": OverlapReranker(), "text_column": "nope"}, "nope"),
        ({"rerank": OverlapReranker(), "text_column": "text", "candidates": 2}, "at least k"),
        ({"candidates": 10}, "only with rerank="),
        ({"text_column": "text"}, "only with rerank="),
    ],
)
def test_bad_rerank_options_fail_before_any_query_is_embedded(vectors, options, match):
    embedder = FakeEmbedder(SPEC)
    with pytest.raises(ConfigError, match=match):
        evaluate(vectors, GOLDEN, embedder, k=K, **options)
    assert embedder.calls == []


def test_reranker_name_is_the_model_or_the_type():
    assert reranker_name(OverlapReranker()) == "OverlapReranker"
    assert reranker_name(Qwen3RerankerResource(model="some/reranker")) == "some/reranker"


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return build_tiny_reranker_checkpoint(tmp_path_factory.mktemp("tiny_reranker") / "model")


def test_the_tiny_qwen3_reranker_runs_through_the_evaluation(vectors, reranker_dir):
    reranker = Qwen3Reranker(str(reranker_dir), device="cpu", max_length=128)
    try:
        comparison = evaluate_with_rerank(
            vectors, GOLDEN, FakeEmbedder(SPEC), reranker, k=K, candidates=8, text_column="text"
        )
    finally:
        reranker.close()
    reranked = comparison.reranked
    assert reranked.reranker == str(reranker_dir)
    assert reranked.candidates == 8
    assert 0.0 <= reranked.recall <= 1.0
    assert 0.0 <= reranked.ndcg <= 1.0
    assert [len(q.top_keys) for q in reranked.queries] == [K] * len(GOLDEN)


# --------------------------------------------------------------------------- the demo asset


def _eval_pipeline(tmp_path, reranker_key):
    embedding = build_embedding_asset(
        key="document_vectors",
        source=_source,
        source_config=CONFIG,
        spec=FakeEmbedderResource(dim=32).embedding_spec(),
        table="documents",
        partitioning=None,
        retry_policy=None,
    )
    golden_path = tmp_path / "golden.jsonl"
    golden_path.write_text("".join(line + "\n" for line in GOLDEN_LINES), "utf-8")
    evaluation = consumers.build_golden_rerank_eval_asset(
        embedding_asset=embedding,
        golden_set=golden_path,
        text_column="text",
        k=K,
        candidates=8,
        reranker_key=reranker_key,
        note=location.DEMO_EVAL_NOTE,
        group_name=location.EVALUATION_GROUP,
    )
    return embedding, evaluation


def _materialize(tmp_path, assets, **resources):
    result = dg.materialize(
        assets,
        resources={
            "embedder": FakeEmbedderResource(dim=32),
            "lancedb": LanceDBResource(uri=str(tmp_path / "lancedb")),
            **resources,
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (event,) = result.asset_materializations_for_node("golden_rerank_eval")
    return {k: getattr(v, "value", v) for k, v in event.metadata.items()}


def test_the_eval_asset_records_both_rankings_with_the_tiny_reranker(tmp_path, reranker_dir):
    embedding, evaluation = _eval_pipeline(tmp_path, "reranker")
    assert evaluation.group_names_by_key[evaluation.key] == "evaluation"
    assert "mean nothing" in (evaluation.descriptions_by_key[evaluation.key] or "")
    reranker = Qwen3RerankerResource(model=str(reranker_dir), device="cpu", max_length=128)
    meta = _materialize(tmp_path, [embedding, evaluation], reranker=reranker)
    for name in (consumers.EVAL_RECALL, consumers.EVAL_NDCG):
        assert 0.0 <= meta[name] <= 1.0
    for name in (consumers.EVAL_RERANKED_RECALL, consumers.EVAL_RERANKED_NDCG):
        assert 0.0 <= meta[name] <= 1.0
    assert meta[consumers.EVAL_RECALL_DELTA] == pytest.approx(
        meta[consumers.EVAL_RERANKED_RECALL] - meta[consumers.EVAL_RECALL], abs=2e-6
    )
    assert meta[consumers.EVAL_NDCG_DELTA] == pytest.approx(
        meta[consumers.EVAL_RERANKED_NDCG] - meta[consumers.EVAL_NDCG], abs=2e-6
    )
    assert (meta[consumers.EVAL_K], meta[consumers.EVAL_CANDIDATES]) == (K, 8)
    assert meta[consumers.EVAL_RERANKER] == str(reranker_dir)
    assert meta[consumers.EVAL_QUERIES] == len(GOLDEN)
    assert "mean nothing" in meta[consumers.EVAL_NOTE]


def test_the_eval_asset_without_a_reranker_scores_vectors_and_says_so(tmp_path):
    embedding, evaluation = _eval_pipeline(tmp_path, None)
    assert "reranking skipped" in (evaluation.descriptions_by_key[evaluation.key] or "")
    meta = _materialize(tmp_path, [embedding, evaluation])
    assert 0.0 <= meta[consumers.EVAL_RECALL] <= 1.0
    assert "skipped" in meta[consumers.EVAL_RERANKER]
    assert consumers.EVAL_RERANKED_RECALL not in meta


def test_demo_settings_read_the_reranker_from_the_environment():
    assert location.DemoSettings.from_env({}).rerank_model is None
    env = {location.RERANK_MODEL_ENV: " Qwen/Qwen3-Reranker-0.6B "}
    assert location.DemoSettings.from_env(env).rerank_model == "Qwen/Qwen3-Reranker-0.6B"


def test_the_eval_asset_skips_an_empty_golden_set(tmp_path):
    embedding, evaluation = _eval_pipeline(tmp_path, None)
    (tmp_path / "golden.jsonl").write_text("\n", "utf-8")
    meta = _materialize(tmp_path, [embedding, evaluation])
    assert meta[consumers.SKIPPED] is True
    assert "holds no query" in meta[consumers.REASON]
