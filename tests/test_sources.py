from datetime import UTC, date, datetime, timedelta, timezone

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.core.changes import content_hash, content_hashes
from qwen3_pipeline.core.errors import ConfigError, InputDataError
from qwen3_pipeline.core.schema import INTERNAL_PREFIX, TEXT_COLUMN
from qwen3_pipeline.sources import (
    UNPARTITIONED,
    ArrowSource,
    DuckDBSource,
    ParquetSource,
    Shard,
    Shards,
    SourceConfig,
    TimeWindow,
    carry_schema,
    output_schema,
    parse_shard_label,
    parse_source,
    read_batches,
    scope_partition_keys,
    shard_indices,
    shard_label,
    shard_of,
    validate_keys,
)

TS = pa.timestamp("us", tz="UTC")


def docs(n=10):
    return pa.table(
        {
            "id": pa.array(range(n), pa.int32()),
            "title": [f"Title {i}" for i in range(n)],
            "body": [f"body {i}" for i in range(n)],
            "url": [f"https://x/{i}" for i in range(n)],
            "updated": pa.array(
                [datetime(2024, 5, 1 + i % 3, i % 24) for i in range(n)], pa.timestamp("ns")
            ),
        }
    )


def read_all(source, config, **kw):
    batches = list(read_batches(source, config, **kw))
    schema = output_schema(source, config)
    return pa.Table.from_batches(batches, schema=schema)


@pytest.fixture
def duckdb_file(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    try:
        con.register("src", docs(25))
        con.execute("CREATE TABLE docs AS SELECT * FROM src")
        con.execute("CREATE SCHEMA staging")
        con.execute("CREATE TABLE staging.docs AS SELECT * FROM src WHERE id < 5")
    finally:
        con.close()
    return path


# ---------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ConfigError, match="exactly one"):
        SourceConfig(key="id")
    with pytest.raises(ConfigError, match="exactly one"):
        SourceConfig(key="id", text_columns=("body",), template="{body}")
    with pytest.raises(ConfigError, match="reserved"):
        SourceConfig(key="id", text_columns=("body",), carry=(f"{INTERNAL_PREFIX}x",))
    SourceConfig(key="id", text_columns=("body",), carry=("text",))  # the text is not "text"
    with pytest.raises(ConfigError, match="clash"):
        SourceConfig(key="id", text_columns=("body",), carry=("vector",))
    with pytest.raises(ConfigError, match="more than once"):
        SourceConfig(key="id", text_columns=("body",), carry=("url", "url"))
    with pytest.raises(ConfigError, match="malformed"):
        SourceConfig(key="id", template="{title")
    with pytest.raises(ConfigError, match="positional"):
        SourceConfig(key="id", template="{} {0}")
    with pytest.raises(ConfigError, match="attribute or index"):
        SourceConfig(key="id", template="{title.upper}")
    with pytest.raises(ConfigError, match="names no column"):
        SourceConfig(key="id", template="no fields")
    with pytest.raises(ConfigError, match="partition"):
        SourceConfig(key="id", text_columns=("body",), partition="shard-1")  # type: ignore[arg-type]
    cfg = SourceConfig(
        key="id", template="{title}\n{body}", carry=("title", "url"), updated_at="updated"
    )
    assert cfg.columns == ("id", "title", "body", "url", "updated")


# ---------------------------------------------------------------- reading and rendering


def test_arrow_source_output_columns_and_types():
    cfg = SourceConfig(
        key="id", text_columns=("title", "body"), updated_at="updated", carry=("url", "title")
    )
    out = read_all(ArrowSource(docs(3)), cfg)
    assert out.column_names == [
        "key",
        TEXT_COLUMN,
        "partition_key",
        "source_updated_at",
        "url",
        "title",
    ]
    assert out.schema.field("key").type == pa.int64()
    assert not out.schema.field("key").nullable
    assert out.schema.field("source_updated_at").type == TS
    assert out["key"].to_pylist() == [0, 1, 2]
    assert out[TEXT_COLUMN].to_pylist()[0] == "Title 0\n\nbody 0"
    assert out["partition_key"].to_pylist() == [UNPARTITIONED] * 3
    assert out["source_updated_at"][1].as_py() == datetime(2024, 5, 2, 1, tzinfo=UTC)
    assert carry_schema(out.schema).names == ["url", "title"]


def test_text_columns_skip_null_and_empty_parts():
    table = pa.table({"id": ["a", "b", "c"], "t": ["T", None, ""], "b": ["B", "B", None]})
    out = read_all(ArrowSource(table), SourceConfig(key="id", text_columns=("t", "b")))
    assert out[TEXT_COLUMN].to_pylist() == ["T\n\nB", "B", ""]
    assert out.schema.field("key").type == pa.string()


def test_template_rendering_vectorised_and_python_paths():
    table = pa.table({"id": [1, 2], "t": ["A", None], "n": [1.5, None], "flag": [True, False]})
    plain = read_all(ArrowSource(table), SourceConfig(key="id", template="# {t}\n{n}|{flag} {{x}}"))
    assert plain[TEXT_COLUMN].to_pylist() == ["# A\n1.5|true {x}", "# \n|false {x}"]
    formatted = read_all(ArrowSource(table), SourceConfig(key="id", template="{t!r}:{n:>5}"))
    assert formatted[TEXT_COLUMN].to_pylist() == ["'A':  1.5", "'':     "]
    bad = pa.table({"id": [1], "n": [TEXT_COLUMN]})
    with pytest.raises(InputDataError, match="could not format"):
        read_all(ArrowSource(bad), SourceConfig(key="id", template="{n:.2f}"))


def test_text_is_sanitised():
    table = pa.table({"id": [1], "body": ["a\x00b"]})
    out = read_all(ArrowSource(table), SourceConfig(key="id", text_columns=("body",)))
    assert out[TEXT_COLUMN].to_pylist() == ["ab"]
    # pandas 3 cannot even hold a lone surrogate in its default string dtype; object can
    frame = pd.DataFrame({"id": [1, 2], "body": pd.Series(["x\ud800y", "fine"], dtype=object)})
    out = read_all(ArrowSource(frame), SourceConfig(key="id", text_columns=("body",)))
    assert out[TEXT_COLUMN].to_pylist() == ["x\ufffdy", "fine"]


@pytest.mark.parametrize(
    "config",
    [
        SourceConfig(key="id", text_columns=("body",)),
        SourceConfig(key="id", template="{body}"),  # rendered vectorised
        SourceConfig(key="id", template="{body!s}"),  # rendered row by row in Python
    ],
    ids=["text_columns", "template", "python_template"],
)
def test_a_nul_byte_is_dropped_deterministically(config):
    # No lone surrogate involved: only the NUL goes, so the text and its hash are "ab"'s.
    table = pa.table({"id": [1, 2, 3, 4], "body": ["a\x00b", "ab", "a\x00\x00b", "\x00ab\x00"]})
    for _ in range(2):
        out = read_all(ArrowSource(table), config)
        assert out[TEXT_COLUMN].to_pylist() == ["ab"] * 4
        assert content_hashes(out[TEXT_COLUMN]).to_pylist() == [content_hash("ab")] * 4


def test_updated_at_types_are_normalised_to_utc():
    aware = pa.array([datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))])
    for values, expected in [
        (pa.array([datetime(2024, 1, 1, 10)], pa.timestamp("s")), datetime(2024, 1, 1, 10)),
        (aware, datetime(2024, 1, 1, 10)),
        (pa.array([date(2024, 1, 1)]), datetime(2024, 1, 1)),
        (pa.array([None], pa.timestamp("ms")), None),
    ]:
        table = pa.table({"id": [1], "body": ["x"], "u": values})
        out = read_all(
            ArrowSource(table), SourceConfig(key="id", text_columns=("body",), updated_at="u")
        )
        got = out["source_updated_at"][0].as_py()
        assert got == (expected.replace(tzinfo=UTC) if expected else None)


def test_batches_are_bounded():
    cfg = SourceConfig(key="id", text_columns=("body",))
    sizes = [b.num_rows for b in read_batches(ArrowSource(docs(25)), cfg, batch_rows=10)]
    assert sizes == [10, 10, 5]
    with pytest.raises(ConfigError, match="batch_rows"):
        list(read_batches(ArrowSource(docs(1)), cfg, batch_rows=0))


# ---------------------------------------------------------------- bad input


def test_missing_columns_are_named_with_available_ones():
    cfg = SourceConfig(key="id", text_columns=("body", "summary"), carry=("author",))
    with pytest.raises(InputDataError) as info:
        list(read_batches(ArrowSource(docs(2)), cfg))
    message = str(info.value)
    assert "['summary', 'author']" in message
    assert "available columns" in message
    assert "'title'" in message


def test_null_keys_are_rejected_with_row_numbers():
    table = pa.table({"id": [1, None, 3, None], "body": ["a", "b", "c", "d"]})
    cfg = SourceConfig(key="id", text_columns=("body",))
    with pytest.raises(InputDataError, match=r"2 row\(s\).*\[1, 3\]"):
        list(read_batches(ArrowSource(table), cfg))
    # row numbers count across batches
    later = pa.table({"id": [1, 2, None, 4], "body": ["a", "b", "c", "d"]})
    with pytest.raises(InputDataError, match=r"\[2\]"):
        list(read_batches(ArrowSource(later), cfg, batch_rows=2))


def test_unsupported_key_and_time_types():
    table = pa.table({"id": [1.5], "body": ["x"], "u": ["2024-01-01"]})
    with pytest.raises(InputDataError, match="integers or strings"):
        list(read_batches(ArrowSource(table), SourceConfig(key="id", text_columns=("body",))))
    table = pa.table({"id": [1], "body": ["x"], "u": ["2024-01-01"]})
    with pytest.raises(InputDataError, match="timestamp or"):
        list(
            read_batches(
                ArrowSource(table), SourceConfig(key="id", text_columns=("body",), updated_at="u")
            )
        )


def test_validate_keys_finds_nulls_and_duplicates(tmp_path, duckdb_file):
    table = pa.table({"id": ["a", "b", "a", None, "b", "a"], "body": ["x"] * 6})
    cfg = SourceConfig(key="id", text_columns=("body",))
    with pytest.raises(
        InputDataError, match=r"1 row\(s\) have a null key.*'a' \(3 rows\), 'b' \(2 rows\)"
    ):
        validate_keys(ArrowSource(table), cfg)
    pq.write_table(table, tmp_path / "dupes.parquet")
    with pytest.raises(InputDataError, match="duplicate keys"):
        validate_keys(ParquetSource(tmp_path / "dupes.parquet"), cfg)
    validate_keys(DuckDBSource(duckdb_file, "docs"), cfg)
    with pytest.raises(InputDataError, match=r"duplicate keys: 0 \(2 rows\), 1 \(2 rows\)"):
        validate_keys(
            DuckDBSource(duckdb_file, "SELECT id % 2 AS id, body FROM docs WHERE id < 4"), cfg
        )
    with pytest.raises(InputDataError, match="not found"):
        validate_keys(ArrowSource(table), SourceConfig(key="nope", text_columns=("body",)))


# ---------------------------------------------------------------- source kinds


def test_duckdb_table_and_query(duckdb_file):
    cfg = SourceConfig(key="id", template="{title}: {body}", carry=("url",))
    table = read_all(DuckDBSource(duckdb_file, "docs"), cfg, batch_rows=10)
    assert table.num_rows == 25
    assert table[TEXT_COLUMN][0].as_py() == "Title 0: body 0"
    qualified = read_all(DuckDBSource(duckdb_file, "staging.docs"), cfg)
    assert qualified.num_rows == 5
    query = read_all(
        DuckDBSource(duckdb_file, "SELECT * FROM docs WHERE id % 5 = 0 -- every fifth"), cfg
    )
    assert query["key"].to_pylist() == [0, 5, 10, 15, 20]
    terminated = read_all(DuckDBSource(duckdb_file, "SELECT * FROM docs WHERE id < 2;\n"), cfg)
    assert terminated["key"].to_pylist() == [0, 1]


def test_duckdb_streams_in_bounded_batches(duckdb_file):
    cfg = SourceConfig(key="id", text_columns=("body",))
    sizes = [b.num_rows for b in read_batches(DuckDBSource(duckdb_file, "docs"), cfg, batch_rows=8)]
    assert sum(sizes) == 25
    assert max(sizes) <= 8


def test_duckdb_is_read_only_and_errors_are_clear(tmp_path, duckdb_file):
    source = DuckDBSource(duckdb_file, "DELETE FROM docs")
    with pytest.raises(ConfigError, match="failed"):
        source.schema()
    cfg = SourceConfig(key="id", text_columns=("body",))
    assert read_all(DuckDBSource(duckdb_file, "docs"), cfg).num_rows == 25
    with pytest.raises(
        ConfigError, match=r"Tables and views there: \['main.docs', 'staging.docs'\]"
    ):
        DuckDBSource(duckdb_file, "nope").schema()
    with pytest.raises(ConfigError, match="does not exist"):
        DuckDBSource(tmp_path / "missing.duckdb", "docs")
    with pytest.raises(ConfigError, match="empty"):
        DuckDBSource(duckdb_file, "  ")


def test_parquet_file_and_directory(tmp_path):
    pq.write_table(docs(6), tmp_path / "one.parquet")
    folder = tmp_path / "dataset"
    (folder / "part=a").mkdir(parents=True)
    (folder / "part=b").mkdir(parents=True)
    pq.write_table(docs(6).slice(0, 3), folder / "part=a" / "x.parquet")
    pq.write_table(docs(6).slice(3), folder / "part=b" / "y.parquet")
    cfg = SourceConfig(key="id", text_columns=("body",), carry=("part",))
    assert (
        read_all(
            ParquetSource(tmp_path / "one.parquet"), SourceConfig(key="id", text_columns=("body",))
        ).num_rows
        == 6
    )
    out = read_all(ParquetSource(folder), cfg).sort_by("key")
    assert out["part"].to_pylist() == ["a"] * 3 + ["b"] * 3
    assert out.schema.field("part").type == pa.string()
    with pytest.raises(ConfigError, match="does not exist"):
        ParquetSource(tmp_path / "missing.parquet")


def test_parse_source(tmp_path, duckdb_file):
    pq.write_table(docs(2), tmp_path / "d.parquet")
    assert isinstance(parse_source(str(tmp_path / "d.parquet")), ParquetSource)
    assert isinstance(parse_source(f"parquet:{tmp_path / 'd.parquet'}"), ParquetSource)
    source = parse_source(f"duckdb:{duckdb_file}::SELECT * FROM docs")
    assert isinstance(source, DuckDBSource)
    assert source.table_or_query == "SELECT * FROM docs"
    assert source.name.startswith("duckdb:")
    with pytest.raises(ConfigError, match="duckdb:PATH::TABLE_OR_QUERY"):
        parse_source(f"duckdb:{duckdb_file}")
    with pytest.raises(ConfigError, match="looks like a DuckDB file"):
        parse_source(str(duckdb_file))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_source(str(tmp_path / "missing.parquet"))
    with pytest.raises(ConfigError, match="empty"):
        parse_source("")
    with pytest.raises(ConfigError, match="ArrowSource takes"):
        ArrowSource([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- partitions


def test_shard_hash_is_stable_and_type_agnostic():
    # Pinned values: changing the hash would silently move every stored row.
    assert shard_of(42, 16) == 1
    assert shard_of("doc-1", 16) == 1
    assert shard_of(-7, 1000) == 912
    assert shard_of(42, 16) == shard_of("42", 16)
    keys = pa.array([42, -7, 10**12])
    assert shard_indices(keys, 1000).tolist() == [shard_of(k, 1000) for k in keys.to_pylist()]
    with pytest.raises(InputDataError):
        shard_of(1.5, 4)  # type: ignore[arg-type]


def test_shard_labels():
    assert shard_label(3, 16) == "shard-03-of-16"
    assert shard_label(5, 128) == "shard-005-of-128"
    assert parse_shard_label("shard-005-of-128") == (5, 128)
    for bad in ("shard-3", "shard-16-of-16", "x"):
        with pytest.raises(ConfigError):
            parse_shard_label(bad)
    with pytest.raises(ConfigError):
        Shard(4, 4)
    with pytest.raises(ConfigError):
        Shards(0)
    assert Shards.from_labels(["shard-02-of-04", "shard-00-of-04"]) == Shards(4, (0, 2))
    with pytest.raises(ConfigError, match="mix"):
        Shards.from_labels(["shard-00-of-04", "shard-00-of-08"])


def test_shards_partition_rows_and_label_each_row_with_its_own_shard():
    source = ArrowSource(docs(200))
    base = dict(key="id", text_columns=("body",))
    everything = read_all(source, SourceConfig(**base, partition=Shards(4)))
    assert everything.num_rows == 200
    own = {k: shard_label(shard_of(k, 4), 4) for k in everything["key"].to_pylist()}
    assert (
        dict(
            zip(everything["key"].to_pylist(), everything["partition_key"].to_pylist(), strict=True)
        )
        == own
    )
    seen = []
    for index in range(4):
        part = read_all(source, SourceConfig(**base, partition=Shard(index, 4)))
        assert set(part["partition_key"].to_pylist()) <= {shard_label(index, 4)}
        seen += part["key"].to_pylist()
    assert sorted(seen) == list(range(200))
    several = read_all(source, SourceConfig(**base, partition=Shards(4, (1, 3))))
    assert set(several["partition_key"].to_pylist()) == {shard_label(1, 4), shard_label(3, 4)}
    assert several.num_rows == sum(
        read_all(source, SourceConfig(**base, partition=Shard(i, 4))).num_rows for i in (1, 3)
    )


def test_scope_partition_keys():
    assert scope_partition_keys(None) is None
    assert scope_partition_keys(Shards(4)) is None
    assert scope_partition_keys(Shards(2, (0, 1))) is None
    assert scope_partition_keys(Shard(1, 4)) == ["shard-01-of-04"]
    assert scope_partition_keys(Shards(4, (3, 1))) == ["shard-01-of-04", "shard-03-of-04"]
    window = TimeWindow(column="u", start=date(2024, 1, 30), end=date(2024, 2, 2))
    assert scope_partition_keys(window) == ["2024-01-30", "2024-01-31", "2024-02-01"]


def test_time_window_selects_and_labels_rows():
    source = ArrowSource(docs(24))  # updated: 2024-05-01/02/03, hour i
    window = TimeWindow(column="updated", start=date(2024, 5, 1), end=date(2024, 5, 3))
    out = read_all(source, SourceConfig(key="id", text_columns=("body",), partition=window))
    days = out["partition_key"].to_pylist()
    assert set(days) == {"2024-05-01", "2024-05-02"}
    assert out.num_rows == 16
    table = docs(24)
    for key, label in zip(out["key"].to_pylist(), days, strict=True):
        moment = table["updated"][key].as_py()
        assert label == window.label_of(moment) == moment.strftime("%Y-%m-%d")
    hourly = TimeWindow(
        column="updated", start=datetime(2024, 5, 1, 3), end=datetime(2024, 5, 1, 5), grain="hour"
    )
    out = read_all(source, SourceConfig(key="id", text_columns=("body",), partition=hourly))
    assert out["partition_key"].to_pylist() == ["2024-05-01-03:00"]
    assert hourly.partition_keys() == ["2024-05-01-03:00", "2024-05-01-04:00"]
    whole = TimeWindow(column="updated", start=date(2024, 5, 2), end=date(2024, 5, 9), grain=None)
    out = read_all(source, SourceConfig(key="id", text_columns=("body",), partition=whole))
    assert set(out["partition_key"].to_pylist()) == {"2024-05-02"}


def test_time_window_nulls_bounds_and_grains():
    table = pa.table(
        {
            "id": [1, 2, 3],
            "body": ["a", "b", "c"],
            "u": pa.array([None, date(2024, 3, 5), date(2024, 3, 6)]),
        }
    )
    window = TimeWindow(column="u", start=date(2024, 3, 5), end=date(2024, 3, 6))
    out = read_all(
        ArrowSource(table), SourceConfig(key="id", text_columns=("body",), partition=window)
    )
    assert out["key"].to_pylist() == [2]  # null time: no window; end is exclusive
    with pytest.raises(ConfigError, match="before end"):
        TimeWindow(column="u", start=date(2024, 1, 2), end=date(2024, 1, 1))
    with pytest.raises(ConfigError, match="grain"):
        TimeWindow(column="u", start=date(2024, 1, 1), end=date(2024, 1, 2), grain="year")  # type: ignore[arg-type]
    months = TimeWindow(column="u", start=date(2023, 11, 15), end=date(2024, 2, 1), grain="month")
    assert months.partition_keys() == ["2023-11-01", "2023-12-01", "2024-01-01"]
    weeks = TimeWindow(column="u", start=date(2024, 3, 4), end=date(2024, 3, 12), grain="week")
    assert weeks.partition_keys() == ["2024-03-03", "2024-03-10"]  # weeks start on Sunday
    row = read_all(
        ArrowSource(table.slice(1, 1)),
        SourceConfig(key="id", text_columns=("body",), partition=weeks),
    )
    assert row["partition_key"].to_pylist() == ["2024-03-03"]
