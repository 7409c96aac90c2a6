"""Embedding: the :class:`Embedder` interface and what implements it.

- :mod:`qwen3_pipeline.embedding.interface`: :class:`Embedder`, :class:`EncodeResult`,
  :class:`EncodeStats`, the token-counter protocol;
- :mod:`qwen3_pipeline.embedding.batching`: the pure token-budget batch planner;
- :mod:`qwen3_pipeline.embedding.encoder`: :class:`Qwen3Encoder`, the embedding model;
- :mod:`qwen3_pipeline.embedding.reranker`: :class:`Qwen3Reranker`, the reranking model, and the
  :class:`Reranker` interface;
- :mod:`qwen3_pipeline.embedding.checkpoint`: what both share: device, dtype and attention,
  loading, left-padded inputs, out-of-memory halving (these three import torch and
  transformers, lazily);
- :mod:`qwen3_pipeline.embedding.engines`: :class:`EngineOptions` and :func:`build_embedder`
  (the local encoder or the Ray actor pool);
- :mod:`qwen3_pipeline.embedding.ray_pool`: :class:`RayEmbedder`, the actor pool;
- :mod:`qwen3_pipeline.embedding.lazy`: :class:`LazyEmbedder`, which loads the model on first use.

Names are imported on first access, so ``import qwen3_pipeline.embedding`` never loads torch.
"""

from qwen3_pipeline.core.lazy_exports import lazy_exports

_WHERE = {
    "Embedder": "qwen3_pipeline.embedding.interface",
    "EncodeResult": "qwen3_pipeline.embedding.interface",
    "EncodeStats": "qwen3_pipeline.embedding.interface",
    "EngineOptions": "qwen3_pipeline.embedding.engines",
    "LazyEmbedder": "qwen3_pipeline.embedding.lazy",
    "Qwen3Encoder": "qwen3_pipeline.embedding.encoder",
    "Qwen3Reranker": "qwen3_pipeline.embedding.reranker",
    "RayEmbedder": "qwen3_pipeline.embedding.ray_pool",
    "Reranker": "qwen3_pipeline.embedding.reranker",
    "build_embedder": "qwen3_pipeline.embedding.engines",
    "plan_batches": "qwen3_pipeline.embedding.batching",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
