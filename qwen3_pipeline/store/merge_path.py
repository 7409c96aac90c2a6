"""Which join a write takes: look keys up in the key's index, or scan the whole table.

LanceDB 0.40's ``merge_insert`` matches the written keys against the table in one of two
ways. With a scalar index on ``key`` it looks them up in the index, and joins only the rows
the index does not cover yet (those written since it was last updated) by a scan. Without
one, or with ``use_index(False)``, it scans the key column of the whole table into a hash
table: 55 to 70 bytes of memory per row already in the table, held for the commit.

The index wins while its unindexed tail is short and loses once the tail is long: with 500,000
rows unindexed of a 1M-row table, a commit of 10,000 rows took 0.199 s and 253 MiB looking
keys up against 0.042 s and 71 MiB scanning (``benchmarks/merge_memory_bench.py --tails``).
A refresh leaves the tail long when it writes many rows into an indexed table (a later shard
of a backfill run shard by shard, a large load): its commits are folded into the index only
by the end-of-run compaction. So each write asks the index how much it covers (a metadata
read, under a millisecond) and scans once the tail passes :data:`MAX_UNINDEXED_SHARE` of the
indexed rows.
"""

from typing import Any

MAX_UNINDEXED_SHARE = 0.08
"""The longest unindexed tail, as a share of the indexed rows, for which a write uses the
key's index. The measured crossover in time (``benchmarks/merge_memory_bench.py --tails``)
is about 5% of a 1M-row table and 7-14% of a 4M-row one: a lookup's cost follows the tail, a
scan's the whole table, so the crossover share grows with the table towards about 10%."""


def key_index_coverage(table: Any) -> tuple[int, int] | None:
    """The rows the key's index covers and those it does not, or None without one.

    Args:
        table: An open LanceDB table.

    Returns:
        ``(indexed_rows, unindexed_rows)`` of the scalar index on ``key``, or None when the
        key has no index of its own.
    """
    for index in table.list_indices():
        if list(index.columns) == ["key"]:
            return int(index.num_indexed_rows), int(index.num_unindexed_rows)
    return None


def merge_uses_index(coverage: tuple[int, int] | None) -> bool:
    """Whether a write should look its keys up in the key's index rather than scan.

    Args:
        coverage: :func:`key_index_coverage` of the table (None: no index).

    Returns:
        True when there is no index (nothing to choose) or its unindexed tail is at most
        :data:`MAX_UNINDEXED_SHARE` of the rows it covers.

    Example:
        >>> merge_uses_index((1_000_000, 20_000))
        True
        >>> merge_uses_index((1_000_000, 250_000))
        False
        >>> merge_uses_index(None)
        True
    """
    if coverage is None:
        return True
    indexed, unindexed = coverage
    return unindexed <= indexed * MAX_UNINDEXED_SHARE
