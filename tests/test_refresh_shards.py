"""A refresh over many hash shards runs shard by shard: same result as the whole table at once,
exact counts, one scan of the source, one shard's stored state at a time, nothing written when
any shard has bad input. Real LanceDB in tmp_path, FakeEmbedder."""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pytest

import qwen3_pipeline.engine.plan as plan_module
import qwen3_pipeline.engine.refresh as refresh_module
import qwen3_pipeline.engine.shards as shards_module
from qwen3_pipeline.core.changes import ExistingIndex
from qwen3_pipeline.core.errors import ConfigError, InputDataError, MassDeleteError
from qwen3_pipeline.engine.apply import apply_plan
from qwen3_pipeline.engine.options import RefreshOptions, RefreshRequest
from qwen3_pipeline.engine.refresh import check_mass_delete, plan_refresh, refresh
from qwen3_pipeline.engine.report import MAX_SHOWN_FAILURES, RefreshReport, merge_reports
from qwen3_pipeline.sources import (
    ArrowIPCSource,
    ArrowSource,
    Shard,
    Shards,
    Source,
    SourceConfig,
)
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import (
    CONFIG,
    assert_table_matches,
    drop_keys,
    expected_state,
    make_rows,
    mutate,
    no_drift_guard,
    shard_label_of,
    spec,
    table_rows,
    table_version,
)

TABLE = "docs"
COUNT = 8
ROWS = 400
CHUNK = 64


def sharded(partition: Any = None, **kwargs: Any) -> SourceConfig:
    fields = dict(key="id", template=CONFIG.template, carry=CONFIG.carry, updated_at="updated_at")
    return SourceConfig(**{**fields, **kwargs}, partition=partition or Shards(COUNT))


class CountingSource:
    """Wraps a source and counts its full reads (``batches`` calls) and the rows they yield."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.reads = 0
        self.rows = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def schema(self) -> pa.Schema:
        return self.inner.schema()

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        self.reads += 1
        for batch in self.inner.batches(columns, batch_rows):
            self.rows += batch.num_rows
            yield batch

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        return self.inner.key_problems(key, limit)


def run(db, source, config=None, *, embedder=None, **kwargs) -> RefreshReport:
    if isinstance(source, pa.Table):
        source = ArrowSource(source, name="docs-source")
    return refresh(
        source=source,
        config=config or sharded(),
        embedder=embedder or FakeEmbedder(spec()),
        db_uri=str(db),
        table=TABLE,
        chunk_rows=kwargs.pop("chunk_rows", CHUNK),
        progress=False,
        **kwargs,
    )


def run_whole(db, table: pa.Table, config=None) -> RefreshReport:
    """The whole scope in one plan and one apply (what refresh() did before shard by shard)."""
    config = config or sharded()
    source = ArrowSource(table, name="docs-source")
    embedder = FakeEmbedder(spec())
    version = table_version(str(db), TABLE) or 0
    plan = plan_refresh(source=source, config=config, embedder=embedder, db_uri=str(db),
                        table=TABLE, chunk_rows=CHUNK, progress=False)  # fmt: skip
    check_mass_delete(plan)
    options = RefreshOptions(chunk_rows=CHUNK, progress=False)
    request = RefreshRequest(source=source, config=config, embedder=embedder, db_uri=str(db),
                             table=TABLE, options=options)  # fmt: skip
    return apply_plan(plan, request, version_before=version)


def counters(report: RefreshReport) -> dict[str, int]:
    return {k: v for k, v in report.counters().items() if v}


def stored(db) -> dict[Any, tuple[Any, ...]]:
    rows = table_rows(str(db), TABLE).drop_columns(["vector"]).to_pylist()
    columns = ("content_hash", "partition_key", "title", "url", "source_updated_at", "source")
    return {r["key"]: tuple(r.get(c) for c in columns) for r in rows}


def shard_of(key: int) -> int:
    return int(shard_label_of(key, COUNT).split("-")[1])


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "db")


@pytest.fixture
def planned_scopes(monkeypatch):
    """The partition of every plan the refresh makes, and the stored-state labels it indexed."""
    scopes: list[dict[str, Any]] = []
    real_plan = plan_module.plan_scope

    def plan_spy(request: RefreshRequest) -> Any:
        scopes.append({"partition": request.config.partition, "indexed": set()})
        return real_plan(request)

    class IndexSpy(ExistingIndex):
        def __init__(self, state: pa.Table) -> None:
            super().__init__(state)
            if scopes:
                scopes[-1]["indexed"] |= set(state.column("partition_key").to_pylist())
                scopes[-1]["rows"] = state.num_rows

    monkeypatch.setattr(refresh_module, "plan_scope", plan_spy)
    monkeypatch.setattr(shards_module, "plan_scope", plan_spy)
    monkeypatch.setattr(plan_module, "ExistingIndex", IndexSpy)
    return scopes


# --------------------------------------------------------------------------- same result


def test_all_shards_equal_the_whole_table_refresh_with_exact_counts(db, tmp_path, planned_scopes):
    source = make_rows(range(ROWS))
    report = run(db, source)
    whole_db = tmp_path / "whole"
    whole = run_whole(whole_db, source)

    assert stored(db) == stored(whole_db)
    assert_table_matches(db, TABLE, expected_state(source, partition=Shards(COUNT)))
    assert counters(report) == counters(whole) == {"scanned": ROWS, "inserted": ROWS,
                                                   "embedded": ROWS}  # fmt: skip
    assert report.per_partition == whole.per_partition
    assert len(report.per_partition) == COUNT
    assert report.partition_keys is None
    assert report.tokens == whole.tokens
    assert report.padded_tokens == whole.padded_tokens
    assert report.committed
    assert report.version_before == 0
    assert report.version_after == table_version(db, TABLE)
    assert report.model_loads == 1
    # One run: every row carries the same run id and the original source's name.
    data = table_rows(db, TABLE)
    assert set(data.column("run_id").to_pylist()) == {report.run_id}
    assert set(data.column("source").to_pylist()) == {"docs-source"}
    # Eight plans, each of one shard.
    assert [s["partition"] for s in planned_scopes] == [Shard(i, COUNT) for i in range(COUNT)]


def test_a_second_run_embeds_nothing_and_commits_nothing(db):
    source = make_rows(range(ROWS))
    run(db, source)
    version = table_version(db, TABLE)
    embedder = FakeEmbedder(spec())
    again = run(db, source, embedder=embedder)
    assert embedder.calls == []
    assert not again.committed
    assert counters(again) == {"scanned": ROWS, "unchanged": ROWS}
    assert again.version_before == again.version_after == version
    assert table_version(db, TABLE) == version


def test_edits_inserts_deletes_across_shards_are_counted_exactly(db, tmp_path):
    source = make_rows(range(ROWS))
    run(db, source)
    whole_db = tmp_path / "whole"
    run_whole(whole_db, source)
    changes = mutate(source, seed=5)
    embedder = FakeEmbedder(spec())
    report = run(db, changes.table, embedder=embedder, drift_guard=no_drift_guard)
    whole = run_whole(whole_db, changes.table)

    assert report.updated == len(changes.edited) > 0
    assert report.inserted == len(changes.inserted) > 0
    assert report.deleted == len(changes.deleted) > 0
    assert report.carry_updated == len(changes.carry_only) > 0
    assert report.unchanged == ROWS - len(changes.edited + changes.deleted + changes.carry_only)
    assert report.embedded_rows == sum(embedder.calls) == len(changes.edited + changes.inserted)
    assert counters(report) == counters(whole)
    assert report.per_partition == whole.per_partition
    touched = {shard_label_of(k, COUNT) for k in changes.deleted}
    assert {k for k, v in report.per_partition.items() if v.get("deleted")} == touched
    assert stored(db) == stored(whole_db)
    assert_table_matches(db, TABLE, expected_state(changes.table, partition=Shards(COUNT)))


def test_a_subset_of_shards_refreshes_only_those(db, planned_scopes):
    source = make_rows(range(ROWS))
    run(db, source)
    changes = mutate(source, seed=9)
    picked = (1, 5)
    mine = lambda keys: [k for k in keys if shard_of(k) in picked]  # noqa: E731
    planned_scopes.clear()
    report = run(db, changes.table, sharded(Shards(COUNT, picked)))
    assert report.partition_keys == [f"shard-0{i}-of-08" for i in picked]
    assert set(report.per_partition) == set(report.partition_keys)
    assert report.updated == len(mine(changes.edited))
    assert report.inserted == len(mine(changes.inserted))
    assert report.deleted == len(mine(changes.deleted))
    assert report.scanned == sum(shard_of(k) in picked for k in changes.table["id"].to_pylist())
    assert [s["partition"] for s in planned_scopes] == [Shard(i, COUNT) for i in picked]
    # The other shards still hold the old rows.
    rows = stored(db)
    for key in changes.deleted:
        assert (key in rows) == (shard_of(key) not in picked)


# --------------------------------------------------------------------------- bounded scope


def test_each_plan_indexes_only_its_own_shard(db, planned_scopes):
    source = make_rows(range(ROWS))
    run(db, source)
    planned_scopes.clear()
    run(db, mutate(source, seed=2).table)
    assert len(planned_scopes) == COUNT
    for i, scope in enumerate(planned_scopes):
        label = f"shard-0{i}-of-08"
        assert scope["partition"] == Shard(i, COUNT)
        assert scope["indexed"] == {label}
        assert scope["rows"] == sum(shard_label_of(k, COUNT) == label for k in range(ROWS))


def test_the_source_is_read_once(db):
    source = CountingSource(ArrowSource(make_rows(range(ROWS))))
    run(db, source)
    assert (source.reads, source.rows) == (1, ROWS)
    changed = CountingSource(ArrowSource(mutate(make_rows(range(ROWS)), seed=4).table))
    run(db, changed)
    assert changed.reads == 1


def test_progress_names_each_shard_and_counts_the_whole_run(db, caplog, monkeypatch):
    from qwen3_pipeline.core.progress import PROGRESS_SECONDS_ENV

    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.000001")  # a line per forward pass
    source = make_rows(range(ROWS))
    with caplog.at_level(logging.INFO, logger="qwen3_pipeline"):
        refresh(source=ArrowSource(source), config=sharded(), embedder=FakeEmbedder(spec()),
                db_uri=db, table=TABLE, chunk_rows=CHUNK, progress=True)  # fmt: skip
    messages = [r.getMessage() for r in caplog.records]
    for i in range(COUNT):
        label = f"shard-0{i}-of-08"
        assert any(m.startswith(f"shard {i + 1}/{COUNT} ({label}): planning") for m in messages)
        assert any(m.startswith(f"shard {i + 1}/{COUNT} ({label}): applying") for m in messages)
    # One embedding progress stream for the run: exact totals over all shards, one ETA.
    embedding = [m for m in messages if m.startswith(f"embedding into {TABLE}: ")]
    assert len(embedding) >= ROWS // 64
    assert all(f"/{ROWS} rows" in m for m in embedding)
    assert f"{ROWS}/{ROWS} rows" in embedding[-1]
    assert any("ETA" in m for m in embedding)
    assert any(m.startswith(f"refreshed {TABLE}: {ROWS} scanned") for m in messages)
    assert any("(8 shards)" in m for m in messages)


def test_spill_files_are_removed_after_success_and_failure(db, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    source = make_rows(range(ROWS))
    run(db, source, spill_dir=str(spill))
    assert list(spill.iterdir()) == []
    with pytest.raises(MassDeleteError):
        run(db, source.slice(0, 10), spill_dir=str(spill))
    assert list(spill.iterdir()) == []


# --------------------------------------------------------------------------- nothing half-written


def _last_shard_key(keys: list[int]) -> int:
    return next(k for k in reversed(keys) if shard_of(k) == COUNT - 1)


@pytest.mark.parametrize("table_exists", [True, False], ids=["existing-table", "new-table"])
def test_a_bad_row_in_the_last_shard_writes_nothing(db, planned_scopes, table_exists):
    config = sharded(template="{title}: {price:.2f}", carry=(), updated_at=None)
    keys = list(range(ROWS))
    rows = make_rows(keys).append_column("price", pa.array([float(k) for k in keys]))
    if table_exists:
        run(db, rows, config)
    version = table_version(db, TABLE)
    before = stored(db) if table_exists else None
    bad = _last_shard_key(keys)
    prices = [float(k) + 1 for k in keys]
    prices[keys.index(bad)] = None  # a format spec fails on None: found while planning
    edited = rows.set_column(rows.schema.get_field_index("price"), "price",
                             pa.array(prices, pa.float64()))  # fmt: skip
    planned_scopes.clear()
    embedder = FakeEmbedder(spec())
    with pytest.raises(InputDataError, match="could not format"):
        run(db, edited, config, embedder=embedder)
    # Every shard was planned (the bad one last), none applied.
    assert [s["partition"] for s in planned_scopes] == [Shard(i, COUNT) for i in range(COUNT)]
    assert embedder.calls == []
    assert table_version(db, TABLE) == version  # None: not even created
    if table_exists:
        assert stored(db) == before


@pytest.mark.parametrize("case", ["null key", "duplicate key"])
def test_bad_keys_in_a_late_shard_write_nothing(db, case):
    # Keys are checked during the one read (nulls: a row without a key has no shard) and
    # shard by shard (duplicates: equal keys share a shard), before any shard is applied.
    run(db, make_rows(range(ROWS)))
    version = table_version(db, TABLE)
    before = stored(db)
    rows = make_rows(range(ROWS)).to_pylist()
    late = _last_shard_key(list(range(ROWS)))
    if case == "null key":
        rows[late]["id"] = None
        rows[late + 1]["id"] = None
        message = r"key column 'id' of docs-source must be unique and non-null: 2 row\(s\) have"
    else:
        rows[0]["id"] = late
        message = rf"duplicate keys: {late} \(2 rows\)"
    source = CountingSource(ArrowSource(pa.Table.from_pylist(rows), name="docs-source"))
    embedder = FakeEmbedder(spec())
    with pytest.raises(InputDataError, match=message):
        run(db, source, embedder=embedder)
    assert source.reads == 1
    assert embedder.calls == []
    assert table_version(db, TABLE) == version
    assert stored(db) == before


def test_a_spec_mismatch_is_refused_before_the_source_is_split(db):
    from qwen3_pipeline.core.errors import SpecMismatchError

    run(db, make_rows(range(ROWS)))
    source = CountingSource(ArrowSource(make_rows(range(ROWS))))
    with pytest.raises(SpecMismatchError):
        run(db, source, embedder=FakeEmbedder(spec(dim=48)))
    assert source.reads == 0


def test_the_mass_delete_guard_judges_the_totals(db):
    source = make_rows(range(ROWS))
    run(db, source)
    version = table_version(db, TABLE)
    # One whole shard gone (about 1/8 of the table): within the default share.
    one_shard = [k for k in range(ROWS) if shard_of(k) == 3]
    report = run(db, drop_keys(source, one_shard))
    assert report.deleted == len(one_shard) > 0
    assert report.per_partition["shard-03-of-08"] == {"deleted": len(one_shard)}
    version = table_version(db, TABLE)
    left = ROWS - len(one_shard)
    # Most of every shard gone: refused, whichever shard it is in, nothing written.
    kept = drop_keys(source, [k for k in range(ROWS) if k % 10 < 7])
    with pytest.raises(MassDeleteError, match=rf"of the {left} row\(s\) of table 'docs'"):
        run(db, kept)
    assert table_version(db, TABLE) == version
    # An empty source over a non-empty table: refused, unless allowed.
    with pytest.raises(MassDeleteError, match="no rows in scope"):
        run(db, source.slice(0, 0))
    assert table_version(db, TABLE) == version
    report = run(db, source.slice(0, 0), allow_mass_delete=True)
    assert report.deleted == left
    assert table_rows(db, TABLE).num_rows == 0


def test_a_table_labelled_otherwise_is_refreshed_at_once_and_moves_without_embedding(
    db, planned_scopes
):
    source = make_rows(range(ROWS))
    run(db, source, sharded(Shards(4)))
    planned_scopes.clear()
    embedder = FakeEmbedder(spec())
    report = run(db, source, embedder=embedder)
    # The rows labelled "-of-04" are outside every "-of-08" shard: one plan of the whole table.
    assert [s["partition"] for s in planned_scopes] == [Shards(COUNT)]
    assert counters(report) == {"scanned": ROWS, "moved": ROWS}
    assert embedder.calls == []
    assert_table_matches(db, TABLE, expected_state(source, partition=Shards(COUNT)))
    planned_scopes.clear()
    assert not run(db, source).committed
    assert len(planned_scopes) == COUNT


def test_a_rebuild_is_one_pass_over_the_whole_source(db, planned_scopes):
    source = make_rows(range(ROWS))
    run(db, source)
    planned_scopes.clear()
    report = run(db, source, rebuild=True)
    assert [s["partition"] for s in planned_scopes] == [Shards(COUNT)]
    assert report.inserted == ROWS


def test_a_string_keyed_parquet_source_splits_like_the_source_filter(db, tmp_path):
    import pyarrow.parquet as pq

    from qwen3_pipeline.sources import ParquetSource

    rows = make_rows(range(200))
    rows = rows.set_column(0, "id", pa.array([f"doc-{k}" for k in range(200)]))
    path = tmp_path / "docs.parquet"
    pq.write_table(rows, path, row_group_size=50)
    report = run(db, ParquetSource(path))
    assert report.inserted == 200
    assert_table_matches(db, TABLE, expected_state(rows, partition=Shards(COUNT)))


# --------------------------------------------------------------------------- pieces


def test_merge_reports_sums_counters_and_spans_versions():
    a = RefreshReport(scanned=3, inserted=2, skipped_empty=1, embedded_rows=2, tokens=10,
                      padded_tokens=20, embed_seconds=1.0, seconds=2.0, version_before=4,
                      version_after=6, committed=True, table_name="docs", run_id="r",
                      partition_keys=["p0"], per_partition={"p0": {"scanned": 3}},
                      failures=[("1", "x")], model_loads=1)  # fmt: skip
    b = RefreshReport(scanned=2, unchanged=2, tokens=0, seconds=0.5, version_before=6,
                      version_after=6, table_name="docs", run_id="r", partition_keys=["p1"],
                      per_partition={"p1": {"scanned": 2}, "p0": {"deleted": 1}},
                      model_loads=1)  # fmt: skip
    merged = merge_reports([a, b])
    assert counters(merged) == {"scanned": 5, "inserted": 2, "unchanged": 2,
                                "skipped_empty": 1, "embedded": 2}  # fmt: skip
    assert (merged.version_before, merged.version_after, merged.committed) == (4, 6, True)
    assert merged.per_partition == {"p0": {"scanned": 3, "deleted": 1}, "p1": {"scanned": 2}}
    assert merged.partition_keys == ["p0", "p1"]
    assert merged.padding_efficiency == 0.5
    assert merged.tokens_per_second == 10.0
    assert merged.seconds == 2.5
    assert merged.model_loads == 1
    assert merged.failures == [("1", "x")]
    whole_table = RefreshReport(table_name="docs", partition_keys=None)
    assert merge_reports([a, whole_table]).partition_keys is None
    many = [RefreshReport(table_name="docs", failures=[(str(i), "x")] * 60) for i in range(3)]
    assert len(merge_reports(many).failures) == MAX_SHOWN_FAILURES
    with pytest.raises(ConfigError, match="at least one"):
        merge_reports([])
    with pytest.raises(ConfigError, match="different tables"):
        merge_reports([a, RefreshReport(table_name="other")])


def test_merge_reports_keeps_every_shards_warnings_once():
    a = RefreshReport(table_name="docs", warnings=["donor x unreadable", "canaries not recorded"])
    b = RefreshReport(table_name="docs", warnings=["donor x unreadable", "donor y unreadable"])
    merged = merge_reports([a, b, RefreshReport(table_name="docs")])
    assert merged.warnings == ["donor x unreadable", "canaries not recorded", "donor y unreadable"]
    assert merged.as_dict()["warnings"] == merged.warnings
    assert merge_reports([RefreshReport(table_name="docs")]).warnings == []


def test_arrow_ipc_source_rebatches_and_reports_key_problems(tmp_path):
    table = pa.table({"id": [1, 2, 2, None, 5], "body": list("abcde")})
    paths = []
    for i, part in enumerate((table.slice(0, 2), table.slice(2, 3))):
        paths.append(tmp_path / f"{i}.arrow")
        with pa.OSFile(str(paths[-1]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            for batch in part.to_batches(max_chunksize=1):
                w.write_batch(batch)
    source = ArrowIPCSource(paths, schema=table.schema, name="parquet:/orig")
    assert source.name == "parquet:/orig"
    assert [b.num_rows for b in source.batches(["id"], 2)] == [2, 2, 1]
    assert [b.column_names for b in source.batches(["body"], 10)] == [["body"]]
    assert source.key_problems("id", 10) == (1, [(2, 2)])
    empty = ArrowIPCSource([], schema=table.schema, name="x")
    assert list(empty.batches(["id"], 2)) == []
    assert empty.key_problems("id", 10) == (0, [])
    with pytest.raises(ConfigError, match="name"):
        ArrowIPCSource([], schema=table.schema, name="")


def test_a_run_over_many_shards_compacts_once_at_its_end(tmp_path, monkeypatch):
    from qwen3_pipeline.store import VectorStore

    calls: list[str] = []
    original = VectorStore.maybe_optimize

    def counting(self, **kwargs):
        calls.append(self.table_name)
        return original(self, **kwargs)

    monkeypatch.setattr(VectorStore, "maybe_optimize", counting)
    report = run(tmp_path / "db", ArrowSource(make_rows(range(ROWS))), sharded())
    assert report.inserted == ROWS
    assert calls == [TABLE], "compaction ran per shard, not once per run"
    calls.clear()
    run(tmp_path / "db", ArrowSource(make_rows(range(ROWS))), sharded())  # a no-op
    assert calls == []


def test_a_drift_stops_a_run_over_many_shards_before_any_shard_writes(tmp_path):
    from dataclasses import replace as replaced

    import numpy as np

    from qwen3_pipeline.core.errors import EmbeddingDriftError
    from qwen3_pipeline.sources import shard_of

    class Drifted(FakeEmbedder):
        """Other weights under the same name: every vector turned a little."""

        def embed_documents(self, texts, *, on_batch=None):
            result = super().embed_documents(texts, on_batch=on_batch)
            vectors = result.vectors + 0.3
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            return replaced(result, vectors=vectors.astype(np.float32))

    db = tmp_path / "db"
    rows = make_rows(range(ROWS))
    config = sharded(Shards(4))
    # The real drift guard: the canaries are recorded by the first fill.
    refresh(source=ArrowSource(rows), config=config, embedder=FakeEmbedder(spec()),
            db_uri=str(db), table=TABLE, progress=False)  # fmt: skip
    version = table_version(str(db), TABLE)
    keys = rows.column("id").to_pylist()
    gone = [k for k in keys if shard_of(k, 4) == 0][:5]  # deletes in the first shard applied
    edited = [k for k in keys if shard_of(k, 4) == 3][:3]  # edits only in the last one
    from tests.refresh_helpers import edit_body

    changed = drop_keys(edit_body(rows, edited), gone)
    with pytest.raises(EmbeddingDriftError):
        refresh(source=ArrowSource(changed), config=config, embedder=Drifted(spec()),
                db_uri=str(db), table=TABLE, progress=False)  # fmt: skip
    assert table_version(str(db), TABLE) == version, "a shard wrote before the drift check"
    assert table_rows(str(db), TABLE).num_rows == ROWS
