"""Every refusal's way out, from the Dagster UI alone: one `dagster dev` server, GraphQL only.

The vector table of the demo code location is filled in-process while the server starts (the
setup); from then on every step is a run launched with the GraphQL the UI sends, checked with
what the run page shows (the step's error, the check results, the materializations):

1. a gated rebuild that the gate refuses: the run fails naming the ``gate_tolerance`` that
   passes, the ``rebuild_gate`` check shows both tables' scores, the live table is untouched;
2. the same rebuild launched with that tolerance: the staging table is swapped in;
3. the rollback job: the version before the swap is restored and recorded;
4. a mass delete, refused naming ``allow_mass_delete``; with it, the next refusal is the drift
   of the model's weights (changed under the same path), naming ``accept_drift``; with both,
   the run succeeds and the table matches the source.

The refused gate is made deterministic: each golden query's relevant document A is live's top
hit, and A's text is swapped in the source with the text of the query's last hit B. The model is
a function of the text, so the rebuilt table holds live's vectors with A's and B's keys
exchanged: live scores recall@1 = 1, staging 0.
"""

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import lancedb
import pytest

from qwen3_pipeline.consumers.vector_search import open_vector_table, search
from qwen3_pipeline.core.changes import content_hash
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.embedding_asset import HashShards
from qwen3_pipeline.dagster.lifecycle_jobs import ROLLBACK_PREFIX
from qwen3_pipeline.dagster.rebuild_gate import GATE_PREFIX, REBUILD_GATE_CHECK
from qwen3_pipeline.demo.dbt import dbt_cli_resource, dbt_models_assets, raw_docstrings
from qwen3_pipeline.demo.location import DemoSettings, build_definitions
from tests.dagster_dev import DagsterDev, dagster_dev_server
from tests.test_lifecycle import _perturb_weights

LIMIT = 60
KEPT = 12  # source rows left by the mass delete (of ~60: far more than half deleted)
QUERIES = ("parse a date string", "open a file for reading")
OP = "document_vectors"
ASSET_JOB = "__ASSET_JOB"
STARTED = time.monotonic()


def _log(what: str) -> None:
    print(f"[e2e way out] {what} at {time.monotonic() - STARTED:.0f}s")


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_quick_dir: Path) -> Path:
    """The checkpoint the server loads, in a copy whose weights the test changes."""
    return Path(shutil.copytree(tiny_model_quick_dir, tmp_path / "model"))


@pytest.fixture
def server(tmp_path: Path, model_copy: Path) -> Iterator[tuple[DagsterDev, dict[str, str]]]:
    with dagster_dev_server(tmp_path, model_copy) as started:
        yield started


def _source(warehouse: Path) -> dict[str, str]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        rows = con.execute("SELECT doc_id, text FROM documents").fetchall()
    finally:
        con.close()
    return {key: content_hash(text) for key, text in rows if text.strip()}


def _execute(warehouse: Path, sql: str, params: list[Any] | None = None) -> None:
    con = duckdb.connect(str(warehouse))
    try:
        con.execute(sql, params or [])
    finally:
        con.close()


def _live(lancedb_dir: Path) -> Any:
    return lancedb.connect(str(lancedb_dir)).open_table("documents")


def _stored(lancedb_dir: Path) -> dict[str, str]:
    rows = _live(lancedb_dir).to_arrow().select(["key", "content_hash"]).to_pylist()
    return {r["key"]: r["content_hash"] for r in rows}


def _swap_trap(lancedb_dir: Path, warehouse: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The golden set live answers at recall@1 = 1 and a rebuild cannot; the swapped keys."""
    live = open_vector_table(str(lancedb_dir), "documents")  # its own encoder, on the CPU
    items: list[dict[str, Any]] = []
    swapped: list[str] = []
    for query in QUERIES:
        ranked = search(live, query, k=live.count_rows(), columns=["key"])
        keys = ranked.column("key").to_pylist()
        top, last = keys[0], keys[-1]
        if {top, last} & set(swapped):
            continue
        swapped += [top, last]
        items.append({"query": query, "relevant": [top]})
        _execute(
            warehouse,
            """
            UPDATE documents SET text = CASE WHEN doc_id = $1
                THEN (SELECT text FROM documents WHERE doc_id = $2)
                ELSE (SELECT text FROM documents WHERE doc_id = $1) END,
                updated_at = now()::TIMESTAMP
            WHERE doc_id IN ($1, $2)
            """,
            [top, last],
        )
    assert items
    return items, swapped


def _check(server: DagsterDev, run_id: str, name: str) -> dict[str, Any]:
    (evaluation,) = [
        e["evaluation"]
        for e in server.run_events(run_id)
        if e["__typename"] == "AssetCheckEvaluationEvent" and e["evaluation"]["checkName"] == name
    ]
    return evaluation


def _floats(evaluation: dict[str, Any]) -> dict[str, float]:
    return {m["label"]: m["floatValue"] for m in evaluation["metadataEntries"] if "floatValue" in m}


def _materializations(server: DagsterDev, run_id: str) -> list[dict[str, Any]]:
    return [e for e in server.run_events(run_id) if e["__typename"] == "MaterializationEvent"]


def _entry(event: dict[str, Any], label: str) -> Any:
    (entry,) = [m for m in event["metadataEntries"] if m["label"] == label]
    return next(v for k, v in entry.items() if k != "label")


@pytest.mark.slow
def test_every_refusal_has_a_way_out_from_the_ui(
    tmp_path: Path,
    model_copy: Path,
    server: tuple[DagsterDev, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global STARTED
    STARTED = time.monotonic()
    dev, env = server
    data = Path(env["QWEN3_PIPELINE_DATA_DIR"])
    warehouse, lancedb_dir = data / "warehouse.duckdb", data / "lancedb"
    for name in ("DAGSTER_HOME", "QWEN3_PIPELINE_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    instance = dg.DagsterInstance.get()
    shards = all_partitions_tags(HashShards().partitions_def())

    # Setup, while the server starts: the corpus, the dbt models and a first fill of the
    # vectors, recorded in the server's instance.
    upstream = dg.materialize(
        [raw_docstrings, dbt_models_assets],
        resources={"dbt": dbt_cli_resource()},
        instance=instance,
        run_config={"ops": {"raw_docstrings": {"config": {"limit": LIMIT}}}},
    )
    assert upstream.success
    defs = build_definitions(DemoSettings(model=str(model_copy), data_dir=data))
    # Resolved from the definitions, the asset comes bound to their resources.
    filled = dg.materialize([defs.resolve_assets_def(OP)], instance=instance, tags=shards)
    assert filled.success
    assert _stored(lancedb_dir) == _source(warehouse)
    golden, swapped = _swap_trap(lancedb_dir, warehouse)
    trap = tmp_path / "trap.jsonl"
    trap.write_text("".join(json.dumps(item) + "\n" for item in golden))
    live_version = _live(lancedb_dir).version
    _log("setup done")
    dev.wait_until_loaded(timeout=240)
    _log("server loaded")

    # 1. The gate refuses: recall@1 falls from 1 to 0; the live table is untouched.
    strict = {"gate_golden_set": str(trap), "gate_k": 1, "gate_tolerance": 0.0}
    refused = dev.launch_run(
        "document_vectors_gated_rebuild", config={"ops": {OP: {"config": strict}}}
    )
    assert dev.wait_for_run(refused) == "FAILURE"
    message = dev.step_failure(refused)
    assert "gate refused the rebuild of 'documents'" in message
    assert f"untouched (version {live_version})" in message
    way_out = re.search(r"gate_tolerance: ([0-9.]+)\}\}\}", message)
    assert way_out is not None, message
    gate = _check(dev, refused, REBUILD_GATE_CHECK)
    assert gate["success"] is False
    scores = _floats(gate)
    assert (scores[f"{GATE_PREFIX}live_recall"], scores[f"{GATE_PREFIX}staging_recall"]) == (1, 0)
    assert _live(lancedb_dir).version == live_version
    _log("gated rebuild refused")

    # 2. The same rebuild with the tolerance the failure named: swapped in.
    tolerance = float(way_out.group(1))
    passed = dev.launch_run(
        "document_vectors_gated_rebuild",
        config={"ops": {OP: {"config": {**strict, "gate_tolerance": tolerance}}}},
    )
    assert dev.wait_for_run(passed) == "SUCCESS", dev.log.read_text()[-3000:]
    assert _check(dev, passed, REBUILD_GATE_CHECK)["success"] is True
    swapped_version = _live(lancedb_dir).version
    assert swapped_version > live_version
    assert _stored(lancedb_dir) == _source(warehouse)
    _log("gated rebuild passed")

    # 3. Roll back to the version before the swap (the rollback job's default target).
    rolled = dev.launch_run("document_vectors_rollback")
    assert dev.wait_for_run(rolled) == "SUCCESS", dev.log.read_text()[-3000:]
    events = _materializations(dev, rolled)
    partitions = HashShards().partitions_def().get_partition_keys()
    assert sorted(e["partition"] for e in events) == partitions
    assert _entry(events[0], f"{ROLLBACK_PREFIX}from_version") == swapped_version
    assert _entry(events[0], f"{ROLLBACK_PREFIX}to_version") == live_version
    assert _live(lancedb_dir).version == swapped_version + 1
    assert _stored(lancedb_dir) != _source(warehouse)  # the swapped texts are rolled back
    _log("rolled back")

    # 4. Delete most of the source (the swapped documents stay) and change the weights.
    keep = [*swapped, *sorted(set(_source(warehouse)) - set(swapped))][:KEPT]
    _execute(warehouse, "DELETE FROM documents WHERE doc_id NOT IN (SELECT unnest($1))", [keep])
    _perturb_weights(model_copy)

    def materialize(config: dict[str, Any]) -> str:
        # What the asset's Materialize button sends for one run over every shard.
        return dev.launch_run(
            ASSET_JOB, config={"ops": {OP: {"config": config}}}, tags=shards, assets=[OP]
        )

    mass_delete = materialize({})
    assert dev.wait_for_run(mass_delete) == "FAILURE"
    assert f"ops: {{{OP}: {{config: {{allow_mass_delete: true}}}}}}" in dev.step_failure(
        mass_delete
    )
    allowed = {"allow_mass_delete": True}
    drift = materialize(allowed)
    assert dev.wait_for_run(drift) == "FAILURE"
    assert f"ops: {{{OP}: {{config: {{accept_drift: true}}}}}}" in dev.step_failure(drift)
    assert _check(dev, drift, "no_embedding_drift")["success"] is False
    # No vector of the drifted model was written: the swapped rows keep their old content.
    # (Not the version: shards are applied in turn, and the deletes of a shard with nothing
    # to embed are committed before the shard whose first embed meets the drift.)
    stored, source = _stored(lancedb_dir), _source(warehouse)
    assert all(stored[key] != source[key] for key in swapped)
    _log("mass delete and drift refused")

    accepted = materialize({**allowed, "accept_drift": True})
    assert dev.wait_for_run(accepted) == "SUCCESS", dev.log.read_text()[-3000:]
    assert _stored(lancedb_dir) == _source(warehouse)
    assert len(_stored(lancedb_dir)) == KEPT
    _log("mass delete and drift let through")
