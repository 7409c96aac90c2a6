"""Reranker throughput: Qwen3Reranker vs the model card's naive loop vs sentence-transformers.

One query and a candidate set with skewed lengths (standard-library docstrings: many short,
a long tail), scored by each method in one process, on the same checkpoint: by default a
random-weight Qwen3-Reranker of a chosen shape built locally (the real tokenizer; no hub is
reachable), or ``--model`` for a real one. The table shows wall-clock and CPU seconds (the
fastest of ``--repeat`` rounds, the batched methods taking turns; the process's CPU time is
the steadier figure on a shared machine), pairs/s, padding efficiency (real tokens / computed
positions) and our speed-up over each; every method's scores are compared with the model
card's code run one pair at a time (max abs difference).

- ``qwen3_pipeline``: :class:`~qwen3_pipeline.embedding.reranker.Qwen3Reranker` (token-budget,
  length-sorted batches; two logits of the head computed);
- ``card, naive loop``: the card's ``process_inputs`` + ``compute_logits``, one pair per
  forward pass (no padding; timed once, it is the slow one). The card's code computes logits
  over the whole 151,669-token vocabulary at every position, so batching it as written is not
  an option on a skewed set: 32 pairs of 1024 tokens would materialise 20 GB of float32 logits;
- ``sentence-transformers``: ``CrossEncoder`` on the checkpoint (it loads a ``*ForCausalLM``
  reranker as ``yes - no`` logits, then a sigmoid: P(yes)). It renders each (query, document)
  pair through the tokenizer's chat template; the raw checkpoint has none that knows the
  ``query``/``document`` roles, so the card's prompt is given as one (as the reranker
  repositories prepared for sentence-transformers ship it). Its padding is computed from its
  batching (character-length sort, batches of 32).

    python benchmarks/rerank_bench.py                               # "demo" shape, 200 candidates
    python benchmarks/rerank_bench.py --shape tiny --candidates 100
    python benchmarks/rerank_bench.py --model Qwen/Qwen3-Reranker-0.6B --device cuda
"""

import argparse
import gc
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.demo.corpus import stdlib_docstrings  # noqa: E402
from qwen3_pipeline.demo.model import SHAPES  # noqa: E402
from qwen3_pipeline.embedding.reranker import (  # noqa: E402
    DEFAULT_INSTRUCTION,
    SYSTEM_PROMPT,
    Qwen3Reranker,
)
from tests.reranker_reference import CardReference, build_tiny_reranker_checkpoint  # noqa: E402

QUERY = "How do I parse a JSON document into Python objects?"
PEER_BATCH = 32
NAIVE = "card, naive loop"
# The card's process_inputs passes max_length to tokenizer.pad, which warns that it ignores it.
warnings.filterwarnings("ignore", message="`max_length` is ignored", category=UserWarning)
# The card's prompt as a chat template with the query/document roles sentence-transformers maps
# a pair to. Jinja drops one trailing newline, hence three after </think> for the card's two.
CARD_CHAT_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    f"<Instruct>: {DEFAULT_INSTRUCTION}\n"
    '<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") '
    "| first }}\n"
    '<Document>: {{ messages | selectattr("role", "eq", "document") '
    '| map(attribute="content") | first }}'
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n\n"
)

Scorer = Callable[[], list[float]]  # scores all candidates once


@dataclass
class Timing:
    """The fastest wall-clock and CPU seconds seen for one method, and its last scores."""

    wall: float = float("inf")
    cpu: float = float("inf")
    efficiency: float = 1.0
    scores: list[float] = field(default_factory=list)

    def record(self, call: Scorer, device: str) -> None:
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.scores = call()
        _sync(device)
        self.wall = min(self.wall, time.perf_counter() - wall)
        self.cpu = min(self.cpu, time.process_time() - cpu)


def padded_positions(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(b) * lengths[b].max() for b in batches))


def prepare_ours(args: argparse.Namespace, documents: list[str]) -> tuple[Scorer, Timing]:
    reranker = Qwen3Reranker(
        args.model_path,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
    )
    reranker.score(QUERY, documents[:8])  # warm-up
    reranker.score(QUERY, documents)
    assert reranker.last_stats is not None
    return lambda: reranker.score(QUERY, documents), Timing(
        efficiency=reranker.last_stats.padding_efficiency
    )


def prepare_cross_encoder(
    args: argparse.Namespace, documents: list[str], lengths: np.ndarray
) -> tuple[Scorer, Timing]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(
        args.model_path,
        device=args.device,
        max_length=args.max_length,
        model_kwargs={"dtype": getattr(torch, args.dtype)},
        processor_kwargs={"chat_template": CARD_CHAT_TEMPLATE},
    )
    pairs = [(QUERY, doc) for doc in documents]
    model.predict(pairs[:8], batch_size=PEER_BATCH)  # warm-up
    # CrossEncoder.predict sorts pairs by character length, longest first, then cuts batches.
    order = np.argsort([-(len(QUERY) + len(doc)) for doc in documents])
    batches = [order[i : i + PEER_BATCH] for i in range(0, len(order), PEER_BATCH)]
    efficiency = float(lengths.sum() / padded_positions(lengths, batches))

    def call() -> list[float]:
        scores = model.predict(pairs, batch_size=PEER_BATCH, convert_to_numpy=True)
        return [float(s) for s in scores]

    return call, Timing(efficiency=efficiency)


def prepare_naive_loop(args: argparse.Namespace, documents: list[str]) -> tuple[Scorer, Timing]:
    card = CardReference(args.model_path, max_length=args.max_length)
    card.model.to(device=args.device, dtype=getattr(torch, args.dtype))
    pairs = [card.format_instruction(None, QUERY, doc) for doc in documents]
    card.compute_logits(card.process_inputs(pairs[:1]))  # warm-up

    def call() -> list[float]:
        return [card.compute_logits(card.process_inputs([pair]))[0] for pair in pairs]

    return call, Timing(efficiency=1.0)  # one pair per pass: nothing padded


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(args: argparse.Namespace) -> None:
    records = stdlib_docstrings(args.candidates, seed=1)
    documents = [f"{d.title}\n\n{d.body}" for d in records]
    counter = Qwen3Reranker(args.model_path, device="cpu", max_length=args.max_length)
    ids, truncated = counter.tokenize(QUERY, documents)
    lengths = np.array([len(i) for i in ids])
    counter.close()
    print(
        f"candidates: {len(documents)} pairs, {int(lengths.sum())} tokens (template included), "
        f"tokens/pair p50={np.median(lengths):.0f} p90={np.percentile(lengths, 90):.0f} "
        f"max={lengths.max()}, truncated at max_length={args.max_length}: {int(truncated.sum())}"
    )
    preparers: dict[str, Callable[[], tuple[Scorer, Timing]]] = {
        "qwen3_pipeline": lambda: prepare_ours(args, documents),
        "sentence-transformers": lambda: prepare_cross_encoder(args, documents, lengths),
        NAIVE: lambda: prepare_naive_loop(args, documents),
    }
    prepared: dict[str, tuple[Scorer, Timing]] = {}
    for name, prepare in preparers.items():
        try:
            prepared[name] = prepare()
        except Exception as e:  # a peer that cannot load the checkpoint is reported, not fatal
            print(f"{name:<24}could not run: {type(e).__name__}: {e}")
    # The batched methods take turns, --repeat rounds, so a busy spell of a shared machine
    # slows them alike; the naive loop (minutes) runs once, last.
    for _ in range(args.repeat):
        for name, (call, timing) in prepared.items():
            if name != NAIVE:
                gc.collect()
                timing.record(call, args.device)
    if NAIVE in prepared:
        call, timing = prepared[NAIVE]
        timing.record(call, args.device)
    report({name: timing for name, (_, timing) in prepared.items()}, len(documents))


def report(timings: dict[str, Timing], pairs: int) -> None:
    reference = np.array(timings[NAIVE].scores)
    ours = timings["qwen3_pipeline"]
    print(
        f"{'method':<24}{'wall s':>8}{'cpu s':>8}{'pairs/s':>9}{'padding eff.':>14}"
        f"{'ours ÷ it':>11}{'(cpu)':>8}{'max |Δ| vs card':>17}"
    )
    for name, t in timings.items():
        diff = np.abs(np.array(t.scores) - reference).max()
        print(
            f"{name:<24}{t.wall:>8.2f}{t.cpu:>8.2f}{pairs / t.wall:>9.1f}{t.efficiency:>14.3f}"
            f"{t.wall / ours.wall:>10.2f}x{t.cpu / ours.cpu:>7.2f}x{diff:>17.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Qwen3-Reranker id or directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="random model")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: ours")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed rounds of the batched methods (fastest kept)"
    )
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            started = time.perf_counter()
            args.model_path = str(
                build_tiny_reranker_checkpoint(Path(tmp) / "model", **SHAPES[args.shape])
            )
            what = (
                f"random-init Qwen3-Reranker {args.shape} {SHAPES[args.shape]} (built in "
                f"{time.perf_counter() - started:.1f}s)"
            )
        else:
            args.model_path, what = args.model, args.model
        print(
            f"model: {what}; device={args.device} dtype={args.dtype} "
            f"threads={torch.get_num_threads()}"
        )
        bench(args)


if __name__ == "__main__":
    main()
