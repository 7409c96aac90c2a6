"""End to end through `dagster dev`: a UI-style backfill of all shards, then an incremental run.

The webserver, daemon and code server run as one process group (killed at the end); runs use
the tiny random Qwen3 checkpoint on CPU. The backfill is launched with the GraphQL mutation the
UI sends (`launchPartitionBackfill`), and the incremental refresh with `launchRun` on the
hourly schedule's job with the tags the schedule sets (one run over every shard).
"""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import lancedb
import pytest

from qwen3_pipeline.core.changes import content_hash
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.embedding_asset import HashShards
from qwen3_pipeline.dagster.metadata import run_counters
from qwen3_pipeline.demo.dbt import dbt_cli_resource, dbt_models_assets, raw_docstrings
from tests.dagster_dev import (
    AUTOMATION_STATUS,
    BACKFILL_STATUS,
    LAUNCH_BACKFILL,
    LAUNCH_RUN,
    POLL_SECONDS,
    RUN_STATUS,
    DagsterDev,
    dagster_dev_server,
)

LIMIT = 100
VECTORS = dg.AssetKey("document_vectors")
CHANGED = 3
BACKFILL_TAG = "dagster/backfill"
STARTED = 0.0


@pytest.fixture
def dagster_dev(
    tmp_path: Path, tiny_model_quick_dir: Path
) -> Iterator[tuple[DagsterDev, dict[str, str]]]:
    with dagster_dev_server(tmp_path, tiny_model_quick_dir) as started:
        yield started


def _documents(warehouse: Path) -> dict[str, str]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        rows = con.execute("SELECT doc_id, text FROM documents").fetchall()
    finally:
        con.close()
    return {key: content_hash(text) for key, text in rows if text.strip()}


def _stored(lancedb_dir: Path) -> dict[str, str]:
    table = lancedb.connect(str(lancedb_dir)).open_table("documents")
    rows = table.to_arrow().select(["key", "content_hash"]).to_pylist()
    return {r["key"]: r["content_hash"] for r in rows}


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict[str, Any]]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=VECTORS), limit=100
    ).records
    return {
        r.partition_key: {
            k: getattr(v, "value", v) for k, v in r.asset_materialization.metadata.items()
        }
        for r in records
        if r.run_id == run_id
    }


def _wait_for_backfill_runs(
    instance: dg.DagsterInstance, backfill_id: str, timeout: float
) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))
        if runs and all(r.is_finished for r in runs):
            return list(runs)
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"backfill {backfill_id} runs did not finish in {timeout}s")


def _assert_progress_while_embedding(logs: list[Any]) -> None:
    """Progress lines with exact totals appear between the step's start and its result."""
    messages = [(e.user_message or "", e.dagster_event) for e in logs]
    start = next(
        i
        for i, (_, event) in enumerate(messages)
        if event is not None and event.is_step_start and event.step_key == "document_vectors"
    )
    done = next(
        i
        for i, (_, event) in enumerate(messages)
        if event is not None and event.is_step_materialization
    )
    progress = [m for m, _ in messages[start:done] if m.startswith("embedding into documents: ")]
    assert len(progress) >= 2, [m for m, _ in messages]
    assert all(" rows, " in m and " tokens (" in m and "tokens/s" in m for m in progress)
    assert any("ETA" in m for m in progress)
    assert any(m.startswith("refreshed documents: ") for m, _ in messages[start:done])


@pytest.mark.slow
def test_backfill_from_the_ui_then_incremental_refresh(
    dagster_dev: tuple[DagsterDev, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, env = dagster_dev
    global STARTED
    STARTED = time.monotonic()
    data = Path(env["QWEN3_PIPELINE_DATA_DIR"])
    for name in ("DAGSTER_HOME", "QWEN3_PIPELINE_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    instance = dg.DagsterInstance.get()

    # While the server starts: the corpus and the dbt models, recorded in the same instance.
    upstream = dg.materialize(
        [raw_docstrings, dbt_models_assets],
        resources={"dbt": dbt_cli_resource()},
        instance=instance,
        run_config={"ops": {"raw_docstrings": {"config": {"limit": LIMIT}}}},
    )
    assert upstream.success
    documents = _documents(data / "warehouse.duckdb")
    assert len(documents) > LIMIT // 2

    print(f"[e2e] upstream done at {time.monotonic() - STARTED:.0f}s")
    location, repository = server.wait_until_loaded(timeout=240)
    print(f"[e2e] server loaded at {time.monotonic() - STARTED:.0f}s")
    # Automation starts stopped (QWEN3_PIPELINE_AUTOMATION is not set): nothing runs by itself.
    selector = {"repositoryLocationName": location, "repositoryName": repository}
    automation = server.graphql(AUTOMATION_STATUS, {"selector": selector})
    schedules = automation["schedulesOrError"]["results"]
    sensors = automation["sensorsOrError"]["results"]
    assert {s["name"]: s["scheduleState"]["status"] for s in schedules} == {
        "document_vectors_hourly": "STOPPED",
        "document_vectors_nightly_reconcile": "STOPPED",
    }
    assert {s["name"]: s["sensorState"]["status"] for s in sensors} == {
        "document_vectors_automation": "STOPPED"
    }
    shards = HashShards().partitions_def().get_partition_keys()
    launched = server.graphql(
        LAUNCH_BACKFILL,
        {
            "params": {
                "partitionNames": shards,
                "assetSelection": [{"path": ["document_vectors"]}],
                "fromFailure": False,
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    # One run for all eight shards (single-run backfill policy: one model load). The daemon
    # marks the backfill complete on its next tick; that is checked at the end.
    runs = _wait_for_backfill_runs(instance, backfill_id, timeout=300)
    assert len(runs) == 1
    assert runs[0].status == dg.DagsterRunStatus.SUCCESS
    logs = instance.all_logs(runs[0].run_id)
    assert sum("loaded embedder" in (e.user_message or "") for e in logs) == 1
    step_pids = {e.dagster_event.pid for e in logs if e.dagster_event and e.step_key} - {None}
    assert len(step_pids) == 1  # in-process executor: every step in the run's one process
    _assert_progress_while_embedding(logs)
    print(f"[e2e] backfill run done at {time.monotonic() - STARTED:.0f}s")
    backfill_events = _materializations(instance, runs[0].run_id)
    assert sorted(backfill_events) == shards
    assert sum(m["qwen3/rows_inserted"] for m in backfill_events.values()) == len(documents)
    assert _stored(data / "lancedb") == documents

    # Change some source rows; the hourly schedule's run refreshes every shard in one run.
    con = duckdb.connect(str(data / "warehouse.duckdb"))
    picked = con.execute(f"SELECT doc_id FROM documents ORDER BY doc_id LIMIT {CHANGED}")
    changed = [key for (key,) in picked.fetchall()]
    # An edit moves updated_at (as the dbt model's source does): the demo's hourly refresh
    # reads by watermark, so it reads only these rows.
    con.execute(
        "UPDATE documents SET text = text || ' (edited)', updated_at = now()::TIMESTAMP "
        "WHERE doc_id IN (SELECT unnest(?))",
        [changed],
    )
    con.close()
    tags = [
        {"key": k, "value": v}
        for k, v in all_partitions_tags(HashShards().partitions_def()).items()
    ]
    launched_run = server.graphql(
        LAUNCH_RUN,
        {
            "params": {
                "selector": {
                    "repositoryLocationName": location,
                    "repositoryName": repository,
                    "jobName": "document_vectors_hourly_job",
                },
                "executionMetadata": {"tags": tags},
            }
        },
    )["launchRun"]
    assert launched_run["__typename"] == "LaunchRunSuccess", launched_run
    run_id = launched_run["run"]["runId"]
    status = server.wait_for(
        "refresh run",
        RUN_STATUS,
        {"id": run_id},
        lambda d: d["runOrError"]["status"],
        {"SUCCESS", "FAILURE", "CANCELED"},
        timeout=300,
    )
    assert status == "SUCCESS"
    print(f"[e2e] refresh done at {time.monotonic() - STARTED:.0f}s")
    refreshed = _materializations(instance, run_id)
    assert sorted(refreshed) == shards
    totals = run_counters(next(iter(refreshed.values())))
    assert totals["updated"] == CHANGED
    assert totals["embedded"] == CHANGED
    assert totals["inserted"] == totals["deleted"] == 0
    assert sum(m["qwen3/rows_updated"] for m in refreshed.values()) == CHANGED
    assert _stored(data / "lancedb") == _documents(data / "warehouse.duckdb")

    status = server.wait_for(
        "backfill",
        BACKFILL_STATUS,
        {"id": backfill_id},
        lambda d: d["partitionBackfillOrError"]["status"],
        {"COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"},
        timeout=120,
    )
    assert status == "COMPLETED_SUCCESS"
    print(f"[e2e] backfill completed at {time.monotonic() - STARTED:.0f}s")
