"""Refreshing a table of document chunks: one row per chunk, chunk-level reuse, whole documents.

The logic runs on the fake embedder (fast, deterministic vectors per text); the real path (the
tiny Qwen3 checkpoint through the CLI) is at the end. A SIGKILLed refresh is checked version by
version: every document is wholly old or wholly new at every Lance version, and a re-run
converges.
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.chunking.chunker import Chunker
from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.chunking.rows import chunk_rows
from qwen3_pipeline.cli import main
from qwen3_pipeline.core.errors import SpecMismatchError
from qwen3_pipeline.core.schema import chunk_key
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import SourceConfig, parse_source
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.refresh_helpers import fork_context

CHUNKING = ChunkingConfig(tokens=96)
SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32, hidden_size=1024)
CONFIG = SourceConfig(key="id", text_columns=("body",), carry=("title",), chunking=CHUNKING)


def paragraph(doc: int, j: int) -> str:
    sentences = " ".join(
        f"Sentence {k} of part {j} discusses subject {doc * 31 + j * 7 + k} at some length."
        for k in range(6)
    )
    return f"Part {j} of document {doc}. {sentences}"


def document(doc: int, parts: int = 10) -> str:
    return "\n\n".join(paragraph(doc, j) for j in range(parts))


def corpus(n: int = 6) -> dict[int, str]:
    return {i: document(i) for i in range(n)}


def write(docs: dict[int, str], path: Path, titles: dict[int, str] | None = None) -> str:
    titles = titles or {}
    pq.write_table(
        pa.table(
            {
                "id": pa.array(list(docs), pa.int64()),
                "body": list(docs.values()),
                "title": [titles.get(i, f"title {i}") for i in docs],
            }
        ),
        path,
    )
    return str(path)


def run(source: str, db: Path, embedder: Any = None, config: SourceConfig = CONFIG, **kw: Any):
    return refresh(
        source=parse_source(source),
        config=config,
        embedder=embedder or FakeEmbedder(SPEC),
        db_uri=str(db),
        table="chunks",
        progress=False,
        **kw,
    )


def stored(db: Path, version: int | None = None) -> pa.Table:
    table = lancedb.connect(str(db)).open_table("chunks")
    if version is not None:
        table.checkout(version)
    return table.to_arrow().sort_by([("doc_key", "ascending"), ("chunk_seq", "ascending")])


def expected_chunks(docs: dict[int, str], config: ChunkingConfig = CHUNKING) -> pa.Table:
    return chunk_rows(Chunker(config), pa.array(list(docs), pa.int64()), list(docs.values()))


def assert_matches(db: Path, docs: dict[int, str]) -> None:
    """The table holds exactly the chunks of ``docs``, each with the fake vector of its text."""
    got = stored(db)
    want = expected_chunks(docs)
    assert got.column("doc_key").to_pylist() == want.column("key").to_pylist()
    assert got.column("chunk_seq").to_pylist() == want.column("chunk_seq").to_pylist()
    assert got.column("chunk_text").to_pylist() == want.column("chunk_text").to_pylist()
    assert got.column("content_hash").to_pylist() == want.column("content_hash").to_pylist()
    keys = [
        chunk_key(k, s)
        for k, s in zip(want["key"].to_pylist(), want["chunk_seq"].to_pylist(), strict=True)
    ]
    assert got.column("key").to_pylist() == keys
    vectors = np.stack(got.column("vector").to_numpy(zero_copy_only=False))
    texts = want.column("chunk_text").to_pylist()
    assert np.allclose(vectors, np.stack([fake_vector(t, SPEC.output_dim) for t in texts]))


def assert_whole_documents(table: pa.Table, versions_of: dict[int, set[str]]) -> None:
    """Each document's chunks are one version of it: one content hash, seqs 0..n-1, all chunks."""
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for row in table.select(["doc_key", "chunk_seq", "content_hash", "chunk_text"]).to_pylist():
        by_doc.setdefault(row["doc_key"], []).append(row)
    for doc, rows in by_doc.items():
        hashes = {r["content_hash"] for r in rows}
        assert len(hashes) == 1, f"document {doc} mixes versions {hashes}"
        assert sorted(r["chunk_seq"] for r in rows) == list(range(len(rows)))
        (doc_hash,) = hashes
        assert doc_hash in versions_of[doc], f"document {doc} holds an unknown version"


# --------------------------------------------------------------------------- logic (fake model)


def test_fill_noop_and_a_one_sentence_edit_reembeds_only_the_chunk_that_changed(tmp_path):
    docs = corpus()
    source = write(docs, tmp_path / "s.parquet")
    db = tmp_path / "db"
    first = run(source, db)
    n_chunks = expected_chunks(docs).num_rows
    assert first.chunked
    assert first.inserted == first.scanned == len(docs)
    assert first.embedded_rows == first.chunks_written == n_chunks > 3 * len(docs)
    assert_matches(db, docs)

    again = run(source, db)
    assert (again.unchanged, again.embedded_rows, again.committed) == (len(docs), 0, False)

    before = stored(db)
    docs[2] = docs[2].replace("subject 70 at some length", "subject 70 in some depth")
    assert docs[2] != document(2)
    edit = run(write(docs, tmp_path / "s.parquet"), db)
    assert (edit.updated, edit.unchanged) == (1, len(docs) - 1)
    assert 1 <= edit.embedded_rows <= 3
    doc_chunks = expected_chunks({2: docs[2]}).num_rows
    assert edit.chunks_reused == doc_chunks - edit.embedded_rows
    assert edit.version_after == first.version_after + 1  # the document in one commit
    assert_matches(db, docs)
    # Reused chunks keep their vector and the time it was embedded.
    after = stored(db)
    old = {r["chunk_text"]: r for r in before.to_pylist() if r["doc_key"] == 2}
    reused = [r for r in after.to_pylist() if r["doc_key"] == 2 and r["chunk_text"] in old]
    assert len(reused) == edit.chunks_reused
    assert all(r["embedded_at"] == old[r["chunk_text"]]["embedded_at"] for r in reused)


def test_insert_at_top_append_delete_and_blank_documents(tmp_path):
    docs = corpus()
    source = tmp_path / "s.parquet"
    db = tmp_path / "db"
    run(write(docs, source), db)
    n_before = {d: expected_chunks({d: docs[d]}).num_rows for d in docs}

    docs[0] = "A new opening paragraph, short and to the point.\n\n" + docs[0]
    docs[1] = docs[1] + "\n\n" + paragraph(1, 99)
    gone = docs.pop(4)
    docs[5] = "   "
    report = run(write(docs, source), db)
    assert (report.updated, report.deleted, report.skipped_empty) == (2, 2, 1)
    assert report.embedded_rows <= 6  # at most three chunks around each edit
    assert report.chunks_deleted == n_before[4] + n_before[5] + max(
        0, n_before[0] - expected_chunks({0: docs[0]}).num_rows
    )
    del docs[5]
    assert_matches(db, docs)
    assert gone not in stored(db).column("chunk_text").to_pylist()


def test_moved_and_carry_updates_touch_every_chunk_without_the_model(tmp_path):
    docs = corpus(4)
    source = tmp_path / "s.parquet"
    db = tmp_path / "db"
    run(write(docs, source), db)
    embedder = FakeEmbedder(SPEC)
    report = run(write(docs, source, titles={1: "renamed"}), db, embedder=embedder)
    assert (report.carry_updated, report.embedded_rows, embedder.calls) == (1, 0, [])
    titles = {r["doc_key"]: set() for r in stored(db).to_pylist()}
    for row in stored(db).to_pylist():
        titles[row["doc_key"]].add(row["title"])
    assert titles[1] == {"renamed"}
    assert titles[0] == {"title 0"}
    assert_matches(db, docs)


def test_a_chunk_that_fails_keeps_the_whole_old_document(tmp_path):
    docs = corpus(3)
    source = tmp_path / "s.parquet"
    db = tmp_path / "db"
    run(write(docs, source), db)
    old = stored(db)
    new_text = docs[1].replace("Part 5 of document 1.", "Part five of document one.")
    new_chunks = expected_chunks({1: new_text}).column("chunk_text").to_pylist()
    changed = [t for t in new_chunks if t not in old.column("chunk_text").to_pylist()]
    assert changed
    edited = {**docs, 1: new_text}
    report = run(write(edited, source), db, embedder=FakeEmbedder(SPEC, fail_texts=changed[:1]))
    assert (report.failed, report.updated) == (1, 0)
    assert [key for key, _ in report.failures] == ["1"]
    assert_matches(db, docs)  # document 1 wholly old
    # The next run that retries it (due at once with no backoff) converges.
    assert run(write(edited, source), db, retry_backoff_s=0).updated == 1
    assert_matches(db, edited)


def test_chunking_settings_are_part_of_the_spec(tmp_path):
    docs = corpus(3)
    source = write(docs, tmp_path / "s.parquet")
    db = tmp_path / "db"
    run(source, db)
    other = SourceConfig(
        key="id", text_columns=("body",), carry=("title",), chunking=ChunkingConfig(tokens=128)
    )
    with pytest.raises(SpecMismatchError):
        run(source, db, config=other)
    rows_only = SourceConfig(key="id", text_columns=("body",), carry=("title",))
    with pytest.raises(SpecMismatchError):
        run(source, db, config=rows_only)
    rebuilt = run(source, db, config=other, rebuild=True)
    assert rebuilt.inserted == len(docs)
    got = stored(db)
    want = expected_chunks(docs, ChunkingConfig(tokens=128))
    assert got.column("chunk_text").to_pylist() == want.column("chunk_text").to_pylist()


def test_every_version_holds_whole_documents(tmp_path):
    docs = corpus(8)
    source = tmp_path / "s.parquet"
    db = tmp_path / "db"
    versions_of = {d: set() for d in docs}

    def remember(current: dict[int, str]) -> None:
        table = expected_chunks(current)
        for row in table.select(["key", "content_hash"]).to_pylist():
            versions_of[row["key"]].add(row["content_hash"])

    remember(docs)
    run(write(docs, source), db, chunk_rows=2)
    rng = random.Random(7)
    for round_ in range(3):
        for d in rng.sample(sorted(docs), 4):
            docs[d] = docs[d].replace(
                f"Part {round_ + 1} of", f"Part {round_ + 1} (rev {round_}) of"
            )
        remember(docs)
        run(write(docs, source), db, chunk_rows=2)
    table = lancedb.connect(str(db)).open_table("chunks")
    for version in range(1, table.version + 1):
        assert_whole_documents(stored(db, version), versions_of)


# --------------------------------------------------------------------------- SIGKILL


def _killed_child(source: str, db: str, kill_at_call: int, delay: float, spec_json: str) -> None:
    spec = EmbeddingSpec.from_json(spec_json)

    class KillingFake(FakeEmbedder):
        """Dies in its ``kill_at_call``-th embed call (after the earlier documents' commits)."""

        def embed_documents(self, texts, *, on_batch=None):  # type: ignore[override]
            if len(self.calls) + 1 == kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.02)  # commits interleave with embeds, so the timer lands anywhere
            return super().embed_documents(texts, on_batch=on_batch)

    # Whichever comes first: the chosen embed call, or a timer that may land inside a commit.
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    refresh(
        source=parse_source(source),
        config=CONFIG,
        embedder=KillingFake(spec),
        db_uri=db,
        table="chunks",
        chunk_rows=1,
        progress=False,
    )
    os.kill(os.getpid(), signal.SIGKILL)  # never reached when a kill landed first


@pytest.mark.parametrize("seed", range(3))
def test_a_sigkilled_refresh_leaves_whole_documents_and_converges(tmp_path, seed):
    rng = random.Random(seed)
    docs = corpus(10)
    source = tmp_path / "s.parquet"
    db = tmp_path / "db"
    versions_of = {
        d: {expected_chunks({d: t}).column("content_hash")[0].as_py()} for d, t in docs.items()
    }
    run(write(docs, source), db)
    edited = rng.sample(sorted(docs), 6)
    for d in edited:
        docs[d] = "An inserted first paragraph.\n\n" + docs[d].replace("Part 4 of", "Section 4 of")
        versions_of[d].add(expected_chunks({d: docs[d]}).column("content_hash")[0].as_py())
    write(docs, source)
    # A fresh process (forked from a clean server with LanceDB imported, not from this one).
    ctx = fork_context()
    kill_at_call = rng.randint(2, len(edited))
    child = ctx.Process(
        target=_killed_child,
        args=(str(source), str(db), kill_at_call, rng.uniform(0.3, 2.0), SPEC.to_json()),
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    new_hashes = {expected_chunks({d: docs[d]}).column("content_hash")[0].as_py() for d in edited}
    landed = set(stored(db).column("content_hash").to_pylist()) & new_hashes
    assert len(landed) < len(edited)  # killed before the last edited document was written
    table = lancedb.connect(str(db)).open_table("chunks")
    for version in range(1, table.version + 1):
        assert_whole_documents(stored(db, version), versions_of)
    run(str(source), db)
    assert_matches(db, docs)


# --------------------------------------------------------------------------- real model, CLI


def test_cli_chunked_refresh_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    docs = corpus(3)
    source = write(docs, tmp_path / "s.parquet")
    base = [
        "refresh", "--source", source, "--key", "id", "--text", "body", "--carry", "title",
        "--db", str(tmp_path / "db"), "--table", "chunks", "--model", str(tiny_model_dir),
        "--dim", "32", "--device", "cpu", "--chunk-tokens", "96",
    ]  # fmt: skip
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)
    n_chunks = expected_chunks(docs).num_rows
    assert first["chunked"]
    assert (first["inserted"], first["embedded_rows"]) == (3, n_chunks)
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["embedded_rows"] == 0
    docs[0] = docs[0].replace("Part 3 of document 0.", "Part three of document zero.")
    assert main([*base[:2], write(docs, tmp_path / "s.parquet"), *base[3:]]) == 0
    edit = json.loads(capsys.readouterr().out)
    assert edit["updated"] == 1
    assert 1 <= edit["embedded_rows"] <= 3
    assert edit["chunks_reused"] == expected_chunks({0: docs[0]}).num_rows - edit["embedded_rows"]
    table = stored(tmp_path / "db")
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert max(table["n_tokens"].to_pylist()) <= 97  # 96 of text plus <|endoftext|>


def test_cli_chunk_options_need_chunk_tokens(tmp_path, capsys):
    args = [
        "refresh", "--source", str(tmp_path / "s.parquet"), "--key", "id", "--text", "body",
        "--db", str(tmp_path / "db"), "--table", "t", "--model", "Qwen/Qwen3-Embedding-0.6B",
        "--chunk-overlap", "8",
    ]  # fmt: skip
    assert main(args) == 2
    assert "--chunk-tokens" in capsys.readouterr().err
