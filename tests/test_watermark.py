"""Watermark change capture: a refresh reads only rows whose updated_at passed the mark.

Real DuckDB, Parquet and LanceDB in tmp_path; the fake model. Every watermark result is
checked against what a plain (full) refresh makes of the same source.
"""

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.cli import main
from qwen3_pipeline.core.errors import ConfigError, MassDeleteError, StoreError
from qwen3_pipeline.engine import watermark as engine_watermark
from qwen3_pipeline.engine.refresh import plan_refresh, refresh
from qwen3_pipeline.engine.watermark import KeyScan, KeyScannedIndex, scan_keys
from qwen3_pipeline.sources import (
    ArrowSource,
    DuckDBSource,
    ParquetSource,
    Shard,
    Shards,
    SourceConfig,
    TimeWindow,
    Watermark,
)
from qwen3_pipeline.sources.watermark import RowFilter
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.store.connection import connect
from qwen3_pipeline.store.watermark_log import WatermarkLog, watermarks_table_name
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import (
    KillPoint,
    assert_table_matches,
    expected_state,
    make_rows,
    no_drift_guard,
    run_killed_child,
    spec,
    write_parquet,
)

CONFIG = SourceConfig(key="id", template="{title}\n\n{body}", carry=("title", "url"),
                      updated_at="updated_at", watermark=Watermark())  # fmt: skip
LATER = datetime(2030, 1, 1, tzinfo=UTC)


def run(db, source, config=CONFIG, **options):
    return refresh(source=source, config=config, embedder=FakeEmbedder(spec()), db_uri=str(db),
                   table="docs", progress=False, drift_guard=no_drift_guard, chunk_rows=64,
                   **options)  # fmt: skip


def plain(config=CONFIG):
    return replace(config, watermark=None)


def duck(path: Path, rows: pa.Table) -> DuckDBSource:
    con = duckdb.connect(str(path))
    con.register("rows", rows)
    con.execute("CREATE OR REPLACE TABLE docs AS SELECT * FROM rows")
    con.close()
    return DuckDBSource(path, "docs")


def change(rows: pa.Table) -> pa.Table:
    """5 edits, 3 inserts and 2 deletes, the edited and inserted rows stamped LATER."""
    out = []
    for r in rows.to_pylist():
        if r["id"] in (90, 91):
            continue
        if r["id"] < 5:
            r = {**r, "body": r["body"] + " edited", "updated_at": LATER}
        out.append(r)
    new = make_rows(range(1000, 1003)).to_pylist()
    out += [{**r, "updated_at": LATER} for r in new]
    return pa.Table.from_pylist(out, schema=rows.schema)


def test_only_changed_rows_are_read_and_the_result_equals_a_full_refresh(tmp_path):
    rows = make_rows(range(100))
    first = run(tmp_path / "db", duck(tmp_path / "a.duckdb", rows))
    assert (first.read_rows, first.inserted, first.watermark_before) == (100, 100, None)
    assert first.watermark_after == max(rows["updated_at"].to_pylist()).isoformat()

    noop = run(tmp_path / "db", duck(tmp_path / "a.duckdb", rows))
    assert (noop.read_rows, noop.committed, noop.keys_scanned) == (0, False, 100)

    changed = change(rows)
    report = run(tmp_path / "db", duck(tmp_path / "a.duckdb", changed))
    assert (report.read_rows, report.updated, report.inserted, report.deleted) == (8, 5, 3, 2)
    assert report.unchanged == 0
    assert report.watermark_after == LATER.isoformat()
    assert_table_matches(str(tmp_path / "db"), "docs", expected_state(changed))
    # A full refresh afterwards finds nothing missed.
    full = run(tmp_path / "db", duck(tmp_path / "a.duckdb", changed), plain())
    assert (full.committed, full.unchanged) == (False, 101)


def test_a_dry_run_shows_what_a_watermark_refresh_reads(tmp_path):
    rows = make_rows(range(50))
    run(tmp_path / "db", ArrowSource(rows))
    with plan_refresh(source=ArrowSource(change(rows)), config=CONFIG,
                      embedder=FakeEmbedder(spec()), db_uri=str(tmp_path / "db"), table="docs",
                      progress=False) as plan:  # fmt: skip
        shown = plan.as_dict()
    assert (shown["read_rows"], shown["keys_scanned"], shown["deleted"]) == (8, 53, 0)
    assert shown["watermark_before"] == max(rows["updated_at"].to_pylist()).isoformat()


def test_parquet_row_groups_before_the_mark_are_skipped(tmp_path):
    rows = make_rows(range(4000)).sort_by("updated_at")
    path = tmp_path / "s.parquet"
    pq.write_table(rows, path, row_group_size=500)
    source = ParquetSource(path)
    since = rows["updated_at"][3600].as_py()
    where = RowFilter(column="updated_at", since=since, key_column="id")
    read = sum(b.num_rows for b in source.batches_where(["id"], 1000, where))
    assert read == sum(1 for t in rows["updated_at"].to_pylist() if t > since)
    # The file's statistics let a reader prune: of 8 row groups, only the one holding the
    # mark and those after it can hold selected rows (DuckDB skips the others unread).
    fragment = next(iter(source._dataset.get_fragments()))
    kept = fragment.split_by_row_group(filter=ds.field("updated_at") > since)
    assert len(kept) <= 2


@pytest.mark.parametrize("naive", [False, True], ids=["aware", "naive"])
def test_a_hive_partitioned_parquet_directory_is_read_by_the_filter(tmp_path, naive):
    # Several files, a partition column in their paths, retry keys beside the mark, and
    # naive or aware timestamps: the rows come back with the dataset's own types.
    rows = make_rows(range(300))
    rows = rows.append_column("lang", pa.array(["en" if i % 3 else "fr" for i in range(300)]))
    if naive:
        column = rows.schema.get_field_index("updated_at")
        stamps = rows["updated_at"].cast(pa.timestamp("us", "UTC")).cast(pa.timestamp("us"))
        rows = rows.set_column(column, "updated_at", stamps)
    folder = tmp_path / "docs"
    pq.write_to_dataset(rows, folder, partition_cols=["lang"])
    source = ParquetSource(folder)
    since = sorted(rows["updated_at"].to_pylist())[250]
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    where = RowFilter(column="updated_at", since=since, key_column="id", keys=(3, 7))
    batches = list(source.batches_where(["id", "lang", "title"], 40, where))
    read = pa.Table.from_batches(batches)
    wanted = source.schema()
    assert read.schema.types == [wanted.field(c).type for c in ("id", "lang", "title")]
    assert all(b.num_rows == 40 for b in batches[:-1])
    later = {
        i for i, t in zip(rows["id"].to_pylist(), rows["updated_at"].to_pylist(), strict=True)
        if (t if t.tzinfo else t.replace(tzinfo=UTC)) > since
    }  # fmt: skip
    assert sorted(read["id"].to_pylist()) == sorted(later | {3, 7})
    langs = dict(zip(rows["id"].to_pylist(), rows["lang"].to_pylist(), strict=True))
    pairs = zip(read["id"].to_pylist(), read["lang"].to_pylist(), strict=True)
    assert all(langs[i] == lang for i, lang in pairs)


def test_key_scan_every_n_and_never(tmp_path):
    rows = make_rows(range(60))
    every2 = replace(CONFIG, watermark=Watermark(key_scan=2))
    run(tmp_path / "db", ArrowSource(rows), every2)
    fewer = rows.slice(0, 50)
    first = run(tmp_path / "db", ArrowSource(fewer), every2)
    assert (first.keys_scanned, first.deleted) == (0, 0)  # 1 refresh since the last scan
    second = run(tmp_path / "db", ArrowSource(fewer), every2)
    assert (second.keys_scanned, second.deleted) == (50, 10)
    never = replace(CONFIG, watermark=Watermark(key_scan="never"))
    run(tmp_path / "db2", ArrowSource(rows), never)
    assert run(tmp_path / "db2", ArrowSource(fewer), never).deleted == 0
    assert run(tmp_path / "db2", ArrowSource(fewer), plain()).deleted == 10  # reconciles


def test_late_commits_within_the_lag_are_read(tmp_path):
    rows = make_rows(range(30))
    lagged = replace(CONFIG, watermark=Watermark(lag_s=3600))
    run(tmp_path / "db", ArrowSource(rows), lagged)
    mark = max(rows["updated_at"].to_pylist())
    late = [
        {**r, "body": r["body"] + " late", "updated_at": mark - timedelta(minutes=30)}
        if r["id"] == 7 else r
        for r in rows.to_pylist()
    ]  # fmt: skip
    report = run(tmp_path / "db", ArrowSource(pa.Table.from_pylist(late, rows.schema)), lagged)
    assert report.updated == 1
    # Without a lag, the same late commit is missed until a full refresh.
    run(tmp_path / "db2", ArrowSource(rows))
    missed = run(tmp_path / "db2", ArrowSource(pa.Table.from_pylist(late, rows.schema)))
    assert missed.updated == 0
    caught = run(tmp_path / "db2", ArrowSource(pa.Table.from_pylist(late, rows.schema)), plain())
    assert caught.updated == 1


def test_null_and_backwards_updated_at(tmp_path):
    rows = make_rows(range(20)).to_pylist()
    rows[3]["updated_at"] = None
    table = pa.Table.from_pylist(rows, make_rows([]).schema)
    first = run(tmp_path / "db", ArrowSource(table))
    assert first.inserted == 20  # the first watermark refresh reads everything, nulls too
    rows[3]["body"] += " edited"  # a null-time row edited: not read by the watermark
    rows[4]["body"] += " edited"
    rows[4]["updated_at"] -= timedelta(days=30)  # moved backwards: not read either
    edited = pa.Table.from_pylist(rows, table.schema)
    quiet = run(tmp_path / "db", ArrowSource(edited))
    assert (quiet.read_rows, quiet.updated, quiet.deleted) == (0, 0, 0)  # the key scan keeps 3
    assert run(tmp_path / "db", ArrowSource(edited), plain()).updated == 2


def test_failed_rows_are_read_again_when_due_whatever_their_time(tmp_path):
    rows = make_rows(range(20))
    text = "Title 5\n\n" + rows["body"][5].as_py()
    poison = FakeEmbedder(spec(), fail_texts=[text])
    db = str(tmp_path / "db")
    refresh(source=ArrowSource(rows), config=CONFIG, embedder=poison, db_uri=db, table="docs",
            progress=False, drift_guard=no_drift_guard, retry_backoff_s=0)  # fmt: skip
    retry = run(tmp_path / "db", ArrowSource(rows), retry_backoff_s=0)
    assert (retry.read_rows, retry.retried, retry.inserted) == (1, 1, 1)


def test_each_scope_keeps_its_own_mark(tmp_path):
    rows = make_rows(range(80))
    for shard in (Shard(0, 2), Shard(1, 2)):
        run(tmp_path / "db", ArrowSource(rows), replace(CONFIG, partition=shard))
    log = WatermarkLog.open(str(tmp_path / "db"), "docs")
    assert log.read("shard-00-of-02") is not None
    assert log.read("shard-01-of-02") is not None
    both = run(tmp_path / "db", ArrowSource(rows), replace(CONFIG, partition=Shards(2)))
    assert both.read_rows == 80  # a new scope: read once, then by its own mark
    assert (
        run(tmp_path / "db", ArrowSource(rows), replace(CONFIG, partition=Shards(2))).read_rows == 0
    )


def test_a_key_scan_of_an_empty_source_is_refused_as_a_mass_delete(tmp_path):
    rows = make_rows(range(30))
    run(tmp_path / "db", ArrowSource(rows))
    with pytest.raises(MassDeleteError):
        run(tmp_path / "db", ArrowSource(rows.slice(0, 0)))


def test_bad_watermark_settings(tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs updated_at"):
        SourceConfig(key="id", text_columns=("body",), watermark=Watermark())
    window = TimeWindow(column="u", start=datetime(2024, 1, 1), end=datetime(2024, 1, 2))
    with pytest.raises(ConfigError, match="time-window"):
        SourceConfig(key="id", text_columns=("body",), updated_at="u", watermark=Watermark(),
                     partition=window)  # fmt: skip
    with pytest.raises(ConfigError, match="key_scan"):
        Watermark(key_scan="sometimes")
    with pytest.raises(ConfigError, match="lag"):
        Watermark(lag_s=-1)
    source = write_parquet(make_rows(range(3)), tmp_path / "s.parquet")
    base = ["refresh", "--source", source, "--key", "id", "--text", "body", "--db",
            str(tmp_path / "db"), "--table", "docs", "--model", "m", "--dim", "32"]  # fmt: skip
    assert main([*base, "--watermark-lag", "5"]) == 2
    assert "--watermark-lag need(s) --watermark" in capsys.readouterr().err
    assert main([*base, "--watermark"]) == 2
    assert "needs updated_at" in capsys.readouterr().err


# ------------------------------------------------------------------------- the key scan


def test_a_key_scan_reads_the_stored_state_of_changed_and_gone_keys_only(tmp_path, monkeypatch):
    rows = make_rows(range(200))
    run(tmp_path / "db", ArrowSource(rows))
    asked = []
    original = VectorStore.existing_state

    def spy(self, partition_keys=None, *, keys=None, **kwargs):
        asked.append(None if keys is None else sorted(pa.array(keys).to_pylist()))
        return original(self, partition_keys, keys=keys, **kwargs)

    monkeypatch.setattr(VectorStore, "existing_state", spy)
    changed = change(rows)
    report = run(tmp_path / "db", ArrowSource(changed))
    # The 5 edited and 3 new keys (read by the mark), the 2 deleted ones (found by the scan).
    assert asked == [[0, 1, 2, 3, 4, 90, 91, 1000, 1001, 1002]]
    assert (report.keys_scanned, report.updated, report.inserted, report.deleted) == (201, 5, 3, 2)
    assert report.as_dict()["unchanged"] == 0
    assert_table_matches(str(tmp_path / "db"), "docs", expected_state(changed))


@pytest.mark.parametrize("keys", ["text", "sparse"])
def test_the_key_scan_finds_deletes_among_text_and_sparse_integer_keys(keys, tmp_path):
    rows = make_rows(range(120))
    if keys == "text":
        ids = pa.array([f"doc-{i:04d}" for i in range(120)])
    else:
        ids = pa.array([i * 10**12 for i in range(120)], pa.int64())  # no direct table
    rows = rows.set_column(0, pa.field("id", ids.type, nullable=False), ids)
    run(tmp_path / "db", ArrowSource(rows))
    fewer = rows.filter(pa.array([i not in (7, 64, 119) for i in range(120)]))
    report = run(tmp_path / "db", ArrowSource(fewer))
    assert (report.read_rows, report.keys_scanned, report.deleted) == (0, 117, 3)
    assert run(tmp_path / "db", ArrowSource(fewer), plain()).committed is False


def test_each_shard_scans_and_deletes_only_its_own_keys(tmp_path):
    rows = make_rows(range(100))
    shards = [replace(CONFIG, partition=Shard(i, 2)) for i in range(2)]
    for config in shards:
        run(tmp_path / "db", ArrowSource(rows), config)  # each shard's mark
    fewer = rows.filter(pa.array([i % 10 != 3 for i in range(100)]))
    shard, rest = (run(tmp_path / "db", ArrowSource(fewer), config) for config in shards)
    assert shard.read_rows == rest.read_rows == 0
    where = expected_state(rows, partition=Shards(2))
    first = [k for k in range(3, 100, 10) if where[k]["partition_key"] == "shard-00-of-02"]
    assert 0 < len(first) < 10
    assert (shard.deleted, rest.deleted) == (len(first), 10 - len(first))
    assert shard.keys_scanned == rest.keys_scanned == 90  # a key scan reads the whole source
    expected = expected_state(fewer, partition=Shards(2))
    assert_table_matches(str(tmp_path / "db"), "docs", expected)


def test_a_gone_key_written_again_while_the_plan_reads_is_not_deleted():
    state = pa.table(
        {
            "key": pa.array([1, 2, 3], pa.int64()),
            "content_hash": ["a", "b", "c"],
            "spec_fingerprint": ["f"] * 3,
            "partition_key": [""] * 3,
        }
    )
    # The scan before the stored state was read found 2 and 3 gone; 3 is back since.
    index = KeyScannedIndex(state, KeyScan(gone=pa.array([2, 3]), keys_scanned=1, stored=3))
    seen, scanned = scan_keys(index, ArrowSource(pa.table({"id": [1, 3]})), CONFIG, 10)
    assert (seen.tolist(), scanned) == ([True, False, True], 1)


def test_stored_keys_are_matched_exactly_even_when_their_codes_collide(monkeypatch):
    stored = pa.array(["a", "b", "c"])
    monkeypatch.setattr(engine_watermark, "_key_codes", lambda keys, integer: np.zeros(len(keys)))
    marks = engine_watermark._KeyMarks(stored)  # every code alike: an exact index instead
    marks.mark(pa.array(["c", None, "z"]))
    assert marks.unseen().to_pylist() == ["a", "b"]


def test_a_text_key_whose_hash_matches_another_is_not_taken_for_it(monkeypatch):
    real = engine_watermark._key_codes
    marks = engine_watermark._KeyMarks(pa.array(["a", "b"]))

    # "z" hashes like "a" from now on: the match is checked against the key itself.
    def alias(keys, integer):
        return real(pa.array(["a" if k == "z" else k for k in keys.to_pylist()]), integer)

    monkeypatch.setattr(engine_watermark, "_key_codes", alias)
    marks.mark(pa.array(["z", "b"]))
    assert marks.unseen().to_pylist() == ["a"]


def test_integer_keys_outside_the_stored_range_do_not_wrap_into_it():
    marks = engine_watermark._KeyMarks(pa.array([5, 6, 7], pa.int64()))
    marks.mark(pa.array([-(2**63), 2**63 - 1, 4, 8, 6], pa.int64()))
    assert marks.unseen().to_pylist() == [5, 7]


@pytest.mark.parametrize("keys", [[1, 2, 2], [1, 10**15, 10**15]])
def test_duplicate_stored_keys_are_refused(keys):
    with pytest.raises(StoreError, match="duplicate keys"):
        engine_watermark._KeyMarks(pa.array(keys, pa.int64()))


def test_a_no_op_commits_nothing_unless_it_counts_refreshes_to_a_key_scan(tmp_path):
    rows = make_rows(range(40))

    def marks_version(db):
        return connect(str(db), None).open_table(watermarks_table_name("docs")).version

    never = replace(CONFIG, watermark=Watermark(key_scan="never"))
    run(tmp_path / "db", ArrowSource(rows), never)
    before = marks_version(tmp_path / "db")
    for config in (never, CONFIG):  # key_scan "never", then "every"
        noop = run(tmp_path / "db", ArrowSource(rows), config)
        assert (noop.committed, marks_version(tmp_path / "db")) == (False, before)
    # Every 3rd refresh scans keys: the count of refreshes since the last scan is stored.
    every3 = replace(CONFIG, watermark=Watermark(key_scan=3))
    run(tmp_path / "db", ArrowSource(rows), every3)
    assert marks_version(tmp_path / "db") == before + 1


# ------------------------------------------------------------------------- killed refreshes

KILLS = [KillPoint("embed", 1), KillPoint("after", 1, "upsert"), KillPoint("before", 1, "delete"),
         KillPoint("after", 1, "delete")]  # fmt: skip


@pytest.mark.parametrize("kill", KILLS, ids=str)
def test_a_killed_watermark_refresh_converges(kill, tmp_path):
    rows = make_rows(range(300))
    db = str(tmp_path / "db")
    run(db, ArrowSource(rows))
    target = change(rows)
    path = write_parquet(target, tmp_path / "target.parquet")
    child = {"db_uri": db, "table": "docs", "source_path": path, "chunk_rows": 4, "config": CONFIG}
    run_killed_child(kill, tmp_path, **child)
    rerun = run(db, ParquetSource(path))
    assert rerun.read_rows >= 8  # the old mark: the changed rows are read again
    assert_table_matches(db, "docs", expected_state(target))
    assert not run(db, ParquetSource(path), plain()).committed


def test_a_rollback_forgets_the_marks_so_the_next_refresh_reads_everything(tmp_path, capsys):
    rows = make_rows(range(40))
    db = tmp_path / "db"
    run(db, ArrowSource(rows))
    version = lancedb.connect(str(db)).open_table("docs").version
    changed = change(rows)
    run(db, ArrowSource(changed))
    assert main(["rollback", "--db", str(db), "--table", "docs", "--to", str(version)]) == 0
    assert '"watermarks_forgotten": true' in capsys.readouterr().out
    # The restored rows predate the mark: only a full read brings the table back in line.
    again = run(db, ArrowSource(changed))
    assert again.read_rows == changed.num_rows
    assert_table_matches(str(db), "docs", expected_state(changed))
