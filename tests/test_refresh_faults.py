"""A refresh killed (SIGKILL) at any point leaves a consistent table, and a re-run converges.

Each case starts from a prepared table, runs the refresh in a child process that kills itself
at one point (inside an embed call, just before or after a given commit, in the middle of a
commit, or after a delay), then re-runs the refresh to completion in this process and compares
the table with the independently computed expected state: no duplicate keys, nothing lost,
nothing stale. The benchmark ``benchmarks/kill_bench.py`` runs 100 such kill points.
"""

import shutil

import pytest

from tests.refresh_helpers import (
    FAULT_TABLE,
    KillPoint,
    Scenario,
    assert_table_matches,
    build_scenarios,
    kill_and_recover,
    run_children,
    run_refresh,
    spec,
    table_rows,
    table_version,
)

ROWS = 3000
TABLE = FAULT_TABLE


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, Scenario]:
    # initial/rebuild: 10 chunks of 300 rows; update: 240 rows to embed in chunks of 40,
    # 60 carry-only rows, 90 deletes (4 delete commits in a killed child).
    return build_scenarios(tmp_path_factory.mktemp("fault-scenarios"), rows=ROWS)


KILL_POINTS = [
    # A brand-new table: killed while creating it, while embedding, between and inside commits.
    ("initial", KillPoint("before", 1, "declare")),
    ("initial", KillPoint("before", 1, "index")),
    ("initial", KillPoint("embed", 1)),
    ("initial", KillPoint("after", 4, "upsert")),
    ("initial", KillPoint("during", 7, "upsert", delay_s=0.005)),
    # Incremental: edits, inserts, carry-only updates, then deletes in several commits.
    ("update", KillPoint("embed", 3)),
    ("update", KillPoint("after", 1, "upsert")),
    ("update", KillPoint("before", 5, "upsert")),
    ("update", KillPoint("after", 2, "update")),
    ("update", KillPoint("during", 1, "update", delay_s=0.003)),
    ("update", KillPoint("before", 1, "delete")),
    ("update", KillPoint("after", 2, "delete")),
    ("update", KillPoint("during", 1, "delete", delay_s=0.002)),
    # A rebuild into a new spec: mid-way, just before the swap, and after it.
    ("rebuild", KillPoint("after", 5, "upsert")),
    ("rebuild", KillPoint("before", 1, "swap")),
    ("rebuild", KillPoint("after", 1, "swap")),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "kill"), KILL_POINTS, ids=[f"{s}-{k}" for s, k in KILL_POINTS]
)
def test_killed_refresh_converges_on_rerun(scenarios, scenario, kill, tmp_path):
    facts = kill_and_recover(scenarios[scenario], kill, tmp_path)
    if kill.where == "after" and kill.op == "upsert" and scenario != "rebuild":
        # Work committed before the kill is not redone.
        assert facts["rerun_embedded"] < scenarios[scenario].max_embedded


def test_killed_before_any_commit_leaves_the_table_untouched(scenarios, tmp_path):
    scenario = scenarios["update"]
    db = str(tmp_path / "db")
    shutil.copytree(scenario.base, db)
    before = table_version(db, TABLE)
    (exitcode,) = run_children([dict(db_uri=db, table=TABLE, source_path=scenario.source,
                                     chunk_rows=scenario.chunk_rows,
                                     kill=KillPoint("embed", 1))])  # fmt: skip
    assert exitcode == -9
    assert table_version(db, TABLE) == before
    assert table_rows(db, TABLE).num_rows == ROWS


def test_killed_rebuild_never_touches_the_live_table(scenarios, tmp_path):
    scenario = scenarios["rebuild"]
    db = str(tmp_path / "db")
    shutil.copytree(scenario.base, db)
    before = table_version(db, TABLE)
    (exitcode,) = run_children([dict(db_uri=db, table=TABLE, source_path=scenario.source,
                                     chunk_rows=scenario.chunk_rows, dim=64, rebuild=True,
                                     kill=KillPoint("before", 1, "swap"))])  # fmt: skip
    assert exitcode == -9
    assert table_version(db, TABLE) == before
    # Readers still see the old table, complete, in the old spec.
    assert_table_matches(db, TABLE, scenarios["initial"].expected)
    # The re-run resumes the staging table: only rows it lacks are embedded again (none).
    rerun = run_refresh(db, TABLE, scenario.source, dim=64, chunk_rows=scenario.chunk_rows,
                        rebuild=True)  # fmt: skip
    assert rerun.embedded_rows == 0
    assert_table_matches(db, TABLE, scenario.expected, embedding_spec=spec(64))
