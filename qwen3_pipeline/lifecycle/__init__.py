"""The model lifecycle above the engine's writes: gated blue/green rebuilds.

- :mod:`qwen3_pipeline.lifecycle.golden`: golden sets (queries and the keys that answer them),
  read and validated;
- :mod:`qwen3_pipeline.lifecycle.metrics`: recall@k / nDCG@k and a table's scores;
- :mod:`qwen3_pipeline.lifecycle.gate`: evaluating a table on a golden set, and the gate that
  decides whether a rebuilt table may replace the live one.

Checked-version tags and rollback are table operations: :mod:`qwen3_pipeline.store.versions`.
"""
