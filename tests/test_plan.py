"""Plan, then apply: bad input found anywhere in the scope writes nothing; the mass-delete guard;
working columns that never collide with user columns; the plan's exact counts and tokens."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.core.errors import ConfigError, InputDataError, MassDeleteError
from qwen3_pipeline.engine.refresh import check_mass_delete, plan_refresh, refresh
from qwen3_pipeline.sources import ArrowSource, ParquetSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import make_rows, spec, table_rows, table_version

TABLE = "docs"
ROWS = 3000
CHUNK = 500
BAD_ROW = 2500


def _call(engine, db, source, config, **kwargs):
    if isinstance(source, pa.Table):
        source = ArrowSource(source)
    return engine(
        source=source,
        config=config,
        embedder=kwargs.pop("embedder", None) or FakeEmbedder(spec()),
        db_uri=str(db),
        table=TABLE,
        chunk_rows=kwargs.pop("chunk_rows", CHUNK),
        progress=False,
        **kwargs,
    )


def run(db, source, config, **kwargs):
    return _call(refresh, db, source, config, **kwargs)


def plan(db, source, config, **kwargs):
    return _call(plan_refresh, db, source, config, **kwargs)


def assert_untouched(db, version, rows):
    assert table_version(str(db), TABLE) == version
    assert table_rows(str(db), TABLE).num_rows == rows


@pytest.fixture
def db(tmp_path):
    return tmp_path / "db"


# --------------------------------------------------------------------------- bad input mid-stream


def test_a_key_that_does_not_fit_late_in_the_scope_writes_nothing(db, tmp_path):
    config = SourceConfig(key="id", text_columns=("body",))
    keys = pa.array(range(ROWS), pa.uint64())
    run(db, pa.table({"id": keys, "body": [f"v0 {k}" for k in range(ROWS)]}), config)
    version = table_version(str(db), TABLE)
    ids = list(range(ROWS))
    ids[BAD_ROW] = 2**63 + 5  # fits uint64, not the table's int64 key
    edited = pa.table({"id": pa.array(ids, pa.uint64()), "body": [f"v1 {k}" for k in ids]})
    path = tmp_path / "edited.parquet"
    pq.write_table(edited, path, row_group_size=CHUNK)
    with pytest.raises(InputDataError, match="does not fit int64"):
        run(db, ParquetSource(path), config)
    assert_untouched(db, version, ROWS)
    assert set(table_rows(str(db), TABLE).column("content_hash").to_pylist()).isdisjoint({None})


def test_a_template_failing_on_one_late_row_writes_nothing(db):
    config = SourceConfig(key="id", template="{name}: {price:.2f}")
    prices = [float(k) for k in range(ROWS)]
    source = pa.table({"id": range(ROWS), "name": [f"n{k}" for k in range(ROWS)], "price": prices})
    run(db, source, config)
    version = table_version(str(db), TABLE)
    prices = [p + 1 for p in prices]
    prices[BAD_ROW] = None
    edited = source.set_column(2, "price", pa.array(prices, pa.float64()))
    with pytest.raises(InputDataError, match="could not format"):
        run(db, edited, config)
    assert_untouched(db, version, ROWS)


def test_a_carry_value_that_overflows_the_stored_type_writes_nothing(db):
    config = SourceConfig(key="id", text_columns=("body",), carry=("n",))
    bodies = [f"body {k}" for k in range(ROWS)]
    run(db, pa.table({"id": range(ROWS), "body": bodies, "n": pa.array(range(ROWS), pa.int32())}),
        config)  # fmt: skip
    version = table_version(str(db), TABLE)
    n = [k + 1 for k in range(ROWS)]
    n[BAD_ROW] = 2**40
    edited = pa.table({"id": range(ROWS), "body": [b + "!" for b in bodies],
                       "n": pa.array(n, pa.int64())})  # fmt: skip
    with pytest.raises(InputDataError, match=rf"carry column 'n' .*keys \[{BAD_ROW}\]"):
        run(db, edited, config)
    assert_untouched(db, version, ROWS)


def test_bad_input_on_a_new_table_does_not_even_create_it(db):
    config = SourceConfig(key="id", template="{name}: {price:.2f}")
    source = pa.table({"id": [1, 2], "name": ["a", "b"], "price": pa.array([1.0, None])})
    with pytest.raises(InputDataError):
        run(db, source, config)
    assert table_version(str(db), TABLE) is None


# --------------------------------------------------------------------------- mass deletes


def test_mass_delete_guard_refuses_more_than_the_share_and_names_it(db):
    config = SourceConfig(key="id", text_columns=("body",))
    run(db, make_rows(range(100)).select(["id", "body"]), config)
    version = table_version(str(db), TABLE)
    kept = make_rows(range(40)).select(["id", "body"])
    with pytest.raises(MassDeleteError, match=r"delete 60 of the 100 row\(s\).*60\.0%.*50%"):
        run(db, kept, config)
    assert_untouched(db, version, 100)
    report = run(db, kept, config, max_delete_share=0.6)
    assert report.deleted == 60
    # 40% of what is left is within the default share.
    assert run(db, make_rows(range(24)).select(["id", "body"]), config).deleted == 16


def test_mass_delete_guard_settings_are_validated(db):
    config = SourceConfig(key="id", text_columns=("body",))
    run(db, make_rows(range(4)).select(["id", "body"]), config)
    with pytest.raises(ConfigError, match="max_delete_share"):
        run(db, make_rows(range(4)).select(["id", "body"]), config, max_delete_share=1.5)


def test_mass_delete_guard_counts_only_the_refreshed_shard(db):
    from qwen3_pipeline.sources import Shard, Shards

    base = SourceConfig(key="id", text_columns=("body",))
    rows = make_rows(range(200)).select(["id", "body"])
    run(db, rows, SourceConfig(key="id", text_columns=("body",), partition=Shards(4)))
    # Shard 1 of a source that lost every row of shard 1: the whole shard would go.
    from qwen3_pipeline.sources import shard_indices

    keep = shard_indices(rows.column("id"), 4) != 1
    scoped = SourceConfig(key=base.key, text_columns=base.text_columns, partition=Shard(1, 4))
    with pytest.raises(MassDeleteError, match=r"no rows in scope .*shard-01-of-04"):
        run(db, rows.filter(pa.array(keep)), scoped)


# --------------------------------------------------------------------------- namespaces


@pytest.mark.parametrize("name", ["status", "moved", "text", "existing_rows", "__rebuild"])
def test_any_non_lineage_carry_name_works(db, name):
    config = SourceConfig(key="id", text_columns=("body",), carry=(name,))
    source = pa.table({"id": [1, 2, 3], "body": ["a b", "c d", "e f"], name: ["x", "y", "z"]})
    first = run(db, source, config)
    assert first.inserted == 3
    edited = pa.table({"id": [1, 2, 3], "body": ["a b", "c d!", "e f"], name: ["x", "y", "w"]})
    second = run(db, edited, config)
    assert (second.updated, second.carry_updated, second.unchanged) == (1, 1, 1)
    stored = table_rows(str(db), TABLE).sort_by("key")
    assert stored.column(name).to_pylist() == ["x", "y", "w"]


@pytest.mark.parametrize("name", ["vector", "content_hash", "__qwen3_text"])
def test_lineage_and_engine_names_are_refused_for_carry(name):
    with pytest.raises(ConfigError, match=name):
        SourceConfig(key="id", text_columns=("body",), carry=(name,))


# --------------------------------------------------------------------------- the plan itself


def test_plan_counts_equal_the_refresh_report_and_write_nothing(db):
    config = SourceConfig(key="id", text_columns=("body",), carry=("title",))
    run(db, make_rows(range(1000)).select(["id", "body", "title"]), config)
    version = table_version(str(db), TABLE)
    rows = make_rows(range(100, 1100), version=0).select(["id", "body", "title"])
    bodies = rows.column("body").to_pylist()
    titles = rows.column("title").to_pylist()
    for i in range(0, 50):
        bodies[i] += " edited"
    for i in range(50, 70):
        titles[i] += " retitled"
    edited = pa.table({"id": rows.column("id"), "body": bodies, "title": titles})
    with plan(db, edited, config) as planned:
        expected = {
            **{"scanned": 1000, "unchanged": 830, "inserted": 100, "updated": 50},
            **{"moved": 0, "carry_updated": 20, "deleted": 100, "skipped_empty": 0},
            **{"retried": 0, "quarantined": 0, "deferred": 0},
        }
        assert planned.counts == expected
        assert planned.rows_to_embed == 150
        assert not planned.tokens_estimated
        spilled = planned.work.embed_file
        assert spilled is not None
        assert spilled.exists()
    assert not spilled.exists()  # closing a plan removes its spill files
    assert_untouched(db, version, 1000)
    embedder = FakeEmbedder(spec())
    with plan(db, edited, config, embedder=embedder) as planned:
        tokens = planned.tokens_to_embed
    report = run(db, edited, config, embedder=embedder)
    assert {k: report.counters()[k] for k in expected} == expected
    assert report.tokens == tokens
    assert report.embedded_rows == 150


def test_plan_of_a_missing_table_does_not_create_it(db):
    config = SourceConfig(key="id", text_columns=("body",))
    with plan(db, make_rows(range(10)).select(["id", "body"]), config) as planned:
        assert planned.counts["inserted"] == 10
        assert not planned.table_exists
    assert table_version(str(db), TABLE) is None


def test_guard_on_a_plan_without_stored_rows_passes(db):
    config = SourceConfig(key="id", text_columns=("body",))
    with plan(db, make_rows([]).select(["id", "body"]), config) as planned:
        check_mass_delete(planned)  # nothing stored: nothing to protect


def test_a_duckdb_file_locked_by_a_writer_is_a_transient_error(db, tmp_path):
    import subprocess
    import sys

    import duckdb

    from qwen3_pipeline.core.errors import SourceUnavailableError, TransientError
    from qwen3_pipeline.sources import DuckDBSource

    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE docs AS SELECT 1 AS id, 'a b' AS body")
    holder = subprocess.Popen(  # another process writing the file holds its lock
        [sys.executable, "-c", f"import duckdb,sys; c=duckdb.connect({str(path)!r}); "
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = SourceConfig(key="id", text_columns=("body",))
        with pytest.raises(SourceUnavailableError, match="locked") as caught:
            run(db, DuckDBSource(path, "docs"), config)
        assert isinstance(caught.value, TransientError)
    finally:
        holder.communicate("")
    assert table_version(str(db), TABLE) is None
    assert run(db, DuckDBSource(path, "docs"), config).inserted == 1
