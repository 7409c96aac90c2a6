"""Side tables of a vector table (failure records, watermarks): small, keyed, upserted whole.

A side table lives in the vector table's database as ``<table>__<what>``. Its rows are
written with a ``merge_insert`` on one key column, so writing the same rows again changes
nothing more: the property that lets a refresh killed between two commits converge.
"""

from typing import Any

import pyarrow as pa

from qwen3_pipeline.store.connection import list_table_names
from qwen3_pipeline.store.retries import RetryPolicy, run_typed, with_retries


def read_side_table(db: Any, name: str, schema: pa.Schema) -> pa.Table:
    """Every row of the side table ``name`` (an empty table of ``schema`` if it does not exist).

    Raises:
        StoreError: LanceDB could not read it.
    """
    if name not in list_table_names(db):
        return schema.empty_table()
    rows = run_typed(lambda: db.open_table(name).to_arrow(), f"read {name!r}")
    return rows.select(schema.names)


def upsert_side_rows(
    db: Any, name: str, schema: pa.Schema, rows: pa.Table, *, on: str, retry: RetryPolicy
) -> None:
    """Insert or replace ``rows`` of the side table ``name`` by ``on`` (created if needed).

    Raises:
        StoreError: LanceDB failed (conflicts are retried with backoff first).
    """
    if name not in list_table_names(db):
        run_typed(lambda: db.create_table(name, schema=schema, exist_ok=True), f"create {name!r}")
    table = run_typed(lambda: db.open_table(name), f"open {name!r}")
    with_retries(
        retry,
        f"write {rows.num_rows} row(s) of {name!r}",
        lambda: (
            table.merge_insert(on)
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(rows.select(schema.names))
        ),
    )
