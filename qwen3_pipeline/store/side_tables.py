"""Side tables of a vector table (failure records, watermarks): small, keyed, upserted whole.

A side table lives in the vector table's database as ``<table>__<what>``. Its rows are
written with a ``merge_insert`` on one key column, so writing the same rows again changes
nothing more: the property that lets a refresh killed between two commits converge.
"""

import logging
import time
from typing import Any, ClassVar, Self

import pyarrow as pa

from qwen3_pipeline.core.schema import validate_table_name
from qwen3_pipeline.store.connection import connect, list_table_names
from qwen3_pipeline.store.retries import RetryPolicy, run_typed, with_retries

log = logging.getLogger(__name__)

# Waits before a listed but unopenable side table is taken for a half-created one.
_CREATION_WAITS_S = (0.1, 0.4, 1.0)


def side_table_exists(db: Any, name: str) -> bool:
    """Whether the side table ``name`` exists and opens; a half-created one is dropped.

    A process killed while LanceDB created the table leaves a directory that is listed but
    has no committed version ("was not found" when opened). It holds nothing (its creation
    never committed), so it is dropped, and the caller creates the table afresh: otherwise
    every later refresh would fail on it.

    Raises:
        StoreError: LanceDB failed otherwise.
    """
    if name not in list_table_names(db):
        return False
    # A concurrent writer may be creating it right now (listed, not committed yet): a
    # creation commits within milliseconds, so only one still missing after these waits
    # is taken for a killed one.
    for wait_s in (*_CREATION_WAITS_S, None):
        try:
            db.open_table(name)
            return True
        except ValueError as e:
            if "not found" not in str(e).lower():
                raise
        if wait_s is not None:
            time.sleep(wait_s)
    log.warning("dropping %r: its creation never committed (a killed run)", name)
    run_typed(lambda: db.drop_table(name), f"drop the half-created {name!r}")
    return False


def read_side_table(db: Any, name: str, schema: pa.Schema) -> pa.Table:
    """Every row of the side table ``name`` (an empty table of ``schema`` if it does not exist).

    Raises:
        StoreError: LanceDB could not read it.
    """
    if not side_table_exists(db, name):
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
    if not side_table_exists(db, name):
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


class SideTable:
    """A side table of one vector table: ``<table><suffix>`` in the same database.

    Args:
        db: A ``lancedb`` connection to the table's database.
        table: The vector table's name.
        retry: Tries and backoff for commit conflicts.
    """

    suffix: ClassVar[str] = ""

    def __init__(self, db: Any, table: str, *, retry: RetryPolicy | None = None) -> None:
        self.db = db
        self.table = table
        self.name = validate_table_name(f"{table}{self.suffix}")
        self.retry = retry or RetryPolicy()

    @classmethod
    def open(cls, uri: str, table: str, *, storage_options: dict[str, str] | None = None) -> Self:
        """The side table of ``table`` in the database at ``uri``.

        Raises:
            StoreError: The database cannot be reached.
        """
        return cls(connect(uri, storage_options), table)
