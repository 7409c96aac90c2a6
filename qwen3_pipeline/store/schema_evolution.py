"""What an existing vector table must agree on before a write, and how its schema grows.

:meth:`~qwen3_pipeline.store.table.VectorStore.open` runs these on every table it opens:

- the recorded spec fingerprint must be the configured one (:func:`check_recorded_spec`:
  vectors of different specs are never mixed);
- the key column keeps its type (:func:`check_key_type`);
- carry-along columns keep a castable type, and those new to the configuration are added,
  all-null (:func:`missing_carry_columns`, :func:`add_carry_columns`);
- the key is declared with ``set_unenforced_primary_key`` (:func:`ensure_key`), so concurrent
  ``merge_insert`` calls inserting the same new key are detected as conflicting and retried
  instead of both inserting; a refresh indexes it with a BTree after its last commit
  (:func:`ensure_key_index`).

LanceDB 0.40 facts this module relies on: ``create_index(column, config=BTree())`` is the
non-deprecated scalar-index API; a declared primary key shows as an ``unenforced-primary-key``
entry in the key field's metadata.
"""

import json
import logging
from typing import Any

import pyarrow as pa

from qwen3_pipeline.core.errors import InputDataError, SpecMismatchError
from qwen3_pipeline.core.schema import META_FINGERPRINT, META_SPEC
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.store.merge_path import key_index_coverage
from qwen3_pipeline.store.retries import RetryPolicy, with_retries

log = logging.getLogger(__name__)

_PRIMARY_KEY_METADATA = b"unenforced-primary-key"


def check_recorded_spec(table: Any, table_name: str, spec: EmbeddingSpec) -> None:
    """Check that ``table`` was embedded with ``spec`` (its recorded fingerprint).

    Raises:
        SpecMismatchError: The table records another spec, or none (not written by
            qwen3_pipeline); the message says how to rebuild.
    """
    meta = table.schema.metadata or {}
    recorded = meta.get(META_FINGERPRINT.encode())
    if recorded is None:
        raise SpecMismatchError(
            f"table {table_name!r} has no recorded embedding spec (it was not written by "
            "qwen3_pipeline); choose another table name, or rebuild it (rebuild=True / "
            "--rebuild) to replace its contents"
        )
    if recorded.decode() == spec.fingerprint:
        return
    described = "another spec"
    raw = meta.get(META_SPEC.encode())
    if raw:
        old = json.loads(raw.decode())
        described = (
            f"model={old.get('model')} revision={old.get('revision')} dim={old.get('dim')} "
            f"max_length={old.get('max_length')}"
        )
    raise SpecMismatchError(
        f"table {table_name!r} was embedded with {described} (fingerprint {recorded.decode()}), "
        f"but the configured spec is model={spec.model} revision={spec.revision} "
        f"dim={spec.dim} max_length={spec.max_length} (fingerprint {spec.fingerprint}). "
        "Vectors of different specs are never mixed: re-run with rebuild=True (CLI: "
        "--rebuild) to re-embed into a new table and swap it in when complete, or use "
        "another table name"
    )


def check_key_type(table: Any, table_name: str, key_type: pa.DataType, column: str) -> None:
    """Check that the key ``column`` of ``table`` stores ``key_type``.

    Raises:
        InputDataError: The table stores another key type.
    """
    have = table.schema.field(column).type
    if have != key_type:
        raise InputDataError(
            f"the source key is {key_type} but table {table_name!r} stores {have} keys; keep "
            "the key column's type, or rebuild the table (rebuild=True / --rebuild)"
        )


def missing_carry_columns(table: Any, table_name: str, carry_schema: pa.Schema) -> list[pa.Field]:
    """Check the carry columns ``table`` has; return those it lacks (nullable, to add).

    A column the table has must have the source's type, or one of the same family (integer,
    floating point, timestamp) that writes cast to.

    Raises:
        InputDataError: A carry column's type differs from the table's beyond a cast.
    """
    schema = table.schema
    missing = []
    for f in carry_schema:
        if f.name not in schema.names:
            missing.append(f.with_nullable(True))
            continue
        have = schema.field(f.name).type
        if have != f.type and not _castable(f.type, have):
            raise InputDataError(
                f"carry column {f.name!r} is {f.type} in the source but {have} in table "
                f"{table_name!r}; cast it in the source, or rebuild the table "
                "(rebuild=True / --rebuild)"
            )
    return missing


def add_carry_columns(
    table: Any, table_name: str, fields: list[pa.Field], *, policy: RetryPolicy
) -> None:
    """Add the carry columns ``fields`` to ``table``, all-null (the next refresh fills them).

    Raises:
        StoreConflictError: Concurrent commits kept conflicting.
        StoreError: LanceDB failed.
    """
    names = [f.name for f in fields]
    log.info("adding carry column(s) %s to %s", names, table_name)
    with_retries(
        policy,
        f"add columns {names} on table {table_name!r}",
        lambda: table.add_columns(fields),
    )


def ensure_key(table: Any, table_name: str, *, policy: RetryPolicy) -> None:
    """Declare ``key`` the table's (unenforced) primary key, unless already done.

    The declared key is what makes LanceDB detect concurrent ``merge_insert`` calls inserting
    the same new key as conflicting (retried) instead of both inserting. Its BTree index is
    :func:`ensure_key_index`'s, at the end of a run.

    Raises:
        StoreError: LanceDB kept failing within the retry policy.
    """

    def declare() -> None:
        if not key_declared(table):
            table.set_unenforced_primary_key("key")

    _retrying_races(policy, f"declare the key of {table_name!r}", declare, table)


def ensure_key_index(table: Any, table_name: str, *, policy: RetryPolicy) -> bool:
    """Index ``key`` with a BTree unless it is indexed already; returns whether it built one.

    A refresh calls it after its last commit and compaction, not when it creates the table:
    an index made on the empty table is then updated by the end-of-run compaction with every
    row of the fill at once, which made that compaction the peak of a backfill's memory
    (1,221 MiB at 5M rows against 803 MiB without the index; building the index afterwards
    over 3M rows added 105 MiB). From then on each compaction folds in only the new rows.

    Raises:
        StoreError: LanceDB kept failing within the retry policy.
    """
    from lancedb.index import BTree

    built = False

    def index() -> None:
        nonlocal built
        if not key_indexed(table):
            table.create_index("key", config=BTree())
            built = True

    _retrying_races(policy, f"index the key of {table_name!r}", index, table)
    return built


def _retrying_races(policy: RetryPolicy, what: str, step: Any, table: Any) -> None:
    # Writers creating the table at once race to declare the key and index it: the losers
    # get errors LanceDB does not retry ("already set", "incompatible transaction ...
    # Overwrite" when another writer's create committed in between). Re-read the latest
    # version and try again until it is in place, within the retry policy.
    with_retries(policy, what, step, retryable=lambda _: True, before_retry=table.checkout_latest)


def key_declared(table: Any) -> bool:
    """Whether ``key`` is declared the table's (unenforced) primary key."""
    key_field = table.schema.field("key")
    return any(_PRIMARY_KEY_METADATA in k for k in (key_field.metadata or {}))


def key_indexed(table: Any) -> bool:
    """Whether ``key`` has a scalar index of its own."""
    return key_index_coverage(table) is not None


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    same_family = (
        (pa.types.is_integer(source) and pa.types.is_integer(target))
        or (pa.types.is_floating(source) and pa.types.is_floating(target))
        or (pa.types.is_timestamp(source) and pa.types.is_timestamp(target))
    )
    return same_family
