"""An embedder that loads its model on first use: a refresh with nothing to embed never loads it.

:class:`LazyEmbedder` is the one lazy loader of the package: the CLI and the Airflow operator use
it directly, and the Dagster embedder resources hold one for the life of a run process. What it
builds is :func:`qwen3_pipeline.embedding.engines.build_embedder` (the local or Ray embedder), or
the ``build`` callable it is given (a resource's own, e.g. the test fake). It implements, once:

- load on first embed: the embedder is built on the first ``embed_*`` call, at most once;
- the token counter without weights (:meth:`LazyEmbedder.token_counter`), so a refresh plan
  counts tokens exactly without loading the model;
- the engine facts of the report (:meth:`LazyEmbedder.engine_info`: engine, workers,
  model loads; 0 loads while nothing was built);
- :meth:`LazyEmbedder.close`, which frees the model or the Ray actors.

So an orchestrator task that finds nothing to change (a no-op refresh of a shard) takes no
accelerator memory and spends no time loading weights, and a task that does embed loads the
model exactly once.

Example:
    >>> from qwen3_pipeline.embedding.engines import EngineOptions
    >>> with LazyEmbedder(spec, EngineOptions(device="cpu")) as embedder:  # doctest: +SKIP
    ...     report = refresh(source=..., config=..., embedder=embedder, db_uri=..., table=...)
    >>> report.model_loads  # 0 when nothing had to be embedded  # doctest: +SKIP
"""

import logging
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.engines import EngineOptions, build_embedder
from qwen3_pipeline.embedding.interface import (
    BatchDone,
    Embedder,
    EncodeResult,
    TokenCounter,
    embed_reporting,
    engine_info,
    start_embedder,
)

logger = logging.getLogger(__name__)

EmbedderBuilder = Callable[[EmbeddingSpec], Embedder]
"""Builds the embedder of a spec (loads the model)."""

TokenCounterBuilder = Callable[[EmbeddingSpec], TokenCounter | None]
"""Builds a token counter of a spec without the model, or returns None for the engine's own."""


class LazyEmbedder:
    """The :class:`~qwen3_pipeline.embedding.interface.Embedder` of ``options``, built on first use.

    Args:
        spec: The spec the vectors follow (validated already: building it read the model's
            config, so a bad model id or dimension fails before anything else).
        options: Engine settings, as for :func:`~qwen3_pipeline.embedding.engines.open_embedder`.
        progress: Let the model report its own progress (the refresh reports it anyway).
        build: Builds the embedder on first use (default:
            :func:`~qwen3_pipeline.embedding.engines.build_embedder` of ``options``).
        count_tokens: Builds a token counter that needs no model; when it is not given or
            returns None, the engine's own is used (see :meth:`token_counter`).
    """

    def __init__(
        self,
        spec: EmbeddingSpec,
        options: EngineOptions,
        *,
        progress: bool = False,
        build: EmbedderBuilder | None = None,
        count_tokens: TokenCounterBuilder | None = None,
    ):
        self._spec = spec
        self._options = options
        self._progress = progress
        self._build = build
        self._count_tokens = count_tokens
        self._embedder: Embedder | None = None
        self._token_counter: TokenCounter | None = None

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the vectors follow."""
        return self._spec

    @property
    def loaded(self) -> bool:
        """Whether the embedder (the model, or the Ray pool) has been built."""
        return self._embedder is not None

    def get_embedder(self) -> Embedder:
        """Return the embedder, building it on first use.

        Raises:
            ModelLoadError: The checkpoint or tokenizer cannot be loaded.
            ConfigError: Ray is not installed, or a setting is invalid.
        """
        if self._embedder is None:
            started = time.perf_counter()
            if self._build is not None:
                self._embedder = self._build(self._spec)
            else:
                self._embedder = build_embedder(self._spec, self._options, progress=self._progress)
            logger.info(
                "loaded embedder for model=%s dim=%s (engine %s) in %.1fs",
                self._spec.model,
                self._spec.dim,
                self._options.engine,
                time.perf_counter() - started,
            )
        return self._embedder

    def start(self) -> None:
        """Build the embedder now (and start its workers, for Ray) rather than on first use.

        Raises:
            ModelLoadError: The checkpoint or tokenizer cannot be loaded.
            ConfigError: Ray is not installed, or a setting is invalid.
        """
        start_embedder(self.get_embedder())

    def token_counter(self) -> TokenCounter | None:
        """Count document tokens without the model, for the refresh plan's exact totals.

        The built embedder when it counts tokens itself (the local encoder), else what
        ``count_tokens`` builds, else the tokenizer alone for the local engine (a second or
        so, no weights), else what the Ray embedder hands out (building it starts no actor).

        Raises:
            ModelLoadError: The tokenizer cannot be loaded.
        """
        if isinstance(self._embedder, TokenCounter):
            return self._embedder
        if self._token_counter is None and self._count_tokens is not None:
            self._token_counter = self._count_tokens(self._spec)
        if self._token_counter is None:
            if self._options.engine == "local":
                from qwen3_pipeline.embedding.encoder import Qwen3Encoder

                self._token_counter = Qwen3Encoder(
                    self._spec, device="cpu", load_model=False, progress=False
                )
            else:
                provider = getattr(self.get_embedder(), "token_counter", None)
                counter = provider() if callable(provider) else None
                self._token_counter = counter if isinstance(counter, TokenCounter) else None
        return self._token_counter

    def engine_info(self) -> dict[str, Any]:
        """Engine facts for the refresh report; ``model_loads`` is 0 while nothing was built.

        Before the build, ``workers`` is what the options ask for (the Ray actors to start).
        """
        if self._embedder is None:
            return {
                "engine": self._options.engine,
                "workers": self._options.workers,
                "model_loads": 0,
            }
        return engine_info(self._embedder)

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents, building the embedder on first use."""
        return embed_reporting(self.get_embedder(), list(texts), on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries, building the embedder on first use."""
        return self.get_embedder().embed_queries(queries)

    def close(self) -> None:
        """Release the model (accelerator memory) or the Ray actors, if they were built."""
        embedder, self._embedder = self._embedder, None
        self._token_counter = None
        close = getattr(embedder, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LazyEmbedder":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
