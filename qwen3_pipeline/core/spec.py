"""The embedding specification: which model, how it is run, and what it outputs.

An :class:`EmbeddingSpec` is validated when it is built: the output dimension is checked against
the hidden size of the model (read from its ``config.json``), so a bad value fails before any
model is loaded or any row is written. Its :attr:`EmbeddingSpec.fingerprint` identifies the
*document side* of the spec: two specs with the same fingerprint produce interchangeable
document vectors. The query task is deliberately not part of it: changing the query
instruction needs no re-embedding of documents.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen3_pipeline.core.errors import ConfigError, InvalidDimensionError, ModelLoadError

MIN_DIM = 32
MAX_CONTEXT = 32768
DEFAULT_MAX_LENGTH = 8192
DEFAULT_QUERY_TASK = "Given a web search query, retrieve relevant passages that answer the query"
POOLING = "last_token"
# Bump when the meaning of a fingerprinted field changes, so old tables are re-embedded.
FINGERPRINT_VERSION = 1

# Hidden sizes of the published checkpoints, so the default model validates offline and
# without a download. Anything else is read from the checkpoint's config.json.
KNOWN_HIDDEN_SIZES: dict[str, int] = {
    "Qwen/Qwen3-Embedding-0.6B": 1024,
    "Qwen/Qwen3-Embedding-4B": 2560,
    "Qwen/Qwen3-Embedding-8B": 4096,
}


def resolve_hidden_size(model: str, revision: str | None = None) -> int:
    """Return the hidden size of ``model`` (the largest valid output dimension).

    Args:
        model: A hub id (``Qwen/Qwen3-Embedding-0.6B``) or a local checkpoint directory.
        revision: Optional hub revision, used only when the config must be fetched.

    Returns:
        The model's ``hidden_size``.

    Raises:
        ModelLoadError: The model directory has no readable config, or the hub config could not
            be fetched (offline, unknown id).
    """
    local = Path(model).expanduser()
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(
                f"model directory {str(local)!r} has no config.json; point --model at a "
                "Qwen3-Embedding checkpoint directory (with config.json, tokenizer and "
                "*.safetensors) or at a hub id such as 'Qwen/Qwen3-Embedding-0.6B'"
            )
        return _hidden_size_from_config(json.loads(config_path.read_text()), str(config_path))
    if model in KNOWN_HIDDEN_SIZES:
        return KNOWN_HIDDEN_SIZES[model]
    if _looks_like_path(model):
        raise ModelLoadError(
            f"model path {model!r} does not exist; point it at a local checkpoint directory "
            "or use a hub id such as 'Qwen/Qwen3-Embedding-0.6B'"
        )
    try:
        from huggingface_hub import hf_hub_download

        hub_config = hf_hub_download(
            model,
            "config.json",
            revision=revision,
            local_files_only=_env_offline(),
        )
    except Exception as e:  # the hub client raises many unrelated types; all mean "not found"
        raise ModelLoadError(
            f"could not read the config of model {model!r} ({type(e).__name__}: {e}). "
            "If this machine is offline, download the checkpoint elsewhere and point the model "
            "setting (QWEN3_PIPELINE_MODEL / --model) at the local directory."
        ) from e
    return _hidden_size_from_config(json.loads(Path(hub_config).read_text()), hub_config)


def _hidden_size_from_config(config: dict[str, Any], where: str) -> int:
    hidden = config.get("hidden_size")
    if not isinstance(hidden, int) or hidden < MIN_DIM:
        raise ModelLoadError(f"{where} has no usable hidden_size (found {hidden!r})")
    return hidden


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, kw_only=True)
class EmbeddingSpec:
    r"""What to embed with and what comes out; validated at construction.

    Args:
        model: Hub id (``Qwen/Qwen3-Embedding-0.6B``) or local checkpoint directory.
        revision: Optional pinned hub revision (commit hash or tag).
        dim: Matryoshka output dimension, ``32 <= dim <= hidden_size``; ``None`` means the full
            hidden size. Always an ``int`` after construction.
        max_length: Token limit per text, ``<|endoftext|>`` included; longer texts are
            truncated and flagged. At most 32768.
        document_prompt: Optional text prepended to every document (none by default, as in the
            model card).
        query_task: Instruction used for queries (``Instruct: {task}\nQuery:{query}``). Not
            part of the fingerprint.
        normalize: L2-normalise the output vectors (after the Matryoshka truncation).
        hidden_size: Filled in from the model's config when ``None``.
        chunking: For a table of document chunks, the chunking settings as canonical JSON
            (``ChunkingConfig.as_json()``; see :meth:`with_chunking`). Part of the
            fingerprint when set: other chunking settings make other vectors.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
        >>> spec.dim, spec.hidden_size
        (256, 1024)
    """

    model: str
    revision: str | None = None
    dim: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    document_prompt: str | None = None
    query_task: str = DEFAULT_QUERY_TASK
    normalize: bool = True
    hidden_size: int | None = field(default=None, compare=False)
    chunking: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a hub id or a directory, got {self.model!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ConfigError(f"max_length must be an integer, got {self.max_length!r}")
        if not 2 <= self.max_length <= MAX_CONTEXT:
            raise ConfigError(
                f"max_length={self.max_length} is outside 2..{MAX_CONTEXT} "
                "(Qwen3-Embedding's context is 32k tokens)"
            )
        if not self.query_task.strip():
            raise ConfigError("query_task must be a non-empty instruction")
        hidden = self.hidden_size or resolve_hidden_size(self.model, self.revision)
        object.__setattr__(self, "hidden_size", hidden)
        dim = hidden if self.dim is None else self.dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not MIN_DIM <= dim <= hidden:
            raise InvalidDimensionError(
                f"dim={self.dim!r} is invalid for {self.model}: choose an integer from "
                f"{MIN_DIM} to {hidden} (the model's hidden size), or leave it unset for {hidden}"
            )
        object.__setattr__(self, "dim", dim)

    @property
    def output_dim(self) -> int:
        """The output dimension as a plain ``int`` (``dim`` is always set after validation)."""
        assert self.dim is not None
        return self.dim

    def document_side(self) -> dict[str, Any]:
        """Return the fields that decide document vectors (what the fingerprint hashes)."""
        return {
            "fingerprint_version": FINGERPRINT_VERSION,
            "model": self.model,
            "revision": self.revision,
            "dim": self.dim,
            "max_length": self.max_length,
            "document_prompt": self.document_prompt,
            "normalize": self.normalize,
            "pooling": POOLING,
            # Only when set, so the fingerprints of row tables stay what they were.
            **({"chunking": self.chunking} if self.chunking is not None else {}),
        }

    @property
    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of the document side of the spec."""
        payload = json.dumps(self.document_side(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def with_chunking(self, chunking: str | None) -> "EmbeddingSpec":
        """This spec for a table whose rows are chunks cut with ``chunking`` (JSON), or rows.

        Example:
            >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
            >>> chunked = spec.with_chunking('{"tokens":256}')
            >>> chunked.fingerprint != spec.fingerprint, chunked.with_chunking(None) == spec
            (True, True)
        """
        return replace(self, chunking=chunking)

    def format_query(self, query: str) -> str:
        """Return ``query`` in the model card's instruction format."""
        return f"Instruct: {self.query_task}\nQuery:{query}"

    def format_document(self, text: str) -> str:
        """Return ``text`` with the optional document prompt prepended."""
        return f"{self.document_prompt}{text}" if self.document_prompt else text

    def to_json(self) -> str:
        """Serialise the whole spec (for table metadata)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, payload: str) -> "EmbeddingSpec":
        """Rebuild a spec serialised with :meth:`to_json` (no config lookup needed)."""
        return cls(**json.loads(payload))
