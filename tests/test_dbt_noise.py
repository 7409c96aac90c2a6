"""What the dbt part of the demo code location shows in the Dagster UI, and what runs leave.

Issue 8, item 7: the dbt models sat in the asset group ``default``, the launchpad pre-filled the
absolute dbt paths of the machine that loaded the code location, every dbt build logged
"Logging an `AssetObservation` instead of an `AssetCheckResult`" for the source tests, and every
run left a folder of dbt artifacts behind.
"""

import json
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._core.snap.snap_to_yaml import default_values_yaml_from_type_snap

from qwen3_pipeline.dagster.resources import FakeEmbedderResource
from qwen3_pipeline.demo.dbt import (
    LAST_RUN_DIR,
    WAREHOUSE_GROUP,
    dbt_executable,
    dbt_project_dir,
    raw_docstrings,
)
from qwen3_pipeline.demo.location import DemoSettings, build_definitions
from tests.dbt_runs import DbtRuns

REPO = Path(__file__).resolve().parents[1]
OBSERVATION_WARNING = "instead of an `AssetCheckResult`"
SOURCE_CHECKS = {
    "source_not_null_raw_raw_docstrings_doc_id",
    "source_unique_raw_raw_docstrings_doc_id",
}


@pytest.fixture
def defs(tmp_path: Path) -> dg.Definitions:
    return build_definitions(
        DemoSettings(data_dir=tmp_path, automation=False), embedder=FakeEmbedderResource(dim=64)
    )


def _launchpad_defaults(job: dg.JobDefinition) -> str:
    # What the launchpad pre-fills: the webserver's RunConfigSchema.rootDefaultYaml.
    snap = job.get_job_snapshot()
    schema = snap.config_schema_snapshot
    root_key = snap.mode_def_snaps[0].root_config_key
    assert root_key is not None
    root = schema.get_config_snap(root_key)
    return default_values_yaml_from_type_snap(schema, root)


def test_the_warehouse_tables_form_one_asset_group(defs: dg.Definitions) -> None:
    graph = defs.get_repository_def().asset_graph
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}

    assert groups["raw_docstrings"] == WAREHOUSE_GROUP
    assert groups["stg_docstrings"] == WAREHOUSE_GROUP
    assert groups["documents"] == WAREHOUSE_GROUP
    assert "default" not in groups.values()


def test_the_launchpad_shows_no_path_of_this_machine_for_dbt(defs: dg.Definitions) -> None:
    machine_paths = {str(REPO), str(dbt_project_dir()), dbt_executable(), sys.prefix}
    repo = defs.get_repository_def()

    jobs = repo.get_all_jobs()
    assert jobs
    for job in jobs:
        scaffold = _launchpad_defaults(job)
        assert not [p for p in machine_paths if p in scaffold], (job.name, scaffold)
        resources = (yaml.safe_load(scaffold) or {}).get("resources") or {}
        assert not (resources.get("dbt") or {}).get("config"), (job.name, scaffold)
    # The resources page shows the configured values of each resource.
    (dbt,) = [r for r in RepositorySnap.from_def(repo).resources or [] if r.name == "dbt"]
    assert dbt.configured_values == {}
    assert dbt.config_field_snaps == []


def _warnings_and_observations(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        entry.message
        for entry in instance.all_logs(run_id)
        if OBSERVATION_WARNING in entry.message
        or (entry.dagster_event is not None and entry.dagster_event.is_asset_observation)
    ]


def test_dbt_builds_log_no_observation_and_keep_only_the_latest_artifacts(
    dbt_runs: DbtRuns,
) -> None:
    # Two builds in one data directory (shared with test_dbt_models.py, see conftest.py): raw
    # and dbt, then dbt alone; a failed build went before them in the same directory.
    first, second = dbt_runs.first, dbt_runs.second
    for result in (first, second):
        assert result.success
        assert _warnings_and_observations(dbt_runs.instance, result.run_id) == []
        checks = result.get_asset_check_evaluations()
        assert all(c.passed for c in checks)
        # The source's dbt tests are real asset checks of raw_docstrings.
        on_raw = {c.check_name for c in checks if c.asset_key == raw_docstrings.key}
        assert on_raw == SOURCE_CHECKS
    assert dbt_runs.first_target == [LAST_RUN_DIR]
    target = dbt_runs.target
    assert sorted(p.name for p in target.iterdir()) == [LAST_RUN_DIR]
    last_run = target / LAST_RUN_DIR
    assert (last_run / "dbt.log").is_file()
    invocation = json.loads((last_run / "run_results.json").read_text())["metadata"]
    (documents,) = second.asset_materializations_for_node("dbt_models_assets")[-1:]
    assert documents.metadata["invocation_id"].value == invocation["invocation_id"]


def test_a_failed_dbt_build_is_kept_as_the_latest_run(dbt_runs: DbtRuns) -> None:
    # The shared runs' first: the dbt models alone on a new warehouse, which has no raw table
    # (the source tests and the models fail).
    assert not dbt_runs.failed.success
    assert dbt_runs.failed_target == [LAST_RUN_DIR]
    assert "raw_docstrings" in dbt_runs.failed_log
