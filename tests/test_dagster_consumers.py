"""The consumer assets skip their work while the vector table version is unchanged.

Real Dagster (one instance shared by successive ``dg.materialize`` calls, as the schedule's
hourly runs share the deployment's), real LanceDB and DuckDB, the fake embedder.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from qwen3_pipeline.consumers.vector_search import IndexPolicy
from qwen3_pipeline.dagster import consumer_assets as consumers
from qwen3_pipeline.dagster.consumer_assets import (
    Decision,
    PreviousMaterialization,
    ProcessedState,
    build_near_duplicates_asset,
    build_vector_index_asset,
    decide,
)
from qwen3_pipeline.dagster.embedding_asset import build_embedding_asset
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, LanceDBResource
from qwen3_pipeline.sources import DuckDBSource, SourceConfig

ROWS = 120
CONFIG = SourceConfig(
    key="doc_id", text_columns=("text",), updated_at="updated_at", carry=("title",)
)
INDEX = dg.AssetKey("document_vectors_index")
NEAR = dg.AssetKey("near_duplicate_documents")
FORCE = {"force": True}


def _execute(path: Path, sql: str) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute(sql)
    finally:
        con.close()


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    """Source documents; doc:7 has the text of doc:0, so the report has one pair."""
    path = tmp_path / "warehouse.duckdb"
    _execute(
        path,
        f"""
        CREATE TABLE documents AS
        SELECT 'doc:' || i::VARCHAR AS doc_id,
               'Title ' || i::VARCHAR AS title,
               'Document number ' || (CASE WHEN i = 7 THEN 0 ELSE i END)::VARCHAR
                   || ' about topic ' || (CASE WHEN i = 7 THEN 0 ELSE i % 7 END)::VARCHAR
                   AS text,
               TIMESTAMP '2024-05-01 00:00:00' + to_hours(i % 48) AS updated_at
        FROM range({ROWS}) AS t(i)
        """,
    )
    return path


class Pipeline:
    """The embedding asset, its index and the near-duplicate report, run on one instance."""

    def __init__(self, tmp_path: Path, warehouse: Path, **near_options: Any) -> None:
        fake = FakeEmbedderResource(dim=64)
        self.reports = tmp_path / "reports.duckdb"
        self.embedding = build_embedding_asset(
            key="document_vectors",
            source=lambda: DuckDBSource(warehouse, "documents"),
            source_config=CONFIG,
            spec=fake.embedding_spec(),
            table="documents",
            partitioning=None,
            retry_policy=None,
        )
        # min_rows=ROWS: the first run creates the index, i.e. the index asset commits a
        # version of its own, which the next run must compare against.
        self.index = build_vector_index_asset(
            embedding_asset=self.embedding,
            policy=IndexPolicy(min_rows=ROWS),
            retry_policy=None,
        )
        self.near = build_near_duplicates_asset(
            embedding_asset=self.embedding,
            duckdb_path=lambda: self.reports,
            index_asset=self.index,
            **({"threshold": 0.999} | near_options),
        )
        self.resources: dict[str, Any] = {
            "embedder": fake,
            "lancedb": LanceDBResource(uri=str(tmp_path / "lancedb")),
        }

    def run(
        self,
        instance: dg.DagsterInstance,
        *,
        index_config: dict[str, Any] | None = None,
        near_config: dict[str, Any] | None = None,
    ) -> dg.ExecuteInProcessResult:
        ops = {
            name: {"config": config}
            for name, config in (
                ("document_vectors_index", index_config),
                ("near_duplicate_documents", near_config),
            )
            if config is not None
        }
        result = dg.materialize(
            [self.embedding, self.index, self.near],
            resources=self.resources,
            instance=instance,
            run_config={"ops": ops} if ops else None,
        )
        assert result.success
        return result

    def live_version(self) -> int:
        return int(self.resources["lancedb"].open_table("documents").version)

    def report_rows(self) -> list[tuple]:
        con = duckdb.connect(str(self.reports), read_only=True)
        try:
            return con.execute(
                "SELECT key_a, key_b, lance_version, computed_at FROM near_duplicates "
                "ORDER BY key_a, key_b"
            ).fetchall()
        finally:
            con.close()


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    (event,) = [
        e for e in result.get_asset_materialization_events() if e.materialization.asset_key == key
    ]
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def _data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    record = instance.get_latest_data_version_record(key)
    assert record is not None
    materialization = record.asset_materialization
    assert materialization is not None
    return materialization.tags.get("dagster/data_version") if materialization.tags else None


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each call of the index upkeep and the O(n^2) pair search."""
    calls: list[str] = []
    upkeep, pairs = consumers.maintain_vector_index, consumers.near_duplicate_report

    def counted_upkeep(*args: Any, **kwargs: Any) -> Any:
        calls.append("index")
        return upkeep(*args, **kwargs)

    def counted_pairs(*args: Any, **kwargs: Any) -> Any:
        calls.append("pairs")
        return pairs(*args, **kwargs)

    monkeypatch.setattr(consumers, "maintain_vector_index", counted_upkeep)
    monkeypatch.setattr(consumers, "near_duplicate_report", counted_pairs)
    return calls


def test_unchanged_table_version_skips_both_assets_and_says_so(
    tmp_path: Path, warehouse: Path, work: list[str]
) -> None:
    pipeline = Pipeline(tmp_path, warehouse)
    instance = dg.DagsterInstance.ephemeral()
    first = pipeline.run(instance)
    index1, near1 = _metadata(first, INDEX), _metadata(first, NEAR)
    assert work == ["index", "pairs"]
    assert index1["qwen3/index_action"] == "created"
    # The index commit moved the table on; the recorded version is the one after it.
    assert index1["qwen3/lance_version"] == index1["qwen3/upstream_lance_version"] + 1
    assert near1["qwen3/lance_version"] == index1["qwen3/lance_version"]
    for metadata in (index1, near1):
        assert metadata["qwen3/skipped"] is False
        assert metadata["qwen3/reason"] == "first materialization"
        assert metadata["qwen3/computed_run_id"] == first.run_id
    rows = pipeline.report_rows()
    assert [(a, b) for a, b, *_ in rows] == [("doc:0", "doc:7")]
    versions = {key: _data_version(instance, key) for key in (INDEX, NEAR)}
    assert versions[INDEX] == f"lance-v{index1['qwen3/lance_version']}"
    assert str(versions[NEAR]).startswith(f"lance-v{index1['qwen3/lance_version']}-")

    # Next tick: the source did not change, so the embedding asset commits nothing.
    second = pipeline.run(instance)
    assert pipeline.live_version() == index1["qwen3/lance_version"]
    assert work == ["index", "pairs"]  # neither the upkeep nor the pair search ran again
    index2, near2 = _metadata(second, INDEX), _metadata(second, NEAR)
    version = index1["qwen3/lance_version"]
    for metadata in (index2, near2):
        assert metadata["qwen3/skipped"] is True
        assert metadata["qwen3/reason"] == (
            f"table 'documents' version {version} unchanged since run {first.run_id[:8]}"
        )
        assert metadata["qwen3/computed_run_id"] == first.run_id
        assert metadata["qwen3/lance_version"] == version
    assert index2["qwen3/index_action"] == "skipped"
    assert index2["qwen3/index_name"] == index1["qwen3/index_name"]
    assert index2["dagster/row_count"] == ROWS
    # The report's metadata describes the kept table, which is left exactly as it was.
    assert near2["dagster/row_count"] == near1["dagster/row_count"] == 1
    assert near2["qwen3/top_pairs"] == near1["qwen3/top_pairs"]
    assert pipeline.report_rows() == rows
    # Same data versions: nothing downstream of the two assets becomes stale.
    assert {key: _data_version(instance, key) for key in (INDEX, NEAR)} == versions

    # A skipped run's successor still names the run that did the work.
    third = pipeline.run(instance)
    assert _metadata(third, NEAR)["qwen3/computed_run_id"] == first.run_id
    assert work == ["index", "pairs"]


def test_a_new_table_version_recomputes(tmp_path: Path, warehouse: Path, work: list[str]) -> None:
    pipeline = Pipeline(tmp_path, warehouse)
    instance = dg.DagsterInstance.ephemeral()
    first = pipeline.run(instance)
    before = _metadata(first, INDEX)["qwen3/lance_version"]
    versions = {key: _data_version(instance, key) for key in (INDEX, NEAR)}
    _execute(
        warehouse,
        "UPDATE documents SET text = 'Document number 0 about topic 0', "
        "updated_at = TIMESTAMP '2024-06-01' WHERE doc_id = 'doc:9'",
    )

    second = pipeline.run(instance)
    assert work == ["index", "pairs", "index", "pairs"]
    index2, near2 = _metadata(second, INDEX), _metadata(second, NEAR)
    since = f"since run {first.run_id[:8]}"
    written = index2["qwen3/upstream_lance_version"]
    assert written > before
    assert index2["qwen3/skipped"] is False
    assert index2["qwen3/reason"] == f"table 'documents' version {before} -> {written} {since}"
    assert index2["qwen3/index_action"] == "optimized"
    assert near2["qwen3/skipped"] is False
    assert near2["qwen3/reason"] == (
        f"table 'documents' version {before} -> {index2['qwen3/lance_version']} {since}"
    )
    assert near2["qwen3/computed_run_id"] == second.run_id
    assert [(a, b) for a, b, *_ in pipeline.report_rows()] == [
        ("doc:0", "doc:7"),
        ("doc:0", "doc:9"),
        ("doc:7", "doc:9"),
    ]
    for key in (INDEX, NEAR):
        assert _data_version(instance, key) != versions[key]


def test_force_recomputes_an_unchanged_version(
    tmp_path: Path, warehouse: Path, work: list[str]
) -> None:
    pipeline = Pipeline(tmp_path, warehouse)
    instance = dg.DagsterInstance.ephemeral()
    pipeline.run(instance)
    computed_at = pipeline.report_rows()[0][3]

    forced = pipeline.run(instance, index_config=FORCE, near_config=FORCE)
    assert work == ["index", "pairs", "index", "pairs"]
    for key in (INDEX, NEAR):
        metadata = _metadata(forced, key)
        assert metadata["qwen3/skipped"] is False
        assert metadata["qwen3/reason"] == "forced by run config (force: true)"
        assert metadata["qwen3/computed_run_id"] == forced.run_id
    assert _metadata(forced, INDEX)["qwen3/index_action"] == "up_to_date"
    assert pipeline.report_rows()[0][3] > computed_at  # rewritten

    # force: false is the default, spelled out here as the launchpad shows it.
    pipeline.run(instance, index_config={"force": False}, near_config={"force": False})
    assert work == ["index", "pairs", "index", "pairs"]


def test_a_dropped_report_table_is_rebuilt_although_the_version_is_unchanged(
    tmp_path: Path, warehouse: Path, work: list[str]
) -> None:
    pipeline = Pipeline(tmp_path, warehouse)
    instance = dg.DagsterInstance.ephemeral()
    pipeline.run(instance)
    _execute(pipeline.reports, "DROP TABLE near_duplicates")

    second = pipeline.run(instance)
    assert work == ["index", "pairs", "pairs"]  # the index upkeep stays skipped
    assert _metadata(second, INDEX)["qwen3/skipped"] is True
    near = _metadata(second, NEAR)
    assert near["qwen3/skipped"] is False
    assert near["qwen3/reason"] == (
        f"output table main.near_duplicates missing from {pipeline.reports}"
    )
    assert [(a, b) for a, b, *_ in pipeline.report_rows()] == [("doc:0", "doc:7")]


def test_changed_report_settings_recompute(
    tmp_path: Path, warehouse: Path, work: list[str]
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    first = Pipeline(tmp_path, warehouse).run(instance)

    # The same asset key without the title columns: the kept table no longer fits.
    second = Pipeline(tmp_path, warehouse, label_columns=()).run(instance)
    assert work == ["index", "pairs", "pairs"]
    near = _metadata(second, NEAR)
    assert near["qwen3/skipped"] is False
    assert near["qwen3/reason"] == f"settings changed since run {first.run_id[:8]}"
    assert near["qwen3/settings"]["label_columns"] == []
    columns = [c.name for c in near["dagster/column_schema"].columns]
    assert columns == ["key_a", "key_b", "similarity", "lance_version", "computed_at"]


STATE = ProcessedState(uri="/db", table="documents", version=4, settings={"threshold": 0.9})


def _previous(**values: Any) -> PreviousMaterialization:
    recorded = {**STATE.metadata(), **values}
    return PreviousMaterialization(run_id="abcdef0123456789", metadata=recorded)


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        (_previous(), Decision(True, "table 'documents' version 4 unchanged since run abcdef01")),
        (
            # An earlier skipped run names the run that did the work.
            _previous(**{"qwen3/computed_run_id": "0123456789abcdef"}),
            Decision(True, "table 'documents' version 4 unchanged since run 01234567"),
        ),
        (
            _previous(**{"qwen3/lance_version": 3}),
            Decision(False, "table 'documents' version 3 -> 4 since run abcdef01"),
        ),
        (
            _previous(**{"qwen3/table_uri": "/other"}),
            Decision(False, "table changed since run abcdef01: /other/documents -> /db/documents"),
        ),
        (
            _previous(**{"qwen3/settings": dg.MetadataValue.json({"threshold": 0.95})}),
            Decision(False, "settings changed since run abcdef01"),
        ),
        (
            # Written before versions were recorded: do the work once.
            PreviousMaterialization(run_id="abcdef0123456789", metadata={}),
            Decision(False, "run abcdef01 recorded no table version"),
        ),
        (None, Decision(False, "first materialization")),
    ],
)
def test_decide(previous: PreviousMaterialization | None, expected: Decision) -> None:
    assert decide(previous, STATE, force=False) == expected
    assert decide(previous, STATE, force=True) == Decision(
        False, "forced by run config (force: true)"
    )
