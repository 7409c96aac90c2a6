"""Readers of a vector table: search, data-quality checks, near duplicates.

- :mod:`qwen3_pipeline.consumers.vector_search`: :func:`open_vector_table`, :func:`search`
  (reranked too: :func:`rerank_plan`), vector reads, ANN index upkeep, near-duplicate pairs;
- :mod:`qwen3_pipeline.consumers.checks`: the table's data-quality checks;
- :mod:`qwen3_pipeline.consumers.near_duplicates`: the near-duplicate report.
"""

from qwen3_pipeline.consumers.vector_search import (
    IndexPolicy,
    IndexUpkeep,
    RerankPlan,
    VectorTable,
    maintain_vector_index,
    near_duplicate_pairs,
    open_vector_table,
    read_vectors,
    recorded_spec,
    rerank_plan,
    search,
    vector_matrix,
)

__all__ = [
    "IndexPolicy",
    "IndexUpkeep",
    "RerankPlan",
    "VectorTable",
    "maintain_vector_index",
    "near_duplicate_pairs",
    "open_vector_table",
    "read_vectors",
    "recorded_spec",
    "rerank_plan",
    "search",
    "vector_matrix",
]
