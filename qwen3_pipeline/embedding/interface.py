"""The embedder interface and its result types (no torch here).

:class:`Embedder` is what the refresh engine and the Dagster assets depend on. The real
implementation is :class:`qwen3_pipeline.embedding.encoder.Qwen3Encoder`; a deterministic fake for
fast
tests ships as :class:`qwen3_pipeline.testing.FakeEmbedder`.
"""

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qwen3_pipeline.core.errors import EmbeddingFailedError
from qwen3_pipeline.core.failures import RowFailure
from qwen3_pipeline.core.spec import EmbeddingSpec


@dataclass(frozen=True, kw_only=True)
class EncodeStats:
    """Counters of one encode call.

    Attributes:
        rows: Texts in the call.
        real_tokens: Tokens of the texts after truncation (``<|endoftext|>`` included).
        padded_tokens: Positions the model computed (rows x longest row, summed over batches).
        padding_efficiency: ``real_tokens / padded_tokens`` (1.0 when nothing was computed).
        batches: Forward passes, OOM retries included.
        seconds: Wall-clock time of the call.
        tokens_per_second: ``real_tokens / seconds``.
        truncated_rows: Rows longer than ``max_length``, cut to fit.
        failed_rows: Rows that could not be embedded (see ``EncodeResult.failures``).
    """

    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    truncated_rows: int = 0
    failed_rows: int = 0

    @property
    def padding_efficiency(self) -> float:
        """Real tokens per computed position."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0

    @property
    def tokens_per_second(self) -> float:
        """Real tokens embedded per second of the call."""
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the counters and the derived ratios as a JSON-ready dict."""
        out = asdict(self)
        out["padding_efficiency"] = round(self.padding_efficiency, 6)
        out["tokens_per_second"] = round(self.tokens_per_second, 3)
        out["seconds"] = round(self.seconds, 6)
        return out

    def __add__(self, other: "EncodeStats") -> "EncodeStats":
        return EncodeStats(
            rows=self.rows + other.rows,
            real_tokens=self.real_tokens + other.real_tokens,
            padded_tokens=self.padded_tokens + other.padded_tokens,
            batches=self.batches + other.batches,
            seconds=self.seconds + other.seconds,
            truncated_rows=self.truncated_rows + other.truncated_rows,
            failed_rows=self.failed_rows + other.failed_rows,
        )


@dataclass(frozen=True, kw_only=True)
class EncodeResult:
    """Vectors and per-row facts of one encode call, in the caller's order.

    Attributes:
        vectors: float32 ``[n, dim]``; rows listed in ``failures`` are all-NaN.
        n_tokens: Tokens per row after truncation.
        truncated: Whether each row was truncated to ``max_length``.
        failures: Row index -> why it could not be embedded: a
            :class:`~qwen3_pipeline.core.failures.RowFailure` (step, error type, message),
            or plain text (read as an ``embed`` failure).
        stats: Counters of the call.
    """

    vectors: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    failures: Mapping[int, "RowFailure | str"] = field(default_factory=dict)
    stats: EncodeStats = field(default_factory=EncodeStats)

    def raise_on_failure(self) -> np.ndarray:
        """Return the vectors, or raise :class:`EmbeddingFailedError` naming failed rows."""
        if self.failures:
            shown = ", ".join(f"row {i}: {why}" for i, why in list(self.failures.items())[:5])
            more = f" (+{len(self.failures) - 5} more)" if len(self.failures) > 5 else ""
            raise EmbeddingFailedError(f"{len(self.failures)} row(s) failed: {shown}{more}")
        return self.vectors


BatchDone = Callable[[int, int], None]
"""Called after each forward pass with the rows and tokens it embedded (progress reporting)."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors according to an :class:`EmbeddingSpec`."""

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the vectors follow (model, dim, max_length...)."""
        ...

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents (no instruction), reporting per-row failures instead of raising.

        ``on_batch(rows, tokens)`` is called after each forward pass, so a caller embedding
        many rows in one call can report progress while the call runs.
        """
        ...

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries in the instruction format of the spec's query task."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """An embedder that can count a document's tokens without running the model.

    The refresh plan uses it for exact token totals (progress, dry runs); embedders without it
    get an estimate, marked as one in the plan.
    """

    def count_document_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per document after truncation, as ``embed_documents`` will count them."""
        ...


def token_counter_of(embedder: Embedder) -> TokenCounter | None:
    """Return what counts ``embedder``'s document tokens without its model, if anything does.

    An embedder may count tokens itself (:class:`TokenCounter`) or hand out a counter through a
    ``token_counter()`` method (the Dagster resources do: a tokenizer alone, so a refresh with
    nothing to embed never loads the model).

    Example:
        >>> from qwen3_pipeline.testing import FakeEmbedder
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> token_counter_of(FakeEmbedder(spec)).count_document_tokens(["two words"]).tolist()
        [3]
    """
    provider = getattr(embedder, "token_counter", None)
    if callable(provider):
        counter = provider()
        return counter if isinstance(counter, TokenCounter) else None
    return embedder if isinstance(embedder, TokenCounter) else None


def start_embedder(embedder: Embedder) -> None:
    """Load the model (or start the workers) now, if ``embedder`` defers that to first use.

    An embedder that loads lazily (the CLI's and Airflow's :class:`~qwen3_pipeline.embedding.
    lazy.LazyEmbedder`, the Dagster resources, :class:`~qwen3_pipeline.embedding.ray_pool.
    RayEmbedder`) has a ``start()`` method; the refresh calls it before it creates or writes
    the table, so a model that cannot load or a cluster that cannot be reached leaves no
    empty table behind. Any other embedder is ready once built.

    Example:
        >>> from qwen3_pipeline.testing import FakeEmbedder
        >>> start_embedder(FakeEmbedder(EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)))
    """
    start = getattr(embedder, "start", None)
    if callable(start):
        start()


def engine_info(embedder: Embedder) -> dict[str, Any]:
    """Return ``engine``, ``workers`` and ``model_loads`` of an embedder, for the report.

    Embedders that run elsewhere (:class:`~qwen3_pipeline.embedding.ray_pool.RayEmbedder`) or load
    lazily (the Dagster resources) say so through an ``engine_info()`` method; any other
    embedder is one model in this process, loaded once.

    Example:
        >>> from qwen3_pipeline.testing import FakeEmbedder
        >>> engine_info(FakeEmbedder(EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)))
        {'engine': 'local', 'workers': 1, 'model_loads': 1}
    """
    provider = getattr(embedder, "engine_info", None)
    if callable(provider):
        return dict(provider())
    return {"engine": "local", "workers": 1, "model_loads": 1}


def embed_reporting(
    embedder: Embedder, texts: list[str], on_batch: BatchDone | None
) -> EncodeResult:
    """Embed ``texts``, reporting each forward pass to ``on_batch`` (when given).

    An embedder written before ``on_batch`` existed (its ``embed_documents`` takes only the
    texts) still works: progress is then reported once, when the call returns.
    """
    if on_batch is None:
        return embedder.embed_documents(texts)
    if "on_batch" in inspect.signature(embedder.embed_documents).parameters:
        return embedder.embed_documents(texts, on_batch=on_batch)
    result = embedder.embed_documents(texts)
    on_batch(len(texts), int(result.stats.real_tokens))
    return result
