"""Refresh throughput and memory: initial, no-op and 1%-changed refreshes of an N-row source.

The source is N rows of short real-looking text (words of the standard library's docstrings,
deterministic) in a Parquet file; the vector table is a local LanceDB directory. Each phase
runs in a fresh process, so its peak RSS is its own:

1. ``initial``: the table does not exist; every row is embedded and written;
2. ``noop``: the same source again (nothing to embed or write; no commit expected);
3. ``changed``: 1% of rows edited, 0.1% deleted, 0.1% new.

For each phase it prints wall time, rows/s, the time split into read+hash+diff (everything
but the model and the writes: source read, key validation, stored-state index, rendering,
hashing, diffing), embed and write (LanceDB commits), the rows embedded and written, the
Lance versions committed and the peak RSS.

Embedding 1M rows with even the tiny Qwen3 checkpoint takes about half an hour on 2 CPU cores,
so ``--embedder auto`` (the default) measures the tiny model first and uses the fake embedder
when the projected initial refresh of the largest N exceeds ``--max-embed-s``; the tiny model
then runs the same phases on ``--tiny-rows`` rows to report real embedding throughput.

    python benchmarks/refresh_bench.py                          # 1M rows
    python benchmarks/refresh_bench.py --rows 250000,1000000    # is peak RSS flat in N?
    python benchmarks/refresh_bench.py --rows 20000 --embedder tiny

``--shard-memory`` measures instead what a single run over many hash shards costs in memory:
for each N, an initial (backfill) refresh and a no-op refresh of N rows in ``--shards`` shards
(``Shards(16)``: processed shard by shard), with the fake embedder, each in a fresh process,
printing rows, seconds and peak RSS; and, for the sizes in ``--whole-rows``, the same two runs
through the old whole-scope path (one plan over every shard, one apply) for comparison.

    python benchmarks/refresh_bench.py --shard-memory --rows 1000000,5000000 \
        --whole-rows 1000000

``--watermark`` measures watermark change capture against the full scan, side by side in one
run, for each N (each phase in a fresh process; the source's ``updated_at`` is one second
per id from a fixed start, and the 1% edited and 0.1% inserted rows are stamped a year
later):

1. ``backfill``: the first watermark refresh (everything read and embedded; its mark stored);
2. ``noop-full``: a plain refresh of the same source (every row read and hashed);
3. ``noop-wm`` / ``noop-wm-never``: watermark refreshes with ``key_scan="every"`` (the key
   column read to find deletes) and ``"never"`` (no key scan this run; what ``key_scan=N``
   does between its scans);
4. ``changed-full`` / ``changed-wm`` / ``changed-wm-never``: the 1%-changed source, each on its
   own copy of the table, with a paced stand-in for a GPU (``--paced-rate`` tokens/s, the
   fake's vectors: a call lasts ``tokens / rate`` seconds, or the fake's own time if longer).

It prints the no-op ratios (goal: the watermark no-op <= 0.3 s and <= 0.1x the full scan),
the 1%-changed refresh against its own embed + write time (goal: within 2x), the backfill's
peak RSS by N (goal: 5M within 15% of 1M), and with ``--profile`` the top of a cProfile of
the watermark no-op.

    python benchmarks/refresh_bench.py --watermark --rows 1000000,5000000 --profile 40
"""

import argparse
import cProfile
import dataclasses
import io
import json
import multiprocessing
import pstats
import queue as queue_module
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.sources import ParquetSource, Shards, SourceConfig, Watermark  # noqa: E402

TABLE = "bench_docs"
DIM = 64
CONFIG = SourceConfig(key="id", text_columns=("title", "body"), carry=("title",))
BLOCK = 100_000
# updated_at: one second per id from STAMPED (ids in order, so each row group's statistics
# cover its own span); rows the changed source edits or inserts are stamped CHANGED_AT.
STAMPED = datetime(2026, 1, 1, tzinfo=UTC)
CHANGED_AT = STAMPED + timedelta(days=400)
TIME_TYPE = pa.timestamp("us", "UTC")
SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("title", pa.string()),
        pa.field("body", pa.string()),
        pa.field("updated_at", TIME_TYPE),
    ]
)


# --------------------------------------------------------------------------- the source


def vocabulary(size: int = 20_000) -> list[str]:
    from qwen3_pipeline.demo.corpus import stdlib_docstrings

    seen: dict[str, None] = {}
    for record in stdlib_docstrings():
        for word in record.body.split():
            word = word.strip(".,;:()[]'\"`").lower()
            if word.isalpha() and 2 <= len(word) <= 14:
                seen.setdefault(word, None)
                if len(seen) >= size:
                    return list(seen)
    return list(seen)


def block_rows(start: int, stop: int, words: np.ndarray, version: int = 0) -> pa.Table:
    """Rows ``start..stop`` (ids), deterministic per id block; ``version`` marks edits."""
    rng = np.random.default_rng([start, stop])
    n = stop - start
    title_len = rng.integers(2, 6, n)
    body_len = rng.integers(6, 36, n)
    picks = words[rng.integers(0, len(words), int((title_len + body_len).sum()))]
    titles, bodies, at = [], [], 0
    for t, b in zip(title_len.tolist(), body_len.tolist(), strict=True):
        titles.append(" ".join(picks[at : at + t]).capitalize())
        bodies.append(" ".join(picks[at + t : at + t + b]) + ".")
        at += t + b
    ids = np.arange(start, stop)
    stamps = np.datetime64(STAMPED.replace(tzinfo=None), "us") + ids.astype("timedelta64[s]")
    return pa.table(
        {"id": ids, "title": titles, "body": bodies, "updated_at": pa.array(stamps, TIME_TYPE)},
        SCHEMA,
    )


def _stamp(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table`` with the ``updated_at`` of ``rows`` (a mask) moved to ``CHANGED_AT``."""
    stamps = table.column("updated_at").to_numpy().copy()
    stamps[rows] = np.datetime64(CHANGED_AT.replace(tzinfo=None), "us")
    index = table.schema.get_field_index("updated_at")
    return table.set_column(index, "updated_at", pa.array(stamps, TIME_TYPE))


def write_source(path: Path, rows: int, words: np.ndarray, *, changed: bool) -> dict[str, int]:
    """Write the source; ``changed``: 1% edited, 0.1% deleted, 0.1% inserted."""
    counts = {"edited": 0, "deleted": 0, "inserted": 0}
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for start in range(0, rows, BLOCK):
            table = block_rows(start, min(start + BLOCK, rows), words)
            if changed:
                ids = table.column("id").to_numpy()
                edited = ids % 100 == 7
                bodies = np.array(table.column("body").to_pylist(), dtype=object)
                bodies[edited] = bodies[edited] + " Edited."
                table = table.set_column(2, "body", pa.array(bodies.tolist(), pa.string()))
                table = _stamp(table, edited)
                keep = ids % 1000 != 13
                table = table.filter(pa.array(keep))
                counts["edited"] += int((edited & keep).sum())
                counts["deleted"] += int((~keep).sum())
            writer.write_table(table, row_group_size=BLOCK)
        if changed:
            extra = max(rows // 1000, 1)
            new = block_rows(rows, rows + extra, words)
            writer.write_table(_stamp(new, np.ones(extra, bool)), row_group_size=BLOCK)
            counts["inserted"] = extra
    return counts


# --------------------------------------------------------------------------- one phase


def run_phase(job: dict[str, Any], queue: Any) -> None:
    """Child process: one instrumented refresh; puts its measurements on ``queue``."""
    imports_started = time.perf_counter()
    import duckdb  # noqa: F401  (imported before timing, as in a warm run process)
    import lancedb  # noqa: F401

    import qwen3_pipeline.engine.refresh as engine
    import qwen3_pipeline.testing  # noqa: F401  (the fake, imported before timing)
    from qwen3_pipeline.store import VectorStore

    if job["embedder"] == "tiny":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    import_s = time.perf_counter() - imports_started
    baseline_rss = _peak_rss_mb()
    timers: dict[str, float] = {"embed": 0.0, "write": 0.0, "validate": 0.0, "state": 0.0}
    written = {"rows": 0, "commits": 0}

    def timed(bucket: str, fn: Any, count_rows: bool = False) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                timers[bucket] += time.perf_counter() - started
            if count_rows and result is not None:
                written["commits"] += 1
                written["rows"] += result.inserted + result.updated + result.deleted
            return result

        return wrapper

    VectorStore.upsert = timed("write", VectorStore.upsert, True)  # type: ignore[method-assign]
    VectorStore.update_columns = timed("write", VectorStore.update_columns, True)  # type: ignore[method-assign]
    VectorStore.delete_keys = timed("write", VectorStore.delete_keys, True)  # type: ignore[method-assign]
    VectorStore.maybe_optimize = timed("write", VectorStore.maybe_optimize)  # type: ignore[method-assign]
    VectorStore.existing_state = timed("state", VectorStore.existing_state)  # type: ignore[method-assign]
    import qwen3_pipeline.engine.plan as plan_pass

    plan_pass.validate_keys = timed("validate", plan_pass.validate_keys)  # type: ignore[attr-defined]

    spec = EmbeddingSpec(model=job["model"], dim=DIM)
    config = CONFIG
    if job.get("shards"):
        config = dataclasses.replace(CONFIG, partition=Shards(job["shards"]))
    if job.get("updated_at"):
        # A plain refresh keeps updated_at too: without it, source_updated_at would differ
        # from what the watermark refreshes store (a column update of every row).
        config = dataclasses.replace(CONFIG, updated_at="updated_at")
    if job.get("key_scan"):
        config = dataclasses.replace(config, watermark=Watermark(key_scan=job["key_scan"]))
    if job["embedder"] == "tiny":
        from qwen3_pipeline.embedding.encoder import Qwen3Encoder

        embedder: Any = Qwen3Encoder(spec, device="cpu", progress=False)
    else:
        embedder = bench_fake(spec, job.get("paced_rate", 0))
    embedder.embed_documents = timed("embed", embedder.embed_documents)

    def run() -> Any:
        if job.get("path") == "whole":
            return whole_scope_refresh(job, config, embedder)
        return engine.refresh(
            source=ParquetSource(job["source"]),
            config=config,
            embedder=embedder,
            db_uri=job["db"],
            table=TABLE,
            chunk_rows=job["chunk_rows"],
            progress=False,
        )

    profile = cProfile.Profile() if job.get("profile") else None
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    report = run()
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - started
    queue.put(
        {
            "wall_s": wall,
            "import_s": import_s,
            "embed_s": timers["embed"],
            "write_s": timers["write"],
            "validate_s": timers["validate"],
            "state_s": timers["state"],
            "read_hash_diff_s": wall - timers["embed"] - timers["write"],
            "rows_written": written["rows"],
            "write_calls": written["commits"],
            "versions": report.version_after - report.version_before,
            "peak_rss_mb": _peak_rss_mb(),
            "baseline_rss_mb": baseline_rss,
            "report": report.as_dict(),
            "profile": None if profile is None else _profile_top(profile, job["profile"]),
        }
    )


def bench_fake(spec: EmbeddingSpec, rate: float = 0) -> Any:
    """The fake model, keeping nothing, paced like a GPU when ``rate`` (tokens/s) is set.

    :class:`~qwen3_pipeline.testing.FakeEmbedder` keeps every text it was sent (for tests'
    assertions): about 250 MB per million short rows, which a peak RSS must not count. Paced,
    a call lasts ``tokens / rate`` seconds at least (the fake's own time counts toward it);
    its vectors stay the fake's, so the table's canaries agree with a backfill by the plain
    fake.
    """
    from qwen3_pipeline.testing import FakeEmbedder

    class BenchFake(FakeEmbedder):
        def embed_documents(self, texts: Any, *, on_batch: Any = None) -> Any:
            started = time.perf_counter()
            result = super().embed_documents(texts, on_batch=on_batch)
            self.seen.clear()
            self.calls.clear()
            left = result.stats.real_tokens / rate - (time.perf_counter() - started) if rate else 0
            if left > 0:
                time.sleep(left)
            return result

    return BenchFake(spec)


def _profile_top(profile: cProfile.Profile, lines: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def whole_scope_refresh(job: dict[str, Any], config: SourceConfig, embedder: Any) -> Any:
    """The whole scope in one plan and one apply: what a refresh over all shards did before it
    went shard by shard (and still does for a table labelled with another shard count)."""
    import qwen3_pipeline.engine.refresh as engine
    from qwen3_pipeline.engine.apply import apply_plan

    source = ParquetSource(job["source"])
    version = engine.live_version(job["db"], TABLE, None)
    plan = engine.plan_refresh(source=source, config=config, embedder=embedder,
                               db_uri=job["db"], table=TABLE, chunk_rows=job["chunk_rows"],
                               progress=False)  # fmt: skip
    engine.check_mass_delete(plan)
    request = engine.RefreshRequest(
        source=source, config=config, embedder=embedder, db_uri=job["db"], table=TABLE,
        options=engine.RefreshOptions(chunk_rows=job["chunk_rows"], progress=False),
    )  # fmt: skip
    return apply_plan(plan, request, version_before=version)


def _peak_rss_mb() -> float:
    # VmHWM is this process's own high-water mark; ru_maxrss would carry over the parent's
    # across fork+exec (Linux keeps it in the signal struct).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(job: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=run_phase, args=(job, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise SystemExit(f"phase died with exit code {process.exitcode}") from None
    process.join()
    if process.exitcode:
        raise SystemExit(f"phase failed with exit code {process.exitcode}")
    return result


# --------------------------------------------------------------------------- driver


def tiny_checkpoint(workdir: Path) -> Path:
    from tests.fixtures.tiny_qwen3 import build_tiny_qwen3_checkpoint

    return build_tiny_qwen3_checkpoint(workdir / "tiny_qwen3")


def tiny_rows_per_second(model_dir: Path, words: np.ndarray, sample: int = 4000) -> float:
    """Tiny-model embedding throughput on bench texts (after a warm-up of 1000 texts)."""
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    spec = EmbeddingSpec(model=str(model_dir), dim=DIM)
    encoder = Qwen3Encoder(spec, device="cpu", progress=False)
    table = block_rows(10**9, 10**9 + sample + 1000, words)
    titles, bodies = table["title"].to_pylist(), table["body"].to_pylist()
    texts = [f"{t}\n\n{b}" for t, b in zip(titles, bodies, strict=True)]
    encoder.embed_documents(texts[sample:])
    started = time.perf_counter()
    encoder.embed_documents(texts[:sample])
    return sample / (time.perf_counter() - started)


def bench_size(rows: int, args: argparse.Namespace, words: np.ndarray, embedder: str,
               model: str, workdir: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    folder = workdir / f"{embedder}-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    base, changed = folder / "source.parquet", folder / "source_changed.parquet"
    started = time.perf_counter()
    write_source(base, rows, words, changed=False)
    truth = write_source(changed, rows, words, changed=True)
    print(f"\n[{embedder}] N={rows:,}: sources written in {time.perf_counter() - started:.1f}s "
          f"(changed: {truth})", flush=True)  # fmt: skip
    db = str(folder / "lancedb")
    job = {"db": db, "model": model, "embedder": embedder, "chunk_rows": args.chunk_rows}
    results = {}
    for name, source in (("initial", base), ("noop", base), ("changed", changed)):
        results[name] = phase(dict(job, source=str(source)))
        _print_phase(name, results[name])
    results["truth"] = truth
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return results


HEADER = (
    f"  {'phase':<8} {'wall s':>7} {'rows/s':>9} {'rd+hash+diff':>12} {'(validate':>9} "
    f"{'state)':>7} {'embed s':>8} {'write s':>8} {'embedded':>9} {'written':>8} "
    f"{'commits':>7} {'peak RSS':>9} {'(base)':>7}"
)


def _print_phase(name: str, r: dict[str, Any]) -> None:
    rep = r["report"]
    if name == "initial":
        print(HEADER)
    print(
        f"  {name:<8} {r['wall_s']:>7.1f} {rep['scanned'] / r['wall_s']:>9,.0f} "
        f"{r['read_hash_diff_s']:>12.1f} {r['validate_s']:>9.1f} {r['state_s']:>7.1f} "
        f"{r['embed_s']:>8.1f} {r['write_s']:>8.1f} {rep['embedded_rows']:>9,} "
        f"{r['rows_written']:>8,} {r['versions']:>7} {r['peak_rss_mb']:>7.0f}MB "
        f"{r['baseline_rss_mb']:>5.0f}MB",
        flush=True,
    )


def verdicts(rows: int, results: dict[str, dict[str, Any]]) -> list[str]:
    initial, noop, changed, truth = (results[k] for k in ("initial", "noop", "changed", "truth"))
    verdict = {True: "PASS", False: "MISS"}
    lines = []
    ok = noop["wall_s"] <= 15 and noop["versions"] == 0
    lines.append(
        f"no-op refresh of {rows:,} rows: {noop['wall_s']:.1f}s, {noop['versions']} commits "
        f"(target <= 15 s, 0 commits): {verdict[ok]}"
    )
    want_written = truth["edited"] + truth["deleted"] + truth["inserted"]
    embedded = changed["report"]["embedded_rows"]
    only_changed = changed["rows_written"] == want_written and embedded == (
        truth["edited"] + truth["inserted"]
    )
    lines.append(
        f"1%-changed refresh: wrote {changed['rows_written']:,} rows (changed: "
        f"{want_written:,}), embedded {embedded:,} in {changed['versions']} commits: "
        f"{verdict[only_changed]}"
    )
    non_embed = changed["wall_s"] - changed["embed_s"]
    ratio = non_embed / noop["wall_s"]
    lines.append(
        f"1%-changed refresh: non-embedding time {non_embed:.1f}s = {ratio:.2f}x the no-op "
        f"(target <= 1.5x): {verdict[ratio <= 1.5]}"
    )
    peak = max(r["peak_rss_mb"] for r in (initial, noop, changed))
    lines.append(
        f"peak RSS over the phases: {peak:.0f} MB (target <= 2048 MB for a 1M-row full "
        f"refresh): {verdict[peak <= 2048]}"
    )
    return lines


# --------------------------------------------------------------------------- shard memory


SHARD_MEMORY_MODEL = "Qwen/Qwen3-Embedding-0.6B"  # only its spec: the fake embedder embeds


def shard_memory(sizes: list[int], args: argparse.Namespace, words: np.ndarray,
                 workdir: Path) -> list[str]:  # fmt: skip
    """Peak RSS of single-run refreshes over ``args.shards`` shards, by source size."""
    whole_sizes = {int(n) for n in args.whole_rows.split(",") if n}
    print(
        f"single-run refresh of N rows in {args.shards} shards, FakeEmbedder (dim {DIM}); "
        "each run in a fresh process"
    )
    print(
        f"  {'path':<12} {'phase':<8} {'rows':>10} {'seconds':>8} {'rows/s':>8} "
        f"{'embedded':>9} {'commits':>7} {'peak RSS':>10} {'(base)':>8}",
        flush=True,
    )
    peaks: dict[str, list[str]] = {}
    by_shard: dict[int, list[float]] = {}
    for rows in sizes:
        folder = workdir / f"shards-{rows}"
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "source.parquet"
        write_source(source, rows, words, changed=False)
        paths = ["by-shard", *(["whole-scope"] if rows in whole_sizes else [])]
        for path in paths:
            db = folder / f"lancedb-{path}"
            job = {
                "db": str(db),
                "model": SHARD_MEMORY_MODEL,
                "embedder": "fake",
                "chunk_rows": args.chunk_rows,
                "shards": args.shards,
                "path": "whole" if path == "whole-scope" else "shards",
                "source": str(source),
            }
            for name in ("initial", "noop"):
                r = phase(job)
                rep = r["report"]
                print(
                    f"  {path:<12} {name:<8} {rep['scanned']:>10,} {r['wall_s']:>8.1f} "
                    f"{rep['scanned'] / r['wall_s']:>8,.0f} {rep['embedded_rows']:>9,} "
                    f"{r['versions']:>7} {r['peak_rss_mb']:>6.0f} MiB {r['baseline_rss_mb']:>4.0f}"
                    " MiB",
                    flush=True,
                )
                peaks.setdefault(f"{path} {name}", []).append(
                    f"{rows:,} rows: {r['peak_rss_mb']:.0f} MiB"
                )
                if path == "by-shard":
                    by_shard.setdefault(rows, []).append(r["peak_rss_mb"])
            shutil.rmtree(db, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    lines = [f"{key} peak RSS by source size: {', '.join(v)}" for key, v in peaks.items()]
    largest = max(sizes)
    worst = max(by_shard[largest])
    verdict = "PASS" if worst <= 1536 else "MISS"
    lines.append(
        f"by-shard peak RSS at {largest:,} rows: {worst:.0f} MiB (target <= 1536 MiB): {verdict}"
    )
    if len(sizes) > 1:
        smallest = min(sizes)
        growth = worst / max(by_shard[smallest])
        lines.append(
            f"by-shard peak RSS {smallest:,} -> {largest:,} rows: x{growth:.2f} "
            f"(source x{largest / smallest:.0f})"
        )
    return lines


# --------------------------------------------------------------------------- watermark


WATERMARK_MODEL = "Qwen/Qwen3-Embedding-0.6B"  # only its spec: the fake embedder embeds
# (name, source, key scan (None: a plain refresh), paced model, table: "main" or a copy)
WATERMARK_PHASES = (
    ("backfill", "base", "every", False, "main"),
    ("noop-full", "base", None, False, "main"),
    ("noop-wm", "base", "every", False, "main"),
    ("noop-wm-never", "base", "never", False, "main"),
    ("changed-full", "changed", None, True, "copy-full"),
    ("changed-wm", "changed", "every", True, "copy-wm"),
    ("changed-wm-never", "changed", "never", True, "main"),
)
WATERMARK_HEADER = (
    f"  {'phase':<16} {'wall s':>7} {'read rows':>10} {'keys scanned':>12} {'embedded':>9} "
    f"{'deleted':>8} {'embed s':>8} {'write s':>8} {'other s':>8} {'commits':>7} "
    f"{'peak RSS':>10}"
)


def watermark_bench(sizes: list[int], args: argparse.Namespace, words: np.ndarray,
                    workdir: Path) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    """Watermark refreshes against full scans, by source size (see the module docstring)."""
    print(
        f"watermark vs full scan, FakeEmbedder (dim {DIM}); the changed phases pace it at "
        f"{args.paced_rate:,.0f} tokens/s; each phase in a fresh process",
        flush=True,
    )
    results: dict[int, dict[str, Any]] = {}
    lines: list[str] = []
    for rows in sizes:
        folder = workdir / f"watermark-{rows}"
        folder.mkdir(parents=True, exist_ok=True)
        sources = {"base": folder / "source.parquet", "changed": folder / "changed.parquet"}
        started = time.perf_counter()
        write_source(sources["base"], rows, words, changed=False)
        truth = write_source(sources["changed"], rows, words, changed=True)
        print(f"\nN={rows:,}: sources written in {time.perf_counter() - started:.1f}s "
              f"(changed: {truth})", flush=True)  # fmt: skip
        print(WATERMARK_HEADER, flush=True)
        main_db = folder / "lancedb"
        runs: dict[str, Any] = {"truth": truth}
        for name, source, key_scan, paced, table in WATERMARK_PHASES:
            if args.watermark_phases and name not in args.watermark_phases.split(","):
                continue
            db = main_db if table == "main" else folder / f"lancedb-{table}"
            if table != "main" and not db.exists():
                shutil.copytree(main_db, db)  # the state after the no-ops, for this phase
            job = {
                "db": str(db),
                "model": WATERMARK_MODEL,
                "embedder": "fake",
                "chunk_rows": args.chunk_rows,
                "source": str(sources[source]),
                "updated_at": True,
                "key_scan": key_scan,
                "paced_rate": args.paced_rate if paced else 0,
                "profile": args.profile if args.profile and name == args.profile_phase else 0,
            }
            r = runs[name] = phase(job)
            rep = r["report"]
            other = r["wall_s"] - r["embed_s"] - r["write_s"]
            print(
                f"  {name:<16} {r['wall_s']:>7.2f} {rep['read_rows']:>10,} "
                f"{rep.get('keys_scanned', 0):>12,} {rep['embedded_rows']:>9,} "
                f"{rep['deleted']:>8,} {r['embed_s']:>8.2f} {r['write_s']:>8.2f} {other:>8.2f} "
                f"{r['versions']:>7} {r['peak_rss_mb']:>6.0f} MiB",
                flush=True,
            )
        for copy in ("copy-full", "copy-wm"):
            shutil.rmtree(folder / f"lancedb-{copy}", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        results[rows] = runs
        lines += [f"[N={rows:,}] {line}" for line in watermark_verdicts(runs)]
    profiled = results[sizes[0]].get(args.profile_phase)
    if profiled and profiled["profile"]:
        print(f"\ncProfile of the {args.profile_phase} phase, N={sizes[0]:,}")
        print(profiled["profile"])
    backfills = {n: r["backfill"]["peak_rss_mb"] for n, r in results.items() if "backfill" in r}
    if len(backfills) > 1:
        small, large = min(backfills), max(backfills)
        growth = backfills[large] / backfills[small]
        verdict = "PASS" if growth <= 1.15 else "MISS"
        lines.append(
            f"backfill peak RSS {small:,} -> {large:,} rows: {backfills[small]:.0f} -> "
            f"{backfills[large]:.0f} MiB, x{growth:.2f} (goal <= x1.15): {verdict}"
        )
    return lines, {str(n): r for n, r in results.items()}


def watermark_verdicts(runs: dict[str, Any]) -> list[str]:
    """The goals of issue 18 for one size, from its phases (those that ran)."""
    verdict = {True: "PASS", False: "MISS"}
    lines = []
    full = runs.get("noop-full")
    for name in ("noop-wm", "noop-wm-never"):
        if name not in runs or full is None:
            continue
        r = runs[name]
        ratio = r["wall_s"] / full["wall_s"]
        ok = r["wall_s"] <= 0.3 and ratio <= 0.1 and r["versions"] == 0
        lines.append(
            f"{name} no-op: {r['wall_s']:.2f}s = {ratio:.3f}x the full-scan no-op "
            f"({full['wall_s']:.2f}s), read {r['report']['read_rows']} rows, "
            f"{r['versions']} commits (goal <= 0.3 s, <= 0.1x, 0 commits): {verdict[ok]}"
        )
    truth = runs["truth"]
    for name in ("changed-full", "changed-wm", "changed-wm-never"):
        if name not in runs:
            continue
        r = runs[name]
        rep = r["report"]
        work = r["embed_s"] + r["write_s"]
        ratio = r["wall_s"] / work if work else float("inf")
        # Without a key scan, the deleted keys wait for the next scan (documented).
        deletes = 0 if name == "changed-wm-never" else truth["deleted"]
        embeds = truth["edited"] + truth["inserted"]
        exact = rep["embedded_rows"] == embeds and rep["deleted"] == deletes
        line = (
            f"{name}: {r['wall_s']:.2f}s = {ratio:.2f}x its embed + write "
            f"({r['embed_s']:.2f} + {r['write_s']:.2f}s); embedded {rep['embedded_rows']:,}, "
            f"deleted {rep['deleted']:,}: counts {'exact' if exact else 'WRONG'}"
        )
        if name == "changed-wm":
            line += f" (goal <= 2x): {verdict[ratio <= 2 and exact]}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000", help="comma-separated source sizes")
    parser.add_argument(
        "--embedder",
        choices=("auto", "fake", "tiny"),
        default="auto",
        help="auto: tiny when the projected tiny-model initial refresh of the largest size "
        "takes at most --max-embed-s, else fake",
    )
    parser.add_argument("--max-embed-s", type=float, default=600.0)
    parser.add_argument(
        "--tiny-rows",
        type=int,
        default=20_000,
        help="rows of an extra tiny-model run when the fake embedder is used (0: skip)",
    )
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep sources and tables")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--shard-memory",
        action="store_true",
        help="measure peak RSS of single-run refreshes over --shards shards instead",
    )
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument(
        "--whole-rows",
        default="1000000",
        help="sizes (comma-separated) also run through the whole-scope path (--shard-memory)",
    )
    parser.add_argument(
        "--watermark",
        action="store_true",
        help="measure watermark refreshes against full scans instead (fake model)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=350_000.0,
        help="tokens/s of the paced stand-in for a GPU in the changed phases (--watermark; "
        "0: the plain fake)",
    )
    parser.add_argument(
        "--watermark-phases",
        default="",
        help="only these phases (comma-separated; --watermark; the no-ops need the backfill)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print the top N lines of a cProfile of one phase of --watermark",
    )
    parser.add_argument(
        "--profile-phase",
        default="noop-wm",
        choices=[phase[0] for phase in WATERMARK_PHASES],
        help="the phase --profile profiles (default: the watermark no-op)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.rows.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refresh_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; chunk_rows {args.chunk_rows}; {multiprocessing.cpu_count()} CPUs")
    words = np.array(vocabulary())
    if args.watermark:
        lines, measured = watermark_bench(sizes, args, words, workdir)
        print("\nsummary")
        for line in lines:
            print("  " + line)
        if args.json:
            args.json.write_text(json.dumps(measured, indent=2, default=str))
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    if args.shard_memory:
        lines = shard_memory(sizes, args, words, workdir)
        print("\nsummary")
        for line in lines:
            print("  " + line)
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    model_dir = tiny_checkpoint(workdir)
    embedder = args.embedder
    tiny_rate = None
    if embedder == "auto" or (embedder == "fake" and args.tiny_rows):
        tiny_rate = tiny_rows_per_second(model_dir, words)
        projected = max(sizes) / tiny_rate
        print(
            f"tiny Qwen3 (hidden 64, dim {DIM}) on CPU: {tiny_rate:,.0f} rows/s, so an initial "
            f"refresh of {max(sizes):,} rows would embed for ~{projected / 60:.0f} min"
        )
        if embedder == "auto":
            embedder = "tiny" if projected <= args.max_embed_s else "fake"
    described = {"fake": "FakeEmbedder: deterministic vectors, no model", "tiny": "tiny Qwen3"}
    print(f"embedder: {embedder} ({described[embedder]})")
    model = str(model_dir)
    all_results: dict[str, Any] = {"embedder": embedder, "tiny_rows_per_s": tiny_rate}
    summary: list[str] = []
    for rows in sizes:
        results = bench_size(rows, args, words, embedder, model, workdir)
        all_results[f"{embedder}-{rows}"] = results
        summary += [f"[{embedder} N={rows:,}] {line}" for line in verdicts(rows, results)]
    if len(sizes) > 1:
        runs = {n: all_results[f"{embedder}-{n}"] for n in sizes}
        for name in ("initial", "noop", "changed"):
            peaks = ", ".join(f"{n:,} rows: {runs[n][name]['peak_rss_mb']:.0f} MB" for n in sizes)
            summary.append(f"{name} peak RSS by source size: {peaks}")
    if embedder == "fake" and args.tiny_rows:
        results = bench_size(args.tiny_rows, args, words, "tiny", model, workdir)
        all_results[f"tiny-{args.tiny_rows}"] = results
        initial = results["initial"]
        rate = initial["report"]["embedded_rows"] / initial["embed_s"]
        summary.append(
            f"[tiny N={args.tiny_rows:,}] initial refresh embeds {rate:,.0f} rows/s "
            f"({initial['report']['tokens_per_second']:,.0f} tokens/s); 1M rows would take "
            f"~{1e6 / rate / 60:.0f} min of embedding"
        )
        summary += [
            f"[tiny N={args.tiny_rows:,}] {line}" for line in verdicts(args.tiny_rows, results)
        ]
    print("\nsummary")
    for line in summary:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2, default=str))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
