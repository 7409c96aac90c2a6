"""qwen3_pipeline: keep a LanceDB vector table in sync with a source table using Qwen3-Embedding."""

__version__ = "0.1.0"
