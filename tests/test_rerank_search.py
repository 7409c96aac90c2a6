"""Two-stage search: vector candidates reranked, on row and chunk tables; the Dagster resource
and the Airflow hook method that drive it."""

import dagster as dg
import numpy as np
import pytest

from qwen3_pipeline.consumers.vector_search import (
    RerankPlan,
    open_vector_table,
    rerank_plan,
    search,
)
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.reranker_resource import Qwen3RerankerResource, RerankerLoadFailure
from qwen3_pipeline.embedding.reranker import Qwen3Reranker
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.chunk_tables import (
    CHUNK_SPEC,
    CHUNKING,
    ROW_SPEC,
    chunk_text,
    title,
    write_chunk_table,
    write_row_table,
)
from tests.reranker_reference import build_tiny_reranker_checkpoint

QUERY = "how do chunks rank?"
# Document key -> each chunk's cosine similarity to QUERY's vector. By vector, the documents
# come 1, 2, 3, 4 (best chunks 1#0, 2#1, 3#0, 4#1).
DOCS = {1: [0.95, 0.90, 0.85], 2: [0.30, 0.80], 3: [0.70], 4: [0.10, 0.20]}
# The scripted reranker's opinion of each best chunk: it prefers 3, then 4, 2, 1.
BEST_CHUNK_SCORES = {
    chunk_text(1, 0): 0.1,
    chunk_text(2, 1): 0.5,
    chunk_text(3, 0): 0.9,
    chunk_text(4, 1): 0.8,
}
MAX_LENGTH = 256


class ScriptedReranker:
    """Scores texts from a table (unknown texts score 0) and records every call."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[tuple[str, list[str], str | None]] = []

    def score(self, query, documents, instruction=None):
        self.calls.append((query, list(documents), instruction))
        return [self.scores.get(text, 0.0) for text in documents]


@pytest.fixture
def vectors(tmp_path):
    spec = CHUNK_SPEC
    write_chunk_table(tmp_path, "chunks", fake_vector(spec.format_query(QUERY), 32), DOCS)
    return open_vector_table(str(tmp_path), "chunks")


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return build_tiny_reranker_checkpoint(tmp_path_factory.mktemp("tiny_reranker") / "model")


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    return Qwen3Reranker(str(reranker_dir), device="cpu", max_length=MAX_LENGTH)


def _search(vectors, k, **options):
    return search(vectors, QUERY, k=k, embedder=FakeEmbedder(CHUNK_SPEC), **options)


def test_documents_are_reordered_by_the_rerankers_score(vectors):
    reranker = ScriptedReranker(BEST_CHUNK_SCORES)
    hits = _search(vectors, 2, rerank=reranker, candidates=4, rerank_instruction="Find it")
    assert hits.column("doc_key").to_pylist() == [3, 4]
    assert hits.column("rerank_score").to_pylist() == pytest.approx([0.9, 0.8])
    # The vector stage's score stays beside the reranker's.
    assert hits.column("similarity").to_pylist() == pytest.approx([0.70, 0.20], abs=1e-5)
    assert hits.column_names[-2:] == ["similarity", "rerank_score"]
    # The reranker read each candidate document's best chunk, in vector order, once.
    assert reranker.calls == [
        (QUERY, [chunk_text(1, 0), chunk_text(2, 1), chunk_text(3, 0), chunk_text(4, 1)], "Find it")
    ]


def test_candidates_bound_what_the_reranker_sees(vectors):
    reranker = ScriptedReranker(BEST_CHUNK_SCORES)
    hits = _search(vectors, 2, rerank=reranker, candidates=3)
    assert hits.column("doc_key").to_pylist() == [3, 2]
    assert len(reranker.calls[0][1]) == 3
    # By default max(k, 50) candidates: here the whole table.
    everything = ScriptedReranker(BEST_CHUNK_SCORES)
    _search(vectors, 2, rerank=everything)
    assert len(everything.calls[0][1]) == 4


def test_raw_chunks_are_reranked_too(vectors):
    scores = {chunk_text(1, 2): 0.7, chunk_text(2, 1): 0.6}
    hits = _search(vectors, 2, chunks=True, rerank=ScriptedReranker(scores), candidates=4)
    assert hits.column("key").to_pylist() == ["1#2", "2#1"]
    assert hits.column("rerank_score").to_pylist() == pytest.approx([0.7, 0.6])


def test_the_text_read_is_not_returned_unless_asked(vectors):
    hits = _search(vectors, 2, columns=["title"], rerank=ScriptedReranker(BEST_CHUNK_SCORES))
    assert hits.column_names == ["doc_key", "title", "similarity", "rerank_score"]
    assert hits.column("title").to_pylist() == [title(3), title(4)]


def test_ties_keep_the_vector_order(vectors):
    hits = _search(vectors, 4, rerank=ScriptedReranker({}))
    assert hits.column("doc_key").to_pylist() == [1, 2, 3, 4]


def test_a_row_table_reranks_a_carried_text_column(tmp_path):
    write_row_table(tmp_path, "rows", fake_vector(ROW_SPEC.format_query(QUERY), 32), [0.2, 0.9])
    rows = open_vector_table(str(tmp_path), "rows")
    embedder = FakeEmbedder(ROW_SPEC)
    reranker = ScriptedReranker({title(0): 0.9, title(1): 0.1})
    hits = search(rows, QUERY, k=2, embedder=embedder, rerank=reranker, text_column="title")
    assert hits.column("key").to_pylist() == [0, 1]
    with pytest.raises(ConfigError, match="stores no text"):
        search(rows, QUERY, k=2, embedder=embedder, rerank=reranker)
    with pytest.raises(ConfigError, match="'body' is not a text column"):
        search(rows, QUERY, k=2, embedder=embedder, rerank=reranker, text_column="body")


def test_the_plan_is_checked_without_a_model(vectors):
    # What a driver (the CLI) checks before it loads either model.
    assert rerank_plan(vectors, k=2) == RerankPlan(candidates=50, text_column="chunk_text")
    assert rerank_plan(vectors, k=80).candidates == 80
    with pytest.raises(ConfigError, match="at least k=5"):
        rerank_plan(vectors, k=5, candidates=4)


def test_bad_reranking_options_are_refused(vectors):
    reranker = ScriptedReranker({})
    with pytest.raises(ConfigError, match="at least k=3"):
        _search(vectors, 3, rerank=reranker, candidates=2)
    with pytest.raises(ConfigError, match="only with rerank="):
        _search(vectors, 3, candidates=20)
    with pytest.raises(ConfigError, match="score"):
        _search(vectors, 3, rerank=object())
    with pytest.raises(ConfigError, match="rerank_score"):
        _search(vectors, 3, rerank=reranker, columns=["rerank_score"])
    assert not reranker.calls


def test_the_qwen3_reranker_orders_real_candidates(vectors, reranker):
    hits = _search(vectors, 3, rerank=reranker, candidates=4)
    scores = hits.column("rerank_score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    texts = hits.column("chunk_text").to_pylist()
    assert np.allclose(reranker.score(QUERY, texts), scores, atol=1e-6)
    everything = reranker.score(
        QUERY, [chunk_text(d, s) for d, s in ((1, 0), (2, 1), (3, 0), (4, 1))]
    )
    assert scores == pytest.approx(sorted(everything, reverse=True)[:3], abs=1e-6)


# --------------------------------------------------------------------------- drivers


def test_the_dagster_resource_loads_on_first_score_and_reranks_in_an_asset(
    vectors, reranker_dir, reranker
):
    resource = Qwen3RerankerResource(model=str(reranker_dir), device="cpu", max_length=MAX_LENGTH)
    assert not resource.loaded

    @dg.asset(pool="gpu")
    def reranked(reranker: Qwen3RerankerResource) -> dg.MaterializeResult:
        hits = _search(vectors, 2, rerank=reranker, candidates=4)
        return dg.MaterializeResult(metadata={"best": hits.column("rerank_score")[0].as_py()})

    result = dg.materialize([reranked], resources={"reranker": resource})
    assert result.success
    best = max(reranker.score(QUERY, list(BEST_CHUNK_SCORES)))
    metadata = result.asset_materializations_for_node("reranked")[0].metadata
    assert metadata["best"].value == pytest.approx(best, abs=1e-6)


def test_the_dagster_resource_reports_a_missing_checkpoint(tmp_path):
    resource = Qwen3RerankerResource(model=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(RerankerLoadFailure, match="local Qwen3-Reranker checkpoint"):
        resource.score(QUERY, ["text"])


def test_the_airflow_hook_searches_with_a_reranker(tmp_path, tiny_model_dir, reranker_dir):
    pytest.importorskip("airflow")
    from qwen3_pipeline.airflow.hooks import LanceDBHook
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    spec = EmbeddingSpec(model=str(tiny_model_dir), dim=32).with_chunking(CHUNKING)
    encoder = Qwen3Encoder(spec, device="cpu", progress=False)
    write_chunk_table(tmp_path, "chunks", encoder.encode_queries([QUERY])[0], DOCS, spec=spec)
    hook = LanceDBHook(None, uri=str(tmp_path))
    plain = hook.search("chunks", QUERY, k=2, device="cpu")
    assert [h["doc_key"] for h in plain] == [1, 2]
    assert "rerank_score" not in plain[0]
    hits = hook.search(
        "chunks", QUERY, k=2, rerank_model=str(reranker_dir), candidates=4, device="cpu"
    )
    scores = [h["rerank_score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {h["doc_key"] for h in hits} <= set(DOCS)
