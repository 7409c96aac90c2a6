"""Refreshes running at the same time: disjoint shards lose nothing, one scope twice converges.

Children are started together behind a barrier (forkserver processes, see refresh_helpers),
with LanceDB's conflict retries as the only coordination: no lock, no Dagster pool.
"""

import shutil

import pytest

from qwen3_pipeline.sources import Shard, Shards, SourceConfig
from tests.refresh_helpers import (
    CONFIG,
    assert_table_matches,
    expected_state,
    fork_context,
    make_rows,
    mutate,
    run_children,
    run_refresh,
    write_parquet,
)

ROWS = 1200
CHUNK = 100
TABLE = "docs"


def sharded(index: int, count: int) -> SourceConfig:
    return SourceConfig(
        key="id",
        template=CONFIG.template,
        carry=CONFIG.carry,
        updated_at=CONFIG.updated_at,
        partition=Shard(index, count),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    base = make_rows(range(ROWS))
    changes = mutate(base, seed=9)
    return {
        "root": root,
        "base": base,
        "base_path": write_parquet(base, root / "base.parquet"),
        "target": changes.table,
        "target_path": write_parquet(changes.table, root / "target.parquet"),
    }


def run_together(targets: list[dict], *, at: str = "start") -> list[dict]:
    ctx = fork_context()
    barrier = ctx.Barrier(len(targets))
    results = ctx.Queue()
    targets = [dict(t, barrier=barrier, barrier_at=at, result=results) for t in targets]
    codes = run_children(targets, timeout=180)
    assert codes == [0] * len(targets), f"children failed: exit codes {codes}"
    return [results.get(timeout=10) for _ in targets]


@pytest.mark.slow
@pytest.mark.parametrize("table_exists", [False, True], ids=["creation-race", "existing-table"])
def test_four_processes_refreshing_disjoint_shards_lose_and_duplicate_nothing(
    data, tmp_path, table_exists
):
    db = str(tmp_path / "db")
    source = data["base_path"]
    want = expected_state(data["base"], partition=Shards(4))
    if table_exists:
        # Every shard starts from the base state; the source moves to the mutated one.
        run_refresh(db, TABLE, data["base_path"], config=_all_shards(), chunk_rows=400)
        source = data["target_path"]
        want = expected_state(data["target"], partition=Shards(4))
    reports = run_together(
        [
            dict(db_uri=db, table=TABLE, source_path=source, config=sharded(i, 4), chunk_rows=CHUNK)
            for i in range(4)
        ],
        at="start" if table_exists else "open",
    )
    assert_table_matches(db, TABLE, want)
    scanned = sum(r["scanned"] for r in reports)
    assert scanned == len(want)
    for i, report in enumerate(reports):
        assert len(report["partition_keys"]) == 1
        assert set(report["per_partition"]) <= set(report["partition_keys"]), (i, report)
    again = run_refresh(db, TABLE, source, config=_all_shards(), chunk_rows=400)
    assert not again.committed


@pytest.mark.slow
@pytest.mark.parametrize("table_exists", [False, True], ids=["new-table", "existing-table"])
def test_two_processes_refreshing_the_same_scope_converge(data, tmp_path, table_exists):
    db = str(tmp_path / "db")
    if table_exists:
        shutil.copytree(_base_db(data), db)
        source, rows = data["target_path"], data["target"]
    else:
        source, rows = data["base_path"], data["base"]
    run_together(
        [dict(db_uri=db, table=TABLE, source_path=source, chunk_rows=CHUNK) for _ in range(2)],
        at="start" if table_exists else "open",
    )
    want = expected_state(rows)
    assert_table_matches(db, TABLE, want)
    again = run_refresh(db, TABLE, source, chunk_rows=400)
    assert not again.committed
    assert again.unchanged == len(want)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_processes_creating_the_same_table_at_once_all_succeed(data, tmp_path, trial):
    # Regression: the writers that lost the race to declare the primary key used to fail.
    rows = data["base"].slice(0, 100)
    source = write_parquet(rows, tmp_path / "small.parquet")
    db = str(tmp_path / "db")
    run_together(
        [
            dict(db_uri=db, table=TABLE, source_path=source, config=sharded(i, 4), chunk_rows=50)
            for i in range(4)
        ],
        at="open",
    )
    assert_table_matches(db, TABLE, expected_state(rows, partition=Shards(4)))
    import lancedb

    table = lancedb.connect(db).open_table(TABLE)
    assert table.schema.field("key").metadata  # the key is declared
    assert [ix.columns for ix in table.list_indices()] == [["key"]]


def _all_shards() -> SourceConfig:
    return SourceConfig(
        key="id",
        template=CONFIG.template,
        carry=CONFIG.carry,
        updated_at=CONFIG.updated_at,
        partition=Shards(4),
    )


def _base_db(data) -> str:
    path = data["root"] / "base-db"
    if not path.exists():
        run_refresh(str(path), TABLE, data["base_path"], chunk_rows=400)
    return str(path)
