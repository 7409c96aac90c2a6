"""Shared helpers of the refresh tests and benchmarks (not a test module).

- Deterministic source tables and their mutations (edits, inserts, deletes, carry-only edits).
- An *independently computed* expected table state (rendering, sanitising, hashing, partition
  labels and fake vectors recomputed here, not through the engine's own helpers), and a
  comparison of a LanceDB table against it.
- Child-process entry points for fault injection (SIGKILL at a chosen point of a refresh, hooked
  at LanceDB's commit calls; the child records which phase was active when it died, so a test
  can check the kill landed where intended) and for concurrent writers. Children are started
  from a ``forkserver`` that preloads this module, so each child costs a fork instead of a
  fresh interpreter importing LanceDB.
"""

import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.engine.refresh import RefreshReport, refresh
from qwen3_pipeline.sources import ParquetSource, Shard, Shards, SourceConfig, TimeWindow
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


def no_drift_guard(embedder: Any, canaries: Any, *, threshold: float, accept_drift: bool) -> None:
    """A ``RefreshOptions.drift_guard`` that runs no guard.

    For tests that count the fake's embed calls or texts: the real guard embeds the canary
    texts with the same embedder (on the first fill, and before each later write).
    """
    return None


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


# --------------------------------------------------------------------------- kill points

# The LanceDB calls that commit a table version, by the operation names kill points use. They
# are hooked at LanceDB's API (see ``_hook_lancedb``), not inside the store, so a kill point
# names the same commit whichever store code makes the call.
COMMIT_OPS = (
    "create",  # DBConnection.create_table (an empty table)
    "declare",  # Table.set_unenforced_primary_key
    "index",  # Table.create_index
    "add_columns",  # Table.add_columns
    "upsert",  # Table.merge_insert(...).when_not_matched_insert_all().execute(...)
    "update",  # Table.merge_insert(...).execute(...) without inserts
    "delete",  # Table.delete
    "optimize",  # Table.optimize
    "swap",  # DBConnection.create_table(..., mode="overwrite"): a rebuild's swap
)
# Where, within a hooked commit call, a ``during`` kill can land (see KillPoint).
DURING_STAGES = ("writing", "committed", "returning")
_TABLE_SUBDIRS = ("data", "_deletions", "_indices", "_transactions", "_versions")


@dataclass(frozen=True)
class KillPoint:
    """Where a child refresh SIGKILLs itself.

    ``where``:
        ``embed``: inside the ``nth`` embed call (the chunk in flight is lost);
        ``before`` / ``after``: just before the ``nth`` LanceDB call committing ``op`` (one of
        ``COMMIT_OPS``) / just after it returned, before the store sees its result;
        ``during``: inside that call, as soon as a file it writes shows up in the table's
        directory: stage ``writing`` (a data, deletion, index or transaction file, no new
        manifest yet) or ``committed`` (its manifest is already there); when LanceDB returns
        before the watcher saw a file, the kill lands as it returns (``returning``), still
        before the store sees the result;
        ``time``: ``delay_s`` after the refresh started; a refresh that would end sooner is
        killed at its end instead (stage ``refresh end``), so the kill always lands inside it.

    Every kill is recorded by the child, just before the SIGKILL and while the phase it landed
    in is still active (:class:`KillRecord`); :func:`assert_killed_at` checks it.
    """

    where: Literal["embed", "before", "after", "during", "time"]
    nth: int = 1
    op: str = ""
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.where not in ("embed", "before", "after", "during", "time"):
            raise ValueError(f"unknown kill point kind {self.where!r}")
        if self.where in ("before", "after", "during") and self.op not in COMMIT_OPS:
            raise ValueError(
                f"{self.where} kill points need an op in {COMMIT_OPS}, not {self.op!r}"
            )
        if self.nth < 1 or self.delay_s < 0:
            raise ValueError(f"nth must be at least 1 and delay_s not negative: {self!r}")

    def __str__(self) -> str:
        if self.where == "time":
            return f"time-{self.delay_s * 1000:.0f}ms"
        if self.where == "embed":
            return f"embed-{self.nth}"
        return f"{self.where}-{self.op}-{self.nth}"

    @property
    def phase(self) -> str | None:
        """The phase the kill must land in (``"upsert #7"``, ``"embed #3"``); None for ``time``."""
        if self.where == "time":
            return None
        return f"{'embed' if self.where == 'embed' else self.op} #{self.nth}"

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages of :attr:`phase` the kill may be recorded at."""
        return {
            "embed": ("embedding",),
            "before": ("before",),
            "after": ("after",),
            "during": DURING_STAGES,
            "time": ("timer", "refresh end"),
        }[self.where]


@dataclass(frozen=True)
class KillRecord:
    """Where a kill landed, as the killed child wrote it down just before dying.

    Attributes:
        stack: The phases active at the kill, outermost first (``("refresh", "upsert #7")``).
        stage: Where within the innermost phase (see :class:`KillPoint`).
        files: New files of the commit that the kill interrupted, as seen in its table's
            directory (``during`` kills).
    """

    stack: tuple[str, ...]
    stage: str
    files: tuple[str, ...] = ()

    @property
    def phase(self) -> str | None:
        """The innermost active phase."""
        return self.stack[-1] if self.stack else None

    @classmethod
    def read(cls, path: os.PathLike[str] | str) -> "KillRecord | None":
        """The record at ``path``, or None when the child wrote none."""
        if not os.path.exists(path):
            return None
        data = json.loads(Path(path).read_text())
        return cls(tuple(data["stack"]), data["stage"], tuple(data["files"]))


def assert_killed_at(kill: KillPoint, exitcode: int, record: KillRecord | None) -> None:
    """The child died of SIGKILL, inside the refresh, in the phase and stage ``kill`` names."""
    assert exitcode == -signal.SIGKILL, (
        f"the child was not killed at {kill}: exit code {exitcode} (record {record})"
    )
    assert record is not None, f"the child was killed at {kill} but recorded nothing"
    assert record.stack[:1] == ("refresh",), f"{kill} landed outside the refresh: {record}"
    if kill.phase is not None:
        assert record.phase == kill.phase, f"{kill} landed in {record.phase!r}: {record}"
    assert record.stage in kill.stages, f"{kill} landed at stage {record.stage!r}: {record}"


def _table_files(table_dir: str) -> set[str]:
    found: set[str] = set()
    for sub in _TABLE_SUBDIRS:
        try:
            found.update(f"{sub}/{name}" for name in os.listdir(os.path.join(table_dir, sub)))
        except FileNotFoundError:
            continue
    return found


def _is_manifest(path: str) -> bool:
    # A committed version; LanceDB writes ``_versions/.tmp*`` / ``*.manifest#N`` first.
    return path.startswith("_versions/") and path.endswith(".manifest")


class KillSwitch:
    """The phases of a child refresh, and the SIGKILL that ends it at ``kill``.

    Phases (the refresh, each embed call, each hooked LanceDB commit call) are pushed on entry
    and popped on exit under a lock, one stack per thread: the apply pass embeds on the thread
    that runs the refresh while a writer thread commits, so an embed call and a commit can be
    active at once. A kill records the refresh's outermost phase followed by the phases of the
    thread it landed in (for a ``during`` kill, the thread in the commit; for a ``time`` kill,
    the refresh's thread). It takes the lock and never gives it back, so the phase it records
    cannot end between the record and the SIGKILL.

    Args:
        kill: Where to die; None only counts embed calls and commits (a census).
        record_path: Where to write the :class:`KillRecord` (None: nowhere).
    """

    def __init__(self, kill: KillPoint | None, record_path: str | None = None) -> None:
        self.kill = kill
        self.record_path = record_path
        self.counts: Counter[str] = Counter()
        self._stacks: dict[int, list[str]] = {}
        self._root: int | None = None  # the thread that entered the first phase (the refresh)
        self._lock = threading.Lock()
        self._in_commit = threading.local()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        thread = threading.get_ident()
        with self._lock:
            if self._root is None:
                self._root = thread
            self._stacks.setdefault(thread, []).append(name)
        try:
            yield
        finally:
            with self._lock:
                self._stacks[thread].pop()

    def _stack(self, thread: int) -> list[str]:
        root = self._stacks.get(self._root, []) if self._root is not None else []
        own = self._stacks.get(thread, [])
        if thread == self._root or not own:
            return list(root)
        return [*root[:1], *own]

    def die(self, stage: str, files: Iterable[str] = (), *, thread: int | None = None) -> NoReturn:
        """Record where the kill landed (in ``thread``: default this one), then SIGKILL."""
        self._lock.acquire()  # never released: the recorded phase stays active until the end
        if self.record_path is not None:
            stack = self._stack(threading.get_ident() if thread is None else thread)
            record = {"stack": stack, "stage": stage, "files": sorted(files)}
            Path(self.record_path).write_text(json.dumps(record))
        os.kill(os.getpid(), signal.SIGKILL)
        while True:  # SIGKILL cannot be caught; this thread only waits for it to land
            time.sleep(1)

    def _count(self, op: str) -> int:
        # Under the lock: the refresh's thread and its writer thread both count.
        with self._lock:
            self.counts[op] += 1
            return self.counts[op]

    def _aims_at(self, where: str, op: str, nth: int) -> bool:
        kill = self.kill
        return kill is not None and (kill.where, kill.op, kill.nth) == (where, op, nth)

    def embed(self, call: Callable[[], Any]) -> Any:
        nth = self._count("embed")
        with self.phase(f"embed #{nth}"):
            if self._aims_at("embed", "", nth):
                self.die("embedding")
            return call()

    def commit(self, op: str, table_dir: str, call: Callable[[], Any]) -> Any:
        """Run one LanceDB commit call ``call`` of ``op`` on ``table_dir``, maybe dying in it."""
        if getattr(self._in_commit, "active", False):
            return call()  # a hooked LanceDB method calling another: one commit
        nth = self._count(op)
        where = next((w for w in ("before", "after", "during") if self._aims_at(w, op, nth)), None)
        self._in_commit.active = True
        try:
            with self.phase(f"{op} #{nth}"):
                if where is None:
                    return call()
                if where == "before":
                    self.die("before")
                if where == "after":
                    call()
                    self.die("after")
                before = _table_files(table_dir)
                watcher = threading.Thread(
                    target=self._watch, args=(table_dir, before, threading.get_ident())
                )
                watcher.daemon = True
                watcher.start()
                try:
                    call()
                finally:
                    self.die("returning", _table_files(table_dir) - before)
        finally:
            self._in_commit.active = False

    def _watch(self, table_dir: str, before: set[str], committer: int) -> None:
        while True:
            new = _table_files(table_dir) - before
            if new:
                stage = "committed" if any(map(_is_manifest, new)) else "writing"
                self.die(stage, new, thread=committer)
            time.sleep(0.0001)

    def start_timer(self) -> None:
        """Arm a ``time`` kill (call as the refresh starts)."""
        if self.kill is not None and self.kill.where == "time":
            timer = threading.Timer(self.kill.delay_s, self.die, args=("timer",))
            timer.daemon = True
            timer.start()

    def refresh_ended(self) -> None:
        """A ``time`` kill that has not fired lands here, before the refresh returns."""
        if self.kill is not None and self.kill.where == "time":
            self.die("refresh end")


class _TrackedEmbedder(FakeEmbedder):
    """A FakeEmbedder whose calls are phases of a :class:`KillSwitch` (which may kill in one)."""

    def __init__(
        self, embedding_spec: EmbeddingSpec, switch: KillSwitch, fail_texts: Sequence[str] = ()
    ) -> None:
        super().__init__(embedding_spec, fail_texts=fail_texts)
        self._switch = switch

    def embed_documents(self, texts):
        return self._switch.embed(partial(super().embed_documents, texts))


def _hook_lancedb(switch: KillSwitch) -> None:
    # Wraps the LanceDB methods that commit (COMMIT_OPS). Reads two attributes of LanceDB's
    # merge builder (its table; whether it inserts unmatched rows): internals of lancedb 0.40.
    from lancedb.db import LanceDBConnection
    from lancedb.merge import LanceMergeInsertBuilder
    from lancedb.table import LanceTable

    def table_method(op: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(original)
        def hooked(self, *args, **kwargs):
            return switch.commit(op, self.uri, partial(original, self, *args, **kwargs))

        return hooked

    for op, name in [
        ("declare", "set_unenforced_primary_key"),
        ("index", "create_index"),
        ("add_columns", "add_columns"),
        ("delete", "delete"),
        ("optimize", "optimize"),
    ]:
        setattr(LanceTable, name, table_method(op, getattr(LanceTable, name)))

    execute = LanceMergeInsertBuilder.execute

    @wraps(execute)
    def merge(self, *args, **kwargs):
        op = "upsert" if self._when_not_matched_insert_all else "update"
        return switch.commit(op, self._table.uri, partial(execute, self, *args, **kwargs))

    create_table = LanceDBConnection.create_table

    @wraps(create_table)
    def create(self, name, *args, **kwargs):
        op = "swap" if kwargs.get("mode") == "overwrite" else "create"
        table_dir = os.path.join(self.uri, f"{name}.lance")
        return switch.commit(op, table_dir, partial(create_table, self, name, *args, **kwargs))

    LanceMergeInsertBuilder.execute = merge  # type: ignore[method-assign]
    LanceDBConnection.create_table = create  # type: ignore[method-assign]


def install_kill_switch(
    kill: KillPoint | None, record_path: str | None = None, *, delete_batch: int = 25
) -> KillSwitch:
    """Hook LanceDB and the store in this (child) process so that it dies at ``kill``."""
    original_delete = VectorStore.delete_keys

    def small_batches(self, keys, *, batch_size=delete_batch):
        # Many delete commits, so a kill can land between two of them.
        return original_delete(self, keys, batch_size=min(batch_size, delete_batch))

    VectorStore.delete_keys = small_batches  # type: ignore[method-assign]
    switch = KillSwitch(kill, record_path)
    _hook_lancedb(switch)
    return switch


# --------------------------------------------------------------------------- child processes


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
    record: str | None = None,
    barrier: Any = None,
    barrier_at: str = "start",
    result: Any = None,
    fail_texts: Sequence[str] = (),
) -> None:
    """Child-process entry point: one refresh, maybe killed at ``kill``.

    ``fail_texts``: texts the fake model fails on (rows that get failure records).

    ``record`` is the file the child writes its :class:`KillRecord` to when it kills itself.
    ``barrier`` (a multiprocessing Barrier) lines concurrent children up at the start of the
    refresh, or at ``VectorStore.open`` with ``barrier_at="open"``; ``result`` (a
    multiprocessing queue) receives the report as a dict.
    """
    embedder: FakeEmbedder = FakeEmbedder(spec(dim), fail_texts=fail_texts)
    switch: KillSwitch | None = None
    if kill is not None:
        switch = install_kill_switch(kill, record)
        embedder = _TrackedEmbedder(spec(dim), switch, fail_texts)
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
    run = partial(run_refresh, db_uri, table, source_path, config=config, dim=dim,
                  chunk_rows=chunk_rows, rebuild=rebuild, embedder=embedder)  # fmt: skip
    if switch is None:
        report = run()
    else:
        with switch.phase("refresh"):
            switch.start_timer()
            report = run()
            switch.refresh_ended()
    # A kill point the refresh never reached ends here, normally: the parent sees exit code 0.
    if result is not None:
        result.put(report.as_dict())


_CONTEXT: Any = None
# What a child's refresh imports on first use (the engine imports LanceDB and DuckDB lazily):
# imported once in the forkserver, they cost a child nothing (about 2 s each otherwise).
_PRELOAD = (__name__, "lancedb", "lancedb.merge", "duckdb")


def fork_context() -> Any:
    """A forkserver context whose server has this module (and LanceDB) imported, unused."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(list(_PRELOAD))
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


def run_killed_child(kill: KillPoint, workdir: Path, **child: Any) -> KillRecord:
    """Run ``child_refresh(kill=kill, **child)`` and check that it died where ``kill`` says.

    Raises:
        AssertionError: The child exited another way (it never reached the kill point, or
            failed), or its kill landed in another phase or stage.
    """
    record_path = workdir / "kill-record.json"
    record_path.unlink(missing_ok=True)
    (exitcode,) = run_children([dict(child, kill=kill, record=str(record_path))])
    record = KillRecord.read(record_path)
    assert_killed_at(kill, exitcode, record)
    assert record is not None
    return record


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
        AssertionError: The child was not killed where ``kill`` says (see
            :func:`run_killed_child`), or the table is not the expected state (duplicates,
            missing or stale rows), or a further refresh still finds work.
    """
    db = str(workdir / "db")
    if scenario.base is not None:
        shutil.copytree(scenario.base, db)
    kwargs: dict[str, Any] = {"dim": scenario.dim, "chunk_rows": scenario.chunk_rows}
    child = dict(db_uri=db, table=FAULT_TABLE, source_path=scenario.source, **kwargs)
    record = run_killed_child(kill, workdir, rebuild=scenario.rebuild, **child)
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
        "phase": record.phase,
        "stage": record.stage,
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
    """Child-process entry point: count the embed calls and LanceDB commits of a refresh.

    Runs with the same hooks and small delete batches as a killed child, so the counts
    (``embed`` and each of ``COMMIT_OPS``) say which ``KillPoint`` values a refresh of this
    scenario reaches, and ``seconds`` how long it takes.
    """
    switch = install_kill_switch(None)
    embedder = _TrackedEmbedder(spec(dim), switch)
    started = datetime.now()
    run_refresh(db_uri, table, source_path, dim=dim, chunk_rows=chunk_rows, rebuild=rebuild,
                embedder=embedder)  # fmt: skip
    counts: dict[str, Any] = dict(switch.counts)
    counts["seconds"] = (datetime.now() - started).total_seconds()
    result.put(counts)
