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
from qwen3_pipeline.dagster.embedding_asset import (
    DRIFT_CHECK,
    HashShards,
    build_embedding_asset,
    drift_skip_reason,
)
from qwen3_pipeline.dagster.metadata import (
    RUN_BY_PARTITION,
    SCOPE,
    TABLE_FINGERPRINT,
    TABLE_ROWS,
    TABLE_VERSION,
    by_partition_markdown,
    run_counters,
)
from qwen3_pipeline.dagster.resources import (
    HOW_TO_FIX_MODEL,
    EmbedderLoadFailure,
    FakeEmbedderResource,
    LanceDBResource,
    Qwen3EmbedderResource,
)
from qwen3_pipeline.engine.report import RefreshReport
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
    assert table_md.startswith("| part | emb | ins |\n")
    assert "**all**" in table_md
    assert f"**{ROWS}**" in table_md
    # Each event says which partition it is and that qwen3/run/* are the run's totals.
    for partition, metadata in events.items():
        assert metadata[SCOPE].startswith(f"partition {partition} (")
        assert f"of {SHARDS} in this run)" in metadata[SCOPE]
        assert "qwen3/run/* are the run totals" in metadata[SCOPE]
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
    assert sorted(e.check_name for e in evaluations) == sorted(
        [*checks.CHECK_NAMES, checks.NO_QUARANTINED_ROWS]
    )
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


def test_the_by_partition_table_is_compact() -> None:
    # Issue 17: shard names wrapped over three lines and the right columns were cut off.
    report = RefreshReport(
        table_name=TABLE,
        embedded_rows=5,
        inserted=3,
        updated=2,
        unchanged=4,
        per_partition={
            "shard-02-of-08": {"embedded": 2, "inserted": 0, "updated": 2, "unchanged": 1},
            "shard-01-of-08": {"embedded": 3, "inserted": 3, "unchanged": 3, "deleted": 0},
        },
    )
    assert by_partition_markdown(report) == (
        "| part | emb | ins | upd | same |\n"
        "|---|--:|--:|--:|--:|\n"
        "| 01/08 | 3 | 3 | 0 | 3 |\n"
        "| 02/08 | 2 | 0 | 2 | 1 |\n"
        "| **all** | **5** | **3** | **2** | **4** |"
    )


def test_a_skipped_drift_check_says_its_own_reason(tmp_path: Path, warehouse: Path) -> None:
    # Issue 17: the no-op message joined "nothing was embedded" and "no canaries yet".
    instance = dg.DagsterInstance.ephemeral()
    asset = _asset(warehouse)
    first = _run_all_shards(asset, tmp_path, instance)
    again = _run_all_shards(asset, tmp_path, instance)
    alone = _run_checks_alone(asset, tmp_path, instance)
    assert first.success
    assert again.success
    assert alone.success
    prefix = f"{DRIFT_CHECK} skipped: "

    def reasons(run_id: str) -> list[str]:
        return [m for m in _messages(instance, run_id) if m.startswith(prefix)]

    # A first fill records its canaries (a sharded one compares them in its later shards).
    first_fill = drift_skip_reason(RefreshReport(table_name=TABLE, canaries_recorded=8))
    assert first_fill.startswith("first fill: 8 canaries were recorded now")
    assert reasons(again.run_id) == [
        prefix + "the refresh embedded nothing, so the model was not loaded to compare"
    ]
    assert reasons(alone.run_id) == [
        prefix + "the checks ran alone, without a refresh (they never load the model)"
    ]
    for run_id in (again.run_id, alone.run_id):
        assert " or " not in reasons(run_id)[0]


def test_a_bad_dim_is_refused_by_the_resource_and_says_only_what_is_wrong(
    tmp_path: Path,
) -> None:
    # Issue 17: a bad dim passed the launchpad and its error appended a model/network hint.
    # Dagster's config schema has no numeric ranges, so the bounds are checked when the
    # resource is built (run start), before any model config is read.
    for bad in ({"dim": 8}, {"max_length": 1}, {"max_batch_rows": 0}, {"max_batch_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Qwen3EmbedderResource(model=str(tmp_path), **bad)
    # Above the hidden size (read from the checkpoint's config): the dim alone is named.
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    too_wide = Qwen3EmbedderResource(model=str(tmp_path), dim=128)
    with pytest.raises(EmbedderLoadFailure) as caught:
        too_wide.setup_for_execution(dg.build_init_resource_context())
    assert "dim=128" in caught.value.description
    assert "from 32 to 64" in caught.value.description
    assert HOW_TO_FIX_MODEL not in caught.value.description
    assert "QWEN3_PIPELINE_MODEL" not in caught.value.description
    # A load error still says how to point the model at a checkpoint.
    with pytest.raises(EmbedderLoadFailure) as missing:
        Qwen3EmbedderResource(model=str(tmp_path / "nope")).setup_for_execution(
            dg.build_init_resource_context()
        )
    assert HOW_TO_FIX_MODEL in missing.value.description
