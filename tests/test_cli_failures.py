"""`qwen3-pipeline failures` and `replay`, and the refresh's retry flags, through `main()`."""

import json

import pytest

from qwen3_pipeline import cli
from qwen3_pipeline.cli import main
from tests.test_cli import _error_lines, _fake_encoder, _refresh_args, parquet_source  # noqa: F401

POISON_TEXT = "Short: x"


@pytest.fixture
def source(parquet_source):  # noqa: F811  # the fixture of tests.test_cli
    return parquet_source


def _listing(db, capsys, *extra):
    assert main(["failures", "--db", str(db), "--table", "docs", *extra]) == 0
    return capsys.readouterr().out


def test_poison_rows_through_the_cli(tiny_model_dir, monkeypatch, source, tmp_path, capsys):
    _fake_encoder(monkeypatch, [POISON_TEXT])
    db = tmp_path / "db"
    refresh = _refresh_args(tiny_model_dir, source, db, "--max-attempts", "2",
                            "--retry-backoff", "0")  # fmt: skip

    assert main(refresh) == cli.EXIT_FAILED_ROWS
    [error] = _error_lines(capsys.readouterr().err)
    assert "qwen3-pipeline failures" in error
    listed = json.loads(_listing(db, capsys, "--json"))
    [record] = listed["records"]
    assert (record["key"], record["step"], record["attempts"], record["status"]) == (
        "3", "embed", 1, "retrying",
    )  # fmt: skip
    assert listed["counts"] == {"retrying": 1, "quarantined": 0}

    assert main(refresh) == cli.EXIT_FAILED_ROWS  # the second attempt quarantines it
    report = json.loads(capsys.readouterr().out)
    assert (report["retried"], report["failed"], report["quarantined"]) == (1, 1, 1)
    text = _listing(db, capsys)
    assert "1 failure record(s), 1 quarantined" in text
    assert "replay to retry" in text

    # Quarantined: reported, not sent to the model, and not a failure of the run.
    assert main(refresh) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["quarantined"], report["failed"], report["embedded_rows"]) == (1, 0, 0)

    base = ["replay", "--db", str(db), "--table", "docs"]
    assert main([*base, "--key", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == 1
    assert json.loads(_listing(db, capsys, "--json"))["records"][0]["status"] == "retrying"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--key", "404"], "no failure record for key(s) 404"),
        (["failures", "--table", "nope"], "no table 'nope'"),
        (["replay", "--all", "--table", "nope"], "no table 'nope'"),
    ],
)
def test_bad_failure_commands_are_one_error_line(
    args, message, tiny_model_dir, monkeypatch, source, tmp_path, capsys
):
    _fake_encoder(monkeypatch, [POISON_TEXT])
    db = tmp_path / "db"
    main(_refresh_args(tiny_model_dir, source, db))
    capsys.readouterr()
    argv = [args[0], "--db", str(db), *(["--table", "docs"] if "--table" not in args else [])]
    assert main([*argv, *args[1:]]) == cli.EXIT_BAD_INPUT
    [error] = _error_lines(capsys.readouterr().err)
    assert message in error


@pytest.mark.parametrize(
    "args",
    [["replay", "--db", "d", "--table", "t"], ["replay", "--db", "d", "--table", "t", "--all",
     "--key", "1"], ["replay", "--db", "d", "--table", "t", "--step", "nope"]],
)  # fmt: skip
def test_replay_needs_exactly_one_selection(args, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2


@pytest.mark.parametrize(("flag", "value"), [("--max-attempts", "0"), ("--retry-backoff", "-5")])
def test_bad_retry_settings_exit_2_naming_the_setting(
    flag, value, tiny_model_dir, source, tmp_path, capsys
):
    db = tmp_path / "db"
    assert main(_refresh_args(tiny_model_dir, source, db, flag, value)) == cli.EXIT_BAD_INPUT
    [error] = _error_lines(capsys.readouterr().err)
    assert ("max_attempts" if flag == "--max-attempts" else "retry_backoff_s") in error
    assert not db.exists()
