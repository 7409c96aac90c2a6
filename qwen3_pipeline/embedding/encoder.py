r"""The Qwen3-Embedding encoder (torch and transformers, placed and loaded as the reranker is).

It follows the model card exactly: left padding, every input ending in ``<|endoftext|>``, the
hidden state of that last token as the embedding, Matryoshka truncation to ``dim`` components,
then L2 normalisation; queries as ``Instruct: {task}\nQuery:{query}``. What it adds is speed
and robustness: texts are tokenised once, sorted by token length and packed under a token
budget that counts padding (:mod:`qwen3_pipeline.embedding.batching`); a CUDA out-of-memory batch
is split
and retried; a non-finite vector is recomputed in float32; a row that still fails is reported,
never dropped.

torch and transformers are imported when an encoder is built, never at package import, so
Dagster definitions, the CLI's help and the non-model tests load without them. Placement,
loading and the left-padded inputs are :mod:`qwen3_pipeline.embedding.checkpoint`'s, shared
with :mod:`qwen3_pipeline.embedding.reranker`.
"""

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from qwen3_pipeline.core.errors import EmbeddingFailedError, ModelLoadError
from qwen3_pipeline.core.failures import FailureStep, RowFailure
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.batching import padded_positions, plan_batches, split_batch
from qwen3_pipeline.embedding.checkpoint import (
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_MAX_BATCH_TOKENS_CPU,
    DEFAULT_MAX_BATCH_TOKENS_CUDA,
    Attention,
    Device,
    PlacedModel,
    Precision,
    env_offline,
    free_accelerator_memory,
    in_float32,
    load_pretrained,
    padded_inputs,
)
from qwen3_pipeline.embedding.interface import BatchDone, EncodeResult, EncodeStats

logger = logging.getLogger("qwen3_pipeline")

END_OF_TEXT = "<|endoftext|>"
# Where the model runs and how it loads is shared with the reranker (embedding.checkpoint);
# these names stay importable from here.
__all__ = [
    "DEFAULT_MAX_BATCH_ROWS",
    "DEFAULT_MAX_BATCH_TOKENS_CPU",
    "DEFAULT_MAX_BATCH_TOKENS_CUDA",
    "END_OF_TEXT",
    "Attention",
    "Device",
    "Precision",
    "Qwen3Encoder",
    "env_offline",
]


class Qwen3Encoder(PlacedModel):
    """Embed texts with a Qwen3-Embedding checkpoint, token-budget batched.

    Args:
        spec: Model, revision, output dimension, max_length and prompts.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2`` (needs ``flash_attn``;
            never fetched from the hub).
        max_batch_tokens: Budget per forward pass counting padding (``rows * longest``);
            default 16384 on CUDA, 4096 on CPU.
        max_batch_rows: Cap on rows per forward pass.
        local_files_only: Never contact the hub; default on when ``HF_HUB_OFFLINE`` is set.
        progress: Report progress of long calls (bar on a terminal, log lines otherwise).
        load_model: ``False`` loads only the tokenizer (token counts for a dry run); the
            embed methods then raise.

    Raises:
        ConfigError: An unknown device, dtype or attention, or flash-attention without
            ``flash_attn`` / CUDA.
        ModelLoadError: The checkpoint or tokenizer cannot be found or loaded.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
        >>> encoder = Qwen3Encoder(spec)  # doctest: +SKIP
        >>> encoder.encode_queries(["What is the capital of China?"]).shape  # doctest: +SKIP
        (1, 256)
    """

    def __init__(
        self,
        spec: EmbeddingSpec,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        max_batch_tokens: int | None = None,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        local_files_only: bool | None = None,
        progress: bool = True,
        load_model: bool = True,
    ) -> None:
        super().__init__(device, dtype, attention, max_batch_tokens, max_batch_rows)
        self._spec = spec
        self._progress = progress
        offline = env_offline() if local_files_only is None else local_files_only
        self._tokenizer, self._model = load_pretrained(
            spec.model,
            revision=spec.revision,
            placement=self.placement,
            local_files_only=offline,
            load_model=load_model,
        )
        self._eot_id = self._end_of_text_id()
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._eot_id

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec this encoder follows."""
        return self._spec

    # -- loading -------------------------------------------------------------------------

    def _end_of_text_id(self) -> int:
        eot = self._tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if not isinstance(eot, int) or eot == self._tokenizer.unk_token_id:
            raise ModelLoadError(
                f"the tokenizer of {self._spec.model!r} has no {END_OF_TEXT} token; "
                "is this a Qwen3-Embedding checkpoint?"
            )
        return eot

    def close(self) -> None:
        """Release the model and free accelerator memory (the encoder is unusable after)."""
        self._model = None
        free_accelerator_memory(self.device)

    # -- public encode API ---------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Tokenise texts as the model sees them, each ending in ``<|endoftext|>``.

        Texts are tokenised without special tokens, cut to ``max_length - 1`` tokens, and the
        ``<|endoftext|>`` id appended: the same ids the official tokenizer produces with
        ``truncation=True, max_length=...``, whether or not a given tokenizer appends the token
        itself.

        Args:
            texts: Already formatted texts (documents or instruction-formatted queries).

        Returns:
            Token ids per text, and a boolean array marking texts that were truncated.
        """
        if not texts:
            return [], np.zeros(0, dtype=bool)
        encoded = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        keep = self._spec.max_length - 1
        truncated = np.fromiter((len(ids) > keep for ids in encoded), dtype=bool, count=len(texts))
        return [[*ids[:keep], self._eot_id] for ids in encoded], truncated

    def count_document_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens each document costs the model (after truncation, ``<|endoftext|>`` included).

        Exactly the ``n_tokens`` :meth:`embed_documents` will report; the refresh plan uses it
        for exact progress totals. Needs only the tokenizer.
        """
        if not texts:
            return np.zeros(0, dtype=np.int64)
        formatted = [self._spec.format_document(t) for t in texts]
        encoded = self._tokenizer(formatted, add_special_tokens=False)["input_ids"]
        keep = self._spec.max_length - 1
        return np.fromiter(
            (min(len(ids), keep) + 1 for ids in encoded), dtype=np.int64, count=len(texts)
        )

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents (raw text, optional document prompt); failures reported per row.

        ``on_batch(rows, tokens)`` is called after each forward pass; when given, the caller
        reports progress and this call draws no bar or log line of its own.
        """
        formatted = [self._spec.format_document(t) for t in texts]
        return self._embed(formatted, "documents", on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        r"""Embed queries in the ``Instruct: {task}\nQuery:{query}`` format."""
        return self._embed([self._spec.format_query(q) for q in queries], "queries")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Return document vectors ``[n, dim]`` (float32, unit norm) in input order.

        Raises:
            EmbeddingFailedError: A row could not be embedded (named in the message).
        """
        result = self.embed_documents(texts)
        self.last_stats = result.stats
        return result.raise_on_failure()

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Return query vectors ``[n, dim]`` (float32, unit norm) in input order.

        Raises:
            EmbeddingFailedError: A row could not be embedded (named in the message).
        """
        result = self.embed_queries(queries)
        self.last_stats = result.stats
        return result.raise_on_failure()

    # -- internals -----------------------------------------------------------------------

    def _embed(
        self, texts: list[str], what: str, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        if self._model is None:
            raise ModelLoadError(
                "this encoder has no model (closed, or built with load_model=False); build a "
                "new one"
            )
        started = time.perf_counter()
        failures: dict[int, RowFailure | str] = {}
        ids, truncated = self._tokenize_rows(texts, failures)
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        dim = self._spec.output_dim
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        counters = {"batches": 0, "padded": 0}
        tokenized = np.array([i for i in range(len(texts)) if i not in failures], dtype=np.int64)
        batches = [
            tokenized[batch]
            for batch in plan_batches(
                lengths[tokenized],
                max_batch_tokens=self.max_batch_tokens,
                max_batch_rows=self.max_batch_rows,
            )
        ]
        with Progress(
            int(lengths.sum()),
            f"embedding {what}",
            unit="tok",
            enabled=self._progress and on_batch is None,
        ) as progress:
            for batch in batches:
                self._run_batch(ids, lengths, batch, vectors, failures, counters)
                batch_tokens = int(lengths[batch].sum())
                progress.update(batch_tokens, rows=len(batch))
                if on_batch is not None:
                    on_batch(len(batch), batch_tokens)
        _raise_if_every_row_failed(failures, len(texts))
        self._retry_non_finite(ids, lengths, vectors, failures, counters)
        stats = EncodeStats(
            rows=len(texts),
            real_tokens=int(lengths.sum()),
            padded_tokens=counters["padded"],
            batches=counters["batches"],
            seconds=time.perf_counter() - started,
            truncated_rows=int(truncated.sum()),
            failed_rows=len(failures),
        )
        return EncodeResult(
            vectors=vectors,
            n_tokens=lengths,
            truncated=truncated,
            failures=dict(sorted(failures.items())),
            stats=stats,
        )

    def _tokenize_rows(
        self, texts: list[str], failures: dict[int, "RowFailure | str"]
    ) -> tuple[list[list[int]], np.ndarray]:
        """:meth:`tokenize`; a text the tokenizer rejects is a failed row, not a failed call."""
        try:
            return self.tokenize(texts)
        except Exception:  # isolated below, row by row
            logger.warning("the tokenizer failed on a batch of %d texts; isolating", len(texts))
        ids: list[list[int]] = []
        truncated = np.zeros(len(texts), dtype=bool)
        for row, text in enumerate(texts):
            try:
                one, cut = self.tokenize([text])
            except Exception as e:  # recorded with its step and type
                failures[row] = RowFailure.of_error(FailureStep.TOKENIZE, e)
                ids.append([self._eot_id])
                continue
            ids.append(one[0])
            truncated[row] = bool(cut[0])
        return ids, truncated

    def _run_batch(
        self,
        ids: list[list[int]],
        lengths: np.ndarray,
        batch: np.ndarray,
        vectors: np.ndarray,
        failures: dict[int, "RowFailure | str"],
        counters: dict[str, int],
    ) -> None:
        """One forward pass; a failing batch is split until the failing rows are alone.

        Out-of-memory and any other error of the forward pass are handled alike: one bad row
        never fails its neighbours, and only the rows that fail on their own are recorded.
        """
        torch = self._torch
        try:
            counters["batches"] += 1
            vectors[batch] = self._forward([ids[i] for i in batch])
            counters["padded"] += padded_positions(lengths, batch)
            return
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            error: Exception = e
        except Exception as e:  # isolated by splitting, then recorded
            error = e
        out_of_memory = isinstance(error, torch.OutOfMemoryError)
        if batch.size == 1:
            row = int(batch[0])
            if out_of_memory:
                message = f"out of memory for a single row of {int(lengths[row])} tokens"
                failures[row] = RowFailure(str(FailureStep.EMBED), type(error).__name__, message)
            else:
                failures[row] = RowFailure.of_error(FailureStep.EMBED, error)
            logger.error("row %d (%d tokens) failed: %s", row, lengths[row], failures[row])
            return
        logger.warning(
            "%s on %d rows; splitting the batch and retrying",
            "out of memory" if out_of_memory else f"{type(error).__name__}: {error}",
            batch.size,
        )
        for half in split_batch(batch):
            self._run_batch(ids, lengths, half, vectors, failures, counters)

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        torch = self._torch
        inputs = padded_inputs(sequences, self._pad_id, self.device)
        with torch.inference_mode():
            hidden = self._model(**inputs).last_hidden_state
            # Left padding: every row's <|endoftext|> is in the last column.
            pooled = hidden[:, -1, : self._spec.output_dim].float()
            if self._spec.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()

    def _retry_non_finite(
        self,
        ids: list[list[int]],
        lengths: np.ndarray,
        vectors: np.ndarray,
        failures: dict[int, "RowFailure | str"],
        counters: dict[str, int],
    ) -> None:
        bad = [
            int(i) for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if i not in failures
        ]
        if not bad:
            return
        logger.warning("%d row(s) gave non-finite vectors; recomputing them in float32", len(bad))
        with in_float32(self._model):
            for row in bad:
                counters["batches"] += 1
                counters["padded"] += int(lengths[row])
                vector = self._forward([ids[row]])[0]
                if np.isfinite(vector).all():
                    vectors[row] = vector
                else:
                    failures[row] = "non-finite vector, also in float32"
                    logger.error("row %d gave a non-finite vector even in float32", row)


def _raise_if_every_row_failed(failures: Mapping[int, "RowFailure | str"], rows: int) -> None:
    """Raise when every row of a call of several rows failed on its own.

    That is the model failing (a lost device, a broken checkpoint), not the rows: recording
    each row as a failure would quarantine the whole table.

    Raises:
        EmbeddingFailedError: Every one of ``rows`` (>= 2) failed.
    """
    if rows < 2 or len(failures) < rows:
        return
    first = failures[min(failures)]
    raise EmbeddingFailedError(
        f"every one of {rows} rows failed on its own, so the model is failing, not the rows "
        f"(first: {first}); nothing was recorded against the rows. Check the model and device"
    )
