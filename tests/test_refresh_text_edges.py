"""Edge cases of document text and keys, end to end through ``refresh()``.

Each test refreshes an :class:`ArrowSource` into a ``tmp_path`` LanceDB table with the
:class:`FakeEmbedder` (vectors are a function of the exact text embedded) and checks the
report, the texts the embedder received, and the stored hashes and vectors:

- leading or trailing whitespace is content: embedded as-is and hashed exactly, so a
  whitespace-only edit re-embeds; a text of whitespace only is blank (``skipped_empty``);
- a NUL byte is dropped, deterministically: ``"a\\x00b"`` is stored, hashed and embedded as
  ``"ab"``, whatever renders it, so adding or removing NULs is no change (reading alone:
  ``test_sources.test_a_nul_byte_is_dropped_deterministically``);
- string keys whose 64-bit lookup hashes collide (forced: no real xxh3 collision is at hand)
  are still told apart.
"""

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.core import changes
from qwen3_pipeline.core.changes import content_hash
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.refresh_helpers import no_drift_guard

SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
TABLE = "docs"
# One config per way a document is rendered: joined text columns, a plain template
# (vectorised) and a template with a conversion (formatted row by row in Python).
CONFIGS = {
    "text_columns": SourceConfig(key="id", text_columns=("body",)),
    "template": SourceConfig(key="id", template="{body}"),
    "python_template": SourceConfig(key="id", template="{body!s}"),
}
PADDED = {1: " hello", 2: "hello\n", 3: "\thello  ", 4: "hello", 5: "\r\nhello\u3000"}
BLANK = {10: " ", 11: "\n\t ", 12: "\u3000\u00a0", 13: "", 14: None, 15: "\x00", 16: " \x00\n"}


class RecordingEmbedder(FakeEmbedder):
    """A FakeEmbedder that keeps every document text it was asked to embed."""

    def __init__(self, spec: EmbeddingSpec) -> None:
        super().__init__(spec)
        self.texts: list[str] = []

    def embed_documents(self, texts):
        self.texts.extend(texts)
        return super().embed_documents(texts)


def source(bodies: dict[object, str | None], key_type: pa.DataType | None = None) -> ArrowSource:
    keys = pa.array(list(bodies), key_type or pa.int64())
    return ArrowSource(pa.table({"id": keys, "body": pa.array(list(bodies.values()))}))


def run(db, bodies, config=CONFIGS["text_columns"], key_type=None):
    embedder = RecordingEmbedder(SPEC)
    # no_drift_guard: the texts recorded are the documents', without the canary texts.
    report = refresh(source=source(bodies, key_type), config=config, embedder=embedder,
                     db_uri=str(db), table=TABLE, progress=False,
                     drift_guard=no_drift_guard)  # fmt: skip
    return report, embedder.texts


def stored(db) -> dict[object, dict[str, object]]:
    """key -> {content_hash, vector} of the vector table."""
    data = lancedb.connect(str(db)).open_table(TABLE).to_arrow()
    columns = [data.column(c).to_pylist() for c in ("key", "content_hash", "vector")]
    return {
        k: {"content_hash": h, "vector": np.asarray(v, dtype=np.float32)}
        for k, h, v in zip(*columns, strict=True)
    }


def assert_holds(db, texts: dict[object, str]) -> None:
    """The table holds exactly ``texts``' keys, each hashed and embedded from that exact text."""
    rows = stored(db)
    assert sorted(rows, key=str) == sorted(texts, key=str)
    for key, text in texts.items():
        assert rows[key]["content_hash"] == content_hash(text), key
        np.testing.assert_array_equal(rows[key]["vector"], fake_vector(text, SPEC.dim))


# ---------------------------------------------------------------- whitespace


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_surrounding_whitespace_is_embedded_as_is_and_blank_text_is_skipped(tmp_path, config):
    report, embedded = run(tmp_path / "db", {**PADDED, **BLANK}, config)
    assert sorted(embedded) == sorted(PADDED.values())  # not stripped, none of the blanks
    assert (report.inserted, report.embedded_rows) == (len(PADDED), len(PADDED))
    assert report.skipped_empty == len(BLANK)
    assert_holds(tmp_path / "db", PADDED)
    # " hello", "hello\n", ... and "hello" are five different contents.
    assert len({content_hash(t) for t in PADDED.values()}) == len(PADDED)


def test_a_whitespace_only_edit_re_embeds_and_a_text_turned_blank_is_deleted(tmp_path):
    db = tmp_path / "db"
    run(db, PADDED)
    edited = {**PADDED, 1: "hello", 4: "hello "}
    report, embedded = run(db, edited)
    assert sorted(embedded) == ["hello", "hello "]
    assert (report.updated, report.unchanged, report.inserted) == (2, len(PADDED) - 2, 0)
    assert_holds(db, edited)
    # A text edited down to whitespace no longer says anything: its row goes.
    report, embedded = run(db, {**edited, 2: " \n "})
    assert (embedded, report.deleted, report.skipped_empty) == ([], 1, 1)
    assert_holds(db, {k: v for k, v in edited.items() if k != 2})
    again, embedded = run(db, {**edited, 2: " \n "})
    assert (embedded, again.committed, again.skipped_empty) == ([], False, 1)


# ---------------------------------------------------------------- NUL bytes


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_nul_byte_is_dropped_the_same_way_on_every_refresh(tmp_path, config):
    db = tmp_path / "db"
    report, embedded = run(db, {1: "a\x00b", 2: "x\x00"}, config)
    assert (embedded, report.inserted) == (["ab", "x"], 2)
    assert_holds(db, {1: "ab", 2: "x"})
    # Removing the NUL, or adding more, is no change at all: nothing embedded or committed.
    for bodies in ({1: "ab", 2: "x"}, {1: "a\x00\x00b", 2: "\x00x\x00"}, {1: "a\x00b", 2: "x\x00"}):
        again, embedded = run(db, bodies, config)
        assert (embedded, again.committed, again.unchanged) == ([], False, 2)


# ---------------------------------------------------------------- colliding key hashes


def test_string_keys_with_colliding_64_bit_hashes_are_told_apart(tmp_path, monkeypatch):
    # Every string key hashes to the same 64 bits in the diff's key index.
    monkeypatch.setattr(changes.xxhash, "xxh3_64_intdigest", lambda data: 7)
    db, strings = tmp_path / "db", pa.string()
    run(db, {"a": "alpha"}, key_type=strings)
    # One stored key (hashed index): "b" collides with "a" and has its very content hash, so
    # a lookup trusting the 64 bits would call it unchanged and never store it.
    report, embedded = run(db, {"a": "alpha", "b": "alpha"}, key_type=strings)
    assert (report.inserted, report.unchanged, embedded) == (1, 1, ["alpha"])
    assert_holds(db, {"a": "alpha", "b": "alpha"})
    # Two stored keys that collide with each other (the index falls back to exact strings).
    report, embedded = run(db, {"a": "alpha", "b": "beta", "c": "alpha"}, key_type=strings)
    assert (report.inserted, report.updated, report.unchanged) == (1, 1, 1)
    assert sorted(embedded) == ["alpha", "beta"]
    assert_holds(db, {"a": "alpha", "b": "beta", "c": "alpha"})
    report, _ = run(db, {"a": "alpha", "c": "alpha"}, key_type=strings)
    assert (report.deleted, report.unchanged) == (1, 2)
    assert_holds(db, {"a": "alpha", "c": "alpha"})
