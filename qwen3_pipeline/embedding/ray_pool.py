"""Embed on a pool of Ray actors: many GPUs, many machines, the same :class:`Embedder` interface.

:class:`RayEmbedder` is an :class:`~qwen3_pipeline.embedding.interface.Embedder`, so
:func:`qwen3_pipeline.engine.refresh.refresh`, the CLI and the Dagster asset use it unchanged: the
driver
reads, hashes and diffs the source as always; only the texts to embed travel to the cluster.

- **Workers.** ``workers`` long-lived actors, each holding one
  :class:`~qwen3_pipeline.embedding.encoder.Qwen3Encoder` (the model is loaded once per actor, with
  ``gpus_per_worker`` GPUs each, or none for CPU actors), or the embedder that
  ``embedder_factory`` builds from the spec (any backend; see
  :mod:`qwen3_pipeline.embedding.factory`). A factory named ``"module:callable"`` is imported
  on the driver before any actor starts; the embedder each actor builds must follow the spec.
- **Blocks.** The driver counts each text's tokens with the tokenizer alone, sorts the rows by
  length and cuts them into blocks of about ``block_tokens`` tokens (smaller when a call is too
  small to give each worker four blocks), so every block is made of
  rows of similar length and each actor still forms length-bucketed, token-budgeted batches
  inside it. Long blocks go first (the slowest work starts earliest). Each actor has at most
  two blocks in flight, so a fast actor takes more blocks than a slow one.
- **Order.** Results are put back in the caller's order whatever order blocks finish in, and
  ``on_batch`` hears of each finished block, so progress moves while the call runs.
- **Faults.** Actors are created with Ray's ``max_restarts`` and ``max_task_retries``: an
  actor that dies (OOM, node loss, SIGKILL) is restarted (its model loaded again) and its
  blocks are retried by Ray. A block that still fails after those retries is reported per row
  in ``EncodeResult.failures`` (the refresh keeps those rows' old vectors and lists them), and
  the dead actor is replaced so the pool keeps its size.

Ray is an optional extra (``pip install qwen3-pipeline[ray]``); this module imports it only when
an engine is built.

Example:
    >>> from qwen3_pipeline.core.spec import EmbeddingSpec
    >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
    >>> with RayEmbedder(spec, workers=8, gpus_per_worker=1) as embedder:  # doctest: +SKIP
    ...     report = refresh(source=..., config=..., embedder=embedder, db_uri=..., table=...)
"""

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from qwen3_pipeline.core.errors import ConfigError, EmbeddingFailedError
from qwen3_pipeline.core.failures import RowFailure
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.factory import (
    EmbedderFactory,
    build_embedder_with,
    factory_name,
    import_embedder_factory,
)
from qwen3_pipeline.embedding.interface import (
    BatchDone,
    Embedder,
    EncodeResult,
    EncodeStats,
    TokenCounter,
)
from qwen3_pipeline.embedding.options import EncoderOptions

logger = logging.getLogger("qwen3_pipeline")

DEFAULT_BLOCK_TOKENS = 65_536
DEFAULT_MAX_RESTARTS = 3
DEFAULT_MAX_TASK_RETRIES = 3
_IN_FLIGHT_PER_WORKER = 2
_BLOCKS_PER_WORKER = 4


def plan_blocks(lengths: np.ndarray, block_tokens: int) -> list[np.ndarray]:
    """Cut rows into blocks of similar length, longest first, about ``block_tokens`` each.

    Every row is in exactly one block; a row longer than ``block_tokens`` is a block alone.

    Example:
        >>> [b.tolist() for b in plan_blocks(np.array([5, 100, 7, 90, 6]), 120)]
        [[1], [3, 2, 4, 0]]
    """
    if block_tokens < 1:
        raise ConfigError(f"block_tokens must be at least 1, got {block_tokens}")
    order = np.argsort(-lengths, kind="stable")
    blocks: list[np.ndarray] = []
    start, used = 0, 0
    for position, row in enumerate(order):
        size = int(lengths[row])
        if position > start and used + size > block_tokens:
            blocks.append(order[start:position])
            start, used = position, 0
        used += size
    if start < len(order):
        blocks.append(order[start:])
    return blocks


class EncoderWorker:
    """The actor: one embedder per process, built once (again after a restart)."""

    def __init__(self, spec: EmbeddingSpec, factory: EmbedderFactory, name: str) -> None:
        self.pid = os.getpid()
        self.embedder: Embedder | None = None
        self.error: ConfigError | None = None
        try:
            self.embedder = build_embedder_with(factory, spec, name=name)
        except ConfigError as e:
            # Kept, not raised: an error raised here reaches the driver only as the text of
            # an ActorDiedError, while one raised by a method arrives as a ConfigError.
            self.error = e

    def process_id(self) -> int:
        """The actor's process id (a new one after each restart: one model load).

        Raises:
            ConfigError: The embedder could not be built as configured.
        """
        self._embedder()
        return self.pid

    def embed(self, texts: list[str]) -> tuple[EncodeResult, int]:
        """Embed one block of documents; returns the result and this process's id."""
        return self._embedder().embed_documents(texts), self.pid

    def embed_queries(self, queries: list[str]) -> EncodeResult:
        """Embed queries (small calls: one actor)."""
        return self._embedder().embed_queries(queries)

    def _embedder(self) -> Embedder:
        if self.error is not None:
            raise self.error
        assert self.embedder is not None  # built, or the error is set
        return self.embedder


@dataclass
class _Pool:
    actors: list[Any]
    seen_pids: set[int] = field(default_factory=set)
    next_actor: int = 0


class RayEmbedder:
    """An :class:`Embedder` that spreads documents over ``workers`` Ray actors.

    Args:
        spec: The spec every actor's model follows.
        workers: Actors in the pool (one model each).
        gpus_per_worker: GPUs per actor (0: CPU actors; fractions share a GPU).
        cpus_per_worker: CPUs reserved per actor.
        address: A running cluster to join (``ray://host:10001``, ``auto``); None starts a
            local Ray instance sized to this machine, shut down by :meth:`close`.
        options: How each actor builds its Qwen3 encoder.
        block_tokens: Tokens per block sent to an actor.
        max_restarts: Restarts of a dead actor (each loads the model again).
        max_task_retries: Retries of a block whose actor died.
        embedder_factory: Builds the embedder in each actor instead of the Qwen3 encoder:
            ``"module:callable"`` (imported here, so a bad one fails before any actor starts)
            or a callable, taking the spec and returning an embedder that follows it.
        token_counter: Counts tokens on the driver to form blocks (default: the model's
            tokenizer, no weights).

    Raises:
        ConfigError: Ray is not installed, a setting is out of range, or
            ``embedder_factory`` cannot be imported or is not callable.

    Example:
        >>> embedder = RayEmbedder(spec, workers=2)  # doctest: +SKIP
        >>> embedder.embed_documents(["a", "b"]).vectors.shape  # doctest: +SKIP
        (2, 1024)
    """

    def __init__(
        self,
        spec: EmbeddingSpec,
        *,
        workers: int = 1,
        gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        address: str | None = None,
        options: EncoderOptions | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        max_task_retries: int = DEFAULT_MAX_TASK_RETRIES,
        embedder_factory: EmbedderFactory | str | None = None,
        token_counter: TokenCounter | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        if gpus_per_worker < 0 or cpus_per_worker < 0:
            raise ConfigError(
                f"gpus_per_worker and cpus_per_worker must be >= 0, got {gpus_per_worker} and "
                f"{cpus_per_worker}"
            )
        if max_restarts < 0 or max_task_retries < 0:
            raise ConfigError("max_restarts and max_task_retries must be >= 0")
        self.ray = import_ray()
        self._spec = spec
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.address = address
        self.block_tokens = block_tokens
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self._options = options or EncoderOptions()
        self._factory: EmbedderFactory
        if isinstance(embedder_factory, str):
            # Imported on the driver too: a bad reference fails here, before any actor starts.
            self._factory = import_embedder_factory(embedder_factory)
            self._factory_name = embedder_factory
        elif embedder_factory is not None:
            self._factory = embedder_factory
            self._factory_name = factory_name(embedder_factory)
        else:
            self._factory = self._options.build
            self._factory_name = "the Qwen3 encoder"
        self._token_counter = token_counter
        self._started_ray = False
        self._pool: _Pool | None = None

    # -- the Embedder interface ----------------------------------------------------------

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec every actor follows."""
        return self._spec

    def token_counter(self) -> TokenCounter:
        """The driver's token counter (the tokenizer alone), loaded on first use."""
        if self._token_counter is None:
            from qwen3_pipeline.embedding.encoder import Qwen3Encoder

            self._token_counter = Qwen3Encoder(
                self._spec, device="cpu", load_model=False, progress=False
            )
        return self._token_counter

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents on the pool, in blocks of similar length; results in input order.

        Rows of a block that fails after Ray's retries are listed in ``failures``.

        Raises:
            ConfigError: The actors could not build the embedder as configured (e.g. the
                factory's embedder follows another spec); no row is embedded.
            EmbeddingFailedError: The actors could not start (the model could not load).
        """
        started = time.perf_counter()
        texts = list(texts)
        dim = self._spec.output_dim
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        n_tokens = np.zeros(len(texts), dtype=np.int64)
        truncated = np.zeros(len(texts), dtype=bool)
        failures: dict[int, RowFailure | str] = {}
        stats = EncodeStats()
        if texts:
            lengths = np.asarray(self.token_counter().count_document_tokens(texts))
            blocks = plan_blocks(lengths, self.block_size(int(lengths.sum())))
            for block, outcome in self._run_blocks(texts, blocks):
                if isinstance(outcome, EncodeResult):
                    vectors[block] = outcome.vectors
                    n_tokens[block] = outcome.n_tokens
                    truncated[block] = outcome.truncated
                    for index, reason in outcome.failures.items():
                        failures[int(block[index])] = reason
                    stats = stats + outcome.stats
                    done_tokens = int(outcome.stats.real_tokens)
                else:
                    for row in block:
                        failures[int(row)] = outcome
                    done_tokens = int(lengths[block].sum())
                if on_batch is not None:
                    on_batch(len(block), done_tokens)
        elapsed = time.perf_counter() - started
        return EncodeResult(
            vectors=vectors,
            n_tokens=n_tokens,
            truncated=truncated,
            failures=dict(sorted(failures.items())),
            stats=EncodeStats(
                rows=len(texts),
                real_tokens=stats.real_tokens,
                padded_tokens=stats.padded_tokens,
                batches=stats.batches,
                seconds=elapsed,
                truncated_rows=int(truncated.sum()),
                failed_rows=len(failures),
            ),
        )

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries on one actor (queries are few and short).

        Raises:
            ConfigError: The actors could not build the embedder as configured.
            EmbeddingFailedError: The actor failed after Ray's retries.
        """
        pool = self._ensure_pool()
        actor = pool.actors[0]
        try:
            return self.ray.get(actor.embed_queries.remote(list(queries)))
        except self.ray.exceptions.RayError as e:
            raise EmbeddingFailedError(f"the Ray worker failed to embed queries: {e}") from e

    def start(self) -> None:
        """Connect to Ray and start the workers now rather than on the first embed call.

        Raises:
            ConnectionError: The Ray cluster at ``address`` cannot be reached.
            EmbeddingFailedError: The workers could not load the model.
            ConfigError: A worker refused the settings.
        """
        self._ensure_pool()

    def block_size(self, total_tokens: int) -> int:
        """Tokens per block for a call of ``total_tokens``: ``block_tokens``, or smaller.

        A call too small to give every worker several blocks is cut finer (at least
        :data:`_BLOCKS_PER_WORKER` per worker), so no worker sits idle while another holds
        the only block.
        """
        balanced = -(-total_tokens // (self.workers * _BLOCKS_PER_WORKER))
        return max(1, min(self.block_tokens, balanced))

    # -- engine facts --------------------------------------------------------------------

    def engine_info(self) -> dict[str, Any]:
        """``engine``, ``workers`` and ``model_loads`` (actor starts seen, restarts included)."""
        loads = len(self._pool.seen_pids) if self._pool is not None else 0
        return {"engine": "ray", "workers": self.workers, "model_loads": loads}

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the actors, and the local Ray instance if this embedder started it."""
        pool, self._pool = self._pool, None
        # Ray may already be down (e.g. a dagster-ray resource shut it down): nothing to kill.
        if pool is not None and self.ray.is_initialized():
            for actor in pool.actors:
                self.ray.kill(actor)
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayEmbedder":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _ensure_pool(self) -> _Pool:
        if self._pool is not None:
            return self._pool
        ray = self.ray
        if not ray.is_initialized():
            if self.address is None:
                ray.init(include_dashboard=False, log_to_driver=False)
                self._started_ray = True
            else:
                ray.init(address=self.address, log_to_driver=False)
        started = time.perf_counter()
        actors = [self._new_actor() for _ in range(self.workers)]
        try:
            pids = ray.get([a.process_id.remote() for a in actors])
        except ray.exceptions.RayError as e:
            for actor in actors:
                ray.kill(actor)
            # A worker's ConfigError arrives as a RayTaskError that is also a ConfigError:
            # raised again as the package's own (not retried; the settings must change).
            if isinstance(e, ConfigError):
                raise ConfigError(f"the Ray workers could not start: {_cause(e)}") from e
            raise EmbeddingFailedError(f"the Ray workers could not load the model: {e}") from e
        self._pool = _Pool(actors=actors, seen_pids=set(pids))
        logger.info(
            "started %d Ray worker(s) (%s GPU, %s CPU each) for %s with %s in %.1fs",
            self.workers,
            self.gpus_per_worker,
            self.cpus_per_worker,
            self._spec.model,
            self._factory_name,
            time.perf_counter() - started,
        )
        return self._pool

    def _new_actor(self) -> Any:
        worker = self.ray.remote(
            num_gpus=self.gpus_per_worker,
            num_cpus=self.cpus_per_worker,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
        )(EncoderWorker)
        return worker.remote(self._spec, self._factory, self._factory_name)

    def _run_blocks(
        self, texts: list[str], blocks: list[np.ndarray]
    ) -> "Any":  # Iterator[tuple[np.ndarray, EncodeResult | str]]
        """Yield ``(block, result or failure reason)`` as blocks finish."""
        ray = self.ray
        pool = self._ensure_pool()
        pending = list(range(len(blocks)))
        pending.reverse()  # pop() takes the longest blocks first
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (block, actor slot)
        load = [0] * len(pool.actors)

        def submit(slot: int) -> None:
            index = pending.pop()
            block_texts = [texts[i] for i in blocks[index]]
            ref = pool.actors[slot].embed.remote(block_texts)
            in_flight[ref] = (index, slot)
            load[slot] += 1

        for _ in range(_IN_FLIGHT_PER_WORKER):
            for slot in range(len(pool.actors)):
                if pending:
                    submit(slot)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            index, slot = in_flight.pop(ref)
            load[slot] -= 1
            try:
                result, pid = ray.get(ref)
            except ray.exceptions.RayError as e:
                reason = f"Ray worker failed after {self.max_task_retries} retries: {_short(e)}"
                logger.error("block of %d row(s) failed: %s", len(blocks[index]), reason)
                self._replace_if_dead(pool, slot)
                yield blocks[index], reason
            else:
                pool.seen_pids.add(pid)
                yield blocks[index], result
            if pending:
                submit(slot)

    def _replace_if_dead(self, pool: _Pool, slot: int) -> None:
        # An actor past its restarts is dead for good: start a fresh one in its place so the
        # pool keeps its size (its model load is counted when it answers).
        ray = self.ray
        try:
            pid = ray.get(pool.actors[slot].process_id.remote(), timeout=60)
        except ray.exceptions.RayError:
            logger.warning("Ray worker %d is dead after its restarts; starting a new one", slot)
            pool.actors[slot] = self._new_actor()
        else:
            pool.seen_pids.add(pid)


def _cause(error: BaseException) -> str:
    """The message of the exception a Ray task raised (without Ray's traceback)."""
    return str(getattr(error, "cause", None) or error)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def import_ray() -> Any:
    """Import Ray, or say how to install it.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "the Ray engine needs Ray: pip install 'qwen3-pipeline[ray]' (or use --engine local)"
        ) from e
    return ray
