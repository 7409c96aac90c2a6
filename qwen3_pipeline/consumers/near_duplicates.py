"""The near-duplicate report of a pinned vector table, whichever orchestrator runs it.

:func:`near_duplicate_report` is the whole computation behind the demo's near-duplicate
output (Dagster's ``near_duplicate_documents`` asset, the Airflow demo's
``near_duplicates`` task): read the pinned vectors, find each row's most similar rows above a
threshold (:func:`~qwen3_pipeline.consumers.vector_search.near_duplicate_pairs`), label both sides,
and stamp
every pair with the Lance version read and the time of the computation. Writing it where the
orchestrator keeps it (a DuckDB table) and deciding whether to skip it are the caller's.

Example:
    >>> vectors = open_vector_table("data/lancedb", "documents")  # doctest: +SKIP
    >>> report = near_duplicate_report(vectors, label_columns=("title",))  # doctest: +SKIP
    >>> report.column_names  # doctest: +SKIP
    ['key_a', 'key_b', 'similarity', 'title_a', 'title_b', 'lance_version', 'computed_at']
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import pyarrow as pa

from qwen3_pipeline.consumers.vector_search import (
    VectorTable,
    near_duplicate_pairs,
    read_vectors,
    vector_matrix,
    with_labels,
)
from qwen3_pipeline.core.errors import ConfigError

DEFAULT_THRESHOLD = 0.95
DEFAULT_NEIGHBORS = 5
DEFAULT_MAX_ROWS = 200_000


def near_duplicate_report(
    vectors: VectorTable,
    *,
    label_columns: Sequence[str] = ("title",),
    threshold: float = DEFAULT_THRESHOLD,
    neighbors: int = DEFAULT_NEIGHBORS,
    max_rows: int = DEFAULT_MAX_ROWS,
    computed_at: datetime | None = None,
) -> pa.Table:
    """Return the pairs of rows of ``vectors`` whose cosine similarity is at least ``threshold``.

    Args:
        vectors: The table, pinned at the version to report on.
        label_columns: Carry-along columns copied beside both keys (those the table has).
        threshold: Smallest cosine similarity reported.
        neighbors: Most similar rows considered per row.
        max_rows: The exact comparison is ``O(n^2)``; a larger table is refused.
        computed_at: The time stamped on every pair (default: now, UTC).

    Returns:
        ``key_a, key_b, similarity``, then ``<label>_a, <label>_b`` per label column, then
        ``lance_version`` and ``computed_at``; most similar first.

    Raises:
        ConfigError: The table has more than ``max_rows`` rows.
        StoreError: The vectors could not be read.
    """
    rows = vectors.count_rows()
    if rows > max_rows:
        raise ConfigError(
            f"{rows} rows exceed max_rows={max_rows} of the exact near-duplicate report "
            "(O(n^2)); raise max_rows if the time is acceptable"
        )
    labels = [c for c in label_columns if c in vectors.carry_columns]
    data = read_vectors(vectors, labels)
    pairs = near_duplicate_pairs(
        data.column("key"),
        vector_matrix(data.column("vector")),
        threshold=threshold,
        neighbors=neighbors,
    )
    report = with_labels(pairs, data.select(["key", *labels])) if labels else pairs
    stamp = computed_at or datetime.now(UTC)
    return report.append_column(
        "lance_version", pa.array([vectors.version] * report.num_rows, pa.int64())
    ).append_column(
        "computed_at", pa.array([stamp] * report.num_rows, pa.timestamp("us", tz="UTC"))
    )
