"""Embedder factories (``module:callable``) on the local engine, without Ray.

What the Ray engine adds (the driver's check before any actor starts, the spec check in the
actor, the CLI on the pool) is in tests/test_ray_engine.py, which starts Ray once.
"""

import json
from dataclasses import replace
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline import cli
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.engines import EngineOptions, build_embedder
from qwen3_pipeline.embedding.factory import build_embedder_with, import_embedder_factory
from qwen3_pipeline.testing import FakeEmbedder, fake_embedder_factory

FAKE = "qwen3_pipeline.testing:fake_embedder_factory"
SPEC = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
NOT_CALLABLE = 42

# (reference, what the message must say): each message also names the reference.
BAD_REFERENCES = [
    ("qwen3_pipeline.testing", "is not MODULE:CALLABLE"),
    ("qwen3_pipeline.testing:", "is not MODULE:CALLABLE"),
    (":fake_embedder_factory", "is not MODULE:CALLABLE"),
    ("qwen3_pipeline.testing:a:b", "is not MODULE:CALLABLE"),
    ("qwen3_pipeline.testing:FakeEmbedder.", "is not MODULE:CALLABLE"),
    ("no_such_module_for_qwen3:build", "module 'no_such_module_for_qwen3' cannot be imported"),
    ("qwen3_pipeline.testing:no_such_factory", "has no attribute 'no_such_factory'"),
    ("qwen3_pipeline.testing:FakeEmbedder.nope", "'qwen3_pipeline.testing.FakeEmbedder' has no"),
    ("tests.test_embedder_factory:NOT_CALLABLE", "is not callable (its type is int)"),
]


def other_dim_factory(spec: EmbeddingSpec) -> FakeEmbedder:
    """A factory that ignores the requested dimension."""
    return FakeEmbedder(replace(spec, dim=32))


def other_query_task_factory(spec: EmbeddingSpec) -> FakeEmbedder:
    """Same fingerprint and dimension, another query instruction: still refused."""
    return FakeEmbedder(replace(spec, query_task="Find code"))


def not_an_embedder_factory(spec: EmbeddingSpec) -> str:
    return "vectors"


def test_a_reference_imports_its_callable_dotted_paths_included() -> None:
    assert import_embedder_factory(FAKE) is fake_embedder_factory
    create = import_embedder_factory("qwen3_pipeline.testing:FakeEmbedder")
    assert isinstance(build_embedder_with(create, SPEC), FakeEmbedder)


@pytest.mark.parametrize(("reference", "message"), BAD_REFERENCES)
def test_a_bad_reference_is_a_config_error_naming_it(reference: str, message: str) -> None:
    with pytest.raises(ConfigError, match="embedder factory") as caught:
        import_embedder_factory(reference)
    assert message in str(caught.value)
    assert repr(reference) in str(caught.value)
    with pytest.raises(ConfigError, match="embedder factory"):
        EngineOptions(engine="local", embedder_factory=reference)


def test_the_built_embedder_must_follow_the_requested_spec() -> None:
    with pytest.raises(ConfigError, match="dim 32, asked for 64"):
        build_embedder_with(other_dim_factory, SPEC)
    # The fingerprint leaves the query instruction out; the pool embeds queries too.
    assert replace(SPEC, query_task="Find code").fingerprint == SPEC.fingerprint
    with pytest.raises(ConfigError, match="query_task 'Find code'"):
        build_embedder_with(other_query_task_factory, SPEC, name="mine:factory")
    with pytest.raises(ConfigError, match="returned a str, not an Embedder"):
        build_embedder_with(not_an_embedder_factory, SPEC)  # type: ignore[arg-type]


def test_the_local_engine_builds_the_named_factory() -> None:
    embedder = build_embedder(SPEC, EngineOptions(engine="local", embedder_factory=FAKE))
    assert isinstance(embedder, FakeEmbedder)
    assert embedder.spec == SPEC
    with pytest.raises(ConfigError, match=r"other_dim_factory.*dim 32"):
        build_embedder(
            SPEC,
            EngineOptions(embedder_factory="tests.test_embedder_factory:other_dim_factory"),
        )


def _refresh_argv(model: Path, tmp_path: Path, texts: list[str]) -> list[str]:
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), source)
    return [
        "refresh", "--source", str(source), "--key", "id", "--text", "text",
        "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(model), "--dim", "64",
        "--device", "cpu",
    ]  # fmt: skip


def test_cli_refresh_with_a_factory_on_the_local_engine_stores_its_vectors(
    tiny_model_quick_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [f"document {i} about topic {i % 5}" for i in range(40)]
    argv = _refresh_argv(tiny_model_quick_dir, tmp_path, texts)
    assert cli.main([*argv, "--embedder-factory", FAKE]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["inserted"], report["engine"], report["model_loads"]) == (40, "local", 1)
    stored = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
    order = np.argsort(stored.column("key").to_numpy())
    vectors = np.stack(stored.column("vector").to_numpy(zero_copy_only=False))[order]
    spec = EmbeddingSpec(model=str(tiny_model_quick_dir), dim=64)
    assert np.array_equal(vectors, FakeEmbedder(spec).embed_documents(texts).vectors)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cli_refuses_a_bad_factory_before_anything_runs(
    engine: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["embed", "--model", "m", "--input", str(tmp_path / "x"), "--output", "y.npy"]
    bad = "qwen3_pipeline.testing:no_such_factory"
    assert cli.main([*argv, "--engine", engine, "--embedder-factory", bad]) == 2
    err = capsys.readouterr().err
    assert "--embedder-factory: embedder factory 'qwen3_pipeline.testing:no_such_factory'" in err
    assert "has no attribute 'no_such_factory'" in err
