"""Token-budgeted, length-sorted batch planning (pure functions over token counts).

Sorting by *token* length (not characters) and packing while ``rows * longest <= budget`` keeps
the positions the model computes close to the real tokens: padding is counted in the budget, so
a batch of long texts holds few rows and a batch of short texts many; where to cut between
batches is chosen to minimise computed positions. The planner returns index
arrays into the caller's list; writing each batch's output back at those indices restores the
caller's order without a second permutation.
"""

from collections.abc import Sequence

import numpy as np


def plan_batches(
    lengths: Sequence[int] | np.ndarray,
    *,
    max_batch_tokens: int,
    max_batch_rows: int,
    batch_overhead_tokens: int | None = None,
) -> list[np.ndarray]:
    """Group row indices into batches whose padded size fits a token budget.

    Rows are sorted longest first (so an out-of-memory batch shows up at the start of a call,
    not after an hour) and cut into contiguous runs. Every batch obeys
    ``rows * longest <= max_batch_tokens`` (a row longer than the budget gets a batch of its
    own) and ``rows <= max_batch_rows``. Among all such cuts the planner picks the one with the
    fewest computed positions, charging ``batch_overhead_tokens`` per batch so it does not
    shatter the work into tiny batches (a dynamic programme over the sorted lengths, linear in
    rows times the row cap). Greedy packing wastes most where lengths are sparse (the long
    tail of a skewed corpus); the cut chosen here keeps padding efficiency high there too.

    Args:
        lengths: Token count of each row (after truncation), in the caller's order.
        max_batch_tokens: Budget per batch counting padding: ``rows * longest``.
        max_batch_rows: Cap on rows per batch.
        batch_overhead_tokens: Fixed cost of one forward pass, in token positions; default
            ``max(1, max_batch_tokens // 64)``. Larger values give fewer, fuller batches.

    Returns:
        Index arrays (int64) into ``lengths``; every index appears in exactly one batch.

    Raises:
        ValueError: A budget or cap below 1, or a negative length.

    Example:
        >>> plan = plan_batches(
        ...     [3, 10, 4, 9], max_batch_tokens=20, max_batch_rows=8, batch_overhead_tokens=8
        ... )
        >>> [b.tolist() for b in plan]
        [[1, 3], [2, 0]]
    """
    if max_batch_tokens < 1 or max_batch_rows < 1:
        raise ValueError(
            f"max_batch_tokens={max_batch_tokens} and max_batch_rows={max_batch_rows} "
            "must both be at least 1"
        )
    counts = np.asarray(lengths, dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError("token lengths must be non-negative")
    overhead = (
        max(1, max_batch_tokens // 64) if batch_overhead_tokens is None else batch_overhead_tokens
    )
    # Stable sort on the negated length: ties keep the caller's order, so plans are reproducible.
    order = np.argsort(-counts, kind="stable")
    sizes = _optimal_batch_sizes(
        np.maximum(counts[order], 1), max_batch_tokens, max_batch_rows, overhead
    )
    batches, start = [], 0
    while start < counts.size:
        batches.append(order[start : start + sizes[start]])
        start += int(sizes[start])
    return batches


def _optimal_batch_sizes(
    sorted_lengths: np.ndarray, max_batch_tokens: int, max_batch_rows: int, overhead: int
) -> np.ndarray:
    # cost[i] = cheapest plan for rows i.. (sorted longest first), where a batch starting at i
    # with k rows costs k * sorted_lengths[i] + overhead. Solved backwards from the last row.
    total = sorted_lengths.size
    cost = np.zeros(total + 1, dtype=np.float64)
    size = np.ones(total, dtype=np.int64)
    for i in range(total - 1, -1, -1):
        longest = int(sorted_lengths[i])
        most = max(1, min(max_batch_rows, max_batch_tokens // longest, total - i))
        candidates = longest * np.arange(1, most + 1) + cost[i + 1 : i + most + 1]
        best = int(np.argmin(candidates))
        size[i] = best + 1
        cost[i] = candidates[best] + overhead
    return size


def padded_positions(lengths: Sequence[int] | np.ndarray, batch: np.ndarray) -> int:
    """Return the positions a padded forward pass over ``batch`` computes (rows x longest)."""
    counts = np.asarray(lengths, dtype=np.int64)[batch]
    return int(counts.size * counts.max()) if counts.size else 0


def split_batch(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a batch in two halves (for retrying after running out of memory)."""
    middle = max(1, batch.size // 2)
    return batch[:middle], batch[middle:]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id sequences into ``(input_ids, attention_mask)`` int64 arrays.

    Left padding puts every row's last real token in the last column, which is what
    last-token pooling reads.

    Args:
        sequences: Token ids per row (non-empty).
        pad_id: Id written into padding positions (masked out).

    Returns:
        ``input_ids`` and ``attention_mask``, both ``[rows, longest]``.
    """
    longest = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, longest - len(ids) :] = ids
            attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask
