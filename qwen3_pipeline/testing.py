"""Fakes for fast tests of code that depends on the package's interfaces.

:class:`FakeEmbedder` implements :class:`qwen3_pipeline.embedding.interface.Embedder` without a
model: each
vector is a deterministic function of the text (a seeded random unit vector), so equal texts get
equal vectors and tests can compute expected vectors independently.
"""

import hashlib
import time
from collections.abc import Sequence

import numpy as np

from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, EncodeResult, EncodeStats


def fake_vector(text: str, dim: int) -> np.ndarray:
    """Return the unit vector :class:`FakeEmbedder` gives ``text`` (float32, ``[dim]``)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeEmbedder:
    """A model-free :class:`~qwen3_pipeline.embedding.interface.Embedder` for tests.

    Tokens are counted as whitespace-separated words plus one (the ``<|endoftext|>``), and
    texts longer than ``spec.max_length`` are flagged as truncated, like the real encoder.

    Args:
        spec: The spec to report; only ``dim`` and ``max_length`` affect the output.
        fail_texts: Texts to report as failed rows (to test failure handling).

    Attributes:
        calls: Rows per ``embed_*`` call, in order.
        seen: Every text sent to the fake, formatted as the model would see it, in order.
        batch_rows: Rows per simulated forward pass reported to ``on_batch``.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> FakeEmbedder(spec).embed_documents(["a", "b"]).vectors.shape
        (2, 64)
    """

    def __init__(self, spec: EmbeddingSpec, *, fail_texts: Sequence[str] = ()) -> None:
        self._spec = spec
        self._fail_texts = frozenset(fail_texts)
        self.calls: list[int] = []
        self.seen: list[str] = []
        self.batch_rows = 64

    @property
    def spec(self) -> EmbeddingSpec:
        """The spec the fake reports."""
        return self._spec

    def count_document_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens per document as :meth:`embed_documents` counts them (words + 1, capped)."""
        lengths = [len(self._spec.format_document(t).split()) + 1 for t in texts]
        return np.minimum(np.array(lengths, dtype=np.int64), self._spec.max_length)

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Embed documents as deterministic pseudo-random unit vectors.

        ``on_batch`` is called once per :attr:`batch_rows` rows, as a model would per batch.
        """
        result = self._embed([self._spec.format_document(t) for t in texts])
        if on_batch is not None:
            for start in range(0, len(texts), self.batch_rows):
                batch = result.n_tokens[start : start + self.batch_rows]
                on_batch(len(batch), int(batch.sum()))
        return result

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries (instruction-formatted) as deterministic unit vectors."""
        return self._embed([self._spec.format_query(q) for q in queries])

    def _embed(self, texts: list[str]) -> EncodeResult:
        started = time.perf_counter()
        self.calls.append(len(texts))
        self.seen.extend(texts)
        dim, limit = self._spec.output_dim, self._spec.max_length
        vectors = np.empty((len(texts), dim), dtype=np.float32)
        lengths = np.array([len(t.split()) + 1 for t in texts], dtype=np.int64)
        failures: dict[int, str] = {}
        for i, text in enumerate(texts):
            if text in self._fail_texts:
                vectors[i] = np.nan
                failures[i] = "fake failure"
            else:
                vectors[i] = fake_vector(text, dim)
        truncated = lengths > limit
        n_tokens = np.minimum(lengths, limit)
        real = int(n_tokens.sum())
        stats = EncodeStats(
            rows=len(texts),
            real_tokens=real,
            padded_tokens=real,
            batches=1 if texts else 0,
            seconds=time.perf_counter() - started,
            truncated_rows=int(truncated.sum()),
            failed_rows=len(failures),
        )
        return EncodeResult(
            vectors=vectors, n_tokens=n_tokens, truncated=truncated, failures=failures, stats=stats
        )


def fake_embedder_factory(spec: EmbeddingSpec) -> FakeEmbedder:
    """Build a :class:`FakeEmbedder` for ``spec``: an embedder factory for tests and demos.

    Named as ``qwen3_pipeline.testing:fake_embedder_factory``, it runs the engines (the Ray
    actor pool included) without a model; see :mod:`qwen3_pipeline.embedding.factory`.

    Example:
        >>> spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
        >>> fake_embedder_factory(spec).spec == spec
        True
    """
    return FakeEmbedder(spec)
