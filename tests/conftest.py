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
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.dbt_runs import DbtRuns

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


# Merges kept by the quick tokenizer of ``tiny_model_quick_dir`` (of Qwen's ~294k merge rules).
QUICK_TOKENIZER_MERGES = 20_000


@pytest.fixture(scope="session")
def tiny_model_quick_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a tokenizer that loads ~3x faster, for end-to-end runs.

    Parsing the Qwen ``tokenizer.json`` (~1 s here) is most of each model or tokenizer load,
    and an end-to-end run loads one per shard task, per Ray actor or per run process. This copy
    has the same weights, config, vocabulary, token ids, special tokens and post-processor;
    its ``tokenizer.json`` keeps only the first :data:`QUICK_TOKENIZER_MERGES` BPE merges. A
    word that is a vocabulary entry tokenizes exactly as with the real tokenizer (Qwen's BPE
    sets ``ignore_merges``); another word may split into more, shorter tokens. For tests of
    what a run does (counts, versions, loads, events), not of how text is tokenized.
    """
    import json
    import shutil

    quick = tmp_path_factory.mktemp("tiny_qwen3_quick") / "model"
    shutil.copytree(tiny_model_dir, quick)
    tokenizer = json.loads((quick / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["model"]["ignore_merges"]
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:QUICK_TOKENIZER_MERGES]
    (quick / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    return quick


@pytest.fixture(scope="session")
def dbt_runs(tmp_path_factory: pytest.TempPathFactory) -> "DbtRuns":
    """Dagster runs of the dbt models that several test modules inspect, run once.

    Each ``dbt build`` costs ~15 s here; the modules that only read a run's result, events and
    artifacts share these (see :func:`tests.dbt_runs.run_dbt_models`) instead of building again.
    """
    from tests.dbt_runs import run_dbt_models

    return run_dbt_models(tmp_path_factory.mktemp("dbt_runs") / "data")


# The longest test files, longest first (measured with --durations). `make test` runs one
# worker per core with --dist loadfile (a file stays on one worker), handing out files in
# collection order: starting the longest first keeps the run from ending on one long file.
LONGEST_FILES_FIRST = (
    "test_dagster_e2e_way_out.py",
    "test_ray_engine.py",
    "test_airflow.py",
    "test_dagster_e2e.py",
    "test_lifecycle.py",
    "test_packaging.py",
    "test_dagster_demo.py",
    "test_dbt_models.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first; the order within a file is kept (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
