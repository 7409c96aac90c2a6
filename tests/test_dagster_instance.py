"""`make dev`'s instance: the `gpu` pool gets a limit, enforced per run, and user settings stay."""

import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.op_concurrency_limits_counter import GlobalOpConcurrencyLimitsCounter
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES, RunsFilter

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.embedding_asset import DEFAULT_POOL
from qwen3_pipeline.dagster.instance import (
    CONCURRENCY_SECTION,
    DEFAULT_GPU_POOL_LIMIT,
    GPU_POOL,
    GPU_POOL_LIMIT_ENV,
    gpu_pool_limit_from_env,
    main,
    prepare_instance,
)
from qwen3_pipeline.dagster.resources import FakeEmbedderResource
from qwen3_pipeline.demo.location import DemoSettings, build_definitions

REPO = Path(__file__).resolve().parents[1]


def _stored_limit(home: Path) -> tuple[int, str | None]:
    """The `gpu` limit and pool granularity that a fresh instance on `home` reports."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        granularity = instance.get_concurrency_config().pool_config.pool_granularity
    return info.slot_count, granularity.value if granularity else None


def test_a_fresh_home_gets_the_default_limit_enforced_per_run(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    prepared = prepare_instance(home)
    assert prepared.home == home.resolve()
    assert prepared.config_written
    assert (prepared.granularity, prepared.gpu_pool_limit) == ("run", DEFAULT_GPU_POOL_LIMIT)
    assert (home / "dagster.yaml").read_text() == CONCURRENCY_SECTION
    assert _stored_limit(home) == (1, "run")
    assert GPU_POOL == DEFAULT_POOL  # the pool the embedding asset is in


def test_the_limit_is_configurable_and_kept_when_not_asked_for(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert prepare_instance(home, gpu_pool_limit=2).gpu_pool_limit == 2
    assert _stored_limit(home) == (2, "run")
    # As after a change in the UI: a later `make dev` without a limit keeps it.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 3)
    again = prepare_instance(home)
    assert (again.config_written, again.gpu_pool_limit) == (False, 3)
    assert _stored_limit(home) == (3, "run")
    assert prepare_instance(home, gpu_pool_limit=1).gpu_pool_limit == 1
    assert _stored_limit(home) == (1, "run")
    with pytest.raises(ConfigError, match="at least 1"):
        prepare_instance(home, gpu_pool_limit=0)


def test_limit_from_the_environment() -> None:
    assert gpu_pool_limit_from_env({}) is None
    assert gpu_pool_limit_from_env({GPU_POOL_LIMIT_ENV: " "}) is None
    assert gpu_pool_limit_from_env({GPU_POOL_LIMIT_ENV: "4"}) == 4
    with pytest.raises(ConfigError, match=GPU_POOL_LIMIT_ENV):
        gpu_pool_limit_from_env({GPU_POOL_LIMIT_ENV: "two"})
    with pytest.raises(ConfigError, match="at least 1"):
        gpu_pool_limit_from_env({GPU_POOL_LIMIT_ENV: "0"})


def test_the_concurrency_section_is_appended_once_and_other_settings_stay(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    mine = "# my instance\ntelemetry:\n  enabled: false"  # no final newline
    (home / "dagster.yaml").write_text(mine)
    assert prepare_instance(home).config_written
    text = (home / "dagster.yaml").read_text()
    assert text.startswith(mine + "\n")
    assert yaml.safe_load(text) == {
        "telemetry": {"enabled": False},
        "concurrency": {"pools": {"granularity": "run"}},
    }
    assert not prepare_instance(home).config_written
    assert (home / "dagster.yaml").read_text() == text
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.telemetry_enabled is False


@pytest.mark.parametrize(
    ("config", "granularity"),
    [
        ("concurrency:\n  pools:\n    granularity: op\n", "op"),
        ("concurrency:\n  runs:\n    max_concurrent_runs: 4\n", None),
        ("run_queue:\n  max_concurrent_runs: 4\n", None),
    ],
)
def test_a_users_concurrency_settings_are_left_alone(
    tmp_path: Path, config: str, granularity: str | None
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(config)
    prepared = prepare_instance(home)
    assert (prepared.config_written, prepared.granularity) == (False, granularity)
    assert (home / "dagster.yaml").read_text() == config
    assert _stored_limit(home) == (1, granularity)


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a YAML mapping"):
        prepare_instance(home)


def test_cli_reads_dagster_home_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(GPU_POOL_LIMIT_ENV, "2")
    caplog.set_level("INFO", logger="qwen3_pipeline.dagster.instance")
    assert main([]) == 0
    assert _stored_limit(home) == (2, "run")
    assert main(["--gpu-pool-limit", "3"]) == 0  # the flag wins over the variable
    assert _stored_limit(home) == (3, "run")
    assert "pool `gpu` limit 3" in caplog.text
    monkeypatch.setenv(GPU_POOL_LIMIT_ENV, "many")
    with pytest.raises(SystemExit):
        main([])


def test_a_second_gpu_run_stays_queued_while_the_first_is_in_progress(tmp_path: Path) -> None:
    # What the daemon's run queue asks before launching a run (Dagster's own counter): with
    # `run` granularity a run holds its pools for as long as it is in progress.
    defs = build_definitions(DemoSettings(data_dir=tmp_path), embedder=FakeEmbedderResource(dim=64))
    job = defs.resolve_job_def("document_vectors_hourly_job")
    home = tmp_path / "home"

    def blocked(limit: int) -> bool:
        prepare_instance(home, gpu_pool_limit=limit)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            waiting = instance.create_run_for_job(job)
            counter = GlobalOpConcurrencyLimitsCounter(
                instance,
                [waiting],
                instance.get_run_records(RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES)),
                concurrency_keys=instance.event_log_storage.get_concurrency_keys(),
                pool_limits=instance.event_log_storage.get_pool_limits(),
                pool_granularity=instance.get_concurrency_config().pool_config.pool_granularity,
            )
            return counter.is_blocked(waiting)

    assert not blocked(1)  # nothing in progress
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
    assert blocked(1)
    assert not blocked(2)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_dev_prepares_the_instance_with_the_requested_limit() -> None:
    def dry_run(*args: str) -> str:
        done = subprocess.run(
            # --no-print-directory and a clean MAKELEVEL: under `make test` this runs as a
            # sub-make, which would otherwise add "Entering/Leaving directory" lines.
            ["make", "--no-print-directory", "-n", "dev", *args],
            cwd=REPO,
            env={
                k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}
            },
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    prepare, serve = [
        line for line in dry_run("GPU_POOL_LIMIT=2").replace("\\\n", " ").splitlines() if line
    ][-2:]
    assert "-m qwen3_pipeline.dagster.instance" in prepare
    assert prepare.split()[-2:] == ["--gpu-pool-limit", "2"]
    assert "dagster dev -w workspace.yaml" in serve
    assert "--gpu-pool-limit" not in dry_run()
