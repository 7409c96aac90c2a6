"""What a Dagster user sees: progress in the run log, figures per scope, checks run alone.

Real Dagster runs (``dg.materialize`` on an ephemeral instance), real DuckDB and LanceDB; the
embedder is the fake, whose ``on_batch`` calls stand for the model's forward passes.
"""

from pathlib import Path

import dagster as dg
import duckdb
import lancedb
import pytest

from qwen3_pipeline.consumers import checks
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.progress import PROGRESS_SECONDS_ENV
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.embedding_asset import DRIFT_CHECK, HashShards, build_embedding_asset
from qwen3_pipeline.dagster.metadata import (
    RUN_BY_PARTITION,
    TABLE_FINGERPRINT,
    TABLE_ROWS,
    TABLE_VERSION,
    run_counters,
)
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, LanceDBResource
from qwen3_pipeline.sources import DuckDBSource, SourceConfig

ROWS = 600
SHARDS = 4
TABLE = "documents"
CONFIG = SourceConfig(key="doc_id", text_columns=("text",), carry=("title",))


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        f"""
        CREATE TABLE documents AS
        SELECT 'doc:' || i::VARCHAR AS doc_id, 'Title ' || i::VARCHAR AS title,
               'Document number ' || i::VARCHAR || ' about topic ' || (i % 7)::VARCHAR AS text
        FROM range({ROWS}) AS t(i)
        """
    )
    con.close()
    return path


def _asset(warehouse: Path) -> dg.AssetsDefinition:
    return build_embedding_asset(
        key="document_vectors",
        source=lambda: DuckDBSource(warehouse, "documents"),
        source_config=CONFIG,
        spec=FakeEmbedderResource(dim=32),
        table=TABLE,
        partitioning=HashShards(SHARDS),
        retry_policy=None,
    )


def _resources(tmp_path: Path) -> dict[str, object]:
    return {
        "embedder": FakeEmbedderResource(dim=32),
        "lancedb": LanceDBResource(uri=str(tmp_path / "lancedb")),
    }


def _run_all_shards(
    asset: dg.AssetsDefinition, tmp_path: Path, instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    assert asset.partitions_def is not None
    return dg.materialize(
        [asset],
        resources=_resources(tmp_path),
        instance=instance,
        tags=all_partitions_tags(asset.partitions_def),
        raise_on_error=False,
    )


def _events(result: dg.ExecuteInProcessResult) -> dict[str | None, dict]:
    return {
        e.materialization.partition: {
            k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }


def _messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(run_id)]


def test_progress_lines_reach_the_run_log_while_embedding(
    tmp_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Log at every forward pass (the fake reports one per 64 rows), not every 10 s.
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.000001")
    instance = dg.DagsterInstance.ephemeral()
    result = _run_all_shards(_asset(warehouse), tmp_path, instance)
    assert result.success
    messages = _messages(instance, result.run_id)
    progress = [m for m in messages if m.startswith("embedding into documents: ")]
    # Several lines during the one embed call, each with exact totals from the plan.
    assert len(progress) >= ROWS // 64
    assert f"/{ROWS} rows" in progress[0]
    assert "tokens (" in progress[0]
    assert "tokens/s" in progress[0]
    # No ETA from the first forward pass alone (issue 17: "ETA 59m00s from one row"), then one.
    assert "ETA" not in progress[0]
    assert any("ETA" in m for m in progress[1:])
    assert any(m.startswith(f"refreshed {TABLE}: {ROWS} scanned") for m in messages)
    # ... and all of them before the materialisation is reported.
    first_progress = messages.index(progress[0])
    summary = next(i for i, m in enumerate(messages) if m.startswith(f"refreshed {TABLE}:"))
    assert first_progress < summary


def test_each_partition_has_its_own_counts_and_the_run_and_table_figures(
    tmp_path: Path, warehouse: Path
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    asset = _asset(warehouse)
    result = _run_all_shards(asset, tmp_path, instance)
    assert result.success
    events = _events(result)
    assert sorted(events) == asset.partitions_def.get_partition_keys()  # type: ignore[union-attr]
    own = [m["qwen3/rows_inserted"] for m in events.values()]
    assert sum(own) == ROWS
    assert len(set(own)) > 1
    assert all(
        m["dagster/partition_row_count"] == m["qwen3/rows_inserted"] for m in events.values()
    )
    # Run-wide figures are named so and the same on every event.
    assert {run_counters(m)["inserted"] for m in events.values()} == {ROWS}
    assert {m["qwen3/run/partitions"] for m in events.values()} == {SHARDS}
    table_md = next(iter(events.values()))[RUN_BY_PARTITION]
    assert "| partition |" in table_md
    assert "**run total**" in table_md
    assert f"**{ROWS}**" in table_md
    # The table's state is on every event, whichever shard the UI shows.
    version = lancedb.connect(str(tmp_path / "lancedb")).open_table(TABLE).version
    for metadata in events.values():
        assert metadata[TABLE_ROWS] == ROWS == metadata["dagster/row_count"]
        assert metadata[TABLE_VERSION] == version
        assert metadata[TABLE_FINGERPRINT] == FakeEmbedderResource(dim=32).spec.fingerprint
    assert not any(key == "qwen3/run_totals" for m in events.values() for key in m)


def test_a_run_with_nothing_to_embed_never_loads_the_model(tmp_path: Path, warehouse: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    asset = _asset(warehouse)
    loads = FakeEmbedderResource.loads()
    assert _run_all_shards(asset, tmp_path, instance).success
    assert FakeEmbedderResource.loads() == loads + 1
    again = _run_all_shards(asset, tmp_path, instance)
    assert again.success
    assert FakeEmbedderResource.loads() == loads + 1  # the no-op run loaded nothing
    assert {run_counters(m)["unchanged"] for m in _events(again).values()} == {ROWS}


def _run_checks_alone(
    asset: dg.AssetsDefinition, tmp_path: Path, instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    # What the UI's "Execute" on the asset's checks launches: the checks, not the asset.
    return dg.materialize(
        [asset],
        selection=dg.AssetSelection.checks_for_assets(asset),
        resources=_resources(tmp_path),
        instance=instance,
        raise_on_error=False,
    )


def test_checks_run_alone_read_the_table_without_refreshing_or_loading_the_model(
    tmp_path: Path, warehouse: Path
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    asset = _asset(warehouse)
    assert _run_all_shards(asset, tmp_path, instance).success
    table = lancedb.connect(str(tmp_path / "lancedb")).open_table(TABLE)
    version = table.version
    loads = FakeEmbedderResource.loads()

    alone = _run_checks_alone(asset, tmp_path, instance)
    assert alone.success
    assert alone.get_asset_materialization_events() == []
    evaluations = alone.get_asset_check_evaluations()
    # The drift check needs the model: run alone it evaluates nothing, so it is skipped.
    assert sorted(e.check_name for e in evaluations) == sorted(checks.CHECK_NAMES)
    assert DRIFT_CHECK not in {e.check_name for e in evaluations}
    assert all(e.passed for e in evaluations)
    assert FakeEmbedderResource.loads() == loads
    assert table.version == version

    # A row removed behind the pipeline's back: the checks alone see it, and write nothing.
    table.delete("key = 'doc:7'")
    failed = _run_checks_alone(asset, tmp_path, instance)
    outcome = {e.check_name: e.passed for e in failed.get_asset_check_evaluations()}
    assert outcome[checks.COVERS_SOURCE] is False
    assert outcome[checks.UNIQUE_KEYS] is True
    assert FakeEmbedderResource.loads() == loads


def test_checks_alone_before_the_first_materialization_say_what_to_do(
    tmp_path: Path, warehouse: Path
) -> None:
    result = _run_checks_alone(_asset(warehouse), tmp_path, dg.DagsterInstance.ephemeral())
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.step_failure_data.error)  # type: ignore[union-attr]
    assert "does not exist yet" in message
    assert "materialize document_vectors" in message


def test_the_backfill_shape_is_one_run_or_one_run_per_k_partitions(warehouse: Path) -> None:
    def build(**kwargs: object) -> dg.AssetsDefinition:
        return build_embedding_asset(
            key="document_vectors",
            source=lambda: DuckDBSource(warehouse, "documents"),
            source_config=CONFIG,
            spec=FakeEmbedderResource(dim=32),
            table=TABLE,
            partitioning=HashShards(SHARDS),
            **kwargs,  # type: ignore[arg-type]
        )

    assert build().backfill_policy == dg.BackfillPolicy.single_run()
    per_two = build(partitions_per_run=2).backfill_policy
    assert per_two == dg.BackfillPolicy.multi_run(max_partitions_per_run=2)
    with pytest.raises(ConfigError, match="partitions_per_run must be at least 1"):
        build(partitions_per_run=0)
