"""The refresh engine against a real LanceDB in tmp_path: counts, exact table state, bad input.

Most tests use FakeEmbedder (vectors are ``fake_vector(text, dim)``, so the expected table is
computed independently); a few use the tiny real Qwen3 checkpoint.
"""

from datetime import UTC, date, datetime, timedelta

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from qwen3_pipeline.core.errors import (
    ConfigError,
    InputDataError,
    MassDeleteError,
    SpecMismatchError,
)
from qwen3_pipeline.core.schema import rebuild_table_name
from qwen3_pipeline.engine.refresh import RefreshReport, refresh
from qwen3_pipeline.sources import (
    ArrowSource,
    DuckDBSource,
    ParquetSource,
    Shard,
    Shards,
    SourceConfig,
    TimeWindow,
)
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.refresh_helpers import (
    CONFIG,
    DIM,
    assert_table_matches,
    drop_keys,
    edit_body,
    edit_url,
    expected_state,
    make_rows,
    mutate,
    no_drift_guard,
    render_body,
    replace_rows,
    shard_label_of,
    spec,
    table_rows,
    table_version,
)

TABLE = "docs"


def run(db, source, *, config=CONFIG, embedder=None, chunk_rows=64, **kwargs) -> RefreshReport:
    if isinstance(source, pa.Table):
        source = ArrowSource(source)
    return refresh(
        source=source,
        config=config,
        embedder=embedder or FakeEmbedder(spec()),
        db_uri=str(db),
        table=kwargs.pop("table", TABLE),
        chunk_rows=chunk_rows,
        progress=False,
        **kwargs,
    )


def counts(report: RefreshReport) -> dict[str, int]:
    names = ("scanned", "unchanged", "inserted", "updated", "moved", "carry_updated", "deleted")
    names += ("skipped_empty", "truncated", "failed", "embedded_rows")
    return {n: getattr(report, n) for n in names if getattr(report, n)}


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "lancedb")


# ---------------------------------------------------------------- the incremental contract


def test_initial_refresh_then_noop_embeds_nothing_and_makes_no_commit(db):
    source = make_rows(range(300))
    first = run(db, source)
    assert counts(first) == {"scanned": 300, "inserted": 300, "embedded_rows": 300}
    assert first.committed
    assert first.version_before == 0  # the table did not exist
    assert first.version_after == table_version(db, TABLE)
    assert first.table_name == TABLE
    assert first.table_uri == db
    assert first.spec_fingerprint == spec().fingerprint
    assert first.partition_keys is None
    assert first.per_partition == {"": {"scanned": 300, "inserted": 300, "embedded": 300}}
    assert first.tokens == first.padded_tokens > 0
    assert len(first.run_id) == 32
    assert_table_matches(db, TABLE, expected_state(source))
    stored = table_rows(db, TABLE)
    assert set(stored.column("run_id").to_pylist()) == {first.run_id}
    assert set(stored.column("source").to_pylist()) == {"arrow"}

    embedder = FakeEmbedder(spec())
    second = run(db, source, embedder=embedder)
    assert counts(second) == {"scanned": 300, "unchanged": 300}
    assert embedder.calls == []
    assert not second.committed
    assert second.version_before == second.version_after == first.version_after
    assert table_version(db, TABLE) == first.version_after


def test_edits_inserts_deletes_and_carry_only_edits_give_exact_counts_and_state(db):
    source = make_rows(range(400))
    run(db, source)
    changes = mutate(source, seed=7)
    embedder = FakeEmbedder(spec())
    report = run(db, changes.table, embedder=embedder, run_id="run-2", source_name="docs-src",
                 drift_guard=no_drift_guard)  # it counts the embedder's calls  # fmt: skip
    n_edit, n_ins = len(changes.edited), len(changes.inserted)
    n_del, n_carry = len(changes.deleted), len(changes.carry_only)
    assert min(n_edit, n_ins, n_del, n_carry) > 0
    assert counts(report) == {
        "scanned": changes.table.num_rows,
        "unchanged": 400 - n_edit - n_del - n_carry,
        "inserted": n_ins,
        "updated": n_edit,
        "carry_updated": n_carry,
        "deleted": n_del,
        "embedded_rows": n_edit + n_ins,
    }
    assert sum(embedder.calls) == n_edit + n_ins
    assert_table_matches(db, TABLE, expected_state(changes.table))
    stored = table_rows(db, TABLE).to_pylist()
    rewritten = {r["key"] for r in stored if r["run_id"] == "run-2"}
    # Only the rows that changed were written (carry-only rows keep their embedding lineage).
    assert rewritten == set(changes.edited) | set(changes.inserted)
    assert {r["source"] for r in stored if r["run_id"] == "run-2"} == {"docs-src"}
    # Converged: nothing more to do.
    again = run(db, changes.table)
    assert not again.committed
    assert again.unchanged == changes.table.num_rows


def test_title_change_reembeds_and_updates_carry(db):
    source = make_rows(range(20))
    run(db, source)
    edited = source.to_pylist()
    edited[3]["title"] = "A brand new title"
    edited = pa.Table.from_pylist(edited, schema=source.schema)
    report = run(db, edited)
    assert counts(report) == {"scanned": 20, "unchanged": 19, "updated": 1, "embedded_rows": 1}
    assert_table_matches(db, TABLE, expected_state(edited))


def test_delete_everything_and_empty_source(db):
    source = make_rows(range(50))
    run(db, source)
    version = table_version(db, TABLE)
    # An empty source over a non-empty table is refused unless asked for, whatever the share.
    with pytest.raises(MassDeleteError, match=r"no rows in scope .* holds 50 row"):
        run(db, source.slice(0, 0), max_delete_share=1.0)
    assert table_version(db, TABLE) == version
    assert table_rows(db, TABLE).num_rows == 50
    report = run(db, source.slice(0, 0), allow_mass_delete=True)
    assert counts(report) == {"deleted": 50}
    assert table_rows(db, TABLE).num_rows == 0
    noop = run(db, source.slice(0, 0))  # nothing stored: nothing to guard
    assert not noop.committed


def test_empty_source_on_a_new_table_creates_it_empty(db):
    report = run(db, make_rows([]))
    assert report.scanned == 0
    assert table_rows(db, TABLE).num_rows == 0


def test_string_keys_with_quotes_are_refreshed_and_deleted(db):
    keys = ["a", "it's", 'say "hi"', "back\\slash", "x' OR '1'='1", "ünï", "k-7"]
    source = pa.table({"id": keys, "body": [f"text of {k}" for k in keys]})
    config = SourceConfig(key="id", text_columns=("body",))
    first = run(db, source, config=config)
    assert first.inserted == len(keys)
    smaller = source.filter(pa.array([k not in ("it's", "x' OR '1'='1") for k in keys]))
    report = run(db, smaller, config=config)
    assert counts(report) == {"scanned": 5, "unchanged": 5, "deleted": 2}
    want = {
        r["id"]: {"content_hash": xxhash.xxh3_128_hexdigest(r["body"].encode())}
        for r in smaller.to_pylist()
    }
    assert_table_matches(db, TABLE, want, vectors=False)


def test_failed_rows_keep_their_old_vector_and_are_retried_next_time(db):
    source = make_rows(range(30))
    run(db, source)
    edited = edit_body(source, [5])
    new_text = expected_state(edited)[5]["text"]
    inserted = pa.concat_tables([edited, make_rows([99])])
    new_row_text = expected_state(inserted)[99]["text"]
    embedder = FakeEmbedder(spec(), fail_texts=[new_text, new_row_text])
    report = run(db, inserted, embedder=embedder)
    assert report.failed == 2
    assert report.updated == report.inserted == 0
    assert sorted(k for k, _ in report.failures) == ["5", "99"]
    # The old vector of 5 is kept; 99 is not written.
    assert_table_matches(db, TABLE, expected_state(source))
    # Not due yet (the default backoff is 300 s): left out, old vector kept.
    waiting = run(db, inserted)
    assert (waiting.deferred, waiting.updated, waiting.inserted, waiting.failed) == (2, 0, 0, 0)
    retry = run(db, inserted, retry_backoff_s=0)
    assert (retry.retried, retry.updated, retry.inserted, retry.failed) == (2, 1, 1, 0)
    assert_table_matches(db, TABLE, expected_state(inserted))


def test_chunks_bound_embed_calls_and_commits(db):
    source = make_rows(range(1000))
    embedder = FakeEmbedder(spec())
    report = run(db, source, embedder=embedder, chunk_rows=100, drift_guard=no_drift_guard)
    assert embedder.calls == [100] * 10
    assert report.version_before == 0  # a new table
    # One commit per chunk, after the three that create the table (create, key, index).
    assert report.version_after == 3 + 10

    # Sparse changes are gathered across source batches: one embed call and one commit.
    changed = edit_body(source, [5, 6, 950])
    embedder = FakeEmbedder(spec())
    report = run(db, changed, embedder=embedder, chunk_rows=100, drift_guard=no_drift_guard)
    assert embedder.calls == [3]
    assert report.version_after - report.version_before == 1

    # 250 edits spread over all ten batches: chunks of at most 100 rows, three commits; the
    # carry-only edits of 150 rows likewise make two update commits.
    edits = list(range(0, 1000, 4))
    carry = list(range(1, 1000, 4))[:150]
    changed = edit_url(edit_body(changed, edits, version=2), carry)
    embedder = FakeEmbedder(spec())
    report = run(db, changed, embedder=embedder, chunk_rows=100, drift_guard=no_drift_guard)
    assert embedder.calls == [100, 100, 50]
    assert (report.updated, report.carry_updated) == (250, 150)
    assert report.version_after - report.version_before == 5
    assert_table_matches(db, TABLE, expected_state(changed))


def _arrow_peak_while_embedding(db, tmp_path, rows: int) -> tuple[int, int]:
    table = make_rows(range(rows))
    bodies = [(b + " ") * 10 for b in table.column("body").to_pylist()]
    table = table.set_column(2, "body", pa.array(bodies))
    path = tmp_path / f"rows-{rows}.parquet"
    # Parquet readers hold one row group's compressed column chunks: keep those fixed, so
    # only the number of rows (and row groups) grows.
    pq.write_table(table, path, row_group_size=2_500)
    source_bytes = table.nbytes
    del table, bodies
    baseline = pa.total_allocated_bytes()
    peaks: list[int] = []

    class Probe(FakeEmbedder):
        def embed_documents(self, texts):
            peaks.append(pa.total_allocated_bytes() - baseline)
            assert len(texts) <= 500
            return super().embed_documents(texts)

    # reproject=False: the tables of both sizes share a database and a spec, and the second
    # would otherwise copy the first one's vectors instead of embedding.
    # no_drift_guard: the probe counts the embed calls the chunks make.
    report = run(db, ParquetSource(path), embedder=Probe(spec()), chunk_rows=500,
                 table=f"t{rows}", reproject=False, drift_guard=no_drift_guard)  # fmt: skip
    assert report.inserted == rows
    assert len(peaks) == rows // 500
    return max(peaks), source_bytes


def test_streaming_memory_is_bounded_by_the_chunk_not_the_source(db, tmp_path):
    small, small_bytes = _arrow_peak_while_embedding(db, tmp_path, 5_000)
    large, large_bytes = _arrow_peak_while_embedding(db, tmp_path, 40_000)
    assert large_bytes > 7 * small_bytes
    # Arrow memory in use while embedding does not grow with the source.
    assert large < 1.25 * small + (1 << 20), (small, large, large_bytes)
    assert large < large_bytes / 5, (large, large_bytes)


# ---------------------------------------------------------------- partitions


def test_hash_shards_refresh_one_at_a_time_and_never_touch_other_shards(db):
    source = make_rows(range(400))
    for i in range(4):
        report = run(db, source, config=_sharded(Shard(i, 4)))
        label = f"shard-{i:02d}-of-04"
        assert report.partition_keys == [label]
        assert set(report.per_partition) == {label}
    assert_table_matches(db, TABLE, expected_state(source, partition=Shards(4)))
    labels = table_rows(db, TABLE).column("partition_key").to_pylist()
    assert sorted(set(labels)) == [f"shard-0{i}-of-04" for i in range(4)]

    # A source holding only shard 0 (e.g. a per-partition query): refreshing shard 0 must
    # not delete the other shards' rows.
    shard0 = source.filter(
        pa.array([shard_label_of(k, 4) == "shard-00-of-04" for k in source["id"].to_pylist()])
    )
    report = run(db, shard0, config=_sharded(Shard(0, 4)))
    assert not report.committed
    assert report.deleted == 0
    assert table_rows(db, TABLE).num_rows == 400

    # Rows deleted in shards 1 and 2: a refresh of shard 1 deletes only shard 1's.
    gone = [k for k in range(400) if shard_label_of(k, 4) in ("shard-01-of-04", "shard-02-of-04")]
    gone = gone[::7]
    smaller = drop_keys(source, gone)
    report = run(db, smaller, config=_sharded(Shard(1, 4)))
    gone1 = [k for k in gone if shard_label_of(k, 4) == "shard-01-of-04"]
    assert report.deleted == len(gone1) > 0
    assert table_rows(db, TABLE).num_rows == 400 - len(gone1)
    report = run(db, smaller, config=_sharded(Shards(4, (2, 3))))
    assert report.deleted == len(gone) - len(gone1) > 0
    assert_table_matches(db, TABLE, expected_state(smaller, partition=Shards(4)))


def test_shard_edits_in_one_shard_only_touch_that_shard(db):
    source = make_rows(range(300))
    run(db, source, config=_sharded(Shards(3)))
    changes = mutate(source, seed=3)
    for i in range(3):
        report = run(db, changes.table, config=_sharded(Shard(i, 3)))
        label = f"shard-0{i}-of-03"
        mine = lambda keys, label=label: [k for k in keys if shard_label_of(k, 3) == label]  # noqa: E731
        assert report.updated == len(mine(changes.edited))
        assert report.inserted == len(mine(changes.inserted))
        assert report.deleted == len(mine(changes.deleted))
        assert report.carry_updated == len(mine(changes.carry_only))
    assert_table_matches(db, TABLE, expected_state(changes.table, partition=Shards(3)))


def test_changing_the_shard_count_moves_rows_without_reembedding(db):
    source = make_rows(range(200))
    run(db, source, config=_sharded(Shards(4)))
    embedder = FakeEmbedder(spec())
    report = run(db, source, config=_sharded(Shards(8)), embedder=embedder)
    moved = sum(shard_label_of(k, 4) != shard_label_of(k, 8) for k in range(200))
    assert moved == 200  # every label changes ("-of-04" -> "-of-08")
    assert counts(report) == {"scanned": 200, "moved": 200}
    assert embedder.calls == []
    assert_table_matches(db, TABLE, expected_state(source, partition=Shards(8)))
    # And back to unpartitioned.
    report = run(db, source, config=CONFIG)
    assert report.moved == 200
    assert_table_matches(db, TABLE, expected_state(source))


def _sharded(partition):
    return SourceConfig(
        key="id", template=CONFIG.template, carry=CONFIG.carry, updated_at="updated_at",
        partition=partition,
    )  # fmt: skip


def _window(start: date, end: date) -> SourceConfig:
    return _sharded(TimeWindow(column="updated_at", start=start, end=end, grain="day"))


DAY1, DAY2, DAY3, DAY4 = (date(2024, 5, d) for d in (1, 2, 3, 4))


def test_time_window_partitions_moves_and_deletes(db):
    source = make_rows(range(144))  # updated_at spread over 2024-05-01..03
    whole = _window(DAY1, DAY4)
    first = run(db, source, config=whole)
    assert first.partition_keys == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert {k: v["inserted"] for k, v in first.per_partition.items()} == {
        "2024-05-01": 48, "2024-05-02": 48, "2024-05-03": 48,
    }  # fmt: skip
    assert_table_matches(db, TABLE, expected_state(source, partition=whole.partition))

    rows = {r["id"]: r for r in source.to_pylist()}
    # 1 (day 1) moves to day 3 unchanged; 30 (day 2) moves to day 3 and changes; 2 (day 1)
    # leaves the source; 3 (day 1) gets a new url only.
    moved = dict(rows[1], updated_at=rows[1]["updated_at"] + timedelta(days=2))
    changed = dict(rows[30], updated_at=rows[30]["updated_at"] + timedelta(days=1), body="new")
    carry = dict(rows[3], url="https://example.org/moved/3")
    edited = replace_rows(source, pa.Table.from_pylist([moved, changed, carry], source.schema))
    edited = drop_keys(edited, [2])

    day3 = run(db, edited, config=_window(DAY3, DAY4))
    assert day3.partition_keys == ["2024-05-03"]
    assert counts(day3) == {"scanned": 50, "unchanged": 48, "moved": 1, "updated": 1,
                            "embedded_rows": 1}  # fmt: skip
    assert day3.per_partition["2024-05-03"]["moved"] == 1
    # Day 1 no longer holds 1 (moved, still in the source: kept) nor 2 (gone: deleted).
    day1 = run(db, edited, config=_window(DAY1, DAY2))
    assert counts(day1) == {"scanned": 46, "unchanged": 45, "carry_updated": 1, "deleted": 1}
    # Day 2 lost 30 to day 3: nothing to do.
    day2 = run(db, edited, config=_window(DAY2, DAY3))
    assert counts(day2) == {"scanned": 47, "unchanged": 47}
    assert not day2.committed
    assert_table_matches(db, TABLE, expected_state(edited, partition=whole.partition))


def test_row_moved_out_of_a_window_before_its_new_window_is_refreshed_is_kept(db):
    source = make_rows(range(72))
    run(db, source, config=_window(DAY1, DAY4))
    rows = {r["id"]: r for r in source.to_pylist()}
    moved = dict(rows[5], updated_at=rows[5]["updated_at"] + timedelta(days=1))
    edited = replace_rows(source, pa.Table.from_pylist([moved], source.schema))
    report = run(db, edited, config=_window(DAY1, DAY2))
    assert report.deleted == 0
    stored = {r["key"]: r for r in table_rows(db, TABLE).to_pylist()}
    assert stored[5]["partition_key"] == "2024-05-01"  # until day 2 is refreshed
    report = run(db, edited, config=_window(DAY2, DAY3))
    assert report.moved == 1
    assert_table_matches(db, TABLE, expected_state(edited, partition=_window(DAY1, DAY4).partition))


# ---------------------------------------------------------------- spec changes


def test_spec_change_is_refused_and_rebuild_reembeds_and_swaps(db):
    source = make_rows(range(120))
    run(db, source)
    version = table_version(db, TABLE)
    new_spec = spec(64)
    with pytest.raises(SpecMismatchError, match="rebuild"):
        run(db, source, embedder=FakeEmbedder(new_spec))
    assert table_version(db, TABLE) == version

    with pytest.raises(ConfigError, match="rebuild needs the whole source"):
        run(db, source, embedder=FakeEmbedder(new_spec), config=_sharded(Shard(0, 2)),
            rebuild=True)  # fmt: skip
    assert table_version(db, TABLE) == version

    changes = mutate(source, seed=11)
    embedder = FakeEmbedder(new_spec)
    report = run(db, changes.table, embedder=embedder, rebuild=True, drift_guard=no_drift_guard)
    # Versions of the live table: before the rebuild, and the swap commit after it.
    assert report.version_before == version
    assert report.version_after == table_version(db, TABLE) > version
    assert report.inserted == report.embedded_rows == changes.table.num_rows
    assert sum(embedder.calls) == changes.table.num_rows
    assert report.spec_fingerprint == new_spec.fingerprint
    assert report.table_name == TABLE
    assert report.committed
    assert_table_matches(db, TABLE, expected_state(changes.table, dim=64), embedding_spec=new_spec)
    import lancedb

    names = lancedb.connect(db).list_tables().tables
    assert rebuild_table_name(TABLE, new_spec) not in names
    # The table now follows the new spec: the old one is refused, the new one is a no-op.
    with pytest.raises(SpecMismatchError):
        run(db, changes.table)
    again = run(db, changes.table, embedder=FakeEmbedder(new_spec))
    assert not again.committed


def test_query_task_change_needs_no_rebuild(db):
    source = make_rows(range(10))
    run(db, source)
    other = FakeEmbedder(spec(query_task="Find code that does this"))
    assert not run(db, source, embedder=other).committed


# ---------------------------------------------------------------- bad input


def _bad_sources():
    good = make_rows(range(10)).to_pylist()
    null_key = [dict(r) for r in good]
    null_key[4]["id"] = None
    dupes = [dict(r) for r in good]
    dupes[7]["id"] = 3
    dupes[8]["id"] = 3
    string_keys = [dict(r, id=f"k{r['id']}") for r in good]
    return {
        "null key": (pa.Table.from_pylist(null_key), CONFIG, r"1 row\(s\) have a null key"),
        "duplicate key": (pa.Table.from_pylist(dupes), CONFIG, r"duplicate keys: 3 \(3 rows\)"),
        "missing column": (
            pa.Table.from_pylist(good).drop_columns(["url"]),
            CONFIG,
            r"column\(s\) \['url'\] not found",
        ),
        "missing key column": (
            pa.Table.from_pylist(good),
            SourceConfig(key="doc_id", text_columns=("body",)),
            r"\['doc_id'\] not found",
        ),
        "key type change": (
            pa.Table.from_pylist(string_keys),
            CONFIG,
            "the source key is string but table 'docs' stores int64 keys",
        ),
    }


@pytest.mark.parametrize("table_exists", [True, False], ids=["existing-table", "new-table"])
@pytest.mark.parametrize("case", list(_bad_sources()))
def test_bad_input_raises_a_typed_error_and_writes_nothing(db, case, table_exists):
    source, config, message = _bad_sources()[case]
    if table_exists:
        run(db, make_rows(range(10)))
    version = table_version(db, TABLE)
    embedder = FakeEmbedder(spec())
    if case == "key type change" and not table_exists:
        # A new table simply takes string keys.
        assert run(db, source, embedder=embedder).inserted == 10
        return
    with pytest.raises(InputDataError, match=message):
        run(db, source, config=config, embedder=embedder)
    assert embedder.calls == []
    assert table_version(db, TABLE) == version  # None: the table was not even created


def test_duplicate_keys_across_shards_are_refused_before_any_write(db):
    # The whole source is checked, not just the scope: a duplicate in another shard too.
    rows = make_rows(range(40)).to_pylist()
    rows.append(dict(rows[0]))
    source = pa.Table.from_pylist(rows)
    other = next(i for i in range(4) if f"-0{i}-" not in shard_label_of(0, 4))
    with pytest.raises(InputDataError, match=r"duplicate keys: 0 \(2 rows\)"):
        run(db, source, config=_sharded(Shard(other, 4)))
    assert table_version(db, TABLE) is None


def test_bad_chunk_size_is_refused(db):
    with pytest.raises(ConfigError, match="chunk_rows"):
        run(db, make_rows(range(3)), chunk_rows=0)
    assert table_version(db, TABLE) is None


BODY_ONLY = SourceConfig(key="id", text_columns=("body",), carry=("title",))


def test_blank_text_is_skipped_counted_and_its_old_vector_removed(db):
    rows = make_rows(range(10)).to_pylist()
    rows[2]["body"] = ""
    rows[4]["body"] = "  \n\t "
    rows[6]["body"] = None
    source = pa.Table.from_pylist(rows)
    first = run(db, source, config=BODY_ONLY)
    assert counts(first) == {"scanned": 10, "skipped_empty": 3, "inserted": 7, "embedded_rows": 7}
    assert first.per_partition[""]["skipped_empty"] == 3
    want = expected_state(source, render=render_body, carry=("title",), updated_at=None)
    assert sorted(want) == [0, 1, 3, 5, 7, 8, 9]
    assert_table_matches(db, TABLE, want)

    rows[8]["body"] = "\u3000 \n"  # ideographic space: still blank
    blanked = pa.Table.from_pylist(rows)
    second = run(db, blanked, config=BODY_ONLY)
    assert counts(second) == {"scanned": 10, "skipped_empty": 4, "unchanged": 6, "deleted": 1}
    want = expected_state(blanked, render=render_body, carry=("title",), updated_at=None)
    assert_table_matches(db, TABLE, want)
    third = run(db, blanked, config=BODY_ONLY)
    assert not third.committed
    assert third.skipped_empty == 4


def test_nul_bytes_and_lone_surrogates_are_sanitised_deterministically(db, tmp_path):
    bodies = ["a\x00b", "x\ud800y", "pair \ud83d\ude00 joined", "\x00", "plain"]
    frame = pd.DataFrame(
        {"id": range(5), "body": pd.Series(bodies, dtype=object), "title": ["t"] * 5}
    )
    config = SourceConfig(key="id", text_columns=("body",), carry=("title",))
    report = run(db, ArrowSource(frame), config=config)
    assert (report.inserted, report.skipped_empty) == (4, 1)  # "\x00" alone is blank
    clean = {0: "ab", 1: "x\ufffdy", 2: "pair \U0001f600 joined", 4: "plain"}
    want = {
        k: {
            "content_hash": xxhash.xxh3_128_hexdigest(t.encode()),
            "vector": fake_vector(t, DIM),
            "title": "t",
        }
        for k, t in clean.items()
    }
    assert_table_matches(db, TABLE, want)
    # Same input again: same hashes, nothing to do.
    assert not run(db, ArrowSource(frame), config=config).committed
    # The clean text in Parquet hashes the same as the dirty one: no re-embedding either.
    kept = (0, 1, 2, 4)
    clean_table = pa.table({"id": kept, "body": [clean[k] for k in kept], "title": ["t"] * 4})
    pq.write_table(clean_table, tmp_path / "clean.parquet")
    report = run(db, ParquetSource(tmp_path / "clean.parquet"), config=config)
    assert counts(report) == {"scanned": 4, "unchanged": 4}


# ---------------------------------------------------------------- other sources


def test_parquet_source_round_trip(db, tmp_path):
    source = make_rows(range(250))
    path = tmp_path / "docs.parquet"
    pq.write_table(source, path, row_group_size=60)
    first = run(db, ParquetSource(path))
    assert first.inserted == 250
    stored = table_rows(db, TABLE)
    assert set(stored.column("source").to_pylist()) == {f"parquet:{path}"}
    changes = mutate(source, seed=5)
    pq.write_table(changes.table, path, row_group_size=60)
    report = run(db, ParquetSource(path))
    assert (report.updated, report.inserted, report.deleted, report.carry_updated) == (
        len(changes.edited), len(changes.inserted), len(changes.deleted), len(changes.carry_only)
    )  # fmt: skip
    assert_table_matches(db, TABLE, expected_state(changes.table))


def test_duckdb_source_table_and_query(db, tmp_path):
    path = tmp_path / "warehouse.duckdb"
    source = make_rows(range(200))
    con = duckdb.connect(str(path))
    con.register("src", source)
    con.execute("CREATE TABLE docs AS SELECT * FROM src")
    con.close()
    first = run(db, DuckDBSource(path, "docs"))
    assert first.inserted == 200
    assert_table_matches(db, TABLE, expected_state(source))

    con = duckdb.connect(str(path))
    con.execute("UPDATE docs SET body = body || ' (revised)' WHERE id % 10 = 0")
    con.execute("UPDATE docs SET url = 'https://example.org/new' WHERE id % 25 = 1")
    con.execute("DELETE FROM docs WHERE id >= 190")
    con.execute(
        "INSERT INTO docs SELECT id + 1000, title, body, url, updated_at FROM docs WHERE id < 5"
    )
    current = con.sql("SELECT * FROM docs").to_arrow_table()
    con.close()
    report = run(db, DuckDBSource(path, "docs"))
    assert counts(report) == {
        "scanned": 195, "unchanged": 195 - 19 - 5 - 8, "updated": 19, "inserted": 5,
        "carry_updated": 8, "deleted": 10, "embedded_rows": 24,
    }  # fmt: skip
    assert_table_matches(db, TABLE, expected_state(current))

    # A query source (e.g. a filtered view of a dbt model) with its own column names.
    query = "SELECT id AS doc_id, body FROM docs WHERE id < 100 -- trailing comment"
    config = SourceConfig(key="doc_id", text_columns=("body",))
    report = run(db, DuckDBSource(path, query), config=config, table="subset")
    assert report.inserted == 100


# ---------------------------------------------------------------- the real (tiny) model


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    from qwen3_pipeline.core.spec import EmbeddingSpec
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    tiny_spec = EmbeddingSpec(model=str(tiny_model_dir), dim=32, max_length=16)
    return Qwen3Encoder(tiny_spec, device="cpu", progress=False)


def test_tiny_model_refresh_truncates_long_text_and_flags_it(db, tiny_encoder):
    long_text = " ".join(["embedding"] * 200)
    bodies = ["short text", long_text, "another short one", long_text + " changed"]
    source = pa.table({"id": [1, 2, 3, 4], "body": bodies})
    config = SourceConfig(key="id", text_columns=("body",))
    report = run(db, source, config=config, embedder=tiny_encoder)
    assert (report.inserted, report.truncated) == (4, 2)
    assert report.padded_tokens >= report.tokens > 0
    stored = {r["key"]: r for r in table_rows(db, TABLE).to_pylist()}
    assert [stored[k]["truncated"] for k in (1, 2, 3, 4)] == [False, True, False, True]
    assert stored[2]["n_tokens"] == stored[4]["n_tokens"] == 16
    assert stored[1]["n_tokens"] < 16
    direct = tiny_encoder.encode_documents(bodies)
    vectors = np.array([stored[k]["vector"] for k in (1, 2, 3, 4)], dtype=np.float32)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The content hash is over the whole text: a change past the cut still re-embeds, and
    # an unchanged source embeds nothing.
    assert not run(db, source, config=config, embedder=tiny_encoder).committed
    bodies[3] = long_text + " changed again"
    report = run(db, pa.table({"id": [1, 2, 3, 4], "body": bodies}), config=config,
                 embedder=tiny_encoder)  # fmt: skip
    assert (report.updated, report.truncated, report.embedded_rows) == (1, 1, 1)


def test_tiny_model_spec_change_refused_then_rebuilt(db, tiny_model_dir, tiny_encoder):
    from qwen3_pipeline.core.spec import EmbeddingSpec
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    source = make_rows(range(40))
    run(db, source, embedder=tiny_encoder)
    wider = Qwen3Encoder(
        EmbeddingSpec(model=str(tiny_model_dir), dim=64, max_length=16),
        device="cpu",
        progress=False,
    )
    with pytest.raises(SpecMismatchError, match="dim=32"):
        run(db, source, embedder=wider)
    report = run(db, source, embedder=wider, rebuild=True)
    assert report.inserted == 40
    stored = table_rows(db, TABLE)
    assert stored.schema.field("vector").type.list_size == 64
    assert set(stored.column("spec_fingerprint").to_pylist()) == {wider.spec.fingerprint}
    texts = [r["text"] for r in expected_state(source).values()]
    keys = list(expected_state(source))
    order = {k: i for i, k in enumerate(stored.column("key").to_pylist())}
    vectors = np.stack([np.asarray(stored.column("vector")[order[k]].as_py()) for k in keys])
    np.testing.assert_allclose(vectors, wider.encode_documents(texts), atol=1e-5)


def test_a_rebuild_waits_for_no_other_but_stops_when_one_runs(db):
    # The engine holds the rebuild lock (so Python, Dagster and Airflow rebuilds are covered,
    # not only the CLI's): a second rebuild of the table stops before it reads anything,
    # with a transient error; a plain refresh beside a rebuild is not stopped by it.
    from qwen3_pipeline.core.errors import StoreConflictError, is_transient
    from qwen3_pipeline.store.rebuild_lock import rebuild_lock

    source = make_rows(range(30))
    run(db, source)
    version = table_version(db, TABLE)
    with rebuild_lock(db, TABLE):
        with pytest.raises(StoreConflictError, match="another rebuild of table") as refused:
            run(db, source, rebuild=True)
        assert is_transient(refused.value)
        assert table_version(db, TABLE) == version
        assert run(db, make_rows(range(31))).inserted == 1
    report = run(db, make_rows(range(31)), rebuild=True)
    assert report.inserted == 31
    # Released on the way out, error or not: the next rebuild takes it again.
    with rebuild_lock(db, TABLE):
        pass


def test_naive_datetimes_and_dates_in_updated_at(db):
    rows = pa.table(
        {
            "id": [1, 2],
            "body": ["a", "b"],
            "updated_at": [datetime(2024, 5, 1, 12), datetime(2024, 5, 2, 8)],
        }
    )
    config = SourceConfig(key="id", text_columns=("body",), updated_at="updated_at")
    run(db, rows, config=config)
    stored = {r["key"]: r["source_updated_at"] for r in table_rows(db, TABLE).to_pylist()}
    assert stored[1] == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_the_key_is_indexed_after_the_first_refresh_not_before_its_compaction(
    tmp_path, monkeypatch
):
    # A backfill writes without the key's BTree and builds it once after its compaction: an
    # index made on the empty table was updated with every row by that compaction, the peak
    # of a backfill's memory (benchmarks: "Watermark").
    import lancedb

    import qwen3_pipeline.store.table as table_module

    db = str(tmp_path / "db")
    seen: list[list[list[str]]] = []
    compact = table_module.VectorStore.maybe_optimize

    def compacting(store, **kwargs):
        seen.append([list(ix.columns) for ix in store.table.list_indices()])
        return compact(store, **kwargs)

    monkeypatch.setattr(table_module.VectorStore, "maybe_optimize", compacting)
    run(db, make_rows(range(300)), chunk_rows=4)  # 75 commits: past 64 fragments
    assert seen == [[]]  # compacted before the index existed
    indices = lancedb.connect(db).open_table(TABLE).list_indices()
    assert [(list(ix.columns), ix.index_type) for ix in indices] == [(["key"], "BTree")]
    report = run(db, edit_body(make_rows(range(300)), [1, 2]))
    assert report.updated == 2
    indices = lancedb.connect(db).open_table(TABLE).list_indices()
    assert [list(ix.columns) for ix in indices] == [["key"]]  # one index, kept
