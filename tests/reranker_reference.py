"""A tiny random Qwen3-Reranker checkpoint, and the model card's reference code (not a test module).

The checkpoint is the tiny Qwen3 backbone of
:func:`tests.fixtures.tiny_qwen3.build_tiny_qwen3_checkpoint` (the real tokenizer, random
weights) turned into a ``Qwen3ForCausalLM`` with its own random
language-model head, saved as safetensors like the published ``Qwen/Qwen3-Reranker-*``
repositories. Its tokenizer has no end-of-text template (the reranker's tokenizer appends no
token, unlike the embedding model's). The head is drawn wider than transformers' default
initialisation so the scores spread over [0, 1] instead of clustering at 0.5, which makes both
the parity and the ordering tests sharper.

:class:`CardReference` is the transformers usage code of the Qwen3-Reranker model card, copied
as published (``format_instruction``, ``process_inputs``, ``compute_logits``), wrapped in a
class only so a test can point it at a checkpoint and a ``max_length``. The parity test runs it
in one batch; the benchmark runs it one pair per forward pass (the naive loop).
"""

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from qwen3_pipeline.demo.model import build_tiny_qwen3_checkpoint

# The head's std times sqrt(hidden size): yes - no logit differences of std ~4 at any width, so
# P(yes) spreads over (0, 1) without saturating (transformers' default std is 0.02).
HEAD_SCALE = 4.0
# The post-processor of the Qwen3 base tokenizers (the reranker's among them): byte-level
# offsets only, no appended <|endoftext|>.
NO_TEMPLATE_POST_PROCESSOR = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": False,
    "use_regex": False,
}


def build_tiny_reranker_checkpoint(dest: Path, *, seed: int = 0, **shape: Any) -> Path:
    """Write a random-weight Qwen3-Reranker checkpoint (float32) to ``dest``.

    Args:
        dest: Output directory.
        seed: Seed of the weights (backbone and head).
        **shape: Shape arguments of ``build_tiny_qwen3_checkpoint`` (hidden_size...).

    Returns:
        ``dest``, loadable with ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``.
    """
    with tempfile.TemporaryDirectory(prefix="tiny-qwen3-backbone-") as scratch:
        backbone = build_tiny_qwen3_checkpoint(
            Path(scratch), seed=seed, dtype="float32", sentence_transformers_files=False, **shape
        )
        model = Qwen3ForCausalLM.from_pretrained(backbone, dtype=torch.float32)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (dest / name).write_bytes((backbone / name).read_bytes())
    model.config.tie_word_embeddings = False
    model.config.architectures = ["Qwen3ForCausalLM"]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        std = HEAD_SCALE / model.config.hidden_size**0.5
        head.weight.normal_(0.0, std, generator=generator)
    model.lm_head = head
    model.save_pretrained(dest)
    tokenizer = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = NO_TEMPLATE_POST_PROCESSOR
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    return dest


class CardReference:
    """The Qwen3-Reranker model card's transformers code, pointed at ``model_dir``.

    The three functions are the card's, verbatim but for ``self.``; ``scores`` runs its
    last lines (``pairs`` -> ``process_inputs`` -> ``compute_logits``).
    """

    def __init__(self, model_dir: Path | str, *, max_length: int = 8192) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
        self.token_false_id = self.tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = self.tokenizer.convert_tokens_to_ids("yes")
        self.max_length = max_length

        prefix = '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'  # noqa: E501
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = self.tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = self.tokenizer.encode(suffix, add_special_tokens=False)

    def format_instruction(self, instruction: str | None, query: str, doc: str) -> str:
        if instruction is None:
            instruction = (
                "Given a web search query, retrieve relevant passages that answer the query"
            )
        output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(  # noqa: UP032
            instruction=instruction, query=query, doc=doc
        )
        return output

    def process_inputs(self, pairs: list[str]) -> Any:
        inputs = self.tokenizer(
            pairs,
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(
            inputs, padding=True, return_tensors="pt", max_length=self.max_length
        )
        for key in inputs:
            inputs[key] = inputs[key].to(self.model.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs: Any, **kwargs: Any) -> list[float]:
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    def scores(self, query: str, documents: list[str], instruction: str | None) -> list[float]:
        """All pairs in one batch, as the card runs its example."""
        pairs = [self.format_instruction(instruction, query, doc) for doc in documents]
        return self.compute_logits(self.process_inputs(pairs))
