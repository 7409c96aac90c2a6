"""Progress lines: the ETA is paced by the work itself, never by what came before it."""

import logging

import pytest

from qwen3_pipeline.core import progress as progress_module
from qwen3_pipeline.core.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


def test_no_eta_from_one_report_then_the_pace_after_it(clock: _Clock) -> None:
    bar = Progress(100, "embedding", tokens_total=1000, enabled=False)
    clock.now += 590.0  # the model loads for ten minutes before the first batch lands
    bar.update(1, tokens=10)
    assert bar.eta_seconds() is None  # "ETA 59m00s from one row" is what this prevents
    clock.now += 1.0
    bar.update(9, tokens=90)
    # 90 tokens in 1 s since the first report: 900 left take 10 s, not hours.
    assert bar.eta_seconds() == pytest.approx(10.0)


def test_the_first_log_line_has_no_eta_and_later_lines_do(
    clock: _Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="qwen3_pipeline"):
        bar = Progress(10, "embedding", tokens_total=100, log_every_s=0.5)
        clock.now += 60.0
        bar.update(1, tokens=10)
        clock.now += 1.0
        bar.update(4, tokens=40)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "ETA" not in lines[0]
    assert "ETA 1s" in lines[1]


def test_a_sharded_refresh_never_counts_the_canary_embeds_as_rows(
    tmp_path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 17: "7333 rows, 401454/396094 tokens" — the canary re-embeds were counted.
    from qwen3_pipeline.core.progress import PROGRESS_SECONDS_ENV
    from qwen3_pipeline.sources import ArrowSource
    from qwen3_pipeline.testing import FakeEmbedder
    from tests.refresh_helpers import make_rows, mutate, spec
    from tests.test_refresh_shards import sharded

    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.000001")
    db = str(tmp_path / "db")

    def refresh_logging(rows) -> list[str]:
        from qwen3_pipeline import refresh

        caplog.clear()
        with caplog.at_level(logging.INFO, logger="qwen3_pipeline"):
            refresh(source=ArrowSource(rows), config=sharded(), embedder=FakeEmbedder(spec()),
                    db_uri=db, table="docs", chunk_rows=64)  # fmt: skip
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("embed")]

    rows = make_rows(range(400))
    refresh_logging(rows)  # the first fill records the canaries
    lines = refresh_logging(mutate(rows, edit=0.25, insert=0, delete=0, carry=0).table)
    assert lines
    assert lines[-1].startswith("embedding into docs: 100%, 100/100 rows")
    assert all("/100 rows" in line for line in lines)
