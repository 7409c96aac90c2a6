"""Dagster resources: the Qwen3 embedder (real and fake) and the LanceDB database.

The embedder resources *are* :class:`qwen3_pipeline.embedding.interface.Embedder` implementations:
an asset
passes the resource straight to the refresh engine. The real one loads the model at most once
per run process, on the first embed call (a run with nothing to embed never loads it; its plan
counts tokens with the tokenizer alone), and frees it in ``teardown_after_execution``; torch is
imported only then, so loading the code location never imports it.

Which executor loads the model how often: resources are set up once per process that runs
steps needing them. Under the in-process executor (the demo location's choice) that is once per
run; under the multiprocess executor it is once per step process, which is still once per run
as long as only the embedding step (with its checks, computed in the same step) requires the
embedder, as in this package.

Example:
    >>> import dagster as dg
    >>> resources = {
    ...     "embedder": Qwen3EmbedderResource(model="Qwen/Qwen3-Embedding-0.6B", dim=256),
    ...     "lancedb": LanceDBResource(
    ...         uri="s3://bucket/vectors",
    ...         storage_options={"aws_secret_access_key": dg.EnvVar("AWS_SECRET_ACCESS_KEY")},
    ...     ),
    ... }
"""

# No `from __future__ import annotations`: Dagster reads the field annotations at runtime.

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from qwen3_pipeline.core.errors import Qwen3PipelineError
from qwen3_pipeline.core.spec import DEFAULT_MAX_LENGTH, DEFAULT_QUERY_TASK, EmbeddingSpec
from qwen3_pipeline.embedding.engines import EngineOptions, build_embedder
from qwen3_pipeline.embedding.interface import (
    BatchDone,
    Embedder,
    EncodeResult,
    TokenCounter,
    embed_reporting,
    engine_info,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
_URI_SCHEME_SEP = "://"


HOW_TO_FIX_MODEL = (
    "Set the model (QWEN3_PIPELINE_MODEL, or the embedder resource's `model`) to a local "
    "Qwen3-Embedding checkpoint directory (config.json, tokenizer files, *.safetensors), or "
    "make the hub id reachable (network access, HF_HUB_OFFLINE unset)."
)


class EmbedderLoadFailure(dg.Failure):
    """The embedder could not be built: unknown model, missing checkpoint, bad settings.

    Not retried: the same settings fail the same way. The description says how to point the
    model setting at a local checkpoint.
    """

    def __init__(self, error: Qwen3PipelineError, model: str) -> None:
        super().__init__(
            description=f"{error} -- {HOW_TO_FIX_MODEL}",
            metadata={"error": type(error).__name__, "model": model},
            allow_retries=False,
        )


class EmbedderResource(dg.ConfigurableResource):
    """Base of the embedder resources: the document-side spec settings and the Embedder API.

    A subclass implements :meth:`load_embedder`. Assets type their parameter (or look up their
    resource key) as this base class, so a test binds :class:`FakeEmbedderResource` where
    production binds :class:`Qwen3EmbedderResource`.
    """

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Hub id (Qwen/Qwen3-Embedding-0.6B, -4B, -8B) or a local checkpoint directory.",
    )
    revision: str | None = Field(
        default=None, description="Pinned hub revision (commit hash or tag); none by default."
    )
    dim: int | None = Field(
        default=None,
        description="Matryoshka output dimension, 32..hidden size; null means the hidden size.",
    )
    max_length: int = Field(
        default=DEFAULT_MAX_LENGTH,
        description="Token limit per document; longer ones are truncated and flagged.",
    )
    document_prompt: str | None = Field(
        default=None, description="Text prepended to every document (none, as in the model card)."
    )
    query_task: str = Field(
        default=DEFAULT_QUERY_TASK,
        description="Instruction used for queries; changing it needs no re-embedding.",
    )

    _embedder: Embedder | None = PrivateAttr(default=None)
    _token_counter: TokenCounter | None = PrivateAttr(default=None)
    _spec: EmbeddingSpec | None = PrivateAttr(default=None)

    def embedding_spec(self) -> EmbeddingSpec:
        """Return the validated :class:`EmbeddingSpec` of these settings (no model load).

        Raises:
            ConfigError: An invalid dimension or max_length.
            ModelLoadError: The model's config cannot be read.
        """
        if self._spec is None:
            self._spec = EmbeddingSpec(
                model=self.model,
                revision=self.revision,
                dim=self.dim,
                max_length=self.max_length,
                document_prompt=self.document_prompt,
                query_task=self.query_task,
            )
        return self._spec

    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        """Build the embedder for ``spec`` (subclasses load their model here)."""
        raise NotImplementedError

    def load_token_counter(self, spec: EmbeddingSpec) -> TokenCounter | None:
        """Build a token counter for ``spec`` without the model (subclasses: the tokenizer).

        None (the default) makes a refresh plan estimate its token totals instead.
        """
        return None

    def close_embedder(self, embedder: Embedder) -> None:
        """Release what :meth:`load_embedder` built (subclasses free their model here)."""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Validate the settings for this run process; the model itself loads on first use.

        Loading lazily means a run that has nothing to embed (a no-op refresh, checks run on
        their own) never loads the model or takes accelerator memory.

        Raises:
            EmbedderLoadFailure: The settings are invalid or the model's config cannot be read
                (not retried).
        """
        try:
            self.embedding_spec()
        except Qwen3PipelineError as e:
            raise EmbedderLoadFailure(e, self.model) from e

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Release the model (and accelerator memory) at the end of the run process."""
        embedder, self._embedder = self._embedder, None
        self._token_counter = None
        if embedder is not None:
            self.close_embedder(embedder)

    def get_embedder(self) -> Embedder:
        """Return the embedder, loading it on first use (once per run process).

        Raises:
            EmbedderLoadFailure: The model cannot be found or loaded, or the settings are
                invalid (not retried).
        """
        if self._embedder is None:
            started = time.perf_counter()
            try:
                self._embedder = self.load_embedder(self.embedding_spec())
            except Qwen3PipelineError as e:
                raise EmbedderLoadFailure(e, self.model) from e
            logger.info(
                "loaded embedder %s model=%s dim=%s in %.1fs",
                type(self).__name__,
                self.model,
                self.embedding_spec().dim,
                time.perf_counter() - started,
            )
        return self._embedder

    def token_counter(self) -> TokenCounter | None:
        """Return a document token counter that needs no model (for exact plan totals)."""
        if isinstance(self._embedder, TokenCounter):
            return self._embedder
        if self._token_counter is None:
            try:
                self._token_counter = self.load_token_counter(self.embedding_spec())
            except Qwen3PipelineError as e:
                raise EmbedderLoadFailure(e, self.model) from e
        return self._token_counter

    def engine_info(self) -> dict[str, Any]:
        """The loaded embedder's engine facts; ``model_loads`` is 0 while nothing was loaded."""
        if self._embedder is None:
            return {"engine": "local", "workers": 1, "model_loads": 0}
        return engine_info(self._embedder)

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded in this process."""
        return self._embedder is not None

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the vectors follow (the :class:`Embedder` interface)."""
        return self.embedding_spec()

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents (the :class:`Embedder` interface); loads the model on first use."""
        return embed_reporting(self.get_embedder(), list(texts), on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries in the spec's instruction format (the :class:`Embedder` interface)."""
        return self.get_embedder().embed_queries(queries)


class Qwen3EmbedderResource(EmbedderResource):
    """The Qwen3-Embedding model on this run's accelerator, loaded once per run process.

    Builds :class:`qwen3_pipeline.embedding.encoder.Qwen3Encoder` in ``setup_for_execution`` (torch
    is
    imported only then) and releases it, freeing accelerator memory, in
    ``teardown_after_execution``.

    Example:
        >>> import dagster as dg
        >>> embedder = Qwen3EmbedderResource(
        ...     model=dg.EnvVar("QWEN3_PIPELINE_MODEL"), dim=512, device="cuda"
        ... )
    """

    device: str = Field(
        default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto is bfloat16 on CUDA and float32 on CPU."
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="auto is flash-attention-2 when the flash_attn package imports on CUDA.",
    )
    max_batch_tokens: int | None = Field(
        default=None,
        description="Token budget per forward pass, padding included; null: 16384 CUDA, 4096 CPU.",
    )
    max_batch_rows: int = Field(default=256, description="Most rows per forward pass.")

    def engine_options(self) -> EngineOptions:
        """The engine settings of this resource (one model in the run's process)."""
        return EngineOptions(
            device=self.device,
            dtype=self.dtype,
            attention=self.attention,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_rows=self.max_batch_rows,
        )

    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        """Load the Qwen3 encoder (imports torch).

        Raises:
            ModelLoadError: The checkpoint or tokenizer cannot be loaded.
            ConfigError: An unavailable device or attention kernel.
        """
        return build_embedder(spec, self.engine_options(), progress=False)

    def load_token_counter(self, spec: EmbeddingSpec) -> TokenCounter | None:
        """Load the tokenizer alone (a second or so; no weights, no accelerator memory).

        Raises:
            ModelLoadError: The tokenizer cannot be loaded.
        """
        from qwen3_pipeline.embedding.encoder import Qwen3Encoder

        return Qwen3Encoder(spec, device="cpu", load_model=False, progress=False)

    def close_embedder(self, embedder: Embedder) -> None:
        """Free the model and the accelerator's cache."""
        close = getattr(embedder, "close", None)
        if close is not None:
            close()


class FakeEmbedderResource(EmbedderResource):
    """A model-free embedder for tests: :class:`qwen3_pipeline.testing.FakeEmbedder`.

    Vectors are deterministic unit vectors of the text; ``fail_texts`` are reported as failed
    rows. ``loads`` counts set-ups in this process, so tests can assert one load per run.

    Example:
        >>> fake = FakeEmbedderResource(dim=64)
        >>> fake.embed_documents(["hello"]).vectors.shape
        (1, 64)
    """

    fail_texts: list[str] = Field(
        default_factory=list, description="Texts reported as failed rows."
    )

    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        """Build the fake (no model)."""
        from qwen3_pipeline.testing import FakeEmbedder

        _FAKE_LOADS.append(spec.fingerprint)
        return FakeEmbedder(spec, fail_texts=self.fail_texts)

    def load_token_counter(self, spec: EmbeddingSpec) -> TokenCounter | None:
        """The fake's word counter (not counted as a load)."""
        from qwen3_pipeline.testing import FakeEmbedder

        return FakeEmbedder(spec)

    @staticmethod
    def loads() -> int:
        """How many fake embedders were built in this process."""
        return len(_FAKE_LOADS)


_FAKE_LOADS: list[str] = []


class LanceDBResource(dg.ConfigurableResource):
    """Where the vector tables live: a local directory or an object-store URI.

    A relative local path is resolved against the working directory of the process that runs
    the step. Put credentials in ``storage_options`` through ``dg.EnvVar`` so they never appear
    in the UI or in run config.

    Example:
        >>> import dagster as dg
        >>> lancedb_resource = LanceDBResource(
        ...     uri="s3://my-bucket/vectors",
        ...     storage_options={
        ...         "aws_access_key_id": dg.EnvVar("AWS_ACCESS_KEY_ID"),
        ...         "aws_secret_access_key": dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
        ...         "region": "eu-west-1",
        ...     },
        ... )
    """

    uri: str = Field(
        description="LanceDB directory (data/lancedb) or URI (s3://bucket/path, gs://, az://)."
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="Object-store options (credentials, region, endpoint); use dg.EnvVar.",
    )

    def resolved_uri(self) -> str:
        """The URI with a local path made absolute."""
        if _URI_SCHEME_SEP in self.uri:
            return self.uri
        return str(Path(self.uri).expanduser().resolve())

    def options(self) -> dict[str, str] | None:
        """``storage_options`` for LanceDB calls (None when empty)."""
        return dict(self.storage_options) or None

    def connect(self) -> Any:
        """Connect to the database (imports lancedb)."""
        import lancedb

        return lancedb.connect(self.resolved_uri(), storage_options=self.options())

    def table_exists(self, name: str) -> bool:
        """Whether table ``name`` exists in the database."""
        from qwen3_pipeline.store import list_table_names

        return name in list_table_names(self.connect())

    def open_table(self, name: str, *, version: int | None = None) -> Any:
        """Open table ``name``, checked out at ``version`` when given (read-only then)."""
        table = self.connect().open_table(name)
        if version is not None:
            table.checkout(version)
        return table


__all__ = [
    "DEFAULT_MODEL",
    "EmbedderLoadFailure",
    "EmbedderResource",
    "FakeEmbedderResource",
    "LanceDBResource",
    "Qwen3EmbedderResource",
]
