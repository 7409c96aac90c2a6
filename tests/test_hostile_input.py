"""Hostile input through the command line: real data and flag values that used to end as an
"internal error", a transient error, or a silent no-op (issue 17, "Also seen" 8 and 9).

Every case ends with exactly one ``error: ...`` line on stderr and the documented exit status
(2: bad input or configuration, nothing written; 1: transient), or is handled and says so.
"""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline import cli
from qwen3_pipeline.cli import main
from qwen3_pipeline.core.changes import content_hash
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import TEXT_COLUMN
from qwen3_pipeline.engine.options import RefreshOptions
from qwen3_pipeline.sources import SourceConfig, read_batches
from qwen3_pipeline.sources.readers import ArrowSource
from qwen3_pipeline.store.rebuild_lock import rebuild_lock
from tests.refresh_helpers import table_rows, table_version


def _refresh(model: Path, source: Path, db: Path, *extra: str, text: str = "body") -> list[str]:
    return [
        "refresh", "--source", str(source), "--key", "id", "--text", text, "--db", str(db),
        "--table", "docs", "--model", str(model), "--dim", "32", "--device", "cpu", *extra,
    ]  # fmt: skip


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _errors(err)
    return line


@pytest.fixture
def parquet(tmp_path: Path) -> Path:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "body": ["alpha text", "beta text", "gamma"]}), path)
    return path


# --------------------------------------------------------------------------- 8: real input


def test_a_nanosecond_updated_at_is_floored_to_microseconds_and_logged(
    tiny_model_dir, tmp_path, capsys, caplog
):
    nanos = [1_700_000_000_123_456_789, 1_700_000_000_000_000_001, -1_500]
    for tz in (None, "UTC"):
        path = tmp_path / f"ns-{tz}.parquet"
        stamps = pa.array(nanos, pa.timestamp("ns", tz=tz))
        pq.write_table(pa.table({"id": [1, 2, 3], "body": ["a", "b", "c"], "ts": stamps}), path)
        db = tmp_path / f"db-{tz}"
        with caplog.at_level(logging.INFO, logger="qwen3_pipeline.sources.documents"):
            status = main(_refresh(tiny_model_dir, path, db, "--updated-at", "ts"))
        assert status == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["inserted"] == 3
        assert "'ts' holds nanosecond timestamps" in caplog.text
        assert "floored to the microsecond" in caplog.text
        stored = {r["key"]: r["source_updated_at"] for r in table_rows(str(db), "docs").to_pylist()}
        assert stored[1] == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
        assert stored[2] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
        # Floored, not truncated toward zero: 1.5 us before the epoch is 2 us before it.
        assert stored[3] == datetime(1969, 12, 31, 23, 59, 59, 999998, tzinfo=UTC)
        caplog.clear()


def test_a_binary_text_column_is_decoded_like_invalid_utf8_in_strings(
    tiny_model_dir, tmp_path, capsys
):
    raw = [b"ok \xff\xfe bad", "caf\u00e9".encode(), None]
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "body": pa.array(raw, pa.binary())}), path)
    db = tmp_path / "db"
    assert main(_refresh(tiny_model_dir, path, db)) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert (report["inserted"], report["skipped_empty"]) == (2, 1)
    hashes = {r["key"]: r["content_hash"] for r in table_rows(str(db), "docs").to_pylist()}
    assert hashes == {1: content_hash("ok \ufffd\ufffd bad"), 2: content_hash("caf\u00e9")}

    # Every rendering path gives the same text, and the same as a string column holding the
    # same bytes (Arrow strings written without validation).
    as_string = pa.array(raw, pa.binary()).view(pa.string())
    expected = ["ok \ufffd\ufffd bad", "caf\u00e9", ""]
    for data in (pa.array(raw, pa.binary()), pa.array(raw, pa.large_binary()), as_string):
        table = pa.table({"id": [1, 2, 3], "body": data})
        for config in (
            SourceConfig(key="id", text_columns=("body",)),
            SourceConfig(key="id", template="{body}"),
            SourceConfig(key="id", template="{body!s}"),
        ):
            (batch,) = read_batches(ArrowSource(table), config)
            assert batch.column(TEXT_COLUMN).to_pylist() == expected, (data.type, config)


@pytest.mark.parametrize(
    ("column", "text_flags"),
    [
        (pa.array([["a", "b"], ["c"], []]), ["--text", "body"]),
        (pa.array([["a", "b"], ["c"], []]), ["--template", "{body}"]),
        (pa.array([["a", "b"], ["c"], []]), ["--template", "{body!s}"]),
        (pa.array([{"x": 1}, {"x": 2}, {"x": 3}]), ["--text", "body"]),
        (pa.array([[("k", "v")], [], []], pa.map_(pa.string(), pa.string())), ["--text", "body"]),
    ],
)
def test_a_list_struct_or_map_text_column_is_bad_input_naming_it(
    column, text_flags, tiny_model_dir, tmp_path, capsys
):
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "body": column}), path)
    db = tmp_path / "db"
    args = [a for a in _refresh(tiny_model_dir, path, db) if a not in ("--text", "body")]
    assert main([*args, *text_flags]) == 2
    line = _one_error(capsys)
    assert "text column 'body'" in line
    assert f"has type {str(column.type).split('<')[0]}<" in line
    assert table_version(str(db), "docs") is None


# --------------------------------------------------------------------------- 9: flags


def test_db_naming_a_regular_file_is_bad_input(tiny_model_dir, parquet, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a database")
    commands = [
        _refresh(tiny_model_dir, parquet, afile),
        _refresh(tiny_model_dir, parquet, afile, "--dry-run"),
        _refresh(tiny_model_dir, parquet, afile / "db"),
        ["search", "--db", str(afile), "--table", "docs", "--model", str(tiny_model_dir), "q"],
        ["rollback", "--db", str(afile), "--table", "docs"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        line = _one_error(capsys)
        assert str(afile) in line
        assert "transient" not in line
    assert afile.read_text() == "not a database"


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--shards", "0"], "--shards"),
        (["--shards", "-2"], "--shards"),
        (["--engine", "ray", "--workers", "0"], "--workers"),
        (["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--max-batch-tokens", "-5"], "--max-batch-tokens"),
        (["--drift-threshold", "1.5"], "--drift-threshold"),
        (["--drift-threshold", "-3"], "--drift-threshold"),
        (["--drift-threshold", "0"], "--drift-threshold"),
        (["--drift-threshold", "nan"], "--drift-threshold"),
        (["--engine", "ray", "--ray-address", "bogus"], "--ray-address"),
        (["--engine", "ray", "--ray-address", "http://head:8265/x"], "--ray-address"),
    ],
)
def test_flag_values_read_as_something_else_are_refused(
    extra, flag, tiny_model_dir, parquet, tmp_path, capsys
):
    db = tmp_path / "db"
    for dry in ([], ["--dry-run"]):
        assert main(_refresh(tiny_model_dir, parquet, db, *extra, *dry)) == 2
        assert flag in _one_error(capsys)
        assert not db.exists()


def test_embed_refuses_zero_workers_and_batch_tokens(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("one\n")
    base = ["embed", "--model", str(tiny_model_dir), "--input", str(texts)]
    for extra, flag in (
        (["--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["--engine", "ray", "--workers", "0"], "--workers"),
    ):
        assert main([*base, "--output", str(tmp_path / "o.npy"), *extra]) == 2
        assert flag in _one_error(capsys)
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("threshold", [1.5, 1.0000001, 0.0, -3.0, math.nan, True])
def test_refresh_options_refuse_a_drift_threshold_outside_0_1(threshold):
    with pytest.raises(ConfigError, match="drift_threshold"):
        RefreshOptions(drift_threshold=threshold)
    assert RefreshOptions(drift_threshold=1).drift_threshold == 1
    assert RefreshOptions(drift_threshold=0.5).drift_threshold == 0.5


def test_read_only_commands_on_a_missing_db_create_nothing(
    tiny_model_dir, parquet, tmp_path, capsys
):
    db = tmp_path / "missing" / "db"
    query = ["search", "--db", str(db), "--table", "docs", "--model", str(tiny_model_dir), "q"]
    for argv in (query, ["rollback", "--db", str(db), "--table", "docs"]):
        assert main(argv) == 2
        assert "does not exist" in _one_error(capsys)
        assert not db.exists()
        assert not db.parent.exists()
    # A dry run plans the first fill without creating the database.
    assert main(_refresh(tiny_model_dir, parquet, db, "--dry-run")) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["inserted"], plan["table_exists"], plan["table_uri"]) == (3, False, str(db))
    assert not db.exists()


def test_a_ray_connection_failure_is_transient(monkeypatch, parquet, tmp_path, capsys):
    def unreachable(args):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(cli, "run_refresh", unreachable)
    argv = _refresh(Path("m"), parquet, tmp_path / "db", "--engine", "ray", "--ray-address", "auto")
    assert main(argv) == cli.EXIT_INTERNAL == 1
    line = _one_error(capsys)
    assert "Could not find any running Ray instance" in line
    assert "--ray-address" in line
    assert "transient" in line
    assert "internal error" not in line


_BLOCKING_DRIVER = textwrap.dedent(
    """
    import pathlib, sys, time

    import qwen3_pipeline.embedding.lazy as lazy
    from qwen3_pipeline import cli
    from qwen3_pipeline.testing import FakeEmbedder

    marker = pathlib.Path(sys.argv[1])

    class Blocking(FakeEmbedder):
        def __init__(self, spec, options):
            super().__init__(spec)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def embed_documents(self, texts, **kwargs):
            marker.write_text("embedding")
            time.sleep(120)
            raise AssertionError("SIGTERM did not stop the run")

    lazy.LazyEmbedder = Blocking
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def test_sigterm_exits_143_with_one_line_and_removes_the_plan_spill(
    tiny_model_dir, parquet, tmp_path
):
    spill = tmp_path / "tmp"
    spill.mkdir()
    marker = tmp_path / "marker"
    env = {**os.environ, "TMPDIR": str(spill)}
    argv = _refresh(tiny_model_dir, parquet, tmp_path / "db")
    child = subprocess.Popen(
        [sys.executable, "-c", _BLOCKING_DRIVER, str(marker), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the refresh never reached the model"
            time.sleep(0.1)
        assert [p.name for p in spill.glob("qwen3-plan-*")]  # the plan's spill is there
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == cli.EXIT_TERMINATED == 143, err
    assert "Traceback" not in err
    assert _errors(err) == [
        "error: interrupted (SIGTERM); the table is at its last committed version, "
        "re-run to continue"
    ]
    assert out == ""
    assert not list(spill.glob("qwen3-plan-*"))


# --------------------------------------------------------------------------- 9: gate, rebuilds


def test_a_golden_set_whose_keys_are_not_in_the_table_is_refused(
    tiny_model_dir, parquet, tmp_path, capsys
):
    db = tmp_path / "db"
    assert main(_refresh(tiny_model_dir, parquet, db)) == 0
    capsys.readouterr()
    version = table_version(str(db), "docs")
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        json.dumps({"query": "alpha", "relevant": [1]})
        + "\n"
        + json.dumps({"query": "nothing", "relevant": [1000, 1001]})
        + "\n"
    )
    rebuild = _refresh(tiny_model_dir, parquet, db, "--rebuild", "--gate", str(golden))
    rebuild[rebuild.index("--dim") + 1] = "48"
    assert main(rebuild) == 2
    line = _one_error(capsys)
    assert "2 of its 3 relevant key(s)" in line
    assert "1000 (line 2), 1001 (line 2)" in line
    assert table_version(str(db), "docs") == version  # live untouched


def test_a_second_concurrent_rebuild_stops_with_a_transient_conflict(
    tiny_model_dir, parquet, tmp_path, capsys
):
    db = tmp_path / "db"
    assert main(_refresh(tiny_model_dir, parquet, db)) == 0
    capsys.readouterr()
    version = table_version(str(db), "docs")
    rebuild = _refresh(tiny_model_dir, parquet, db, "--rebuild")
    rebuild[rebuild.index("--dim") + 1] = "48"
    with rebuild_lock(str(db), "docs"):  # what a rebuild running in another process holds
        assert main(rebuild) == 1
        line = _one_error(capsys)
        assert "another rebuild of table 'docs'" in line
        assert "transient" in line
    assert table_version(str(db), "docs") == version
    assert main(rebuild) == 0  # once the other one is done
    assert json.loads(capsys.readouterr().out)["inserted"] == 3


def test_sigterm_under_the_ray_engine_exits_143_too(monkeypatch, parquet, tmp_path, capsys):
    def ray_handler_exit(args):
        # What ray.init()'s own SIGTERM handler does: sys.exit(signal.SIGTERM).
        sys.exit(signal.SIGTERM)

    monkeypatch.setattr(cli, "run_refresh", ray_handler_exit)
    argv = _refresh(Path("m"), parquet, tmp_path / "db", "--engine", "ray")
    assert main(argv) == 143
    assert _one_error(capsys).startswith("error: interrupted (SIGTERM)")
    with pytest.raises(SystemExit):  # any other exit is left alone
        main(_refresh(Path("m"), parquet, tmp_path / "db"))
