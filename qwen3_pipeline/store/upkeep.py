"""Table upkeep: compaction, index update and version pruning that never touch tagged versions.

Every ``optimize()`` of a vector table goes through :func:`optimize_table`, whoever calls it
(the store after a refresh, the index-upkeep consumer), so that a tagged version (a model
lifecycle pin, a release) is never pruned and never makes the upkeep fail.

LanceDB 0.40 facts this module relies on (checked against the installed package):
``Table.optimize(*, cleanup_older_than=None, delete_unverified=False, retrain=False)`` compacts
files, folds new rows into the indices and prunes versions older than ``cleanup_older_than``
(None means LanceDB's default of 7 days; a cut-off of 0 or less warns), returns nothing in the
sync API, and commits no version when there is nothing to compact or index. The pruning raises
``RuntimeError`` ("tagged version(s) have been marked for cleanup") when a tagged version is
older than the cut-off, after the compaction was already committed; it cannot be told to skip
tagged versions (``error_if_tagged_old_versions`` belongs to pylance's ``cleanup_old_versions``,
which LanceDB does not expose). ``Table.tags.list()`` maps tag names to ``{"version": int,
"manifest_size": int}``; ``Table.list_versions()`` returns ``{"version", "timestamp",
"metadata"}`` dicts whose timestamps are naive local time; ``Table.stats()["fragment_stats"]
["num_fragments"]`` counts the data fragments.

Example:
    >>> import lancedb  # doctest: +SKIP
    >>> table = lancedb.connect("data/lancedb").open_table("documents")  # doctest: +SKIP
    >>> if needs_compaction(table, max_fragments=64):  # doctest: +SKIP
    ...     optimize_table(table, cleanup_older_than=timedelta(days=7)).versions_pruned
    12
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from qwen3_pipeline.core.errors import Qwen3PipelineError, StoreError

logger = logging.getLogger(__name__)

# Room between the cut-off computed here and the one LanceDB computes when it prunes: the time
# the prune call takes to start (and retry sleeps), plus clock skew between writers.
DEFAULT_CLOCK_MARGIN = timedelta(minutes=1)
# A cut-off no version can be older than: optimize() then compacts and indexes, pruning nothing.
_KEEP_ALL = timedelta(days=36_500)
_T = TypeVar("_T")

# Runs an action, retrying it on commit conflicts (e.g. the store's backoff helper).
Retry = Callable[[Callable[[], object]], object]


@dataclass(frozen=True, kw_only=True)
class UpkeepResult:
    """What one :func:`optimize_table` did.

    Attributes:
        version_before: Lance version before.
        version_after: Lance version after (compaction and index update commit versions).
        fragments_before: Data fragments before.
        fragments_after: Data fragments after.
        versions_pruned: Versions listed before that are gone after.
        cleanup_older_than: The cut-off applied (later than asked when a tagged version is
            older); None when nothing was pruned on purpose.
    """

    version_before: int
    version_after: int
    fragments_before: int
    fragments_after: int
    versions_pruned: int
    cleanup_older_than: timedelta | None


def fragment_count(table: Any) -> int:
    """Return the number of data fragments of ``table`` (each write commit adds some).

    Raises:
        StoreError: LanceDB could not read the table statistics.
    """
    return int(_lance("read table stats", table.stats)["fragment_stats"]["num_fragments"])


def needs_compaction(table: Any, max_fragments: int) -> bool:
    """Whether ``table`` has more than ``max_fragments`` fragments, i.e. is worth compacting.

    Raises:
        StoreError: LanceDB could not read the table statistics.
    """
    return fragment_count(table) > max_fragments


def safe_cleanup_age(
    table: Any, wanted: timedelta, *, clock_margin: timedelta = DEFAULT_CLOCK_MARGIN
) -> timedelta:
    """Return the pruning cut-off to pass to ``optimize()``: ``wanted``, or longer if a tag needs.

    LanceDB raises when a tagged version is older than the cut-off, so the cut-off is moved
    back to ``clock_margin`` before the oldest tagged version: that version and every later one
    are kept, older untagged versions are still pruned.

    Args:
        table: The live ``lancedb`` table.
        wanted: Prune versions older than this.
        clock_margin: How far before the oldest tagged version the cut-off stays (covers the
            time until LanceDB computes its own cut-off, and clock skew).

    Raises:
        StoreError: LanceDB could not list the tags or versions.

    Example:
        >>> safe_cleanup_age(table, timedelta(days=7))  # doctest: +SKIP
        datetime.timedelta(days=30, seconds=60)
    """
    tags = _lance("list tags", table.tags.list)
    if not tags:
        return wanted
    tagged = {int(tag["version"]) for tag in tags.values()}
    versions = _lance("list versions", table.list_versions)
    stamps = [v["timestamp"] for v in versions if int(v["version"]) in tagged]
    if not stamps:
        return wanted
    oldest = min(stamps)
    now = datetime.now(oldest.tzinfo)  # naive local time, like list_versions()
    return max(wanted, now - oldest + clock_margin)


def optimize_table(
    table: Any,
    *,
    cleanup_older_than: timedelta | None,
    retry: Retry | None = None,
    clock_margin: timedelta = DEFAULT_CLOCK_MARGIN,
) -> UpkeepResult:
    """Compact ``table``, fold new rows into its indices and prune old untagged versions.

    Tagged versions are never pruned: the cut-off is moved by :func:`safe_cleanup_age`. When
    the table has tags, compaction and index update run first without pruning (they can take
    minutes, long enough for a cut-off computed beforehand to pass a tagged version), then the
    pruning runs with a cut-off computed just before it.

    Args:
        table: The live ``lancedb`` table (latest version).
        cleanup_older_than: Prune versions older than this; keep it longer than any reader
            pins a version. None prunes nothing (unlike LanceDB's ``optimize``, where None
            means 7 days).
        retry: Runs each ``optimize()`` call, retrying commit conflicts (the store passes
            ``partial(self._with_retries, "optimize")``); None runs it once.
        clock_margin: See :func:`safe_cleanup_age`.

    Returns:
        What was done.

    Raises:
        StoreError: LanceDB failed (whatever ``retry`` raises is passed through).

    Example:
        >>> table.tags.create("model-v1", 3)  # doctest: +SKIP
        >>> optimize_table(table, cleanup_older_than=timedelta(days=7))  # doctest: +SKIP
        UpkeepResult(version_before=40, version_after=42, fragments_before=38, ...)
        >>> table.checkout("model-v1")  # doctest: +SKIP
    """
    run: Retry = retry or _run_once
    version_before = int(table.version)
    versions_before = _version_numbers(table)
    fragments_before = fragment_count(table)
    applied: timedelta | None = None
    try:
        if cleanup_older_than is None or _lance("list tags", table.tags.list):
            run(lambda: table.optimize(cleanup_older_than=_KEEP_ALL))
        if cleanup_older_than is not None:

            def prune() -> None:
                nonlocal applied  # computed at each try, so a retry's sleep cannot stale it
                applied = safe_cleanup_age(table, cleanup_older_than, clock_margin=clock_margin)
                table.optimize(cleanup_older_than=applied)

            run(prune)
    except Qwen3PipelineError:
        raise
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError
        raise StoreError(f"LanceDB could not optimize the table: {e}") from e
    result = UpkeepResult(
        version_before=version_before,
        version_after=int(table.version),
        fragments_before=fragments_before,
        fragments_after=fragment_count(table),
        versions_pruned=len(versions_before - _version_numbers(table)),
        cleanup_older_than=applied,
    )
    logger.info(
        "optimized table: %d -> %d fragments, %d versions pruned (cut-off %s)",
        result.fragments_before,
        result.fragments_after,
        result.versions_pruned,
        applied,
    )
    return result


def _version_numbers(table: Any) -> set[int]:
    return {int(v["version"]) for v in _lance("list versions", table.list_versions)}


def _run_once(action: Callable[[], object]) -> object:
    return action()


def _lance(what: str, action: Callable[[], _T]) -> _T:
    try:
        return action()
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError
        raise StoreError(f"LanceDB could not {what}: {e}") from e
