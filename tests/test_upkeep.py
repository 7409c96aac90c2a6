"""Table upkeep on a real LanceDB table: compaction and pruning keep tagged versions."""

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from qwen3_pipeline.consumers.vector_search import IndexPolicy, maintain_vector_index
from qwen3_pipeline.core.errors import StoreError
from qwen3_pipeline.store.upkeep import (
    fragment_count,
    needs_compaction,
    optimize_table,
    safe_cleanup_age,
)

DIM = 8
TAG = "model-v1"
OLD_VERSIONS = (1, 2, 3)  # untagged, older than the tagged version
TAGGED_VERSION = 4
# Small enough that the untagged versions written a second before the tag fall behind it.
MARGIN = timedelta(milliseconds=500)
ZERO_CUTOFF_WARNING = "ignore:optimize\\(cleanup_older_than=0\\):UserWarning"


def _rows(keys: list[int]) -> pa.Table:
    vectors = np.random.default_rng(keys[0]).standard_normal((len(keys), DIM), dtype=np.float32)
    return pa.table(
        {
            "key": pa.array(keys, pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        }
    )


def _versions(table: Any) -> set[int]:
    return {int(v["version"]) for v in table.list_versions()}


def _keys(table: Any) -> list[int]:
    return sorted(table.to_arrow().column("key").to_pylist())


def _tagged_table(path: Path, *, gap_s: float = 0.0) -> Any:
    """Versions 1-3 untagged, then (``gap_s`` later) version 4 tagged, then version 5."""
    created = lancedb.connect(path).create_table("docs", _rows([0]))
    created.add(_rows([1]))
    created.add(_rows([2]))
    time.sleep(gap_s)
    created.add(_rows([3]))
    created.tags.create(TAG, TAGGED_VERSION)
    created.add(_rows([4]))
    assert _versions(created) == {1, 2, 3, 4, 5}
    return created


@pytest.fixture
def table(tmp_path: Path) -> Any:
    return _tagged_table(tmp_path)


@pytest.mark.filterwarnings(ZERO_CUTOFF_WARNING)
def test_plain_optimize_raises_on_an_old_tagged_version(table: Any) -> None:
    # Why optimize_table exists: LanceDB refuses to prune past a tagged version (after it has
    # already committed the compaction), so a plain optimize() fails every upkeep run.
    with pytest.raises(RuntimeError, match="tagged version"):
        table.optimize(cleanup_older_than=timedelta(0))
    assert OLD_VERSIONS[0] in _versions(table)  # nothing was pruned


def test_optimize_table_prunes_untagged_old_versions_and_keeps_the_tagged_one(
    tmp_path: Path,
) -> None:
    # The untagged versions are a second older than the tagged one, more than the margin.
    table = _tagged_table(tmp_path, gap_s=1.1)
    before = fragment_count(table)
    result = optimize_table(table, cleanup_older_than=timedelta(0), clock_margin=MARGIN)

    versions = _versions(table)
    assert versions.isdisjoint(OLD_VERSIONS)
    assert TAGGED_VERSION in versions
    assert result.versions_pruned == len(OLD_VERSIONS)
    assert result.fragments_before == before == 5
    assert result.fragments_after < before
    assert result.version_after > result.version_before == 5
    assert result.cleanup_older_than is not None
    assert result.cleanup_older_than > timedelta(0)  # moved back for the tag
    assert table.tags.list()[TAG]["version"] == TAGGED_VERSION
    assert _keys(table) == [0, 1, 2, 3, 4]
    table.checkout(TAG)
    assert _keys(table) == [0, 1, 2, 3]
    table.checkout_latest()


def test_optimize_table_without_cutoff_compacts_and_prunes_nothing(table: Any) -> None:
    result = optimize_table(table, cleanup_older_than=None)
    assert result.versions_pruned == 0
    assert result.cleanup_older_than is None
    assert result.fragments_after < result.fragments_before
    assert {1, 2, 3, 4, 5} <= _versions(table)


@pytest.mark.filterwarnings(ZERO_CUTOFF_WARNING)
def test_optimize_table_without_tags_prunes_everything_but_the_latest(tmp_path: Path) -> None:
    table = lancedb.connect(tmp_path).create_table("docs", _rows([0]))
    table.add(_rows([1]))
    table.add(_rows([2]))
    calls: list[str] = []

    def retry(action: Any) -> object:
        calls.append("optimize")
        return action()

    result = optimize_table(table, cleanup_older_than=timedelta(0), retry=retry)
    assert calls == ["optimize"]  # no tags: compaction and pruning in one call
    assert _versions(table) == {table.version}
    assert result.cleanup_older_than == timedelta(0)
    assert _keys(table) == [0, 1, 2]


def test_retry_runs_each_optimize_call(table: Any) -> None:
    calls: list[str] = []

    def retry(action: Any) -> object:
        calls.append("optimize")
        return action()

    optimize_table(table, cleanup_older_than=timedelta(0), retry=retry, clock_margin=MARGIN)
    assert calls == ["optimize", "optimize"]  # with tags: compact and index, then prune


def test_safe_cleanup_age_stops_at_the_oldest_tag(table: Any, tmp_path: Path) -> None:
    moved = safe_cleanup_age(table, timedelta(0), clock_margin=MARGIN)
    assert MARGIN < moved < timedelta(minutes=1)
    assert safe_cleanup_age(table, timedelta(days=7)) == timedelta(days=7)
    untagged = lancedb.connect(tmp_path / "other").create_table("docs", _rows([0]))
    assert safe_cleanup_age(untagged, timedelta(0)) == timedelta(0)


def test_needs_compaction_counts_fragments(table: Any) -> None:
    assert fragment_count(table) == 5
    assert needs_compaction(table, max_fragments=4)
    assert not needs_compaction(table, max_fragments=5)


def test_lance_failures_are_store_errors(table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**_: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(table, "optimize", broken)
    with pytest.raises(StoreError, match="disk on fire"):
        optimize_table(table, cleanup_older_than=timedelta(days=7))


def test_index_upkeep_consumer_keeps_tagged_versions(table: Any) -> None:
    policy = IndexPolicy(min_rows=1_000, max_fragments=1, cleanup_older_than=timedelta(0))
    upkeep = maintain_vector_index(table, policy)
    assert upkeep.action == "compacted"
    assert upkeep.version_after > upkeep.version_before
    assert fragment_count(table) == 1
    assert TAGGED_VERSION in _versions(table)
    table.checkout(TAG)
    assert _keys(table) == [0, 1, 2, 3]
