import statistics
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from qwen3_pipeline.core.errors import ConfigError, UnsafeNameError
from qwen3_pipeline.demo import corpus
from qwen3_pipeline.demo.corpus import (
    CORPUS_SCHEMA,
    DocRecord,
    corpus_arrow_table,
    load_corpus_into_duckdb,
    narrow_length_texts,
    stdlib_docstrings,
)


@pytest.fixture(scope="module")
def full_corpus() -> list[DocRecord]:
    return stdlib_docstrings()


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    _write(
        root,
        "alpha.py",
        '''
        """Alpha module.

        Details:
            Indented continuation.
        """
        import sys

        if sys.platform == "win32":
            def helper():
                """Windows helper."""
        else:
            def helper():
                """POSIX helper."""

        class Widget:
            """A widget."""

            def spin(self):
                """Spin it."""

                def inner():
                    """Never public: defined inside a function."""

            class Part:
                """A part."""

        async def fetch():
            """Fetch asynchronously."""

        def undocumented():
            pass
        ''',
    )
    _write(root, "pkg/__init__.py", '"""The package."""\n')
    _write(root, "pkg/sub.py", '"""Sub\\x00module \\udc80 text."""\n')
    _write(root, "test/test_alpha.py", '"""Skipped: a test suite."""\n')
    _write(root, "pkg/tests/test_sub.py", '"""Skipped: nested test suite."""\n')
    _write(root, "tkinter/__init__.py", '"""Skipped: GUI."""\n')
    _write(root, "broken.py", "def oops(:\n")
    return root


def test_extracts_modules_classes_and_functions_without_importing(fake_stdlib: Path) -> None:
    records = stdlib_docstrings(root=fake_stdlib)

    assert [(r.doc_id, r.kind) for r in records] == [
        ("alpha:", "module"),
        ("alpha:helper", "function"),
        ("alpha:helper#2", "function"),
        ("alpha:Widget", "class"),
        ("alpha:Widget.spin", "function"),
        ("alpha:Widget.Part", "class"),
        ("alpha:fetch", "function"),
        ("pkg:", "module"),
        ("pkg.sub:", "module"),
    ]
    first = records[0]
    assert first.body == "Alpha module.\n\nDetails:\n    Indented continuation."
    assert (first.module, first.qualname, first.title, first.source_path) == (
        "alpha",
        "",
        "alpha",
        "alpha.py",
    )
    method = records[4]
    assert (method.module, method.qualname, method.title) == (
        "alpha",
        "Widget.spin",
        "Widget.spin",
    )
    assert records[7].source_path == "pkg/__init__.py"


def test_text_is_valid_utf8_without_nul(fake_stdlib: Path) -> None:
    body = stdlib_docstrings(root=fake_stdlib)[-1].body

    assert "\x00" not in body
    body.encode("utf-8")
    assert body == "Sub\\x00module \\udc80 text."


def test_full_corpus_is_large_with_unique_ids(full_corpus: list[DocRecord]) -> None:
    ids = [r.doc_id for r in full_corpus]

    assert len(full_corpus) > 3000
    assert len(set(ids)) == len(ids)
    assert {r.kind for r in full_corpus} == {"module", "class", "function"}
    assert all(r.body.strip() for r in full_corpus)
    assert not any(
        r.source_path.split("/")[0] in {"test", "idlelib", "tkinter"} for r in full_corpus
    )
    paths = [r.source_path for r in full_corpus]
    assert paths == sorted(paths)


def test_lengths_are_skewed(full_corpus: list[DocRecord]) -> None:
    lengths = sorted(len(r.body) for r in full_corpus)
    median = statistics.median(lengths)
    p99 = lengths[int(0.99 * len(lengths))]

    assert statistics.mean(lengths) > 1.5 * median
    assert p99 > 10 * median
    assert lengths[-1] > 30 * median


def test_limited_sample_is_deterministic_and_in_corpus_order(
    full_corpus: list[DocRecord],
) -> None:
    sample = stdlib_docstrings(limit=300, seed=0)
    position = {r.doc_id: i for i, r in enumerate(full_corpus)}

    assert sample == stdlib_docstrings(limit=300, seed=0)
    assert len(sample) == 300
    assert [position[r.doc_id] for r in sample] == sorted(position[r.doc_id] for r in sample)
    assert sample != stdlib_docstrings(limit=300, seed=1)
    assert stdlib_docstrings(limit=0) == []


def test_negative_limit_is_rejected() -> None:
    with pytest.raises(ConfigError, match="limit"):
        stdlib_docstrings(limit=-1)


def test_arrow_table_matches_records() -> None:
    table = corpus_arrow_table(limit=50, seed=3)
    records = stdlib_docstrings(limit=50, seed=3)

    assert table.schema == CORPUS_SCHEMA
    assert table.column("doc_id").to_pylist() == [r.doc_id for r in records]
    assert table.column("body").to_pylist() == [r.body for r in records]
    assert corpus_arrow_table(limit=0).num_rows == 0
    assert [f.name for f in CORPUS_SCHEMA] == list(DocRecord.__dataclass_fields__)


def test_narrow_length_texts_lie_in_band() -> None:
    texts = narrow_length_texts(500, seed=0)

    assert len(texts) == len(set(texts)) == 500
    assert all(200 <= len(t) <= 240 for t in texts)
    assert texts == narrow_length_texts(500, seed=0)
    assert texts != narrow_length_texts(500, seed=1)
    assert all(100 <= len(t) <= 110 for t in narrow_length_texts(50, min_chars=100, max_chars=110))


def test_narrow_length_texts_rejects_impossible_requests() -> None:
    with pytest.raises(ConfigError, match="fewer"):
        narrow_length_texts(10**7)
    with pytest.raises(ConfigError, match="min_chars"):
        narrow_length_texts(1, min_chars=50, max_chars=10)


def _rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_load_into_duckdb_creates_keyed_table(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "warehouse.duckdb"
    t0 = datetime(2025, 1, 1, tzinfo=UTC)

    assert load_corpus_into_duckdb(db, limit=300, loaded_at=t0) == 300

    (count, distinct, stamp) = _rows(
        db, "SELECT count(*), count(DISTINCT doc_id), max(updated_at) FROM raw_docstrings"
    )[0]
    assert (count, distinct) == (300, 300)
    assert stamp == datetime(2025, 1, 1)
    columns = _rows(
        db,
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE table_name = 'raw_docstrings' ORDER BY column_index",
    )
    assert columns == [(n, "VARCHAR") for n in CORPUS_SCHEMA.names] + [("updated_at", "TIMESTAMP")]
    assert "PRIMARY KEY" in _rows(db, "SELECT sql FROM duckdb_tables()")[0][0]


def test_reload_keeps_updated_at_of_unchanged_rows(tmp_path: Path) -> None:
    db = tmp_path / "warehouse.duckdb"
    t0 = datetime(2025, 1, 1)
    t1 = t0 + timedelta(days=1)
    load_corpus_into_duckdb(db, limit=300, loaded_at=t0)
    con = duckdb.connect(str(db))
    try:
        changed = con.execute("SELECT min(doc_id) FROM raw_docstrings").fetchone()[0]
        con.execute("UPDATE raw_docstrings SET body = 'stale' WHERE doc_id = ?", [changed])
        con.execute(
            "DELETE FROM raw_docstrings WHERE doc_id = (SELECT max(doc_id) FROM raw_docstrings)"
        )
    finally:
        con.close()

    assert load_corpus_into_duckdb(db, limit=300, loaded_at=t1) == 300

    stamps = dict(_rows(db, "SELECT doc_id, updated_at FROM raw_docstrings"))
    (deleted,) = _rows(db, "SELECT max(doc_id) FROM raw_docstrings")[0]
    assert stamps[changed] == t1
    assert stamps[deleted] == t1
    assert sum(s == t0 for s in stamps.values()) == 298


def test_reload_drops_rows_gone_from_corpus(tmp_path: Path) -> None:
    db = tmp_path / "warehouse.duckdb"
    load_corpus_into_duckdb(db, limit=300)

    assert load_corpus_into_duckdb(db, limit=10, seed=5) == 10
    assert {r for (r,) in _rows(db, "SELECT doc_id FROM raw_docstrings")} == {
        r.doc_id for r in stdlib_docstrings(limit=10, seed=5)
    }


def test_failed_load_leaves_previous_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "warehouse.duckdb"
    load_corpus_into_duckdb(db, limit=20)
    before = _rows(db, "SELECT * FROM raw_docstrings ORDER BY doc_id")
    good = corpus_arrow_table(limit=5)
    duplicated = pa.concat_tables([good, good])
    monkeypatch.setattr(corpus, "corpus_arrow_table", lambda limit, seed: duplicated)

    with pytest.raises(duckdb.ConstraintException):
        load_corpus_into_duckdb(db, limit=5)

    assert _rows(db, "SELECT * FROM raw_docstrings ORDER BY doc_id") == before


@pytest.mark.parametrize("name", ["raw; DROP TABLE x", "1abc", "a.b", "", 'a"b'])
def test_unsafe_table_name_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeNameError):
        load_corpus_into_duckdb(tmp_path / "w.duckdb", table=name, limit=1)
    assert not (tmp_path / "w.duckdb").exists()
