"""Memory of one write by table size: what a commit costs on a table of N rows.

A refresh commits its rows in chunks with ``VectorStore.upsert`` (one LanceDB ``merge_insert``
each). This measures the peak RSS that one such commit of ``--chunk-rows`` new rows adds, on a
table of each size in ``--rows``, in three states of the key's BTree index, each in a fresh
process:

- ``no index``: the table as a first refresh (a backfill) writes it: the key is declared, not
  yet indexed (the refresh indexes it after its last commit);
- ``indexed``: every row is in the index, as after a refresh;
- ``indexed + tail``: indexed, then ``--tail-rows`` more rows written, as during a later
  refresh (its commits are not indexed until the run's end).

The table is filled with LanceDB's ``add`` (fast; the fill is not what is measured), then one
warm-up upsert, then the process's high-water mark is reset (``/proc/self/clear_refs``, Linux)
and three upserts of new keys are measured. The "per target row" column is the slope of the
peak between the smallest and the largest table: what each row already in the table costs a
commit. The vectors are small (dim 64): the merge joins on the key alone.

    python benchmarks/merge_memory_bench.py                       # 1M and 4M rows
    python benchmarks/merge_memory_bench.py --rows 500000,2000000
    python benchmarks/merge_memory_bench.py --rows 4000000 --tails 100000,250000,500000

With ``--tails``, the table is indexed with an unindexed tail of each given length, and each
commit is timed three ways: LanceDB's merge forced to look keys up in the index
(``use_index(True)``), forced to scan (``use_index(False)``), and ``VectorStore.upsert``,
which picks one (:mod:`qwen3_pipeline.store.merge_path`).

With ``--shard-runs N``, a Parquet source of each size (``refresh_bench.py``'s short rows) is
backfilled in N hash shards, each a refresh of its own in a fresh process, as a Dagster
backfill of N partitions run one after another: first with the store's choice of join, then
with the index always used (the store before it chose). Each run's writes after the first
shard go into an indexed table and pile up an unindexed tail.

    python benchmarks/merge_memory_bench.py --rows 4000000 --shard-runs 4

With ``--documents``, the table holds chunks (documents of 10 chunks, ``--rows`` chunks, key
indexed) and one commit replaces ``--chunk-rows`` chunks' worth of documents three ways:
with as many chunks as before through ``VectorStore.replace_documents`` (no chunk to delete,
so no by-source delete), the same rows through LanceDB's merge with the by-source delete
that ``replace_documents`` always asked for before, and with one chunk fewer per document
through ``replace_documents`` (which must delete by source).

    python benchmarks/merge_memory_bench.py --documents --rows 1000000,4000000
"""

import argparse
import ctypes
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from store_bench import CARRY, build  # noqa: E402

from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.store import VectorStore  # noqa: E402

DIM = 64
SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=DIM)
STATES = ("no index", "indexed", "indexed + tail")
FILL_ROWS = 100_000  # rows per ``add`` while filling


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def measure(job: dict[str, Any], queue: Any) -> None:
    """Child process: fill a table to ``job["rows"]`` rows, then measure upserts on it."""
    import lancedb

    rows, state, chunk = job["rows"], job["state"], job["chunk_rows"]
    rng = np.random.default_rng(0)

    def open_store() -> VectorStore:
        # Opened afresh after each fill so that it sees the rows added by the other handle.
        return VectorStore.open(job["db"], "t", SPEC, key_type=pa.int64(), carry_schema=CARRY)

    store = open_store()  # creates the table and declares the key
    table = lancedb.connect(job["db"]).open_table("t")
    run_id = uuid.uuid4().hex

    def rows_for(lo: int, n: int) -> pa.Table:
        keys = np.arange(lo, lo + n, dtype=np.int64)
        vectors = rng.standard_normal((n, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return build(store, keys, vectors, run_id)

    indexed_rows = rows - job["tail_rows"] if state == "indexed + tail" else rows
    for lo in range(0, indexed_rows, FILL_ROWS):
        table.add(rows_for(lo, min(FILL_ROWS, indexed_rows - lo)))
    if state != "no index":
        open_store().ensure_key_index()
    for lo in range(indexed_rows, rows, FILL_ROWS):
        table.add(rows_for(lo, min(FILL_ROWS, rows - lo)))
    store = open_store()
    assert store.count_rows() == rows, store.count_rows()
    store.upsert(rows_for(rows, chunk))  # warm-up: caches, the runtime's threads
    batches = [rows_for(rows + chunk * (i + 1), chunk) for i in range(3)]
    ctypes.CDLL(None).malloc_trim(0)  # start from what is live, not what malloc kept
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    base = _status_mib("VmRSS")
    started = time.perf_counter()
    for batch in batches:
        if job.get("use_index") is None:
            store.upsert(batch)
        else:  # LanceDB's merge with its index use forced, on a handle opened afresh
            fresh = lancedb.connect(job["db"]).open_table("t")
            merge = (
                fresh.merge_insert("key").when_matched_update_all().when_not_matched_insert_all()
            )
            merge.use_index(job["use_index"]).execute(batch)
    queue.put(
        {
            "base_mib": base,
            "added_mib": _status_mib("VmHWM") - base,
            "s_per_commit": (time.perf_counter() - started) / len(batches),
        }
    )


def run_job(
    job: dict[str, Any], args: argparse.Namespace, workdir: Path, target: Any = None
) -> dict[str, Any]:
    """Run ``target`` (:func:`measure`) for ``job`` in a fresh process.

    The job gets a table of its own, deleted afterwards, unless it names its ``db``.
    """
    db = Path(job["db"]) if "db" in job else workdir / f"db-{uuid.uuid4().hex}"
    own_db = "db" not in job
    job = {**job, "db": str(db), "chunk_rows": args.chunk_rows}
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target or measure, args=(job, queue))
    process.start()
    result = queue.get()
    process.join()
    if own_db:
        shutil.rmtree(db, ignore_errors=True)
    if process.exitcode:
        raise SystemExit(f"{job} failed with exit code {process.exitcode}")
    return dict(result)


def by_size(args: argparse.Namespace, sizes: list[int], workdir: Path) -> None:
    """The states of the key index by table size, through ``VectorStore.upsert``."""
    print(f"one upsert of {args.chunk_rows:,} new rows (peak RSS it adds, max of 3), by table "
          f"size and key index; each in a fresh process", flush=True)  # fmt: skip
    print(f"  {'table rows':>11} {'key index':<15} {'base':>9} {'added':>10} {'s/commit':>9}")
    added: dict[str, dict[int, float]] = {state: {} for state in STATES}
    for rows in sizes:
        for state in STATES:
            job = {"rows": rows, "state": state, "tail_rows": args.tail_rows}
            r = run_job(job, args, workdir)
            added[state][rows] = r["added_mib"]
            print(f"  {rows:>11,} {state:<15} {r['base_mib']:>5.0f} MiB "
                  f"{r['added_mib']:>+6.0f} MiB {r['s_per_commit']:>9.3f}", flush=True)  # fmt: skip
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"\nwhat each row already in the table adds to a commit's peak "
              f"({small:,} -> {large:,} rows):")  # fmt: skip
        for state in STATES:
            slope = (added[state][large] - added[state][small]) * 2**20 / (large - small)
            print(f"  {state:<15} {slope:>6.1f} B/row")


def by_tail(args: argparse.Namespace, sizes: list[int], workdir: Path) -> None:
    """Index lookup against scan, forced, by unindexed tail; and what the store chose."""
    print(f"one merge of {args.chunk_rows:,} new rows into an indexed table with an unindexed "
          f"tail: LanceDB's index lookup against its scan (forced with use_index), and "
          f"VectorStore.upsert's choice; each in a fresh process", flush=True)  # fmt: skip
    print(f"  {'table rows':>11} {'tail':>9} {'tail/indexed':>12}  {'lookup':>19}  {'scan':>19}  "
          f"{'store':>19}")  # fmt: skip
    for rows in sizes:
        for tail in (int(t) for t in args.tails.split(",")):
            cells = []
            for use_index in (True, False, None):
                job = {"rows": rows, "state": "indexed + tail", "tail_rows": tail,
                       "use_index": use_index}  # fmt: skip
                r = run_job(job, args, workdir)
                cells.append(f"{r['added_mib']:>+5.0f} MiB {r['s_per_commit']:>6.3f} s")
            print(f"  {rows:>11,} {tail:>9,} {tail / (rows - tail):>12.1%}  "
                  f"{'  '.join(cells)}", flush=True)  # fmt: skip


def refresh_one_shard(job: dict[str, Any], queue: Any) -> None:
    """Child process: refresh shard ``job["shard"]`` of ``job["shards"]`` as a run of its own."""
    import dataclasses

    import refresh_bench

    import qwen3_pipeline.engine.refresh as engine
    import qwen3_pipeline.store.table as store_table
    from qwen3_pipeline.sources import ParquetSource
    from qwen3_pipeline.sources.partitions import Shard

    if job["join"] == "index always":  # what the store did before it chose per write
        store_table.merge_uses_index = lambda coverage: True  # type: ignore[assignment]
    writes = [0.0]
    upsert = VectorStore.upsert

    def timed_upsert(self: VectorStore, rows: pa.Table) -> Any:
        started = time.perf_counter()
        try:
            return upsert(self, rows)
        finally:
            writes[0] += time.perf_counter() - started

    VectorStore.upsert = timed_upsert  # type: ignore[method-assign]
    spec = EmbeddingSpec(model=refresh_bench.WATERMARK_MODEL, dim=refresh_bench.DIM)
    config = dataclasses.replace(refresh_bench.CONFIG, partition=Shard(job["shard"], job["shards"]))
    started = time.perf_counter()
    report = engine.refresh(
        source=ParquetSource(job["source"]),
        config=config,
        embedder=refresh_bench.bench_fake(spec),
        db_uri=job["db"],
        table="t",
        chunk_rows=job["chunk_rows"],
        progress=False,
    )
    queue.put(
        {
            "wall_s": time.perf_counter() - started,
            "write_s": writes[0],
            "embedded": report.embedded_rows,
            "peak_mib": _status_mib("VmHWM"),
        }
    )


def by_shard_runs(args: argparse.Namespace, sizes: list[int], workdir: Path) -> None:
    """A backfill run shard by shard, as separate runs: the store's join against the index's."""
    import refresh_bench

    words = np.array(refresh_bench.vocabulary())
    print(f"a backfill in {args.shard_runs} shards, each a run of its own (a fresh process), "
          f"fake model: the store's choice of join per write against the index always",
          flush=True)  # fmt: skip
    for rows in sizes:
        source = workdir / f"source-{rows}.parquet"
        refresh_bench.write_source(source, rows, words, changed=False)
        totals = {}
        for join in ("store's choice", "index always"):
            db = workdir / f"shards-{rows}-{uuid.uuid4().hex}"
            later_writes = later_wall = peak = 0.0
            for shard in range(args.shard_runs):
                job = {"db": str(db), "source": str(source), "shard": shard,
                       "shards": args.shard_runs, "join": join}  # fmt: skip
                r = run_job(job, args, workdir, target=refresh_one_shard)
                print(f"  {rows:>11,} rows  {join:<15} shard {shard}: wall {r['wall_s']:6.1f} s  "
                      f"writes {r['write_s']:6.1f} s  embedded {r['embedded']:>9,}  "
                      f"peak {r['peak_mib']:5.0f} MiB", flush=True)  # fmt: skip
                if shard:
                    later_writes += r["write_s"]
                    later_wall += r["wall_s"]
                peak = max(peak, r["peak_mib"])
            shutil.rmtree(db, ignore_errors=True)
            totals[join] = (later_writes, later_wall, peak)
        (writes, wall, peak), (old_writes, old_wall, old_peak) = totals.values()
        print(f"  shards after the first: writes {writes:.1f} s against {old_writes:.1f} s "
              f"({writes / old_writes:.2f}x), wall {wall:.1f} s against {old_wall:.1f} s "
              f"({wall / old_wall:.2f}x); highest peak {peak:.0f} MiB against {old_peak:.0f} MiB",
              flush=True)  # fmt: skip


CHUNKS_PER_DOC = 10


def chunk_rows_for(store: VectorStore, docs: np.ndarray, chunks: int, run_id: str) -> pa.Table:
    """Rows of ``chunks`` chunks for each document of ``docs`` (random unit vectors)."""
    owners = np.repeat(docs, chunks)
    seqs = np.tile(np.arange(chunks, dtype=np.int32), len(docs))
    n = len(owners)
    keys = [f"{d}#{q}" for d, q in zip(owners.tolist(), seqs.tolist(), strict=True)]
    texts = [f"chunk {k}" for k in keys]
    starts = seqs.astype(np.int64) * 100
    vectors = np.random.default_rng(0).standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunk_columns = pa.table(
        {
            "doc_key": pa.array(owners, pa.int64()),
            "chunk_seq": seqs,
            "chunk_start": starts,
            "chunk_core_start": starts,
            "chunk_end": starts + 100,
            "chunk_text": texts,
            "chunk_hash": [f"{k}:{run_id}" for k in keys],
        }
    )
    return store.build_rows(
        keys=pa.array(keys),
        vectors=vectors,
        content_hashes=pa.array([f"doc {d}" for d in owners.tolist()]),
        n_tokens=np.full(n, 20, dtype=np.int32),
        truncated=np.zeros(n, dtype=bool),
        partition_keys=pa.array([""] * n),
        source="bench",
        run_id=run_id,
        carry=pa.table({"title": [f"title {d}" for d in owners.tolist()]}),
        chunks=chunk_columns,
    )


def replace_documents(job: dict[str, Any], queue: Any) -> None:
    """Child process: a chunk table of ``job["rows"]`` chunks; one way of replacing documents."""
    import lancedb
    from lancedb.expr import col

    spec = SPEC.with_chunking('{"tokens":64}')
    store = VectorStore.open(job["db"], "t", spec, key_type=pa.int64(), carry_schema=CARRY)
    table = lancedb.connect(job["db"]).open_table("t")
    docs = job["rows"] // CHUNKS_PER_DOC
    for lo in range(0, docs, FILL_ROWS // CHUNKS_PER_DOC):
        batch = np.arange(lo, min(docs, lo + FILL_ROWS // CHUNKS_PER_DOC), dtype=np.int64)
        table.add(chunk_rows_for(store, batch, CHUNKS_PER_DOC, "fill"))
    store = VectorStore.open(job["db"], "t", spec, key_type=pa.int64(), carry_schema=CARRY)
    store.ensure_key_index()
    per_commit = job["chunk_rows"] // CHUNKS_PER_DOC
    chunks = CHUNKS_PER_DOC - 1 if job["way"] == "shorter documents" else CHUNKS_PER_DOC

    def commit(i: int) -> None:
        batch = np.arange(i * per_commit, (i + 1) * per_commit, dtype=np.int64)
        rows = chunk_rows_for(store, batch, chunks, f"edit-{i}")
        if job["way"] == "by-source delete always":  # what replace_documents did before
            scope = col("doc_key").isin(batch.tolist())
            merge = table.merge_insert("key").when_matched_update_all()
            merge.when_not_matched_insert_all().when_not_matched_by_source_delete(scope).execute(
                rows
            )
        else:
            store.replace_documents(rows, pa.array(batch))

    table.checkout_latest()
    commit(0)  # warm-up
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _status_mib("VmRSS")
    started = time.perf_counter()
    for i in (1, 2, 3):
        commit(i)
    queue.put(
        {
            "base_mib": base,
            "added_mib": _status_mib("VmHWM") - base,
            "s_per_commit": (time.perf_counter() - started) / 3,
        }
    )


def by_documents(args: argparse.Namespace, sizes: list[int], workdir: Path) -> None:
    """Replacing documents of a chunk table: only when needed against always deleting by source."""
    docs = args.chunk_rows // CHUNKS_PER_DOC
    print(f"replace {docs:,} documents of {CHUNKS_PER_DOC} chunks (one commit) in a chunk table "
          f"(dim {DIM}, key indexed): peak RSS it adds (max of 3) and time; each in a fresh "
          f"process", flush=True)  # fmt: skip
    ways = ("same length", "by-source delete always", "shorter documents")
    print(f"  {'chunks':>11}  " + "  ".join(f"{way:>24}" for way in ways))
    for rows in sizes:
        cells = []
        for way in ways:
            r = run_job({"rows": rows, "way": way}, args, workdir, target=replace_documents)
            cells.append(f"{r['added_mib']:>+7.0f} MiB {r['s_per_commit']:>6.3f} s")
        print(f"  {rows:>11,}  " + "  ".join(f"{c:>24}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,4000000", help="comma-separated table sizes")
    parser.add_argument("--chunk-rows", type=int, default=10_000, help="rows per commit")
    parser.add_argument("--tail-rows", type=int, default=20_000)
    parser.add_argument(
        "--tails",
        default=None,
        help="comma-separated unindexed tails: compare the index lookup and the scan instead",
    )
    parser.add_argument(
        "--shard-runs",
        type=int,
        default=0,
        help="backfill a source of each size in this many shards, one run each, instead",
    )
    parser.add_argument(
        "--documents",
        action="store_true",
        help="replace documents of a chunk table of each size (in chunks) instead",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.rows.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge_memory_bench_"))
    try:
        mode = (
            by_documents
            if args.documents
            else by_shard_runs
            if args.shard_runs
            else by_tail
            if args.tails
            else by_size
        )
        mode(args, sizes, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
