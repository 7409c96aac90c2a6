"""Shared helpers of the refresh tests and benchmarks (not a test module).

- Deterministic source tables and their mutations (edits, inserts, deletes, carry-only edits).
- An *independently computed* expected table state (rendering, sanitising, hashing, partition
  labels and fake vectors recomputed here, not through the engine's own helpers), and a
  comparison of a LanceDB table against it.
- Child-process entry points for fault injection (SIGKILL at a chosen point of a refresh) and
  for concurrent writers. Children are started from a ``forkserver`` that preloads this module,
  so each child costs a fork instead of a fresh interpreter importing LanceDB.
"""

import multiprocessing
import os
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from qwen3_pipeline.refresh import RefreshReport, refresh
from qwen3_pipeline.sources import ParquetSource, Shard, Shards, SourceConfig, TimeWindow
from qwen3_pipeline.spec import EmbeddingSpec
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.testing import FakeEmbedder, fake_vector

MODEL = "Qwen/Qwen3-Embedding-0.6B"
DIM = 32
BASE_TIME = datetime(2024, 5, 1, tzinfo=UTC)
TEMPLATE = "{title}\n\n{body}"
CONFIG = SourceConfig(key="id", template=TEMPLATE, carry=("title", "url"), updated_at="updated_at")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "river",
    "stones",
    "shine",
    "under",
    "pale",
    "moonlight",
    "data",
    "pipelines",
    "carry",
    "vectors",
    "through",
    "lakes",
    "of",
    "arrow",
    "tables",
    "and",
    "every",
    "key",
    "has",
    "one",
    "home",
    "hash",
    "shards",
    "split",
    "the",
    "work",
    "evenly",
    "among",
    "many",
    "workers",
    "who",
    "never",
    "step",
    "on",
    "each",
    "other",
]
SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("title", pa.string()),
        pa.field("body", pa.string()),
        pa.field("url", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)
_SURROGATE = re.compile("[\ud800-\udfff]")

# Lance warns on every fork after import; the forkserver forks before any LanceDB call.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental")


def spec(dim: int = DIM, **kwargs: Any) -> EmbeddingSpec:
    return EmbeddingSpec(model=MODEL, dim=dim, **kwargs)


# --------------------------------------------------------------------------- source data


def body_text(key: int, version: int = 0) -> str:
    digest = xxhash.xxh3_64_intdigest(f"{key}:{version}".encode())
    words = [WORDS[(digest >> (5 * i)) % len(WORDS)] for i in range(4 + digest % 9)]
    return " ".join(words)


def make_rows(keys: Iterable[int], *, version: int = 0, hours: int = 72) -> pa.Table:
    """Rows with ``id, title, body, url, updated_at``; ``updated_at`` spreads over 3 days."""
    keys = list(keys)
    return pa.table(
        {
            "id": keys,
            "title": [f"Title {k}" for k in keys],
            "body": [body_text(k, version) for k in keys],
            "url": [f"https://example.org/doc/{k}" for k in keys],
            "updated_at": [BASE_TIME + timedelta(hours=k % hours, minutes=version) for k in keys],
        },
        schema=SCHEMA,
    )


def replace_rows(table: pa.Table, rows: pa.Table) -> pa.Table:
    """``table`` with the rows of ``rows`` replacing those with the same id (order kept)."""
    new = {r["id"]: r for r in rows.to_pylist()}
    out = [new.get(r["id"], r) for r in table.to_pylist()]
    return pa.Table.from_pylist(out, schema=table.schema)


def drop_keys(table: pa.Table, keys: Iterable[int]) -> pa.Table:
    gone = set(keys)
    return pa.Table.from_pylist([r for r in table.to_pylist() if r["id"] not in gone], SCHEMA)


def edit_body(table: pa.Table, keys: Iterable[int], version: int = 1) -> pa.Table:
    """Change the body (a content change) of ``keys``, keeping their day."""
    keys = set(keys)
    rows = table.to_pylist()
    for r in rows:
        if r["id"] in keys:
            r["body"] = body_text(r["id"], version) + f" edited v{version}"
            r["updated_at"] = r["updated_at"] + timedelta(seconds=1)
    return pa.Table.from_pylist(rows, schema=table.schema)


def edit_url(table: pa.Table, keys: Iterable[int], version: int = 1) -> pa.Table:
    """Change only the url (a carry-only change) of ``keys``."""
    keys = set(keys)
    rows = table.to_pylist()
    for r in rows:
        if r["id"] in keys:
            r["url"] = f"https://example.org/v{version}/{r['id']}"
    return pa.Table.from_pylist(rows, schema=table.schema)


@dataclass(frozen=True)
class Changes:
    """A mutated source and the exact counts a refresh of it must report."""

    table: pa.Table
    edited: list[int]
    inserted: list[int]
    deleted: list[int]
    carry_only: list[int]


def mutate(table: pa.Table, *, seed: int = 1, edit=0.05, insert=0.03, delete=0.03, carry=0.02):
    """Edit, insert, delete and carry-edit disjoint random fractions of ``table``'s rows."""
    rng = np.random.default_rng(seed)
    keys = np.array(table.column("id").to_pylist())
    n = len(keys)
    shuffled = rng.permutation(keys)
    n_edit, n_delete, n_carry = int(n * edit), int(n * delete), int(n * carry)
    edited = sorted(shuffled[:n_edit].tolist())
    deleted = sorted(shuffled[n_edit : n_edit + n_delete].tolist())
    carry_only = sorted(shuffled[n_edit + n_delete : n_edit + n_delete + n_carry].tolist())
    start = int(keys.max()) + 1
    inserted = list(range(start, start + int(n * insert)))
    out = edit_url(edit_body(table, edited), carry_only)
    out = drop_keys(out, deleted)
    out = pa.concat_tables([out, make_rows(inserted)])
    return Changes(out, edited, inserted, deleted, carry_only)


def write_parquet(table: pa.Table, path: os.PathLike[str] | str) -> str:
    pq.write_table(table, str(path), row_group_size=1000)
    return str(path)


# --------------------------------------------------------------------------- expected state


def sanitize(text: str) -> str:
    """NUL removed; lone surrogates -> U+FFFD; a surrogate pair joined (independent of changes)."""
    text = text.replace("\x00", "")
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if "\ud800" <= c <= "\udbff" and i + 1 < len(text) and "\udc00" <= text[i + 1] <= "\udfff":
            out.append(chr(0x10000 + ((ord(c) - 0xD800) << 10) + (ord(text[i + 1]) - 0xDC00)))
            i += 2
            continue
        out.append("\ufffd" if _SURROGATE.match(c) else c)
        i += 1
    return "".join(out)


def render_template(row: dict[str, Any]) -> str:
    return f"{row['title'] or ''}\n\n{row['body'] or ''}"


def render_body(row: dict[str, Any]) -> str:
    return row["body"] or ""


def shard_label_of(key: int | str, count: int) -> str:
    index = xxhash.xxh3_64_intdigest(str(key).encode()) % count
    width = max(2, len(str(count - 1)))
    return f"shard-{index:0{width}d}-of-{count:0{width}d}"


def label_of(row: dict[str, Any], partition: Any, key: str = "id") -> str:
    if partition is None:
        return ""
    if isinstance(partition, Shard | Shards):
        return shard_label_of(row[key], partition.count)
    assert isinstance(partition, TimeWindow)
    assert partition.grain == "day"
    return row[partition.column].astimezone(UTC).strftime("%Y-%m-%d")


def expected_state(
    table: pa.Table,
    *,
    dim: int = DIM,
    partition: Any = None,
    render: Callable[[dict[str, Any]], str] = render_template,
    carry: tuple[str, ...] = ("title", "url"),
    key: str = "id",
    updated_at: str | None = "updated_at",
) -> dict[Any, dict[str, Any]]:
    """What the vector table must hold after refreshing the whole of ``table``."""
    out: dict[Any, dict[str, Any]] = {}
    for row in table.to_pylist():
        text = sanitize(render(row))
        if not text or text.isspace():
            continue
        out[row[key]] = {
            "text": text,
            "content_hash": xxhash.xxh3_128_hexdigest(text.encode("utf-8")),
            "vector": fake_vector(text, dim),
            "partition_key": label_of(row, partition, key),
            "source_updated_at": row[updated_at] if updated_at else None,
            **{c: row[c] for c in carry},
        }
    return out


def table_rows(db_uri: str, name: str) -> pa.Table:
    import lancedb

    return lancedb.connect(db_uri).open_table(name).to_arrow()


def table_version(db_uri: str, name: str) -> int | None:
    import lancedb

    db = lancedb.connect(db_uri)
    if name not in db.list_tables().tables:
        return None
    return int(db.open_table(name).version)


def assert_table_matches(
    db_uri: str,
    name: str,
    expected: dict[Any, dict[str, Any]],
    *,
    embedding_spec: EmbeddingSpec | None = None,
    vectors: bool = True,
) -> None:
    """The table holds exactly ``expected``: keys (no duplicates), content, carry, vectors."""
    data = table_rows(db_uri, name)
    keys = data.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys in the table"
    assert sorted(keys, key=str) == sorted(expected, key=str), _key_diff(keys, expected)
    order = {k: i for i, k in enumerate(keys)}
    rows = data.drop_columns(["vector"]).to_pylist()
    fingerprint = (embedding_spec or spec()).fingerprint
    for k, want in expected.items():
        row = rows[order[k]]
        for column, value in want.items():
            if column in ("vector", "text"):
                continue
            assert row[column] == value, f"key {k!r}: {column} is {row[column]!r}, want {value!r}"
        assert row["spec_fingerprint"] == fingerprint, f"key {k!r}: stale spec fingerprint"
    if vectors:
        stored = data.column("vector").combine_chunks().flatten().to_numpy()
        stored = stored.reshape(len(keys), -1)
        want = np.stack([expected[k]["vector"] for k in keys]) if keys else stored
        bad = np.flatnonzero(~(stored == want).all(axis=1))
        assert not len(bad), f"wrong vectors for keys {[keys[i] for i in bad[:10]]}"


def _key_diff(keys: list[Any], expected: dict[Any, Any]) -> str:
    have, want = set(keys), set(expected)
    return f"missing {sorted(want - have)[:10]}, unexpected {sorted(have - want)[:10]}"


# --------------------------------------------------------------------------- child processes


@dataclass(frozen=True)
class KillPoint:
    """Where a child refresh SIGKILLs itself.

    ``where``:
        ``embed``: inside the ``nth`` embed call (the chunk in flight is lost);
        ``before`` / ``after``: just before / after the ``nth`` store commit whose operation
        starts with ``op`` (``upsert``, ``update``, ``delete``, ``swap``, ``declare``, ...);
        ``during``: ``delay_s`` after the ``nth`` such commit started (mid-write, usually);
        ``time``: ``delay_s`` after the refresh started.
    """

    where: str
    nth: int = 1
    op: str = ""
    delay_s: float = 0.0

    def __str__(self) -> str:
        parts = [self.where, self.op or "any", str(self.nth)]
        if self.delay_s:
            parts.append(f"{self.delay_s * 1000:.0f}ms")
        return "-".join(parts)

    @property
    def deterministic(self) -> bool:
        return self.where in ("embed", "before", "after")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _start_timer(delay_s: float) -> None:
    # A daemon timer: a refresh that finishes first exits normally (exit code 0).
    timer = threading.Timer(delay_s, _die)
    timer.daemon = True
    timer.start()


class KillingEmbedder(FakeEmbedder):
    """A FakeEmbedder that SIGKILLs its own process on the ``nth`` embed call."""

    def __init__(self, embedding_spec: EmbeddingSpec, nth: int) -> None:
        super().__init__(embedding_spec)
        self._nth = nth

    def embed_documents(self, texts):
        if len(self.calls) + 1 == self._nth:
            _die()
        return super().embed_documents(texts)


def install_kill_point(kill: KillPoint, *, delete_batch: int = 25) -> None:
    """Patch the store in this (child) process so that it dies at ``kill``."""
    original_delete = VectorStore.delete_keys

    def small_batches(self, keys, *, batch_size=delete_batch):
        # Many delete commits, so a kill can land between two of them.
        return original_delete(self, keys, batch_size=min(batch_size, delete_batch))

    VectorStore.delete_keys = small_batches  # type: ignore[method-assign]
    if kill.where == "time":
        _start_timer(kill.delay_s)
        return
    if kill.where not in ("before", "after", "during"):
        return
    original = VectorStore._with_retries
    seen = 0

    def patched(self, what, action):
        nonlocal seen
        if not what.startswith(kill.op):
            return original(self, what, action)
        seen += 1
        if seen != kill.nth:
            return original(self, what, action)
        if kill.where == "before":
            _die()
        if kill.where == "during":
            _start_timer(kill.delay_s)
        result = original(self, what, action)
        if kill.where == "after":
            _die()
        return result

    VectorStore._with_retries = patched  # type: ignore[method-assign]


def run_refresh(
    db_uri: str,
    table: str,
    source_path: str,
    *,
    config: SourceConfig = CONFIG,
    dim: int = DIM,
    chunk_rows: int = 200,
    rebuild: bool = False,
    embedder: FakeEmbedder | None = None,
) -> RefreshReport:
    return refresh(
        source=ParquetSource(source_path),
        config=config,
        embedder=embedder or FakeEmbedder(spec(dim)),
        db_uri=db_uri,
        table=table,
        chunk_rows=chunk_rows,
        rebuild=rebuild,
        progress=False,
    )


def child_refresh(
    db_uri: str,
    table: str,
    source_path: str,
    *,
    config: SourceConfig = CONFIG,
    dim: int = DIM,
    chunk_rows: int = 200,
    rebuild: bool = False,
    kill: KillPoint | None = None,
    barrier: Any = None,
    barrier_at: str = "start",
    result: Any = None,
) -> None:
    """Child-process entry point: one refresh, maybe killed at ``kill``.

    ``barrier`` (a multiprocessing Barrier) lines concurrent children up at the start of the
    refresh, or at ``VectorStore.open`` with ``barrier_at="open"``; ``result`` (a
    multiprocessing queue) receives the report as a dict.
    """
    embedder: FakeEmbedder = FakeEmbedder(spec(dim))
    if kill is not None:
        install_kill_point(kill)
        if kill.where == "embed":
            embedder = KillingEmbedder(spec(dim), kill.nth)
    if barrier is not None and barrier_at == "open":
        # Line the children up right where the table is opened (or created), so they race
        # on the creation itself rather than on reading the source.
        original_open = VectorStore.open.__func__  # type: ignore[attr-defined]

        def open_together(cls, *args, **kwargs):
            barrier.wait(timeout=60)
            return original_open(cls, *args, **kwargs)

        VectorStore.open = classmethod(open_together)  # type: ignore[method-assign,assignment]
    elif barrier is not None:
        barrier.wait(timeout=60)
    report = run_refresh(
        db_uri,
        table,
        source_path,
        config=config,
        dim=dim,
        chunk_rows=chunk_rows,
        rebuild=rebuild,
        embedder=embedder,
    )
    if result is not None:
        result.put(report.as_dict())


_CONTEXT: Any = None


def fork_context() -> Any:
    """A forkserver context whose server has this module (and LanceDB) imported, unused."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload([__name__])
    return _CONTEXT


def run_children(targets: list[dict[str, Any]], *, timeout: float = 120.0) -> list[int]:
    """Run ``child_refresh(**kwargs)`` for each kwargs at once; return the exit codes."""
    ctx = fork_context()
    processes = [ctx.Process(target=child_refresh, kwargs=kwargs) for kwargs in targets]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise AssertionError(f"child {p.pid} hung for {timeout}s")
    return [int(p.exitcode) for p in processes]


# --------------------------------------------------------------------------- fault scenarios


@dataclass(frozen=True)
class Scenario:
    """A starting table (maybe none) and the source a refresh must bring it to."""

    name: str
    base: str | None  # directory of a prepared LanceDB database, or None (no table yet)
    source: str  # Parquet file of the target source
    expected: dict[Any, dict[str, Any]]
    chunk_rows: int
    dim: int = DIM
    rebuild: bool = False
    max_embedded: int = 0  # rows a complete refresh from the base embeds


FAULT_TABLE = "docs"


def build_scenarios(root: Path, *, rows: int = 3000) -> dict[str, Scenario]:
    """The scenarios a refresh is killed in.

    ``initial``: no table yet, ``rows`` rows in chunks of ``rows // 10``; ``update``: 5% edits,
    3% inserts, 3% deletes and 2% carry-only edits of that table, in chunks of ``rows // 75``
    (several embed, upsert and update commits; deletes go in batches of 25 keys in a killed
    child); ``rebuild``: the update's source into a new spec (dim 64), chunks of ``rows // 10``.
    """
    base_rows = make_rows(range(rows))
    changes = mutate(base_rows, seed=42)
    base_path = write_parquet(base_rows, root / "base.parquet")
    target_path = write_parquet(changes.table, root / "target.parquet")
    base_db = str(root / "base-db")
    big, small = max(rows // 10, 1), max(rows // 75, 1)
    run_refresh(base_db, FAULT_TABLE, base_path, chunk_rows=big)
    changed = len(changes.edited) + len(changes.inserted)
    target = expected_state(changes.table)
    return {
        "initial": Scenario("initial", None, base_path, expected_state(base_rows), big,
                            max_embedded=rows),
        "update": Scenario("update", base_db, target_path, target, small, max_embedded=changed),
        "rebuild": Scenario("rebuild", base_db, target_path, expected_state(changes.table, dim=64),
                            big, dim=64, rebuild=True, max_embedded=changes.table.num_rows),
    }  # fmt: skip


def kill_and_recover(scenario: Scenario, kill: KillPoint, workdir: Path) -> dict[str, Any]:
    """Kill a child refresh at ``kill``, re-run it to completion here, check the table.

    Raises:
        AssertionError: A deterministic kill point was not reached, or the table is not the
            expected state (duplicates, missing or stale rows), or a further refresh still
            finds work.
    """
    db = str(workdir / "db")
    if scenario.base is not None:
        shutil.copytree(scenario.base, db)
    kwargs: dict[str, Any] = {"dim": scenario.dim, "chunk_rows": scenario.chunk_rows}
    child = dict(db_uri=db, table=FAULT_TABLE, source_path=scenario.source, kill=kill)
    (exitcode,) = run_children([dict(child, rebuild=scenario.rebuild, **kwargs)])
    killed = exitcode == -9
    if kill.deterministic:
        assert killed, f"the child was not killed at {kill} (exit code {exitcode})"
    else:
        assert exitcode in (0, -9), exitcode
    interrupted = table_version(db, FAULT_TABLE)
    started = datetime.now()
    rerun = run_refresh(db, FAULT_TABLE, scenario.source, rebuild=scenario.rebuild, **kwargs)
    rerun_s = (datetime.now() - started).total_seconds()
    assert_table_matches(db, FAULT_TABLE, scenario.expected, embedding_spec=spec(scenario.dim))
    # Converged: one more refresh finds nothing to do.
    again = run_refresh(db, FAULT_TABLE, scenario.source, **kwargs)
    assert not again.committed
    assert again.unchanged == len(scenario.expected)
    assert rerun.embedded_rows <= scenario.max_embedded
    return {
        "killed": killed,
        "version_interrupted": interrupted,
        "rerun_embedded": rerun.embedded_rows,
        "rerun_committed": rerun.committed,
        "rerun_s": rerun_s,
    }


def child_census(
    db_uri: str,
    table: str,
    source_path: str,
    *,
    dim: int = DIM,
    chunk_rows: int = 200,
    rebuild: bool = False,
    result: Any = None,
) -> None:
    """Child-process entry point: count the embed calls and store operations of a refresh.

    Runs with the same small delete batches as a killed child, so the counts say which
    ``KillPoint`` values a refresh of this scenario reaches.
    """
    install_kill_point(KillPoint("none"))
    counts: dict[str, int] = {}
    original = VectorStore._with_retries

    def counting(self, what, action):
        op = what.split()[0]
        counts[op] = counts.get(op, 0) + 1
        return original(self, what, action)

    VectorStore._with_retries = counting  # type: ignore[method-assign]
    embedder = FakeEmbedder(spec(dim))
    started = datetime.now()
    run_refresh(db_uri, table, source_path, dim=dim, chunk_rows=chunk_rows, rebuild=rebuild,
                embedder=embedder)  # fmt: skip
    counts["embed"] = len(embedder.calls)
    counts["seconds"] = (datetime.now() - started).total_seconds()  # type: ignore[assignment]
    result.put(counts)
