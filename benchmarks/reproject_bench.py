"""Re-projecting vs re-embedding: a rebuild to a smaller dim, side by side in one run.

A table of N rows is filled at dim ``--from-dim`` (the fake embedder: the fill is not what is
measured), then rebuilt in place to ``--to-dim`` three ways, each into a fresh copy:

* re-projected: ``refresh(rebuild=True)`` with re-projection (the default): every vector is
  sliced from the stored one and re-normalised, no model;
* pipeline only: the same rebuild with ``reproject=False`` and the fake embedder, whose
  vectors cost almost nothing: the ceiling of any re-embedding through this pipeline;
* tiny Qwen3 model: the same rebuild with ``reproject=False`` and the real transformers Qwen3
  code on a random-initialised tiny checkpoint (hidden 256, 4 layers) on this CPU, on a
  ``--model-rows`` slice. A real model is far larger: this is a lower bound of the gain.

Prints rows/s of each and the ratios. Memory is not the point here (see refresh_bench).

    python benchmarks/reproject_bench.py --rows 1000000 --from-dim 128 --to-dim 64
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.demo.model import build_tiny_qwen3_checkpoint  # noqa: E402
from qwen3_pipeline.engine.refresh import refresh  # noqa: E402
from qwen3_pipeline.sources import ArrowSource, SourceConfig  # noqa: E402
from qwen3_pipeline.testing import FakeEmbedder  # noqa: E402

CONFIG = SourceConfig(key="id", text_columns=("body",))


def rows(n: int) -> pa.Table:
    bodies = [
        f"Row {i}: a short document about subject {i % 997}, with detail {i % 131}."
        for i in range(n)
    ]
    return pa.table({"id": pa.array(range(n), pa.int64()), "body": bodies})


def rebuild(db: str, data: pa.Table, embedder, *, reproject: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    report = refresh(
        source=ArrowSource(data),
        config=CONFIG,
        embedder=embedder,
        db_uri=db,
        table="docs",
        rebuild=True,
        reproject=reproject,
        chunk_rows=20_000,
        progress=False,
    )
    seconds = time.perf_counter() - started
    return seconds, {"reprojected": report.reprojected, "embedded": report.embedded_rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model-rows", type=int, default=2_000)
    parser.add_argument("--from-dim", type=int, default=128)
    parser.add_argument("--to-dim", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reproject-bench-"))
    try:
        model_dir = build_tiny_qwen3_checkpoint(
            work / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
            intermediate_size=512,
        )  # fmt: skip
        big = EmbeddingSpec(model=str(model_dir), dim=args.from_dim)
        small = EmbeddingSpec(model=str(model_dir), dim=args.to_dim)
        data = rows(args.rows)
        filled = work / "filled"
        started = time.perf_counter()
        refresh(source=ArrowSource(data), config=CONFIG, embedder=FakeEmbedder(big),
                db_uri=str(filled), table="docs", chunk_rows=20_000, progress=False)  # fmt: skip
        fill_seconds = time.perf_counter() - started
        print(f"filled {args.rows} rows at dim {args.from_dim} in {fill_seconds:.1f}s")

        results = {}
        for name, embedder, reproject, n in (
            ("re-projected", FakeEmbedder(small), True, args.rows),
            ("pipeline only (fake model)", FakeEmbedder(small), False, args.rows),
        ):
            db = work / name.split()[0]
            shutil.copytree(filled, db)
            seconds, counts = rebuild(str(db), data.slice(0, n), embedder, reproject=reproject)
            results[name] = (n, seconds, counts)
            shutil.rmtree(db)
        # The real model on a slice: a table of that slice, rebuilt without re-projection.
        from qwen3_pipeline.embedding.encoder import Qwen3Encoder

        sliced = data.slice(0, args.model_rows)
        db = work / "model-run"
        refresh(source=ArrowSource(sliced), config=CONFIG, embedder=FakeEmbedder(big),
                db_uri=str(db), table="docs", progress=False)  # fmt: skip
        encoder = Qwen3Encoder(small, device="cpu", progress=False)
        seconds, counts = rebuild(str(db), sliced, encoder, reproject=False)
        results["tiny Qwen3 model (CPU)"] = (args.model_rows, seconds, counts)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nrebuild dim {args.from_dim} -> {args.to_dim}")
    print(f"{'how':<28} {'rows':>9} {'seconds':>8} {'rows/s':>10}  counts")
    rate = {}
    for name, (n, seconds, counts) in results.items():
        rate[name] = n / seconds
        print(f"{name:<28} {n:>9} {seconds:>8.1f} {rate[name]:>10.0f}  {counts}")
    fast = rate["re-projected"]
    free, tiny = rate["pipeline only (fake model)"], rate["tiny Qwen3 model (CPU)"]
    print(f"\nre-projection vs pipeline with a free model: {fast / free:.2f}x")
    print(f"re-projection vs the tiny Qwen3 model on CPU: {fast / tiny:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
