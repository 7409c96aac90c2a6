"""The Ray engine on a real local Ray instance: 2 CPU actors holding the tiny Qwen3 model.

The model is the tiny checkpoint with the quick tokenizer (``tiny_model_quick_dir`` in
conftest.py): every actor start loads it, and the local engine compared with it is the same.

One Ray instance serves the module (started once, ~10 s here); every test builds its own pool
of actors on it. The Dagster test runs last: its ``LocalRay`` resource shuts Ray down.
"""

import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from qwen3_pipeline import cli  # noqa: E402
from qwen3_pipeline.core.errors import ConfigError, InputDataError  # noqa: E402
from qwen3_pipeline.core.spec import EmbeddingSpec  # noqa: E402
from qwen3_pipeline.dagster.automation import all_partitions_tags  # noqa: E402
from qwen3_pipeline.dagster.embedding_asset import HashShards, build_embedding_asset  # noqa: E402
from qwen3_pipeline.dagster.metadata import run_counters  # noqa: E402
from qwen3_pipeline.dagster.resources import LanceDBResource  # noqa: E402
from qwen3_pipeline.embedding.encoder import Qwen3Encoder  # noqa: E402
from qwen3_pipeline.embedding.engines import EngineOptions, build_embedder  # noqa: E402
from qwen3_pipeline.embedding.ray_pool import EncoderOptions, RayEmbedder, plan_blocks  # noqa: E402
from qwen3_pipeline.engine.refresh import refresh  # noqa: E402
from qwen3_pipeline.sources import ArrowSource, SourceConfig  # noqa: E402
from qwen3_pipeline.testing import FakeEmbedder  # noqa: E402

CPU = EncoderOptions(device="cpu")
FAKE_FACTORY = "qwen3_pipeline.testing:fake_embedder_factory"
CONFIG = SourceConfig(key="id", text_columns=("text",))
# Small blocks so that a few hundred rows make many blocks across the two actors.
BLOCK_TOKENS = 1_500


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    # Ray pickles this module's classes by value, so actors need not import `tests`.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Logical CPUs: the shared pool keeps two actors for the whole module while other tests
    # start pools of their own (each actor runs one torch thread).
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_model_quick_dir: Path) -> EmbeddingSpec:
    # The quick tokenizer: every actor start, driver and local comparison loads it.
    return EmbeddingSpec(model=str(tiny_model_quick_dir), dim=64)


def _texts(n: int, *, edited: frozenset[int] = frozenset()) -> list[str]:
    return [
        f"document {i} about topic {i % 7}: "
        + "word " * (i % 40)
        + (" edited" if i in edited else "")
        for i in range(n)
    ]


def _source(texts: list[str]) -> ArrowSource:
    return ArrowSource(pa.table({"id": np.arange(len(texts)), "text": texts}), name="docs")


@pytest.fixture(scope="module")
def local_encoder(spec: EmbeddingSpec) -> Qwen3Encoder:
    """The local engine that the Ray results are compared with (one model load per module)."""
    return Qwen3Encoder(spec, device="cpu", progress=False)


@pytest.fixture(scope="module")
def shared_pool(spec: EmbeddingSpec) -> Iterator[RayEmbedder]:
    # One pool (two actors, two model loads) for the tests that need no special encoder.
    with _pool(spec) as pool:
        yield pool


def _pool(spec: EmbeddingSpec, **kwargs) -> RayEmbedder:
    return RayEmbedder(spec, workers=2, options=CPU, block_tokens=BLOCK_TOKENS, **kwargs)


def test_blocks_cover_every_row_once_longest_first() -> None:
    lengths = np.array([3, 50, 7, 50, 1, 20, 900])
    blocks = plan_blocks(lengths, 60)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(len(lengths)))
    assert blocks[0].tolist() == [6]  # longer than a block: alone, and first
    assert all(lengths[b].sum() <= 60 for b in blocks[1:])
    with pytest.raises(ConfigError, match="block_tokens"):
        plan_blocks(lengths, 0)


def test_ray_vectors_equal_the_local_engine_in_the_same_order(
    shared_pool: RayEmbedder, local_encoder: Qwen3Encoder
) -> None:
    texts = _texts(240)
    local = local_encoder.embed_documents(texts)
    progress: list[tuple[int, int]] = []
    pool = shared_pool
    remote = pool.embed_documents(
        texts, on_batch=lambda rows, tokens: progress.append((rows, tokens))
    )
    queries = pool.embed_queries(["where is topic 3?"]).vectors
    info = pool.engine_info()
    cos = (remote.vectors * local.vectors).sum(axis=1)
    assert cos.min() >= 0.99999
    assert np.array_equal(remote.n_tokens, local.n_tokens)
    assert remote.stats.real_tokens == local.stats.real_tokens
    assert len(progress) > 2  # one report per block, while the call runs
    assert sum(r for r, _ in progress) == len(texts)
    assert sum(t for _, t in progress) == local.stats.real_tokens
    local_query = local_encoder.embed_queries(["where is topic 3?"])
    assert float((queries * local_query.vectors).sum()) >= 0.99999
    assert info == {"engine": "ray", "workers": 2, "model_loads": 2}


def test_refresh_on_ray_gives_exact_counts_fill_noop_and_edits(
    shared_pool: RayEmbedder, local_encoder: Qwen3Encoder, tmp_path: Path
) -> None:
    db = str(tmp_path / "lancedb")
    pool = shared_pool
    first = refresh(
        source=_source(_texts(300)), config=CONFIG, embedder=pool, db_uri=db, table="docs"
    )
    assert (first.inserted, first.embedded_rows, first.failed) == (300, 300, 0)
    assert (first.engine, first.workers, first.model_loads) == ("ray", 2, 2)
    version = first.version_after

    again = refresh(
        source=_source(_texts(300)), config=CONFIG, embedder=pool, db_uri=db, table="docs"
    )
    assert (again.unchanged, again.embedded_rows, again.committed) == (300, 0, False)
    assert again.version_after == version

    edited = _texts(290, edited=frozenset({1, 2, 3, 150}))  # 4 edits, 10 deletes
    mixed = refresh(source=_source(edited), config=CONFIG, embedder=pool, db_uri=db, table="docs")
    assert (mixed.updated, mixed.deleted, mixed.inserted, mixed.embedded_rows) == (4, 10, 0, 4)
    stored = lancedb.connect(db).open_table("docs").to_arrow()
    assert stored.num_rows == 290
    local = local_encoder.embed_documents(edited)
    order = np.argsort(stored.column("key").to_numpy())
    vectors = np.stack(stored.column("vector").to_numpy(zero_copy_only=False))[order]
    assert ((vectors * local.vectors).sum(axis=1)).min() >= 0.99999


class KillOnce:
    """Builds the real encoder; the first actor process to embed SIGKILLs itself, once."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self, spec: EmbeddingSpec) -> "KillOnce._Encoder":
        return KillOnce._Encoder(Qwen3Encoder(spec, device="cpu", progress=False), self.marker)

    class _Encoder:
        def __init__(self, encoder: Qwen3Encoder, marker: Path) -> None:
            self.encoder, self.marker = encoder, marker
            self.spec = encoder.spec

        def embed_documents(self, texts, **kwargs):
            try:
                self.marker.touch(exist_ok=False)
            except FileExistsError:
                return self.encoder.embed_documents(texts, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-refresh, with blocks in flight

        def embed_queries(self, queries):
            return self.encoder.embed_queries(queries)


def test_an_actor_killed_mid_refresh_is_restarted_and_the_refresh_completes(
    spec: EmbeddingSpec, tmp_path: Path
) -> None:
    marker = tmp_path / "killed"
    db = str(tmp_path / "lancedb")
    with _pool(spec, embedder_factory=KillOnce(marker)) as pool:
        report = refresh(
            source=_source(_texts(300)), config=CONFIG, embedder=pool, db_uri=db, table="docs"
        )
    assert marker.exists()  # an actor really died
    assert (report.inserted, report.embedded_rows, report.failed) == (300, 300, 0)
    assert report.model_loads == 3  # two actors, plus the restarted one
    stored = lancedb.connect(db).open_table("docs").to_arrow()
    assert sorted(stored.column("key").to_pylist()) == list(range(300))


class AlwaysDieOn:
    """An encoder whose process dies whenever its block holds ``poison`` (never recovers)."""

    def __init__(self, poison: str) -> None:
        self.poison = poison

    def __call__(self, spec: EmbeddingSpec) -> "AlwaysDieOn._Encoder":
        return AlwaysDieOn._Encoder(Qwen3Encoder(spec, device="cpu", progress=False), self.poison)

    class _Encoder:
        def __init__(self, encoder: Qwen3Encoder, poison: str) -> None:
            self.encoder, self.poison = encoder, poison
            self.spec = encoder.spec

        def embed_documents(self, texts, **kwargs):
            if self.poison in texts:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.encoder.embed_documents(texts, **kwargs)

        def embed_queries(self, queries):
            return self.encoder.embed_queries(queries)


def test_a_block_failing_after_the_retries_is_reported_per_row_not_dropped(
    spec: EmbeddingSpec, tmp_path: Path
) -> None:
    texts = _texts(200)
    poison = texts[17]
    db = str(tmp_path / "lancedb")
    with _pool(
        spec, embedder_factory=AlwaysDieOn(poison), max_restarts=1, max_task_retries=1
    ) as pool:
        report = refresh(
            source=_source(texts), config=CONFIG, embedder=pool, db_uri=db, table="docs"
        )
    failed_keys = {key for key, _ in report.failures}
    assert "17" in failed_keys
    assert all("Ray worker failed after 1 retries" in why for _, why in report.failures)
    assert report.failed == len(failed_keys) >= 1
    assert report.inserted + report.failed == 200
    stored = lancedb.connect(db).open_table("docs").to_arrow()
    assert stored.num_rows == report.inserted
    assert not failed_keys & {str(k) for k in stored.column("key").to_pylist()}


def test_bad_input_fails_as_locally_before_any_actor_starts(
    spec: EmbeddingSpec, tmp_path: Path
) -> None:
    texts = _texts(50)
    rows = pa.table({"id": [*range(49), 3], "text": texts})  # key 3 twice
    with _pool(spec) as pool:
        with pytest.raises(InputDataError, match="duplicate"):
            refresh(
                source=ArrowSource(rows),
                config=CONFIG,
                embedder=pool,
                db_uri=str(tmp_path),
                table="docs",
            )
        assert pool.engine_info()["model_loads"] == 0
    assert "docs" not in lancedb.connect(str(tmp_path)).list_tables().tables


def test_cli_refresh_and_embed_with_the_ray_engine(
    spec: EmbeddingSpec,
    local_encoder: Qwen3Encoder,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = _texts(120)
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": np.arange(120), "text": texts}), source)
    common = [
        "--model",
        spec.model,
        "--dim",
        "64",
        "--device",
        "cpu",
        "--engine",
        "ray",
        "--workers",
        "2",
    ]
    args = ["refresh", "--source", str(source), "--key", "id", "--text", "text"]
    assert cli.main([*args, "--db", str(tmp_path / "db"), "--table", "docs", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["inserted"], report["engine"], report["workers"], report["model_loads"]) == (
        120,
        "ray",
        2,
        2,
    )
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts[:10]) + "\n")
    out = tmp_path / "vectors.npy"
    assert cli.main(["embed", "--input", str(lines), "--output", str(out), *common]) == 0
    local = local_encoder.embed_documents(texts[:10]).vectors
    assert (np.load(out) * local).sum(axis=1).min() >= 0.99999


def test_ray_flags_need_the_ray_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "embed",
        "--model",
        "m",
        "--input",
        str(tmp_path / "x"),
        "--output",
        str(tmp_path / "y.npy"),
    ]
    assert cli.main([*argv, "--workers", "2"]) == 2
    assert (
        "--workers, --ray-address and --gpus-per-worker need --engine ray"
        in capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="need engine='ray'"):
        EngineOptions(engine="local", workers=4)


def test_a_named_factory_runs_on_the_pool_and_gives_its_vectors(spec: EmbeddingSpec) -> None:
    texts = _texts(200)
    expected = FakeEmbedder(spec)
    options = EngineOptions(engine="ray", workers=2, embedder_factory=FAKE_FACTORY)
    embedder = build_embedder(spec, options)
    assert isinstance(embedder, RayEmbedder)
    with embedder:
        remote = embedder.embed_documents(texts)
        queries = embedder.embed_queries(["where is topic 3?"])
        info = embedder.engine_info()
    local = expected.embed_documents(texts)
    assert np.array_equal(remote.vectors, local.vectors)
    assert np.array_equal(remote.n_tokens, local.n_tokens)
    assert remote.stats.batches > 2  # really spread over blocks
    assert np.array_equal(queries.vectors, expected.embed_queries(["where is topic 3?"]).vectors)
    assert info == {"engine": "ray", "workers": 2, "model_loads": 2}


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("qwen3_pipeline.testing.fake_embedder_factory", "is not MODULE:CALLABLE"),
        ("no_such_module_for_qwen3:build", "cannot be imported"),
        ("qwen3_pipeline.testing:no_such_factory", "has no attribute 'no_such_factory'"),
        ("qwen3_pipeline.testing:FakeEmbedder.spec", "is not callable"),
    ],
)
def test_a_bad_factory_reference_fails_on_the_driver_before_any_actor_starts(
    spec: EmbeddingSpec, reference: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_actor(self: RayEmbedder) -> None:
        raise AssertionError("an actor was started")

    monkeypatch.setattr(RayEmbedder, "_new_actor", no_actor)
    with pytest.raises(ConfigError, match=message) as caught:
        RayEmbedder(spec, workers=2, embedder_factory=reference)
    assert repr(reference) in str(caught.value)
    with pytest.raises(ConfigError, match=message):
        EngineOptions(engine="ray", workers=2, embedder_factory=reference)


def other_dim_factory(spec: EmbeddingSpec) -> FakeEmbedder:
    """A factory whose embedder ignores the requested dimension."""
    return FakeEmbedder(replace(spec, dim=32))


def test_a_factory_for_another_spec_fails_clearly_when_the_actors_start(
    spec: EmbeddingSpec,
) -> None:
    with RayEmbedder(spec, workers=1, embedder_factory=other_dim_factory) as pool:
        with pytest.raises(ConfigError, match="other_dim_factory") as caught:
            pool.start()  # what a refresh calls before it creates the table
        assert pool.engine_info()["model_loads"] == 0
        with pytest.raises(ConfigError, match="other_dim_factory"):
            pool.embed_documents(_texts(20))
    message = str(caught.value)
    assert message.startswith("the Ray workers could not start: embedder factory")
    assert "dim 32, asked for 64" in message
    assert "Traceback" not in message  # the worker's error, not Ray's wrapping


def test_cli_refresh_on_the_pool_with_a_named_factory(
    spec: EmbeddingSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = _texts(120)
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": np.arange(120), "text": texts}), source)
    argv = [
        "refresh", "--source", str(source), "--key", "id", "--text", "text",
        "--db", str(tmp_path / "db"), "--table", "docs", "--model", spec.model, "--dim", "64",
        "--device", "cpu", "--engine", "ray", "--workers", "2",
        "--embedder-factory", FAKE_FACTORY,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["inserted"], report["engine"], report["workers"], report["model_loads"]) == (
        120,
        "ray",
        2,
        2,
    )
    stored = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
    order = np.argsort(stored.column("key").to_numpy())
    vectors = np.stack(stored.column("vector").to_numpy(zero_copy_only=False))[order]
    assert np.array_equal(vectors, FakeEmbedder(spec).embed_documents(texts).vectors)


def test_dagster_asset_on_local_ray_refreshes_a_range_of_shards_in_one_run(
    spec: EmbeddingSpec, tmp_path: Path
) -> None:
    from dagster_ray import LocalRay

    from qwen3_pipeline.dagster.ray_resource import RayEmbedderResource

    embedder = RayEmbedderResource(
        model=spec.model,
        dim=64,
        device="cpu",
        workers=2,
        # Joins the module's Ray instance (a fresh run would start its own).
        ray_cluster=LocalRay(
            ray_init_options={"ignore_reinit_error": True, "include_dashboard": False}
        ),
    )
    asset = build_embedding_asset(
        key="vectors",
        source=_source(_texts(200)),
        source_config=CONFIG,
        spec=embedder,
        table="docs",
        partitioning=HashShards(4),
        retry_policy=None,
    )
    assert asset.partitions_def is not None
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [asset],
        resources={"embedder": embedder, "lancedb": LanceDBResource(uri=str(tmp_path / "db"))},
        instance=instance,
        tags=all_partitions_tags(asset.partitions_def),
    )
    assert result.success
    assert len(instance.get_runs()) == 1
    events = {
        e.materialization.partition: {
            k: getattr(v, "value", v) for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    assert sorted(events) == asset.partitions_def.get_partition_keys()
    one = next(iter(events.values()))
    assert run_counters(one)["inserted"] == 200
    assert (one["qwen3/run/engine"], one["qwen3/run/workers"], one["qwen3/run/model_loads"]) == (
        "ray",
        2,
        2,
    )
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert lancedb.connect(str(tmp_path / "db")).open_table("docs").count_rows() == 200


def test_demo_location_selects_the_ray_engine_by_environment() -> None:
    from dagster_ray import LocalRay

    from qwen3_pipeline.dagster.ray_resource import RayEmbedderResource
    from qwen3_pipeline.demo.location import DemoSettings, demo_embedder

    settings = DemoSettings.from_env(
        {
            "QWEN3_PIPELINE_ENGINE": "ray",
            "QWEN3_PIPELINE_WORKERS": "4",
            "QWEN3_PIPELINE_GPUS_PER_WORKER": "1",
        }
    )
    embedder = demo_embedder(settings)
    assert isinstance(embedder, RayEmbedderResource)
    assert (embedder.workers, embedder.gpus_per_worker) == (4, 1.0)
    assert isinstance(embedder.ray_cluster, LocalRay)
    joined = demo_embedder(
        DemoSettings.from_env(
            {"QWEN3_PIPELINE_ENGINE": "ray", "QWEN3_PIPELINE_RAY_ADDRESS": "ray://head:10001"}
        )
    )
    assert joined.engine_options().ray_address == "ray://head:10001"
    with pytest.raises(ConfigError, match="QWEN3_PIPELINE_ENGINE='spark'"):
        DemoSettings.from_env({"QWEN3_PIPELINE_ENGINE": "spark"})


def _raylets() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}


@pytest.mark.slow
def test_a_driver_killed_mid_refresh_leaves_a_consistent_table_and_rerun_converges(
    spec: EmbeddingSpec, tmp_path: Path
) -> None:
    import subprocess
    import time

    rows = 600
    texts = _texts(rows)
    source = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": np.arange(rows), "text": texts}), source)
    db = tmp_path / "db"
    argv = [
        sys.executable, "-m", "qwen3_pipeline.cli", "refresh", "--source", str(source),
        "--key", "id", "--text", "text", "--db", str(db), "--table", "docs",
        "--model", spec.model, "--dim", "64", "--device", "cpu", "--engine", "ray",
        "--workers", "2", "--chunk-rows", "60",
    ]  # fmt: skip
    before = _raylets()
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    committed = 0
    while time.monotonic() < deadline and driver.poll() is None:
        try:
            committed = lancedb.connect(str(db)).open_table("docs").count_rows()
        except (ValueError, OSError, RuntimeError):
            committed = 0
        if committed >= 120:  # at least two chunks landed: kill the driver mid-run
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.stderr.read().decode()[-3000:] if driver.stderr else ""
    driver.kill()
    driver.wait(timeout=30)
    # The local Ray instance the driver started dies with it (no orphaned raylet).
    deadline = time.monotonic() + 60
    while _raylets() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _raylets() - before
    table = lancedb.connect(str(db)).open_table("docs").to_arrow()
    assert 120 <= table.num_rows < rows
    assert len(set(table.column("key").to_pylist())) == table.num_rows  # no duplicates

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["inserted"] == rows - table.num_rows
    assert report["unchanged"] == table.num_rows
    final = lancedb.connect(str(db)).open_table("docs").to_arrow()
    assert sorted(final.column("key").to_pylist()) == list(range(rows))
