"""A refresh killed (SIGKILL) at any point leaves a consistent table, and a re-run converges.

Each case starts from a prepared table, runs the refresh in a child process that kills itself
at one point (inside an embed call, just before or after a given LanceDB commit, in the middle
of a commit, or after a delay), then re-runs the refresh to completion in this process and
compares the table with the independently computed expected state: no duplicate keys, nothing
lost, nothing stale. The child records the phase it died in; every case first checks that it
died of the SIGKILL, in the intended phase (a kill point the refresh never reaches fails). The
benchmark ``benchmarks/kill_bench.py`` runs 100 such kill points.
"""

import shutil
from typing import Any

import pytest

from qwen3_pipeline.core.errors import EmbeddingDriftError
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import (
    FAULT_TABLE,
    KillPoint,
    Scenario,
    assert_table_matches,
    build_scenarios,
    kill_and_recover,
    run_killed_child,
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
    ("initial", KillPoint("during", 7, "upsert")),
    # Incremental: edits, inserts, carry-only updates, then deletes in several commits.
    ("update", KillPoint("embed", 3)),
    ("update", KillPoint("after", 1, "upsert")),
    ("update", KillPoint("before", 5, "upsert")),
    ("update", KillPoint("after", 2, "update")),
    ("update", KillPoint("during", 1, "update")),
    ("update", KillPoint("before", 1, "delete")),
    ("update", KillPoint("after", 2, "delete")),
    ("update", KillPoint("during", 1, "delete")),
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
    # kill_and_recover first checks the child died of the SIGKILL in the phase ``kill`` names.
    facts = kill_and_recover(scenarios[scenario], kill, tmp_path)
    assert facts["phase"] == kill.phase
    if kill.where == "after" and kill.op == "upsert" and scenario != "rebuild":
        # Work committed before the kill is not redone.
        assert facts["rerun_embedded"] < scenarios[scenario].max_embedded


def _child_on_a_copy(scenario: Scenario, tmp_path) -> tuple[str, dict[str, Any]]:
    """A copy of the scenario's starting database, and a child refresh's arguments on it."""
    db = str(tmp_path / "db")
    shutil.copytree(scenario.base, db)
    child = dict(
        db_uri=db, table=TABLE, source_path=scenario.source, chunk_rows=scenario.chunk_rows
    )
    return db, child


def test_killed_before_any_commit_leaves_the_table_untouched(scenarios, tmp_path):
    db, child = _child_on_a_copy(scenarios["update"], tmp_path)
    before = table_version(db, TABLE)
    record = run_killed_child(KillPoint("embed", 1), tmp_path, **child)
    assert record.stack == ("refresh", "embed #1")
    assert table_version(db, TABLE) == before
    assert table_rows(db, TABLE).num_rows == ROWS


def test_killed_rebuild_never_touches_the_live_table(scenarios, tmp_path):
    scenario = scenarios["rebuild"]
    db, child = _child_on_a_copy(scenario, tmp_path)
    before = table_version(db, TABLE)
    record = run_killed_child(
        KillPoint("before", 1, "swap"), tmp_path, dim=64, rebuild=True, **child
    )
    assert (record.phase, record.stage) == ("swap #1", "before")
    assert table_version(db, TABLE) == before
    # Readers still see the old table, complete, in the old spec.
    assert_table_matches(db, TABLE, scenarios["initial"].expected)
    # The re-run resumes the staging table: only rows it lacks are embedded again (none).
    rerun = run_refresh(db, TABLE, scenario.source, dim=64, chunk_rows=scenario.chunk_rows,
                        rebuild=True)  # fmt: skip
    assert rerun.embedded_rows == 0
    assert_table_matches(db, TABLE, scenario.expected, embedding_spec=spec(64))


class _OtherWeights(FakeEmbedder):
    """The fake with perturbed 'weights': every vector differs from the stored ones."""

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        return super().embed_documents([f"perturbed {t}" for t in texts], on_batch=on_batch)


def test_a_first_fill_killed_after_its_first_commits_keeps_its_drift_check(scenarios, tmp_path):
    scenario = scenarios["initial"]
    db = str(tmp_path / "db")
    child = dict(db_uri=db, table=TABLE, source_path=scenario.source,
                 chunk_rows=scenario.chunk_rows)  # fmt: skip
    record = run_killed_child(KillPoint("after", 2, "upsert"), tmp_path, **child)
    assert (record.phase, record.stage) == ("upsert #2", "after")
    assert table_rows(db, TABLE).num_rows == 2 * scenario.chunk_rows
    # The canaries were recorded with the first commit of vectors, not at the end of the fill.
    assert table_rows(db, f"{TABLE}__canary").num_rows >= 16
    version = table_version(db, TABLE)
    # The weights changed before the re-run: it must not mix their vectors with the old ones.
    with pytest.raises(EmbeddingDriftError, match="no longer reproduces"):
        run_refresh(db, TABLE, scenario.source, chunk_rows=scenario.chunk_rows,
                    embedder=_OtherWeights(spec()))  # fmt: skip
    assert table_version(db, TABLE) == version
    # With the same weights, the re-run converges.
    rerun = run_refresh(db, TABLE, scenario.source, chunk_rows=scenario.chunk_rows)
    assert rerun.embedded_rows == ROWS - 2 * scenario.chunk_rows
    assert_table_matches(db, TABLE, scenario.expected)


# ---------------------------------------------------------------- the kill points themselves


@pytest.mark.slow
def test_a_kill_point_the_refresh_never_reaches_fails(scenarios, tmp_path):
    # The update scenario makes 4 delete commits: a 99th is never reached, the child exits 0,
    # and that is a failure, not a pass.
    _, child = _child_on_a_copy(scenarios["update"], tmp_path)
    with pytest.raises(AssertionError, match="exit code 0"):
        run_killed_child(KillPoint("before", 99, "delete"), tmp_path, **child)


@pytest.mark.slow
def test_a_timed_kill_that_would_fire_after_the_refresh_lands_at_its_end(scenarios, tmp_path):
    scenario = scenarios["update"]
    db, child = _child_on_a_copy(scenario, tmp_path)
    record = run_killed_child(KillPoint("time", delay_s=3600), tmp_path, **child)
    assert (record.stack, record.stage) == (("refresh",), "refresh end")
    # Every commit of the refresh was made before the kill.
    assert_table_matches(db, TABLE, scenario.expected)
