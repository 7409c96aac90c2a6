"""Random-weight Qwen3-Embedding checkpoints: the demo's offline fallback and the test models.

The checkpoint has the layout of the published ``Qwen/Qwen3-Embedding-0.6B`` repository:
``config.json`` (model type ``qwen3``, ``Qwen3ForCausalLM`` architecture, vocab 151669) with
``model.safetensors`` holding bare ``Qwen3Model`` weights (no ``model.`` prefix), the real Qwen
tokenizer (``tokenizer.json``, shipped compressed as package data, appending ``<|endoftext|>``;
left padding) and, optionally, the sentence-transformers files (Transformer -> last-token
Pooling -> Normalize, with the query/document prompts). Only the weights are random, so
tokenisation, padding, pooling and prompts behave as with the real model; the vectors mean
nothing. torch and transformers are imported when a checkpoint is built, not with this module.

Command line (also as ``python -m tests.fixtures.tiny_qwen3`` in a source checkout)::

    python -m qwen3_pipeline.demo.model --out DIR [--shape tiny|0.6b] [--hidden 64 --layers 2
        --heads 4 --kv-heads 2 --intermediate 128 --head-dim N --seed 0 --dtype bfloat16 --no-st]

Example:
    >>> from pathlib import Path
    >>> from qwen3_pipeline.demo.model import build_tiny_qwen3_checkpoint
    >>> model_dir = build_tiny_qwen3_checkpoint(Path("/tmp/tiny-qwen3"))  # doctest: +SKIP
"""

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any, TypedDict

# The real Qwen tokenizer (built offline by tests/fixtures/build_qwen_tokenizer.py).
from qwen3_pipeline.core.resources import TOKENIZER_PATH

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 151643
VOCAB_SIZE = 151669  # the 151643 BPE ranks + the 26 added tokens below (Qwen3's vocab_size)

# (token, special) for ids 151643..151668, as in the Qwen3 tokenizer.json. The tool, FIM, repo
# and think markers are "added" but not "special" there, so decode(skip_special_tokens=True)
# keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

MAX_POSITION_EMBEDDINGS = 32768
MAX_SEQ_LENGTH = 8192
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
# The real config lists the causal-LM class although the weights are the bare backbone.
ARCHITECTURES = ["Qwen3ForCausalLM"]
# "PreTrainedTokenizerFast" resolves to the generic TokenizersBackend in transformers 5 (and to
# PreTrainedTokenizerFast in 4.x), which loads tokenizer.json verbatim. The hub repository says
# "Qwen2Tokenizer", which in transformers 5 rebuilds the BPE from vocab/merges (with
# ignore_merges=False) and carries the post-processor over; tests check both give the same ids.
DEFAULT_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


class ModelShape(TypedDict, total=False):
    """Shape arguments of :func:`build_tiny_qwen3_checkpoint` (see its docstring)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None


SHAPES: dict[str, ModelShape] = {
    "tiny": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
    },
    # The demo's fallback: big enough to exercise batching, small enough for any CPU.
    "demo": {
        "hidden_size": 256,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 512,
    },
    # Qwen3-Embedding-0.6B / Qwen3-0.6B: note head_dim 128 != hidden_size / num_heads.
    "0.6b": {
        "hidden_size": 1024,
        "num_layers": 28,
        "num_heads": 16,
        "num_kv_heads": 8,
        "intermediate_size": 3072,
        "head_dim": 128,
    },
}


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config(tokenizer_class: str = DEFAULT_TOKENIZER_CLASS) -> dict[str, Any]:
    """Return the ``tokenizer_config.json`` written next to ``tokenizer.json``.

    It deliberately has no ``add_bos_token``/``add_eos_token`` keys: in transformers 5 those make
    the tokenizer rebuild its post-processor instead of using the one in ``tokenizer.json``.

    Args:
        tokenizer_class: Value of ``tokenizer_class``.

    Returns:
        The config as a JSON-ready dict.
    """
    added_tokens_decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=EOS_TOKEN_ID)
    }
    return {
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": EOS_TOKEN,
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
    }


def write_tokenizer(dest: Path, *, tokenizer_class: str = DEFAULT_TOKENIZER_CLASS) -> None:
    """Write ``tokenizer.json`` (from the packaged tokenizer) and ``tokenizer_config.json``.

    Args:
        dest: Checkpoint directory (created if missing).
        tokenizer_class: Value of ``tokenizer_class`` in ``tokenizer_config.json``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_bytes(gzip.decompress(TOKENIZER_PATH.read_bytes()))
    _write_json(dest / "tokenizer_config.json", tokenizer_config(tokenizer_class))


def write_sentence_transformers_files(dest: Path, hidden_size: int) -> None:
    """Write the sentence-transformers files of the ``Qwen/Qwen3-Embedding-0.6B`` repository.

    The files use the format the real repository ships (legacy ``sentence_transformers.models.*``
    module types and ``pooling_mode_*`` flags), which sentence-transformers 6 still reads.

    Args:
        dest: Checkpoint directory.
        hidden_size: Model hidden size (the pooled embedding dimension).
    """
    _write_json(
        dest / "modules.json",
        [
            {
                "idx": 0,
                "name": "0",
                "path": "",
                "type": "sentence_transformers.models.Transformer",
            },
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        dest / "sentence_bert_config.json",
        {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False},
    )
    _write_json(
        dest / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    (dest / "2_Normalize").mkdir(parents=True, exist_ok=True)
    _write_json(
        dest / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def build_tiny_qwen3_checkpoint(
    dest: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    sentence_transformers_files: bool = True,
    tokenizer_class: str = DEFAULT_TOKENIZER_CLASS,
) -> Path:
    """Write a random-initialised Qwen3-Embedding checkpoint to ``dest``.

    The weights are drawn with transformers' own initialisation (normal, std 0.02; RMSNorm
    weights 1) under a fixed seed, without touching the global torch RNG, so the same
    arguments give the same weights. Hidden states stay finite in float32 and bfloat16.

    Args:
        dest: Output directory (created if missing; existing files are overwritten).
        hidden_size: Model width (and output embedding dimension).
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention).
        intermediate_size: MLP width.
        head_dim: Per-head width; ``hidden_size // num_heads`` when None.
        seed: Seed of the weight initialisation.
        dtype: Storage dtype of the weights (``config.json``'s ``dtype``); the published model
            uses bfloat16, and transformers 5 loads in this dtype unless told otherwise.
        sentence_transformers_files: Also write the sentence-transformers layout.
        tokenizer_class: ``tokenizer_class`` of ``tokenizer_config.json``.

    Returns:
        ``dest``, loadable with ``AutoModel``/``AutoTokenizer.from_pretrained`` and, with
        ``sentence_transformers_files``, with ``SentenceTransformer``.

    Raises:
        ValueError: Incompatible shape arguments.
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by heads={num_heads}")
        head_dim = hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of kv_heads={num_kv_heads}")
    torch_dtype = getattr(torch, dtype)

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False,
        use_sliding_window=False,
        max_window_layers=28,
        tie_word_embeddings=True,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    model = model.to(torch_dtype).eval()
    model.save_pretrained(dest)  # safetensors only in transformers 5

    config_path = dest / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = ARCHITECTURES
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    write_tokenizer(dest, tokenizer_class=tokenizer_class)
    if sentence_transformers_files:
        write_sentence_transformers_files(dest, hidden_size)
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(
        description="Write a random-weight Qwen3-Embedding checkpoint."
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="preset shape")
    parser.add_argument("--hidden", type=int, help="hidden size (overrides the preset)")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads")
    parser.add_argument("--intermediate", type=int, help="MLP width")
    parser.add_argument("--head-dim", type=int, help="per-head width (default hidden/heads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-st", action="store_true", help="skip the sentence-transformers files")
    args = parser.parse_args(argv)

    shape: dict[str, Any] = dict(SHAPES[args.shape])
    overrides = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
        "head_dim": args.head_dim,
    }
    shape.update({key: value for key, value in overrides.items() if value is not None})
    if args.head_dim is None and (args.hidden is not None or args.heads is not None):
        shape["head_dim"] = None  # a preset's head_dim belongs to its hidden/heads
    started = time.perf_counter()
    out = build_tiny_qwen3_checkpoint(
        args.out,
        seed=args.seed,
        dtype=args.dtype,
        sentence_transformers_files=not args.no_st,
        **shape,
    )
    elapsed = time.perf_counter() - started
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {elapsed:.1f}s: {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
