"""PostgresSource against a real PostgreSQL server (started from Python by ``pgserver``).

One server is started per session in a temporary directory (about 2 s) and each test works on
tables of its own. The server trusts local connections, so the password in the test URL is
never checked: it is there to prove that it never shows up in names, errors or logs.
"""

import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.cli import main
from qwen3_pipeline.core.errors import (
    ConfigError,
    InputDataError,
    SourceReadError,
    SourceUnavailableError,
    TransientError,
)
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import PostgresSource, SourceConfig, parse_source
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests.refresh_helpers import no_drift_guard, spec, table_rows, table_version

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")

ROLE = "reader"
PASSWORD = "hunter2-S3cret"
CONFIG = SourceConfig(key="id", text_columns=("body",), carry=("title",), updated_at="updated_at")
BASE = datetime(2024, 5, 1, 12, tzinfo=UTC)


@dataclass(frozen=True)
class Server:
    admin_uri: str  # the superuser, no password
    socket_dir: str

    def url(self, *, password: str = PASSWORD, options: str = "") -> str:
        """The reader's URL, with a password (the server does not check it)."""
        return f"postgresql://{ROLE}:{password}@/postgres?host={self.socket_dir}{options}"

    @property
    def shown_url(self) -> str:
        return f"postgresql://{ROLE}@/postgres?host={self.socket_dir}"

    def execute(self, statement: str, params: Any = None, *, many: bool = False) -> list[Any]:
        with psycopg.connect(self.admin_uri, autocommit=True) as conn:
            cursor = conn.cursor()
            if many:
                cursor.executemany(statement, params)
                return []
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def terminate_readers(self) -> int:
        rows = self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'qwen3-pipeline' AND pid <> pg_backend_pid()"
        )
        return len(rows)


@pytest.fixture(scope="session")
def pg() -> Iterator[Server]:
    pgserver = pytest.importorskip("pgserver", reason="pgserver is not installed")
    # A directory of its own (not pytest's): pgserver, run as root, hands it to a 'pgserver'
    # system user and makes its parents traversable.
    root = Path(tempfile.mkdtemp(prefix="qwen3-pg-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
            server = pgserver.get_server(root / "data", cleanup_mode="delete")
    except Exception as e:
        shutil.rmtree(root, ignore_errors=True)
        reason = f"pgserver could not start a PostgreSQL server: {type(e).__name__}: {e}"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs the dev extra: a skip there would hide a break
        pytest.skip(reason)
    uri = server.get_uri()
    socket_dir = psycopg.conninfo.conninfo_to_dict(uri)["host"]
    handle = Server(admin_uri=uri, socket_dir=str(socket_dir))
    handle.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
    handle.execute(f"GRANT USAGE ON SCHEMA public TO {ROLE}")
    handle.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {ROLE}")
    try:
        yield handle
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def table(pg: Server) -> Iterator[str]:
    name = f"docs_{uuid.uuid4().hex[:8]}"
    yield name
    pg.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "lancedb")


def create_docs(pg: Server, name: str, rows: list[tuple[Any, ...]], key_type: str = "integer"):
    pg.execute(
        f"CREATE TABLE {name} (id {key_type} PRIMARY KEY, title text, body text, "
        "updated_at timestamptz)"
    )
    insert_docs(pg, name, rows)


def insert_docs(pg: Server, name: str, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        pg.execute(f"INSERT INTO {name} VALUES (%s, %s, %s, %s)", rows, many=True)


def doc_rows(keys: range, version: int = 0) -> list[tuple[Any, ...]]:
    return [
        (k, f"title {k}", f"body of document {k} v{version}", BASE + timedelta(hours=k))
        for k in keys
    ]


def run(db: str, source: Any, *, embedder: FakeEmbedder | None = None, **kwargs: Any) -> Any:
    return refresh(
        source=source,
        config=kwargs.pop("config", CONFIG),
        embedder=embedder or FakeEmbedder(spec()),
        db_uri=db,
        table="docs",
        chunk_rows=kwargs.pop("chunk_rows", 16),
        progress=False,
        **kwargs,
    )


def counts(report: Any) -> dict[str, int]:
    names = ("scanned", "unchanged", "inserted", "updated", "moved", "carry_updated", "deleted")
    names += ("skipped_empty", "embedded_rows")
    return {n: getattr(report, n) for n in names if getattr(report, n)}


def stored(db: str) -> dict[Any, dict[str, Any]]:
    return {row["key"]: row for row in table_rows(db, "docs").to_pylist()}


def assert_holds(db: str, pg: Server, name: str) -> None:
    """The vector table holds exactly the non-blank rows of the PostgreSQL table (int keys)."""
    rows = pg.execute(f"SELECT id, title, body, updated_at FROM {name}")
    want = {k: (t, b, u) for k, t, b, u in rows if b and b.strip()}
    have = stored(db)
    assert sorted(have) == sorted(want)
    for key, (title, body, updated) in want.items():
        row = have[key]
        assert row["title"] == title
        assert row["source_updated_at"] == updated
        np.testing.assert_allclose(row["vector"], fake_vector(body, spec().dim), atol=1e-6)


class Interfering:
    """Delegates to a source, and runs ``action`` after the first batch of each read."""

    def __init__(self, inner: PostgresSource, action: Any) -> None:
        self.inner, self.action, self.fired = inner, action, 0

    @property
    def name(self) -> str:
        return self.inner.name

    def schema(self) -> pa.Schema:
        return self.inner.schema()

    def key_problems(self, key: str, limit: int) -> Any:
        return self.inner.key_problems(key, limit)

    def batches(self, columns: Any, batch_rows: int) -> Iterator[pa.RecordBatch]:
        batches = self.inner.batches(columns, batch_rows)
        yield next(batches)
        self.action()
        self.fired += 1
        yield from batches


# --------------------------------------------------------------------------- forms and names


def test_name_url_and_repr_never_show_the_password():
    cases = {
        "postgresql://u:pw-Secret@db.example:5433/app": "postgresql://u@db.example:5433/app",
        "postgres://u:p%40ss%3Aw0rd@db.example/app": "postgresql://u@db.example/app",
        "postgresql://u@db.example/app?password=pw-Secret&sslmode=require": (
            "postgresql://u@db.example/app"
        ),
        "host=db.example port=5433 dbname=app user=u password=pw-Secret": (
            "postgresql://u@db.example:5433/app"
        ),
        "postgresql://u:pw-Secret@[::1]:5433/app": "postgresql://u@[::1]:5433/app",
    }
    for url, shown in cases.items():
        source = PostgresSource(url, "public.docs")
        assert source.url == shown
        assert source.name == f"{shown}::public.docs"
        for text in (source.name, repr(source), str(vars(source).get("_params"))):
            assert "pw-Secret" not in text
            assert "p@ss:w0rd" not in text
            assert "p%40ss" not in text


def test_parse_source_postgres_forms(monkeypatch):
    source = parse_source("postgresql://u:pw-Secret@db.example:5433/app::public.docs")
    assert isinstance(source, PostgresSource)
    assert source.table_or_query == "public.docs"
    assert source.name == "postgresql://u@db.example:5433/app::public.docs"
    # Only the first "::" outside [...] splits: IPv6 hosts and casts in queries are intact.
    query = parse_source("postgres://u@[::1]/app::SELECT id::text AS id, body FROM docs")
    assert query.url == "postgresql://u@[::1]/app"
    assert query.table_or_query == "SELECT id::text AS id, body FROM docs"

    with pytest.raises(ConfigError, match="::TABLE_OR_QUERY") as missing:
        parse_source("postgresql://u:pw-Secret@db.example/app")
    assert "pw-Secret" not in str(missing.value)
    with pytest.raises(ConfigError) as garbled:
        parse_source("postgresql://u:pw-Secret@db.example/app?bogus=1::docs")
    assert "pw-Secret" not in str(garbled.value)

    monkeypatch.setenv("QWEN3_TEST_PG_URL", "postgresql://u:pw-Secret@db.example/app")
    from_env = parse_source("env:QWEN3_TEST_PG_URL::public.docs")
    assert isinstance(from_env, PostgresSource)
    assert from_env.name == "postgresql://u@db.example/app::public.docs"
    monkeypatch.delenv("QWEN3_TEST_PG_URL")
    with pytest.raises(ConfigError, match="QWEN3_TEST_PG_URL is not set"):
        parse_source("env:QWEN3_TEST_PG_URL::public.docs")
    for bad in ("env:QWEN3_TEST_PG_URL", "env:::docs", "env:NOT A NAME::docs"):
        with pytest.raises(ConfigError, match=r"env:VAR::TABLE_OR_QUERY"):
            parse_source(bad)
    with pytest.raises(ConfigError, match="empty"):
        PostgresSource("postgresql://u@db.example/app", "  ")


# --------------------------------------------------------------------------- types


def test_schema_and_values_map_postgres_types_to_arrow(pg, table):
    pg.execute(
        f"CREATE TABLE {table} (id bigint, u uuid, small smallint, n integer, ok boolean, "
        "f real, d double precision, price numeric(10, 2), ratio numeric, day date, "
        "clock time, at timestamp, at_tz timestamptz, doc jsonb, tags text[], ids int8[], "
        "scores float8[], "
        "code char(3), v varchar(10), raw bytea, mood text)"
    )
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    pg.execute(
        f"INSERT INTO {table} VALUES (5000000000, %s, 1, 2, true, 1.5, 2.25, 12.34, "
        "1.000000000000000000001, '2024-05-01', '10:30', '2024-05-01 10:00', "
        "'2024-05-01 10:00+02', '{\"a\": 1}', '{x,NULL}', '{1,2}', '{0.5}', 'ab', 'v', '\\x0001', "
        "NULL)",
        (key,),
    )
    # A session in another time zone reads the same instants.
    source = PostgresSource(pg.url(options="&options=-c%20TimeZone%3DAsia/Tokyo"), table)
    schema = source.schema()
    assert dict(zip(schema.names, schema.types, strict=True)) == {
        "id": pa.int64(),
        "u": pa.string(),
        "small": pa.int16(),
        "n": pa.int32(),
        "ok": pa.bool_(),
        "f": pa.float32(),
        "d": pa.float64(),
        "price": pa.decimal128(10, 2),
        "ratio": pa.string(),  # unconstrained numeric: exact text
        "day": pa.date32(),
        "clock": pa.time64("us"),
        "at": pa.timestamp("us"),
        "at_tz": pa.timestamp("us", tz="UTC"),
        "doc": pa.string(),
        "tags": pa.list_(pa.string()),
        "ids": pa.list_(pa.int64()),
        "scores": pa.list_(pa.float64()),
        "code": pa.string(),
        "v": pa.string(),
        "raw": pa.binary(),
        "mood": pa.string(),
    }
    (batch,) = source.batches(schema.names, 10)
    assert batch.schema == schema
    row = batch.to_pylist()[0]
    assert row["u"] == str(key)
    assert row["price"] == Decimal("12.34")
    assert row["ratio"] == "1.000000000000000000001"
    assert row["at"] == datetime(2024, 5, 1, 10)
    assert batch.column("at_tz")[0].as_py() == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert row["doc"] == '{"a": 1}'
    assert row["tags"] == ["x", None]
    assert row["raw"] == b"\x00\x01"
    assert row["mood"] is None
    assert row["clock"] == time(10, 30)
    assert row["ids"] == [1, 2]
    # A value Python cannot hold is a clear, permanent error.
    pg.execute(f"UPDATE {table} SET at_tz = 'infinity'")
    with pytest.raises(SourceReadError, match=r"cannot be read.*Cast or filter"):
        list(source.batches(["id", "at_tz"], 10))


@pytest.mark.parametrize("key_type", ["integer", "bigint", "uuid", "text"])
def test_refresh_with_each_key_type_and_timestamptz(pg, table, db, key_type):
    keys: list[Any] = {
        "integer": list(range(20)),
        "bigint": [5_000_000_000 + i for i in range(20)],
        "uuid": [uuid.UUID(int=i + 1) for i in range(20)],
        "text": [f"doc-{i:02d}" for i in range(20)],
    }[key_type]
    cest = timezone(timedelta(hours=2))
    rows = [
        (k, f"title {i}", f"body {i}", datetime(2024, 5, 1, i, tzinfo=cest))
        for i, k in enumerate(keys)
    ]
    create_docs(pg, table, rows, key_type)
    report = run(db, PostgresSource(pg.url(), f"public.{table}"))
    assert counts(report) == {"scanned": 20, "inserted": 20, "embedded_rows": 20}
    data = table_rows(db, "docs")
    want_type = pa.int64() if key_type in ("integer", "bigint") else pa.string()
    assert data.schema.field("key").type == want_type
    have = {r["key"]: r for r in data.to_pylist()}
    for key, _, body, updated in rows:
        row = have[str(key) if key_type == "uuid" else key]
        assert row["source_updated_at"] == updated.astimezone(UTC)
        np.testing.assert_allclose(row["vector"], fake_vector(body, spec().dim), atol=1e-6)


def test_null_and_blank_text_rows_are_skipped_empty(pg, table, db):
    rows = doc_rows(range(10))
    rows[2] = (2, "t", None, BASE)
    rows[5] = (5, "t", "   ", BASE)
    create_docs(pg, table, rows)
    report = run(db, PostgresSource(pg.url(), table))
    assert counts(report) == {
        "scanned": 10,
        "skipped_empty": 2,
        "inserted": 8,
        "embedded_rows": 8,
    }
    assert sorted(stored(db)) == [0, 1, 3, 4, 6, 7, 8, 9]
    pg.execute(f"UPDATE {table} SET body = NULL WHERE id = 7")
    again = run(db, PostgresSource(pg.url(), table))
    assert counts(again) == {"scanned": 10, "skipped_empty": 3, "unchanged": 7, "deleted": 1}
    assert_holds(db, pg, table)


# --------------------------------------------------------------------------- the refresh cycle


def test_fill_noop_edit_delete_cycle_with_exact_counts(pg, table, db):
    create_docs(pg, table, doc_rows(range(100)))
    source = PostgresSource(pg.url(), f"public.{table}")
    first = run(db, source)
    assert counts(first) == {"scanned": 100, "inserted": 100, "embedded_rows": 100}
    assert first.committed
    assert_holds(db, pg, table)
    assert {r["source"] for r in stored(db).values()} == {source.name}
    assert PASSWORD not in source.name

    embedder = FakeEmbedder(spec())
    noop = run(db, source, embedder=embedder)
    assert counts(noop) == {"scanned": 100, "unchanged": 100}
    assert embedder.calls == []
    assert not noop.committed
    assert table_version(db, "docs") == first.version_after

    pg.execute(f"UPDATE {table} SET body = body || ' edited' WHERE id < 7")
    pg.execute(f"UPDATE {table} SET title = 'retitled' WHERE id BETWEEN 50 AND 52")
    pg.execute(f"DELETE FROM {table} WHERE id >= 95")
    insert_docs(pg, table, doc_rows(range(200, 204)))
    embedder = FakeEmbedder(spec())
    changed = run(db, source, embedder=embedder, drift_guard=no_drift_guard)
    assert counts(changed) == {
        "scanned": 99,
        "unchanged": 85,
        "updated": 7,
        "carry_updated": 3,
        "inserted": 4,
        "deleted": 5,
        "embedded_rows": 11,
    }
    assert sum(embedder.calls) == 11
    assert_holds(db, pg, table)
    assert not run(db, source).committed


def test_a_query_source_refreshes_like_a_table(pg, table, db):
    create_docs(pg, table, doc_rows(range(30)))
    query = (
        f"SELECT id::text AS id, title, title || ': ' || body AS doc, updated_at "
        f"FROM {table} WHERE id % 3 <> 0"
    )
    config = SourceConfig(key="id", text_columns=("doc",), carry=("title",))
    report = run(db, parse_source(f"{pg.url()}::{query}"), config=config)
    assert counts(report) == {"scanned": 20, "inserted": 20, "embedded_rows": 20}
    assert sorted(stored(db)) == sorted(str(i) for i in range(30) if i % 3)


# --------------------------------------------------------------------------- one snapshot


def test_a_read_sees_one_snapshot_while_the_table_changes(pg, table):
    create_docs(pg, table, doc_rows(range(100)))
    source = PostgresSource(pg.url(), table)
    batches = source.batches(["id", "body"], 10)
    seen = [next(batches) for _ in range(5)]
    pg.execute(f"UPDATE {table} SET body = 'changed'")
    pg.execute(f"DELETE FROM {table} WHERE id < 80")
    insert_docs(pg, table, doc_rows(range(500, 520)))
    seen += list(batches)
    read = pa.Table.from_batches(seen)
    assert sorted(read.column("id").to_pylist()) == list(range(100))
    assert "changed" not in read.column("body").to_pylist()
    # The next read is a new snapshot.
    fresh = pa.Table.from_batches(list(source.batches(["id", "body"], 10)))
    assert sorted(fresh.column("id").to_pylist()) == [*range(80, 100), *range(500, 520)]
    bodies = dict(
        zip(fresh.column("id").to_pylist(), fresh.column("body").to_pylist(), strict=True)
    )
    assert {bodies[k] for k in range(80, 100)} == {"changed"}


def test_refresh_plans_from_the_snapshot_it_started_reading(pg, table, db):
    create_docs(pg, table, doc_rows(range(64)))
    run(db, PostgresSource(pg.url(), table))

    def change() -> None:
        pg.execute(f"UPDATE {table} SET body = 'changed' WHERE id < 40")
        pg.execute(f"DELETE FROM {table} WHERE id >= 60")

    source = Interfering(PostgresSource(pg.url(), table), change)
    during = run(db, source)
    assert source.fired == 1
    assert counts(during) == {"scanned": 64, "unchanged": 64}
    assert not during.committed
    after = run(db, PostgresSource(pg.url(), table))
    assert counts(after) == {
        "scanned": 60,
        "unchanged": 20,
        "updated": 40,
        "deleted": 4,
        "embedded_rows": 40,
    }
    assert_holds(db, pg, table)


def test_a_column_type_changed_after_the_schema_was_read_is_transient(pg, table):
    create_docs(pg, table, doc_rows(range(3)))
    source = PostgresSource(pg.url(), table)
    source.schema()
    pg.execute(f"ALTER TABLE {table} ALTER COLUMN id TYPE text")
    with pytest.raises(SourceUnavailableError, match=r"id \(int32 -> string\)"):
        list(source.batches(["id", "body"], 10))


# --------------------------------------------------------------------------- failures


def test_a_connection_killed_mid_read_is_transient_and_writes_nothing(pg, table, db, caplog):
    caplog.set_level(logging.DEBUG)
    create_docs(pg, table, doc_rows(range(64)))
    run(db, PostgresSource(pg.url(), table))
    before_version, before = table_version(db, "docs"), stored(db)

    reader = PostgresSource(pg.url(), table).batches(["id"], 8)
    next(reader)
    assert pg.terminate_readers() == 1
    with pytest.raises(SourceUnavailableError, match="unavailable") as direct:
        list(reader)
    assert pg.shown_url in str(direct.value)
    assert PASSWORD not in str(direct.value)

    pg.execute(f"UPDATE {table} SET body = 'changed' WHERE id < 10")
    pg.execute(f"DELETE FROM {table} WHERE id >= 50")
    killing = Interfering(PostgresSource(pg.url(), table), pg.terminate_readers)
    with pytest.raises(SourceUnavailableError) as killed:
        run(db, killing)
    assert isinstance(killed.value, TransientError)
    assert killing.fired == 1
    assert PASSWORD not in str(killed.value)
    assert table_version(db, "docs") == before_version
    assert stored(db) == before
    # The retry converges.
    retry = run(db, PostgresSource(pg.url(), table))
    assert counts(retry) == {
        "scanned": 50,
        "unchanged": 40,
        "updated": 10,
        "deleted": 14,
        "embedded_rows": 10,
    }
    assert_holds(db, pg, table)
    assert PASSWORD not in caplog.text


def test_connection_failures_are_typed_and_never_show_the_password(pg, table):
    refused = PostgresSource(f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:1/appdb", "docs")
    with pytest.raises(SourceUnavailableError) as error:
        refused.schema()
    message = str(error.value)
    assert "postgresql://reader@127.0.0.1:1/appdb" in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(error.value.__cause__)

    no_database = PostgresSource(pg.url().replace("/postgres?", "/nosuchdb?"), table)
    with pytest.raises(ConfigError, match='"nosuchdb" does not exist') as error:
        no_database.schema()
    assert PASSWORD not in str(error.value)


def test_missing_table_column_and_bad_query_name_what_is_wrong(pg, table, db):
    create_docs(pg, table, doc_rows(range(3)))
    with pytest.raises(SourceReadError, match=f"'public.nope' not found.*public.{table}") as e:
        PostgresSource(pg.url(), "public.nope").schema()
    assert PASSWORD not in str(e.value)
    with pytest.raises(InputDataError, match=r"\['summary'\] not found"):
        run(
            db,
            PostgresSource(pg.url(), table),
            config=SourceConfig(key="id", text_columns=("summary",)),
        )
    with pytest.raises(SourceReadError, match=r"\['summary'\] not found"):
        list(PostgresSource(pg.url(), table).batches(["id", "summary"], 10))
    with pytest.raises(SourceReadError, match='column "bodyy" does not exist'):
        PostgresSource(pg.url(), f"SELECT id, bodyy FROM {table}").schema()
    with pytest.raises(SourceReadError, match=r"\['id'\] more than once"):
        PostgresSource(pg.url(), f"SELECT id, id FROM {table}").schema()
    pg.execute(f"INSERT INTO {table} SELECT id + 100, title, body, updated_at FROM {table}")
    dupes = f"SELECT id % 100 AS id, body FROM {table}"
    with pytest.raises(InputDataError, match="duplicate keys"):
        run(
            db,
            PostgresSource(pg.url(), dupes),
            config=SourceConfig(key="id", text_columns=("body",)),
        )
    assert table_version(db, "docs") is None


# --------------------------------------------------------------------------- command line


def test_cli_refresh_from_postgres_end_to_end(
    pg, table, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    create_docs(pg, table, doc_rows(range(12)))
    monkeypatch.setenv("QWEN3_TEST_PG_URL", pg.url())
    lancedb_dir = tmp_path / "lancedb"

    def args(source: str) -> list[str]:
        return [
            "refresh", "--source", source, "--key", "id", "--text", "body", "--carry", "title",
            "--updated-at", "updated_at", "--db", str(lancedb_dir), "--table", "docs",
            "--model", str(tiny_model_dir), "--dim", "32", "--device", "cpu",
        ]  # fmt: skip

    assert main(args(f"env:QWEN3_TEST_PG_URL::public.{table}")) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out)
    assert first["inserted"] == 12
    assert PASSWORD not in captured.out + captured.err
    rows = table_rows(str(lancedb_dir), "docs").to_pylist()
    assert {r["source"] for r in rows} == {f"{pg.shown_url}::public.{table}"}

    pg.execute(f"UPDATE {table} SET body = 'rewritten' WHERE id = 3")
    assert main(args(f"{pg.url()}::{table}")) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    assert (second["updated"], second["unchanged"], second["embedded_rows"]) == (1, 11, 1)
    assert PASSWORD not in captured.out + captured.err

    refused = f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:1/appdb::docs"
    assert main(args(refused)) == 1
    captured = capsys.readouterr()
    assert "unavailable" in captured.err
    assert "transient" in captured.err
    assert PASSWORD not in captured.out + captured.err


# --------------------------------------------------------------------------- hostile forms

SECRET = "hunter2-S3cret"


def _cli_refresh(source: str, model: Path, db: Path) -> list[str]:
    return [
        "refresh", "--source", source, "--key", "id", "--text", "body", "--db", str(db),
        "--table", "docs", "--model", str(model), "--dim", "32", "--device", "cpu",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("form", "source", "env", "expected"),
    [
        ("slash in password", f"postgresql://reader:ab/{SECRET}@127.0.0.1:1/app::docs", None,
         "%2F"),
        ("@ in password", f"postgresql://reader:ab@{SECRET}@127.0.0.1:1/app::docs", None, "%40"),
        ("env, slash in password", "env:QWEN3_TEST_BAD_URL::docs",
         f"postgresql://reader:ab/{SECRET}@127.0.0.1:1/app", "%2F"),
        ("env, @ in password", "env:QWEN3_TEST_BAD_URL::docs",
         f"postgres://reader:{SECRET}@x@127.0.0.1:1/app", "%40"),
        ("SQLAlchemy URL", f"postgresql+psycopg://reader:{SECRET}@127.0.0.1:1/app::docs", None,
         "SQLAlchemy"),
        ("env, SQLAlchemy URL", "env:QWEN3_TEST_BAD_URL::docs",
         f"postgresql+asyncpg://reader:{SECRET}@127.0.0.1:1/app", "SQLAlchemy"),
        ("leading space, other scheme", f" pg://reader:{SECRET}@127.0.0.1:1/app::docs", None,
         "not a PostgreSQL URL scheme"),
        ("pg://", f"pg://reader:{SECRET}@127.0.0.1:1/app::docs", None,
         "not a PostgreSQL URL scheme"),
        ("one slash", f"postgresql:/reader:{SECRET}@127.0.0.1:1/app::docs", None,
         "two slashes"),
        ("space in password", f"postgresql://reader:ab {SECRET}@127.0.0.1:1/app::docs", None,
         "%20"),
        ("libpq key=value", f"host=127.0.0.1 port=1 user=reader password={SECRET} dbname=app::docs",
         None, "key=value"),
        ("JDBC URL", f"jdbc:postgresql://127.0.0.1:1/app?user=reader&password={SECRET}::docs",
         None, "JDBC"),
        ("no table", f"postgresql://reader:{SECRET}@127.0.0.1:1/app", None, "::TABLE_OR_QUERY"),
        ("env, unparsable key=value", "env:QWEN3_TEST_BAD_URL::docs",
         f"host=127.0.0.1 password={SECRET} {SECRET}-tail", "could not parse"),
        ("Parquet path", f"parquet:/nowhere/password={SECRET}/docs.parquet", None,
         "does not exist"),
    ],
)  # fmt: skip
def test_no_source_form_prints_its_password(
    form, source, env, expected, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    if env is not None:
        monkeypatch.setenv("QWEN3_TEST_BAD_URL", env)
    db = tmp_path / "lancedb"
    status = main(_cli_refresh(source, tiny_model_dir, db))
    out, err = capsys.readouterr()
    assert status == 2, err
    assert SECRET not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert expected in errors[0]
    assert "Traceback" not in err
    assert not db.exists()  # refused before anything was created


def test_the_scrubber_hides_passwords_of_every_form():
    from qwen3_pipeline.core.errors import failure_message, redact_secrets

    texts = [
        f"postgresql://reader:{SECRET}@db:5432/app",
        f"postgresql://reader:ab/{SECRET}@db:5432/app",
        f"postgresql://reader:ab@{SECRET}@db:5432/app",
        f"postgresql+psycopg://reader:{SECRET}@db/app",
        f"host=db password={SECRET} dbname=app",
        f"host=db password='{SECRET} with spaces' dbname=app",
        f"jdbc:postgresql://db/app?user=reader&password={SECRET}&ssl=true",
        f"PGPASSWORD={SECRET} psql",
    ]
    for text in texts:
        assert SECRET not in redact_secrets(text), text
        assert SECRET not in failure_message(RuntimeError(text))
        assert SECRET not in failure_message(ConfigError(text))
    assert redact_secrets("postgresql://reader@db:5432/app::docs") == (
        "postgresql://reader@db:5432/app::docs"
    )


def test_a_source_spec_with_surrounding_spaces_is_read(pg, table, tiny_model_dir, tmp_path, capsys):
    create_docs(pg, table, doc_rows(range(3)))
    db = tmp_path / "lancedb"
    assert main(_cli_refresh(f"  {pg.url()}::{table} ", tiny_model_dir, db)) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["inserted"] == 3
    assert PASSWORD not in captured.out + captured.err


def test_a_watermark_read_is_a_where_on_the_server(pg, table, db):
    from dataclasses import replace

    from qwen3_pipeline.sources import Watermark

    create_docs(pg, table, doc_rows(range(40)))
    config = replace(CONFIG, watermark=Watermark())
    source = PostgresSource(pg.url(), table)
    first = run(db, source, config=config)
    assert (first.read_rows, first.inserted) == (40, 40)
    assert run(db, source, config=config).read_rows == 0
    pg.execute(f"UPDATE {table} SET body = body || ' edited', updated_at = %s WHERE id < 3",
               [BASE + timedelta(days=30)])  # fmt: skip
    pg.execute(f"DELETE FROM {table} WHERE id = 39")
    changed = run(db, source, config=config)
    assert (changed.read_rows, changed.updated, changed.deleted) == (3, 3, 1)
    assert changed.keys_scanned == 39
    assert_holds(db, pg, table)
