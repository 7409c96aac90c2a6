"""The demo runner end to end in-process, with the real encoder on the random demo checkpoint."""

from pathlib import Path

import duckdb
import lancedb
import pytest

import qwen3_pipeline.embedding.encoder as encoder_module
from qwen3_pipeline.demo import run as demo
from qwen3_pipeline.demo.location import DemoSettings
from tests.fixtures import tiny_qwen3

LIMIT = 150


@pytest.mark.slow
def test_demo_runs_twice_second_run_embeds_nothing(
    tmp_path: Path,
    tiny_model_quick_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("QWEN3_PIPELINE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QWEN3_PIPELINE_AUTOMATION", "off")
    monkeypatch.setenv("QWEN3_PIPELINE_MODEL", str(tiny_model_quick_dir))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    loads: list[str] = []

    class CountingEncoder(encoder_module.Qwen3Encoder):
        def __init__(self, spec, **kwargs) -> None:
            if kwargs.get("load_model", True):  # a tokenizer alone is not a model load
                loads.append(spec.model)
            super().__init__(spec, **kwargs)

    monkeypatch.setattr(encoder_module, "Qwen3Encoder", CountingEncoder)

    assert demo.main(["--limit", str(LIMIT), "--query", "read a file"]) == 0
    first = capsys.readouterr()
    assert "RANDOM-WEIGHT" not in first.err
    # One load for the whole run (every shard, every step), one for the search's query encoder.
    assert loads == [str(tiny_model_quick_dir), str(tiny_model_quick_dir)]
    assert f"LanceDB table: {(data_dir / 'lancedb').resolve()}/documents.lance" in first.out
    assert "0 unchanged" in first.out
    assert "search 'read a file':" in first.out
    assert (data_dir / "dagster_home" / "dagster.yaml").is_file()

    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    (documents,) = con.execute("SELECT count(*) FROM documents").fetchone()
    con.close()
    table = lancedb.connect(str(data_dir / "lancedb")).open_table("documents")
    assert table.count_rows() == documents > 0
    version = table.version
    assert f"{documents} inserted" in first.out

    loads.clear()
    assert demo.main(["--limit", str(LIMIT), "--query", "read a file"]) == 0
    second = capsys.readouterr()
    # Nothing to embed: the run never loads the model (only the search's query encoder does).
    assert loads == [str(tiny_model_quick_dir)]
    # The demo reads with a watermark: the second run reads no row with its text.
    assert "this run: 0 read, 0 inserted, 0 updated, 0 deleted, 0 unchanged, 0 embedded" in (
        second.out
    )
    assert f"lance version {version} -> {version}" in second.out
    assert lancedb.connect(str(data_dir / "lancedb")).open_table("documents").version == version


def test_unloadable_default_model_falls_back_to_a_random_demo_checkpoint_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[dict] = []

    def fake_builder(dest: Path, **shape: int) -> Path:
        built.append(shape)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(b"")
        return dest

    monkeypatch.setattr(tiny_qwen3, "build_tiny_qwen3_checkpoint", fake_builder)
    monkeypatch.setattr(demo, "hub_model_loadable", lambda *a, **k: False)
    settings = DemoSettings(data_dir=tmp_path)
    chosen = demo.choose_model(settings, {})
    assert chosen == str((tmp_path / "demo-model").resolve())
    assert built == [
        {
            "hidden_size": 256,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 512,
        }
    ]
    notice = capsys.readouterr().err
    assert "RANDOM-WEIGHT demo checkpoint" in notice
    assert "NOT semantic" in notice
    assert "QWEN3_PIPELINE_MODEL" in notice
    # Built once: a second choice reuses the checkpoint.
    assert demo.choose_model(settings, {}) == chosen
    assert len(built) == 1


def test_hub_probe_reports_whether_the_config_can_be_fetched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> str:
        raise OSError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert demo.hub_model_loadable("Qwen/Qwen3-Embedding-0.6B") is False
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: "/cache/config.json")
    assert demo.hub_model_loadable("Qwen/Qwen3-Embedding-0.6B") is True


def test_explicit_model_is_used_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "hub_model_loadable", lambda *a, **k: pytest.fail("probed"))
    settings = DemoSettings(model="/models/mine")
    assert demo.choose_model(settings, {"QWEN3_PIPELINE_MODEL": "/models/mine"}) == "/models/mine"


def test_default_model_is_used_when_loadable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(demo, "hub_model_loadable", lambda *a, **k: True)
    chosen = demo.choose_model(DemoSettings(data_dir=tmp_path), {})
    assert chosen == "Qwen/Qwen3-Embedding-0.6B"
    assert not (tmp_path / "demo-model").exists()
