"""Source readers: stream source rows as normalised Arrow record batches.

A source is a table of rows with a unique key column, the text columns the document is
rendered from, an optional ``updated_at`` column and optional carry-along columns. Three
readers ship: :class:`DuckDBSource` (a table or a query of a DuckDB file, e.g. a dbt model),
:class:`ParquetSource` (a file or a directory) and :class:`ArrowSource` (an in-memory Arrow
table or pandas DataFrame). :func:`read_batches` turns any of them into batches of at most
``batch_rows`` rows with these columns, in this order:

- ``key``: the key column, as ``int64`` (any integer type) or ``string``;
- ``text``: the rendered document, sanitised (no NUL, valid UTF-8), never null;
- ``partition_key``: the partition the row belongs to (see below), never null;
- ``source_updated_at``: ``timestamp[us, tz=UTC]`` from ``updated_at`` (null without one);
- the carry-along columns under their own names.

Partitions. A row's partition key is always *its own* partition, whatever range is read:

- no partition (``SourceConfig.partition=None``): every row is in ``UNPARTITIONED`` (``""``);
- hash shards: :class:`Shard` ``(index, count)`` reads one shard, :class:`Shards`
  ``(count, indices)`` several (a backfill range) or, with ``indices=None``, all of them;
  each row is labelled ``shard_label(shard_of(key, count), count)``, e.g. ``"shard-03-of-16"``.
  The shard of a key is ``xxh3_64(canonical key) % count`` where the canonical form is the
  decimal string of an integer key or the string itself, so it never changes between runs,
  machines or Python versions;
- :class:`TimeWindow` reads ``start <= column < end`` and labels each row with the window of
  ``grain`` (hour/day/week/month) that holds it, formatted as Dagster formats time partition
  keys (``"2024-05-01"``, hourly ``"2024-05-01-13:00"``).

:func:`scope_partition_keys` gives the partition keys a read covers (what the vector store's
existing state must be restricted to), or ``None`` for "the whole table".
"""

import re
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import xxhash

from qwen3_pipeline.changes import sanitize_text, sanitize_texts
from qwen3_pipeline.errors import ConfigError, InputDataError

UNPARTITIONED = ""
DEFAULT_BATCH_ROWS = 50_000
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# The fixed output columns of read_batches, and the vector table's own columns in table order
# (lineage beside each vector): carry-along columns may not take any of these names.
OUTPUT_COLUMNS = ("key", "text", "partition_key", "source_updated_at")
LINEAGE_COLUMNS = (
    "key",
    "vector",
    "content_hash",
    "spec_fingerprint",
    "model_id",
    "model_revision",
    "dim",
    "n_tokens",
    "truncated",
    "partition_key",
    "source",
    "source_updated_at",
    "embedded_at",
    "run_id",
)
RESERVED_COLUMNS = frozenset({*OUTPUT_COLUMNS, *LINEAGE_COLUMNS})
_SHOWN = 10
_SHARD_LABEL = re.compile(r"^shard-(\d+)-of-(\d+)$")
_BARE_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$")
Grain = Literal["hour", "day", "week", "month"]


# --------------------------------------------------------------------------- partitions


def shard_label(index: int, count: int) -> str:
    """Return the partition key of shard ``index`` of ``count`` (``"shard-03-of-16"``).

    Numbers are zero-padded to the width of ``count - 1`` (at least two digits), so the labels
    of one sharding sort in shard order.

    Example:
        >>> shard_label(3, 16), shard_label(7, 128)
        ('shard-03-of-16', 'shard-007-of-128')
    """
    _check_shard(index, count)
    width = max(2, len(str(count - 1)))
    return f"shard-{index:0{width}d}-of-{count:0{width}d}"


def parse_shard_label(label: str) -> tuple[int, int]:
    """Return ``(index, count)`` of a :func:`shard_label`.

    Raises:
        ConfigError: ``label`` is not a shard label.

    Example:
        >>> parse_shard_label("shard-03-of-16")
        (3, 16)
    """
    match = _SHARD_LABEL.match(label)
    if not match:
        raise ConfigError(f"{label!r} is not a shard partition key like 'shard-03-of-16'")
    index, count = int(match.group(1)), int(match.group(2))
    _check_shard(index, count)
    return index, count


def _check_shard(index: int, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"shard count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"shard index must be an integer in 0..{count - 1}, got {index!r}")


def _canonical_key(key: int | str) -> bytes:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise InputDataError(f"a key must be an int or a str, got {type(key).__name__} {key!r}")
    return str(key).encode("utf-8")


def shard_of(key: int | str, count: int) -> int:
    """Return the shard of ``key`` among ``count`` (stable: xxh3_64 of its canonical form).

    Example:
        >>> shard_of(42, 16) == shard_of("42", 16)
        True
    """
    _check_shard(0, count)
    return xxhash.xxh3_64_intdigest(_canonical_key(key)) % count


def shard_indices(keys: pa.Array | pa.ChunkedArray, count: int) -> np.ndarray:
    """Vectorised :func:`shard_of` over an Arrow array of integer or string keys."""
    _check_shard(0, count)
    values = keys.to_pylist()
    encoded = (
        map(str.encode, map(str, values))
        if pa.types.is_integer(keys.type)
        else map(str.encode, values)
    )
    digests = np.fromiter(map(xxhash.xxh3_64_intdigest, encoded), np.uint64, count=len(values))
    return (digests % np.uint64(count)).astype(np.int64)


@dataclass(frozen=True)
class Shard:
    """Read one hash shard of the source: the rows whose key is in shard ``index`` of ``count``.

    Example:
        >>> Shard(3, 16).partition_keys()
        ['shard-03-of-16']
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        _check_shard(self.index, self.count)

    @property
    def label(self) -> str:
        """This shard's partition key."""
        return shard_label(self.index, self.count)

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers."""
        return [self.label]

    def as_shards(self) -> "Shards":
        """The same selection as a :class:`Shards`."""
        return Shards(self.count, (self.index,))


@dataclass(frozen=True)
class Shards:
    """Read several hash shards (``indices``), or all of them (``indices=None``).

    Every row is labelled with its own shard, so reading all shards at once (an unpartitioned
    materialisation or a full backfill) stores the same partition keys as reading them one
    by one.

    Example:
        >>> Shards.from_labels(["shard-01-of-04", "shard-02-of-04"])
        Shards(count=4, indices=(1, 2))
    """

    count: int
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_shard(0, self.count)
        if self.indices is not None:
            for index in self.indices:
                _check_shard(index, self.count)
            object.__setattr__(self, "indices", tuple(sorted(set(self.indices))))

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> "Shards":
        """Build a selection from shard partition keys (e.g. a Dagster backfill range).

        Raises:
            ConfigError: A label is malformed, the labels disagree on the count, or none given.
        """
        if not labels:
            raise ConfigError("from_labels needs at least one shard partition key")
        parsed = [parse_shard_label(label) for label in labels]
        counts = {count for _, count in parsed}
        if len(counts) != 1:
            raise ConfigError(f"shard partition keys mix shard counts {sorted(counts)}: {labels}")
        return cls(counts.pop(), tuple(index for index, _ in parsed))

    @property
    def selects_all(self) -> bool:
        """True when every shard is read."""
        return self.indices is None or len(self.indices) == self.count

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers."""
        indices = range(self.count) if self.indices is None else self.indices
        return [shard_label(i, self.count) for i in indices]


@dataclass(frozen=True, kw_only=True)
class TimeWindow:
    """Read the rows with ``start <= column < end``, each labelled with its ``grain`` window.

    Naive datetimes (and dates) are taken as UTC. ``grain=None`` labels every row with the
    label of ``start`` (one partition per read). Rows whose ``column`` is null belong to no
    window and are not read.

    Example:
        >>> w = TimeWindow(column="updated_at", start=date(2024, 5, 1), end=date(2024, 5, 3))
        >>> w.partition_keys()
        ['2024-05-01', '2024-05-02']
    """

    column: str
    start: datetime | date
    end: datetime | date
    grain: Grain | None = "day"

    def __post_init__(self) -> None:
        start, end = _as_utc(self.start, "start"), _as_utc(self.end, "end")
        if not start < end:
            raise ConfigError(f"time window start {start} must be before end {end}")
        if self.grain not in (None, "hour", "day", "week", "month"):
            raise ConfigError(
                f"time window grain must be 'hour', 'day', 'week', 'month' or None, "
                f"got {self.grain!r}"
            )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def start_utc(self) -> datetime:
        """``start`` as an aware UTC datetime."""
        return _as_utc(self.start, "start")

    @property
    def end_utc(self) -> datetime:
        """``end`` as an aware UTC datetime."""
        return _as_utc(self.end, "end")

    def label_of(self, moment: datetime) -> str:
        """Return the partition key of the window holding ``moment``."""
        if self.grain is None:
            return _time_label(self.start_utc, "hour" if self.start_utc.hour else "day")
        return _time_label(_floor(_as_utc(moment, "moment"), self.grain), self.grain)

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers (every window of ``grain`` it overlaps)."""
        if self.grain is None:
            return [self.label_of(self.start_utc)]
        keys: list[str] = []
        moment = _floor(self.start_utc, self.grain)
        while moment < self.end_utc:
            keys.append(_time_label(moment, self.grain))
            moment = _step(moment, self.grain)
        return keys


Partition = Shard | Shards | TimeWindow


def _as_utc(value: datetime | date, what: str) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ConfigError(f"time window {what} must be a datetime or a date, got {value!r}")


def _floor(moment: datetime, grain: Grain) -> datetime:
    if grain == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if grain == "day":
        return day
    if grain == "week":  # Dagster's weekly partitions start on Sunday by default
        return day - timedelta(days=(day.weekday() + 1) % 7)
    return day.replace(day=1)


def _step(moment: datetime, grain: Grain) -> datetime:
    if grain == "hour":
        return moment + timedelta(hours=1)
    if grain == "day":
        return moment + timedelta(days=1)
    if grain == "week":
        return moment + timedelta(days=7)
    year, month = divmod(moment.month, 12)
    return moment.replace(year=moment.year + year, month=month + 1)


def _time_label(moment: datetime, grain: Grain) -> str:
    return moment.strftime("%Y-%m-%d-%H:%M" if grain == "hour" else "%Y-%m-%d")


def scope_partition_keys(partition: Partition | None) -> list[str] | None:
    """Return the partition keys a read covers, or ``None`` when it covers the whole table.

    Use it to restrict the stored state a refresh diffs against and deletes from: a read of
    shard 3 must never delete rows of shard 4.

    Example:
        >>> scope_partition_keys(Shard(1, 4)), scope_partition_keys(Shards(4))
        (['shard-01-of-04'], None)
    """
    if partition is None:
        return None
    if isinstance(partition, Shards) and partition.selects_all:
        return None
    return partition.partition_keys()


def partition_key_for(
    key: int | str, partition: Partition | None, *, moment: datetime | None = None
) -> str:
    """Return the partition key of one row (the scalar form of what :func:`read_batches` does).

    Args:
        key: The row's key.
        partition: The partitioning of the source.
        moment: The row's time value (needed for a :class:`TimeWindow`).

    Raises:
        ConfigError: A time window without ``moment``.

    Example:
        >>> partition_key_for(7, Shards(4)) == shard_label(shard_of(7, 4), 4)
        True
    """
    if partition is None:
        return UNPARTITIONED
    if isinstance(partition, TimeWindow):
        if moment is None:
            raise ConfigError("partition_key_for needs moment= (the row's time) for a TimeWindow")
        return partition.label_of(moment)
    count = partition.count
    return shard_label(shard_of(key, count), count)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    r"""How to turn source rows into documents.

    Exactly one of ``text_columns`` and ``template`` is given. With ``text_columns`` the
    document is the non-empty values joined by ``separator``; with ``template`` it is
    ``template.format(**row)`` with nulls as ``""`` (``"{title}\n\n{body}"``). Plain
    ``{column}`` fields are rendered vectorised (non-string values cast by Arrow, so
    ``true``/``1.5``); a template with a conversion or format spec (``{price:.2f}``) is
    rendered row by row in Python.

    Args:
        key: The unique, non-null key column (integer or string type).
        text_columns: Columns the document is made of.
        template: A ``str.format`` template over column names.
        separator: What joins ``text_columns``.
        updated_at: Optional column with the row's last-modified time.
        carry: Columns stored beside each vector (title, url...), under their own names.
        partition: Which rows to read and how to label them; ``None`` reads everything.

    Raises:
        ConfigError: Both or neither of ``text_columns``/``template``, a malformed template,
            a carry column named like an output or lineage column, or repeated names.

    Example:
        >>> cfg = SourceConfig(key="id", template="{title}\n\n{body}", carry=("title",))
        >>> cfg.columns
        ('id', 'title', 'body')
    """

    key: str
    text_columns: tuple[str, ...] = ()
    template: str | None = None
    separator: str = "\n\n"
    updated_at: str | None = None
    carry: tuple[str, ...] = ()
    partition: Partition | None = None
    template_fields: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ConfigError(f"key must be a column name, got {self.key!r}")
        object.__setattr__(self, "text_columns", tuple(self.text_columns))
        object.__setattr__(self, "carry", tuple(self.carry))
        if bool(self.text_columns) == (self.template is not None):
            raise ConfigError(
                "give exactly one of text_columns (e.g. ('title', 'body')) and template "
                "(e.g. '{title}\\n\\n{body}')"
            )
        if self.template is not None:
            object.__setattr__(self, "template_fields", _template_fields(self.template))
        reserved = sorted(set(self.carry) & RESERVED_COLUMNS)
        if reserved:
            raise ConfigError(
                f"carry column(s) {reserved} clash with the vector table's own columns "
                f"{sorted(RESERVED_COLUMNS)}; rename them in the source (e.g. in the dbt model)"
            )
        repeated = sorted({c for c in self.carry if self.carry.count(c) > 1})
        if repeated:
            raise ConfigError(f"carry lists column(s) {repeated} more than once")
        if self.partition is not None and not isinstance(
            self.partition, Shard | Shards | TimeWindow
        ):
            raise ConfigError(
                f"partition must be a Shard, Shards or TimeWindow, got {self.partition!r}"
            )

    @property
    def columns(self) -> tuple[str, ...]:
        """The source columns a read needs, each once, in first-use order."""
        wanted = [self.key, *self.text_columns, *self.template_fields, *self.carry]
        if self.updated_at:
            wanted.append(self.updated_at)
        if isinstance(self.partition, TimeWindow):
            wanted.append(self.partition.column)
        return tuple(dict.fromkeys(wanted))


def _template_fields(template: str) -> tuple[str, ...]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"template {template!r} is malformed: {e}") from e
    names: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise ConfigError(
                f"template {template!r} has a positional field '{{{name}}}'; name the column, "
                "e.g. '{title}'"
            )
        if any(c in name for c in ".["):
            raise ConfigError(
                f"template field {{{name}}} uses attribute or index access; use plain column "
                "names (compute derived values in the source query)"
            )
        names.append(name)
    if not names:
        raise ConfigError(f"template {template!r} names no column; e.g. '{{title}}\\n\\n{{body}}'")
    return tuple(dict.fromkeys(names))


def _template_is_plain(template: str) -> bool:
    return all(
        spec == "" and conv is None
        for _, name, spec, conv in string.Formatter().parse(template)
        if name
    )


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    """What :func:`read_batches` needs from a source."""

    @property
    def name(self) -> str:
        """A short description for lineage (``duckdb:PATH::TABLE``)."""
        ...

    def schema(self) -> pa.Schema:
        """The Arrow schema of the source rows (all columns)."""
        ...

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream the given columns in batches of at most ``batch_rows`` rows."""
        ...

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Return (rows with a null key, up to ``limit`` duplicated keys with their counts)."""
        ...


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _key_problem_sql(relation: str, key: str, limit: int) -> tuple[str, str]:
    column = _quote(key)
    nulls = f"SELECT count(*) FROM {relation} WHERE {column} IS NULL"
    dupes = (
        f"SELECT {column}, count(*) AS n FROM {relation} WHERE {column} IS NOT NULL "
        f"GROUP BY {column} HAVING count(*) > 1 ORDER BY n DESC, {column} LIMIT {int(limit)}"
    )
    return nulls, dupes


class DuckDBSource:
    """Rows of a table, view or query in a DuckDB database file, read read-only.

    Args:
        path: The DuckDB file (it must exist; it is opened with ``read_only=True``).
        table_or_query: A table or view name (``docs``, ``main.docs``), or a ``SELECT``
            query. A bare identifier is quoted as a table name; anything else runs as SQL.

    Raises:
        ConfigError: The file does not exist, or ``table_or_query`` is empty.

    Example:
        >>> source = DuckDBSource("warehouse.duckdb", "stg_documents")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, table_or_query: str) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(
                f"DuckDB file {str(self.path)!r} does not exist; check the path (the refresh "
                "reads it read-only and never creates it)"
            )
        if not table_or_query or not table_or_query.strip():
            raise ConfigError("DuckDBSource needs a table name or a query, got an empty string")
        self.table_or_query = table_or_query.strip()

    @property
    def name(self) -> str:
        """``duckdb:PATH::TABLE_OR_QUERY``."""
        return f"duckdb:{self.path}::{self.table_or_query}"

    @property
    def relation(self) -> str:
        """The FROM-clause the source reads."""
        if _BARE_TABLE.match(self.table_or_query):
            return ".".join(_quote(part) for part in self.table_or_query.split("."))
        # The newline keeps a trailing "-- comment" in the query from eating the parenthesis.
        return f"({self.table_or_query.rstrip().rstrip(';')}\n) AS src"

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        import duckdb

        try:
            con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as e:
            raise ConfigError(f"could not open DuckDB file {str(self.path)!r}: {e}") from e
        try:
            yield con
        finally:
            con.close()

    def _sql(self, con: Any, query: str) -> Any:
        import duckdb

        try:
            return con.sql(query)
        except duckdb.CatalogException as e:
            tables = [
                ".".join(row)
                for row in con.sql(
                    "SELECT table_schema, table_name FROM information_schema.tables ORDER BY 1, 2"
                ).fetchall()
            ]
            raise ConfigError(
                f"DuckDB source {self.table_or_query!r} in {str(self.path)!r} failed: {e}. "
                f"Tables and views there: {tables}"
            ) from e
        except duckdb.Error as e:
            raise ConfigError(
                f"DuckDB source {self.table_or_query!r} in {str(self.path)!r} failed: {e}"
            ) from e

    def schema(self) -> pa.Schema:
        """The Arrow schema of the table or query."""
        with self._connect() as con:
            return self._sql(con, f"SELECT * FROM {self.relation} LIMIT 0").to_arrow_table().schema

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` with DuckDB's Arrow reader (bounded memory)."""
        projection = ", ".join(_quote(c) for c in columns)
        with self._connect() as con:
            reader = self._sql(con, f"SELECT {projection} FROM {self.relation}").to_arrow_reader(
                batch_rows
            )
            yield from reader

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, computed in DuckDB."""
        nulls_sql, dupes_sql = _key_problem_sql(self.relation, key, limit)
        with self._connect() as con:
            nulls = self._sql(con, nulls_sql).fetchall()[0][0]
            dupes = self._sql(con, dupes_sql).fetchall()
        return int(nulls), [(k, int(n)) for k, n in dupes]


def _arrow_key_problems(data: Any, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
    """Null and duplicated keys of in-process Arrow data (an in-memory DuckDB scans it)."""
    import duckdb

    nulls_sql, dupes_sql = _key_problem_sql("src", key, limit)
    con = duckdb.connect()
    try:
        con.register("src", data)
        nulls = con.sql(nulls_sql).fetchall()[0][0]
        dupes = con.sql(dupes_sql).fetchall()
    finally:
        con.close()
    return int(nulls), [(k, int(n)) for k, n in dupes]


class ParquetSource:
    """Rows of a Parquet file, or of a directory of them (hive partitioning understood).

    Args:
        path: A ``.parquet`` file or a directory.

    Raises:
        ConfigError: The path does not exist or holds no readable Parquet data.

    Example:
        >>> source = ParquetSource("data/documents.parquet")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ConfigError(f"Parquet source {str(self.path)!r} does not exist; check the path")
        try:
            self._dataset = ds.dataset(
                str(self.path),
                format="parquet",
                partitioning="hive" if self.path.is_dir() else None,
            )
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"could not read Parquet source {str(self.path)!r}: {e}") from e

    @property
    def name(self) -> str:
        """``parquet:PATH``."""
        return f"parquet:{self.path}"

    def schema(self) -> pa.Schema:
        """The dataset's Arrow schema."""
        return self._dataset.schema

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` file by file, page by page, so memory stays near ``batch_rows``.

        ``Dataset.to_batches`` decodes whole row groups ahead of a slow consumer whatever its
        read-ahead settings (a file written with one row group is held in memory entire), and
        ``pre_buffer`` would load every row group's bytes at once; ``ParquetFile.iter_batches``
        without it holds one row group's column chunks at a time.
        """
        import pyarrow.parquet as pq

        wanted = list(columns)
        schema = self._dataset.schema
        for fragment in self._dataset.get_fragments():
            constants = ds.get_partition_keys(fragment.partition_expression) or {}
            in_file = [c for c in wanted if c not in constants]
            with self._dataset.filesystem.open_input_file(fragment.path) as handle:
                for batch in pq.ParquetFile(handle, pre_buffer=False).iter_batches(
                    batch_size=batch_rows, columns=in_file, use_threads=False
                ):
                    arrays = []
                    for name in wanted:
                        target = schema.field(name).type
                        if name in constants:
                            value = pa.scalar(constants[name]).cast(target)
                            arrays.append(pa.array([value.as_py()] * batch.num_rows, target))
                        else:
                            column = batch.column(name)
                            arrays.append(column if column.type == target else column.cast(target))
                    yield pa.RecordBatch.from_arrays(arrays, names=wanted)

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, computed by DuckDB over the dataset."""
        return _arrow_key_problems(self._dataset, key, limit)


class ArrowSource:
    """Rows of an in-memory Arrow table or record batch, or a pandas DataFrame.

    DataFrame strings holding lone surrogates (which Arrow rejects) are sanitised on the way
    in, exactly as the rendered text would be.

    Args:
        data: A ``pa.Table``, ``pa.RecordBatch`` or ``pandas.DataFrame``.
        name: How the source is described in lineage.

    Raises:
        ConfigError: ``data`` is of another type.

    Example:
        >>> ArrowSource(pa.table({"id": [1], "body": ["hello"]})).schema().names
        ['id', 'body']
    """

    def __init__(
        self, data: pa.Table | pa.RecordBatch | pd.DataFrame, *, name: str = "arrow"
    ) -> None:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        elif isinstance(data, pd.DataFrame):
            data = _table_from_pandas(data)
        if not isinstance(data, pa.Table):
            raise ConfigError(
                f"ArrowSource takes a pyarrow Table/RecordBatch or a pandas DataFrame, "
                f"got {type(data).__name__}"
            )
        self._table = data
        self._name = name

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    def schema(self) -> pa.Schema:
        """The table's schema."""
        return self._table.schema

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Slices of the table (zero-copy)."""
        yield from self._table.select(list(columns)).to_batches(max_chunksize=batch_rows)

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, computed by DuckDB over the table."""
        return _arrow_key_problems(self._table, key, limit)


def _table_from_pandas(frame: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except UnicodeEncodeError:
        fixed = frame.copy()
        for column in fixed.columns:
            if fixed[column].dtype == object:
                fixed[column] = fixed[column].map(
                    lambda v: sanitize_text(v) if isinstance(v, str) else v
                )
        return pa.Table.from_pandas(fixed, preserve_index=False)


def parse_source(spec: str) -> DuckDBSource | ParquetSource:
    """Build a source from its command-line form.

    Forms: ``duckdb:PATH::TABLE_OR_QUERY`` (e.g. ``duckdb:data/dw.duckdb::stg_documents``),
    ``parquet:PATH`` or a plain ``PATH`` to a Parquet file or directory.

    Raises:
        ConfigError: The form is not recognised or the file does not exist.

    Example:
        >>> parse_source("duckdb:dw.duckdb::docs")  # doctest: +SKIP
    """
    if spec.startswith("duckdb:"):
        body = spec[len("duckdb:") :]
        path, sep, target = body.partition("::")
        if not sep or not path or not target.strip():
            raise ConfigError(
                f"source {spec!r}: write a DuckDB source as duckdb:PATH::TABLE_OR_QUERY, "
                "e.g. duckdb:data/warehouse.duckdb::stg_documents"
            )
        return DuckDBSource(path, target)
    path = spec[len("parquet:") :] if spec.startswith("parquet:") else spec
    if not path:
        raise ConfigError("empty source; give a Parquet path or duckdb:PATH::TABLE_OR_QUERY")
    if Path(path).suffix.lower() in {".duckdb", ".db", ".ddb"}:
        raise ConfigError(
            f"source {spec!r} looks like a DuckDB file; write duckdb:{path}::TABLE_OR_QUERY"
        )
    return ParquetSource(path)


# --------------------------------------------------------------------------- reading


def output_schema(source: Source, config: SourceConfig) -> pa.Schema:
    """Return the schema :func:`read_batches` yields for ``source`` (checks the columns).

    Raises:
        InputDataError: A configured column is missing, or a column has an unusable type.
    """
    schema = source.schema()
    _check_columns(schema, config, source.name)
    fields = [
        pa.field("key", _key_type(schema.field(config.key).type, config.key), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("partition_key", pa.string(), nullable=False),
        pa.field("source_updated_at", TIMESTAMP_TYPE),
    ]
    if config.updated_at:
        _check_time_type(schema.field(config.updated_at).type, config.updated_at)
    if isinstance(config.partition, TimeWindow):
        _check_time_type(schema.field(config.partition.column).type, config.partition.column)
    fields += [pa.field(c, _carry_type(schema.field(c).type)) for c in config.carry]
    return pa.schema(fields)


def carry_schema(schema: pa.Schema) -> pa.Schema:
    """Return the carry-along part of an :func:`output_schema`."""
    return pa.schema([f for f in schema if f.name not in OUTPUT_COLUMNS])


def read_batches(
    source: Source, config: SourceConfig, *, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream the source as normalised batches (see the module docstring for the columns).

    Only the configured columns are read; a partitioned read keeps only the rows of its
    partitions. Empty batches are not yielded. Memory stays bounded by ``batch_rows``.

    Args:
        source: Where the rows come from.
        config: Key, text, carry and partition settings.
        batch_rows: Most rows per batch read from the source.

    Yields:
        Record batches matching :func:`output_schema`.

    Raises:
        ConfigError: ``batch_rows`` is not positive.
        InputDataError: Missing columns, unusable types, or a null key (named by row number).

    Example:
        >>> table = pa.table({"id": [1, 2], "body": ["a", "b"]})
        >>> cfg = SourceConfig(key="id", text_columns=("body",))
        >>> [b.num_rows for b in read_batches(ArrowSource(table), cfg)]
        [2]
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    schema = output_schema(source, config)
    render = _renderer(config)
    offset = 0
    for raw in source.batches(config.columns, batch_rows):
        batch = _normalise(raw, config, schema, render, offset)
        offset += raw.num_rows
        if batch.num_rows:
            yield batch


def validate_keys(source: Source, config: SourceConfig, *, limit: int = _SHOWN) -> None:
    """Check the whole source for null and duplicate keys before anything is written.

    Runs one aggregate query (DuckDB, in-process); about a tenth of a second per million rows.

    Raises:
        InputDataError: Null keys (with their count) or duplicate keys (up to ``limit`` of
            them, with how many rows share each).
    """
    schema = source.schema()
    if config.key not in schema.names:
        raise InputDataError(_missing_message([config.key], schema, source.name))
    nulls, dupes = source.key_problems(config.key, limit)
    problems = []
    if nulls:
        problems.append(f"{nulls} row(s) have a null key")
    if dupes:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in dupes)
        problems.append(f"duplicate keys: {shown}")
    if problems:
        raise InputDataError(
            f"key column {config.key!r} of {source.name} must be unique and non-null: "
            + "; ".join(problems)
            + ". Fix the source (e.g. filter or deduplicate in the dbt model) and re-run"
        )


def _missing_message(missing: list[str], schema: pa.Schema, where: str) -> str:
    return f"column(s) {missing} not found in {where}; available columns: {schema.names}"


def _check_columns(schema: pa.Schema, config: SourceConfig, where: str) -> None:
    missing = [c for c in config.columns if c not in schema.names]
    if missing:
        raise InputDataError(_missing_message(missing, schema, where))


def _key_type(source_type: pa.DataType, column: str) -> pa.DataType:
    if pa.types.is_integer(source_type):
        return pa.int64()
    if _is_string(source_type):
        return pa.string()
    if pa.types.is_dictionary(source_type):
        return _key_type(source_type.value_type, column)
    raise InputDataError(
        f"key column {column!r} has type {source_type}; keys must be integers or strings. "
        "Cast it in the source query (e.g. CAST(id AS VARCHAR))"
    )


def _is_string(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
    )


def _carry_type(source_type: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(source_type):
        return _carry_type(source_type.value_type)
    if _is_string(source_type):
        return pa.string()
    return source_type


def _check_time_type(source_type: pa.DataType, column: str) -> None:
    if not (pa.types.is_timestamp(source_type) or pa.types.is_date(source_type)):
        raise InputDataError(
            f"column {column!r} has type {source_type}; a time column must be a timestamp or "
            "a date. Cast it in the source query (e.g. CAST(updated_at AS TIMESTAMP))"
        )


def _as_timestamps(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    # Naive timestamps and dates are taken as UTC (casting only attaches the zone).
    return values.cast(TIMESTAMP_TYPE)


def _as_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values if values.type == pa.string() else values.cast(pa.string())


Renderer = Callable[[pa.RecordBatch], pa.Array]


def _renderer(config: SourceConfig) -> Renderer:
    if config.template is None:
        columns, separator = config.text_columns, config.separator

        def join_columns(batch: pa.RecordBatch) -> pa.Array:
            parts = []
            for column in columns:
                text = _as_strings(batch.column(column))
                parts.append(pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text))
            return _join_non_null(parts, separator, batch.num_rows)

        return join_columns

    template = config.template
    if _template_is_plain(template):
        pieces = list(string.Formatter().parse(template))

        def concat(batch: pa.RecordBatch) -> pa.Array:
            parts: list[Any] = []
            for literal, name, _, _ in pieces:
                if literal:
                    parts.append(pa.scalar(literal))
                if name:
                    parts.append(pc.fill_null(_as_strings(batch.column(name)), ""))
            if len(parts) == 1 and isinstance(parts[0], pa.Scalar):
                return pa.array([parts[0].as_py()] * batch.num_rows, pa.string())
            return pc.binary_join_element_wise(*parts, "")

        return concat

    fields = config.template_fields

    def format_rows(batch: pa.RecordBatch) -> pa.Array:
        data = {name: batch.column(name).to_pylist() for name in fields}
        out = []
        for i in range(batch.num_rows):
            row = {name: "" if data[name][i] is None else data[name][i] for name in fields}
            try:
                out.append(template.format_map(row))
            except (ValueError, TypeError) as e:
                raise InputDataError(
                    f"template {template!r} could not format row {row!r}: {e}"
                ) from e
        return pa.array(out, pa.string())

    return format_rows


def _join_non_null(parts: list[pa.Array], separator: str, rows: int) -> pa.Array:
    """Join each row's non-null parts with ``separator`` ("" when all are null).

    Built as a list array (row-major parts, nulls dropped) and ``binary_join``:
    ``binary_join_element_wise(null_handling="skip")`` drops all-null rows in pyarrow 26.
    """
    width = len(parts)
    flat = pa.concat_arrays(parts)
    if width > 1:
        flat = flat.take(pa.array(np.arange(rows * width).reshape(width, rows).T.reshape(-1)))
    valid = np.asarray(flat.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    counts = valid.reshape(rows, width).sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(valid)))
    return pc.binary_join(lists, separator)


def _normalise(
    raw: pa.RecordBatch,
    config: SourceConfig,
    schema: pa.Schema,
    render: Renderer,
    offset: int,
) -> pa.RecordBatch:
    keys = raw.column(config.key)
    if keys.null_count:
        rows = (np.flatnonzero(keys.is_null().to_numpy(zero_copy_only=False)) + offset)[:_SHOWN]
        raise InputDataError(
            f"{keys.null_count} row(s) have a null key column {config.key!r} (source rows "
            f"{rows.tolist()}, counted from 0 in read order); every row needs a key"
        )
    key_type = schema.field("key").type
    if pa.types.is_dictionary(keys.type):
        keys = keys.dictionary_decode()
    try:
        keys = keys.cast(key_type)
    except pa.ArrowInvalid as e:
        raise InputDataError(f"key column {config.key!r} does not fit {key_type}: {e}") from e

    keep: np.ndarray | None = None
    labels: pa.Array
    partition = config.partition
    if partition is None:
        labels = pa.array([UNPARTITIONED] * raw.num_rows, pa.string())
    elif isinstance(partition, TimeWindow):
        moments = _as_timestamps(raw.column(partition.column))
        inside = pc.and_(
            pc.greater_equal(moments, pa.scalar(partition.start_utc, TIMESTAMP_TYPE)),
            pc.less(moments, pa.scalar(partition.end_utc, TIMESTAMP_TYPE)),
        )
        keep = np.asarray(pc.fill_null(inside, False).to_numpy(zero_copy_only=False), dtype=bool)
        if partition.grain is None:
            labels = pa.array([partition.label_of(partition.start_utc)] * raw.num_rows)
        else:
            unit = partition.grain
            floored = pc.floor_temporal(
                pc.fill_null(moments, pa.scalar(partition.start_utc, TIMESTAMP_TYPE)),
                unit=unit,
                week_starts_monday=False,
            )
            labels = pc.strftime(floored, format="%Y-%m-%d-%H:%M" if unit == "hour" else "%Y-%m-%d")
    else:
        shards = partition.as_shards() if isinstance(partition, Shard) else partition
        indices = shard_indices(keys, shards.count)
        table = pa.array([shard_label(i, shards.count) for i in range(shards.count)], pa.string())
        labels = table.take(pa.array(indices))
        if not shards.selects_all:
            keep = np.isin(indices, np.array(shards.indices, dtype=np.int64))

    if keep is not None and not keep.all():
        mask = pa.array(keep)
        raw, keys, labels = raw.filter(mask), keys.filter(mask), labels.filter(mask)
    if not raw.num_rows:
        return pa.RecordBatch.from_pylist([], schema=schema)

    text = sanitize_texts(render(raw))
    updated = (
        _as_timestamps(raw.column(config.updated_at))
        if config.updated_at
        else pa.nulls(raw.num_rows, TIMESTAMP_TYPE)
    )
    columns: list[pa.Array] = [keys, text, labels, updated]
    for name in config.carry:
        values = raw.column(name)
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        columns.append(values.cast(schema.field(name).type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)
