"""Test suite of qwen3_pipeline."""
