"""The demo code location loads (without torch), with its resources, lineage and automation."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.resources import (
    FakeEmbedderResource,
    LanceDBResource,
    Qwen3EmbedderResource,
)
from qwen3_pipeline.demo import dbt as dbt_defs
from qwen3_pipeline.demo.location import DemoSettings, build_definitions

REPO = Path(__file__).resolve().parents[1]
VECTORS = dg.AssetKey("document_vectors")
INDEX = dg.AssetKey("document_vectors_index")
NEAR = dg.AssetKey("near_duplicate_documents")

# Records every process started and every file opened for writing, from before the import on.
LOAD_SCRIPT = """
import json, os, sys

spawned, written = [], []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def audit(event, args):
    if event in {"subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn"}:
        spawned.append([str(a) for a in args[1]])
    elif event in {"os.system", "os.fork", "os.forkpty"}:
        spawned.append([event, *map(str, args)])
    elif event == "open" and isinstance(args[2], int) and args[2] & WRITE:
        written.append(str(args[0]))

sys.addaudithook(audit)

import dagster as dg
from qwen3_pipeline.demo.definitions import defs
dg.Definitions.validate_loadable(defs)
repo = defs.get_repository_def()
print(json.dumps({
    "spawned": spawned,
    "written": written,
    "torch": "torch" in sys.modules,
    "transformers": "transformers" in sys.modules,
    "assets": sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()),
    "resources": {k: type(v).__name__ for k, v in defs.resources.items()},
    "model": defs.resources["embedder"].model,
    "lancedb_uri": defs.resources["lancedb"].uri,
    "schedules": {s.name: s.default_status.value for s in repo.schedule_defs},
    "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")
                   and not j.name.endswith("_hourly_job")),
    "sensors": {s.name: s.default_status.value for s in repo.sensor_defs},
}))
"""


def _load_in_a_fresh_process(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "QWEN3_PIPELINE_DATA_DIR": str(data_dir),
        # Python's own bytecode cache would count as a write.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # Unset automation: the schedule and sensor must load stopped by default.
    for name in ("QWEN3_PIPELINE_MODEL", "QWEN3_PIPELINE_AUTOMATION", "DAGSTER_IS_DEV_CLI"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _ours(loaded: dict) -> tuple[list, list]:
    # dagster's vendored croniter runs `file -b <python>` (platform.architecture) on import.
    spawned = [argv for argv in loaded["spawned"] if argv[0] != "file"]
    return spawned, [path for path in loaded["written"] if path != "/dev/null"]


def test_without_a_prepared_manifest_loading_names_the_command_and_writes_nothing(
    tmp_path: Path,
) -> None:
    done = _load_in_a_fresh_process(tmp_path / "data")
    assert done.returncode != 0
    assert "DbtManifestNotPreparedError" in done.stderr
    assert f"`{dbt_defs.PREPARE_COMMAND}`" in done.stderr
    assert not (tmp_path / "data").exists()


def test_definitions_load_in_a_fresh_process_without_torch(tmp_path: Path) -> None:
    # The manifest this process loaded (prepared by `make setup`), as the command would write it.
    target = tmp_path / "data" / "dbt" / "target"
    target.mkdir(parents=True)
    shutil.copy(dbt_defs.dbt_project.manifest_path, target / "manifest.json")
    done = _load_in_a_fresh_process(tmp_path / "data")
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert _ours(loaded) == ([], [])
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == [
        "dbt",
        "manifest.json",
        "target",
    ]
    assert loaded["torch"] is False
    assert loaded["transformers"] is False
    assert loaded["assets"] == sorted(
        [
            "raw_docstrings",
            "stg_docstrings",
            "documents",
            "document_vectors",
            "document_vectors_index",
            "near_duplicate_documents",
            "long_documents",
            "document_chunks",
            "golden_queries",
            "golden_rerank_eval",
        ]
    )
    assert loaded["jobs"] == [
        "document_vectors_gated_rebuild",
        "document_vectors_nightly_reconcile_job",
        "document_vectors_rollback",
    ]
    assert loaded["resources"] == {
        "dbt": "WarehouseDbtCliResource",
        "embedder": "Qwen3EmbedderResource",
        "lancedb": "LanceDBResource",
    }
    assert loaded["model"] == "Qwen/Qwen3-Embedding-0.6B"
    assert loaded["lancedb_uri"] == str((tmp_path / "data" / "lancedb").resolve())
    assert loaded["schedules"] == {
        "document_vectors_hourly": "STOPPED",
        "document_vectors_nightly_reconcile": "STOPPED",
    }
    assert loaded["sensors"] == {"document_vectors_automation": "STOPPED"}


def test_workspace_points_at_the_definitions_module() -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    assert entry["python_module"]["module_name"] == "qwen3_pipeline.demo.definitions"


@pytest.fixture
def defs(tmp_path: Path) -> dg.Definitions:
    settings = DemoSettings(data_dir=tmp_path, automation=True, shards=4)
    return build_definitions(settings, embedder=FakeEmbedderResource(dim=64))


def test_lineage_runs_from_the_dbt_model_to_the_consumers(defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    assert graph.get(VECTORS).parent_keys == {dg.AssetKey("documents")}
    assert graph.get(INDEX).parent_keys == {VECTORS}
    assert graph.get(NEAR).parent_keys == {VECTORS, INDEX}
    assert graph.get(dg.AssetKey("documents")).parent_keys == {dg.AssetKey("stg_docstrings")}
    vectors = defs.resolve_assets_def(VECTORS)
    assert len(vectors.partitions_def.get_partition_keys()) == 4
    assert vectors.backfill_policy == dg.BackfillPolicy.single_run()
    for key in (VECTORS, INDEX, NEAR):
        assert graph.get(key).automation_condition.get_label() == "eager"


def test_resources_executor_schedule_and_sensor(defs: dg.Definitions, tmp_path: Path) -> None:
    assert isinstance(defs.resources["embedder"], FakeEmbedderResource)
    lancedb_resource = defs.resources["lancedb"]
    assert isinstance(lancedb_resource, LanceDBResource)
    assert lancedb_resource.uri == str((tmp_path / "lancedb").resolve())
    assert defs.executor == dg.in_process_executor
    schedule = defs.resolve_schedule_def("document_vectors_hourly")
    assert schedule.cron_schedule == "0 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    job = defs.resolve_job_def("document_vectors_hourly_job")
    assert job.asset_layer.executable_asset_keys == {VECTORS, INDEX, NEAR}
    sensor = defs.resolve_sensor_def("document_vectors_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.emit_backfills


def test_the_default_embedder_is_the_qwen3_resource_with_settings(tmp_path: Path) -> None:
    defs = build_definitions(DemoSettings(data_dir=tmp_path, dim=256, device="cpu"))
    embedder = defs.resources["embedder"]
    assert isinstance(embedder, Qwen3EmbedderResource)
    assert (embedder.model, embedder.dim, embedder.device) == (
        "Qwen/Qwen3-Embedding-0.6B",
        256,
        "cpu",
    )
    vectors = defs.resolve_assets_def(VECTORS)
    assert vectors.code_versions_by_key[VECTORS] == embedder.embedding_spec().fingerprint


def test_settings_from_environment() -> None:
    settings = DemoSettings.from_env(
        {
            "QWEN3_PIPELINE_MODEL": "/models/qwen3",
            "QWEN3_PIPELINE_DATA_DIR": "/tmp/x",
            "QWEN3_PIPELINE_DEVICE": "cuda:1",
            "QWEN3_PIPELINE_DIM": "512",
            "QWEN3_PIPELINE_AUTOMATION": "off",
        }
    )
    assert settings == DemoSettings(
        model="/models/qwen3", data_dir=Path("/tmp/x"), device="cuda:1", dim=512, automation=False
    )
    assert DemoSettings.from_env({}) == DemoSettings()
    with pytest.raises(ConfigError, match="QWEN3_PIPELINE_DIM"):
        DemoSettings.from_env({"QWEN3_PIPELINE_DIM": "big"})
    with pytest.raises(ConfigError, match="QWEN3_PIPELINE_AUTOMATION"):
        DemoSettings.from_env({"QWEN3_PIPELINE_AUTOMATION": "sometimes"})


def test_automation_is_stopped_unless_switched_on(tmp_path: Path) -> None:
    def statuses(environ: dict[str, str]) -> tuple[str, str]:
        settings = DemoSettings.from_env({"QWEN3_PIPELINE_DATA_DIR": str(tmp_path), **environ})
        defs = build_definitions(settings, embedder=FakeEmbedderResource(dim=64))
        schedule = defs.resolve_schedule_def("document_vectors_hourly")
        sensor = defs.resolve_sensor_def("document_vectors_automation")
        return schedule.default_status.value, sensor.default_status.value

    assert DemoSettings().automation is False
    assert statuses({}) == ("STOPPED", "STOPPED")
    for off in ("off", "0", "false", "OFF", " False ", ""):
        assert statuses({"QWEN3_PIPELINE_AUTOMATION": off}) == ("STOPPED", "STOPPED")
    for on in ("on", "1", "true", "ON", " True "):
        assert statuses({"QWEN3_PIPELINE_AUTOMATION": on}) == ("RUNNING", "RUNNING")
    for bad in ("yes", "2", "running"):
        with pytest.raises(ConfigError, match=f"QWEN3_PIPELINE_AUTOMATION={bad!r}: use on or off"):
            DemoSettings.from_env({"QWEN3_PIPELINE_AUTOMATION": bad})


def test_loading_warns_when_runs_would_recompile_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from qwen3_pipeline.demo.definitions import warn_if_runs_recompile_transformers

    # An empty bytecode prefix stands for an install that wrote no .pyc files (the shared
    # environment's own caches are neither read nor touched).
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "no_pyc"))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert not warn_if_runs_recompile_transformers()  # the first run writes them for the next
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    caplog.set_level("WARNING", logger="qwen3_pipeline.demo.definitions")
    assert warn_if_runs_recompile_transformers()
    assert "-m compileall -q" in caplog.text
    assert "uv pip install --compile-bytecode" in caplog.text

    spec = importlib.util.find_spec("transformers")
    assert spec is not None
    assert spec.origin is not None
    source = Path(spec.origin).with_name("modeling_utils.py")
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(parents=True)
    pyc.touch()
    assert not warn_if_runs_recompile_transformers()  # compiled: nothing to say


def test_a_dbt_model_update_requests_every_shard_of_the_vectors(defs: dg.Definitions) -> None:
    instance = dg.DagsterInstance.ephemeral()
    evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert evaluated.total_requested == 0  # the dbt model was never built: nothing to embed

    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="documents"))
    evaluated = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=evaluated.cursor
    )
    requested = {r.key: r.true_subset.size for r in evaluated.results if r.true_subset.size}
    assert requested == {VECTORS: 4}  # all shards; the sensor emits them as one backfill

    evaluated = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=evaluated.cursor
    )
    assert evaluated.total_requested == 0  # handled: not requested again
