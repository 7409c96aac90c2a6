"""Search over tables of document chunks: best chunk per document, raw chunks, filters, CLI."""

import json

import numpy as np
import pytest
from lancedb.expr import col

from qwen3_pipeline.cli import main
from qwen3_pipeline.consumers.vector_search import open_vector_table, search
from qwen3_pipeline.core.errors import ConfigError, SpecMismatchError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.demo.summary import search_lines
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.chunk_tables import (
    CHUNK_SPEC,
    CHUNKING,
    ROW_SPEC,
    chunk_text,
    document_text,
    write_chunk_table,
    write_row_table,
)

QUERY = "how do chunks rank?"
# Document key -> each chunk's cosine similarity to QUERY's vector (chunk_seq order). The three
# nearest chunks all belong to document 1; document 2's best chunk is its second one.
DOCS = {1: [0.95, 0.90, 0.85], 2: [0.30, 0.80], 3: [0.70], 4: [0.10, 0.20]}
DOCUMENT_COLUMNS = [
    "doc_key",
    "chunk_seq",
    "chunk_start",
    "chunk_end",
    "chunk_text",
    "title",
    "partition_key",
    "source_updated_at",
    "embedded_at",
    "similarity",
]


def _query_vector(spec: EmbeddingSpec = CHUNK_SPEC) -> np.ndarray:
    return fake_vector(spec.format_query(QUERY), spec.output_dim)


@pytest.fixture
def vectors(tmp_path):
    write_chunk_table(tmp_path, "chunks", _query_vector(), DOCS)
    return open_vector_table(str(tmp_path), "chunks")


def _search(vectors, k, **options):
    return search(vectors, QUERY, k=k, embedder=FakeEmbedder(CHUNK_SPEC), **options)


def test_search_returns_each_documents_best_chunk_best_first(vectors):
    assert vectors.chunked
    assert vectors.carry_columns == ["title"]
    hits = _search(vectors, 3)
    assert hits.column_names == DOCUMENT_COLUMNS
    assert hits.column("doc_key").to_pylist() == [1, 2, 3]
    assert hits.column("chunk_seq").to_pylist() == [0, 1, 0]
    assert hits.column("similarity").to_pylist() == pytest.approx([0.95, 0.80, 0.70], abs=1e-5)
    second = hits.to_pylist()[1]
    assert second["chunk_text"] == chunk_text(2, 1)
    start = len(chunk_text(2, 0))
    assert (second["chunk_start"], second["chunk_end"]) == (start, len(document_text(2, 2)))
    assert second["title"] == "Title 2"


def test_search_widens_the_fetch_until_k_documents(tmp_path):
    # Document 1's ten chunks fill the first fetch (4 * k = 8 chunks for k = 2).
    docs = {1: [0.99 - 0.01 * i for i in range(10)], 2: [0.5], 3: [0.4, 0.3]}
    write_chunk_table(tmp_path, "long", _query_vector(), docs)
    vectors = open_vector_table(str(tmp_path), "long")
    assert _search(vectors, 1).column("doc_key").to_pylist() == [1]
    assert _search(vectors, 2).column("doc_key").to_pylist() == [1, 2]
    # Fewer documents than k: the table is exhausted, every document once.
    everything = _search(vectors, 10)
    assert everything.column("doc_key").to_pylist() == [1, 2, 3]
    assert everything.column("chunk_seq").to_pylist() == [0, 0, 0]


def test_chunks_true_returns_the_nearest_chunk_rows(vectors):
    hits = _search(vectors, 4, chunks=True)
    assert hits.column("key").to_pylist() == ["1#0", "1#1", "1#2", "2#1"]
    assert hits.column("doc_key").to_pylist() == [1, 1, 1, 2]
    assert hits.column_names == ["key", *DOCUMENT_COLUMNS]
    assert hits.column("similarity").to_pylist() == pytest.approx(
        [0.95, 0.90, 0.85, 0.80], abs=1e-5
    )


def test_where_filters_chunks_before_the_nearest_are_chosen(vectors):
    others = _search(vectors, 10, where=col("doc_key") != 1)
    assert others.column("doc_key").to_pylist() == [2, 3, 4]
    later = _search(vectors, 10, where=col("chunk_seq") > 0)
    assert later.column("doc_key").to_pylist() == [1, 2, 4]
    assert later.column("chunk_seq").to_pylist() == [1, 1, 1]
    titled = _search(vectors, 10, where=col("title") == "Title 4", chunks=True)
    assert titled.column("key").to_pylist() == ["4#1", "4#0"]


def test_columns_option_keeps_doc_key(vectors):
    hits = _search(vectors, 2, columns=["chunk_text"])
    assert hits.column_names == ["doc_key", "chunk_text", "similarity"]
    assert hits.column("doc_key").to_pylist() == [1, 2]


def test_string_document_keys_with_hash_signs(tmp_path):
    docs = {"a#b": [0.9, 0.6], "c": [0.7]}
    write_chunk_table(tmp_path, "strings", _query_vector(), docs)
    vectors = open_vector_table(str(tmp_path), "strings")
    assert _search(vectors, 5).column("doc_key").to_pylist() == ["a#b", "c"]
    assert _search(vectors, 2, chunks=True).column("key").to_pylist() == ["a#b#0", "c#0"]


def test_query_embedder_may_omit_the_chunking_but_not_change_the_model(vectors):
    # Chunking decides which texts became rows, not how a query is embedded.
    hits = search(vectors, QUERY, k=1, embedder=FakeEmbedder(ROW_SPEC))
    assert hits.column("doc_key").to_pylist() == [1]
    other = EmbeddingSpec(model=ROW_SPEC.model, dim=64).with_chunking(CHUNKING)
    with pytest.raises(SpecMismatchError, match="query embedder"):
        search(vectors, QUERY, embedder=FakeEmbedder(other))


def test_row_tables_are_unchanged_and_refuse_chunks_true(tmp_path):
    write_row_table(tmp_path, "rows", _query_vector(ROW_SPEC), [0.2, 0.9, 0.5])
    vectors = open_vector_table(str(tmp_path), "rows")
    assert not vectors.chunked
    hits = search(vectors, QUERY, k=2, embedder=FakeEmbedder(ROW_SPEC))
    assert hits.column("key").to_pylist() == [1, 2]
    assert hits.column_names == [
        "key",
        "title",
        "partition_key",
        "source_updated_at",
        "embedded_at",
        "similarity",
    ]
    with pytest.raises(ConfigError, match="chunks=True"):
        search(vectors, QUERY, k=2, embedder=FakeEmbedder(ROW_SPEC), chunks=True)


def test_k_must_be_positive(vectors):
    with pytest.raises(ConfigError, match="k must be"):
        _search(vectors, 0)


def test_search_lines_name_the_document_and_its_chunk(vectors):
    lines = search_lines(QUERY, _search(vectors, 2).to_pylist())
    end = len(document_text(2, 2))
    assert lines[1:] == [
        f"  0.950  1  (chunk 0, characters 0-{len(chunk_text(1, 0))})",
        f"  0.800  2  (chunk 1, characters {len(chunk_text(2, 0))}-{end})",
    ]


# --------------------------------------------------------------------------- command line


def test_cli_searches_documents_or_chunks(tiny_model_dir, tmp_path, capsys):
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    spec = EmbeddingSpec(model=str(tiny_model_dir), dim=32).with_chunking(CHUNKING)
    encoder = Qwen3Encoder(spec, device="cpu", progress=False)
    query_vector = encoder.embed_queries([QUERY]).raise_on_failure()[0]
    write_chunk_table(tmp_path, "chunks", query_vector, DOCS, spec=spec)
    command = [
        "search", "--db", str(tmp_path), "--table", "chunks", "--model", str(tiny_model_dir),
        "--device", "cpu", "-k", "2",
    ]  # fmt: skip

    assert main([*command, QUERY]) == 0
    documents = json.loads(capsys.readouterr().out)["results"]
    assert [(h["doc_key"], h["chunk_seq"]) for h in documents] == [(1, 0), (2, 1)]
    assert documents[1]["chunk_text"] == chunk_text(2, 1)

    assert main([*command, "--chunks", QUERY]) == 0
    chunks = json.loads(capsys.readouterr().out)["results"]
    assert [h["key"] for h in chunks] == ["1#0", "1#1"]
    assert [h["similarity"] for h in chunks] == pytest.approx([0.95, 0.90], abs=1e-4)


def test_cli_refuses_chunks_on_a_row_table(tmp_path, capsys):
    write_row_table(tmp_path, "rows", _query_vector(ROW_SPEC), [0.5])
    command = ["search", "--db", str(tmp_path), "--table", "rows", "--model", ROW_SPEC.model]
    assert main([*command, "--chunks", QUERY]) == 2
    assert "--chunks needs a table of document chunks" in capsys.readouterr().err
