"""The pure core: no I/O, no model, no orchestrator; every other layer builds on it.

- :mod:`qwen3_pipeline.core.spec`: :class:`EmbeddingSpec` (model, dim, prompts) and its fingerprint;
- :mod:`qwen3_pipeline.core.errors`: the error hierarchy (typed, transient or not);
- :mod:`qwen3_pipeline.core.schema`: the vector table's columns, metadata keys, reserved names;
- :mod:`qwen3_pipeline.core.changes`: sanitising, content hashes and the diff against stored state;
- :mod:`qwen3_pipeline.core.progress`: progress lines with exact totals and an ETA;
- :mod:`qwen3_pipeline.core.resources`: files shipped in the package (the Qwen3 tokenizer).
"""
