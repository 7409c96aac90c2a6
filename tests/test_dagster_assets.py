"""The embedding asset, its checks and the consumer assets, with the fake embedder (fast)."""

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.consumers import checks
from qwen3_pipeline.consumers.vector_search import (
    IndexPolicy,
    maintain_vector_index,
    near_duplicate_pairs,
    open_vector_table,
    plan_index_action,
    search,
)
from qwen3_pipeline.core.errors import (
    ConfigError,
    InputDataError,
    SpecMismatchError,
    StoreConflictError,
)
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.automation import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    all_partitions_tags,
    build_refresh_schedule,
)
from qwen3_pipeline.dagster.consumer_assets import (
    build_near_duplicates_asset,
    build_vector_index_asset,
)
from qwen3_pipeline.dagster.embedding_asset import (
    DRIFT_CHECK,
    BadInputFailure,
    HashShards,
    TimePartitioning,
    build_embedding_asset,
    is_transient,
)
from qwen3_pipeline.dagster.metadata import TABLE_CHECKED_VERSION, run_counters
from qwen3_pipeline.dagster.rebuild_gate import REBUILD_GATE_CHECK
from qwen3_pipeline.dagster.resources import (
    EmbedderLoadFailure,
    FakeEmbedderResource,
    LanceDBResource,
    Qwen3EmbedderResource,
)
from qwen3_pipeline.dagster.vectors import open_vectors
from qwen3_pipeline.embedding.interface import Embedder, EncodeResult
from qwen3_pipeline.sources import ArrowSource, DuckDBSource, Shards, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder, fake_vector
from tests import chunk_tables

ROWS = 120
SHARDS = 4
TABLE = "documents"
CONFIG = SourceConfig(
    key="doc_id", text_columns=("text",), updated_at="updated_at", carry=("title",)
)
NO_RETRY = dg.RetryPolicy(max_retries=2, delay=0)


def _fake(**kwargs) -> FakeEmbedderResource:
    return FakeEmbedderResource(dim=64, **kwargs)


SPEC = _fake().embedding_spec()


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    """A DuckDB file with a `documents` table shaped like the dbt model's."""
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        f"""
        CREATE TABLE documents AS
        SELECT 'doc:' || i::VARCHAR AS doc_id,
               'Title ' || i::VARCHAR AS title,
               'Document number ' || i::VARCHAR || ' about topic ' || (i % 7)::VARCHAR AS text,
               TIMESTAMP '2024-05-01 00:00:00' + to_hours(i % 48) AS updated_at
        FROM range({ROWS}) AS t(i)
        """
    )
    con.close()
    return path


def _execute(path: Path, sql: str) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute(sql)
    finally:
        con.close()


def _asset(warehouse: Path, **kwargs) -> dg.AssetsDefinition:
    options = {"partitioning": HashShards(SHARDS), "retry_policy": NO_RETRY, **kwargs}
    return build_embedding_asset(
        key="document_vectors",
        source=lambda: DuckDBSource(warehouse, "documents"),
        source_config=CONFIG,
        spec=SPEC,
        table=TABLE,
        **options,
    )


def _resources(tmp_path: Path, embedder: object | None = None) -> dict[str, object]:
    return {
        "embedder": embedder or _fake(),
        "lancedb": LanceDBResource(uri=str(tmp_path / "lancedb")),
    }


def _materialize(
    assets: Sequence[dg.AssetsDefinition],
    resources: dict[str, object],
    instance: dg.DagsterInstance,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets, resources=resources, instance=instance, tags=tags, raise_on_error=False
    )


def _by_partition(result: dg.ExecuteInProcessResult, key: str) -> dict[str, dict]:
    out = {}
    for event in result.get_asset_materialization_events():
        materialization = event.materialization
        if materialization.asset_key == dg.AssetKey(key):
            out[materialization.partition] = {
                k: getattr(v, "value", v) for k, v in materialization.metadata.items()
            }
    return out


def _table(tmp_path: Path):
    return lancedb.connect(str(tmp_path / "lancedb")).open_table(TABLE)


# --------------------------------------------------------------------------- the embedding asset


def test_direct_invocation_returns_metadata_checks_and_data_version(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.build_asset_context(resources=_resources(tmp_path)) as context:
        (first,) = asset(context)
    with dg.build_asset_context(resources=_resources(tmp_path)) as context:
        (second,) = asset(context)

    assert first.metadata["qwen3/rows_inserted"] == ROWS
    assert first.metadata["qwen3/rows_embedded"] == ROWS
    assert first.metadata["dagster/row_count"] == ROWS
    assert first.metadata["qwen3/table/name"] == TABLE
    assert (
        first.metadata["qwen3/table/lance_version"]
        > first.metadata["qwen3/run/lance_version_before"]
    )
    schema = first.metadata["dagster/column_schema"]
    assert {"key", "vector", "content_hash", "title"} <= {c.name for c in schema.columns}
    # The drift check compared nothing on the first fill (its canaries are recorded now): it
    # yields no result, so it is skipped, never passed.
    assert sorted(r.check_name for r in first.check_results) == sorted(
        [*checks.CHECK_NAMES, checks.NO_QUARANTINED_ROWS]
    )
    assert all(r.passed for r in first.check_results)
    # Nothing changed: nothing embedded, no commit, same data version.
    assert second.metadata["qwen3/rows_embedded"] == 0
    assert second.metadata["qwen3/run/committed"] is False
    assert (
        second.metadata["qwen3/table/lance_version"] == first.metadata["qwen3/table/lance_version"]
    )
    assert second.data_version == first.data_version


def test_definition_carries_partitions_policies_and_checks(warehouse: Path) -> None:
    asset = _asset(warehouse, retry_policy=dg.RetryPolicy(max_retries=3))
    assert asset.partitions_def.get_partition_keys() == [
        f"shard-{i:02d}-of-{SHARDS:02d}" for i in range(SHARDS)
    ]
    assert asset.backfill_policy == dg.BackfillPolicy.single_run()
    assert asset.code_versions_by_key[asset.key] == SPEC.fingerprint
    assert asset.op.pool == "gpu"
    assert asset.op.retry_policy.max_retries == 3
    specs = list(asset.check_specs)
    assert {s.name for s in specs} == {
        *checks.CHECK_NAMES,
        DRIFT_CHECK,
        REBUILD_GATE_CHECK,
        checks.NO_QUARANTINED_ROWS,
    }
    # Quarantined rows are a warning: that check never blocks downstream assets.
    assert not next(s for s in specs if s.name == checks.NO_QUARANTINED_ROWS).blocking
    assert all(s.blocking for s in specs if s.name != checks.NO_QUARANTINED_ROWS)
    with pytest.raises(ConfigError, match="partition must be None"):
        build_embedding_asset(
            key="x",
            source=ArrowSource(pa.table({"id": [1], "t": ["a"]})),
            source_config=SourceConfig(key="id", text_columns=("t",), partition=Shards(2)),
            spec=SPEC,
            table="t",
        )


def test_materialize_twice_second_run_embeds_nothing_and_commits_nothing(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse)
    instance = dg.DagsterInstance.ephemeral()
    tags = all_partitions_tags(asset.partitions_def)
    loads = FakeEmbedderResource.loads()

    first = _materialize([asset], _resources(tmp_path), instance, tags)
    assert first.success
    assert FakeEmbedderResource.loads() == loads + 1  # four shards, one run, one load
    events = _by_partition(first, "document_vectors")
    assert sorted(events) == asset.partitions_def.get_partition_keys()
    assert sum(m["qwen3/rows_inserted"] for m in events.values()) == ROWS
    assert sum(m["dagster/partition_row_count"] for m in events.values()) == ROWS
    one = next(iter(events.values()))
    assert one["qwen3/run/rows_inserted"] == ROWS
    assert one["dagster/row_count"] == ROWS
    version = one["qwen3/table/lance_version"]
    assert all(e.passed for e in first.get_asset_check_evaluations())

    second = _materialize([asset], _resources(tmp_path), instance, tags)
    assert second.success
    again = _by_partition(second, "document_vectors")
    assert sum(m["qwen3/rows_embedded"] for m in again.values()) == 0
    assert sum(m["qwen3/rows_unchanged"] for m in again.values()) == ROWS
    assert {m["qwen3/table/lance_version"] for m in again.values()} == {version}
    assert {m["qwen3/run/committed"] for m in again.values()} == {False}
    assert _table(tmp_path).version == version


def test_single_run_over_a_range_of_shards_loads_once_and_touches_only_them(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse)
    keys = asset.partitions_def.get_partition_keys()
    instance = dg.DagsterInstance.ephemeral()
    loads = FakeEmbedderResource.loads()
    result = _materialize(
        [asset],
        _resources(tmp_path),
        instance,
        {PARTITION_RANGE_START_TAG: keys[1], PARTITION_RANGE_END_TAG: keys[2]},
    )
    assert result.success
    assert FakeEmbedderResource.loads() == loads + 1
    assert len(instance.get_runs()) == 1
    events = _by_partition(result, "document_vectors")
    assert sorted(events) == keys[1:3]
    stored = _table(tmp_path).to_arrow()
    assert set(stored.column("partition_key").to_pylist()) == set(keys[1:3])
    assert stored.num_rows == sum(m["qwen3/rows_inserted"] for m in events.values())


def test_changed_and_deleted_rows_are_the_only_ones_written(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse)
    instance = dg.DagsterInstance.ephemeral()
    tags = all_partitions_tags(asset.partitions_def)
    assert _materialize([asset], _resources(tmp_path), instance, tags).success
    _execute(warehouse, "UPDATE documents SET text = text || ' (revised)' WHERE doc_id IN "
             "('doc:1', 'doc:2', 'doc:3')")  # fmt: skip
    _execute(warehouse, "UPDATE documents SET title = 'Renamed' WHERE doc_id = 'doc:4'")
    _execute(warehouse, "DELETE FROM documents WHERE doc_id = 'doc:5'")

    result = _materialize([asset], _resources(tmp_path), instance, tags)
    assert result.success
    totals = run_counters(next(iter(_by_partition(result, "document_vectors").values())))
    assert totals["updated"] == 3
    assert totals["embedded"] == 3
    assert totals["carry_updated"] == 1
    assert totals["deleted"] == 1
    assert totals["inserted"] == 0
    assert all(e.passed for e in result.get_asset_check_evaluations())
    stored = _table(tmp_path).to_arrow()
    assert stored.num_rows == ROWS - 1
    assert "doc:5" not in stored.column("key").to_pylist()


class _OffNormEmbedder:
    """Wraps the fake and returns vectors of norm 2: the unit-vector check must fail."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner

    @property
    def spec(self) -> EmbeddingSpec:
        return self._inner.spec

    def embed_documents(self, texts: Sequence[str]) -> EncodeResult:
        result = self._inner.embed_documents(texts)
        return EncodeResult(
            vectors=result.vectors * 2.0,
            n_tokens=result.n_tokens,
            truncated=result.truncated,
            failures=result.failures,
            stats=result.stats,
        )

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        return self._inner.embed_queries(queries)


class OffNormEmbedderResource(FakeEmbedderResource):
    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        return _OffNormEmbedder(super().load_embedder(spec))


def test_failing_blocking_check_stops_downstream_assets(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(warehouse, partitioning=None)
    index = build_vector_index_asset(embedding_asset=asset, retry_policy=None)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(
        [asset, index], _resources(tmp_path, OffNormEmbedderResource(dim=64)), instance
    )

    assert not result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations[checks.UNIT_VECTORS].passed
    assert evaluations[checks.UNIT_VECTORS].metadata["bad_rows"].value == ROWS
    assert evaluations[checks.COVERS_SOURCE].passed
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialized == {asset.key}  # recorded, but the index never ran
    started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    assert started == ["document_vectors"]
    # A failed check is not a transient error: the step is not retried.
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_bad_input_fails_without_retry(tmp_path: Path, warehouse: Path) -> None:
    _execute(warehouse, "UPDATE documents SET doc_id = 'doc:1' WHERE doc_id = 'doc:2'")
    asset = _asset(warehouse)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(
        [asset], _resources(tmp_path), instance, all_partitions_tags(asset.partitions_def)
    )

    assert not result.success
    types = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" not in types
    assert types.count("STEP_START") == 1
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    assert "duplicate keys" in error.message
    assert "'doc:1' (2 rows)" in error.message
    assert failure.step_failure_data.user_failure_data.metadata["error"].value == "InputDataError"
    assert not result.get_asset_materialization_events()
    assert TABLE not in lancedb.connect(str(tmp_path / "lancedb")).list_tables().tables


class _FlakySource:
    """A source whose first read fails with ``error`` (a timeout by default), then works."""

    def __init__(self, inner: DuckDBSource, error: Exception | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        self._error = error or TimeoutError("source read timed out")

    def schema(self) -> pa.Schema:
        return self._inner.schema()

    def key_problems(self, key: str, limit: int):
        return self._inner.key_problems(key, limit)

    def batches(self, columns: Sequence[str], batch_rows: int):
        if not _FLAKY_CALLS:
            _FLAKY_CALLS.append(1)
            raise self._error
        yield from self._inner.batches(columns, batch_rows)


_FLAKY_CALLS: list[int] = []


def test_transient_failure_is_retried(tmp_path: Path, warehouse: Path) -> None:
    _FLAKY_CALLS.clear()
    asset = build_embedding_asset(
        key="document_vectors",
        source=lambda: _FlakySource(DuckDBSource(warehouse, "documents")),
        source_config=CONFIG,
        spec=SPEC,
        table=TABLE,
        partitioning=None,
        retry_policy=NO_RETRY,
    )
    result = _materialize([asset], _resources(tmp_path), dg.DagsterInstance.ephemeral())
    assert result.success
    types = [e.event_type_value for e in result.all_events]
    assert types.count("STEP_UP_FOR_RETRY") == 1
    assert _table(tmp_path).count_rows() == ROWS


def test_a_bug_is_not_retried(tmp_path: Path, warehouse: Path) -> None:
    _FLAKY_CALLS.clear()
    asset = build_embedding_asset(
        key="document_vectors",
        source=lambda: _FlakySource(
            DuckDBSource(warehouse, "documents"), RuntimeError("lock held (a bug, not a lock)")
        ),
        source_config=CONFIG,
        spec=SPEC,
        table=TABLE,
        partitioning=None,
        retry_policy=NO_RETRY,
    )
    result = _materialize([asset], _resources(tmp_path), dg.DagsterInstance.ephemeral())
    assert not result.success
    types = [e.event_type_value for e in result.all_events]
    assert types.count("STEP_UP_FOR_RETRY") == 0
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "internal error: RuntimeError" in str(failure.event_specific_data)


def test_error_classification_uses_the_type_only() -> None:
    from qwen3_pipeline.core.errors import SourceUnavailableError, StoreError
    from qwen3_pipeline.store import store_error

    assert is_transient(StoreConflictError("conflict"))
    assert is_transient(SourceUnavailableError("DuckDB file is locked"))
    assert is_transient(store_error(RuntimeError("Retryable commit conflict for version 7"), "x"))
    incompatible = (
        "lance error: Incompatible transaction: This Merge transaction is incompatible with "
        "concurrent transaction UpdateConfig at version 2."
    )
    assert is_transient(store_error(RuntimeError(incompatible), "x"))
    assert is_transient(store_error(OSError("connection reset by peer"), "x"))
    # A message that merely contains a marker word is not transient: the type decides.
    assert not is_transient(ConfigError("could not set lock; non-retryable"))
    assert not is_transient(store_error(RuntimeError("non-retryable: schema mismatch"), "x"))
    assert not is_transient(StoreError("the vector table holds duplicate keys"))
    assert not is_transient(InputDataError("duplicate keys"))
    assert not is_transient(SpecMismatchError("other spec"))
    assert not is_transient(RuntimeError("a bug"))
    failure = BadInputFailure(InputDataError("bad"))
    assert isinstance(failure, dg.Failure)
    assert failure.allow_retries is False


def test_resource_spec_must_match_the_asset_spec(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(warehouse, partitioning=None)
    result = _materialize(
        [asset], _resources(tmp_path, FakeEmbedderResource(dim=32)), dg.DagsterInstance.ephemeral()
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "configure both from the same settings" in failure.step_failure_data.error.message


def test_missing_model_fails_the_run_with_how_to_fix(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(warehouse, partitioning=None)
    missing = Qwen3EmbedderResource(model=str(tmp_path / "no-such-model"))
    with pytest.raises(EmbedderLoadFailure) as caught:
        missing.setup_for_execution(dg.build_init_resource_context())
    assert "does not exist" in caught.value.description
    assert caught.value.allow_retries is False
    assert "QWEN3_PIPELINE_MODEL" in caught.value.description
    assert caught.value.metadata["model"].value == str(tmp_path / "no-such-model")

    result = _materialize([asset], _resources(tmp_path, missing), dg.DagsterInstance.ephemeral())
    assert not result.success
    init_failure = next(
        e for e in result.all_events if e.event_type_value == "RESOURCE_INIT_FAILURE"
    )
    shown = str(init_failure.engine_event_data.error.to_string())
    assert "no-such-model" in shown
    assert "local Qwen3-Embedding checkpoint" in shown


def test_time_partitions_refresh_their_windows(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(
        warehouse,
        partitioning=TimePartitioning(column="updated_at", start="2024-05-01", grain="day"),
    )
    assert isinstance(asset.partitions_def, dg.DailyPartitionsDefinition)
    result = _materialize(
        [asset],
        _resources(tmp_path),
        dg.DagsterInstance.ephemeral(),
        {PARTITION_RANGE_START_TAG: "2024-05-01", PARTITION_RANGE_END_TAG: "2024-05-02"},
    )
    assert result.success
    events = _by_partition(result, "document_vectors")
    assert sorted(events) == ["2024-05-01", "2024-05-02"]
    # updated_at = 2024-05-01 + (i % 48) hours: i % 48 < 24 falls on the first day.
    first_day = sum(1 for i in range(ROWS) if i % 48 < 24)
    assert [events[k]["qwen3/rows_inserted"] for k in sorted(events)] == [
        first_day,
        ROWS - first_day,
    ]
    assert all(e.passed for e in result.get_asset_check_evaluations())


def test_schedule_refreshes_every_shard_in_one_run(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(warehouse)
    index = build_vector_index_asset(embedding_asset=asset)
    schedule = build_refresh_schedule(name="hourly", embedding_asset=asset, downstream=[index])
    defs = dg.Definitions(
        assets=[asset, index], schedules=[schedule], resources=_resources(tmp_path)
    )
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2025, 1, 1, 10)
    ) as context:
        request = defs.resolve_schedule_def("hourly").evaluate_tick(context).run_requests[0]
    keys = asset.partitions_def.get_partition_keys()
    assert request.tags[PARTITION_RANGE_START_TAG] == keys[0]
    assert request.tags[PARTITION_RANGE_END_TAG] == keys[-1]

    loads = FakeEmbedderResource.loads()
    result = defs.resolve_job_def("hourly_job").execute_in_process(
        instance=instance, tags=request.tags
    )
    assert result.success
    assert FakeEmbedderResource.loads() == loads + 1
    assert sorted(_by_partition(result, "document_vectors")) == keys
    assert _by_partition(result, "document_vectors_index")[None]["dagster/row_count"] == ROWS


# --------------------------------------------------------------------------- checks


def _refreshed_table(tmp_path: Path, warehouse: Path):
    asset = _asset(warehouse, partitioning=None)
    with dg.build_asset_context(resources=_resources(tmp_path)) as context:
        list(asset(context))
    return _table(tmp_path)


def _run_checks(table, warehouse: Path) -> dict[str, checks.CheckOutcome]:
    report = checks.run_checks(
        table=table,
        source=DuckDBSource(warehouse, "documents"),
        config=CONFIG,
        fingerprint=SPEC.fingerprint,
    )
    return {o.name: o for o in report.outcomes}


def test_checks_detect_stale_missing_duplicate_and_foreign_rows(
    tmp_path: Path, warehouse: Path
) -> None:
    table = _refreshed_table(tmp_path, warehouse)
    assert all(o.passed for o in _run_checks(table, warehouse).values())

    table.update(where="key = 'doc:1'", values={"content_hash": "0" * 32})
    table.update(where="key = 'doc:2'", values={"spec_fingerprint": "ffffffffffffffff"})
    table.delete("key = 'doc:3'")
    outcomes = _run_checks(table, warehouse)
    assert not outcomes[checks.NOT_STALE].passed
    assert outcomes[checks.NOT_STALE].metadata["stale_keys"] == ["doc:1"]
    assert not outcomes[checks.COVERS_SOURCE].passed
    assert outcomes[checks.COVERS_SOURCE].metadata["missing_keys"] == ["doc:3"]
    assert not outcomes[checks.SINGLE_SPEC].passed
    assert outcomes[checks.SINGLE_SPEC].metadata["rows_by_fingerprint"]["ffffffffffffffff"] == 1
    assert outcomes[checks.UNIQUE_KEYS].passed

    duplicate = table.search().where("key = 'doc:4'").limit(1).to_arrow()
    table.add(duplicate)
    outcome = checks.check_unique_keys(table)
    assert not outcome.passed
    assert outcome.metadata["repeated_keys"] == ["doc:4"]


def test_state_digest_is_order_independent_and_content_sensitive() -> None:
    rows = pa.table({"key": ["a", "b"], "content_hash": ["1", "2"], "spec_fingerprint": ["f", "f"]})
    assert checks.state_digest(rows) == checks.state_digest(rows.take([1, 0]))
    changed = rows.set_column(1, "content_hash", pa.array(["1", "3"]))
    assert checks.state_digest(changed) != checks.state_digest(rows)


# Tables of document chunks, built by hand (tests/chunk_tables.py): document key -> its chunks.
CHUNK_DOCS = {1: [0.9, 0.8, 0.7], 2: [0.6, 0.5], 3: [0.4]}


def _chunk_table(tmp_path: Path):
    return chunk_tables.write_chunk_table(tmp_path, "chunks", fake_vector("q", 32), CHUNK_DOCS)


def _chunk_checks(table, source=None) -> tuple[checks.CheckReport, dict[str, checks.CheckOutcome]]:
    report = checks.run_checks(
        table=table,
        source=source or chunk_tables.source_of(CHUNK_DOCS),
        config=chunk_tables.SOURCE_CONFIG,
        fingerprint=chunk_tables.CHUNK_SPEC.fingerprint,
    )
    return report, {o.name: o for o in report.outcomes}


def test_checks_of_a_chunk_table_count_documents(tmp_path: Path) -> None:
    assert checks.check_names(chunked=False) == checks.CHECK_NAMES
    # A blank source document has no chunks and is not expected to.
    keys = [*CHUNK_DOCS, 9]
    source = pa.table(
        {
            "id": keys,
            "body": [chunk_tables.document_text(k, len(CHUNK_DOCS.get(k, []))) for k in keys],
            "title": [chunk_tables.title(k) for k in keys],
        }
    )
    report, outcomes = _chunk_checks(_chunk_table(tmp_path), ArrowSource(source))
    assert [o.name for o in report.outcomes] == list(checks.check_names(chunked=True))
    assert report.passed, [o.description for o in report.outcomes if not o.passed]
    assert (report.stored_rows, report.stored_documents, report.source_rows) == (6, 3, 3)
    assert outcomes[checks.COVERS_SOURCE].metadata["stored_documents"] == 3
    assert outcomes[checks.CHUNKS_CONSISTENT].metadata["documents"] == 3


def test_chunk_checks_catch_a_mixed_version_document_and_a_missing_one(tmp_path: Path) -> None:
    table = _chunk_table(tmp_path)
    # Chunk 1 of document 2 left over from an older version of it; document 3 lost.
    table.update(where="key = '2#1'", values={"content_hash": "0" * 32})
    table.delete("doc_key = 3")
    _, outcomes = _chunk_checks(table)
    consistent = outcomes[checks.CHUNKS_CONSISTENT]
    assert not consistent.passed
    assert consistent.metadata["mixed_version_documents"] == [2]
    assert consistent.metadata["broken_sequences"] == 0
    assert not outcomes[checks.NOT_STALE].passed
    assert outcomes[checks.NOT_STALE].metadata["stale"] == 1
    assert outcomes[checks.NOT_STALE].metadata["stale_keys"] == [2]
    coverage = outcomes[checks.COVERS_SOURCE]
    assert not coverage.passed
    assert coverage.metadata["missing_keys"] == [3]
    assert coverage.metadata["extra"] == 0
    assert "1 source document(s) have no chunk" in coverage.description
    for name in (checks.UNIQUE_KEYS, checks.SINGLE_SPEC, checks.UNIT_VECTORS):
        assert outcomes[name].passed, outcomes[name].description


def test_chunk_checks_catch_gaps_wrong_keys_and_foreign_documents(tmp_path: Path) -> None:
    table = _chunk_table(tmp_path)
    table.delete("key = '1#1'")
    table.update(where="key = '3#0'", values={"key": "3-0"})
    foreign = chunk_tables.chunk_rows(
        chunk_tables.CHUNK_SPEC, fake_vector("q", 32), {7: [0.1, 0.2]}
    )
    table.add(foreign)
    _, outcomes = _chunk_checks(table)
    consistent = outcomes[checks.CHUNKS_CONSISTENT].metadata
    assert consistent["broken_sequence_documents"] == [1]
    assert consistent["wrong_chunk_keys"] == ["3-0"]
    assert consistent["mixed_versions"] == 0
    coverage = outcomes[checks.COVERS_SOURCE]
    assert coverage.metadata["extra_keys"] == [7]
    assert coverage.metadata["missing"] == 0
    assert outcomes[checks.NOT_STALE].passed


# --------------------------------------------------------------------------- consumers


def test_plan_index_action() -> None:
    policy = IndexPolicy(min_rows=100, max_fragments=4)
    plan = lambda **kw: plan_index_action(policy=policy, **kw)  # noqa: E731
    assert plan(row_count=99, has_index=False, unindexed_rows=0, fragments=1) == "brute_force"
    assert plan(row_count=99, has_index=False, unindexed_rows=0, fragments=9) == "compacted"
    assert plan(row_count=100, has_index=False, unindexed_rows=0, fragments=1) == "created"
    assert plan(row_count=500, has_index=True, unindexed_rows=3, fragments=1) == "optimized"
    assert plan(row_count=500, has_index=True, unindexed_rows=0, fragments=1) == "up_to_date"


def test_index_is_created_past_the_threshold_then_kept_current(
    tmp_path: Path, warehouse: Path
) -> None:
    table = _refreshed_table(tmp_path, warehouse)
    assert maintain_vector_index(table, IndexPolicy(min_rows=ROWS + 1)).action == "brute_force"
    created = maintain_vector_index(table, IndexPolicy(min_rows=ROWS))
    assert created.action == "created"
    assert created.index_name
    idle = maintain_vector_index(table, IndexPolicy(min_rows=ROWS))
    assert idle.action == "up_to_date"
    assert idle.version_after == idle.version_before  # no commit when nothing to do
    table.add(table.search().where("key = 'doc:1'").limit(1).to_arrow().set_column(
        0, "key", pa.array(["doc:new"])
    ))  # fmt: skip
    folded = maintain_vector_index(table, IndexPolicy(min_rows=ROWS))
    assert folded.action == "optimized"
    assert folded.unindexed_rows == 0


def test_near_duplicate_pairs_are_exact_and_reported_once() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors[10] = vectors[3]
    vectors[20] = vectors[3] * 3.0  # same direction, other norm
    keys = pa.array([f"k{i}" for i in range(50)])
    pairs = near_duplicate_pairs(keys, vectors, threshold=0.999, max_block_cells=64)
    found = {tuple(sorted((r["key_a"], r["key_b"]))) for r in pairs.to_pylist()}
    assert found == {("k10", "k3"), ("k20", "k3"), ("k10", "k20")}
    assert pairs.num_rows == 3
    assert all(abs(s - 1.0) < 1e-5 for s in pairs.column("similarity").to_pylist())


class _QueriesAsDocuments(FakeEmbedder):
    """Embeds a query like a document, so searching a document's text finds that document."""

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        return self.embed_documents(queries)


def test_open_vectors_pins_the_materialized_version_and_search_uses_its_spec(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse, partitioning=None)
    index = build_vector_index_asset(embedding_asset=asset)
    near = build_near_duplicates_asset(
        embedding_asset=asset,
        duckdb_path=lambda: tmp_path / "reports.duckdb",
        index_asset=index,
        threshold=0.999,
    )
    _execute(warehouse, "UPDATE documents SET text = 'Document number 0 about topic 0' "
             "WHERE doc_id = 'doc:7'")  # fmt: skip
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize([asset, index, near], _resources(tmp_path), instance)
    assert result.success
    recorded = _by_partition(result, "document_vectors")[None]["qwen3/table/lance_version"]

    # A later write (outside the pipeline, never checked) does not move what readers see:
    # they read the newest checked version, the one the run recorded.
    _table(tmp_path).delete("key = 'doc:9'")
    vectors = open_vectors("document_vectors", instance=instance, index_asset_key=index.key)
    assert vectors.version == recorded
    assert vectors.checked is True
    assert vectors.count_rows() == ROWS
    assert vectors.spec.fingerprint == SPEC.fingerprint
    assert open_vector_table(str(tmp_path / "lancedb"), TABLE).count_rows() == ROWS
    latest = _table(tmp_path).version
    assert open_vector_table(str(tmp_path / "lancedb"), TABLE, version=latest).count_rows() == (
        ROWS - 1
    )

    hits = search(
        vectors, "Document number 42 about topic 0", k=3, embedder=_QueriesAsDocuments(SPEC)
    )
    assert hits.column("key").to_pylist()[0] == "doc:42"
    assert hits.column("similarity").to_pylist()[0] == pytest.approx(1.0, abs=1e-5)
    assert {"title", "similarity"} <= set(hits.column_names)
    with pytest.raises(SpecMismatchError, match="query embedder"):
        search(vectors, "x", embedder=FakeEmbedder(EmbeddingSpec(model=SPEC.model, dim=32)))

    # The near-duplicate report found the two identical documents.
    con = duckdb.connect(str(tmp_path / "reports.duckdb"), read_only=True)
    rows = con.execute("SELECT key_a, key_b, title_a, title_b FROM near_duplicates").fetchall()
    con.close()
    assert rows == [("doc:0", "doc:7", "Title 0", "Title 7")]


# --------------------------------------------------------------------------- drift canary


class _DriftingFake(FakeEmbedder):
    """A fake whose vectors depend on a 'weights' salt (new weights under the same name)."""

    def __init__(self, spec, salt: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(spec)
        self.salt = salt

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        return super().embed_documents([f"{self.salt}{t}" for t in texts], on_batch=on_batch)


class _DriftingResource(FakeEmbedderResource):
    salt: str = ""

    def load_embedder(self, spec):  # type: ignore[no-untyped-def]
        return _DriftingFake(spec, self.salt)


def test_drift_fails_the_canary_check_before_any_write(tmp_path: Path, warehouse: Path) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.instance_for_test() as instance:
        first = _materialize([asset], _resources(tmp_path, _DriftingResource(dim=64)), instance)
        assert first.success
        # First fill: canaries recorded, nothing to compare yet: skipped (no evaluation).
        assert [e for e in first.get_asset_check_evaluations() if e.check_name == DRIFT_CHECK] == []
        tables = lancedb.connect(str(tmp_path / "lancedb")).list_tables().tables
        assert f"{TABLE}__canary" in tables
        version = _table(tmp_path).version
        _execute(
            warehouse, "UPDATE documents SET text = text || ' (edited)' WHERE doc_id = 'doc:3'"
        )
        same = _materialize([asset], _resources(tmp_path, _DriftingResource(dim=64)), instance)
        (evaluation,) = [
            e for e in same.get_asset_check_evaluations() if e.check_name == DRIFT_CHECK
        ]
        assert evaluation.passed
        assert evaluation.metadata["qwen3/canary_min_cosine"].value >= 0.999
        version = _table(tmp_path).version
        _execute(warehouse, "UPDATE documents SET text = text || ' (again)' WHERE doc_id = 'doc:4'")
        drifted = _materialize(
            [asset], _resources(tmp_path, _DriftingResource(dim=64, salt="new weights ")), instance
        )
        assert not drifted.success
        (evaluation,) = [
            e for e in drifted.get_asset_check_evaluations() if e.check_name == DRIFT_CHECK
        ]
        assert not evaluation.passed
        assert "no longer reproduces" in (evaluation.description or "")
        assert _table(tmp_path).version == version  # nothing written
        types = [e.event_type_value for e in drifted.all_events]
        assert types.count("STEP_UP_FOR_RETRY") == 0


def _drift_check_status(instance: dg.DagsterInstance, run_id: str) -> str:
    """The drift check's status in run ``run_id`` as the UI resolves it (e.g. ``SKIPPED``)."""
    import asyncio

    from dagster._core.loader import LoadingContextForTest

    key = dg.AssetCheckKey(dg.AssetKey("document_vectors"), DRIFT_CHECK)
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=20)
    (record,) = [r for r in history if r.run_id == run_id]
    return asyncio.run(record.resolve_status(LoadingContextForTest(instance))).value


def test_a_drift_check_that_compared_nothing_is_skipped_not_passed(
    tmp_path: Path, warehouse: Path
) -> None:
    asset = _asset(warehouse, partitioning=None)
    with dg.instance_for_test() as instance:
        first = _materialize([asset], _resources(tmp_path), instance)
        assert first.success
        assert _drift_check_status(instance, first.run_id) == "SKIPPED"  # canaries recorded
        _execute(
            warehouse, "UPDATE documents SET text = text || ' (edited)' WHERE doc_id = 'doc:1'"
        )
        edited = _materialize([asset], _resources(tmp_path), instance)
        assert _drift_check_status(instance, edited.run_id) == "SUCCEEDED"  # compared: passed

        noop = _materialize([asset], _resources(tmp_path), instance)
        assert noop.success
        evaluations = noop.get_asset_check_evaluations()
        assert DRIFT_CHECK not in {e.check_name for e in evaluations}
        assert all(e.passed for e in evaluations)
        assert _drift_check_status(instance, noop.run_id) == "SKIPPED"
        # The checked-version tag follows the checks that evaluated, which all passed.
        (event,) = noop.get_asset_materialization_events()
        metadata = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
        assert metadata[TABLE_CHECKED_VERSION] == metadata["qwen3/table/lance_version"]

        alone = dg.materialize(
            [asset],
            selection=dg.AssetSelection.checks_for_assets(asset),
            resources=_resources(tmp_path),
            instance=instance,
        )
        assert _drift_check_status(instance, alone.run_id) == "SKIPPED"  # the model never loads


def test_report_warnings_are_shown_as_run_metadata() -> None:
    from qwen3_pipeline.dagster.metadata import WARNINGS, run_metadata
    from qwen3_pipeline.engine.report import RefreshReport

    assert WARNINGS == "qwen3/warnings"
    assert WARNINGS not in run_metadata(RefreshReport(table_name="docs"))
    shown = run_metadata(RefreshReport(table_name="docs", warnings=["donor x could not be read"]))
    assert shown[WARNINGS] == dg.MetadataValue.md("- donor x could not be read")
