r"""The Qwen3-Embedding encoder: the only module that imports torch and transformers.

It follows the model card exactly: left padding, every input ending in ``<|endoftext|>``, the
hidden state of that last token as the embedding, Matryoshka truncation to ``dim`` components,
then L2 normalisation; queries as ``Instruct: {task}\nQuery:{query}``. What it adds is speed
and robustness: texts are tokenised once, sorted by token length and packed under a token
budget that counts padding (:mod:`qwen3_pipeline.embedding.batching`); a CUDA out-of-memory batch
is split
and retried; a non-finite vector is recomputed in float32; a row that still fails is reported,
never dropped.

torch and transformers are imported when an encoder is built, never at package import, so
Dagster definitions, the CLI's help and the non-model tests load without them.
"""

import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np

from qwen3_pipeline.core.errors import ConfigError, ModelLoadError
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.batching import left_pad, padded_positions, plan_batches, split_batch
from qwen3_pipeline.embedding.interface import BatchDone, EncodeResult, EncodeStats

logger = logging.getLogger("qwen3_pipeline")

END_OF_TEXT = "<|endoftext|>"
DEFAULT_MAX_BATCH_TOKENS_CUDA = 16384
DEFAULT_MAX_BATCH_TOKENS_CPU = 4096
DEFAULT_MAX_BATCH_ROWS = 256


class Device(StrEnum):
    """Where the model runs; ``auto`` picks CUDA when available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    """Model weights dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Attention(StrEnum):
    """Attention kernel; ``auto`` is flash-attention-2 when ``flash_attn`` imports on CUDA."""

    AUTO = "auto"
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"


def env_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for local files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _parse_choice(enum: type[StrEnum], value: str, name: str) -> Any:
    try:
        return enum(value)
    except ValueError as e:
        choices = ", ".join(m.value for m in enum)
        raise ConfigError(f"{name}={value!r} is not one of: {choices}") from e


class Qwen3Encoder:
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
        import torch

        self._torch = torch
        self._spec = spec
        self._progress = progress
        self.last_stats: EncodeStats | None = None
        self.device = self._resolve_device(device)
        on_cuda = self.device.type == "cuda"
        self.dtype = self._resolve_dtype(_parse_choice(Precision, dtype, "dtype"), on_cuda)
        self.attention = self._resolve_attention(
            _parse_choice(Attention, attention, "attention"), on_cuda
        )
        default_budget = DEFAULT_MAX_BATCH_TOKENS_CUDA if on_cuda else DEFAULT_MAX_BATCH_TOKENS_CPU
        self.max_batch_tokens = max_batch_tokens or default_budget
        self.max_batch_rows = max_batch_rows
        if self.max_batch_tokens < 1 or self.max_batch_rows < 1:
            raise ConfigError(
                f"max_batch_tokens={max_batch_tokens} and max_batch_rows={max_batch_rows} "
                "must be positive"
            )
        offline = env_offline() if local_files_only is None else local_files_only
        self._tokenizer, self._model = self._load(offline, load_model=load_model)
        self._eot_id = self._end_of_text_id()
        self._pad_id = self._tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self._eot_id

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec this encoder follows."""
        return self._spec

    # -- loading -------------------------------------------------------------------------

    def _resolve_device(self, device: str) -> Any:
        torch = self._torch
        if device == Device.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"device={device!r} is not a valid torch device") from e
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} was asked for but CUDA is not available here")
        return resolved

    def _resolve_dtype(self, precision: Precision, on_cuda: bool) -> Any:
        torch = self._torch
        if precision == Precision.AUTO:
            # fp16 overflows to NaN on some inputs; bf16 has fp32's range.
            return torch.bfloat16 if on_cuda else torch.float32
        return getattr(torch, precision.value)

    def _resolve_attention(self, attention: Attention, on_cuda: bool) -> str:
        # transformers with the `kernels` package would download a flash-attention kernel from
        # the hub when flash_attn is missing; only ever ask for it when the package imports.
        has_flash = on_cuda and importlib.util.find_spec("flash_attn") is not None
        if attention == Attention.AUTO:
            return Attention.FLASH_ATTENTION_2.value if has_flash else Attention.SDPA.value
        if attention == Attention.FLASH_ATTENTION_2 and not has_flash:
            raise ConfigError(
                "attention='flash_attention_2' needs CUDA and the flash_attn package; "
                "install flash-attn or use attention='sdpa'"
            )
        return attention.value

    def _load(self, local_files_only: bool, *, load_model: bool) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        spec = self._spec
        common: dict[str, Any] = {
            "revision": spec.revision,
            "local_files_only": local_files_only,
            "trust_remote_code": False,
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.model, padding_side="left", **common)
            if not load_model:
                return tokenizer, None
            model = AutoModel.from_pretrained(
                spec.model,
                dtype=self.dtype,
                attn_implementation=self.attention,
                use_safetensors=True,
                **common,
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"could not load model {spec.model!r} (revision {spec.revision!r}): {e}. "
                "If this machine cannot reach the hub, download the checkpoint elsewhere "
                "(safetensors) and set the model (QWEN3_PIPELINE_MODEL / --model) to its "
                "local directory."
            ) from e
        if getattr(model.config, "model_type", None) != "qwen3":
            logger.warning(
                "model %s has model_type=%r, not 'qwen3'; last-token pooling may not fit it",
                spec.model,
                getattr(model.config, "model_type", None),
            )
        model.to(self.device)
        model.eval()
        return tokenizer, model

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
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

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
        ids, truncated = self.tokenize(texts)
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        dim = self._spec.output_dim
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        failures: dict[int, str] = {}
        counters = {"batches": 0, "padded": 0}
        batches = plan_batches(
            lengths, max_batch_tokens=self.max_batch_tokens, max_batch_rows=self.max_batch_rows
        )
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

    def _run_batch(
        self,
        ids: list[list[int]],
        lengths: np.ndarray,
        batch: np.ndarray,
        vectors: np.ndarray,
        failures: dict[int, str],
        counters: dict[str, int],
    ) -> None:
        torch = self._torch
        try:
            counters["batches"] += 1
            vectors[batch] = self._forward([ids[i] for i in batch])
            counters["padded"] += padded_positions(lengths, batch)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch.size == 1:
                row = int(batch[0])
                failures[row] = f"out of memory for a single row of {int(lengths[row])} tokens"
                logger.error("row %d (%d tokens) failed: out of memory", row, lengths[row])
                return
            logger.warning("out of memory on %d rows; splitting the batch and retrying", batch.size)
            for half in split_batch(batch):
                self._run_batch(ids, lengths, half, vectors, failures, counters)

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        torch = self._torch
        input_ids, attention_mask = left_pad(sequences, self._pad_id)
        ids_t = torch.from_numpy(input_ids).to(self.device)
        inputs: dict[str, Any] = {"input_ids": ids_t, "use_cache": False}
        if not attention_mask.all():
            mask_t = torch.from_numpy(attention_mask).to(self.device)
            inputs["attention_mask"] = mask_t
            # Positions count real tokens only, as if each row ran alone (RoPE makes this exact).
            inputs["position_ids"] = (mask_t.cumsum(-1) - 1).clamp(min=0)
        # else: a batch of equal lengths (common after sorting) needs no mask, which lets SDPA
        # take its fused causal kernel instead of materialising a padding mask.
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
        failures: dict[int, str],
        counters: dict[str, int],
    ) -> None:
        bad = [
            int(i) for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if i not in failures
        ]
        if not bad:
            return
        torch = self._torch
        original = self._model.dtype
        logger.warning("%d row(s) gave non-finite vectors; recomputing them in float32", len(bad))
        if original != torch.float32:
            self._model.float()
        try:
            for row in bad:
                counters["batches"] += 1
                counters["padded"] += int(lengths[row])
                vector = self._forward([ids[row]])[0]
                if np.isfinite(vector).all():
                    vectors[row] = vector
                else:
                    failures[row] = "non-finite vector, also in float32"
                    logger.error("row %d gave a non-finite vector even in float32", row)
        finally:
            if original != torch.float32:
                # bf16 -> fp32 -> bf16 is exact, so the model is unchanged afterwards.
                self._model.to(original)
