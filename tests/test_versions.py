"""Checked-version tags, default readers, before-swap tags and rollback, on a real LanceDB."""

import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import lancedb
import pyarrow as pa
import pytest

from qwen3_pipeline.cli import main
from qwen3_pipeline.consumers import checks
from qwen3_pipeline.consumers.vector_search import IndexPolicy, open_vector_table
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.consumer_assets import build_vector_index_asset
from qwen3_pipeline.dagster.embedding_asset import build_embedding_asset
from qwen3_pipeline.dagster.metadata import TABLE_CHECKED_VERSION, TABLE_VERSION
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, LanceDBResource
from qwen3_pipeline.dagster.vectors import open_vectors
from qwen3_pipeline.embedding.interface import Embedder, EncodeResult
from qwen3_pipeline.engine.refresh import RefreshReport, refresh
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.store import (
    checked_versions,
    latest_before_swap_tag,
    latest_checked_version,
    prune_checked_tags,
    resolve_read_version,
    rollback,
    tag_before_swap,
    tag_checked,
)
from qwen3_pipeline.store.upkeep import optimize_table
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import CONFIG, make_rows, spec

TABLE = "docs"


def run(db: str, rows: pa.Table, *, dim: int = 32, **kwargs) -> RefreshReport:
    return refresh(
        source=ArrowSource(rows),
        config=CONFIG,
        embedder=FakeEmbedder(spec(dim)),
        db_uri=db,
        table=TABLE,
        progress=False,
        **kwargs,
    )


def open_table(db: str, name: str = TABLE):
    return lancedb.connect(db).open_table(name)


def version_count(table) -> int:
    return len(table.list_versions())


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "lancedb")


# --------------------------------------------------------------------------- tags


def test_tag_checked_is_idempotent_and_latest_follows_the_newest(db: str) -> None:
    run(db, make_rows(range(10)))
    table = open_table(db)
    assert latest_checked_version(table) is None
    first = int(table.version)

    assert tag_checked(table, first) == f"checked-v{first}"
    assert tag_checked(table, first) == f"checked-v{first}"  # again: nothing new
    run(db, make_rows(range(10), version=1))
    table = open_table(db)
    second = int(table.version)
    assert second > first
    tag_checked(table, second)

    assert checked_versions(table) == [first, second]
    assert latest_checked_version(table) == second
    assert table.tags.list()[f"checked-v{first}"]["version"] == first
    with pytest.raises(ConfigError, match="at least 1"):
        tag_checked(table, 0)


def test_prune_keeps_the_newest_checked_tags_and_young_before_swap_tags(db: str) -> None:
    versions = []
    for edit in range(4):
        run(db, make_rows(range(10), version=edit))
        versions.append(int(open_table(db).version))
    table = open_table(db)
    for version in versions:
        tag_checked(table, version)
    table.tags.create("release-1", versions[0])  # somebody else's tag: never touched
    now = datetime(2025, 6, 1, 12, tzinfo=UTC)
    old = tag_before_swap(table, versions[0], now=now - timedelta(days=40))
    young = tag_before_swap(table, versions[1], now=now - timedelta(days=2))
    assert old == f"before-swap-v{versions[0]}-20250422T120000Z"
    # Once per version: a retried swap makes no second tag.
    assert tag_before_swap(table, versions[1], now=now) == young

    deleted = prune_checked_tags(table, keep=2, now=now)

    assert sorted(deleted) == sorted([f"checked-v{versions[0]}", f"checked-v{versions[1]}", old])
    assert set(table.tags.list()) == {
        f"checked-v{versions[2]}",
        f"checked-v{versions[3]}",
        young,
        "release-1",
    }
    assert latest_before_swap_tag(table) == young
    assert prune_checked_tags(table, keep=2, now=now) == []
    with pytest.raises(ConfigError, match="keep must be an integer of at least 1"):
        prune_checked_tags(table, keep=0)


def test_upkeep_still_prunes_old_versions_once_checked_tags_are_pruned(db: str) -> None:
    for edit in range(3):
        run(db, make_rows(range(10), version=edit))
    table = open_table(db)
    old = int(table.version)
    tag_checked(table, old)
    time.sleep(1.2)  # versions so far are "old"; the ones below are not
    recent = []
    for edit in range(3, 6):
        run(db, make_rows(range(10), version=edit))
        table = open_table(db)
        recent.append(int(table.version))
        tag_checked(table, recent[-1])
    assert prune_checked_tags(table, keep=3) == [f"checked-v{old}"]

    before = {int(v["version"]) for v in table.list_versions()}
    result = optimize_table(
        table,
        cleanup_older_than=timedelta(milliseconds=500),
        clock_margin=timedelta(milliseconds=300),
    )

    after = {int(v["version"]) for v in table.list_versions()}
    assert result.versions_pruned > 0
    assert old in before - after  # its tag gone, the old version is pruned
    assert set(range(recent[0], max(before) + 1)) <= after  # the oldest tag and later stay
    for version in recent:
        table.checkout(f"checked-v{version}")
        assert table.count_rows() == 10
    table.checkout_latest()


# --------------------------------------------------------------------------- readers


def test_readers_serve_the_newest_checked_version_not_a_newer_unchecked_one(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    run(db, make_rows(range(10)))
    with caplog.at_level(logging.WARNING, logger="qwen3_pipeline"):
        unchecked = open_vector_table(db, TABLE)
    # No checked version at all: the latest, with a warning that it is unchecked.
    assert unchecked.version == int(open_table(db).version)
    assert unchecked.checked is False
    assert "UNCHECKED" in caplog.text

    checked = int(open_table(db).version)
    tag_checked(open_table(db), checked)
    run(db, make_rows(range(15), version=1))  # newer, never checked
    latest = int(open_table(db).version)
    assert latest > checked

    vectors = open_vector_table(db, TABLE)
    assert vectors.version == checked
    assert vectors.checked is True
    assert vectors.count_rows() == 10
    pinned = open_vector_table(db, TABLE, version=latest)  # an explicit pin still wins
    assert pinned.version == latest
    assert pinned.count_rows() == 15
    assert pinned.checked is False
    assert resolve_read_version(open_table(db), None) == checked
    assert resolve_read_version(open_table(db), latest) == latest


# --------------------------------------------------------------------------- Dagster

DAGSTER_CONFIG = SourceConfig(key="doc_id", text_columns=("text",), carry=("title",))
FAKE = FakeEmbedderResource(dim=64)


def _documents(n: int, suffix: str = "") -> pa.Table:
    return pa.table(
        {
            "doc_id": [f"doc:{i}" for i in range(n)],
            "title": [f"Title {i}" for i in range(n)],
            "text": [f"Document number {i} about topic {i % 7}{suffix}" for i in range(n)],
        }
    )


class _OffNormEmbedder:
    """Returns vectors of norm 2: the unit-vector check fails on every row it writes."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner

    @property
    def spec(self) -> EmbeddingSpec:
        return self._inner.spec

    def embed_documents(self, texts: Sequence[str]) -> EncodeResult:
        result = self._inner.embed_documents(texts)
        return EncodeResult(
            vectors=result.vectors * 2.0,
            n_tokens=result.n_tokens,
            truncated=result.truncated,
            failures=result.failures,
            stats=result.stats,
        )

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        return self._inner.embed_queries(queries)


class OffNormEmbedderResource(FakeEmbedderResource):
    def load_embedder(self, spec: EmbeddingSpec) -> Embedder:
        return _OffNormEmbedder(super().load_embedder(spec))


def _dagster_asset(state: dict[str, pa.Table]) -> dg.AssetsDefinition:
    return build_embedding_asset(
        key="document_vectors",
        source=lambda: ArrowSource(state["rows"]),
        source_config=DAGSTER_CONFIG,
        spec=FAKE.embedding_spec(),
        table=TABLE,
        partitioning=None,
        retry_policy=None,
    )


def _resources(db: str, embedder: FakeEmbedderResource = FAKE) -> dict[str, object]:
    return {"embedder": embedder, "lancedb": LanceDBResource(uri=db)}


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    (event,) = result.get_asset_materialization_events()
    return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}


def test_a_materialization_whose_checks_failed_is_not_served_by_default(db: str) -> None:
    state = {"rows": _documents(40)}
    asset = _dagster_asset(state)
    instance = dg.DagsterInstance.ephemeral()

    good = dg.materialize([asset], resources=_resources(db), instance=instance)
    assert good.success
    first = _metadata(good)
    good_version = first[TABLE_VERSION]
    assert first[TABLE_CHECKED_VERSION] == good_version
    assert latest_checked_version(open_table(db)) == good_version

    state["rows"] = _documents(40, suffix=" (revised)")
    bad = dg.materialize(
        [asset],
        resources=_resources(db, OffNormEmbedderResource(dim=64)),
        instance=instance,
        raise_on_error=False,
    )
    evaluations = {e.check_name: e.passed for e in bad.get_asset_check_evaluations()}
    assert evaluations[checks.UNIT_VECTORS] is False
    second = _metadata(bad)
    assert second[TABLE_VERSION] > good_version
    assert second[TABLE_CHECKED_VERSION] == good_version  # the failed version got no tag
    assert checked_versions(open_table(db)) == [good_version]

    served = open_vectors("document_vectors", instance=instance)
    assert served.version == good_version
    assert served.checked is True
    assert open_vector_table(db, TABLE).version == good_version
    # The failed version stays readable on purpose, by an explicit pin.
    assert open_vectors("document_vectors", instance=instance, version=second[TABLE_VERSION])


def test_checks_run_alone_tag_the_version_they_read_when_they_pass(db: str) -> None:
    state = {"rows": _documents(30)}
    asset = _dagster_asset(state)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([asset], resources=_resources(db), instance=instance).success
    table = open_table(db)
    # Writes behind the pipeline's back that leave the rows as they were: unchecked.
    row = table.search().where("key = 'doc:3'").to_arrow()
    table.delete("key = 'doc:3'")
    table.add(row)
    latest = int(open_table(db).version)
    assert latest_checked_version(open_table(db)) < latest

    alone = dg.materialize(
        [asset],
        selection=dg.AssetSelection.checks_for_assets(asset),
        resources=_resources(db),
        instance=instance,
    )

    assert all(e.passed for e in alone.get_asset_check_evaluations())
    assert latest_checked_version(open_table(db)) == latest
    assert open_vectors("document_vectors", instance=instance).version == latest


def test_open_vectors_reads_the_index_upkeep_of_the_checked_version(db: str) -> None:
    state = {"rows": _documents(30)}
    asset = _dagster_asset(state)
    # Compact whenever there are two fragments: the upkeep then commits after the refresh.
    index = build_vector_index_asset(
        embedding_asset=asset, policy=IndexPolicy(max_fragments=1), retry_policy=None
    )
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([asset], resources=_resources(db), instance=instance).success
    state["rows"] = _documents(40)
    result = dg.materialize([asset, index], resources=_resources(db), instance=instance)
    assert result.success
    checked = latest_checked_version(open_table(db))
    upkept = int(open_table(db).version)
    assert upkept > checked  # the upkeep's commits are not tagged themselves

    # The upkeep started from the checked version: its version holds the same rows.
    vectors = open_vectors("document_vectors", instance=instance, index_asset_key=index.key)
    assert vectors.version == upkept
    assert vectors.count_rows() == 40
    assert open_vectors("document_vectors", instance=instance).version == checked

    # A newer checked version the upkeep did not start from is read itself, not the upkeep's.
    open_table(db).delete("key = 'doc:0'")
    tag_checked(open_table(db), int(open_table(db).version))
    newer = open_vectors("document_vectors", instance=instance, index_asset_key=index.key)
    assert newer.version == int(open_table(db).version)
    assert newer.count_rows() == 39


# --------------------------------------------------------------------------- rollback


def test_rollback_restores_the_version_before_a_rebuild_swap_in_one_commit(db: str) -> None:
    run(db, make_rows(range(12)))
    live = open_table(db)
    before_swap = int(live.version)
    tag_checked(live, before_swap)  # as the embedding asset does when its checks pass

    report = run(db, make_rows(range(12)), dim=48, rebuild=True)
    assert report.inserted == 12
    table = open_table(db)
    tag = latest_before_swap_tag(table)
    assert tag is not None
    assert tag.startswith(f"before-swap-v{before_swap}-")
    assert table.tags.list()[tag]["version"] == before_swap
    swapped = int(table.version)
    tag_checked(table, swapped)  # the rebuilt version passed its checks too
    assert open_vector_table(db, TABLE).spec.dim == 48
    versions = version_count(table)

    result = rollback(table)

    assert version_count(open_table(db)) == versions + 1  # one commit
    assert result.from_version == swapped
    assert result.to_version == before_swap
    assert result.version == swapped + 1
    assert result.tag == tag
    assert result.committed is True
    assert result.checked is True  # the restored version was checked
    assert result.retired_tags == [f"checked-v{swapped}"]
    vectors = open_vector_table(db, TABLE)
    assert vectors.version == result.version
    assert vectors.spec.dim == 32
    assert vectors.count_rows() == 12


def test_rollback_of_an_unchecked_version_leaves_readers_on_the_older_checked_one(
    db: str,
) -> None:
    run(db, make_rows(range(8)))
    checked = int(open_table(db).version)
    tag_checked(open_table(db), checked)
    run(db, make_rows(range(8), version=1))  # unchecked: written without checks
    run(db, make_rows(range(8)), dim=48, rebuild=True)
    table = open_table(db)
    tag_checked(table, int(table.version))

    result = rollback(table)

    assert result.checked is False
    assert result.retired_tags == [f"checked-v{result.from_version}"]
    assert checked_versions(open_table(db)) == [checked]
    assert open_vector_table(db, TABLE).version == checked  # the old spec, checked
    assert open_vector_table(db, TABLE).spec.dim == 32


def test_rollback_errors_name_the_available_tags(db: str) -> None:
    run(db, make_rows(range(5)))
    table = open_table(db)
    tag_checked(table, int(table.version))
    with pytest.raises(ConfigError, match=r"no before-swap tag.*checked-v"):
        rollback(table)
    with pytest.raises(ConfigError, match=r"no tag 'nope'.*Available tags.*checked-v"):
        rollback(table, "nope")
    with pytest.raises(ConfigError, match="no version 999"):
        rollback(table, 999)
    # Restoring the latest version itself commits nothing.
    same = rollback(table, int(table.version))
    assert same.committed is False
    assert same.version == same.from_version


# --------------------------------------------------------------------------- CLI


def test_cli_rollback_prints_json_and_exits_2_on_unknown_names(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(db, make_rows(range(6)))
    before_swap = int(open_table(db).version)
    run(db, make_rows(range(6)), dim=48, rebuild=True)
    args = ["rollback", "--db", db, "--table", TABLE]

    assert main([*args, "--to", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no tag 'nope'" in err
    assert f"before-swap-v{before_swap}-" in err  # the available tags are listed
    assert main(["rollback", "--db", db, "--table", "missing"]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["to_version"] == before_swap
    assert result["committed"] is True
    assert result["checked"] is False
    assert result["tag"].startswith(f"before-swap-v{before_swap}-")
    assert open_vector_table(db, TABLE).spec.dim == 32

    assert main([*args, "--to", str(result["from_version"])]) == 0  # by number: forward again
    again = json.loads(capsys.readouterr().out)
    assert again["to_version"] == result["from_version"]
    assert open_vector_table(db, TABLE).spec.dim == 48
