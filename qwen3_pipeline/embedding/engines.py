"""Choose where embeddings are computed: one model in this process, or a pool of Ray actors.

:class:`EngineOptions` is the one set of engine settings every driver accepts (the CLI's
``--engine/--workers/--ray-address/--gpus-per-worker``, the Dagster resources, the Airflow
operator), and :func:`open_embedder` builds the matching
:class:`~qwen3_pipeline.embedding.interface.Embedder` and releases it afterwards. The embedder
is the Qwen3 encoder unless ``embedder_factory`` names another
(:mod:`qwen3_pipeline.embedding.factory`), on either engine.

Example:
    >>> options = EngineOptions(engine="local", device="cpu")
    >>> with open_embedder(spec, options) as embedder:  # doctest: +SKIP
    ...     refresh(source=..., config=..., embedder=embedder, db_uri=..., table=...)
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.factory import build_embedder_with, import_embedder_factory
from qwen3_pipeline.embedding.interface import Embedder
from qwen3_pipeline.embedding.options import EncoderOptions

Engine = Literal["local", "ray"]
ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Where and how to run the model.

    Attributes:
        engine: ``local`` (one model in this process) or ``ray`` (``workers`` actors).
        workers: Ray actors, one model each (``ray`` only).
        ray_address: Cluster to join (``ray://head:10001``, ``auto``); None starts a local
            Ray instance for the call and stops it after.
        gpus_per_worker: GPUs per Ray actor (0: CPU actors).
        device: Torch device of each model (``auto``: the GPU when there is one).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2``.
        max_batch_tokens: Token budget per forward pass (None: 16384 on CUDA, 4096 on CPU).
        max_batch_rows: Most rows per forward pass.
        embedder_factory: ``MODULE:CALLABLE`` building the embedder from the spec instead of
            the Qwen3 encoder (another backend: a TEI/vLLM client, a quantised model), in this
            process or in each Ray actor; it is imported here, so a bad reference fails at
            once. The device, dtype, attention and batch settings are the Qwen3 encoder's and
            do not reach a factory.
    """

    engine: Engine = "local"
    workers: int = 1
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    max_batch_tokens: int | None = None
    max_batch_rows: int = 256
    embedder_factory: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.engine == "local" and (self.workers != 1 or self.ray_address):
            raise ConfigError(
                f"workers={self.workers} and ray_address={self.ray_address!r} need engine='ray' "
                "(the local engine is one model in this process)"
            )
        if self.embedder_factory is not None:
            # Imported where the settings are read, so a typo fails before any model loads or
            # any Ray actor starts (the actors import it again).
            import_embedder_factory(self.embedder_factory)

    @property
    def encoder_options(self) -> EncoderOptions:
        """The settings of each encoder (the local one, or every Ray actor's)."""
        return EncoderOptions.of(self)


def build_embedder(
    spec: EmbeddingSpec, options: EngineOptions, *, progress: bool = True
) -> Embedder:
    """Build the embedder ``options`` describe (loads the model for the local engine).

    The Ray engine starts its actors (and a local Ray instance when no address is given) on
    its first embed call; close it with ``close()`` (or use :func:`open_embedder`).

    Raises:
        ConfigError: Ray is not installed, a setting is invalid, or the local
            ``embedder_factory`` built an embedder for another spec.
        ModelLoadError: The local model cannot be loaded.
    """
    if options.engine == "ray":
        from qwen3_pipeline.embedding.ray_pool import RayEmbedder

        return RayEmbedder(
            spec,
            workers=options.workers,
            gpus_per_worker=options.gpus_per_worker,
            address=options.ray_address,
            options=options.encoder_options,
            embedder_factory=options.embedder_factory,
        )
    if options.embedder_factory is not None:
        factory = import_embedder_factory(options.embedder_factory)
        return build_embedder_with(factory, spec, name=options.embedder_factory)
    return options.encoder_options.build(spec, progress=progress)


@contextmanager
def open_embedder(
    spec: EmbeddingSpec, options: EngineOptions, *, progress: bool = True
) -> Iterator[Embedder]:
    """Build the embedder ``options`` describe and release it (model, actors, Ray) on exit."""
    embedder = build_embedder(spec, options, progress=progress)
    try:
        yield embedder
    finally:
        close = getattr(embedder, "close", None)
        if close is not None:
            close()
