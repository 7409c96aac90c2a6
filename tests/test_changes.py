import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.core import changes
from qwen3_pipeline.core.changes import (
    EMBED_STATUSES,
    UPDATE_STATUSES,
    ExistingIndex,
    KeyRuns,
    RowStatus,
    ScopeTracker,
    blank_mask,
    content_hash,
    content_hashes,
    diff,
    is_blank,
    sanitize_text,
    sanitize_texts,
)
from qwen3_pipeline.core.errors import InputDataError, StoreError

FP = "fingerprint-a"


def state(keys, hashes, parts=None, fps=None, **carry):
    n = len(keys)
    return pa.table(
        {
            "key": keys,
            "content_hash": pa.array(hashes, pa.string()),
            "spec_fingerprint": pa.array(fps or [FP] * n, pa.string()),
            "partition_key": pa.array(parts or [""] * n, pa.string()),
            **carry,
        }
    )


def labels(result):
    return [RowStatus(int(s)).label for s in result.status]


# ---------------------------------------------------------------- sanitising and hashing


def test_sanitize_removes_nul_and_replaces_lone_surrogates():
    assert sanitize_text("a\x00b") == "ab"
    assert sanitize_text("x\ud800y") == "x\ufffdy"
    assert sanitize_text("\udfffz") == "\ufffdz"
    # a surrogate pair left in a str is joined into its character
    assert sanitize_text("\ud83d\ude00") == "\U0001f600"
    clean = "plain text ü 🎉"
    assert sanitize_text(clean) == clean
    assert sanitize_text("a\x00\ud800") == sanitize_text("a\x00\ud800")  # deterministic
    sanitize_text("x\ud800y").encode("utf-8")  # valid UTF-8 afterwards


def test_sanitize_texts_vectorised():
    out = sanitize_texts(pa.array(["a\x00b", None, "ok"]))
    assert out.to_pylist() == ["ab", "", "ok"]
    assert out.type == pa.string()
    large = sanitize_texts(pa.array(["x"], pa.large_string()))
    assert large.type == pa.string()


def test_sanitize_texts_repairs_invalid_utf8():
    data = b"ok\xff\xfebad"
    offsets = pa.py_buffer(np.array([0, 2, len(data)], dtype=np.int32).tobytes())
    broken = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])
    with pytest.raises(pa.ArrowInvalid):
        broken.validate(full=True)
    assert sanitize_texts(broken).to_pylist() == ["ok", "\ufffd\ufffdbad"]


def test_blank_detection_scalar_and_vectorised_agree():
    texts = ["", " ", "\t\n", "\u3000", "a", " a ", "\u00a0"]
    assert [is_blank(t) for t in texts] == [True, True, True, True, False, False, True]
    assert blank_mask(pa.array(texts)).tolist() == [is_blank(t) for t in texts]


def test_content_hash_is_128_bit_hex_and_vectorised():
    h = content_hash("hello")
    assert len(h) == 32
    assert int(h, 16) >= 0
    assert h == content_hash("hello") != content_hash("hello ")
    texts = ["a", "b", "ü🎉", ""]
    assert content_hashes(texts).to_pylist() == [content_hash(t) for t in texts]
    assert content_hashes(pa.array(texts)).to_pylist() == [content_hash(t) for t in texts]
    with pytest.raises(InputDataError, match="sanitize_texts"):
        content_hashes(pa.array(["a", None]))


# ---------------------------------------------------------------- diff


def test_diff_classifies_every_status():
    existing = ExistingIndex(
        state(
            [1, 2, 3, 4, 5, 6],
            ["h1", "h2", "h3", "h4", "h5", "h6"],
            parts=["p1", "p1", "p1", "p1", "p1", "p1"],
            fps=[FP, FP, "old-fp", FP, FP, FP],
            title=pa.array(["t1", "t2", "t3", "t4", "t5", "t6"]),
        )
    )
    result = diff(
        keys=pa.array([1, 2, 3, 4, 5, 6, 7]),
        content_hashes=pa.array(["h1", "CHANGED", "h3", "h4", "h5", "CHANGED", "h7"]),
        partition_keys=pa.array(["p1", "p1", "p1", "p2", "p1", "p2", "p1"]),
        carry=pa.table({"title": ["t1", "t2", "t3", "t4", "NEW", "t6", "t7"]}),
        existing=existing,
        fingerprint=FP,
    )
    assert labels(result) == [
        "unchanged",
        "changed",
        "respec",
        "moved",
        "carry_only",
        "changed",  # moved and changed: re-embed (and move)
        "new",
    ]
    assert result.counts == {
        "new": 1,
        "changed": 2,
        "respec": 1,
        "moved": 1,
        "carry_only": 1,
        "unchanged": 1,
    }
    assert np.flatnonzero(result.mask(*EMBED_STATUSES)).tolist() == [1, 2, 5, 6]
    assert np.flatnonzero(result.mask(*UPDATE_STATUSES)).tolist() == [3, 4]
    assert result.existing_rows.tolist() == [0, 1, 2, 3, 4, 5, -1]
    reasons = result.reasons()
    assert reasons[0] == "unchanged"
    assert reasons[1] == "content changed"
    assert reasons[2] == f"spec fingerprint old-fp -> {FP}"
    assert reasons[3] == "partition 'p1' -> 'p2'"
    assert reasons[4] == "carry changed: title"
    assert reasons[5] == "content changed; partition 'p1' -> 'p2'"
    assert reasons[6] == "new key"


def test_diff_moved_row_with_carry_change_stays_moved():
    existing = ExistingIndex(state([1], ["h"], parts=["a"], title=pa.array(["x"])))
    result = diff(
        keys=pa.array([1]),
        content_hashes=pa.array(["h"]),
        partition_keys=pa.array(["b"]),
        carry=pa.table({"title": ["y"]}),
        existing=existing,
        fingerprint=FP,
    )
    assert labels(result) == ["moved"]
    assert result.carry_changed["title"].tolist() == [True]
    assert result.reasons() == ["partition 'a' -> 'b'; carry changed: title"]


def test_diff_carry_nulls_and_nans_compare_equal():
    existing = ExistingIndex(
        state(
            ["a", "b", "c", "d"],
            ["1", "2", "3", "4"],
            score=pa.array([math.nan, None, 1.0, None], pa.float64()),
            title=pa.array([None, "x", None, "y"]),
        )
    )
    result = diff(
        keys=pa.array(["a", "b", "c", "d"]),
        content_hashes=pa.array(["1", "2", "3", "4"]),
        partition_keys=pa.array(["", "", "", ""]),
        carry=pa.table(
            {
                "score": pa.array([math.nan, None, None, 2.0]),
                "title": pa.array([None, "x", None, "y"]),
            }
        ),
        existing=existing,
        fingerprint=FP,
    )
    assert labels(result) == ["unchanged", "unchanged", "carry_only", "carry_only"]


def test_diff_casts_carry_to_stored_type_and_ignores_unknown_columns():
    existing = ExistingIndex(state([1], ["h"], n=pa.array([5], pa.int64())))
    result = diff(
        keys=pa.array([1], pa.int32()),
        content_hashes=pa.array(["h"]),
        partition_keys=pa.array([""]),
        carry=pa.table({"n": pa.array([5], pa.int32()), "extra": ["zzz"]}),
        existing=existing,
        fingerprint=FP,
    )
    assert labels(result) == ["unchanged"]
    assert list(result.carry_changed) == ["n"]


def test_diff_against_empty_index_marks_everything_new():
    empty = ExistingIndex.empty(pa.string(), pa.schema([pa.field("title", pa.string())]))
    result = diff(
        keys=pa.array(["a", "b"]),
        content_hashes=pa.array(["1", "2"]),
        partition_keys=pa.array(["", ""]),
        carry=pa.table({"title": ["x", "y"]}),
        existing=empty,
        fingerprint=FP,
    )
    assert labels(result) == ["new", "new"]
    assert result.reasons() == ["new key", "new key"]


def test_diff_rejects_misaligned_inputs_and_key_type_change():
    existing = ExistingIndex(state([1, 2], ["a", "b"]))
    with pytest.raises(InputDataError, match="content_hashes has 1 rows"):
        diff(
            keys=pa.array([1, 2]),
            content_hashes=pa.array(["a"]),
            partition_keys=pa.array(["", ""]),
            existing=existing,
            fingerprint=FP,
        )
    with pytest.raises(InputDataError, match="rebuild"):
        diff(
            keys=pa.array(["1"]),
            content_hashes=pa.array(["a"]),
            partition_keys=pa.array([""]),
            existing=existing,
            fingerprint=FP,
        )


def test_existing_index_string_lookups_are_exact():
    keys = ["a", "b", "ü", "🎉", "", "a'b"]
    index = ExistingIndex(state(keys, [str(i) for i in range(len(keys))]))
    probe = pa.array(["🎉", "missing", "a'b", "", "A"])
    assert index.lookup(probe).tolist() == [3, -1, 5, 4, -1]
    assert index.lookup(pa.chunked_array([probe])).tolist() == [3, -1, 5, 4, -1]


def test_existing_index_survives_hash_collisions(monkeypatch):
    # Force every key onto one 64-bit code: the index must fall back to exact strings.
    monkeypatch.setattr(
        ExistingIndex, "_key_codes", lambda self, keys: np.zeros(len(keys), dtype=np.int64)
    )
    index = ExistingIndex(state(["x", "y", "z"], ["1", "2", "3"]))
    assert index.lookup(pa.array(["z", "q", "x"])).tolist() == [2, -1, 0]


def _colliding_key_hash(monkeypatch) -> list[bytes]:
    """Make every string key hash to the same 64 bits in changes.py; return the hashed keys."""
    hashed: list[bytes] = []

    def constant(data: bytes) -> int:
        hashed.append(data)
        return 7

    monkeypatch.setattr(changes.xxhash, "xxh3_64_intdigest", constant)
    return hashed


def test_incoming_key_colliding_with_a_stored_key_is_new(monkeypatch):
    hashed = _colliding_key_hash(monkeypatch)
    index = ExistingIndex(state(["stored"], ["h1"]))  # one stored key: the hashed index
    keys = pa.array(["intruder", "stored"])
    assert index.lookup(keys).tolist() == [-1, 0]
    assert b"intruder" in hashed  # looked up by its (colliding) 64-bit hash, then verified
    # The intruder even has the stored row's content hash: matched wrongly, it would be
    # "unchanged" and never embedded.
    result = diff(keys=keys, content_hashes=pa.array(["h1", "h1"]),
                  partition_keys=pa.array(["", ""]), existing=index, fingerprint=FP)  # fmt: skip
    assert labels(result) == ["new", "unchanged"]
    tracker = ScopeTracker(index)
    tracker.observe(keys, result.existing_rows)
    assert tracker.unseen_keys().to_pylist() == []
    # Alone, the intruder leaves the stored key unseen: it is deleted, not taken for it.
    alone = diff(keys=pa.array(["intruder"]), content_hashes=pa.array(["h1"]),
                 partition_keys=pa.array([""]), existing=index, fingerprint=FP)  # fmt: skip
    assert labels(alone) == ["new"]
    tracker = ScopeTracker(index)
    tracker.observe(pa.array(["intruder"]), alone.existing_rows)
    assert tracker.unseen_keys().to_pylist() == ["stored"]


def test_stored_keys_colliding_with_each_other_fall_back_to_exact_lookups(monkeypatch):
    hashed = _colliding_key_hash(monkeypatch)
    index = ExistingIndex(state(["x", "y", "z"], ["1", "2", "3"]))
    assert hashed  # the stored keys were hashed, collided, and the index fell back
    keys = pa.array(["z", "q", "x", "y"])
    assert index.lookup(keys).tolist() == [2, -1, 0, 1]
    result = diff(keys=keys, content_hashes=pa.array(["3", "3", "1", "changed"]),
                  partition_keys=pa.array([""] * 4), existing=index, fingerprint=FP)  # fmt: skip
    assert labels(result) == ["unchanged", "new", "unchanged", "changed"]
    tracker = ScopeTracker(index)
    tracker.observe(pa.array(["z", "q"]), result.existing_rows[:2])
    assert tracker.unseen_keys().to_pylist() == ["x", "y"]


def test_existing_index_rejects_duplicate_and_missing_columns():
    with pytest.raises(StoreError, match="duplicate keys"):
        ExistingIndex(state([1, 1], ["a", "b"]))
    with pytest.raises(InputDataError, match="content_hash"):
        ExistingIndex(pa.table({"key": [1]}))


# ---------------------------------------------------------------- scope tracking


def test_scope_tracker_finds_deletions_within_scope():
    index = ExistingIndex(state([1, 2, 3, 4], ["a", "b", "c", "d"], parts=["p", "p", "q", "q"]))
    tracker = ScopeTracker(index)
    for keys in (pa.array([1, 9]), pa.array([3])):
        tracker.observe(keys, index.lookup(keys))
    assert tracker.seen == 3
    assert tracker.unseen_keys().to_pylist() == [2, 4]
    assert tracker.unseen_keys(["q"]).to_pylist() == [4]
    assert tracker.unseen_keys([]).to_pylist() == []


@pytest.mark.parametrize(
    "batches",
    [
        [[1, 1]],  # stored key twice in one batch
        [[1], [1]],  # stored key in two batches
        [[7, 7]],  # new key twice in one batch
        [[7], [8, 7]],  # new key in two batches
    ],
)
def test_scope_tracker_rejects_duplicate_keys(batches):
    index = ExistingIndex(state([1, 2], ["a", "b"]))
    tracker = ScopeTracker(index)
    *first, last = [pa.array(batch) for batch in batches]
    for keys in first:
        tracker.observe(keys, index.lookup(keys))
    with pytest.raises(InputDataError, match=r"duplicate key\(s\).*[17]"):
        tracker.observe(last, index.lookup(last))


@pytest.mark.parametrize("key_kind", ["int", "string"])
def test_key_runs_find_every_key_added_over_many_batches(key_kind):
    rng = np.random.default_rng(1)
    ids = rng.permutation(20_000)
    as_keys = (lambda a: pa.array(a)) if key_kind == "int" else (
        lambda a: pa.array([f"k{i}" for i in a]))  # fmt: skip
    runs = KeyRuns()
    for start in range(0, 15_000, 700):  # uneven batches: runs of many sizes get merged
        batch = ids[start : min(start + 700, 15_000)]
        assert not runs.contains(as_keys(batch)).any()
        runs.add(as_keys(batch))
    assert len(runs) == 15_000
    assert len(runs._runs) < 10  # merged into few runs, not one per batch
    assert runs.contains(as_keys(ids[:15_000])).all()
    assert not runs.contains(as_keys(ids[15_000:])).any()


def test_key_runs_tell_colliding_string_keys_apart(monkeypatch):
    _colliding_key_hash(monkeypatch)  # every string key has the same code
    runs = KeyRuns()
    runs.add(pa.array(["a", "b"]))
    runs.add(pa.array(["c"]))
    assert runs.contains(pa.array(["b", "z", "c", "a"])).tolist() == [True, False, True, True]
    tracker = ScopeTracker(ExistingIndex(state(["s"], ["h"])))
    tracker.observe(pa.array(["x", "y"]), np.array([-1, -1]))
    tracker.observe(pa.array(["w"]), np.array([-1]))  # same code as x and y: not a repeat
    with pytest.raises(InputDataError, match=r"duplicate key\(s\).*'y'"):
        tracker.observe(pa.array(["v", "y"]), np.array([-1, -1]))


# ---------------------------------------------------------------- scale (speed: refresh_bench.py)


@pytest.mark.parametrize("key_kind", ["int", "string"])
def test_noop_diff_of_a_million_rows_finds_every_row_unchanged(key_kind):
    n = 1_000_000
    ids = np.arange(n, dtype=np.int64)
    keys = pa.array(ids) if key_kind == "int" else pa.array([f"doc-{i:09d}" for i in ids])
    hashes = pa.array(np.char.add("h" * 16, np.char.zfill(ids.astype(str), 16)).astype(object))
    parts = pa.array(["shard-01-of-04"] * n)
    titles = pa.array([f"title {i}" for i in range(n)])
    existing = state(keys, hashes, parts=parts.to_pylist(), title=titles)
    order = pa.array(np.random.default_rng(0).permutation(n))
    incoming = pa.table({"key": keys, "h": hashes, "p": parts, "title": titles}).take(order)
    batches = incoming.to_batches(max_chunksize=50_000)

    index = ExistingIndex(existing)
    tracker = ScopeTracker(index)
    total = 0
    for batch in batches:
        result = diff(
            keys=batch["key"],
            content_hashes=batch["h"],
            partition_keys=batch["p"],
            carry=pa.table({"title": batch["title"]}),
            existing=index,
            fingerprint=FP,
        )
        tracker.observe(batch["key"], result.existing_rows)
        total += result.counts["unchanged"]
    assert total == n
    assert len(tracker.unseen_keys()) == 0


def test_module_is_pure():
    # changes.py must not pull in LanceDB, DuckDB or torch (pure functions over Arrow/NumPy).
    source = Path(changes.__file__).read_text(encoding="utf-8")
    for heavy in ("lancedb", "duckdb", "torch"):
        assert f"import {heavy}" not in source
