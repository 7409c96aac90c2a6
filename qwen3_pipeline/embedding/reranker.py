r"""The Qwen3-Reranker: how likely a document answers a query, scored as the model card does.

The recipe follows the Qwen3-Reranker model card exactly. Each (query, document) pair is the
user turn ``<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}`` (default
instruction: the card's web-search task), tokenised without special tokens and cut to
``max_length`` minus the template's tokens, between the fixed chat prefix (the system prompt
*Judge whether the Document meets the requirements based on the Query and the Instruct
provided. Note that the answer can only be "yes" or "no".*) and the assistant suffix with its
empty think block. The score is the softmax over the last position's logits of the tokens
``no`` and ``yes``: P(yes), in [0, 1].

What it adds is the encoder's batching (:mod:`qwen3_pipeline.embedding.checkpoint`,
:mod:`qwen3_pipeline.embedding.batching`): pairs are tokenised once, sorted by token length and
packed under a token budget that counts padding, left-padded with positions counting real
tokens only; scores return in input order. Only the two rows of the language-model head that
the score reads are kept and computed (the card's code computes logits over the whole
151,669-token vocabulary at every position: gigabytes for one large batch). A CUDA
out-of-memory batch is split and retried; a non-finite score is recomputed in float32; a pair
that still fails raises an error naming it.

torch and transformers are imported when a reranker is built, never with this module, so the
:class:`Reranker` interface can be imported anywhere.

Example:
    >>> reranker = Qwen3Reranker("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
    >>> reranker.score(
    ...     "What is the capital of China?",
    ...     ["The capital of China is Beijing.", "Gravity is a force."],
    ... )  # doctest: +SKIP
    [0.9995, 0.0002]
"""

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qwen3_pipeline.core.errors import ConfigError, EmbeddingFailedError, ModelLoadError
from qwen3_pipeline.core.spec import MAX_CONTEXT
from qwen3_pipeline.embedding.batching import padded_positions, plan_batches
from qwen3_pipeline.embedding.checkpoint import (
    DEFAULT_MAX_BATCH_ROWS,
    PlacedModel,
    call_stats,
    env_offline,
    free_accelerator_memory,
    in_float32,
    load_tokenizer,
    load_weights,
    padded_inputs,
    run_halving_on_oom,
)

logger = logging.getLogger("qwen3_pipeline")

DEFAULT_RERANK_MODEL = "Qwen/Qwen3-Reranker-0.6B"
DEFAULT_RERANK_MAX_LENGTH = 8192
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# The answer tokens whose logits are compared, in the card's order: P(yes) is index 1.
ANSWER_TOKENS = ("no", "yes")
_SETTING_HINT = "the reranker's model, --rerank-model"


def format_pair(query: str, document: str, instruction: str | None = None) -> str:
    r"""The user turn the reranker judges (the model card's ``format_instruction``).

    Example:
        >>> format_pair("capital of China?", "Beijing.", "Find the answer")
        '<Instruct>: Find the answer\n<Query>: capital of China?\n<Document>: Beijing.'
    """
    task = DEFAULT_INSTRUCTION if instruction is None else instruction
    return f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {document}"


@runtime_checkable
class Reranker(Protocol):
    """Scores how well each document answers a query (higher is better)."""

    def score(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        """Return one score per document, in input order."""
        ...


class Qwen3Reranker(PlacedModel):
    """Score (query, document) pairs with a Qwen3-Reranker checkpoint, token-budget batched.

    Args:
        model: Hub id (``Qwen/Qwen3-Reranker-0.6B``, ``-4B``, ``-8B``) or a local checkpoint
            directory.
        revision: Pinned hub revision (commit hash or tag).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2`` (needs ``flash_attn``;
            never fetched from the hub).
        max_length: Tokens per pair, template included (the card's 8192); longer pairs lose the
            end of their document.
        max_batch_tokens: Budget per forward pass counting padding (``rows * longest``);
            default 16384 on CUDA, 4096 on CPU.
        max_batch_rows: Cap on pairs per forward pass.
        local_files_only: Never contact the hub; default on when ``HF_HUB_OFFLINE`` is set.

    Attributes:
        last_stats: Counters of the last :meth:`score` call (pairs, real and padded tokens,
            batches, seconds, truncated pairs).

    Raises:
        ConfigError: A ``max_length`` that leaves no room beside the template or exceeds the
            32k context, a batch budget below 1, an unknown device, dtype or attention.
        ModelLoadError: The checkpoint cannot be loaded, or its tokenizer has no ``yes`` and
            ``no`` tokens (not a Qwen3-Reranker).

    Example:
        >>> reranker = Qwen3Reranker("Qwen/Qwen3-Reranker-0.6B", device="cuda")  # doctest: +SKIP
        >>> reranker.score("Explain gravity", ["Gravity attracts masses.", ""])  # doctest: +SKIP
        [0.98, 0.001]
    """

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        max_length: int = DEFAULT_RERANK_MAX_LENGTH,
        max_batch_tokens: int | None = None,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        local_files_only: bool | None = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ConfigError(f"model must be a hub id or a directory, got {model!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ConfigError(f"max_length must be an integer, got {max_length!r}")
        if max_length > MAX_CONTEXT:
            raise ConfigError(f"max_length={max_length} exceeds the {MAX_CONTEXT}-token context")
        super().__init__(device, dtype, attention, max_batch_tokens, max_batch_rows)
        self.model = model
        self.revision = revision
        self.max_length = max_length
        offline = env_offline() if local_files_only is None else local_files_only
        # The tokenizer's checks come before the weights load: a wrong max_length or a
        # checkpoint that is no reranker fails in a second, not after gigabytes are read.
        self._tokenizer = load_tokenizer(
            model, revision=revision, local_files_only=offline, setting_hint=_SETTING_HINT
        )
        self._prefix = self._tokenizer.encode(PREFIX, add_special_tokens=False)
        self._suffix = self._tokenizer.encode(SUFFIX, add_special_tokens=False)
        template = len(self._prefix) + len(self._suffix)
        if max_length <= template:
            raise ConfigError(
                f"max_length={max_length} leaves no room for the pair: the reranker's template "
                f"alone takes {template} tokens"
            )
        self._pair_budget = max_length - template
        answer_ids = self._answer_ids()
        # Any id will do for padding (it is masked out); the Qwen tokenizers name one.
        pad_ids = (self._tokenizer.pad_token_id, self._tokenizer.eos_token_id)
        self._pad_id = next((i for i in pad_ids if i is not None), 0)
        causal_lm = load_weights(
            model,
            revision=revision,
            placement=self.placement,
            local_files_only=offline,
            model_class="AutoModelForCausalLM",
            setting_hint=_SETTING_HINT,
            fit_note="its yes/no scores may not follow the Qwen3-Reranker recipe",
        )
        self._backbone, self._head = self._split_head(causal_lm, answer_ids)

    def _answer_ids(self) -> list[int]:
        ids = [self._tokenizer.convert_tokens_to_ids(token) for token in ANSWER_TOKENS]
        if not all(isinstance(i, int) for i in ids) or self._tokenizer.unk_token_id in ids:
            raise ModelLoadError(
                f"the tokenizer of {self.model!r} has no 'yes'/'no' tokens; is this a "
                "Qwen3-Reranker checkpoint?"
            )
        return ids

    def _split_head(self, causal_lm: Any, answer_ids: list[int]) -> tuple[Any, Any]:
        # The score reads two logits of the last position: keep the backbone and the two rows
        # of the head, in float32 (the card computes them in the model's dtype). An untied
        # head's other 151k rows are freed with the causal-LM wrapper.
        head = causal_lm.get_output_embeddings()
        rows = self._torch.tensor(answer_ids, device=self.device)
        weight = head.weight.detach().index_select(0, rows).float()
        bias = None if head.bias is None else head.bias.detach().index_select(0, rows).float()
        return causal_lm.get_decoder(), (weight, bias)

    def close(self) -> None:
        """Release the model and free accelerator memory (the reranker is unusable after)."""
        self._backbone = None
        self._head = None
        free_accelerator_memory(self.device)

    def tokenize(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of each pair as the model reads them, template included.

        Each pair's text is tokenised without special tokens, cut to ``max_length`` minus the
        template's tokens (the card's ``truncation='longest_first'`` on one sequence keeps
        the start), and put between the prefix and suffix ids.

        Returns:
            Token ids per document, and a boolean array marking pairs that were truncated.
        """
        if not documents:
            return [], np.zeros(0, dtype=bool)
        pairs = [format_pair(query, document, instruction) for document in documents]
        encoded = self._tokenizer(pairs, add_special_tokens=False)["input_ids"]
        keep = self._pair_budget
        truncated = np.fromiter((len(ids) > keep for ids in encoded), dtype=bool, count=len(pairs))
        return [[*self._prefix, *ids[:keep], *self._suffix] for ids in encoded], truncated

    def score(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        """Return P(yes) in [0, 1] for each document, in input order.

        An empty document is scored like any other (the card's template around nothing).

        Args:
            query: The query.
            documents: The candidate documents (a list, not a single string).
            instruction: What relevance means (the card's ``Instruct``); None is the card's
                web-search default.

        Raises:
            ConfigError: ``query`` or ``instruction`` is not a string, ``documents`` is a
                string or holds a non-string.
            ModelLoadError: The reranker was closed.
            EmbeddingFailedError: A pair ran out of memory alone, or gave a non-finite score
                even in float32 (each named).
        """
        _check_score_inputs(query, documents, instruction)
        if self._backbone is None:
            raise ModelLoadError("this reranker was closed; build a new one")
        started = time.perf_counter()
        ids, truncated = self.tokenize(query, documents, instruction)
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        scores = np.full(len(ids), np.nan, dtype=np.float32)
        counters = {"batches": 0, "padded": 0}

        def run(rows: np.ndarray) -> None:
            scores[rows] = self._forward([ids[i] for i in rows])
            counters["batches"] += 1
            counters["padded"] += padded_positions(lengths, rows)

        failures: dict[int, str] = {}
        plan = plan_batches(
            lengths, max_batch_tokens=self.max_batch_tokens, max_batch_rows=self.max_batch_rows
        )
        for batch in plan:
            failures.update(run_halving_on_oom(batch, run, lengths))
        failures.update(self._retry_non_finite(scores, failures, run))
        self.last_stats = call_stats(
            lengths, truncated, counters, started=started, failed=len(failures)
        )
        if truncated.any():
            logger.info(
                "%d of %d pair(s) were longer than max_length=%d and lost the end of their "
                "document",
                int(truncated.sum()),
                len(ids),
                self.max_length,
            )
        if failures:
            shown = ", ".join(f"document {i}: {why}" for i, why in sorted(failures.items())[:5])
            more = f" (+{len(failures) - 5} more)" if len(failures) > 5 else ""
            raise EmbeddingFailedError(
                f"{len(failures)} of {len(ids)} document(s) could not be scored: {shown}{more}"
            )
        return [float(s) for s in scores]

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        torch = self._torch
        weight, bias = self._head
        inputs = padded_inputs(sequences, self._pad_id, self.device)
        with torch.inference_mode():
            # Left padding: every pair's last token (the suffix's end) is in the last column.
            last = self._backbone(**inputs).last_hidden_state[:, -1, :].float()
            logits = torch.nn.functional.linear(last, weight, bias)
            scores = torch.log_softmax(logits, dim=-1)[:, 1].exp()
        return scores.cpu().numpy()

    def _retry_non_finite(
        self, scores: np.ndarray, failures: dict[int, str], run: Any
    ) -> dict[int, str]:
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(scores)) if int(i) not in failures]
        if not bad:
            return {}
        logger.warning("%d pair(s) gave non-finite scores; recomputing them in float32", len(bad))
        with in_float32(self._backbone):
            for row in bad:
                run(np.array([row]))
        still_bad = [row for row in bad if not np.isfinite(scores[row])]
        return {row: "non-finite score, also in float32" for row in still_bad}


def _check_score_inputs(query: Any, documents: Any, instruction: Any) -> None:
    if not isinstance(query, str):
        raise ConfigError(f"query must be a string, got {type(query).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise ConfigError(f"instruction must be a string or None, got {type(instruction).__name__}")
    if isinstance(documents, str | bytes) or not isinstance(documents, Sequence):
        raise ConfigError(
            f"documents must be a list of strings, got {type(documents).__name__} (wrap a "
            "single document in a list)"
        )
    bad = [i for i, document in enumerate(documents) if not isinstance(document, str)]
    if bad:
        raise ConfigError(f"documents must be strings; document(s) {bad[:5]} are not")
