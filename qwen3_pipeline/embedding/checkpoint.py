"""Running a Qwen3 checkpoint with torch: where, in what precision, loaded how, fed how.

What the embedding encoder (:mod:`qwen3_pipeline.embedding.encoder`) and the reranker
(:mod:`qwen3_pipeline.embedding.reranker`) share, so the two models are placed, loaded and fed
alike:

- :class:`PlacedModel` (the base of both) and :func:`resolve_placement`: the torch device,
  dtype (bf16 on CUDA, fp32 on CPU) and attention kernel (flash-attention-2 only when
  ``flash_attn`` imports on CUDA, never fetched from the hub), each refused with a
  :class:`~qwen3_pipeline.core.errors.ConfigError` when unusable, and the token budget of a
  forward pass;
- :func:`load_tokenizer`, :func:`load_weights` (both: :func:`load_pretrained`): the tokenizer
  (left padding) and the model with transformers 5 ``dtype=``, safetensors only, never remote
  code, an optional pinned revision, local files only when offline;
- :func:`padded_inputs`: a left-padded batch whose positions count real tokens only, as if
  each row ran alone;
- :func:`run_halving_on_oom`: run a batch, and on CUDA out-of-memory split it in halves down
  to one row;
- :func:`in_float32`: run with the weights upcast to float32 (for rows that gave non-finite
  output in bf16);
- :func:`call_stats`: the counters of one call (rows, real and padded tokens, batches...).

torch and transformers are imported inside the functions (and when a model is built), never
with this module.
"""

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from qwen3_pipeline.core.errors import ConfigError, ModelLoadError
from qwen3_pipeline.embedding.batching import left_pad, split_batch
from qwen3_pipeline.embedding.interface import EncodeStats

logger = logging.getLogger("qwen3_pipeline")

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


def parse_choice(enum: type[StrEnum], value: str, name: str) -> Any:
    """Return ``enum(value)``, or a :class:`ConfigError` listing the choices.

    Example:
        >>> parse_choice(Precision, "bfloat16", "dtype")
        <Precision.BFLOAT16: 'bfloat16'>
    """
    try:
        return enum(value)
    except ValueError as e:
        choices = ", ".join(m.value for m in enum)
        raise ConfigError(f"{name}={value!r} is not one of: {choices}") from e


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs, resolved from the user's ``auto``/named choices.

    Attributes:
        device: The ``torch.device``.
        dtype: The ``torch.dtype`` of the weights.
        attention: The transformers ``attn_implementation``.
    """

    device: Any
    dtype: Any
    attention: str

    @property
    def on_cuda(self) -> bool:
        """Whether the model runs on a CUDA device."""
        return bool(self.device.type == "cuda")

    def default_batch_tokens(self) -> int:
        """The default token budget per forward pass: 16384 on CUDA, 4096 on CPU."""
        return DEFAULT_MAX_BATCH_TOKENS_CUDA if self.on_cuda else DEFAULT_MAX_BATCH_TOKENS_CPU


class PlacedModel:
    """What the encoder and the reranker share: a device, a precision and a batch budget.

    A base class only: it resolves the placement (:func:`resolve_placement`) and the token
    budget of one forward pass; the subclass loads its checkpoint with :attr:`placement`.

    Attributes:
        placement: The resolved device, dtype and attention kernel.
        device: ``placement.device``.
        dtype: ``placement.dtype``.
        attention: ``placement.attention``.
        max_batch_tokens: Budget per forward pass counting padding (``rows * longest``).
        max_batch_rows: Cap on rows per forward pass.
        last_stats: Counters of the last call (None before the first).

    Raises:
        ConfigError: An unknown or unavailable device, dtype or attention kernel, or a batch
            budget or row cap below 1.
    """

    def __init__(
        self,
        device: str,
        dtype: str,
        attention: str,
        max_batch_tokens: int | None,
        max_batch_rows: int,
    ) -> None:
        import torch

        self._torch = torch
        self.last_stats: EncodeStats | None = None
        self.placement = resolve_placement(device, dtype, attention)
        self.device = self.placement.device
        self.dtype = self.placement.dtype
        self.attention = self.placement.attention
        self.max_batch_tokens = max_batch_tokens or self.placement.default_batch_tokens()
        self.max_batch_rows = max_batch_rows
        if self.max_batch_tokens < 1 or self.max_batch_rows < 1:
            raise ConfigError(
                f"max_batch_tokens={max_batch_tokens} and max_batch_rows={max_batch_rows} "
                "must be positive"
            )


def resolve_placement(device: str, dtype: str, attention: str) -> Placement:
    """Resolve ``auto`` and check the device, dtype and attention kernel (imports torch).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2``.

    Raises:
        ConfigError: An unknown or unavailable device, dtype or attention kernel.
    """
    import torch

    resolved = _resolve_device(torch, device)
    on_cuda = resolved.type == "cuda"
    precision = parse_choice(Precision, dtype, "dtype")
    if precision == Precision.AUTO:
        # fp16 overflows to NaN on some inputs; bf16 has fp32's range.
        torch_dtype = torch.bfloat16 if on_cuda else torch.float32
    else:
        torch_dtype = getattr(torch, precision.value)
    kernel = _resolve_attention(parse_choice(Attention, attention, "attention"), on_cuda)
    return Placement(device=resolved, dtype=torch_dtype, attention=kernel)


def _resolve_device(torch: Any, device: str) -> Any:
    if device == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a valid torch device") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available here")
    return resolved


def _resolve_attention(attention: Attention, on_cuda: bool) -> str:
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


def load_pretrained(
    model: str,
    *,
    revision: str | None,
    placement: Placement,
    local_files_only: bool,
    load_model: bool = True,
) -> tuple[Any, Any]:
    """Load a Qwen3-Embedding checkpoint's tokenizer and bare backbone (``AutoModel``).

    Args:
        model: Hub id or local checkpoint directory.
        revision: Pinned hub revision, or None.
        placement: Device, dtype and attention kernel (see :func:`resolve_placement`).
        local_files_only: Never contact the hub.
        load_model: ``False`` loads the tokenizer alone (the model is then None).

    Returns:
        ``(tokenizer, model)``.

    Raises:
        ModelLoadError: The checkpoint or tokenizer cannot be found or loaded.
    """
    tokenizer = load_tokenizer(model, revision=revision, local_files_only=local_files_only)
    if not load_model:
        return tokenizer, None
    # Not overlapped with the weights in a thread: on this project's 2-core test machine the
    # tokenizer's parse slowed the imports beside it by as much as it saved (measured), and
    # transformers' lazy module is not safe to import from two threads at once.
    weights = load_weights(
        model, revision=revision, placement=placement, local_files_only=local_files_only
    )
    return tokenizer, weights


def load_tokenizer(
    model: str,
    *,
    revision: str | None,
    local_files_only: bool,
    setting_hint: str = "QWEN3_PIPELINE_MODEL / --model",
) -> Any:
    """Load a checkpoint's tokenizer (never remote code).

    Its ``tokenizer.json`` through :class:`CheckpointTokenizer` (no transformers import);
    a checkpoint without one through transformers' ``AutoTokenizer``, padding on the left.

    Args:
        model: Hub id or local checkpoint directory.
        revision: Pinned hub revision, or None.
        local_files_only: Never contact the hub.
        setting_hint: Which setting names the model, for the error message.

    Raises:
        ModelLoadError: The tokenizer cannot be found or loaded.
    """
    tokenizer = load_tokenizer_file(
        model, revision=revision, local_files_only=local_files_only, setting_hint=setting_hint
    )
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            model,
            padding_side="left",
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as e:
        raise _load_error(e, model, revision, setting_hint) from e


def load_tokenizer_file(
    model: str,
    *,
    revision: str | None,
    local_files_only: bool,
    setting_hint: str = "QWEN3_PIPELINE_MODEL / --model",
) -> "CheckpointTokenizer | None":
    """The checkpoint's ``tokenizer.json`` as a :class:`CheckpointTokenizer`, or None without one.

    Raises:
        ModelLoadError: The checkpoint cannot be found, or its tokenizer files not parsed.
    """
    try:
        files = _tokenizer_files(model, revision, local_files_only)
        if files is None:
            return None
        return CheckpointTokenizer.from_files(*files)
    except ModelLoadError:
        raise
    except Exception as e:
        # tokenizers reports a file it cannot parse as a bare Exception; the hub, as OSError.
        raise _load_error(e, model, revision, setting_hint) from e


def _tokenizer_files(
    model: str, revision: str | None, local_files_only: bool
) -> tuple[str, str | None] | None:
    """Paths of ``tokenizer.json`` and ``tokenizer_config.json`` (None: no tokenizer.json)."""
    if os.path.isdir(model):
        found = [os.path.join(model, name) for name in _TOKENIZER_FILES]
        if not os.path.isfile(found[0]):
            return None
        return found[0], found[1] if os.path.isfile(found[1]) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        tokenizer_json = hf_hub_download(
            model, _TOKENIZER_FILES[0], revision=revision, local_files_only=local_files_only
        )
    except EntryNotFoundError:
        # Not in the repository, or (offline) not in the cache: transformers' tokenizer classes
        # decide, and report a checkpoint that is not there as before.
        return None
    try:
        config_json: str | None = hf_hub_download(
            model, _TOKENIZER_FILES[1], revision=revision, local_files_only=local_files_only
        )
    except EntryNotFoundError:  # not in the repository (or, offline, not in the cache)
        config_json = None
    return tokenizer_json, config_json


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointTokenizer:
    """A checkpoint's ``tokenizer.json`` through the Rust ``tokenizers`` library.

    The ids are those of transformers' fast tokenizer built from the same file (it wraps
    this library); the special tokens come from ``tokenizer_config.json``. Loading it does
    not import transformers, so whatever needs the tokenizer alone (a dry run's token
    counts, the Ray driver's blocks, the Dagster resources' token counter) starts about a
    second sooner. Offers the part of transformers' tokenizer API the encoder and reranker
    use.

    Args:
        tokenizer: The parsed ``tokenizers.Tokenizer``.
        special: ``pad_token``, ``eos_token`` and ``unk_token`` as named by the config
            (None where it names none).

    Example:
        >>> tokenizer = load_tokenizer("Qwen/Qwen3-Embedding-0.6B", revision=None,
        ...                            local_files_only=True)  # doctest: +SKIP
        >>> tokenizer(["What is BM25?"], add_special_tokens=False)["input_ids"]  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, special: Mapping[str, str | None]) -> None:
        self._tokenizer = tokenizer
        self.pad_token_id = self.convert_tokens_to_ids(special.get("pad_token"))
        self.eos_token_id = self.convert_tokens_to_ids(special.get("eos_token"))
        self.unk_token_id = self.convert_tokens_to_ids(special.get("unk_token"))

    @classmethod
    def from_files(cls, tokenizer_json: str, config_json: str | None) -> "CheckpointTokenizer":
        """Parse ``tokenizer.json`` (and the special tokens of ``tokenizer_config.json``)."""
        from tokenizers import Tokenizer

        config: dict[str, Any] = {}
        if config_json is not None:
            with open(config_json, encoding="utf-8") as handle:
                config = json.load(handle)
        special = {name: _token_text(config.get(name)) for name in _SPECIAL_TOKENS}
        return cls(Tokenizer.from_file(tokenizer_json), special)

    def __call__(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> dict[str, list[list[int]]]:
        """Token ids of each text, as ``{"input_ids": [...]}`` (transformers' shape)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        """The id of a token of the vocabulary (None when it has none)."""
        return None if token is None else self._tokenizer.token_to_id(token)


_SPECIAL_TOKENS = ("pad_token", "eos_token", "unk_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json names a token as a string, or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_weights(
    model: str,
    *,
    revision: str | None,
    placement: Placement,
    local_files_only: bool,
    model_class: str = "AutoModel",
    setting_hint: str = "QWEN3_PIPELINE_MODEL / --model",
    fit_note: str = "last-token pooling may not fit it",
) -> Any:
    """Load a checkpoint's weights (safetensors only, never remote code), in eval mode.

    Args:
        model: Hub id or local checkpoint directory.
        revision: Pinned hub revision, or None.
        placement: Device, dtype and attention kernel (see :func:`resolve_placement`).
        local_files_only: Never contact the hub.
        model_class: The transformers auto class: ``AutoModel`` (the bare backbone) or
            ``AutoModelForCausalLM`` (with the language-model head).
        setting_hint: Which setting names the model, for the error message.
        fit_note: What a model that is not ``qwen3`` may break, for the warning.

    Returns:
        The model, on ``placement.device``.

    Raises:
        ModelLoadError: The checkpoint cannot be found or loaded.
    """
    try:
        loaded = _model_class(model, model_class, revision, local_files_only).from_pretrained(
            model,
            dtype=placement.dtype,
            attn_implementation=placement.attention,
            use_safetensors=True,
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=False,
        )
    except (OSError, ValueError) as e:
        raise _load_error(e, model, revision, setting_hint) from e
    model_type = getattr(loaded.config, "model_type", None)
    if model_type != "qwen3":
        logger.warning("model %s has model_type=%r, not 'qwen3'; %s", model, model_type, fit_note)
    loaded.to(placement.device)
    loaded.eval()
    return loaded


# The Qwen3 class each auto class resolves to for ``model_type == "qwen3"``.
_QWEN3_CLASSES = {"AutoModel": "Qwen3Model", "AutoModelForCausalLM": "Qwen3ForCausalLM"}


def _model_class(model: str, model_class: str, revision: str | None, local_files_only: bool) -> Any:
    """The class to load ``model`` with: the Qwen3 class itself for a qwen3 checkpoint.

    ``AutoModel`` resolves a checkpoint's class through transformers' auto mappings, which
    parse the config a second time and walk the lazy module of every architecture; a qwen3
    checkpoint (every Qwen3-Embedding and Qwen3-Reranker) goes straight to
    ``transformers.models.qwen3.modeling_qwen3``. Any other ``model_type`` (or a config that
    cannot be read here: the auto class then reports it) keeps the auto class.
    """
    import transformers

    auto_class = getattr(transformers, model_class)
    qwen3_name = _QWEN3_CLASSES.get(model_class)
    if qwen3_name is None:
        return auto_class
    try:
        config = transformers.AutoConfig.from_pretrained(
            model, revision=revision, local_files_only=local_files_only, trust_remote_code=False
        )
    except (OSError, ValueError):
        return auto_class
    if getattr(config, "model_type", None) != "qwen3":
        return auto_class
    from transformers.models.qwen3 import modeling_qwen3

    return getattr(modeling_qwen3, qwen3_name)


def _load_error(
    error: Exception, model: str, revision: str | None, setting_hint: str
) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {model!r} (revision {revision!r}): {error}. "
        "If this machine cannot reach the hub, download the checkpoint elsewhere "
        f"(safetensors) and set the model ({setting_hint}) to its local directory."
    )


def free_accelerator_memory(device: Any) -> None:
    """Return cached accelerator memory to the driver (after a model was dropped)."""
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def padded_inputs(sequences: Sequence[Sequence[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """Model keyword arguments for a left-padded batch of token id sequences.

    Every row's last real token lands in the last column. Positions count real tokens only,
    as if each row ran alone (RoPE makes this exact), so a row's output does not depend on
    the batch it was put in.

    Args:
        sequences: Token ids per row (non-empty).
        pad_id: Id written into padding positions (masked out).
        device: The ``torch.device`` of the model.

    Returns:
        ``input_ids`` and ``use_cache=False``; with ``attention_mask`` and ``position_ids``
        when the rows differ in length.
    """
    import torch

    input_ids, attention_mask = left_pad(sequences, pad_id)
    ids_t = torch.from_numpy(input_ids).to(device)
    inputs: dict[str, Any] = {"input_ids": ids_t, "use_cache": False}
    if not attention_mask.all():
        mask_t = torch.from_numpy(attention_mask).to(device)
        inputs["attention_mask"] = mask_t
        inputs["position_ids"] = (mask_t.cumsum(-1) - 1).clamp(min=0)
    # else: a batch of equal lengths (common after sorting) needs no mask, which lets SDPA
    # take its fused causal kernel instead of materialising a padding mask.
    return inputs


def run_halving_on_oom(
    batch: np.ndarray, run: Callable[[np.ndarray], None], lengths: np.ndarray
) -> dict[int, str]:
    """Run ``run(batch)``; on CUDA out-of-memory, free the cache and retry it in halves.

    Halving goes down to single rows; a row that runs out of memory alone is returned as a
    failure, never dropped silently. ``run`` writes its outputs itself (at the batch's
    indices), so the rows of the halves that did run keep their results.

    Args:
        batch: Row indices of one planned batch.
        run: Runs the forward pass over some rows and stores their outputs.
        lengths: Token count per row (for the failure message).

    Returns:
        Failed rows -> why.
    """
    import torch

    try:
        run(batch)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        if batch.size == 1:
            row = int(batch[0])
            logger.error("row %d (%d tokens) failed: out of memory", row, lengths[row])
            return {row: f"out of memory for a single row of {int(lengths[row])} tokens"}
        logger.warning("out of memory on %d rows; splitting the batch and retrying", batch.size)
        failures: dict[int, str] = {}
        for half in split_batch(batch):
            failures.update(run_halving_on_oom(half, run, lengths))
        return failures
    return {}


def call_stats(
    lengths: np.ndarray,
    truncated: np.ndarray,
    counters: Mapping[str, int],
    *,
    started: float,
    failed: int,
) -> EncodeStats:
    """The counters of one call over rows of ``lengths`` tokens.

    Args:
        lengths: Tokens per row, as run (after truncation).
        truncated: Which rows were cut to ``max_length``.
        counters: ``batches`` (forward passes) and ``padded`` (positions computed).
        started: ``time.perf_counter()`` at the start of the call.
        failed: Rows that could not be run.
    """
    return EncodeStats(
        rows=len(lengths),
        real_tokens=int(lengths.sum()),
        padded_tokens=counters["padded"],
        batches=counters["batches"],
        seconds=time.perf_counter() - started,
        truncated_rows=int(truncated.sum()),
        failed_rows=failed,
    )


@contextmanager
def in_float32(model: Any) -> Iterator[None]:
    """Run the block with ``model``'s weights in float32, then restore their dtype.

    bf16 -> fp32 -> bf16 is exact, so the model is unchanged afterwards.
    """
    import torch

    original = model.dtype
    if original != torch.float32:
        model.float()
    try:
        yield
    finally:
        if original != torch.float32:
            model.to(original)
