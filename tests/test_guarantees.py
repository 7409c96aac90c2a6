"""Guarantees that mutations of the engine once slipped past the suite (issue 16, item 5).

Each test here was first seen to fail on a deliberately broken copy of the code; the mutations
and the assertion each one trips are in ``tests/MUTATIONS.md``, and ``tests/mutation_check.py``
re-applies them to a temporary copy of the repository and checks that the named test fails.

- chunk reuse: a reused chunk keeps the vector (and lineage) of *its own text* when the
  positions of a document's chunks shift;
- a document that gets shorter loses its trailing chunks in the same commit;
- rows whose text turned blank count as deletions for the mass-delete guard;
- re-projected rows keep the donor's ``n_tokens``, ``truncated`` and ``embedded_at``;
- the donor is the smallest table at least as large (or the live table of a rebuild).
"""

from collections.abc import Sequence
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.chunking import Chunker, ChunkingConfig, chunk_rows
from qwen3_pipeline.core.errors import MassDeleteError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import EncodeResult
from qwen3_pipeline.engine.refresh import RefreshReport, refresh
from qwen3_pipeline.engine.reproject import project
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.refresh_helpers import DIM, no_drift_guard, spec, table_rows, table_version

CHUNKING = ChunkingConfig(tokens=96)
CHUNK_CONFIG = SourceConfig(key="id", text_columns=("body",), chunking=CHUNKING)
ROW_CONFIG = SourceConfig(key="id", text_columns=("body",))


# --------------------------------------------------------------------------- helpers


def paragraph(doc: int, part: int) -> str:
    """About 90 tokens, every sentence unique (so no two chunks of a document share a text)."""
    sentences = " ".join(
        f"Sentence {k} of part {part} discusses subject {doc * 31 + part * 7 + k} at some length."
        for k in range(6)
    )
    return f"Part {part} of document {doc}. {sentences}"


def document(doc: int, parts: int = 10) -> str:
    return "\n\n".join(paragraph(doc, part) for part in range(parts))


def source(texts: dict[int, str]) -> ArrowSource:
    return ArrowSource(
        pa.table({"id": pa.array(list(texts), pa.int64()), "body": list(texts.values())})
    )


def run(
    texts: dict[int, str],
    db: str,
    *,
    table: str = "chunks",
    config: SourceConfig = CHUNK_CONFIG,
    embedder: Any = None,
    **options: Any,
) -> RefreshReport:
    return refresh(
        source=source(texts),
        config=config,
        embedder=embedder or FakeEmbedder(spec()),
        db_uri=db,
        table=table,
        progress=False,
        **options,
    )


def rows_at(db: str, table: str, version: int | None = None) -> list[dict[str, Any]]:
    handle = lancedb.connect(db).open_table(table)
    if version is not None:
        handle.checkout(version)
    return handle.to_arrow().to_pylist()


def cut(doc: int, text: str) -> list[dict[str, Any]]:
    """The chunks the engine must store for ``text`` (cut independently of the engine)."""
    return chunk_rows(Chunker(CHUNKING), pa.array([doc], pa.int64()), [text]).to_pylist()


def by_key(rows: Sequence[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {r["key"]: r for r in rows}


class TaggedEmbedder(FakeEmbedder):
    """A fake whose vectors depend on ``tag`` too, so each donor table's vectors are its own."""

    def __init__(self, embedding_spec: EmbeddingSpec, tag: str) -> None:
        super().__init__(embedding_spec)
        self.tag = tag

    def embed_documents(self, texts, *, on_batch=None) -> EncodeResult:  # type: ignore[override]
        return super().embed_documents([f"{self.tag}|{t}" for t in texts], on_batch=on_batch)


# --------------------------------------------------------------------------- chunk reuse


def test_reused_chunks_keep_the_vector_of_their_own_text_when_positions_shift(tmp_path):
    db = str(tmp_path / "db")
    texts = {d: document(d) for d in range(3)}
    run(texts, db)
    # An edit in the middle first, so the chunks of a document differ in embedded_at too.
    for d in (0, 1):
        texts[d] = texts[d].replace(f"Part 5 of document {d}.", f"Part five of document {d}.")
    run(texts, db)
    before = {(r["doc_key"], r["chunk_hash"]): r for r in rows_at(db, "chunks")}
    assert len({r["embedded_at"] for r in before.values()}) == 2
    assert len(before) == len(rows_at(db, "chunks"))  # chunk texts are unique per document

    # A whole paragraph in front of document 0: two new chunks, every later chunk moves down
    # by two. Document 1 loses its last three paragraphs in the same batch, so the batch cuts
    # fewer chunks than are stored (a reuse by position would not even run out of rows).
    texts[0] = paragraph(0, 99) + "\n\n" + texts[0]
    texts[1] = document(1, parts=7)
    want = cut(0, texts[0]) + cut(1, texts[1])
    reusable = [c for c in want if (c["key"], c["chunk_hash"]) in before]
    shifted = [
        c for c in reusable if c["chunk_seq"] != before[c["key"], c["chunk_hash"]]["chunk_seq"]
    ]
    assert len(shifted) >= 10  # the edit really moves reused chunks to other positions

    report = run(texts, db)
    assert (report.updated, report.unchanged) == (2, 1)
    assert report.chunks_reused == len(reusable)
    assert report.embedded_rows == len(want) - len(reusable)

    after = rows_at(db, "chunks")
    for row in after:  # every chunk holds the vector of its own text
        assert np.allclose(row["vector"], fake_vector(row["chunk_text"], DIM)), (
            f"chunk {row['key']} holds a vector that is not its text's"
        )
    got = by_key(after)
    for chunk in reusable:  # and a reused one is the stored chunk of the same text, unchanged
        row = got[f"{chunk['key']}#{chunk['chunk_seq']}"]
        old = before[chunk["key"], chunk["chunk_hash"]]
        assert row["chunk_hash"] == old["chunk_hash"]
        assert np.array_equal(row["vector"], old["vector"]), f"{row['key']} took another vector"
        assert (row["n_tokens"], row["truncated"], row["embedded_at"]) == (
            old["n_tokens"],
            old["truncated"],
            old["embedded_at"],
        ), f"{row['key']} took the lineage of another stored chunk"


def test_a_document_that_shrinks_loses_its_trailing_chunks_in_the_same_commit(tmp_path):
    db = str(tmp_path / "db")
    texts = {d: document(d) for d in range(3)}
    run(texts, db)
    old_chunks = len(cut(1, texts[1]))
    old_hash = cut(1, texts[1])[0]["content_hash"]
    version_before = table_version(db, "chunks")
    assert version_before is not None

    texts[1] = document(1, parts=4)
    want = cut(1, texts[1])
    assert len(want) < old_chunks - 5
    report = run(texts, db)
    version_after = table_version(db, "chunks")
    assert version_after == report.version_after == version_before + 1  # one commit
    for version in range(version_before, version_after + 1):
        doc = [r for r in rows_at(db, "chunks", version) if r["doc_key"] == 1]
        hashes = {r["content_hash"] for r in doc}
        assert len(hashes) == 1, f"version {version} mixes old and new chunks of document 1"
        assert sorted(r["chunk_seq"] for r in doc) == list(range(len(doc)))
    assert report.chunks_deleted == old_chunks - len(want)
    final = sorted(
        (r for r in rows_at(db, "chunks") if r["doc_key"] == 1), key=lambda r: r["chunk_seq"]
    )
    assert [r["chunk_text"] for r in final] == [c["chunk_text"] for c in want]
    assert {r["content_hash"] for r in final} == {want[0]["content_hash"]} != {old_hash}
    assert len(rows_at(db, "chunks", version_before)) - len(rows_at(db, "chunks")) == (
        old_chunks - len(want)
    )


# --------------------------------------------------------------------------- mass-delete guard


@pytest.mark.parametrize("blank", [8, 10])
def test_turning_most_rows_blank_is_refused_and_nothing_is_written(tmp_path, blank):
    db = str(tmp_path / "db")
    texts = {k: f"Row {k} says something worth a vector." for k in range(10)}
    run(texts, db, table="rows", config=ROW_CONFIG)
    version = table_version(db, "rows")
    stored = sorted((r["key"], r["content_hash"]) for r in table_rows(db, "rows").to_pylist())

    blanked = {k: (" \n\t " if k % 2 else "") if k < blank else t for k, t in texts.items()}
    with pytest.raises(MassDeleteError, match=f"delete {blank} of the 10"):
        run(blanked, db, table="rows", config=ROW_CONFIG)
    assert table_version(db, "rows") == version  # nothing written
    after = sorted((r["key"], r["content_hash"]) for r in table_rows(db, "rows").to_pylist())
    assert after == stored

    # The guard, and nothing else, stood between the blank rows and their deletion.
    allowed = run(blanked, db, table="rows", config=ROW_CONFIG, allow_mass_delete=True)
    assert (allowed.deleted, allowed.skipped_empty) == (blank, blank)
    assert table_rows(db, "rows").num_rows == 10 - blank


# --------------------------------------------------------------------------- re-projection

# Short token limit: the longer texts are truncated, so `truncated` and `n_tokens` vary by row.
MAX_LENGTH = 8
REPROJECT_TEXTS = {k: " ".join(["word"] * (2 + k % 12)) + f" {k}" for k in range(24)}


@pytest.mark.parametrize("in_place", [False, True], ids=["second_table", "in_place_rebuild"])
def test_reprojected_rows_keep_n_tokens_truncated_and_the_donors_embedded_at(tmp_path, in_place):
    db = str(tmp_path / "db")
    big, small = spec(128, max_length=MAX_LENGTH), spec(64, max_length=MAX_LENGTH)
    run(REPROJECT_TEXTS, db, table="docs", config=ROW_CONFIG, embedder=FakeEmbedder(big))
    donor = by_key(table_rows(db, "docs").to_pylist())
    assert {r["truncated"] for r in donor.values()} == {False, True}
    assert len({r["n_tokens"] for r in donor.values()}) > 3

    fake = FakeEmbedder(small)
    target = "docs" if in_place else "docs_64"
    # no_drift_guard: the guard would embed the canary texts (verifying the donor, recording
    # the new table's); this test is about the lineage re-projected rows keep.
    report = run(REPROJECT_TEXTS, db, table=target, config=ROW_CONFIG, embedder=fake,
                 rebuild=in_place, drift_guard=no_drift_guard)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, fake.calls) == (len(REPROJECT_TEXTS), 0, [])
    got = by_key(table_rows(db, target).to_pylist())
    assert set(got) == set(donor)
    for key, row in got.items():
        old = donor[key]
        assert (row["n_tokens"], row["truncated"]) == (old["n_tokens"], old["truncated"]), (
            f"row {key} lost the donor's n_tokens or truncated"
        )
        assert row["embedded_at"] == old["embedded_at"], f"row {key} got a new embedded_at"
        want = project(np.asarray([old["vector"]], np.float32), 64, normalize=True)[0]
        assert np.allclose(row["vector"], want)
        assert row["dim"] == 64


def _donors(db: str, dims: dict[str, int]) -> dict[str, dict[Any, dict[str, Any]]]:
    """Fill a table per name at its dim (each with its own vectors); return their rows."""
    out = {}
    for name, dim in dims.items():
        embedder = TaggedEmbedder(spec(dim), tag=name)
        # reproject=False: a donor filled from another would hold that one's vectors.
        run(REPROJECT_TEXTS, db, table=name, config=ROW_CONFIG, embedder=embedder, reproject=False)
        out[name] = by_key(table_rows(db, name).to_pylist())
    return out


def _assert_reprojected_from(db: str, table: str, donor: dict[Any, dict[str, Any]]) -> None:
    got = by_key(table_rows(db, table).to_pylist())
    assert set(got) == set(donor)
    for key, row in got.items():
        want = project(np.asarray([donor[key]["vector"]], np.float32), DIM, normalize=True)[0]
        assert np.allclose(row["vector"], want), f"row {key} was not re-projected from the donor"
        assert row["embedded_at"] == donor[key]["embedded_at"]


def test_the_donor_is_the_smallest_table_at_least_as_large(tmp_path):
    db = str(tmp_path / "db")
    # The smallest qualifying donor is neither first nor last by name, nor the largest; the
    # smaller table at dim 48 does not qualify (another max_length).
    donors = _donors(db, {"a_128": 128, "b_64": 64, "c_256": 256})
    run(REPROJECT_TEXTS, db, table="d_48", config=ROW_CONFIG,
        embedder=FakeEmbedder(spec(48, max_length=1024)), reproject=False)  # fmt: skip
    fake = FakeEmbedder(spec(DIM))
    # no_drift_guard: each donor holds its own (tagged) vectors, which the guard would refuse
    # to re-project; this test is about which donor is chosen.
    report = run(REPROJECT_TEXTS, db, table="target", config=ROW_CONFIG, embedder=fake,
                 drift_guard=no_drift_guard)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, fake.calls) == (len(REPROJECT_TEXTS), 0, [])
    _assert_reprojected_from(db, "target", donors["b_64"])


def test_an_in_place_rebuild_reprojects_from_the_live_table_first(tmp_path):
    db = str(tmp_path / "db")
    donors = _donors(db, {"docs": 256, "b_64": 64})
    fake = FakeEmbedder(spec(DIM))
    report = run(REPROJECT_TEXTS, db, table="docs", config=ROW_CONFIG, embedder=fake, rebuild=True,
                 drift_guard=no_drift_guard)  # as above  # fmt: skip
    assert (report.reprojected, report.embedded_rows, fake.calls) == (len(REPROJECT_TEXTS), 0, [])
    _assert_reprojected_from(db, "docs", donors["docs"])
