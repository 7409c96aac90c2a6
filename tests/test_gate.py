"""The blue/green gate: golden-set parsing, metrics, evaluation on real tables, the decision.

Tables are built by the refresh engine with FakeEmbedder (document vectors are
``fake_vector(text, dim)``), so rankings are recomputed here independently; a hand-built chunk
table (tests.chunk_tables) gives exactly known similarities; one test runs the tiny real Qwen3
checkpoint end to end.
"""

import dataclasses
import doctest
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.consumers.vector_search import open_vector_table
from qwen3_pipeline.core.errors import ConfigError, GateFailedError, SpecMismatchError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.options import EncoderOptions
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.lifecycle import gate, metrics
from qwen3_pipeline.lifecycle import golden as golden_module
from qwen3_pipeline.lifecycle.gate import GateConfig, decide, evaluate, gate_rebuild
from qwen3_pipeline.lifecycle.golden import GoldenSet, load_golden_set, parse_golden_set
from qwen3_pipeline.lifecycle.metrics import Evaluation, QueryResult, ndcg_at_k, recall_at_k
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.chunk_tables import CHUNK_SPEC, write_chunk_table

LIVE_SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
STAGING_SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
CONFIG = SourceConfig(key="id", text_columns=("body",))
BODIES = [f"Document {i} explains topic {i * 7 % 13} with example {i * 3}." for i in range(20)]
INV_LOG2_3 = 1 / math.log2(3)  # the gain at rank 2


class MirrorEmbedder(FakeEmbedder):
    """Embeds a query exactly like a document of the same text, so it finds that document."""

    def embed_queries(self, queries):
        return self.embed_documents(queries)


def build(db, table, embedder, source=None, config=CONFIG):
    source = source or ArrowSource(pa.table({"id": list(range(len(BODIES))), "body": BODIES}))
    refresh(
        source=source,
        config=config,
        embedder=embedder,
        db_uri=str(db),
        table=table,
        progress=False,
    )
    return open_vector_table(str(db), table)


def golden_of(pairs):
    """A golden set from ``(query, relevant keys)`` pairs."""
    return parse_golden_set([json.dumps({"query": q, "relevant": list(r)}) for q, r in pairs])


def scored(recall, ndcg, *, per_query=None, k=10, table="t", queries=("q",)):
    """A hand-made evaluation; ``per_query`` gives each query's (recall, ndcg)."""
    per_query = per_query or [(recall, ndcg)] * len(queries)
    results = tuple(
        QueryResult(query=q, recall=r, ndcg=n, found=0, relevant=1, top_keys=())
        for q, (r, n) in zip(queries, per_query, strict=True)
    )
    return Evaluation(
        table=table,
        uri="db",
        version=3,
        model="m",
        dim=32,
        spec_fingerprint="f",
        chunked=False,
        golden_set="golden.jsonl",
        k=k,
        recall=recall,
        ndcg=ndcg,
        queries=results,
        seconds=0.1,
    )


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("ranked", "relevant", "k", "expected"),
    [
        (["a", "x", "b", "y"], {"a", "b", "c", "d"}, 3, 0.5),
        (["a", "x", "b", "y"], {"a", "b", "c", "d"}, 1, 0.25),
        (["x", "y"], {"a"}, 10, 0.0),
        (["a", "a", "b"], {"a", "b"}, 2, 0.5),  # a repeat counts once
        (["b"], {"a", "b"}, 10, 0.5),  # fewer ranked keys than k
        ([1, 2], {1, 2, 3}, 2, 2 / 3),  # more relevant keys than k: divided by all of them
        ([1, 2], {"1"}, 10, 0.0),  # 1 is not "1"
    ],
)
def test_recall_at_k(ranked, relevant, k, expected):
    assert recall_at_k(ranked, relevant, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ranked", "relevant", "k", "expected"),
    [
        (["a", "b"], {"a", "b"}, 10, 1.0),
        (["x", "a"], {"a"}, 10, INV_LOG2_3),
        (["a", "x", "b"], {"a", "b"}, 3, (1 + 1 / math.log2(4)) / (1 + INV_LOG2_3)),
        (["a", "x", "b"], {"a", "b"}, 2, 1 / (1 + INV_LOG2_3)),  # b is past k
        (["x", "y", "a"], {"a", "b", "c"}, 3, 0.5 / (1 + INV_LOG2_3 + 0.5)),
        (["a", "b"], {"a", "b", "c"}, 2, 1.0),  # ideal over min(|relevant|, k) = 2 ranks
        (["a", "a"], {"a", "b"}, 2, 1 / (1 + INV_LOG2_3)),  # a repeat gains nothing
        (["x", "y"], {"a"}, 10, 0.0),
    ],
)
def test_ndcg_at_k(ranked, relevant, k, expected):
    assert ndcg_at_k(ranked, relevant, k) == pytest.approx(expected)


@pytest.mark.parametrize("metric", [recall_at_k, ndcg_at_k])
def test_metrics_refuse_bad_input(metric):
    with pytest.raises(ConfigError, match="relevant is empty"):
        metric(["a"], set())
    for k in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match=f"k must be a positive integer.*{k!r}"):
            metric(["a"], {"a"}, k)


def test_module_examples_hold():
    assert doctest.testmod(gate).failed == 0


@pytest.mark.parametrize("module", [golden_module, metrics])
def test_golden_set_and_metric_examples_hold(module):
    assert doctest.testmod(module).failed == 0


def test_gate_keeps_the_names_it_exported_before_the_split():
    for name in ("GoldenQuery", "GoldenSet", "load_golden_set", "parse_golden_set", "Key"):
        assert getattr(gate, name) is getattr(golden_module, name)
    for name in ("Evaluation", "QueryResult", "recall_at_k", "ndcg_at_k", "score_rankings"):
        assert getattr(gate, name) is getattr(metrics, name)
    assert (gate.DEFAULT_K, gate.SHOWN_KEYS, gate.SHOWN_REGRESSIONS) == (10, 5, 5)


def test_a_vector_evaluation_names_no_reranker():
    # The rerank fields default to None and stay out of the dict, so the gate report of a
    # vector evaluation keeps the keys it always had.
    evaluation = scored(0.5, 0.25)
    assert (evaluation.reranker, evaluation.candidates) == (None, None)
    assert "reranker" not in evaluation.as_dict()
    assert "candidates" not in evaluation.as_dict()
    assert "reranked" not in evaluation.summary()
    assert gate.RerankComparison is metrics.RerankComparison


def test_a_rerank_comparison_reports_both_rankings_and_the_deltas():
    vector = scored(0.5, 0.25)
    reranked = dataclasses.replace(scored(0.75, 0.5), reranker="r", candidates=20)
    comparison = metrics.RerankComparison(vector=vector, reranked=reranked)
    assert (comparison.recall_delta, comparison.ndcg_delta) == (0.25, 0.25)
    as_dict = comparison.as_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert (as_dict["k"], as_dict["candidates"], as_dict["reranker"]) == (10, 20, "r")
    assert (as_dict["recall_delta"], as_dict["ndcg_delta"]) == (0.25, 0.25)
    assert (as_dict["vector"]["recall"], as_dict["reranked"]["recall"]) == (0.5, 0.75)
    assert "recall@10 0.500 -> 0.750 (+0.250)" in comparison.summary()


# --------------------------------------------------------------------------- golden set


def test_golden_set_parses_lines_skipping_blank_ones(tmp_path):
    path = tmp_path / "golden.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"query": "first", "relevant": ["a", "b"], "note": "extra fields ok"}\r\n'
        b"\n"
        b"   \n"
        b'{"query": "caf\xc3\xa9 ", "relevant": ["c"]}\n'
    )
    golden = load_golden_set(path)
    assert golden.source == str(path)
    assert len(golden) == 2
    assert golden.key_type is str
    first, second = golden
    assert (first.query, first.relevant, first.line) == ("first", ("a", "b"), 1)
    assert (second.query, second.relevant, second.line) == ("café ", ("c",), 4)


def test_golden_set_integer_keys():
    golden = parse_golden_set(['{"query": "q", "relevant": [3, 1]}'])
    assert golden.key_type is int
    assert golden.queries[0].relevant == (3, 1)


GOOD = '{"query": "fine", "relevant": [1]}'


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([GOOD, '{"query": "b", "relevant": [1]'], r"line 2: not valid JSON"),
        ([GOOD, "", "not json"], r"line 3: not valid JSON"),
        (["[1, 2]"], r"line 1: expected a JSON object .* got list"),
        (['{"relevant": [1]}'], r"line 1: 'query' must be a non-empty string, got None"),
        (['{"query": "  ", "relevant": [1]}'], r"line 1: 'query' must be a non-empty string"),
        (['{"query": 5, "relevant": [1]}'], r"line 1: 'query' must be a non-empty string, got 5"),
        ([GOOD, '{"query": "b"}'], r"line 2: 'relevant' of query 'b' must be a non-empty list"),
        ([GOOD, '{"query": "b", "relevant": []}'], r"line 2: 'relevant' .* got \[\]"),
        (['{"query": "b", "relevant": "k1"}'], r"line 1: 'relevant' .* got 'k1'"),
        (['{"query": "b", "relevant": [1.5]}'], r"line 1: relevant key 1.5 .* \(not an integer\)"),
        (['{"query": "b", "relevant": [true]}'], r"line 1: relevant key True .* boolean"),
        (['{"query": "b", "relevant": [null]}'], r"line 1: relevant key None .* null"),
        (['{"query": "b", "relevant": [[1]]}'], r"line 1: relevant key \[1\] .* array"),
        (['{"query": "b", "relevant": [1, 2, 1]}'], r"line 1: relevant key 1 .* listed twice"),
        (
            [GOOD, "", '{"query": "b", "relevant": ["1"]}'],
            r"line 3: relevant key '1' is a string but key 1 \(line 1\) is an integer",
        ),
        (['{"query": "b", "relevant": [1, "x"]}'], r"line 1: relevant key 'x' is a string"),
        (
            [GOOD, "", '{"query": " fine", "relevant": [2]}'],
            r"line 3: query ' fine' repeats line 1; list each query once",
        ),
        ([], r"holds no query"),
        (["", "  ", "\t"], r"holds no query"),
    ],
)
def test_golden_set_errors_name_the_line(lines, match):
    with pytest.raises(ConfigError, match=match) as caught:
        parse_golden_set(lines, source="gold.jsonl")
    assert "golden set 'gold.jsonl'" in str(caught.value)


def test_golden_set_file_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=r"cannot read golden set .*missing\.jsonl"):
        load_golden_set(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.jsonl' holds no query"):
        load_golden_set(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(GOOD.encode() + b'\n{"query": "caf\xe9", "relevant": [2]}\n')
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8 \(byte 15\)"):
        load_golden_set(latin)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(GOOD + "\n\n{oops\n")
    with pytest.raises(ConfigError, match=r"broken\.jsonl' line 3: not valid JSON"):
        load_golden_set(broken)


# --------------------------------------------------------------------------- evaluate


def _independent_ranking(query: str) -> list[int]:
    """The row table's keys by cosine similarity to ``query``, computed without LanceDB."""
    documents = np.stack([fake_vector(body, LIVE_SPEC.output_dim) for body in BODIES])
    similarities = documents @ fake_vector(LIVE_SPEC.format_query(query), LIVE_SPEC.output_dim)
    return [int(i) for i in np.argsort(-similarities, kind="stable")]


def test_evaluate_row_table_scores_the_searched_ranking(tmp_path):
    vectors = build(tmp_path, "docs", FakeEmbedder(LIVE_SPEC))
    queries = ["which topic is seven?", "examples please", "anything about rivers"]
    ranked = {q: _independent_ranking(q) for q in queries}
    golden = golden_of(
        [
            (queries[0], [ranked[queries[0]][0], ranked[queries[0]][2]]),  # ranks 1 and 3
            (queries[1], [ranked[queries[1]][3]]),  # rank 4, past k
            (queries[2], [ranked[queries[2]][1], ranked[queries[2]][19]]),  # rank 2 and last
        ]
    )
    embedder = FakeEmbedder(LIVE_SPEC)
    result = evaluate(vectors, golden, embedder, k=3)
    assert embedder.calls == [3]  # every query embedded in one call
    expected = [
        (1.0, (1 + 0.5) / (1 + INV_LOG2_3)),
        (0.0, 0.0),
        (0.5, INV_LOG2_3 / (1 + INV_LOG2_3)),
    ]
    assert [q.recall for q in result.queries] == pytest.approx([r for r, _ in expected])
    assert [q.ndcg for q in result.queries] == pytest.approx([n for _, n in expected])
    assert [q.top_keys for q in result.queries] == [tuple(ranked[q][:3]) for q in queries]
    assert [(q.found, q.relevant) for q in result.queries] == [(2, 2), (0, 1), (1, 2)]
    assert result.recall == pytest.approx(1.5 / 3)
    assert result.ndcg == pytest.approx(sum(n for _, n in expected) / 3)
    assert (result.table, result.version, result.uri) == ("docs", vectors.version, str(tmp_path))
    assert (result.model, result.dim, result.k, result.chunked) == (LIVE_SPEC.model, 32, 3, False)
    assert result.spec_fingerprint == LIVE_SPEC.fingerprint
    as_dict = result.as_dict(per_query=True)
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["per_query"][0]["top_keys"] == ranked[queries[0]][:3]
    assert "per_query" not in result.as_dict()
    assert "recall@3 0.500" in result.summary()


def test_blue_green_upgrade_passes_the_better_table_and_refuses_the_worse(tmp_path):
    live_vectors = build(tmp_path, "docs", FakeEmbedder(LIVE_SPEC))
    staging_vectors = build(tmp_path, "docs_staging", MirrorEmbedder(STAGING_SPEC))
    # The mirror embedder finds a document from its own text: staging is perfect; the live
    # table's fake query vectors are unrelated to the documents.
    golden = golden_of([(BODIES[i], [i]) for i in (0, 4, 9, 13, 17)])
    live = evaluate(live_vectors, golden, FakeEmbedder(LIVE_SPEC), k=3)
    staging = evaluate(staging_vectors, golden, MirrorEmbedder(STAGING_SPEC), k=3)
    assert (staging.recall, staging.ndcg) == (1.0, 1.0)
    assert [q.top_keys[0] for q in staging.queries] == [0, 4, 9, 13, 17]
    assert live.ndcg < 1.0
    assert (staging.dim, live.dim) == (64, 32)

    upgrade = decide(live, staging)
    assert upgrade.passed
    upgrade.raise_if_failed()
    assert upgrade.recall_delta == pytest.approx(1.0 - live.recall)
    assert upgrade.regressions() == []

    downgrade = decide(staging, live)  # the worse table as staging
    assert not downgrade.passed
    assert "nDCG@3" in downgrade.reason
    report = downgrade.as_dict()
    assert json.loads(json.dumps(report)) == report
    assert report["live"]["table"] == "docs_staging"
    assert report["staging"]["table"] == "docs"
    assert report["ndcg_delta"] == pytest.approx(live.ndcg - 1.0, abs=1e-6)
    assert report["regressions"][0]["live_ndcg"] == 1.0
    assert report["regressions"][0]["staging_ndcg"] < 1.0
    with pytest.raises(
        GateFailedError, match=r"kept staging 'docs' v\d+ out \(live 'docs_staging'"
    ):
        downgrade.raise_if_failed()


def test_evaluate_refuses_another_specs_embedder_before_embedding(tmp_path):
    vectors = build(tmp_path, "docs", FakeEmbedder(LIVE_SPEC))
    wrong = FakeEmbedder(STAGING_SPEC)
    with pytest.raises(SpecMismatchError, match=r"table 'docs' follows spec .* dim 64.* dim 32"):
        evaluate(vectors, golden_of([("q", [1])]), wrong)
    assert wrong.calls == []


def test_evaluate_refuses_golden_keys_of_another_type(tmp_path):
    vectors = build(tmp_path, "docs", FakeEmbedder(LIVE_SPEC))
    golden = golden_of([("q", ["1"])])
    with pytest.raises(ConfigError, match=r"string keys .* int64 keys .* as JSON numbers"):
        evaluate(vectors, golden, FakeEmbedder(LIVE_SPEC))
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        evaluate(vectors, golden_of([("q", [1])]), FakeEmbedder(LIVE_SPEC), k=0)


def test_evaluate_reports_queries_that_fail_to_embed(tmp_path):
    vectors = build(tmp_path, "docs", FakeEmbedder(LIVE_SPEC))
    failing = FakeEmbedder(LIVE_SPEC, fail_texts=[LIVE_SPEC.format_query("bad one")])
    with pytest.raises(Exception, match=r"1 golden query\(ies\) .* 'bad one': fake failure"):
        evaluate(vectors, golden_of([("good", [1]), ("bad one", [2])]), failing)


def test_evaluate_chunk_table_ranks_documents_by_doc_key(tmp_path):
    # Each document is several sentences long, cut into chunks of at most 16 tokens.
    docs = {
        f"doc-{d}": " ".join(
            f"Sentence {s} of doc {d} is about item {d * 10 + s}." for s in range(6)
        )
        for d in range(5)
    }
    source = ArrowSource(pa.table({"id": list(docs), "body": list(docs.values())}))
    config = SourceConfig(key="id", text_columns=("body",), chunking=ChunkingConfig(tokens=16))
    vectors = build(tmp_path, "chunks", MirrorEmbedder(LIVE_SPEC), source=source, config=config)
    assert vectors.chunked
    rows = vectors.table.to_arrow().select(["doc_key", "chunk_seq", "chunk_text"]).to_pylist()
    assert len(rows) > 2 * len(docs)  # several chunks per document
    last = {r["doc_key"]: r["chunk_text"] for r in sorted(rows, key=lambda r: r["chunk_seq"])}
    golden = golden_of([(text, [doc]) for doc, text in last.items()])
    result = evaluate(vectors, golden, MirrorEmbedder(LIVE_SPEC), k=2)
    assert (result.recall, result.ndcg, result.chunked) == (1.0, 1.0, True)
    assert [q.top_keys[0] for q in result.queries] == list(last)
    assert all(len(set(q.top_keys)) == 2 for q in result.queries)  # documents, not chunks


def test_evaluate_hand_built_chunk_table_with_known_similarities(tmp_path):
    query = "how do chunks rank?"
    query_vector = fake_vector(CHUNK_SPEC.format_query(query), CHUNK_SPEC.output_dim)
    # Document -> its chunks' similarities to the query: documents rank 1, 2, 3, 4.
    docs = {1: [0.95, 0.90], 2: [0.30, 0.80], 3: [0.70], 4: [0.10, 0.20]}
    write_chunk_table(tmp_path, "chunks", query_vector, docs)
    vectors = open_vector_table(str(tmp_path), "chunks")
    golden = golden_of([(query, [2, 4])])
    result = evaluate(vectors, golden, FakeEmbedder(CHUNK_SPEC), k=3)
    assert result.queries[0].top_keys == (1, 2, 3)
    assert result.recall == pytest.approx(0.5)
    assert result.ndcg == pytest.approx(INV_LOG2_3 / (1 + INV_LOG2_3))
    # A row-table embedder of the same model and dim queries a chunk table alike.
    same = evaluate(vectors, golden, FakeEmbedder(CHUNK_SPEC.with_chunking(None)), k=3)
    assert (same.recall, same.ndcg) == (result.recall, result.ndcg)


def test_evaluate_with_the_tiny_qwen3_model(tmp_path, tiny_model_dir):
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    spec = EmbeddingSpec(model=str(tiny_model_dir), dim=32, max_length=32)
    encoder = Qwen3Encoder(spec, device="cpu", progress=False)
    vectors = build(tmp_path, "tiny", encoder)
    golden = golden_of([(BODIES[0], [0]), ("topic 7 examples", [1, 5]), ("nothing", [19])])
    result = evaluate(vectors, golden, encoder, k=5)
    assert len(result.queries) == 3
    assert 0.0 <= result.recall <= 1.0
    assert 0.0 <= result.ndcg <= 1.0
    for item in result.queries:
        assert 0.0 <= item.recall <= 1.0
        assert 0.0 <= item.ndcg <= 1.0
        assert len(item.top_keys) == 5
        assert set(item.top_keys) <= set(range(len(BODIES)))
    assert decide(None, result).passed


# --------------------------------------------------------------------------- decide


def test_decide_passes_equal_or_better_staging():
    live = scored(0.8, 0.7)
    assert decide(live, scored(0.8, 0.7)).passed
    better = decide(live, scored(0.9, 0.75))
    assert better.passed
    assert better.recall_delta == pytest.approx(0.1)
    assert better.ndcg_delta == pytest.approx(0.05)
    assert better.reason == (
        "staging recall@10 0.900 (+0.100) and nDCG@10 0.750 (+0.050) are at least live's "
        "(0.800, 0.700) minus the tolerance 0"
    )


@pytest.mark.parametrize(
    ("staging", "failing"),
    [
        ((0.79, 0.7), ["recall@10 0.790 is 0.010 below live 0.800"]),
        ((0.8, 0.69), ["nDCG@10 0.690 is 0.010 below live 0.700"]),
        ((0.5, 0.6), ["recall@10 0.500 is 0.300 below", "nDCG@10 0.600 is 0.100 below"]),
    ],
)
def test_decide_fails_when_a_mean_drops(staging, failing):
    decision = decide(scored(0.8, 0.7), scored(*staging))
    assert not decision.passed
    for text in failing:
        assert text in decision.reason
    assert decision.reason.count("below") == len(failing)
    assert "gate FAILED" in decision.summary()


def test_decide_tolerance_allows_exactly_its_drop():
    live = scored(0.8, 0.7)
    # 0.8 - 0.1 is 0.7000000000000001 in floating point: a drop of exactly the tolerance passes.
    assert decide(live, scored(0.7, 0.6), tolerance=0.1).passed
    assert not decide(live, scored(0.699, 0.7), tolerance=0.1).passed
    assert decide(live, scored(0.78, 0.69), tolerance=0.05).passed


def test_decide_without_live_table_passes():
    decision = decide(None, scored(0.1, 0.05), tolerance=0.0)
    assert decision.passed
    assert "first build" in decision.reason
    assert decision.recall_delta is None
    assert decision.ndcg_delta is None
    report = decision.as_dict()
    assert report["live"] is None
    assert report["recall_delta"] is None
    assert report["regressions"] == []
    assert report["staging"]["recall"] == 0.1
    summary = decision.summary()
    assert summary.startswith("gate passed: staging 't' v3 recall@10 0.100")
    assert "first build" in summary
    assert "\n" not in summary


@pytest.mark.parametrize("tolerance", [-0.01, 1.5, math.nan, True, "0.1", None])
def test_decide_refuses_a_bad_tolerance(tolerance):
    with pytest.raises(ConfigError, match="tolerance must be a number from 0 to 1"):
        decide(scored(0.8, 0.7), scored(0.8, 0.7), tolerance=tolerance)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tolerance": 5}, "tolerance must be a number from 0 to 1"),
        ({"tolerance": "0.1"}, "tolerance must be a number from 0 to 1"),
        ({"k": 0}, "k must be a positive integer"),
    ],
)
def test_a_bad_gate_setting_is_refused_before_the_rebuild_starts(settings, message):
    # GateConfig checks its settings when it is made: a rebuild would otherwise embed the
    # whole table before the gate found its tolerance out of range.
    golden = parse_golden_set(['{"query": "q", "relevant": [1]}'])
    with pytest.raises(ConfigError, match=message):
        GateConfig(golden=golden, **settings)
    assert GateConfig(golden=golden, tolerance=1).tolerance == 1.0


def test_decide_refuses_evaluations_that_do_not_compare():
    with pytest.raises(ConfigError, match="k=10 but staging 't' at k=5"):
        decide(scored(0.8, 0.7), scored(0.8, 0.7, k=5))
    with pytest.raises(ConfigError, match="different golden sets"):
        decide(scored(0.8, 0.7), scored(0.8, 0.7, queries=("other",)))


def test_decision_report_lists_the_worst_regressions_first():
    queries = ("a", "b", "c")
    live = scored(1.0, 0.9, per_query=[(1.0, 1.0), (1.0, 0.9), (1.0, 0.8)], queries=queries)
    staging = scored(
        1.0, 0.7, per_query=[(1.0, 0.5), (1.0, 0.9), (1.0, 0.7)], table="s", queries=queries
    )
    decision = decide(live, staging, tolerance=0.25)
    assert decision.passed
    report = decision.as_dict()
    assert [r["query"] for r in report["regressions"]] == ["a", "c"]
    assert report["regressions"][0]["staging_ndcg"] == 0.5
    assert (report["k"], report["queries"], report["tolerance"]) == (10, 3, 0.25)
    assert report["ndcg_delta"] == pytest.approx(-0.2)
    assert "vs live 't' v3; tolerance 0.25, 3 queries" in decision.summary()


def test_golden_set_type_is_iterable():
    golden = golden_of([("x", ["k"])])
    assert isinstance(golden, GoldenSet)
    assert [q.query for q in golden] == ["x"]
    with pytest.raises(ConfigError, match="holds no query"):
        GoldenSet(queries=())


# --------------------------------------------------------------------------- the rebuild's gate


@pytest.fixture
def built_encoders(monkeypatch):
    """Qwen3Encoder replaced by a mirror embedder recording its device and whether it closed."""
    built = []

    class RecordingEncoder(MirrorEmbedder):
        def __init__(self, spec, *, device="auto", progress=True, **options):
            super().__init__(spec)
            self.device = device
            self.closed = False
            built.append(self)

        def close(self):
            self.closed = True

    monkeypatch.setattr("qwen3_pipeline.embedding.encoder.Qwen3Encoder", RecordingEncoder)
    return built


def gate_live_and_staging(tmp_path, config):
    build(tmp_path, "docs", MirrorEmbedder(LIVE_SPEC))
    staging = build(tmp_path, "docs_staging", MirrorEmbedder(STAGING_SPEC))
    return gate_rebuild(
        config,
        uri=str(tmp_path),
        live_table="docs",
        staging_table="docs_staging",
        staging_version=staging.version,
        staging_embedder=MirrorEmbedder(STAGING_SPEC),
    )


def test_gate_builds_the_live_encoder_on_the_runs_device_and_closes_it(tmp_path, built_encoders):
    golden_set = golden_of([(BODIES[i], [i]) for i in (0, 4, 9)])
    config = GateConfig(golden=golden_set, k=3, live_encoder=EncoderOptions(device="cpu"))
    decision = gate_live_and_staging(tmp_path, config)
    assert decision.passed
    assert decision.live is not None
    assert decision.live.ndcg == 1.0  # the live table was searched with the built encoder
    assert [(e.spec.dim, e.device, e.closed) for e in built_encoders] == [(32, "cpu", True)]


def test_gate_closes_the_live_encoder_when_scoring_live_fails(tmp_path, built_encoders):
    golden_set = golden_of([(BODIES[0], [0])])

    def broken(self, queries):
        raise RuntimeError("out of memory")

    config = GateConfig(golden=golden_set, live_encoder=EncoderOptions(device="cpu"))
    build(tmp_path, "docs", MirrorEmbedder(LIVE_SPEC))
    staging = build(tmp_path, "docs_staging", MirrorEmbedder(STAGING_SPEC))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MirrorEmbedder, "embed_queries", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            gate_rebuild(
                config,
                uri=str(tmp_path),
                live_table="docs",
                staging_table="docs_staging",
                staging_version=staging.version,
                staging_embedder=FakeEmbedder(STAGING_SPEC),
            )
    assert [(e.device, e.closed) for e in built_encoders] == [("cpu", True)]


def test_gate_with_a_live_embedder_builds_no_encoder(tmp_path, built_encoders):
    golden_set = golden_of([(BODIES[i], [i]) for i in (0, 4)])
    config = GateConfig(golden=golden_set, k=3, live_embedder=MirrorEmbedder(LIVE_SPEC))
    assert gate_live_and_staging(tmp_path, config).passed
    assert built_encoders == []


def test_cli_gate_follows_the_runs_device(tmp_path):
    from qwen3_pipeline.cli import build_parser, refresh_options_of

    path = tmp_path / "golden.jsonl"
    path.write_text(json.dumps({"query": "q", "relevant": [1]}) + "\n")
    base = ["refresh", "--source", "s.parquet", "--key", "id", "--text", "body", "--db", "db",
            "--table", "docs", "--model", "m", "--rebuild", "--gate", str(path)]  # fmt: skip
    on_cpu = refresh_options_of(build_parser().parse_args([*base, "--device", "cpu"])).gate
    assert on_cpu is not None
    assert on_cpu.live_encoder.device == "cpu"
    default = refresh_options_of(build_parser().parse_args([*base, "--dtype", "float32"])).gate
    assert default is not None
    assert (default.live_encoder.device, default.live_encoder.dtype) == ("auto", "float32")
