"""The data-quality checks account for failure records; quarantined rows are a warning check."""

import lancedb
import pyarrow as pa

from qwen3_pipeline.consumers.checks import (
    COVERS_SOURCE,
    NOT_STALE,
    check_no_quarantined_rows,
    run_checks,
)
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import ArrowSource
from qwen3_pipeline.store.failure_log import FailureLog
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import CONFIG, TEMPLATE, edit_body, make_rows, no_drift_guard, spec


def _refresh(db, rows, fake, **options):
    return refresh(
        source=ArrowSource(rows), config=CONFIG, embedder=fake, db_uri=db, table="docs",
        progress=False, drift_guard=no_drift_guard, **options,
    )  # fmt: skip


def _outcomes(db, rows, records):
    table = lancedb.connect(db).open_table("docs")
    report = run_checks(
        table=table, source=ArrowSource(rows), config=CONFIG, fingerprint=spec().fingerprint,
        failure_records=records,
    )  # fmt: skip
    return {o.name: o for o in report.outcomes}


def test_rows_with_failure_records_are_neither_missing_nor_stale(tmp_path):
    db = str(tmp_path / "db")
    rows = make_rows(range(20))
    _refresh(db, rows, FakeEmbedder(spec()))
    # Row 4 is edited and its new text fails (old vector kept); row 20 is new and fails.
    changed = pa.concat_tables([edit_body(rows, [4]), make_rows([20])])
    texts = {r["id"]: TEMPLATE.format(**r) for r in changed.to_pylist()}
    _refresh(db, changed, FakeEmbedder(spec(), fail_texts=[texts[4], texts[20]]), max_attempts=1)
    records = FailureLog.open(db, "docs").read()
    without = _outcomes(db, changed, None)
    assert not without[COVERS_SOURCE].passed
    assert not without[NOT_STALE].passed
    with_records = _outcomes(db, changed, records)
    assert with_records[COVERS_SOURCE].passed, with_records[COVERS_SOURCE].description
    assert with_records[COVERS_SOURCE].metadata["recorded_failures"] == 1
    assert with_records[NOT_STALE].passed, with_records[NOT_STALE].description

    warning = check_no_quarantined_rows(records)
    assert not warning.passed
    assert warning.metadata["quarantined"] == 2
    assert {s["key"] for s in warning.metadata["sample"]} == {"4", "20"}
    assert "replay" in warning.description
    # A record of an older text explains nothing: once the text changes, it is missing again.
    again = pa.concat_tables([edit_body(rows, [4], version=2), make_rows([20])])
    assert not _outcomes(db, again, records)[NOT_STALE].passed


def test_no_quarantined_rows_passes_on_a_clean_table_and_filters_the_scope(tmp_path):
    empty = FailureLog.open(str(tmp_path / "db"), "docs").read()
    assert check_no_quarantined_rows(empty).passed
