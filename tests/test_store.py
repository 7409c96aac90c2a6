import json
import warnings
from datetime import UTC, datetime, timedelta

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingFailedError,
    InputDataError,
    SpecMismatchError,
    StoreConflictError,
    StoreError,
    UnsafeNameError,
)
from qwen3_pipeline.core.schema import (
    LINEAGE_COLUMNS,
    META_FINGERPRINT,
    META_SOURCE_KEY,
    META_SPEC,
    rebuild_table_name,
    table_schema,
    validate_table_name,
    validate_uri,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.store import (
    RetryPolicy,
    VectorStore,
    abort_rebuild,
    begin_rebuild,
    commit_rebuild,
)
from qwen3_pipeline.store.merge_path import key_index_coverage
from tests.refresh_helpers import fork_context

SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
OTHER_SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=128)
CARRY = pa.schema([pa.field("title", pa.string())])
INT64 = pa.int64()
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.002)


@pytest.fixture(autouse=True)
def _no_deprecated_lancedb_calls():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def open_store(uri, name="docs", spec=SPEC, key_type=INT64, carry=CARRY, **kw):
    return VectorStore.open(str(uri), name, spec, key_type=key_type, carry_schema=carry, **kw)


def rows(store, keys, *, texts=None, part="", titles=None, run_id="run-1"):
    n = len(keys)
    texts = texts or [f"text {k}" for k in keys]
    vectors = np.random.default_rng(0).standard_normal((n, store.spec.output_dim))
    return store.build_rows(
        keys=keys,
        vectors=vectors.astype(np.float32),
        content_hashes=[f"hash-{t}" for t in texts],
        n_tokens=[len(t.split()) + 1 for t in texts],
        truncated=[False] * n,
        partition_keys=[part] * n,
        source="test-source",
        run_id=run_id,
        carry=pa.table({"title": titles or [f"title {k}" for k in keys]}),
    )


def by_key(store):
    table = store.table.to_arrow().sort_by("key")
    return {r["key"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["docs", "docs_v2", "a-b.c", "_x", "A1"])
def test_valid_table_names(name):
    assert validate_table_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "../docs", "a/b", "a\\b", "x..y", ".hidden", "a b", "tab\x00le", "é", "a" * 201],
)
def test_unsafe_table_names(name, tmp_path):
    with pytest.raises(UnsafeNameError):
        validate_table_name(name)
    with pytest.raises(UnsafeNameError):
        open_store(tmp_path, name=name)


@pytest.mark.parametrize(
    "uri", ["/data/lancedb", "relative/dir", "s3://bucket/prefix", "gs://b/p", "file:///tmp/x"]
)
def test_valid_uris(uri):
    assert validate_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    ["", "  ", "/data/../etc", "..", "s3://bucket/../other", "a\\..\\b", "/tmp/x\x00", "dir/.."],
)
def test_unsafe_uris(uri):
    with pytest.raises(UnsafeNameError):
        validate_uri(uri)
    with pytest.raises(UnsafeNameError):
        VectorStore.open(uri, "docs", SPEC, key_type=pa.int64())


# ---------------------------------------------------------------- creating and opening


def test_create_records_schema_spec_key_and_index(tmp_path):
    store = open_store(tmp_path, source_key="doc_id")
    schema = store.schema
    assert schema.names == [*LINEAGE_COLUMNS, "title"]
    assert schema.field("key").type == pa.int64()
    assert not schema.field("key").nullable
    assert schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert schema.field("dim").type == pa.int32()
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.field("truncated").type == pa.bool_()
    assert schema.field("embedded_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("source_updated_at").type == pa.timestamp("us", tz="UTC")
    meta = schema.metadata
    assert meta[META_FINGERPRINT.encode()].decode() == SPEC.fingerprint
    assert json.loads(meta[META_SPEC.encode()])["dim"] == 64
    assert meta[META_SOURCE_KEY.encode()] == b"doc_id"
    assert b"qwen3_pipeline.package_version" in meta
    key_meta = schema.field("key").metadata or {}
    assert any(b"primary-key" in k for k in key_meta), "key declared as primary key"
    # The BTree comes after a run's last commit (a fill's compaction then has no index to
    # update with every row at once); the refresh calls ensure_key_index.
    assert store.table.list_indices() == []
    assert store.ensure_key_index()
    indices = store.table.list_indices()
    assert [(list(ix.columns), ix.index_type) for ix in indices] == [(["key"], "BTree")]
    assert not store.ensure_key_index()  # already indexed: nothing built, no commit
    assert store.count_rows() == 0


def test_reopen_same_spec_makes_no_commit(tmp_path):
    store = open_store(tmp_path)
    version = store.version
    again = open_store(tmp_path)
    assert again.version == version
    assert again.key_type == pa.int64()


def test_reopen_with_other_spec_is_refused(tmp_path):
    open_store(tmp_path)
    with pytest.raises(SpecMismatchError) as info:
        open_store(tmp_path, spec=OTHER_SPEC)
    message = str(info.value)
    assert "dim=64" in message
    assert "dim=128" in message
    assert "rebuild=True" in message
    assert "--rebuild" in message


def test_key_type_change_is_refused(tmp_path):
    open_store(tmp_path)
    with pytest.raises(InputDataError, match=r"string.*int64"):
        open_store(tmp_path, key_type=pa.string())


def test_foreign_table_is_refused(tmp_path):
    import lancedb

    lancedb.connect(str(tmp_path)).create_table("foreign", pa.table({"key": [1]}))
    with pytest.raises(SpecMismatchError, match="no recorded embedding spec"):
        open_store(tmp_path, name="foreign")


def test_missing_table_without_create(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_store(tmp_path, create=False)


def test_carry_columns_added_and_type_checked(tmp_path):
    open_store(tmp_path)
    wider = pa.schema([pa.field("title", pa.string()), pa.field("url", pa.string())])
    store = open_store(tmp_path, carry=wider)
    assert "url" in store.schema.names
    with pytest.raises(InputDataError, match="'title' is int64"):
        open_store(tmp_path, carry=pa.schema([pa.field("title", pa.int64())]))
    with pytest.raises(ConfigError, match="clash"):
        table_schema(
            SPEC, key_type="int64", carry_schema=pa.schema([pa.field("run_id", pa.string())])
        )


# ---------------------------------------------------------------- writing


def test_upsert_inserts_then_updates_by_key(tmp_path):
    store = open_store(tmp_path)
    first = store.upsert(rows(store, [1, 2, 3]))
    assert first is not None
    assert (first.inserted, first.updated) == (3, 0)
    second = store.upsert(rows(store, [3, 4], texts=["new three", "four"], run_id="run-2"))
    assert second is not None
    assert (second.inserted, second.updated) == (1, 1)
    assert second.version == store.version
    stored = by_key(store)
    assert sorted(stored) == [1, 2, 3, 4]
    assert stored[3]["content_hash"] == "hash-new three"
    assert stored[3]["run_id"] == "run-2"
    assert stored[1]["model_id"] == SPEC.model
    assert stored[1]["dim"] == 64
    assert stored[1]["spec_fingerprint"] == SPEC.fingerprint
    assert stored[1]["source"] == "test-source"
    assert stored[1]["embedded_at"].tzinfo is not None
    assert len(stored[1]["vector"]) == 64


def test_writes_use_the_key_index_only_while_its_unindexed_tail_is_short(tmp_path, monkeypatch):
    # With a long unindexed tail LanceDB's indexed merge is several times slower and bigger
    # than a scan (benchmarks/merge_memory_bench.py), so the store picks the join per write.
    from lancedb.merge import LanceMergeInsertBuilder

    chosen: list[bool] = []
    real_use_index = LanceMergeInsertBuilder.use_index

    def spy(self, use_index):
        chosen.append(use_index)
        return real_use_index(self, use_index)

    monkeypatch.setattr(LanceMergeInsertBuilder, "use_index", spy)
    store = open_store(tmp_path)
    store.upsert(rows(store, list(range(100))))  # no index yet: nothing to choose
    assert store.ensure_key_index()
    assert key_index_coverage(store.table) == (100, 0)
    store.upsert(rows(store, [100, 101]))  # tail of 0 rows of 100: look up
    store.upsert(rows(store, list(range(102, 140))))  # tail of 2 rows: look up
    store.upsert(rows(store, [0, 140], texts=["new zero", "t"], run_id="run-2"))  # 40: scan
    store.update_columns(pa.table({"key": [1], "partition_key": ["p"]}))  # still long: scan
    assert chosen == [True, True, True, False, False]
    assert key_index_coverage(store.table) == (98, 43)  # rows 0 and 1 rewritten: unindexed
    stored = by_key(store)  # both joins wrote the same way: by key, no duplicates
    assert sorted(stored) == list(range(141))
    assert stored[0]["content_hash"] == "hash-new zero"
    assert stored[1]["partition_key"] == "p"
    store.maybe_optimize(max_fragments=0)  # the compaction folds the tail into the index
    assert key_index_coverage(store.table) == (141, 0)
    store.upsert(rows(store, [141]))
    assert chosen[-1] is True


def test_replacing_documents_deletes_by_source_only_when_a_stored_chunk_is_left_out(
    tmp_path, monkeypatch
):
    # A merge that deletes by source joins the whole table with every column (1.4 GiB a
    # commit at 4M chunks of dim 64), so a fill and edits that keep or add chunks go without.
    from lancedb.merge import LanceMergeInsertBuilder

    from tests.chunk_tables import CARRY as CHUNK_CARRY
    from tests.chunk_tables import CHUNK_SPEC, chunk_rows

    by_source: list[object] = []
    real = LanceMergeInsertBuilder.when_not_matched_by_source_delete

    def spy(self, condition=None):
        by_source.append(condition)
        return real(self, condition)

    monkeypatch.setattr(LanceMergeInsertBuilder, "when_not_matched_by_source_delete", spy)
    store = open_store(tmp_path, "chunks", spec=CHUNK_SPEC, carry=CHUNK_CARRY)
    query = np.ones(CHUNK_SPEC.output_dim, dtype=np.float32)

    def chunks_of(docs):
        return chunk_rows(CHUNK_SPEC, query, docs)

    def stored():
        table = store.table.to_arrow()
        return sorted(zip(table["key"].to_pylist(), table["chunk_hash"].to_pylist(), strict=True))

    fill = store.replace_documents(chunks_of({1: [0.1, 0.2], 2: [0.3]}), [1, 2])
    assert fill is not None
    assert (fill.inserted, fill.deleted) == (3, 0)
    grown = store.replace_documents(chunks_of({2: [0.3, 0.4, 0.5]}), [2])
    assert grown is not None
    assert (grown.inserted, grown.updated, grown.deleted) == (2, 1, 0)
    assert by_source == []
    expected = chunks_of({1: [0.9], 2: [0.3, 0.4, 0.5]})
    shrunk = store.replace_documents(expected.filter(pc.equal(expected["doc_key"], 1)), [1])
    assert shrunk is not None
    assert (shrunk.updated, shrunk.deleted) == (1, 1)
    assert len(by_source) == 1
    assert stored() == sorted(
        zip(expected["key"].to_pylist(), expected["chunk_hash"].to_pylist(), strict=True)
    )
    emptied = store.replace_documents(expected.slice(0, 0), [2])  # every chunk left out
    assert emptied is not None
    assert emptied.deleted == 3
    assert [key for key, _ in stored()] == ["1#0"]


def test_a_document_rewritten_by_another_writer_mid_commit_keeps_no_foreign_chunk(
    tmp_path, monkeypatch
):
    # The read of the stored chunks and the merge are not one step: another writer may put a
    # longer version of a document in between. The merge (retried by LanceDB on the new
    # version) then updates chunks the read did not see, and must not keep the extra ones.
    from tests.chunk_tables import CARRY as CHUNK_CARRY
    from tests.chunk_tables import CHUNK_SPEC, chunk_rows

    query = np.ones(CHUNK_SPEC.output_dim, dtype=np.float32)
    ours = open_store(tmp_path, "chunks", spec=CHUNK_SPEC, carry=CHUNK_CARRY)
    other = open_store(tmp_path, "chunks", spec=CHUNK_SPEC, carry=CHUNK_CARRY)
    real_scan = VectorStore._scan
    raced = []

    def scan_then_race(self, columns, where):
        stored = real_scan(self, columns, where)
        if self is ours and not raced:  # the other writer commits right after our read
            raced.append(
                other.replace_documents(chunk_rows(CHUNK_SPEC, query, {7: [0.1] * 3}), [7])
            )
        return stored

    monkeypatch.setattr(VectorStore, "_scan", scan_then_race)
    written = ours.replace_documents(chunk_rows(CHUNK_SPEC, query, {7: [0.2, 0.3]}), [7])
    assert raced
    assert written is not None
    table = lancedb.connect(str(tmp_path)).open_table("chunks").to_arrow().sort_by("key")
    assert table["key"].to_pylist() == ["7#0", "7#1"]  # ours, wholly: no "7#2" left behind


def test_calls_with_nothing_to_do_make_no_commit(tmp_path):
    store = open_store(tmp_path)
    store.upsert(rows(store, [1, 2]))
    version = store.version
    empty = rows(store, [1]).slice(0, 0)
    assert store.upsert(empty) is None
    assert store.update_columns(empty.select(["key", "title"])) is None
    assert store.delete_keys([]) is None
    assert store.delete_keys([99, 100]) is None  # not stored: no commit
    assert store.maybe_optimize(max_fragments=1000) is False
    assert store.version == version


def test_update_columns_moves_and_updates_carry_without_touching_vectors(tmp_path):
    store = open_store(tmp_path)
    store.upsert(rows(store, [1, 2, 3], part="shard-00-of-02"))
    before = by_key(store)
    update = pa.table(
        {
            "key": [1, 2],
            "partition_key": ["shard-01-of-02", "shard-00-of-02"],
            "title": ["T1", "T2"],
        }
    )
    result = store.update_columns(update)
    assert result is not None
    assert result.updated == 2
    assert result.inserted == 0
    after = by_key(store)
    assert after[1]["partition_key"] == "shard-01-of-02"
    assert after[1]["title"] == "T1"
    assert after[2]["title"] == "T2"
    for key in (1, 2, 3):
        assert after[key]["vector"] == before[key]["vector"]
        assert after[key]["content_hash"] == before[key]["content_hash"]
    assert after[3] == before[3]
    # keys that are not stored are not inserted by a column update
    store.update_columns(pa.table({"key": [42], "title": ["ghost"]}))
    assert 42 not in by_key(store)


def test_write_validation(tmp_path):
    store = open_store(tmp_path)
    good = rows(store, [1, 2])
    with pytest.raises(InputDataError, match="repeat key"):
        store.upsert(pa.concat_tables([good, good.slice(0, 1)]))
    with pytest.raises(InputDataError, match="lack column"):
        store.upsert(good.drop_columns(["content_hash"]))
    with pytest.raises(InputDataError, match="not in table"):
        store.update_columns(pa.table({"key": [1], "nope": [1]}))
    with pytest.raises(InputDataError, match="'key' column"):
        store.update_columns(pa.table({"title": ["x"]}))
    with pytest.raises(InputDataError, match="null key"):
        store.update_columns(pa.table({"key": pa.array([None], pa.int64()), "title": ["x"]}))
    with pytest.raises(InputDataError, match="shape"):
        store.build_rows(
            keys=[1],
            vectors=np.zeros((1, 32), np.float32),
            content_hashes=["h"],
            n_tokens=[1],
            truncated=[False],
            partition_keys=[""],
            source="s",
            run_id="r",
        )
    with pytest.raises(EmbeddingFailedError, match=r"keys \[2\]"):
        store.build_rows(
            keys=[1, 2],
            vectors=np.array([[0.0] * 64, [np.nan] * 64], np.float32),
            content_hashes=["h", "h"],
            n_tokens=[1, 1],
            truncated=[False, False],
            partition_keys=["", ""],
            source="s",
            run_id="r",
        )


NASTY_KEYS = [
    "plain",
    "a'b",
    "a''b",
    "'",
    "''",
    "back\\slash",
    "back\\'slash",
    "100%",
    "under_score",
    "-- comment",
    "x' OR '1'='1",
    "'; DELETE FROM docs; --",
    'dq"uote',
    "ünïcødé",
    "emoji 🎉",
    "new\nline",
    "tab\tchar",
    "",
    " ",
]


def test_delete_keys_with_nasty_string_keys(tmp_path):
    store = open_store(tmp_path, key_type=pa.string())
    decoys = ["a", "b", "ab", "x", "1", "plain2", "slash", "OR"]
    store.upsert(rows(store, NASTY_KEYS + decoys))
    result = store.delete_keys([*NASTY_KEYS[1:], "not-stored"])
    assert result is not None
    assert result.deleted == len(NASTY_KEYS) - 1
    assert sorted(by_key(store)) == sorted(["plain", *decoys])
    state = store.existing_state(keys=["plain", "a'b", "ab"])
    assert sorted(state["key"].to_pylist()) == ["ab", "plain"]


def test_delete_keys_batches_and_int_keys(tmp_path):
    store = open_store(tmp_path)
    keys = [-(2**62), -1, 0, 1, 2**62, *range(10, 60)]
    store.upsert(rows(store, keys))
    version = store.version
    result = store.delete_keys(pa.array(keys[:30]), batch_size=7)
    assert result is not None
    assert result.deleted == 30
    assert result.version > version
    assert sorted(by_key(store)) == sorted(keys[30:])
    with pytest.raises(InputDataError, match="key"):
        store.delete_keys(["1"])


def test_existing_state_is_scoped_and_never_reads_vectors(tmp_path):
    store = open_store(tmp_path, key_type=pa.string())
    store.upsert(rows(store, ["a", "b"], part="p1"))
    store.upsert(rows(store, ["c"], part="p2"))
    state = store.existing_state()
    assert state.column_names == [
        "key",
        "content_hash",
        "spec_fingerprint",
        "partition_key",
        "source_updated_at",
        "title",
    ]
    assert state.num_rows == 3
    assert sorted(store.existing_state(["p1"])["key"].to_pylist()) == ["a", "b"]
    assert store.existing_state([]).num_rows == 0
    assert store.existing_state(keys=[]).num_rows == 0
    assert store.existing_state(["p1"], keys=["a", "c"])["key"].to_pylist() == ["a"]
    assert store.existing_state(keys=pa.array(["c", "zz"]))["key"].to_pylist() == ["c"]
    assert store.count_rows(["p2"]) == 1
    assert store.count_rows([]) == 0
    assert store.count_rows(["it's"]) == 0


# ---------------------------------------------------------------- conflicts


class _Conflicting:
    """Wraps a lancedb table; its merge_insert fails with a commit conflict ``fails`` times."""

    def __init__(self, table, fails, message="Retryable commit conflict for version 7: x"):
        self._table = table
        self.fails = fails
        self.message = message

    def merge_insert(self, on):
        if self.fails:
            self.fails -= 1
            raise RuntimeError(self.message)
        return self._table.merge_insert(on)

    def __getattr__(self, name):
        return getattr(self._table, name)


def test_conflicts_are_retried_then_reported(tmp_path):
    store = open_store(tmp_path, retry=FAST_RETRY)
    real = store.table
    store._table = _Conflicting(real, fails=2)
    result = store.upsert(rows(store, [1]))
    assert result is not None
    assert result.attempts >= 3
    store._table = _Conflicting(real, fails=5)
    with pytest.raises(StoreConflictError, match="after 3 tries"):
        store.upsert(rows(store, [2]))
    store._table = _Conflicting(real, fails=1, message="disk on fire")
    with pytest.raises(StoreError, match="disk on fire") as info:
        store.upsert(rows(store, [3]))
    assert not isinstance(info.value, StoreConflictError)
    store._table = real
    assert sorted(by_key(store)) == [1]


# ---------------------------------------------------------------- upkeep


def test_maybe_optimize_compacts_and_keeps_tagged_versions(tmp_path):
    store = open_store(tmp_path)
    for start in range(0, 12, 2):
        store.upsert(rows(store, [start, start + 1]))
    tagged = store.version
    store.table.tags.create("pinned", tagged)
    store.upsert(rows(store, [100]))
    fragments = store.table.stats()["fragment_stats"]["num_fragments"]
    assert fragments > 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LanceDB warns about cleanup_older_than=0
        assert store.maybe_optimize(max_fragments=3, cleanup_older_than=timedelta(0)) is True
    assert store.table.stats()["fragment_stats"]["num_fragments"] < fragments
    assert store.table.tags.list()["pinned"]["version"] == tagged
    assert store.count_rows() == 13
    store.table.checkout("pinned")  # the tagged version is still readable
    assert store.table.count_rows() == 12
    store.table.checkout_latest()
    assert store.count_rows() == 13


# ---------------------------------------------------------------- rebuild


def test_rebuild_swaps_only_when_committed(tmp_path):
    live = open_store(tmp_path)
    live.upsert(rows(live, [1, 2, 3]))
    old_version = live.version

    staging = begin_rebuild(
        str(tmp_path), "docs", OTHER_SPEC, key_type=pa.int64(), carry_schema=CARRY
    )
    assert staging.table_name == rebuild_table_name("docs", OTHER_SPEC)
    staging.upsert(rows(staging, [1, 2]))
    # "crash": the live table is untouched and still refuses the new spec
    with pytest.raises(SpecMismatchError):
        open_store(tmp_path, spec=OTHER_SPEC)
    assert open_store(tmp_path).count_rows() == 3

    resumed = begin_rebuild(
        str(tmp_path), "docs", OTHER_SPEC, key_type=pa.int64(), carry_schema=CARRY
    )
    assert resumed.count_rows() == 2  # resumes where it stopped
    resumed.upsert(rows(resumed, [3, 4]))
    swapped = commit_rebuild(resumed)

    assert swapped.table_name == "docs"
    assert swapped.spec == OTHER_SPEC
    assert swapped.schema.field("vector").type.list_size == 128
    assert sorted(by_key(swapped)) == [1, 2, 3, 4]
    assert {r["spec_fingerprint"] for r in by_key(swapped).values()} == {OTHER_SPEC.fingerprint}
    assert any(b"primary-key" in k for k in (swapped.schema.field("key").metadata or {}))
    swapped.ensure_key_index()  # as the refresh does after the swap
    assert [list(ix.columns) for ix in swapped.table.list_indices()] == [["key"]]
    assert swapped.version > old_version  # the swap is a new version: old ones stay readable
    import lancedb

    names = lancedb.connect(str(tmp_path)).list_tables().tables
    assert names == ["docs"]
    assert open_store(tmp_path, spec=OTHER_SPEC).count_rows() == 4


def test_abort_rebuild_and_misuse(tmp_path):
    live = open_store(tmp_path)
    live.upsert(rows(live, [1]))
    staging = begin_rebuild(
        str(tmp_path), "docs", OTHER_SPEC, key_type=pa.int64(), carry_schema=CARRY
    )
    abort_rebuild(staging)
    import lancedb

    assert lancedb.connect(str(tmp_path)).list_tables().tables == ["docs"]
    with pytest.raises(ConfigError, match="begin_rebuild"):
        commit_rebuild(live)


# ---------------------------------------------------------------- concurrency


def _concurrent_writer(uri, worker, barrier):
    store = VectorStore.open(
        uri, "docs", SPEC, key_type=pa.int64(), carry_schema=CARRY, retry=RetryPolicy(attempts=10)
    )
    barrier.wait(timeout=120)
    for chunk in range(4):
        own = [worker * 1000 + chunk * 25 + i for i in range(25)]
        shared = [chunk * 10 + i for i in range(10)]  # every worker inserts these too
        store.upsert(rows(store, own, run_id=f"w{worker}"))
        store.upsert(rows(store, shared, run_id=f"w{worker}"))


@pytest.mark.slow
def test_concurrent_writers_lose_nothing_and_never_duplicate(tmp_path):
    open_store(tmp_path)
    # Not forked from this process (lancedb's runtime is not fork-safe): from a forkserver that
    # has lancedb imported and never used it (spawned processes each import lancedb, ~30 s on
    # two cores).
    context = fork_context()
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_concurrent_writer, args=(str(tmp_path), w, barrier))
        for w in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=300)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    keys = open_store(tmp_path).table.to_arrow()["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key was inserted twice"
    expected = {w * 1000 + i for w in range(4) for i in range(100)} | set(range(40))
    assert set(keys) == expected


def test_embedded_at_defaults_to_now_utc(tmp_path):
    store = open_store(tmp_path)
    before = datetime.now(UTC)
    store.upsert(rows(store, [1]))
    stamp = by_key(store)[1]["embedded_at"]
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_open_without_carry_columns(tmp_path):
    # carry_schema=None used to reach the carry check unnormalised (TypeError).
    store = VectorStore.open(str(tmp_path), "docs", SPEC, key_type=INT64)
    assert store.carry_columns == ()
    assert VectorStore.open(str(tmp_path), "docs", SPEC, key_type=INT64).carry_columns == ()


@pytest.mark.parametrize("raw", ["0", "-5", "lots", "1.5"])
def test_a_bad_metadata_cache_size_is_refused_naming_the_variable(raw, tmp_path, monkeypatch):
    from qwen3_pipeline.core.errors import ConfigError
    from qwen3_pipeline.store.connection import METADATA_CACHE_ENV, connect

    monkeypatch.setenv(METADATA_CACHE_ENV, raw)
    with pytest.raises(ConfigError, match=f"{METADATA_CACHE_ENV}='{raw}'"):
        connect(str(tmp_path / "db"), None)


def test_a_capped_metadata_cache_still_writes_and_reads(tmp_path, monkeypatch):
    from qwen3_pipeline.store.connection import METADATA_CACHE_ENV, connect

    monkeypatch.setenv(METADATA_CACHE_ENV, "1")  # 1 MiB: every old manifest is evicted
    db = connect(str(tmp_path / "db"), None)
    table = db.create_table("t", pa.table({"k": pa.array([0], pa.int64())}))
    for i in range(1, 30):
        table.add(pa.table({"k": pa.array([i], pa.int64())}))
    assert sorted(
        connect(str(tmp_path / "db"), None).open_table("t").to_arrow()["k"].to_pylist()
    ) == list(range(30))
