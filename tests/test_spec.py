import json

import pytest

from qwen3_pipeline.core.errors import ConfigError, InvalidDimensionError, ModelLoadError
from qwen3_pipeline.core.spec import DEFAULT_QUERY_TASK, EmbeddingSpec


def test_known_model_validates_offline_and_defaults():
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B")
    assert spec.dim == 1024
    assert spec.hidden_size == 1024
    assert spec.max_length == 8192
    assert spec.query_task == DEFAULT_QUERY_TASK
    assert spec.document_prompt is None
    assert spec.normalize


@pytest.mark.parametrize("dim", [31, 0, -5, 1025, 2.5, True])
def test_bad_dim_is_rejected_with_range(dim):
    with pytest.raises(InvalidDimensionError, match="32 to 1024"):
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=dim)


@pytest.mark.parametrize("max_length", [0, 1, 32769])
def test_bad_max_length(max_length):
    with pytest.raises(ConfigError, match="max_length"):
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", max_length=max_length)


def test_dim_read_from_local_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert EmbeddingSpec(model=str(tmp_path)).dim == 64
    with pytest.raises(InvalidDimensionError, match="32 to 64"):
        EmbeddingSpec(model=str(tmp_path), dim=128)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        EmbeddingSpec(model=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        EmbeddingSpec(model=str(tmp_path))


def test_unknown_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="local directory"):
        EmbeddingSpec(model="nobody/not-a-model-xyz")


def test_fingerprint_covers_document_side_only():
    base = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
    assert base.fingerprint == EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256).fingerprint
    assert len(base.fingerprint) == 16
    same = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256, query_task="Find code")
    assert same.fingerprint == base.fingerprint
    for changed in (
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=128),
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-4B", dim=256),
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256, revision="abc"),
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256, max_length=512),
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256, document_prompt="doc: "),
        EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256, normalize=False),
    ):
        assert changed.fingerprint != base.fingerprint


def test_json_round_trip_and_query_format():
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64, query_task="Find it")
    assert EmbeddingSpec.from_json(spec.to_json()) == spec
    assert spec.format_query("x") == "Instruct: Find it\nQuery:x"
