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
