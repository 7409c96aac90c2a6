"""The model lifecycle above the engine's writes: gated blue/green rebuilds.

- :mod:`qwen3_pipeline.lifecycle.gate`: golden sets, recall@k / nDCG@k, and the gate that
  decides whether a rebuilt table may replace the live one.

Checked-version tags and rollback are table operations: :mod:`qwen3_pipeline.store.versions`.
"""
