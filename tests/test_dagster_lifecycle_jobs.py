"""The gated rebuild job, its rebuild_gate check, and the rollback job (fake embedder, fast)."""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from qwen3_pipeline.consumers.vector_search import open_vector_table, search
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.embedding_asset import (
    HashShards,
    RefreshRunConfig,
    TimePartitioning,
    build_embedding_asset,
)
from qwen3_pipeline.dagster.lifecycle_jobs import (
    ROLLBACK_PREFIX,
    RollbackConfig,
    build_rebuild_job,
    build_rollback_job,
)
from qwen3_pipeline.dagster.metadata import TABLE_VERSION
from qwen3_pipeline.dagster.rebuild_gate import (
    GATE_PREFIX,
    K_TAG,
    REBUILD_GATE_CHECK,
    REBUILD_TAG,
    GateSettings,
    gate_metadata,
    passing_tolerance,
)
from qwen3_pipeline.dagster.resources import FakeEmbedderResource
from qwen3_pipeline.demo.location import (
    GOLDEN_QUERIES,
    build_golden_queries_asset,
    golden_queries_from_documents,
)
from qwen3_pipeline.engine.options import RefreshOptions
from qwen3_pipeline.lifecycle.golden import load_golden_set
from qwen3_pipeline.sources import DuckDBSource
from qwen3_pipeline.store import latest_before_swap_tag
from qwen3_pipeline.testing import FakeEmbedder
from tests.test_dagster_assets import (
    CONFIG,
    NO_RETRY,
    ROWS,
    SHARDS,
    SPEC,
    TABLE,
    _asset,
    _execute,
    _resources,
    _table,
    warehouse,  # noqa: F401  (the fixture)
)

OP = "document_vectors"
GATED = "document_vectors_gated_rebuild"
ROLLBACK = "document_vectors_rollback"


def _defs(
    tmp_path: Path, asset: dg.AssetsDefinition, golden: Path, embedder: Any = None
) -> dg.Definitions:
    return dg.Definitions(
        assets=[asset],
        jobs=[build_rebuild_job(asset, golden_set=str(golden)), build_rollback_job(asset)],
        resources=_resources(tmp_path, embedder),
        executor=dg.in_process_executor,
    )


def _launch(
    defs: dg.Definitions, job: str, instance: dg.DagsterInstance, config: dict | None = None
) -> dg.ExecuteInProcessResult:
    """One run of ``job``; ``config`` replaces the job's default run config, as the launchpad."""
    op = OP if job != ROLLBACK else f"rollback_{OP}"
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config=None if config is None else {"ops": {op: {"config": config}}},
    )


def _fill(defs: dg.Definitions, asset: dg.AssetsDefinition, instance: dg.DagsterInstance) -> None:
    filled = dg.materialize(
        [asset],
        resources=_resources_of(defs),
        instance=instance,
        tags=all_partitions_tags(asset.partitions_def) if asset.partitions_def else None,
    )
    assert filled.success


def _resources_of(defs: dg.Definitions) -> dict[str, Any]:
    return dict(defs.resources or {})


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.message  # type: ignore[union-attr]


def _gate_evaluation(result: dg.ExecuteInProcessResult) -> Any:
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == REBUILD_GATE_CHECK
    ]
    return evaluation


def _hashes(tmp_path: Path) -> dict[str, str]:
    rows = _table(tmp_path).to_arrow().select(["key", "content_hash"]).to_pylist()
    return {row["key"]: row["content_hash"] for row in rows}


def _write_golden(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _swap_trap(tmp_path: Path, warehouse: Path, queries: list[str]) -> list[dict[str, Any]]:  # noqa: F811
    """A golden set live answers perfectly at k=1 and the rebuilt table cannot.

    Each query's relevant document is live's top hit A; then A's text is swapped with that of
    the query's last hit B in the source. The fake embedder is a function of the text, so the
    rebuilt table holds the same vectors with A's and B's keys exchanged: live ranks A first,
    staging ranks B first (A last). Recall@1 drops from 1 to 0, deterministically.
    """
    live = open_vector_table(str(tmp_path / "lancedb"), "documents")
    embedder = FakeEmbedder(SPEC)
    items, swapped = [], set()
    for query in queries:
        ranked = search(live, query, k=ROWS, embedder=embedder, columns=["key"])
        keys = ranked.column("key").to_pylist()
        top, last = keys[0], keys[-1]
        if {top, last} & swapped:
            continue
        swapped |= {top, last}
        items.append({"query": query, "relevant": [top]})
        _execute(
            warehouse,
            f"""
            UPDATE documents SET text = CASE doc_id
                WHEN '{top}' THEN (SELECT text FROM documents WHERE doc_id = '{last}')
                ELSE (SELECT text FROM documents WHERE doc_id = '{top}') END
            WHERE doc_id IN ('{top}', '{last}')
            """,
        )
    assert items
    return items


# --------------------------------------------------------------------------- run config, jobs


def test_rebuild_config_sets_rebuild_and_the_gate_only_with_rebuild() -> None:
    base = RefreshOptions(chunk_rows=50)
    assert RefreshRunConfig(rebuild=True).options(base).rebuild is True
    assert RefreshRunConfig().options(base, tags={REBUILD_TAG: "true"}).rebuild is True
    assert RefreshRunConfig().options(base) == base
    with pytest.raises(ConfigError, match="launch with rebuild: true"):
        RefreshRunConfig(gate_golden_set="g.jsonl").gate_settings({})
    with pytest.raises(ConfigError, match="give gate_golden_set too"):
        RefreshRunConfig(rebuild=True, gate_k=3).gate_settings({})
    with pytest.raises(ConfigError, match="gate_tolerance must be a number from 0 to 1"):
        RefreshRunConfig(rebuild=True, gate_golden_set="g", gate_tolerance=2.0).gate_settings({})
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        RefreshRunConfig(rebuild=True, gate_golden_set="g", gate_k=0).gate_settings({})


def test_run_config_overrides_the_rebuild_jobs_tags_one_key_at_a_time() -> None:
    tags = GateSettings(golden_set="job.jsonl", tolerance=0.05, k=7).tags()
    assert RefreshRunConfig().gate_settings(tags) == GateSettings(
        golden_set="job.jsonl", tolerance=0.05, k=7
    )
    assert RefreshRunConfig(gate_k=1, gate_tolerance=0.0).gate_settings(tags) == GateSettings(
        golden_set="job.jsonl", tolerance=0.0, k=1
    )
    assert RefreshRunConfig(gate_golden_set="mine.jsonl").gate_settings(tags) == GateSettings(
        golden_set="mine.jsonl", tolerance=0.05, k=7
    )
    with pytest.raises(ConfigError, match="qwen3/gate_k='many'"):
        RefreshRunConfig().gate_settings({**tags, K_TAG: "many"})


def test_the_rebuild_job_covers_every_partition_with_the_gate_in_its_tags(
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse)
    job = build_rebuild_job(asset, golden_set="g.jsonl", tolerance=0.1, k=5)
    assert job.name == GATED
    assert job.tags == {
        **all_partitions_tags(asset.partitions_def),
        **GateSettings(golden_set="g.jsonl", tolerance=0.1, k=5).tags(),
    }
    ungated = build_rebuild_job(asset)
    assert ungated.name == "document_vectors_rebuild"
    assert ungated.tags == {**all_partitions_tags(asset.partitions_def), REBUILD_TAG: "true"}
    unpartitioned = build_rebuild_job(_asset(warehouse, partitioning=None))
    assert unpartitioned.tags == {REBUILD_TAG: "true"}


def test_a_time_partitioned_asset_has_no_rebuild_job(warehouse: Path) -> None:  # noqa: F811
    asset = _asset(
        warehouse, partitioning=TimePartitioning(column="updated_at", start="2024-05-01")
    )
    with pytest.raises(ConfigError, match="refresh --rebuild"):
        build_rebuild_job(asset)


def test_rollback_config_takes_a_tag_or_a_version() -> None:
    assert RollbackConfig().target() is None
    assert RollbackConfig(version=3).target() == 3
    assert RollbackConfig(tag="checked-v2").target() == "checked-v2"
    with pytest.raises(ConfigError, match="not both"):
        RollbackConfig(tag="checked-v2", version=3).target()


def test_the_smallest_passing_tolerance_is_rounded_up() -> None:
    assert passing_tolerance({"recall_delta": -0.1234, "ndcg_delta": 0.2}) == 0.124
    assert passing_tolerance({"recall_delta": 0.0, "ndcg_delta": 0.0}) == 0.0
    assert passing_tolerance({"recall_delta": None, "ndcg_delta": None}) is None


def test_gate_metadata_of_a_first_build_has_no_live_figures() -> None:
    staging = {"table": "d_r", "version": 2, "recall": 0.5, "ndcg": 0.25, "golden_set": "g"}
    decision = {
        "passed": True,
        "reason": "first build",
        "tolerance": 0.0,
        "k": 10,
        "queries": 4,
        "live": None,
        "staging": staging,
        "recall_delta": None,
        "ndcg_delta": None,
        "regressions": [],
    }
    metadata = gate_metadata(decision)
    assert metadata[f"{GATE_PREFIX}staging_recall"] == 0.5
    assert not any(key.startswith(f"{GATE_PREFIX}live") for key in metadata)


# --------------------------------------------------------------------------- gated rebuilds


def test_a_plain_refresh_leaves_the_gate_check_skipped(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources=_resources(tmp_path), instance=instance)
        assert result.success
        names = {e.check_name for e in result.get_asset_check_evaluations()}
        assert REBUILD_GATE_CHECK not in names
        messages = [e.message for e in instance.all_logs(result.run_id)]
        assert any(f"{REBUILD_GATE_CHECK} skipped: not a gated rebuild" in m for m in messages)


def test_a_gated_rebuild_the_gate_refuses_fails_naming_the_tolerance_then_passes_with_it(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse)
    queries = [f"topic {i} documents" for i in range(3)]
    golden = tmp_path / "golden.jsonl"
    defs = _defs(tmp_path, asset, golden)
    with dg.instance_for_test() as instance:
        _fill(defs, asset, instance)
        live_version = _table(tmp_path).version
        _write_golden(golden, _swap_trap(tmp_path, warehouse, queries))
        strict = {"rebuild": True, "gate_golden_set": str(golden), "gate_k": 1}

        refused = _launch(defs, GATED, instance, strict)
        assert not refused.success
        message = _failure(refused)
        assert "gate refused the rebuild of 'documents'" in message
        assert f"untouched (version {live_version})" in message
        assert "gate_tolerance: 1}}}" in message  # recall@1 fell from 1 to 0
        evaluation = _gate_evaluation(refused)
        assert not evaluation.passed
        assert evaluation.metadata[f"{GATE_PREFIX}live_recall"].value == 1.0
        assert evaluation.metadata[f"{GATE_PREFIX}staging_recall"].value == 0.0
        assert evaluation.metadata[f"{GATE_PREFIX}recall_delta"].value == -1.0
        assert "regressions" in "".join(evaluation.metadata)
        assert _table(tmp_path).version == live_version  # live untouched
        assert not refused.get_asset_materialization_events()

        passed = _launch(defs, GATED, instance, {**strict, "gate_tolerance": 1.0})
        assert passed.success
        assert _gate_evaluation(passed).passed
        assert _table(tmp_path).version > live_version
        events = passed.get_asset_materialization_events()
        assert len(events) == len(asset.partitions_def.get_partition_keys())
        assert _table(tmp_path).count_rows() == ROWS


def test_the_demo_style_job_default_config_gates_and_passes_an_unchanged_rebuild(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse)
    golden = _write_golden(
        tmp_path / "golden.jsonl",
        [{"query": f"document number {i}", "relevant": [f"doc:{i}"]} for i in range(5)],
    )
    defs = _defs(tmp_path, asset, golden)
    with dg.instance_for_test() as instance:
        _fill(defs, asset, instance)
        before = _table(tmp_path).version
        result = _launch(defs, GATED, instance)  # the job's own run config
        assert result.success
        evaluation = _gate_evaluation(result)
        assert evaluation.passed
        assert evaluation.metadata[f"{GATE_PREFIX}recall_delta"].value == 0.0
        assert evaluation.metadata[f"{GATE_PREFIX}queries"].value == 5
        assert _table(tmp_path).version > before
        assert latest_before_swap_tag(_table(tmp_path)) is not None


def test_a_golden_set_without_rebuild_or_with_unknown_keys_fails_before_writing(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse, partitioning=None)  # refusals only: no shards needed
    golden = _write_golden(
        tmp_path / "golden.jsonl", [{"query": "anything", "relevant": ["doc:nope"]}]
    )
    defs = _defs(tmp_path, asset, golden)
    with dg.instance_for_test() as instance:
        _fill(defs, asset, instance)
        version = _table(tmp_path).version
        alone = dg.materialize(
            [asset],
            resources=_resources(tmp_path),
            instance=instance,
            run_config={"ops": {OP: {"config": {"gate_golden_set": str(golden)}}}},
            raise_on_error=False,
        )
        assert not alone.success
        assert "launch with rebuild: true" in _failure(alone)
        unknown = _launch(defs, GATED, instance, {"rebuild": True, "gate_golden_set": str(golden)})
        assert not unknown.success
        assert "'doc:nope'" in _failure(unknown)
        assert _table(tmp_path).version == version


def test_a_gate_across_a_spec_change_scores_live_with_its_own_spec(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    old = _asset(warehouse)
    golden = _write_golden(
        tmp_path / "golden.jsonl",
        [{"query": f"document number {i}", "relevant": [f"doc:{i}"]} for i in range(5)],
    )
    with dg.instance_for_test() as instance:
        _fill(_defs(tmp_path, old, golden), old, instance)
        smaller = FakeEmbedderResource(dim=32)
        new = build_embedding_asset(
            key="document_vectors",
            source=lambda: DuckDBSource(warehouse, "documents"),
            source_config=CONFIG,
            spec=smaller,
            table=TABLE,
            partitioning=HashShards(SHARDS),
            retry_policy=NO_RETRY,
        )
        defs = _defs(tmp_path, new, golden, smaller)
        refused = _launch(defs, GATED, instance)
        # Live was scored with a dim-64 query embedder, staging with the run's dim-32 one.
        metadata = _gate_evaluation(refused).metadata
        assert metadata[f"{GATE_PREFIX}live_table"].value == "documents"
        assert metadata[f"{GATE_PREFIX}staging_table"].value != "documents"
        assert open_vector_table(str(tmp_path / "lancedb"), "documents").spec.dim == 64
        result = _launch(defs, GATED, instance, {"gate_tolerance": 1.0})
        assert result.success
        assert open_vector_table(str(tmp_path / "lancedb"), "documents").spec.dim == 32


# --------------------------------------------------------------------------- rollback


def test_rollback_restores_the_version_before_the_swap_and_records_it(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse)
    golden = _write_golden(
        tmp_path / "golden.jsonl", [{"query": "document number 1", "relevant": ["doc:1"]}]
    )
    defs = _defs(tmp_path, asset, golden)
    with dg.instance_for_test() as instance:
        _fill(defs, asset, instance)
        filled = _table(tmp_path).version
        hashes = _hashes(tmp_path)
        _execute(warehouse, "UPDATE documents SET text = text || ' v2' WHERE doc_id = 'doc:1'")
        assert _launch(defs, GATED, instance).success
        swapped = _table(tmp_path).version

        result = _launch(defs, ROLLBACK, instance)  # default: before the last swap
        assert result.success
        assert _table(tmp_path).version == swapped + 1
        assert _hashes(tmp_path) == hashes  # doc:1 as it was before the rebuild
        events = result.get_asset_materialization_events()
        assert sorted(e.partition for e in events) == asset.partitions_def.get_partition_keys()
        metadata = events[0].materialization.metadata
        assert metadata[f"{ROLLBACK_PREFIX}from_version"].value == swapped
        assert metadata[f"{ROLLBACK_PREFIX}to_version"].value == filled
        assert metadata[TABLE_VERSION].value == swapped + 1
        assert metadata[f"{ROLLBACK_PREFIX}target"].value == "the newest before-swap tag"

        by_version = _launch(defs, ROLLBACK, instance, {"version": swapped})
        assert by_version.success
        events = by_version.get_asset_materialization_events()
        assert events[0].materialization.metadata[f"{ROLLBACK_PREFIX}target"].value == str(swapped)
        assert _table(tmp_path).version == swapped + 2


def test_a_bad_rollback_target_fails_listing_the_tags_without_retry(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse, partitioning=None)
    defs = _defs(tmp_path, asset, tmp_path / "unused.jsonl")
    with dg.instance_for_test() as instance:
        _fill(defs, asset, instance)
        version = _table(tmp_path).version
        unknown = _launch(defs, ROLLBACK, instance, {"tag": "no-such-tag"})
        assert not unknown.success
        assert "no-such-tag" in _failure(unknown)
        assert "{rollback_document_vectors: {config: {tag: <a tag above>}}}" in _failure(unknown)
        both = _launch(defs, ROLLBACK, instance, {"tag": "checked-v1", "version": 1})
        assert "not both" in _failure(both)
        latest = _launch(defs, ROLLBACK, instance, {"version": version})
        assert latest.success
        assert not latest.get_asset_materialization_events()  # nothing rolled back
        assert _table(tmp_path).version == version


# --------------------------------------------------------------------------- the demo's golden set


def test_demo_golden_queries_are_summary_lines_each_answered_by_its_document() -> None:
    documents = [
        ("a:f", "f\n\nReturn the first item of a sequence.\n\nMore text."),
        ("a:g", "g\n\nToo short."),
        ("b:f", "f\n\nReturn  the first item\nof a sequence."),  # same first line, spaced
        ("c:h", "h\n\nreturn the FIRST item of a sequence."),  # a repeat, another case
        ("d:k", "k\n\nOpen a file and read all of it."),
    ]
    items = golden_queries_from_documents(documents)
    # The first line only, blanks collapsed; too short and repeated (any case) ones skipped.
    assert sorted(item["query"].lower() for item in items) == [
        "open a file and read all of it.",
        "return the first item",
        "return the first item of a sequence.",
    ]
    by_query = {item["query"]: item["relevant"] for item in items}
    assert by_query["Return the first item"] == ["b:f"]
    assert all(len(item["relevant"]) == 1 for item in items)
    assert golden_queries_from_documents(documents, count=1) == items[:1]
    assert golden_queries_from_documents(list(reversed(documents))) == items  # stable pick


def test_the_demo_golden_queries_asset_writes_a_golden_set_the_gate_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN3_PIPELINE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("QWEN3_PIPELINE_DUCKDB_PATH", raising=False)
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    con.execute(
        "CREATE TABLE documents AS SELECT 'm:f' || i AS doc_id, "
        "'f' || i || chr(10) || chr(10) || 'Compute the value number ' || i || ' of it.' AS text "
        "FROM range(30) t(i)"
    )
    con.close()
    path = tmp_path / "golden_set.jsonl"
    result = dg.materialize([build_golden_queries_asset(path)])
    assert result.success
    golden = load_golden_set(path)
    assert len(golden) == GOLDEN_QUERIES
    assert all(item.relevant[0].startswith("m:f") for item in golden)
