"""Issue 17, items 5-7: the table's schema as a refresh meets it.

5. A carry column new to the configuration is filled by the refresh that adds it (a column
   update of every stored row in scope, no model call), and the report says it committed.
6. A missing tree-sitter grammar is refused before any table exists (CLI, Python, dry run).
7. Carry columns named like what search adds to its output (``_distance``, ``similarity``...)
   are refused when the refresh is configured.
"""

from dataclasses import replace
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.cli import main
from qwen3_pipeline.consumers.vector_search import open_vector_table, search
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import SEARCH_OUTPUT_COLUMNS, table_schema
from qwen3_pipeline.engine.plan import plan_refresh
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import ArrowSource, Shard, Shards, SourceConfig, TimeWindow
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import make_rows, shard_label_of, spec, table_rows, table_version

TABLE = "docs"
TITLE_ONLY = SourceConfig(key="id", template="{title}\n\n{body}", carry=("title",))
WITH_URL = SourceConfig(key="id", template="{title}\n\n{body}", carry=("title", "url"))


def run(db: str, source: pa.Table, config: SourceConfig, **kwargs):
    return refresh(
        source=ArrowSource(source),
        config=config,
        embedder=kwargs.pop("embedder", None) or FakeEmbedder(spec()),
        db_uri=db,
        table=TABLE,
        progress=False,
        **kwargs,
    )


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "lancedb")


# ---------------------------------------------------------------- 5. a new carry column


def test_a_new_carry_column_is_filled_by_the_refresh_that_adds_it(db):
    source = make_rows(range(300))
    run(db, source, TITLE_ONLY)
    before = table_version(db, TABLE)
    embedder = FakeEmbedder(spec())

    report = run(db, source, WITH_URL, embedder=embedder)

    assert (report.carry_updated, report.unchanged, report.embedded_rows) == (300, 0, 0)
    assert embedder.calls == []
    assert report.committed
    assert report.version_before == before
    assert report.version_after == table_version(db, TABLE) > before
    stored = table_rows(db, TABLE).sort_by("key")
    assert stored.column("url").to_pylist() == source.column("url").to_pylist()
    # The next refresh has nothing to do.
    again = run(db, source, WITH_URL)
    assert (again.unchanged, again.committed) == (300, False)


def test_inspect_shows_a_new_carry_column_all_null_and_open_adds_it(db):
    run(db, make_rows(range(5)), TITLE_ONLY)
    wider = pa.schema([("title", pa.string()), ("url", pa.string())])
    before = table_version(db, TABLE)
    inspected = VectorStore.inspect(db, TABLE, spec(), key_type=pa.int64(), carry_schema=wider)
    assert inspected is not None
    state = inspected.existing_state()
    assert state.schema.field("url").type == pa.string()
    assert state.column("url").null_count == 5
    assert state.column("title").null_count == 0
    assert inspected.columns_added == ()
    assert table_version(db, TABLE) == before  # inspecting alters nothing
    opened = VectorStore.open(db, TABLE, spec(), key_type=pa.int64(), carry_schema=wider)
    assert opened.columns_added == ("url",)
    assert table_version(db, TABLE) == before + 1
    again = VectorStore.open(db, TABLE, spec(), key_type=pa.int64(), carry_schema=wider)
    assert again.columns_added == ()


def test_a_new_carry_column_the_dry_run_counts(db):
    source = make_rows(range(50))
    run(db, source, TITLE_ONLY)
    before = table_version(db, TABLE)
    with plan_refresh(
        source=ArrowSource(source),
        config=WITH_URL,
        embedder=FakeEmbedder(spec()),
        db_uri=db,
        table=TABLE,
        progress=False,
    ) as plan:
        assert (plan.counts["carry_updated"], plan.counts["unchanged"]) == (50, 0)
    assert table_version(db, TABLE) == before
    assert "url" not in table_rows(db, TABLE).column_names


def test_a_new_carry_column_that_is_null_everywhere_still_reports_its_commit(db):
    source = make_rows(range(20))
    run(db, source, TITLE_ONLY)
    before = table_version(db, TABLE)
    nulls = source.set_column(
        source.schema.get_field_index("url"), "url", pa.nulls(20, pa.string())
    )
    report = run(db, nulls, WITH_URL)
    assert (report.carry_updated, report.unchanged) == (0, 20)
    # The column was added: a commit, and the report says so.
    assert report.committed
    assert report.version_after == table_version(db, TABLE) > before
    assert table_rows(db, TABLE).column("url").null_count == 20


def test_a_new_carry_column_in_a_shard_refresh_fills_that_shard_only(db):
    source = make_rows(range(200))
    sharded = SourceConfig(
        key="id", template="{title}\n\n{body}", carry=("title",), partition=Shards(4)
    )
    run(db, source, sharded)
    one = SourceConfig(
        key="id", template="{title}\n\n{body}", carry=("title", "url"), partition=Shard(1, 4)
    )
    report = run(db, source, one)
    mine = {k for k in range(200) if shard_label_of(k, 4) == "shard-01-of-04"}
    assert report.carry_updated == len(mine) > 0
    stored = table_rows(db, TABLE).to_pylist()
    filled = {r["key"] for r in stored if r["url"] is not None}
    assert filled == mine


def test_a_new_carry_column_in_a_time_window_refresh_fills_that_window_only(db):
    source = make_rows(range(144))  # updated_at spread over 2024-05-01..03
    window = TimeWindow(column="updated_at", start=date(2024, 5, 1), end=date(2024, 5, 4))
    run(db, source, replace(TITLE_ONLY, updated_at="updated_at", partition=window))
    day2 = TimeWindow(column="updated_at", start=date(2024, 5, 2), end=date(2024, 5, 3))
    report = run(db, source, replace(WITH_URL, updated_at="updated_at", partition=day2))
    assert report.carry_updated == 48
    filled = {r["key"] for r in table_rows(db, TABLE).to_pylist() if r["url"] is not None}
    assert filled == {k for k in range(144) if 24 <= k % 72 < 48}


def test_a_new_carry_column_of_a_chunk_table_reaches_every_chunk(db):
    chunked = ChunkingConfig(tokens=32)
    body = " ".join(f"Sentence {i} says something about topic {i * 7}." for i in range(40))
    source = pa.table(
        {"id": [1, 2, 3], "body": [body, body + " More.", "Short."], "tag": ["a", "b", None]}
    )
    config = SourceConfig(key="id", text_columns=("body",), chunking=chunked)
    run(db, source, config)
    chunks = table_rows(db, TABLE).num_rows
    assert chunks > 3
    embedder = FakeEmbedder(spec())
    report = run(db, source, replace(config, carry=("tag",)), embedder=embedder)
    assert (report.carry_updated, report.unchanged, embedder.calls) == (2, 1, [])
    assert report.committed
    stored = table_rows(db, TABLE)
    assert stored.num_rows == chunks
    tags = {(r["doc_key"], r["tag"]) for r in stored.to_pylist()}
    assert tags == {(1, "a"), (2, "b"), (3, None)}


# ---------------------------------------------------------------- 6. a missing grammar


def _code_source(tmp_path: Path) -> str:
    path = tmp_path / "code.parquet"
    pq.write_table(
        pa.table({"id": [1, 2], "body": ["IDENTIFICATION DIVISION.", "PROCEDURE DIVISION."]}),
        path,
    )
    return str(path)


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_missing_grammar_is_refused_by_the_cli_before_any_table(
    tiny_model_dir, tmp_path, capsys, dry_run
):
    db = tmp_path / "db"
    args = [
        "refresh", "--source", _code_source(tmp_path), "--key", "id", "--text", "body",
        "--db", str(db), "--table", "chunks", "--model", str(tiny_model_dir), "--dim", "32",
        "--device", "cpu", "--chunk-tokens", "64", "--chunk-splitter", "code",
        "--chunk-language", "cobol", *(["--dry-run"] if dry_run else []),
    ]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "'cobol'" in errors[0]
    assert "tree-sitter-cobol" in errors[0]
    assert captured.out == ""
    assert not (db / "chunks.lance").exists()
    # A correct run afterwards is not refused for a spec mismatch.
    fixed = [a if a != "cobol" else "python" for a in args if a != "--dry-run"]
    assert main(fixed) == 0, capsys.readouterr().err


def test_a_missing_grammar_is_refused_by_refresh_and_plan_before_any_table(tmp_path):
    db = str(tmp_path / "db")
    code = ChunkingConfig(tokens=64, splitter="code", code_language="cobol")
    config = SourceConfig(key="id", text_columns=("body",), chunking=code)
    source = pq.read_table(_code_source(tmp_path))
    with pytest.raises(ConfigError, match=r"'cobol'.*tree-sitter-cobol"):
        run(db, source, config)
    with pytest.raises(ConfigError, match="tree-sitter-cobol"):
        plan_refresh(
            source=ArrowSource(source), config=config, embedder=FakeEmbedder(spec()),
            db_uri=db, table=TABLE, progress=False,
        )  # fmt: skip
    assert table_version(db, TABLE) is None
    assert not (tmp_path / "db" / f"{TABLE}.lance").exists()


# ---------------------------------------------------------------- 7. reserved output names


@pytest.mark.parametrize("name", SEARCH_OUTPUT_COLUMNS)
def test_a_carry_column_named_like_a_search_output_is_refused(name):
    with pytest.raises(ConfigError) as refused:
        SourceConfig(key="id", text_columns=("body",), carry=("title", name))
    message = str(refused.value)
    assert repr(name) in message
    assert all(repr(n) in message for n in SEARCH_OUTPUT_COLUMNS)
    with pytest.raises(ConfigError, match=name):
        table_schema(spec(), key_type="int64", carry_schema=pa.schema([(name, pa.float64())]))


@pytest.mark.parametrize("name", ["_distance", "similarity"])
def test_the_cli_refuses_a_reserved_carry_column_before_any_table(
    tiny_model_dir, tmp_path, capsys, name
):
    path = tmp_path / "s.parquet"
    pq.write_table(make_rows(range(3)).append_column(name, pa.array([1.0, 2.0, 3.0])), path)
    db = tmp_path / "db"
    args = [
        "refresh", "--source", str(path), "--key", "id", "--text", "body",
        "--carry", "title", name, "--db", str(db), "--table", "docs",
        "--model", str(tiny_model_dir), "--dim", "32", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert repr(name) in errors[0]
    assert "similarity" in errors[0]
    assert not (db / "docs.lance").exists()


def _legacy_table(db: str, **columns: str):
    """A table made before the refusal, with carry columns named like search outputs."""
    import lancedb

    run(db, make_rows(range(20)), TITLE_ONLY)
    lancedb.connect(db).open_table(TABLE).add_columns(columns)
    return open_vector_table(db, TABLE)


def test_a_stored_similarity_column_never_replaces_the_score(db):
    vectors = _legacy_table(db, similarity="CAST(42.0 AS DOUBLE)")
    assert "similarity" not in vectors.carry_columns
    hits = search(vectors, "Title 3", k=5, embedder=FakeEmbedder(spec()))
    assert hits.num_rows == 5
    assert hits.column_names.count("similarity") == 1
    assert all(-1.0 <= s <= 1.0 for s in hits.column("similarity").to_pylist())
    with pytest.raises(ConfigError, match=r"'similarity'.*search adds"):
        search(vectors, "Title 3", k=5, embedder=FakeEmbedder(spec()), columns=["similarity"])


def test_a_stored_distance_column_is_a_clear_error_naming_the_way_out(db):
    vectors = _legacy_table(db, _distance="CAST(7.0 AS DOUBLE)")
    with pytest.raises(ConfigError, match=r"'_distance'.*drop_columns"):
        search(vectors, "Title 3", k=5, embedder=FakeEmbedder(spec()))
