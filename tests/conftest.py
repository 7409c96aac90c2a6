"""Session-wide test setup: no Hugging Face hub access, and tiny Qwen3-Embedding checkpoints.

The offline variables are set when this module is imported, i.e. before any test module imports
``huggingface_hub``/``transformers`` (which read them at import time).

The checkpoints are random-weight models with the real tokenizer and the layout of
``Qwen/Qwen3-Embedding-0.6B`` (see :mod:`tests.fixtures.tiny_qwen3`). Their weights are stored in
bfloat16 like the published model, so transformers 5 and sentence-transformers load them in
bfloat16 unless given ``dtype=torch.float32`` (``model_kwargs={"dtype": torch.float32}``).
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def _hf_offline() -> Iterator[None]:
    """Keep the hub offline for the whole session, restoring the variables if a test unset them."""
    os.environ.update(OFFLINE_ENV)
    yield
    os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint (hidden 64, 2 layers, 4 heads, 2 kv heads), built once per session."""
    from tests.fixtures.tiny_qwen3 import build_tiny_qwen3_checkpoint

    return build_tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def tiny_model_256_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint with hidden size 256 (4 layers, 4 heads, 2 kv heads, MLP 512)."""
    from tests.fixtures.tiny_qwen3 import build_tiny_qwen3_checkpoint

    return build_tiny_qwen3_checkpoint(
        tmp_path_factory.mktemp("tiny_qwen3_256"),
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
    )
