"""Encoder throughput: Qwen3Encoder vs sentence-transformers vs the model card's naive loop.

All three run in one process on the same checkpoint (random-initialised weights of a chosen
shape, built locally: no hub is reachable) and the same texts; the table shows real tokens/s
(the tokens of the texts, padding excluded), padding efficiency (real tokens / computed
positions), and our ratio to each peer.

    python benchmarks/encode_bench.py                      # hidden 256 / 4 layers, 1000 docs
    python benchmarks/encode_bench.py --model-size 0.6b --device cuda --corpus-size 4000
    python benchmarks/encode_bench.py --whole-process 600   # start-up included, see below

``--whole-process N`` times whole processes instead, start-up included (imports, tokenizer,
weights): ``qwen3-pipeline embed`` of N skewed texts against a process that loads the same
checkpoint with sentence-transformers and encodes the same texts, alternated ``--repeats``
times in one run; the commands are printed and the medians compared.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.demo.corpus import narrow_length_texts, stdlib_docstrings  # noqa: E402
from qwen3_pipeline.embedding.encoder import Qwen3Encoder  # noqa: E402
from tests.fixtures.tiny_qwen3 import build_tiny_qwen3_checkpoint  # noqa: E402

SHAPES = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 128},
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 768},
    "0.6b": {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8,
             "intermediate_size": 3072, "head_dim": 128},
}  # fmt: skip
PEER_BATCH = 32


def padded_positions(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(b) * lengths[b].max() for b in batches))


def run_ours(model_dir, texts, device, dtype, budget, max_length):
    spec = EmbeddingSpec(model=str(model_dir), max_length=max_length)
    encoder = Qwen3Encoder(
        spec, device=device, dtype=dtype, max_batch_tokens=budget, progress=False
    )
    encoder.encode_documents(texts[:8])  # warm-up
    result = encoder.embed_documents(texts)
    _sync(device)
    encoder.close()
    return result.stats.seconds, result.stats.padding_efficiency, result.vectors


def run_sentence_transformers(model_dir, texts, device, dtype, lengths):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(model_dir), device=device, model_kwargs={"dtype": getattr(torch, dtype)}
    )
    model.encode_document(texts[:8], batch_size=PEER_BATCH)
    started = time.perf_counter()
    vectors = model.encode_document(texts, batch_size=PEER_BATCH, convert_to_numpy=True)
    _sync(device)
    seconds = time.perf_counter() - started
    # sentence-transformers sorts by character length, longest first, then cuts fixed batches.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = [order[i : i + PEER_BATCH] for i in range(0, len(texts), PEER_BATCH)]
    del model
    return seconds, lengths.sum() / padded_positions(lengths, batches), vectors


def run_naive(model_dir, texts, device, dtype, lengths, max_length):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(texts), PEER_BATCH):
        batch = tokenizer(
            texts[start : start + PEER_BATCH],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        outputs.append(F.normalize(hidden[:, -1].float(), p=2, dim=1).cpu().numpy())
    _sync(device)
    seconds = time.perf_counter() - started
    batches = [
        np.arange(i, min(i + PEER_BATCH, len(texts))) for i in range(0, len(texts), PEER_BATCH)
    ]
    del model
    return seconds, lengths.sum() / padded_positions(lengths, batches), np.concatenate(outputs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_corpus(name, texts, model_dir, args):
    encoder = Qwen3Encoder(
        EmbeddingSpec(model=str(model_dir), max_length=args.max_length), device="cpu",
        progress=False,
    )  # fmt: skip
    lengths = np.array([len(ids) for ids in encoder.tokenize(texts)[0]])
    real = int(lengths.sum())
    del encoder
    print(
        f"\n== {name}: {len(texts)} texts, {real} tokens, tokens/text p50={np.median(lengths):.0f}"
        f" p90={np.percentile(lengths, 90):.0f} max={lengths.max()}"
    )
    rows = {}
    peers = {
        "qwen3_pipeline": lambda: run_ours(
            model_dir, texts, args.device, args.dtype, args.max_batch_tokens, args.max_length
        ),
        "sentence-transformers": lambda: run_sentence_transformers(
            model_dir, texts, args.device, args.dtype, lengths
        ),
        "naive loop (card)": lambda: run_naive(
            model_dir, texts, args.device, args.dtype, lengths, args.max_length
        ),
    }
    vectors = {}
    for peer, run in peers.items():
        gc.collect()
        seconds, efficiency, vectors[peer] = run()
        rows[peer] = {"seconds": seconds, "tokens_per_s": real / seconds, "efficiency": efficiency}
    ours = rows["qwen3_pipeline"]["tokens_per_s"]
    print(f"{'method':<24}{'seconds':>10}{'tokens/s':>12}{'padding eff.':>14}{'ours ÷ it':>11}")
    for peer, row in rows.items():
        print(
            f"{peer:<24}{row['seconds']:>10.2f}{row['tokens_per_s']:>12.0f}"
            f"{row['efficiency']:>14.3f}{ours / row['tokens_per_s']:>10.2f}x"
        )
    for peer in ("sentence-transformers", "naive loop (card)"):
        a, b = vectors["qwen3_pipeline"], vectors[peer]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"  min cosine vs {peer}: {cos.min():.6f}")
    return {"corpus": name, "texts": len(texts), "real_tokens": real, "results": rows}


ST_SCRIPT = """
import json, sys
import numpy as np, torch
from sentence_transformers import SentenceTransformer
model_dir, corpus, output, device, dtype = sys.argv[1:6]
texts = [json.loads(line)["text"] for line in open(corpus)]
model = SentenceTransformer(model_dir, device=device, model_kwargs={"dtype": getattr(torch, dtype)})
np.save(output, model.encode_document(texts, batch_size=32, convert_to_numpy=True))
"""


def bench_whole_process(model_dir, args, tmp):
    """Whole processes, start-up included: ``qwen3-pipeline embed`` vs sentence-transformers."""
    corpus, st_script = Path(tmp) / "corpus.jsonl", Path(tmp) / "st_embed.py"
    docs = stdlib_docstrings(args.whole_process)
    corpus.write_text("".join(json.dumps({"text": f"{d.title}\n\n{d.body}"}) + "\n" for d in docs))
    st_script.write_text(ST_SCRIPT)
    cli = str(Path(sys.executable).with_name("qwen3-pipeline"))
    commands = {
        "qwen3-pipeline embed": [
            cli, "embed", "--model", str(model_dir), "--input", str(corpus),
            "--output", f"{tmp}/ours.npy", "--device", args.device, "--dtype", args.dtype,
        ],
        "sentence-transformers": [
            sys.executable, str(st_script), str(model_dir), str(corpus), f"{tmp}/st.npy",
            args.device, args.dtype,
        ],
    }  # fmt: skip
    print(f"\n== whole process: {len(docs)} skewed texts, median of {args.repeats} alternated runs")
    for name, command in commands.items():
        print(f"  {name}: {' '.join(command)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env, capture_output=True)
            times[name].append(time.perf_counter() - started)
    ours = statistics.median(times["qwen3-pipeline embed"])
    print(f"{'method':<24}{'median s':>10}{'runs':>30}{'it ÷ ours':>11}")
    for name, runs in times.items():
        median = statistics.median(runs)
        shown = " ".join(f"{t:.1f}" for t in runs)
        print(f"{name:<24}{median:>10.2f}{shown:>30}{median / ours:>10.2f}x")
    a, b = np.load(f"{tmp}/ours.npy"), np.load(f"{tmp}/st.npy")
    print(f"  min cosine vs sentence-transformers: {(a * b).sum(1).min():.6f}")
    return {"whole_process": {name: runs for name, runs in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="small")
    parser.add_argument("--corpus-size", type=int, default=1000)
    parser.add_argument("--narrow-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="default: encoder's")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument(
        "--whole-process",
        type=int,
        default=0,
        metavar="N",
        help="time whole processes (start-up included) on N skewed texts instead",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (--whole-process)")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model_dir = build_tiny_qwen3_checkpoint(Path(tmp) / "model", **SHAPES[args.model_size])
        print(
            f"model: random-init Qwen3 {args.model_size} {SHAPES[args.model_size]} "
            f"(built in {time.perf_counter() - started:.1f}s); device={args.device} "
            f"dtype={args.dtype} threads={torch.get_num_threads()}"
        )
        if args.whole_process:
            results = [bench_whole_process(model_dir, args, tmp)]
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            return
        skewed = [f"{d.title}\n\n{d.body}" for d in stdlib_docstrings(args.corpus_size)]
        results = [bench_corpus("skewed (stdlib docstrings)", skewed, model_dir, args)]
        if args.narrow_size:
            narrow = narrow_length_texts(args.narrow_size)
            results.append(bench_corpus("narrow (200-240 chars)", narrow, model_dir, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
