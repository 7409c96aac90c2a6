"""How busy the pipelined apply keeps the model: a paced stand-in for a GPU, with and without.

The model is :class:`PacedEmbedder`: each call takes ``tokens / rate`` seconds (default rate
350,000 tokens/s, about Qwen3-Embedding-0.6B on one H100), sleeping what its own work leaves of
that, so the CPU stays free for the rest of the refresh, as with a GPU; its vectors are
deterministic fake unit vectors (dim 256). Two tables are filled from scratch (a full refresh,
the drift guard on, default ``chunk_rows``):

1. **short rows**: ``--rows`` rows of a few dozen words each, from Parquet (default 250,000:
   ``--rows 1000000 --no-ray --skip-docs`` alone takes 4 minutes on the 2-core development
   machine, each Ray size adds a minute or two);
2. **long documents**: ``--docs`` documents of about ``--doc-words`` words, in a chunk table
   (chunks of 512 tokens, ``--doc-batch`` documents per batch).

Each is filled with the apply's pipelining off (``pipeline.PIPELINE_DEPTH = 0``: read, embed,
write one after another) and on (the default), side by side in one run, and, unless
``--no-ray``, through :class:`~qwen3_pipeline.embedding.ray_pool.RayEmbedder` with 1, 2, 4 and 8
paced actors (``--workers``). For each it prints the apply's wall time (the plan excluded),
the model's busy share (model seconds / (workers x apply seconds); model seconds = tokens /
rate), the same without the compaction that ends the run, the time each step took in all
(prepare: reading the spill, and for chunk tables cutting the documents and reading their
stored chunks; embed: the model calls, as the calling thread waited for them; write: building
the rows and committing), the compaction, and for Ray the scaling efficiency against one
worker. The paced workers sleep, so Ray's figures measure the driver and the pipeline, not the
CPU.

    python benchmarks/pipeline_bench.py                    # 250k rows, 400 documents
    python benchmarks/pipeline_bench.py --rows 1000000 --no-ray --skip-docs
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.refresh_bench import vocabulary  # noqa: E402
from qwen3_pipeline.chunking.config import ChunkingConfig  # noqa: E402
from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.embedding.interface import BatchDone, EncodeResult, EncodeStats  # noqa: E402
from qwen3_pipeline.engine import pipeline  # noqa: E402
from qwen3_pipeline.engine.chunk_writer import ChunkWriter  # noqa: E402
from qwen3_pipeline.engine.refresh import refresh  # noqa: E402
from qwen3_pipeline.engine.row_writer import RowWriter  # noqa: E402
from qwen3_pipeline.sources import ParquetSource, SourceConfig  # noqa: E402
from qwen3_pipeline.store import VectorStore  # noqa: E402

DIM = 256
RATE = 350_000
MODEL = "Qwen/Qwen3-Embedding-0.6B"
ROW_CONFIG = SourceConfig(key="id", text_columns=("title", "body"))
CHUNKING = ChunkingConfig(tokens=512)
DOC_CONFIG = SourceConfig(key="id", text_columns=("body",), chunking=CHUNKING)
BASIS_ROWS = 4096


# --------------------------------------------------------------------------- the paced model


class PacedEmbedder:
    """A stand-in for a GPU: each call lasts ``tokens / rate`` seconds, its vectors are fake.

    Tokens are counted as :class:`~qwen3_pipeline.testing.FakeEmbedder` counts them (words
    plus one). Its vectors are unit vectors that depend on the text alone: the sum of two
    rows of a fixed random basis picked by the text's hash (``fake_vector``, a seeded
    generator per text, costs about 80 µs a row here: more than the 70 µs a short row is
    given at 350,000 tokens/s).

    Args:
        spec: The spec it reports (``output_dim`` sets the vectors' size).
        rate: Tokens per second.
    """

    def __init__(self, spec: EmbeddingSpec, rate: float = RATE) -> None:
        self._spec = spec
        self.rate = rate
        self.model_seconds = 0.0
        self.call_seconds = 0.0
        basis = np.random.default_rng(0).standard_normal((BASIS_ROWS, spec.output_dim))
        self._basis = basis.astype(np.float32)

    @property
    def spec(self) -> EmbeddingSpec:
        return self._spec

    def count_document_tokens(self, texts: Sequence[str]) -> np.ndarray:
        lengths = np.fromiter((len(t.split()) + 1 for t in texts), np.int64, len(texts))
        return np.minimum(lengths, self._spec.max_length)

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        started = time.perf_counter()
        tokens = self.count_document_tokens(texts)
        hashes = np.fromiter(
            (xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in texts), np.uint64, len(texts)
        )
        first = (hashes % BASIS_ROWS).astype(np.int64)
        second = ((hashes >> np.uint64(20)) % BASIS_ROWS).astype(np.int64)
        vectors = self._basis[first] + 0.5 * self._basis[second]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        budget = int(tokens.sum()) / self.rate
        left = budget - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
        seconds = time.perf_counter() - started
        self.model_seconds += budget
        self.call_seconds += seconds
        if on_batch is not None:
            on_batch(len(texts), int(tokens.sum()))
        real = int(tokens.sum())
        stats = EncodeStats(
            rows=len(texts), real_tokens=real, padded_tokens=real, batches=1, seconds=seconds
        )
        return EncodeResult(
            vectors=vectors,
            n_tokens=tokens,
            truncated=np.zeros(len(texts), dtype=bool),
            stats=stats,
        )

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        return self.embed_documents(queries)


def paced_factory(rate: float) -> Callable[[EmbeddingSpec], PacedEmbedder]:
    """The Ray actors' embedder factory (pickled by value with this script)."""

    def build(spec: EmbeddingSpec) -> PacedEmbedder:
        return PacedEmbedder(spec, rate)

    return build


# --------------------------------------------------------------------------- the sources


def write_rows(path: Path, rows: int, words: np.ndarray, block: int = 100_000) -> None:
    schema = pa.schema([("id", pa.int64()), ("title", pa.string()), ("body", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            rng = np.random.default_rng(start)
            n = stop - start
            title_len, body_len = rng.integers(2, 6, n), rng.integers(8, 30, n)
            picks = words[rng.integers(0, len(words), int((title_len + body_len).sum()))]
            titles, bodies, at = [], [], 0
            for t, b in zip(title_len.tolist(), body_len.tolist(), strict=True):
                titles.append(" ".join(picks[at : at + t]).capitalize())
                bodies.append(" ".join(picks[at + t : at + t + b]) + ".")
                at += t + b
            table = pa.table({"id": np.arange(start, stop), "title": titles, "body": bodies})
            writer.write_table(table.cast(schema))


def write_documents(path: Path, docs: int, doc_words: int, words: np.ndarray) -> None:
    rng = np.random.default_rng(11)
    bodies = []
    for _ in range(docs):
        paragraphs, used = [], 0
        while used < doc_words:
            sentences = []
            for _ in range(int(rng.integers(3, 8))):
                length = int(rng.integers(8, 22))
                sentence = " ".join(words[rng.integers(0, len(words), length)])
                sentences.append(sentence.capitalize() + ".")
                used += length
            paragraphs.append(" ".join(sentences))
        bodies.append("\n\n".join(paragraphs))
    pq.write_table(pa.table({"id": np.arange(docs), "body": bodies}), path)


# --------------------------------------------------------------------------- measuring


class StepClock:
    """Seconds spent in each step of the apply (prepare, write, compaction), in all."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._originals: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, step: str) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds[step] += time.perf_counter() - started

        self._originals.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self) -> "StepClock":
        for writer in (RowWriter, ChunkWriter):
            self.wrap(writer, "prepare", "prepare")
            self.wrap(writer, "embed", "embed")
            self.wrap(writer, "write", "write")
        self.wrap(VectorStore, "maybe_optimize", "compact")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)


def fill(
    label: str,
    source: Path,
    config: SourceConfig,
    embedder: Any,
    workdir: Path,
    *,
    depth: int,
    rate: float,
    workers: int,
    chunk_rows: int | None = None,
) -> dict[str, Any]:
    """One full refresh into a new table; its figures."""
    db = workdir / f"db-{label}"
    shutil.rmtree(db, ignore_errors=True)
    pipeline.PIPELINE_DEPTH = depth
    options: dict[str, Any] = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    with StepClock() as clock:
        report = refresh(
            source=ParquetSource(str(source)),
            config=config,
            embedder=embedder,
            db_uri=str(db),
            table="bench",
            progress=False,
            spill_dir=str(workdir),
            **options,
        )
    shutil.rmtree(db, ignore_errors=True)
    apply_s = report.seconds - report.plan_seconds
    model_s = report.tokens / rate
    compact_s = clock.seconds["compact"]
    return {
        "label": label,
        "workers": workers,
        "rows": report.embedded_rows,
        "tokens": report.tokens,
        "plan_s": report.plan_seconds,
        "apply_s": apply_s,
        "model_s": model_s,
        "busy": model_s / (workers * apply_s),
        "loop_busy": model_s / (workers * (apply_s - compact_s)),
        "prepare_s": clock.seconds["prepare"],
        "embed_s": clock.seconds["embed"],
        "write_s": clock.seconds["write"],
        "compact_s": compact_s,
    }


HEADER = (
    f"  {'engine':<7} {'workers':>7} {'pipelining':<10} {'apply s':>8} {'model s':>8} "
    f"{'busy':>5} {'w/o compaction':>14} {'prepare s':>9} {'embed s':>8} {'write s':>8} "
    f"{'compact s':>9}"
)


def show(r: dict[str, Any]) -> None:
    engine, mode = r["label"].split("-")[:2]
    print(
        f"  {engine:<7} {r['workers']:>7} {mode:<10} {r['apply_s']:>8.1f} {r['model_s']:>8.1f} "
        f"{r['busy']:>5.2f} {r['loop_busy']:>14.2f} {r['prepare_s']:>9.1f} {r['embed_s']:>8.1f} "
        f"{r['write_s']:>8.1f} {r['compact_s']:>9.1f}",
        flush=True,
    )


def bench_table(
    title: str,
    source: Path,
    config: SourceConfig,
    spec: EmbeddingSpec,
    args: argparse.Namespace,
    workdir: Path,
    *,
    chunk_rows: int | None = None,
) -> None:
    print(title, flush=True)
    print(HEADER, flush=True)
    local = {}
    for mode, depth in (("sequential", 0), ("pipelined", 1)):
        r = fill(f"local-{mode}", source, config, PacedEmbedder(spec, args.rate), workdir,
                 depth=depth, rate=args.rate, workers=1, chunk_rows=chunk_rows)  # fmt: skip
        local[mode] = r
        show(r)
    piped, sequential = local["pipelined"], local["sequential"]
    print(
        f"  {piped['rows']:,} rows embedded, {piped['tokens']:,} tokens; plan "
        f"{piped['plan_s']:.1f} s (not in apply s); pipelined / sequential apply time: "
        f"{piped['apply_s'] / sequential['apply_s']:.2f}x",
        flush=True,
    )
    if args.no_ray:
        return
    ray_runs = {}
    for workers in args.workers:
        embedder = ray_embedder(spec, workers, args)
        try:
            r = fill(f"ray-pipelined-{workers}", source, config, embedder, workdir, depth=1,
                     rate=args.rate, workers=workers, chunk_rows=chunk_rows)  # fmt: skip
        finally:
            embedder.close()
        ray_runs[workers] = r
        show(r)
    if 1 in ray_runs:
        one = ray_runs[1]["apply_s"]
        scaling = ", ".join(
            f"{w}: {one / (w * r['apply_s']):.2f}" for w, r in sorted(ray_runs.items()) if w > 1
        )
        print(f"  Ray scaling efficiency against 1 worker (apply time): {scaling}", flush=True)


def ray_embedder(spec: EmbeddingSpec, workers: int, args: argparse.Namespace) -> Any:
    from qwen3_pipeline.embedding.ray_pool import RayEmbedder

    embedder = RayEmbedder(
        spec,
        workers=workers,
        cpus_per_worker=0,
        embedder_factory=paced_factory(args.rate),
        token_counter=PacedEmbedder(spec, args.rate),
    )
    embedder.embed_documents(["warm up"] * workers * 4)  # start the actors before timing
    return embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--doc-words", type=int, default=2_000)
    parser.add_argument("--doc-batch", type=int, default=50, help="documents per batch")
    parser.add_argument("--rate", type=float, default=RATE, help="tokens/s of one paced model")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--skip-rows", action="store_true")
    parser.add_argument("--skip-docs", action="store_true")
    args = parser.parse_args()

    spec = EmbeddingSpec(model=MODEL, dim=DIM)
    words = np.array(vocabulary())
    print(
        f"paced model: {args.rate:,.0f} tokens/s per worker, dim {DIM}; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.no_ray:
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
        if not args.skip_rows:
            rows = workdir / "rows.parquet"
            write_rows(rows, args.rows, words)
            bench_table(f"== short rows: {args.rows:,} rows, chunk_rows 10,000 (the default)",
                        rows, ROW_CONFIG, spec, args, workdir)  # fmt: skip
        if not args.skip_docs:
            docs = workdir / "docs.parquet"
            write_documents(docs, args.docs, args.doc_words, words)
            bench_table(
                f"== long documents: {args.docs:,} documents of ~{args.doc_words:,} words, "
                f"chunks of {CHUNKING.tokens} tokens, {args.doc_batch} documents per batch",
                docs, DOC_CONFIG, spec, args, workdir, chunk_rows=args.doc_batch,
            )  # fmt: skip
        print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
