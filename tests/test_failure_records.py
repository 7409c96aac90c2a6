"""Poison rows: recorded, retried while due, quarantined, listed, cleared, replayed, kill-safe.

A fake model fails on three texts of a 30-row Parquet source. Every refresh here is a real one
(LanceDB in tmp_path); the failure log is the real side table ``docs__failures``.
"""

from datetime import datetime, timedelta
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.failures import (
    FailurePolicy,
    FailureStep,
    RowFailure,
    as_row_failure,
    clean_message,
    next_attempt,
)
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import ParquetSource
from qwen3_pipeline.store.failure_log import FailureLog, failures_table_name
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import (
    CONFIG,
    TEMPLATE,
    KillPoint,
    edit_body,
    make_rows,
    no_drift_guard,
    run_killed_child,
    spec,
    write_parquet,
)

TABLE = "docs"
POISON = [3, 14, 25]


def rendered(rows: pa.Table, key: int) -> str:
    row = next(r for r in rows.to_pylist() if r["id"] == key)
    return TEMPLATE.format(**row)


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, pa.Table]:
    rows = make_rows(range(30))
    return write_parquet(rows, tmp_path / "source.parquet"), rows


def run(path: str, db: str, fake: FakeEmbedder, **options) -> dict:
    report = refresh(
        source=ParquetSource(path),
        config=CONFIG,
        embedder=fake,
        db_uri=db,
        table=TABLE,
        progress=False,
        drift_guard=no_drift_guard,
        **options,
    )
    return report.as_dict()


def stored_keys(db: str) -> set[int]:
    return set(lancedb.connect(db).open_table(TABLE).to_arrow()["key"].to_pylist())


def records(db: str) -> dict[str, dict]:
    return {r["doc_key"]: r for r in FailureLog.open(db, TABLE).read().to_pylist()}


# ------------------------------------------------------------------------- the pure parts


def test_backoff_doubles_and_is_capped():
    policy = FailurePolicy(max_attempts=40, retry_backoff_s=300)
    assert [policy.delay_s(n) for n in (1, 2, 3)] == [300.0, 600.0, 1200.0]
    assert policy.delay_s(30) == 86_400.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("max_attempts", True), ("retry_backoff_s", -1.0),
     ("retry_backoff_s", float("nan"))],
)  # fmt: skip
def test_bad_policy_values_are_refused_naming_the_setting(field, value):
    with pytest.raises(ConfigError, match=field):
        FailurePolicy(**{field: value})


def test_a_changed_text_starts_counting_again():
    policy = FailurePolicy(max_attempts=2, retry_backoff_s=1)
    now = datetime(2026, 1, 1)
    first = next_attempt(None, same_text=False, now=now, policy=policy)
    again = next_attempt(first, same_text=False, now=now + timedelta(hours=1), policy=policy)
    assert (again.attempts, again.first_failed_at, again.status) == (1, again.last_failed_at,
                                                                     "retrying")  # fmt: skip


def test_messages_are_scrubbed_one_line_and_bounded():
    message = clean_message("connect postgresql://u:hunter2@db/app\nfailed " + "x" * 2000)
    assert "hunter2" not in message
    assert "\n" not in message
    assert len(message) == 500
    assert as_row_failure("plain").step == FailureStep.EMBED
    failure = RowFailure.of_error(FailureStep.TOKENIZE, ValueError("bad"))
    assert (failure.step, failure.error_type, str(failure)) == ("tokenize", "ValueError", "bad")


# ------------------------------------------------------------------------- real refreshes


def test_poison_rows_are_recorded_retried_quarantined_and_never_stored(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    poison_texts = [rendered(rows, k) for k in POISON]
    fake = FakeEmbedder(spec(), fail_texts=poison_texts)
    policy = {"max_attempts": 3, "retry_backoff_s": 0}

    first = run(path, db, fake, **policy)
    assert (first["inserted"], first["failed"], first["retried"]) == (27, 3, 0)
    assert stored_keys(db).isdisjoint(POISON)
    log = records(db)
    assert sorted(log) == sorted(str(k) for k in POISON)
    record = log["3"]
    assert (record["step"], record["attempts"], record["status"]) == ("embed", 1, "retrying")
    assert record["error_type"] == "EmbeddingFailed"
    assert record["message"] == "fake failure"
    assert record["content_hash"]
    assert record["spec_fingerprint"] == spec().fingerprint

    second = run(path, db, fake, **policy)
    assert (second["retried"], second["failed"], second["quarantined"]) == (3, 3, 0)
    third = run(path, db, fake, **policy)
    assert (third["retried"], third["failed"], third["quarantined"]) == (3, 3, 3)
    assert {r["status"] for r in records(db).values()} == {"quarantined"}
    assert {r["attempts"] for r in records(db).values()} == {3}

    sent = len(fake.seen)
    fourth = run(path, db, fake, **policy)
    assert (fourth["quarantined"], fourth["failed"], fourth["retried"]) == (3, 0, 0)
    assert fourth["committed"] is False
    assert len(fake.seen) == sent, "a quarantined row was sent to the model"
    assert stored_keys(db).isdisjoint(POISON)


def test_a_fixed_text_is_embedded_and_its_record_cleared(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    fake = FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON])
    policy = {"max_attempts": 1, "retry_backoff_s": 0}
    run(path, db, fake, **policy)
    assert {r["status"] for r in records(db).values()} == {"quarantined"}

    fixed = write_parquet(edit_body(rows, [POISON[0]]), tmp_path / "fixed.parquet")
    report = run(fixed, db, fake, **policy)
    assert (report["inserted"], report["quarantined"], report["failed"]) == (1, 2, 0)
    assert POISON[0] in stored_keys(db)
    assert sorted(records(db)) == sorted(str(k) for k in POISON[1:])


def test_a_row_not_due_yet_is_deferred(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    fake = FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON])
    run(path, db, fake, retry_backoff_s=3600)
    sent = len(fake.seen)
    later = run(path, db, fake, retry_backoff_s=3600)
    assert (later["deferred"], later["retried"], later["failed"]) == (3, 0, 0)
    assert len(fake.seen) == sent
    due = records(db)["3"]["next_retry_at"] - records(db)["3"]["last_failed_at"]
    assert due == timedelta(hours=1)


def test_replay_makes_quarantined_rows_due_and_a_success_clears_them(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    poison = FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON])
    run(path, db, poison, max_attempts=1, retry_backoff_s=0)
    log = FailureLog.open(db, TABLE)
    assert log.replay(keys=["3", "14"]) == 2
    assert records(db)["3"]["status"] == "retrying"
    healed = FakeEmbedder(spec())  # the model was fixed: the replayed rows now embed
    report = run(path, db, healed, max_attempts=1, retry_backoff_s=0)
    assert (report["retried"], report["inserted"], report["quarantined"]) == (2, 2, 1)
    assert sorted(records(db)) == ["25"]
    assert log.replay(step="tokenize") == 0
    assert log.replay() == 1
    with pytest.raises(ConfigError, match="at least one key"):
        log.replay(keys=[])


def test_a_deleted_row_loses_its_record(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    fake = FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON])
    run(path, db, fake)
    fewer = rows.filter(pa.compute.not_equal(rows["id"], POISON[0]))
    run(write_parquet(fewer, tmp_path / "fewer.parquet"), db, fake)
    assert sorted(records(db)) == sorted(str(k) for k in POISON[1:])


def test_a_rebuild_tries_quarantined_rows_once_more(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    fake = FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON])
    run(path, db, fake, max_attempts=1)
    rebuilt = run(path, db, FakeEmbedder(spec()), rebuild=True, allow_mass_delete=True)
    assert rebuilt["retried"] == 3
    assert rebuilt["quarantined"] == 0
    assert set(POISON) <= stored_keys(db)
    assert records(db) == {}


def test_the_log_is_a_side_table_of_the_same_database(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    run(path, db, FakeEmbedder(spec(), fail_texts=[rendered(rows, 3)]))
    assert failures_table_name(TABLE) in lancedb.connect(db).list_tables().tables


# ------------------------------------------------------------------------- killed refreshes


def test_killed_between_the_vector_commit_and_the_record_commit_converges(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    poison = [rendered(rows, k) for k in POISON]
    child = {"db_uri": db, "table": TABLE, "source_path": path, "chunk_rows": 100}
    # The first upsert is the vectors' commit; the failure records would come next.
    run_killed_child(KillPoint("after", 1, "upsert"), tmp_path, fail_texts=poison, **child)
    assert len(stored_keys(db)) == 27
    assert records(db) == {}
    fake = FakeEmbedder(spec(), fail_texts=poison)
    rerun = run(path, db, fake, retry_backoff_s=0)
    # Nothing was skipped: the poison rows were sent again and recorded now.
    assert (rerun["failed"], rerun["unchanged"]) == (3, 27)
    assert {r["attempts"] for r in records(db).values()} == {1}


def test_killed_before_clearing_the_records_of_fixed_rows_converges(source, tmp_path):
    path, rows = source
    db = str(tmp_path / "db")
    run(path, db, FakeEmbedder(spec(), fail_texts=[rendered(rows, k) for k in POISON]))
    assert len(records(db)) == 3
    # The model is fixed; a replayed refresh writes the vectors, then dies before the delete
    # that clears the records.
    FailureLog.open(db, TABLE).replay()
    child = {"db_uri": db, "table": TABLE, "source_path": path, "chunk_rows": 100}
    run_killed_child(KillPoint("before", 1, "delete"), tmp_path, **child)
    assert set(POISON) <= stored_keys(db)
    assert len(records(db)) == 3
    rerun = run(path, db, FakeEmbedder(spec()))
    assert rerun["unchanged"] == 30
    assert rerun["retried"] == 0
    assert records(db) == {}


def test_a_half_created_side_table_is_dropped_and_made_again(source, tmp_path):
    # A run killed while LanceDB created the canary or failure table leaves a directory that
    # is listed but never committed: later refreshes must not fail on it forever.
    path, rows = source
    db = tmp_path / "db"
    for name in ("docs__canary", "docs__failures"):
        (db / f"{name}.lance" / "data").mkdir(parents=True)
    fake = FakeEmbedder(spec(), fail_texts=[rendered(rows, 3)])
    report = refresh(source=ParquetSource(path), config=CONFIG, embedder=fake, db_uri=str(db),
                     table=TABLE, progress=False, retry_backoff_s=0)  # fmt: skip
    assert report.canaries_recorded > 0
    assert report.failed == 1
    assert sorted(records(str(db))) == ["3"]
