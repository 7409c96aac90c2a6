import errno
import json
import subprocess
import sys

import numpy as np
import pytest

from qwen3_pipeline import cli
from qwen3_pipeline.cli import main, read_texts
from qwen3_pipeline.testing import FakeEmbedder

TEXTS = ["The capital of China is Beijing.", "Gravity attracts bodies.", "short"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_embed_text_file_writes_vectors_in_order_and_prints_stats(
    tiny_model_dir, text_file, tmp_path, capsys
):
    out = tmp_path / "out.npy"
    status = main(
        [
            "embed",
            "--model",
            str(tiny_model_dir),
            "--dim",
            "32",
            "--device",
            "cpu",
            "--input",
            str(text_file),
            "--output",
            str(out),
        ]
    )
    assert status == 0
    stats = json.loads(capsys.readouterr().out)
    vectors = np.load(out)
    assert vectors.shape == (3, 32)
    assert vectors.dtype == np.float32
    assert stats["rows"] == 3
    assert stats["dim"] == 32
    assert stats["kind"] == "documents"
    assert 0 < stats["padding_efficiency"] <= 1
    assert stats["truncated_rows"] == 0
    assert stats["failed_rows"] == 0
    single = tmp_path / "single.npy"
    (tmp_path / "one.txt").write_text(TEXTS[2])
    main(
        [
            "embed",
            "--model",
            str(tiny_model_dir),
            "--dim",
            "32",
            "--device",
            "cpu",
            "--input",
            str(tmp_path / "one.txt"),
            "--output",
            str(single),
        ]
    )
    assert float(np.load(single)[0] @ vectors[2]) > 0.99999


def test_embed_jsonl_queries(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "q.jsonl"
    source.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    out = tmp_path / "q.npy"
    status = main(
        [
            "embed",
            "--model",
            str(tiny_model_dir),
            "--query",
            "--task",
            "Find facts",
            "--input",
            str(source),
            "--output",
            str(out),
        ]
    )
    assert status == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "queries"
    assert np.load(out).shape == (3, 64)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_file", "does not exist"),
        ("empty_file", "has no texts"),
        ("bad_dim", "dim=16 is invalid"),
        ("unknown_model", "does not exist"),
        ("bad_jsonl", "invalid JSON"),
        ("bad_output", "must end in .npy"),
    ],
)
def test_bad_input_is_one_line_error_and_nothing_written(
    case, message, tiny_model_dir, text_file, tmp_path, capsys
):
    model, dim, source, out = str(tiny_model_dir), "32", text_file, tmp_path / "out.npy"
    if case == "missing_file":
        source = tmp_path / "nope.txt"
    elif case == "empty_file":
        source = tmp_path / "empty.txt"
        source.write_text("")
    elif case == "bad_dim":
        dim = "16"
    elif case == "unknown_model":
        model = str(tmp_path / "no-such-model")
    elif case == "bad_jsonl":
        source = tmp_path / "bad.jsonl"
        source.write_text('{"text": "ok"}\n{not json\n')
    elif case == "bad_output":
        out = tmp_path / "out.txt"
    status = main(
        ["embed", "--model", model, "--dim", dim, "--input", str(source), "--output", str(out)]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert message in error_lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_console_script_runs_as_a_process(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen3_pipeline.cli",
            "embed",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(text_file),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 3
    assert np.load(out).shape == (3, 64)


@pytest.fixture
def parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [1, 2, 3],
                "title": ["Beijing", "Gravity", "Short"],
                "body": ["The capital of China is Beijing.", "Gravity attracts bodies.", "x"],
            }
        ),
        path,
    )
    return path


def _refresh_args(model, source, db, *extra):
    return [
        "refresh", "--source", str(source), "--key", "id", "--template", "{title}: {body}",
        "--carry", "title", "--db", str(db), "--table", "docs", "--model", str(model),
        "--dim", "32", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_refresh_then_search_through_the_cli(tiny_model_dir, parquet_source, tmp_path, capsys):
    db = tmp_path / "lancedb"
    assert main(_refresh_args(tiny_model_dir, parquet_source, db)) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["inserted"] == 3
    assert first["committed"] is True
    assert main(_refresh_args(tiny_model_dir, parquet_source, db)) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["embedded_rows"] == 0
    assert second["committed"] is False
    assert second["version_after"] == second["version_before"]

    query = ["search", "--db", str(db), "--table", "docs", "--model", str(tiny_model_dir)]
    assert main([*query, "-k", "2", "capital of China"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["results"]) == 2
    assert {"key", "similarity", "title"} <= set(found["results"][0])
    assert found["results"][0]["similarity"] >= found["results"][1]["similarity"]

    assert main([*query, "--dim", "64", "capital"]) == 2
    assert "dim=32" in capsys.readouterr().err


def test_refresh_with_changed_spec_refuses_then_rebuilds(
    tiny_model_dir, parquet_source, tmp_path, capsys
):
    db = tmp_path / "lancedb"
    assert main(_refresh_args(tiny_model_dir, parquet_source, db)) == 0
    capsys.readouterr()
    changed = _refresh_args(tiny_model_dir, parquet_source, db)
    changed[changed.index("--dim") + 1] = "48"
    assert main(changed) == 2
    assert "--rebuild" in capsys.readouterr().err
    assert main([*changed, "--rebuild"]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt["inserted"] == 3


@pytest.mark.parametrize("shard", ["3", "4/4", "a/b", "2/0"])
def test_bad_shard_is_a_clear_error(tiny_model_dir, parquet_source, tmp_path, capsys, shard):
    args = _refresh_args(tiny_model_dir, parquet_source, tmp_path / "db", "--shard", shard)
    assert main(args) == 2
    assert "--shard" in capsys.readouterr().err


# --------------------------------------------------------------------------- embed input rules


def _embed_args(model, source, out, *extra):
    return [
        "embed", "--model", str(model), "--dim", "32", "--device", "cpu",
        "--input", str(source), "--output", str(out), *extra,
    ]  # fmt: skip


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_embed_gives_one_vector_per_newline_terminated_line(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "odd.txt"
    source.write_bytes(
        "page one\fpage two\npara\u2028graph\u2029end\nnext\x85line\x1erecord\x1cfile\n".encode()
        + b"bad \xff byte\xe2\x82 end\r\n"
    )
    expected = [
        "page one\fpage two",
        "para\u2028graph\u2029end",
        "next\x85line\x1erecord\x1cfile",
        "bad \ufffd byte\ufffd end",
    ]
    assert read_texts(source) == expected
    out = tmp_path / "new" / "dir" / "out.npy"
    assert main(_embed_args(tiny_model_dir, source, out)) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 4
    reference = tmp_path / "reference.jsonl"
    reference.write_text("\n".join(json.dumps({"text": t}) for t in expected))
    assert main(_embed_args(tiny_model_dir, reference, tmp_path / "reference.npy")) == 0
    np.testing.assert_allclose(np.load(out), np.load(tmp_path / "reference.npy"), atol=1e-6)


def test_invalid_utf8_and_nul_are_sanitised_like_the_refresh(tmp_path):
    import pyarrow as pa

    from qwen3_pipeline.core.changes import sanitize_texts

    raw = [b"a\x00b\xe2\x82", b"\xc3\x28x", b"\xef\xbb\xbfnot a bom here", b"ok"]
    source = tmp_path / "raw.txt"
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw) + b"\n")
    refreshed = sanitize_texts(pa.array(raw, pa.binary()).view(pa.string())).to_pylist()
    assert read_texts(source) == refreshed
    assert read_texts(source)[0] == "ab\ufffd"


def test_jsonl_ignores_blank_lines_and_sanitises_escapes(tmp_path):
    source = tmp_path / "t.jsonl"
    source.write_text('{"text": "a"}\n\n   \n{"text": "b\\u0000c\\ud800"}\r\n')
    assert read_texts(source) == ["a", "bc\ufffd"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("gap.txt", "a\n\nb\n", "line(s) 2:"),
        ("spaces.txt", "a\n \t\nb\r\n\r\nc", "line(s) 2, 4:"),
        ("separators.txt", "a\n\f\u2028\x1e\x85\n", "line(s) 2:"),
        ("nul.txt", "a\n\x00\n", "line(s) 2:"),
        ("trailing.txt", "a\nb\n\n", "line(s) 3:"),
        ("many.txt", "a" + "\n" * 13 + "b", "line(s) 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 (+2 more):"),
        ("blank.jsonl", '{"text": "a"}\n\n{"text": " "}\n', "line(s) 3:"),
        ("only_blank.txt", "\n\n", "line(s) 1, 2:"),
        ("only_blank.jsonl", "\n \n", "has no texts"),
    ],
)
def test_blank_texts_are_rejected_naming_their_lines(name, content, message, tmp_path, capsys):
    source = tmp_path / name
    source.write_text(content, encoding="utf-8", newline="")
    out = tmp_path / "out.npy"
    # The model path does not exist: the input is rejected before the model is looked at.
    assert main(_embed_args(tmp_path / "no-model", source, out)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [error] = _error_lines(captured.err)
    assert message in error
    assert not out.exists()


@pytest.fixture
def no_encoder(monkeypatch):
    """Make any attempt to build the real encoder fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("qwen3_pipeline.embedding.encoder.Qwen3Encoder", refuse)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("directory", "is a directory"),
        ("parent_is_a_file", "is not a directory"),
        ("not_writable", "Permission denied"),
    ],
)
def test_bad_output_path_fails_before_the_input_or_model_is_read(
    case, message, no_encoder, monkeypatch, tmp_path, capsys
):
    out = tmp_path / "out.npy"
    if case == "directory":
        out.mkdir()
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "out.npy"
    else:
        # Root may write anywhere, so a read-only mode cannot be tested portably: refuse the
        # probe file the way a read-only directory would.
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    # The input does not exist either: the output error coming first shows the order.
    status = main(_embed_args("no-model", tmp_path / "missing.txt", out))
    captured = capsys.readouterr()
    assert status == 2
    [error] = _error_lines(captured.err)
    assert "--output" in error
    assert message in error
    assert out.is_dir() if case == "directory" else not out.exists()
    assert not list(tmp_path.rglob("*.partial"))


def _fake_encoder(monkeypatch, fail_texts):
    monkeypatch.setattr(
        "qwen3_pipeline.embedding.encoder.Qwen3Encoder",
        lambda spec, **_: FakeEmbedder(spec, fail_texts=fail_texts),
    )


def test_embed_with_a_failed_row_exits_1_and_writes_nothing(
    tiny_model_dir, monkeypatch, text_file, tmp_path, capsys
):
    _fake_encoder(monkeypatch, [TEXTS[2]])
    out = tmp_path / "out.npy"
    status = main(_embed_args(tiny_model_dir, text_file, out))
    captured = capsys.readouterr()
    assert status == cli.EXIT_FAILED_ROWS == 1
    assert captured.out == ""
    [error] = _error_lines(captured.err)
    assert "1 row(s) could not be embedded (line 3: fake failure)" in error
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_refresh_with_failed_rows_prints_the_report_and_exits_1(
    tiny_model_dir, monkeypatch, parquet_source, tmp_path, capsys
):
    _fake_encoder(monkeypatch, ["Short: x"])
    status = main(_refresh_args(tiny_model_dir, parquet_source, tmp_path / "db"))
    captured = capsys.readouterr()
    assert status == cli.EXIT_FAILED_ROWS
    report = json.loads(captured.out)
    assert report["failed"] == 1
    assert report["inserted"] == 2
    [error] = _error_lines(captured.err)
    assert error.startswith("error: 1 row(s) could not be embedded")


# --------------------------------------------------------------------------- error boundary

_SEARCH = ["search", "--db", "db", "--table", "docs", "--model", "m", "a query"]


def test_internal_error_is_one_line_without_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "run_search", broken)
    status = main(_SEARCH)
    captured = capsys.readouterr()
    assert status == cli.EXIT_INTERNAL == 1
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert _error_lines(captured.err) == [
        "error: internal error: RuntimeError: boom second line "
        "(re-run with --debug for the traceback)"
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_adds_the_traceback(where, monkeypatch, tmp_path, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run_search", broken)
    argv = ["--debug", *_SEARCH] if where == "before" else [*_SEARCH[:-1], "--debug", "a query"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "in broken" in err
    assert _error_lines(err) == ["error: internal error: RuntimeError: boom"]
    assert err.rstrip().splitlines()[-1] == "error: internal error: RuntimeError: boom"

    source = tmp_path / "missing.txt"
    assert main(["--debug", *_embed_args("m", source, tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err
    assert "InputDataError" in err
    assert "Traceback (most recent call last)" in err
    assert len(_error_lines(err)) == 1


def test_the_debug_traceback_hides_passwords(monkeypatch, capsys):
    dsn = "postgresql://app:hunter2@db:5432/docs"

    def broken(args):
        raise RuntimeError(f"could not connect to {dsn}")

    monkeypatch.setattr(cli, "run_search", broken)
    assert main(["--debug", *_SEARCH]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "hunter2" not in err
    assert "postgresql://app:***@db:5432/docs" in err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("refresh", "interrupted; the table is at its last committed version, re-run to continue"),
        ("embed", "interrupted; nothing was written"),
        ("search", "interrupted"),
    ],
)
def test_ctrl_c_exits_130_with_one_line(command, message, monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"run_{command}", interrupted)
    argv = {
        "refresh": _refresh_args("m", tmp_path / "src.parquet", tmp_path / "db"),
        "embed": _embed_args("m", tmp_path / "in.txt", tmp_path / "out.npy"),
        "search": _SEARCH,
    }[command]
    try:
        status = main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    captured = capsys.readouterr()
    assert status == cli.EXIT_INTERRUPTED == 130
    assert "Traceback" not in captured.err
    assert _error_lines(captured.err) == [f"error: {message}"]


# --------------------------------------------------------------------------- plan, guard, errors


def _write_parquet(path, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    titles = [f"T{i}" for i in ids]
    pq.write_table(pa.table({"id": ids, "title": titles, "body": [f"b {i}" for i in ids]}), path)
    return path


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from tests.refresh_helpers import table_version

    db = tmp_path / "db"
    source = _write_parquet(tmp_path / "s.parquet", list(range(10)))
    assert main(_refresh_args(tiny_model_dir, source, db, "--dry-run")) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True
    assert (plan["inserted"], plan["rows_to_embed"], plan["deleted"]) == (10, 10, 0)
    assert plan["tokens_to_embed"] > 10
    assert plan["tokens_estimated"] is False
    assert table_version(str(db), "docs") is None  # not even created
    assert main(_refresh_args(tiny_model_dir, source, db)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == plan["tokens_to_embed"]  # the plan's tokens are exact
    version = table_version(str(db), "docs")
    smaller = _write_parquet(tmp_path / "small.parquet", [0, 1, 2])
    assert main(_refresh_args(tiny_model_dir, smaller, db, "--dry-run")) == 2
    out, err = capsys.readouterr()
    refused = json.loads(out)
    assert refused["deleted"] == 7
    assert "70.0%" in refused["refused"]
    assert _error_lines(err) == [f"error: {refused['refused']}"]
    assert main(_refresh_args(tiny_model_dir, smaller, db)) == 2
    assert "--allow-mass-delete" in capsys.readouterr().err
    assert table_version(str(db), "docs") == version
    assert main(_refresh_args(tiny_model_dir, smaller, db, "--allow-mass-delete")) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 7


def test_a_garbled_parquet_page_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    path = _write_parquet(tmp_path / "s.parquet", list(range(200)))
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = b"\xff" * 64  # inside the column chunks, not the footer
    path.write_bytes(bytes(data))
    status = main(_refresh_args(tiny_model_dir, path, tmp_path / "db"))
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(_error_lines(err)) == 1
    assert "Traceback" not in err


def test_a_missing_lance_data_file_says_how_to_recover(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "db"
    source = _write_parquet(tmp_path / "s.parquet", list(range(10)))
    assert main(_refresh_args(tiny_model_dir, source, db)) == 0
    capsys.readouterr()
    for data_file in (db / "docs.lance" / "data").glob("*.lance"):
        data_file.unlink()
    status = main(_refresh_args(tiny_model_dir, source, db))
    err = capsys.readouterr().err
    assert status == 2, err
    (line,) = _error_lines(err)
    assert "missing" in line
    assert "--rebuild" in line
    assert main(_refresh_args(tiny_model_dir, source, db, "--rebuild")) == 0
    assert json.loads(capsys.readouterr().out)["inserted"] == 10


def test_a_transient_failure_exits_1_saying_a_rerun_may_succeed(monkeypatch, capsys):
    from qwen3_pipeline.core.errors import StoreConflictError

    def conflicted(args):
        raise StoreConflictError("upsert still conflicted after 6 tries")

    # setattr alone: main() looks run_refresh up in the module at call time. (A setitem on
    # main.__globals__ as well used to leak the fake into later tests: monkeypatch undoes
    # every setattr before any setitem, so the setitem restored the fake.)
    monkeypatch.setattr(cli, "run_refresh", conflicted)
    status = main(_refresh_args("m", "s.parquet", "db"))
    assert status == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "re-running may succeed" in line
