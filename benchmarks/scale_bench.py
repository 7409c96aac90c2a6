"""Scaling out: the same corpus through the local engine and through Ray with 1..N workers.

Every engine embeds the same texts with the same random-weight checkpoint (built locally: no
hub is reachable), one after another in one run. Each Ray worker (actor) and the local engine
get the same compute: ``--cpus-per-worker`` torch threads on CPU, or ``--gpus-per-worker`` GPUs.
The table shows real tokens/s (padding excluded), the **scaling efficiency** (throughput with N
workers / (N x throughput with 1 worker)) and the **Ray overhead** (1 Ray worker / local).
Model loading and Ray start-up are excluded (measured separately: one warm-up call first).

    python benchmarks/scale_bench.py                                 # CPU, 1 and 2 workers
    python benchmarks/scale_bench.py --device cuda --model-size 0.6b --workers 1 2 4 8 \\
        --gpus-per-worker 1 --corpus-size 20000
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.demo.corpus import stdlib_docstrings  # noqa: E402
from qwen3_pipeline.demo.model import SHAPES, build_tiny_qwen3_checkpoint  # noqa: E402
from qwen3_pipeline.embedding.encoder import Qwen3Encoder  # noqa: E402
from qwen3_pipeline.embedding.ray_pool import EncoderOptions, RayEmbedder  # noqa: E402


def _local(spec: EmbeddingSpec, texts: list[str], args: argparse.Namespace) -> tuple[float, int]:
    import torch

    if args.device == "cpu":
        # The same compute as one Ray CPU actor (Ray sets its thread count to its CPUs).
        torch.set_num_threads(args.cpus_per_worker)
    encoder = Qwen3Encoder(spec, device=args.device, progress=False)
    encoder.embed_documents(texts[:16])  # warm-up (kernels, allocator)
    started = time.perf_counter()
    result = encoder.embed_documents(texts)
    seconds = time.perf_counter() - started
    encoder.close()
    return seconds, int(result.stats.real_tokens)


def _ray(
    spec: EmbeddingSpec, texts: list[str], workers: int, args: argparse.Namespace
) -> tuple[float, int, float]:
    started = time.perf_counter()
    with RayEmbedder(
        spec,
        workers=workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.ray_address,
        options=EncoderOptions(device=args.device),
        block_tokens=args.block_tokens,
    ) as embedder:
        embedder.embed_documents(texts[: 16 * workers])  # start the actors, load the models
        startup = time.perf_counter() - started
        started = time.perf_counter()
        result = embedder.embed_documents(texts)
        seconds = time.perf_counter() - started
        assert not result.failures, result.failures
    return seconds, int(result.stats.real_tokens), startup


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus-size", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--block-tokens", type=int, default=65_536)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args()

    import ray

    texts = [f"{d.title}\n\n{d.body}" for d in stdlib_docstrings(args.corpus_size)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_tiny_qwen3_checkpoint(model, **SHAPES[args.model_size])
        spec = EmbeddingSpec(model=str(model))
        if args.ray_address is None:
            ray.init(
                num_cpus=max(args.workers) * args.cpus_per_worker,
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=args.ray_address, log_to_driver=False)
        print(
            f"{len(texts)} docs, model {args.model_size}, device {args.device}, "
            f"{args.cpus_per_worker} CPU / {args.gpus_per_worker} GPU per worker, "
            f"{os.cpu_count()} cores here"
        )
        local_s, tokens = _local(spec, texts, args)
        local_tps = tokens / local_s
        print(f"{'engine':<8} {'workers':>7} {'seconds':>8} {'tokens/s':>10} {'efficiency':>10}")
        print(f"{'local':<8} {1:>7} {local_s:>8.2f} {local_tps:>10.0f} {'':>10}")
        measured = {}
        for workers in args.workers:
            seconds, ray_tokens, startup = _ray(spec, texts, workers, args)
            assert ray_tokens == tokens
            measured[workers] = (seconds, startup)
        one_worker = measured.get(1)
        one_worker_tps = tokens / one_worker[0] if one_worker else None
        for workers, (seconds, startup) in sorted(measured.items()):
            tps = tokens / seconds
            efficiency = tps / (workers * one_worker_tps) if one_worker_tps else float("nan")
            print(
                f"{'ray':<8} {workers:>7} {seconds:>8.2f} {tps:>10.0f} {efficiency:>10.2f}"
                f"   (actors started and models loaded in {startup:.1f}s)"
            )
        if one_worker_tps:
            print(f"Ray overhead (1 worker / local): {local_tps / one_worker_tps - 1:+.1%} time")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
        ray.shutdown()


if __name__ == "__main__":
    main()
