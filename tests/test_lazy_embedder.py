"""One lazy loader: the CLI/Airflow ``LazyEmbedder`` and the Dagster embedder resources.

The resources hold a :class:`LazyEmbedder` (created in ``setup_for_execution``, closed in
``teardown_after_execution``), so loading on first embed, the token counter without weights,
the engine facts and closing behave the same whichever driver runs the refresh.
"""

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest

from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, Qwen3EmbedderResource
from qwen3_pipeline.embedding.engines import EngineOptions
from qwen3_pipeline.embedding.interface import TokenCounter
from qwen3_pipeline.embedding.lazy import LazyEmbedder
from qwen3_pipeline.testing import FakeEmbedder

TEXTS = ["a first document", "and a second, somewhat longer document than the first"]
NOT_LOADED = {"engine": "local", "workers": 1, "model_loads": 0}


def test_a_resource_loads_once_through_its_lazy_embedder_and_closes_it_at_teardown() -> None:
    resource = FakeEmbedderResource(dim=32)
    context = dg.build_init_resource_context()
    resource.setup_for_execution(context)
    lazy = resource.lazy_embedder()
    assert isinstance(lazy, LazyEmbedder)
    assert (resource.loaded, resource.engine_info()) == (False, NOT_LOADED)

    loads = FakeEmbedderResource.loads()
    counter = resource.token_counter()  # the fake's word counter: no load
    assert counter is not None
    assert counter.count_document_tokens(TEXTS).tolist() == [4, 10]
    assert (resource.loaded, FakeEmbedderResource.loads()) == (False, loads)

    first = resource.embed_documents(TEXTS)
    resource.embed_documents(TEXTS)
    assert FakeEmbedderResource.loads() == loads + 1
    assert resource.engine_info() == {**NOT_LOADED, "model_loads": 1}
    assert lazy.loaded
    expected = FakeEmbedder(resource.spec).embed_documents(TEXTS).vectors
    assert np.array_equal(first.vectors, expected)

    resource.teardown_after_execution(context)
    assert not lazy.loaded
    assert not resource.loaded


def test_the_resources_and_the_lazy_embedder_report_the_same_engine_facts() -> None:
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    local = Qwen3EmbedderResource(model=spec.model, dim=64, device="cpu")
    assert local.engine_info() == LazyEmbedder(spec, EngineOptions()).engine_info() == NOT_LOADED
    pytest.importorskip("dagster_ray")
    from qwen3_pipeline.dagster.ray_resource import RayEmbedderResource

    ray = RayEmbedderResource(model=spec.model, dim=64, workers=3)
    expected = {"engine": "ray", "workers": 3, "model_loads": 0}
    assert ray.engine_info() == expected
    assert LazyEmbedder(spec, EngineOptions(engine="ray", workers=3)).engine_info() == expected
    assert not ray.loaded  # the Ray pool is built on the first embed call only


def test_the_token_counter_needs_no_weights_and_counts_as_the_model_does(
    tiny_model_dir: Path,
) -> None:
    resource = Qwen3EmbedderResource(model=str(tiny_model_dir), dim=32, device="cpu")
    context = dg.build_init_resource_context()
    resource.setup_for_execution(context)
    counter = resource.token_counter()
    assert counter is not None
    counted = counter.count_document_tokens(TEXTS).tolist()
    assert not resource.loaded
    assert resource.engine_info()["model_loads"] == 0
    with LazyEmbedder(resource.spec, EngineOptions(device="cpu")) as lazy:
        tokenizer_only = lazy.token_counter()
        assert tokenizer_only is not None
        assert tokenizer_only.count_document_tokens(TEXTS).tolist() == counted
        assert not lazy.loaded

    result = resource.embed_documents(TEXTS)
    assert result.n_tokens.tolist() == counted
    assert resource.engine_info() == {**NOT_LOADED, "model_loads": 1}
    loaded_counter = resource.token_counter()  # now the loaded encoder itself
    assert isinstance(loaded_counter, TokenCounter)
    assert loaded_counter.count_document_tokens(TEXTS).tolist() == counted
    resource.teardown_after_execution(context)
    assert not resource.loaded


def test_a_model_that_cannot_start_leaves_no_table(tmp_path: Path) -> None:
    # A first refresh whose model (or Ray cluster) fails to start: it starts before the table
    # is created, so no empty table is left for readers and checks to find.
    from qwen3_pipeline.core.errors import ModelLoadError
    from tests.refresh_helpers import make_rows, run_refresh, spec, table_version, write_parquet

    source = write_parquet(make_rows(range(20)), tmp_path / "source.parquet")
    db = str(tmp_path / "db")
    built: list[EmbeddingSpec] = []

    def unreachable(model_spec: EmbeddingSpec) -> FakeEmbedder:
        built.append(model_spec)
        raise ConnectionError("Could not find any running Ray instance")

    def lazy(build: Any) -> LazyEmbedder:
        # The fake counts the plan's tokens: no tokenizer to load for a hub id offline.
        return LazyEmbedder(spec(), EngineOptions(), build=build, count_tokens=FakeEmbedder)

    failing = lazy(unreachable)
    with pytest.raises(ConnectionError, match="running Ray instance"):
        run_refresh(db, "docs", source, embedder=failing)  # type: ignore[arg-type]
    assert built
    assert table_version(db, "docs") is None

    def missing(model_spec: EmbeddingSpec) -> FakeEmbedder:
        raise ModelLoadError("could not load model 'nowhere'")

    with pytest.raises(ModelLoadError):
        run_refresh(
            db, "docs", source, embedder=LazyEmbedder(spec(), EngineOptions(), build=missing)
        )  # type: ignore[arg-type]
    assert table_version(db, "docs") is None
    working = lazy(FakeEmbedder)
    assert run_refresh(db, "docs", source, embedder=working).inserted == 20  # type: ignore[arg-type]


def test_a_resource_starts_its_model_on_demand() -> None:
    resource = FakeEmbedderResource(dim=32)
    context = dg.build_init_resource_context()
    resource.setup_for_execution(context)
    assert not resource.loaded
    resource.start()
    assert resource.loaded
    resource.teardown_after_execution(context)
