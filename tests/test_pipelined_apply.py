"""The pipelined apply: reading, embedding and writing overlap, and every guarantee holds.

The pipeline itself (``run_pipeline``) is tested with steps that record what happened and wait
on each other's events: overlap and the bound on how far the model runs ahead are shown by the
order of events, never by timing. Then the apply pass through it: the same table as one step
after another, commits in chunk order, a failing commit stopping everything after it, the
progress line fed from the calling thread only.
"""

import signal
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.core.errors import ConfigError, StoreError
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.engine import pipeline
from qwen3_pipeline.engine.apply import apply_plan
from qwen3_pipeline.engine.options import RefreshOptions, RefreshRequest
from qwen3_pipeline.engine.pipeline import run_pipeline
from qwen3_pipeline.engine.refresh import RefreshReport, plan_refresh, refresh
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import (
    CONFIG,
    assert_table_matches,
    edit_body,
    expected_state,
    make_rows,
    no_drift_guard,
    spec,
    table_rows,
)

TABLE = "docs"
WAIT = 30.0  # seconds an event may take before the test fails (a deadlock, not a timing)


class Journal:
    """What the steps did, in order, under one lock; each entry also sets an event."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, int]] = []
        self.events: dict[tuple[str, int], threading.Event] = {}
        self.threads: dict[str, set[int]] = {}

    def event(self, what: str, item: int) -> threading.Event:
        with self.lock:
            return self.events.setdefault((what, item), threading.Event())

    def note(self, what: str, item: int) -> None:
        with self.lock:
            self.entries.append((what, item))
            self.threads.setdefault(what, set()).add(threading.get_ident())
        self.event(what, item).set()

    def wait(self, what: str, item: int, timeout: float = WAIT) -> bool:
        return self.event(what, item).wait(timeout)

    def count(self, what: str) -> int:
        with self.lock:
            return sum(1 for w, _ in self.entries if w == what)

    def items(self, what: str) -> list[int]:
        with self.lock:
            return [i for w, i in self.entries if w == what]


def _run(journal: Journal, n: int, *, depth: int = 1, embed=None, write=None) -> None:
    def prepare(item: int) -> int:
        journal.note("prepared", item)
        return item

    def default_embed(item: int) -> int:
        journal.note("embed", item)
        return item

    def default_write(item: int) -> None:
        journal.note("written", item)

    run_pipeline(
        range(n),
        prepare=prepare,
        embed=embed or default_embed,
        write=write or default_write,
        depth=depth,
    )


def _no_pipeline_threads() -> bool:
    return not any(t.name.startswith("qwen3-apply-") for t in threading.enumerate())


# --------------------------------------------------------------------------- the pipeline


def test_each_chunk_is_written_while_the_next_is_embedded():
    journal = Journal()
    overlapped: list[bool] = []

    def write(item: int) -> None:
        # The commit of chunk k ends only once the model has started on chunk k + 1.
        if item < 5:
            overlapped.append(journal.wait("embed", item + 1))
        journal.note("written", item)

    _run(journal, 6, write=write)
    assert overlapped == [True] * 5
    assert journal.items("written") == list(range(6))
    assert _no_pipeline_threads()


def test_one_step_after_another_when_the_depth_is_zero():
    journal = Journal()
    overlapped: list[bool] = []

    def write(item: int) -> None:
        # The next embed cannot start: this thread is the one that would run it.
        overlapped.append(journal.wait("embed", item + 1, timeout=0.01))
        journal.note("written", item)

    _run(journal, 3, depth=0, write=write)
    assert overlapped == [False] * 3
    assert journal.entries == [
        (step, i) for i in range(3) for step in ("prepared", "embed", "written")
    ]


def test_the_steps_run_on_three_threads_and_the_model_on_the_calling_one():
    journal = Journal()
    _run(journal, 5)
    embed_threads = journal.threads["embed"]
    assert embed_threads == {threading.get_ident()}
    assert len(journal.threads["prepared"]) == len(journal.threads["written"]) == 1
    assert journal.threads["prepared"] != journal.threads["written"] != embed_threads


@pytest.mark.parametrize("depth", [1, 2])
def test_the_model_is_never_more_than_depth_plus_one_chunks_ahead_of_the_writer(depth):
    journal = Journal()
    n = 8
    leads: list[int] = []
    reached: list[bool] = []

    def embed(item: int) -> int:
        # Chunks are numbered from 0: embedding chunk e while w chunks are committed is a
        # lead of e + 1 - w.
        leads.append(item + 1 - journal.count("written"))
        journal.note("embed", item)
        return item

    def write(item: int) -> None:
        # Hold each commit until the model is as far ahead as the bound allows, so the bound
        # is reached (and would be passed, were it not enforced).
        if item + depth < n:
            reached.append(journal.wait("embed", item + depth))
        journal.note("written", item)

    _run(journal, n, depth=depth, embed=embed, write=write)
    assert reached == [True] * len(reached)
    assert max(leads) == depth + 1
    assert journal.items("written") == list(range(n))


def test_reading_is_never_more_than_depth_plus_one_chunks_ahead_of_the_model():
    journal = Journal()
    n = 8
    leads: list[int] = []

    def embed(item: int) -> int:
        # Let the reader get as far ahead as it may: chunk k + 1 ready, k + 2 being read.
        if item + 2 < n:
            assert journal.wait("prepared", item + 2)
        leads.append(journal.count("prepared") - item - 1)
        journal.note("embed", item)
        return item

    _run(journal, n, embed=embed)
    assert max(leads) == 2


def test_a_failed_write_stops_the_model_and_every_later_write():
    journal = Journal()
    failure = StoreError("disk full")

    def embed(item: int) -> int:
        journal.note("embed", item)
        if item == 3:
            # The chunk after the failing one is in the model when the write fails.
            assert journal.wait("failing", 2)
        return item

    def write(item: int) -> None:
        if item == 2:
            assert journal.wait("embed", 3)
            journal.note("failing", 2)
            raise failure
        journal.note("written", item)

    with pytest.raises(StoreError) as raised:
        _run(journal, 10, embed=embed, write=write)
    assert raised.value is failure
    assert journal.items("written") == [0, 1]
    # No model call started after the failed write.
    assert journal.items("embed") == [0, 1, 2, 3]
    assert _no_pipeline_threads()


def test_a_failed_model_call_is_raised_after_the_commit_in_progress_ends():
    journal = Journal()
    closed = threading.Event()

    def chunks() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            closed.set()

    def embed(item: int) -> int:
        if item == 3:
            assert journal.wait("writing", 2)
            raise RuntimeError("CUDA error: device-side assert triggered")
        journal.note("embed", item)
        return item

    def write(item: int) -> None:
        journal.note("writing", item)
        journal.note("written", item)

    with pytest.raises(RuntimeError, match="device-side assert"):
        run_pipeline(chunks(), prepare=lambda i: i, embed=embed, write=write)
    assert journal.items("written") == [0, 1, 2]
    assert closed.is_set(), "the reader did not close the spill"
    assert _no_pipeline_threads()


def test_a_failed_read_is_raised_and_nothing_after_it_is_written():
    journal = Journal()

    def chunks() -> Iterator[int]:
        yield 0
        yield 1
        raise StoreError("could not read the stored chunks")

    with pytest.raises(StoreError, match="stored chunks"):
        run_pipeline(
            chunks(),
            prepare=lambda i: i,
            embed=lambda i: i,
            write=lambda i: journal.note("written", i),
        )
    assert journal.items("written") in ([], [0], [0, 1])
    assert _no_pipeline_threads()


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are installed in the main thread only",
)
def test_an_interrupt_while_waiting_for_the_writer_unwinds_cleanly():
    journal = Journal()
    main = threading.get_ident()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def embed(item: int) -> int:
        journal.note("embed", item)
        return item

    def write(item: int) -> None:
        if item == 0:
            # The model has embedded chunk 1 and waits to hand it over; interrupt it there.
            assert journal.wait("embed", 1)
            signal.pthread_kill(main, signal.SIGUSR1)
        journal.note("written", item)

    previous = signal.signal(signal.SIGUSR1, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(range(10), prepare=lambda i: i, embed=embed, write=write)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # The commit in progress ended; at most the chunk handed over with it followed.
    assert journal.items("written") in ([0], [0, 1])
    assert journal.items("embed") in ([0, 1], [0, 1, 2])
    assert _no_pipeline_threads()


def test_a_negative_depth_is_refused():
    with pytest.raises(ConfigError, match="depth"):
        run_pipeline([1], prepare=lambda i: i, embed=lambda i: i, write=print, depth=-1)


# --------------------------------------------------------------------------- the apply pass


def _refresh(db: str, rows: pa.Table, embedder: FakeEmbedder, **options: Any) -> RefreshReport:
    return refresh(
        source=ArrowSource(rows, name="docs-source"),
        config=options.pop("config", CONFIG),
        embedder=embedder,
        db_uri=db,
        table=TABLE,
        chunk_rows=options.pop("chunk_rows", 40),
        progress=False,
        **options,
    )


# Columns that say when or by which run a row was written: they differ between two runs.
_RUN_COLUMNS = ("embedded_at", "run_id", "first_failed_at", "last_failed_at", "next_retry_at")


def _stored(db: str, table: str = TABLE) -> list[dict[str, Any]]:
    data = table_rows(db, table)
    data = data.drop_columns([c for c in _RUN_COLUMNS if c in data.column_names])
    return sorted(data.to_pylist(), key=lambda row: str(row["key"]))


def _failed_texts(rows: pa.Table, keys: list[int]) -> list[str]:
    state = expected_state(rows)
    return [state[k]["text"] for k in keys]


def _counters(report: RefreshReport) -> dict[str, int]:
    return {k: v for k, v in report.counters().items() if v}


@pytest.mark.parametrize("chunked", [False, True], ids=["rows", "chunks"])
def test_the_pipelined_apply_writes_the_same_table_as_one_step_after_another(
    tmp_path, monkeypatch, chunked
):
    first = make_rows(range(300))
    second = edit_body(first, range(0, 300, 7))
    config = CONFIG
    if chunked:
        config = SourceConfig(key="id", template=CONFIG.template, carry=("title", "url"),
                              chunking=ChunkingConfig(tokens=16))  # fmt: skip
    fail = _failed_texts(first, [5, 77]) if not chunked else []
    reports: dict[int, list[dict[str, int]]] = {}
    for depth in (0, 1):
        monkeypatch.setattr(pipeline, "PIPELINE_DEPTH", depth)
        db = str(tmp_path / f"depth{depth}")
        embedder = FakeEmbedder(spec(), fail_texts=fail)
        reports[depth] = [
            _counters(_refresh(db, first, embedder, config=config)),
            _counters(_refresh(db, second, embedder, config=config)),
        ]
    assert reports[1] == reports[0]
    assert _stored(str(tmp_path / "depth1")) == _stored(str(tmp_path / "depth0"))
    if not chunked:
        assert reports[1][0]["failed"] == 2
        failures = f"{TABLE}__failures"
        assert _stored(str(tmp_path / "depth1"), failures) == _stored(
            str(tmp_path / "depth0"), failures
        )


def test_commits_follow_the_chunk_order_and_keep_the_canary_first(tmp_path, monkeypatch):
    commits: list[tuple[str, list[int]]] = []
    upsert = VectorStore.upsert

    def recording(self: VectorStore, rows: pa.Table) -> Any:
        result = upsert(self, rows)
        commits.append(("upsert", rows.column("key").to_pylist()))
        return result

    monkeypatch.setattr(VectorStore, "upsert", recording)
    embedder = FakeEmbedder(spec())
    calls: list[str] = []
    real_embed = embedder.embed_documents

    def embed_documents(texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        calls.append("canary" if texts and texts[0].startswith("What is the") else "chunk")
        return real_embed(texts, on_batch=on_batch)

    monkeypatch.setattr(embedder, "embed_documents", embed_documents)
    db = str(tmp_path / "db")
    report = _refresh(db, make_rows(range(400)), embedder)
    keys = [k for _, chunk in commits for k in chunk]
    assert keys == list(range(400))
    assert [len(chunk) for _, chunk in commits] == [40] * 10
    # A first fill: the canaries are recorded (one call) with the first commit.
    assert report.canaries_recorded > 0
    assert calls.count("canary") == 1
    assert_table_matches(db, TABLE, expected_state(make_rows(range(400))))


def test_a_failed_commit_stops_the_refresh_and_a_rerun_converges(tmp_path, monkeypatch):
    rows = make_rows(range(400))
    embedder = FakeEmbedder(spec())
    attempts: list[int] = []
    upsert = VectorStore.upsert

    def failing(self: VectorStore, data: pa.Table) -> Any:
        attempts.append(data.num_rows)
        if len(attempts) == 3:
            raise StoreError("LanceError(IO): disk quota exceeded")
        return upsert(self, data)

    monkeypatch.setattr(VectorStore, "upsert", failing)
    db = str(tmp_path / "db")
    with pytest.raises(StoreError, match="disk quota"):
        _refresh(db, rows, embedder, drift_guard=no_drift_guard)
    # Nothing was committed after the failed commit, and the model stopped right after it.
    assert len(attempts) == 3
    assert table_rows(db, TABLE).num_rows == 80
    assert len(embedder.calls) <= 3 + pipeline.PIPELINE_DEPTH
    monkeypatch.setattr(VectorStore, "upsert", upsert)
    rerun = _refresh(db, rows, FakeEmbedder(spec()), drift_guard=no_drift_guard)
    assert rerun.inserted == 320
    assert_table_matches(db, TABLE, expected_state(rows))


def test_a_failed_model_call_writes_nothing_after_it(tmp_path):
    rows = make_rows(range(400))

    class Broken(FakeEmbedder):
        def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
            if len(self.calls) == 4:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().embed_documents(texts, on_batch=on_batch)

    db = str(tmp_path / "db")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _refresh(db, rows, Broken(spec()), drift_guard=no_drift_guard)
    # Chunks 1-4 were embedded; at most those were committed, in order.
    stored = sorted(table_rows(db, TABLE).column("key").to_pylist())
    assert stored == list(range(len(stored)))
    assert len(stored) in (120, 160)


class _ThreadCheckingProgress(Progress):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[int] = set()

    def update(self, n: int, *, tokens: int = 0, **postfix: Any) -> None:
        self.threads.add(threading.get_ident())
        super().update(n, tokens=tokens, **postfix)


@pytest.mark.parametrize("chunked", [False, True], ids=["rows", "chunks"])
def test_progress_counts_every_row_from_the_calling_thread(tmp_path, chunked):
    rows = make_rows(range(200))
    config = CONFIG
    if chunked:
        config = SourceConfig(key="id", template=CONFIG.template, carry=("title", "url"),
                              chunking=ChunkingConfig(tokens=16))  # fmt: skip
    embedder = FakeEmbedder(spec())
    db = str(tmp_path / "db")
    source = ArrowSource(rows, name="docs-source")
    plan = plan_refresh(source=source, config=config, embedder=embedder, db_uri=db,
                        table=TABLE, chunk_rows=30, progress=False)  # fmt: skip
    options = RefreshOptions(chunk_rows=30, progress=False)
    request = RefreshRequest(source=source, config=config, embedder=embedder, db_uri=db,
                             table=TABLE, options=options)  # fmt: skip
    bar = _ThreadCheckingProgress(plan.rows_to_embed, "embedding", enabled=False)
    report = apply_plan(plan, request, bar=bar)
    assert bar.threads == {threading.get_ident()}
    assert bar.done == plan.rows_to_embed == 200
    assert bar.tokens_done == report.tokens
