"""Write path: ``VectorStore.upsert`` (with ``build_rows``) vs LanceDB's own ``merge_insert``.

Both write the same rows (dim 1024 random unit vectors plus the lineage columns) in the same
chunks into two tables of one local LanceDB directory, interleaved chunk by chunk so that both
see the same machine conditions:

1. ``insert``: fill a table of ``--rows`` rows with new keys;
2. ``update``: re-write a random 1% of the keys (new vectors), in the same chunk size.

Ours is timed from the raw keys/vectors (``build_rows``: schema conformance, key checks, the
lineage columns) to the commit (``upsert``: one ``merge_insert`` on a table with a declared
primary key and a BTree index on it); LanceDB's is timed from the already built Arrow table
to the commit, on a plain table of the same schema:
``table.merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute()``.

    python benchmarks/store_bench.py                   # 1M rows, chunks of 10k
    python benchmarks/store_bench.py --rows 200000 --chunk-rows 5000
"""

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.core.schema import table_schema  # noqa: E402
from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.store import VectorStore  # noqa: E402

DIM = 1024
SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=DIM)
CARRY = pa.schema([pa.field("title", pa.string())])


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def build(store: VectorStore, keys: np.ndarray, vectors: np.ndarray, run_id: str) -> pa.Table:
    n = len(keys)
    return store.build_rows(
        keys=pa.array(keys),
        vectors=vectors,
        content_hashes=pa.array([f"{k:032x}" for k in keys.tolist()]),
        n_tokens=np.full(n, 42, dtype=np.int32),
        truncated=np.zeros(n, dtype=bool),
        partition_keys=pa.array([f"shard-{k % 16:02d}-of-16" for k in keys.tolist()]),
        source="bench",
        run_id=run_id,
        carry=pa.table({"title": [f"title {k}" for k in keys.tolist()]}),
    )


def run(args: argparse.Namespace, workdir: Path) -> None:
    import lancedb

    db_uri = str(workdir / "lancedb")
    store = VectorStore.open(db_uri, "ours", SPEC, key_type=pa.int64(), carry_schema=CARRY)
    db = lancedb.connect(db_uri)
    schema = table_schema(SPEC, key_type=pa.int64(), carry_schema=CARRY)
    raw = db.create_table("raw", schema=schema)
    rng = np.random.default_rng(0)
    chunk = args.chunk_rows

    def write_phase(name: str, batches: list[np.ndarray]) -> tuple[float, float, int]:
        ours_s = raw_s = 0.0
        rows = 0
        run_id = uuid.uuid4().hex
        for i, keys in enumerate(batches):
            vectors = unit_vectors(rng, len(keys))
            started = time.perf_counter()
            table = build(store, keys, vectors, run_id)
            store.upsert(table)
            ours_s += time.perf_counter() - started
            started = time.perf_counter()
            (
                raw.merge_insert("key")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(table)
            )
            raw_s += time.perf_counter() - started
            rows += len(keys)
            if (i + 1) % max(1, len(batches) // 10) == 0:
                print(f"  {name}: {rows:,} rows  ours {rows / ours_s:,.0f} rows/s  "
                      f"merge_insert {rows / raw_s:,.0f} rows/s", flush=True)  # fmt: skip
        return ours_s, raw_s, rows

    keys = np.arange(args.rows, dtype=np.int64)
    inserts = [keys[i : i + chunk] for i in range(0, args.rows, chunk)]
    changed = np.sort(rng.choice(keys, size=max(args.rows // 100, 1), replace=False))
    updates = [changed[i : i + chunk] for i in range(0, len(changed), chunk)]

    results = {}
    for name, batches in (("insert", inserts), ("update", updates)):
        results[name] = write_phase(name, batches)
    assert store.count_rows() == raw.count_rows() == args.rows

    print(f"\nwrite path, dim {DIM}, chunks of {chunk:,} rows, {args.rows:,}-row table")
    print(f"  {'phase':<8} {'rows':>10} {'ours rows/s':>12} {'merge_insert rows/s':>20} "
          f"{'ratio':>6}")  # fmt: skip
    total_ours = total_raw = total_rows = 0.0
    for name, (ours_s, raw_s, rows) in results.items():
        total_ours, total_raw, total_rows = (
            total_ours + ours_s,
            total_raw + raw_s,
            total_rows + rows,
        )
        print(f"  {name:<8} {rows:>10,} {rows / ours_s:>12,.0f} {rows / raw_s:>20,.0f} "
              f"{raw_s / ours_s:>6.2f}")  # fmt: skip
    ratio = total_raw / total_ours
    print(f"  {'total':<8} {int(total_rows):>10,} {total_rows / total_ours:>12,.0f} "
          f"{total_rows / total_raw:>20,.0f} {ratio:>6.2f}")  # fmt: skip
    verdict = "PASS" if ratio >= 0.7 else "MISS"
    print(f"ours / merge_insert throughput: {ratio:.2f} (target >= 0.7): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="store_bench_"))
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
