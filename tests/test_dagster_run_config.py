"""Launch-time run config of the embedding asset: each refusal has a way out from the launchpad."""

from pathlib import Path

import dagster as dg
import pytest

from qwen3_pipeline.core.errors import ConfigError, EmbeddingDriftError, MassDeleteError
from qwen3_pipeline.dagster.embedding_asset import RefreshRunConfig, way_out_hint
from qwen3_pipeline.engine.options import RefreshOptions
from tests.test_dagster_assets import (
    DRIFT_CHECK,
    ROWS,
    _asset,
    _DriftingResource,
    _execute,
    _resources,
    _table,
    warehouse,  # noqa: F401  (the fixture)
)

OP = "document_vectors"


def _run(assets, resources, instance, **config) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources=resources,
        instance=instance,
        raise_on_error=False,
        run_config={"ops": {OP: {"config": config}}} if config else None,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.message  # type: ignore[union-attr]


def test_run_config_overrides_only_what_it_names() -> None:
    base = RefreshOptions(chunk_rows=123, source_name="x")
    options = RefreshRunConfig(allow_mass_delete=True, drift_threshold=0.99).options(base)
    assert (options.allow_mass_delete, options.drift_threshold) == (True, 0.99)
    assert (options.chunk_rows, options.source_name, options.max_delete_share) == (123, "x", 0.5)
    assert RefreshRunConfig().options(base) == base
    with pytest.raises(ConfigError, match="max_delete_share"):
        RefreshRunConfig(max_delete_share=2.0).options(base)


def test_way_out_hints_name_the_config_key() -> None:
    assert "allow_mass_delete: true" in way_out_hint(MassDeleteError("x"), OP)
    assert "accept_drift: true" in way_out_hint(EmbeddingDriftError("x"), OP)
    assert way_out_hint(ValueError("x"), OP) == ""


def test_a_mass_delete_is_refused_naming_the_config_then_allowed_from_the_launchpad(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.instance_for_test() as instance:
        assert _run([asset], _resources(tmp_path), instance).success
        version = _table(tmp_path).version
        _execute(warehouse, "DELETE FROM documents WHERE doc_id NOT IN ('doc:1', 'doc:2')")

        refused = _run([asset], _resources(tmp_path), instance)
        assert not refused.success
        message = _failure(refused)
        assert "would delete" in message
        assert f"ops: {{{OP}: {{config: {{allow_mass_delete: true}}}}}}" in message
        assert _table(tmp_path).version == version  # nothing written
        assert _table(tmp_path).count_rows() == ROWS

        allowed = _run([asset], _resources(tmp_path), instance, allow_mass_delete=True)
        assert allowed.success
        assert _table(tmp_path).count_rows() == 2


def test_a_drift_is_refused_naming_the_config_then_accepted_from_the_launchpad(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.instance_for_test() as instance:
        assert _run([asset], _resources(tmp_path, _DriftingResource(dim=64)), instance).success
        _execute(
            warehouse, "UPDATE documents SET text = text || ' (edited)' WHERE doc_id = 'doc:3'"
        )
        drifted = _DriftingResource(dim=64, salt="new weights ")

        refused = _run([asset], _resources(tmp_path, drifted), instance)
        assert not refused.success
        assert f"ops: {{{OP}: {{config: {{accept_drift: true}}}}}}" in _failure(refused)

        accepted = _run([asset], _resources(tmp_path, drifted), instance, accept_drift=True)
        assert accepted.success
        (evaluation,) = [
            e for e in accepted.get_asset_check_evaluations() if e.check_name == DRIFT_CHECK
        ]
        assert evaluation.passed
        assert evaluation.metadata["qwen3/drift_accepted"].value is True


def test_poison_rows_warn_are_quarantined_and_replayed_from_the_launchpad(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    from tests.test_dagster_assets import _fake

    asset = _asset(warehouse, partitioning=None)
    poison = ["Document number 3 about topic 3", "Document number 5 about topic 5"]
    broken = _resources(tmp_path, _fake(fail_texts=poison))
    with dg.instance_for_test() as instance:
        first = _run([asset], broken, instance, max_attempts=1)
        assert first.success, "failed rows never fail the run"
        metadata = first.asset_materializations_for_node(OP)[0].metadata
        assert metadata["qwen3/run/rows_failed"].value == 2
        assert metadata["qwen3/run/rows_quarantined"].value == 2
        (warning,) = [
            e for e in first.get_asset_check_evaluations() if e.check_name == "no_quarantined_rows"
        ]
        assert not warning.passed
        assert warning.severity == dg.AssetCheckSeverity.WARN
        assert warning.metadata["quarantined"].value == 2
        # The error checks account for the failure records: the run stays checked.
        assert all(
            e.passed
            for e in first.get_asset_check_evaluations()
            if e.check_name != warning.check_name
        )

        held = _run([asset], broken, instance, max_attempts=1)
        held_metadata = held.asset_materializations_for_node(OP)[0].metadata
        assert held_metadata["qwen3/run/rows_quarantined"].value == 2
        assert held_metadata["qwen3/run/rows_embedded"].value == 0

        healed = _resources(tmp_path)  # the model was fixed: replay them from the launchpad
        replayed = _run([asset], healed, instance, replay=["all"])
        replayed_metadata = replayed.asset_materializations_for_node(OP)[0].metadata
        assert replayed_metadata["qwen3/run/rows_retried"].value == 2
        assert replayed_metadata["qwen3/run/rows_inserted"].value == 2
        assert _table(tmp_path).count_rows() == ROWS


def test_a_watermark_asset_reads_changes_and_a_full_reconcile_reads_everything(
    tmp_path: Path,
    warehouse: Path,  # noqa: F811
) -> None:
    from dataclasses import replace

    from qwen3_pipeline.dagster.embedding_asset import build_embedding_asset
    from qwen3_pipeline.sources import DuckDBSource, Watermark
    from tests.test_dagster_assets import CONFIG, NO_RETRY, SPEC, TABLE

    asset = build_embedding_asset(
        key="document_vectors", source=lambda: DuckDBSource(warehouse, "documents"),
        source_config=replace(CONFIG, watermark=Watermark()), spec=SPEC, table=TABLE,
        partitioning=None, retry_policy=NO_RETRY,
    )  # fmt: skip
    with dg.instance_for_test() as instance:
        assert _run([asset], _resources(tmp_path), instance).success
        _execute(warehouse, "UPDATE documents SET text = text || ' edited', updated_at = "
                 "TIMESTAMP '2030-01-01' WHERE doc_id = 'doc:1'")  # fmt: skip
        changed = _run([asset], _resources(tmp_path), instance)
        metadata = changed.asset_materializations_for_node(OP)[0].metadata
        assert metadata["qwen3/run/read_rows"].value == 1
        assert metadata["qwen3/run/rows_updated"].value == 1
        assert metadata["qwen3/run/watermark_after"].value.startswith("2030-01-01")
        full = _run([asset], _resources(tmp_path), instance, full_reconcile=True)
        assert (
            full.asset_materializations_for_node(OP)[0].metadata["qwen3/run/rows_scanned"].value
            == ROWS
        )
