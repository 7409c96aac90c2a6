import json
import subprocess
import sys

import numpy as np
import pytest

from qwen3_pipeline.cli import main

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
