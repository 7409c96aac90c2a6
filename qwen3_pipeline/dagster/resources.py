"""Dagster resources: the Qwen3 embedder (real and fake) and the LanceDB database.

The embedder resources *are* :class:`qwen3_pipeline.embedding.interface.Embedder`
implementations: an asset passes the resource straight to the refresh engine. Each holds a
:class:`~qwen3_pipeline.embedding.lazy.LazyEmbedder` (created in ``setup_for_execution``, or on
first use outside a run, and closed in ``teardown_after_execution``), the same lazy loader the
CLI and the Airflow operator use: the model loads at most once per run process, on the first
embed call (a run with nothing to embed never loads it; its plan counts tokens with the
tokenizer alone), and is freed at teardown; torch is imported only then, so loading the code
location never imports it. A resource only says what to build
(:meth:`EmbedderResource.load_embedder`, :meth:`EmbedderResource.engine_options`).

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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError
from qwen3_pipeline.core.spec import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_QUERY_TASK,
    MAX_CONTEXT,
    MIN_DIM,
    EmbeddingSpec,
)
from qwen3_pipeline.dagster.accelerator import AcceleratorSettings
from qwen3_pipeline.embedding.engines import EngineOptions, build_embedder
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult, TokenCounter
from qwen3_pipeline.embedding.lazy import LazyEmbedder

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
_URI_SCHEME_SEP = "://"


HOW_TO_FIX_MODEL = (
    "Set the model (QWEN3_PIPELINE_MODEL, or the embedder resource's `model`) to a local "
    "Qwen3-Embedding checkpoint directory (config.json, tokenizer files, *.safetensors), or "
    "make the hub id reachable (network access, HF_HUB_OFFLINE unset)."
)


class EmbedderLoadFailure(dg.Failure):
    """The embedder could not be built: unknown model, missing checkpoint, bad settings.

    Not retried: the same settings fail the same way. A load error's description says how to
    point the model setting at a local checkpoint; a settings error (a ``ConfigError``, e.g. a
    ``dim`` above the model's hidden size) says only what is wrong with the setting.
    """

    def __init__(self, error: Qwen3PipelineError, model: str) -> None:
        hint = "" if isinstance(error, ConfigError) else f" -- {HOW_TO_FIX_MODEL}"
        super().__init__(
            description=f"{error}{hint}",
            metadata={"error": type(error).__name__, "model": model},
            allow_retries=False,
        )


class EmbedderResource(dg.ConfigurableResource):
    """Base of the embedder resources: the document-side spec settings and the Embedder API.

    A subclass implements :meth:`load_embedder` (and :meth:`engine_options` when it is not one
    local model); loading on first use, counting tokens without the model, the engine facts
    and closing are the :class:`~qwen3_pipeline.embedding.lazy.LazyEmbedder`'s it holds. Assets
    type their parameter (or look up their resource key) as this base class, so a test binds
    :class:`FakeEmbedderResource` where production binds :class:`Qwen3EmbedderResource`.
    """

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Hub id (Qwen/Qwen3-Embedding-0.6B, -4B, -8B) or a local checkpoint directory.",
    )
    revision: str | None = Field(
        default=None, description="Pinned hub revision (commit hash or tag); none by default."
    )
    # Bounds Dagster's launchpad cannot check (its config schema has no numeric ranges) are
    # checked when the resource is built, before the model config is read; the upper bound of
    # `dim` (the model's hidden size) needs that config, so EmbeddingSpec checks it.
    dim: int | None = Field(
        default=None,
        ge=MIN_DIM,
        description="Matryoshka output dimension, 32..hidden size; null means the hidden size.",
    )
    max_length: int = Field(
        default=DEFAULT_MAX_LENGTH,
        ge=2,
        le=MAX_CONTEXT,
        description="Token limit per document; longer ones are truncated and flagged.",
    )
    document_prompt: str | None = Field(
        default=None, description="Text prepended to every document (none, as in the model card)."
    )
    query_task: str = Field(
        default=DEFAULT_QUERY_TASK,
        description="Instruction used for queries; changing it needs no re-embedding.",
    )

    _lazy_embedder: LazyEmbedder | None = PrivateAttr(default=None)
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

    def engine_options(self) -> EngineOptions:
        """Where the embedder runs (the report's engine and workers); one local model here."""
        return EngineOptions()

    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        """Build the embedder for ``spec`` (subclasses load their model here)."""
        raise NotImplementedError

    def load_token_counter(self, spec: EmbeddingSpec) -> TokenCounter | None:
        """Build a token counter for ``spec`` that needs no model, or None for the engine's.

        None (the default) lets :meth:`LazyEmbedder.token_counter` count with the model's
        tokenizer alone.
        """
        return None

    def lazy_embedder(self) -> LazyEmbedder:
        """The lazy loader of this run process, created on first use.

        Raises:
            EmbedderLoadFailure: The settings are invalid or the model's config cannot be read
                (not retried).
        """
        if self._lazy_embedder is None:
            try:
                self._lazy_embedder = LazyEmbedder(
                    self.embedding_spec(),
                    self.engine_options(),
                    build=self.load_embedder,
                    count_tokens=self.load_token_counter,
                )
            except Qwen3PipelineError as e:
                raise EmbedderLoadFailure(e, self.model) from e
        return self._lazy_embedder

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Validate the settings for this run process; the model itself loads on first use.

        Loading lazily means a run that has nothing to embed (a no-op refresh, checks run on
        their own) never loads the model or takes accelerator memory.

        Raises:
            EmbedderLoadFailure: The settings are invalid or the model's config cannot be read
                (not retried).
        """
        self.lazy_embedder()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Release the model (and accelerator memory) at the end of the run process."""
        lazy, self._lazy_embedder = self._lazy_embedder, None
        if lazy is not None:
            lazy.close()

    def get_embedder(self) -> Embedder:
        """Return the embedder, loading it on first use (once per run process).

        Raises:
            EmbedderLoadFailure: The model cannot be found or loaded, or the settings are
                invalid (not retried).
        """
        lazy = self.lazy_embedder()
        try:
            return lazy.get_embedder()
        except Qwen3PipelineError as e:
            raise EmbedderLoadFailure(e, self.model) from e

    def start(self) -> None:
        """Load the model (or start the Ray workers) now; a refresh does so before writing.

        Raises:
            EmbedderLoadFailure: The model cannot be found or loaded, or the settings are
                invalid (not retried).
        """
        try:
            self.lazy_embedder().start()
        except Qwen3PipelineError as e:
            raise EmbedderLoadFailure(e, self.model) from e

    def token_counter(self) -> TokenCounter | None:
        """Return a document token counter that needs no model (for exact plan totals)."""
        lazy = self.lazy_embedder()
        try:
            return lazy.token_counter()
        except Qwen3PipelineError as e:
            raise EmbedderLoadFailure(e, self.model) from e

    def engine_info(self) -> dict[str, Any]:
        """The engine facts; ``model_loads`` is 0 while nothing was loaded."""
        return self.lazy_embedder().engine_info()

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded in this process."""
        return self._lazy_embedder is not None and self._lazy_embedder.loaded

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the vectors follow (the :class:`Embedder` interface)."""
        return self.embedding_spec()

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents (the :class:`Embedder` interface); loads the model on first use."""
        self.get_embedder()  # a load failure is an EmbedderLoadFailure, not an embed error
        return self.lazy_embedder().embed_documents(texts, on_batch=on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries in the spec's instruction format (the :class:`Embedder` interface)."""
        return self.get_embedder().embed_queries(queries)


class Qwen3EmbedderResource(EmbedderResource, AcceleratorSettings):
    """The Qwen3-Embedding model on this run's accelerator, loaded once per run process.

    Builds :class:`qwen3_pipeline.embedding.encoder.Qwen3Encoder` on the first embed call of the
    run process (torch is imported only then) and releases it, freeing accelerator memory, in
    ``teardown_after_execution``.

    Example:
        >>> import dagster as dg
        >>> embedder = Qwen3EmbedderResource(
        ...     model=dg.EnvVar("QWEN3_PIPELINE_MODEL"), dim=512, device="cuda"
        ... )
    """

    embedder_factory: str | None = Field(
        default=None,
        description=(
            "MODULE:CALLABLE building the embedder from the spec instead of the Qwen3 encoder "
            "(a TEI/vLLM client, a quantised model); in the run's process, or in each Ray "
            "actor. Imported at set-up; must be installed on every Ray node."
        ),
    )

    def engine_options(self) -> EngineOptions:
        """The engine settings of this resource (one model in the run's process)."""
        return EngineOptions(**self.encoder_kwargs(), embedder_factory=self.embedder_factory)

    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        """Load the Qwen3 encoder (imports torch), or the engine ``engine_options`` names.

        Raises:
            ModelLoadError: The checkpoint or tokenizer cannot be loaded.
            ConfigError: An unavailable device or attention kernel.
        """
        return build_embedder(spec, self.engine_options(), progress=False)


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
