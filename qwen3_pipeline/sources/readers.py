"""Source readers: DuckDB (a table, view or query, e.g. a dbt model), Parquet, Arrow, Arrow IPC.

Each reader streams chosen columns as Arrow record batches and reports null and duplicate
keys with one aggregate query (Arrow IPC files: a count over their key column). Errors from
DuckDB and Arrow are typed here, at the boundary.
"""

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from qwen3_pipeline.core.changes import sanitize_text
from qwen3_pipeline.core.errors import (
    ConfigError,
    SourceReadError,
    SourceUnavailableError,
    redact_secrets,
)
from qwen3_pipeline.sources.postgres import (
    URL_EXAMPLE,
    PostgresSource,
    check_url_form,
    split_postgres_spec,
)
from qwen3_pipeline.sources.watermark import RowFilter

_LOCKED = re.compile(r"could not set lock|conflicting lock|database is locked", re.IGNORECASE)
_BARE_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$")
_POSTGRES_PREFIXES = ("postgresql:", "postgres:")
_ENV_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# ``scheme://...`` or ``jdbc:scheme://...``: a URL of some kind, never a local path.
_ANY_URL = re.compile(r"^(?:jdbc:)?[A-Za-z][A-Za-z0-9+.-]*://", re.IGNORECASE)
# A libpq key=value connection string (``host=db port=5432 user=u password=...``).
_LIBPQ_KEYWORD = re.compile(
    r"^(?:host|hostaddr|port|dbname|user|password|passfile|service|sslmode|options|"
    r"application_name|connect_timeout|target_session_attrs)\s*=",
    re.IGNORECASE,
)
SOURCE_FORMS = (
    "duckdb:PATH::TABLE_OR_QUERY, postgresql://USER@HOST:PORT/DB::TABLE_OR_QUERY, "
    "env:VAR::TABLE_OR_QUERY (a PostgreSQL URL in environment variable VAR), or a Parquet "
    "file or directory (parquet:PATH or a plain path)"
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
            if _LOCKED.search(str(e)):
                raise SourceUnavailableError(
                    f"DuckDB file {str(self.path)!r} is locked by another process (a dbt run "
                    f"writing it?); retry when it is done: {e}"
                ) from e
            raise ConfigError(f"could not open DuckDB file {str(self.path)!r}: {e}") from e
        try:
            yield con
        finally:
            con.close()

    def _sql(self, con: Any, query: str, params: list[Any] | None = None) -> Any:
        import duckdb

        try:
            return con.sql(query, params=params) if params else con.sql(query)
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
            yield from _typed_read(reader, self.name)

    def batches_where(
        self, columns: Sequence[str], batch_rows: int, where: RowFilter
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows ``where`` selects, by a ``WHERE`` DuckDB evaluates.

        An index on the ``updated_at`` column, or a table sorted by it, makes it cheap.
        """
        projection = ", ".join(_quote(c) for c in columns)
        clause, params = where.sql(self.schema().field(where.column).type, _quote)
        query = f"SELECT {projection} FROM {self.relation} WHERE {clause}"
        with self._connect() as con:
            reader = self._sql(con, query, params).to_arrow_reader(batch_rows)
            yield from _typed_read(reader, self.name)

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
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        # A garbled Parquet page surfaces here first (InvalidInputException): bad input.
        raise SourceReadError(f"could not read the source's key column {key!r}: {e}") from e
    finally:
        con.close()
    return int(nulls), [(k, int(n)) for k, n in dupes]


def _typed_read(batches: Iterable[pa.RecordBatch], where: str) -> Iterator[pa.RecordBatch]:
    """Yield ``batches``, turning a read failure mid-stream into :class:`SourceReadError`."""
    import duckdb

    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (duckdb.Error, pa.ArrowException, OSError) as e:
            raise SourceReadError(
                f"could not read {where}: {e}. The file or query result is damaged or "
                "unreadable; fix or regenerate the source and re-run (nothing was written)"
            ) from e
        yield batch


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
        yield from _typed_read(self._read_fragments(list(columns), batch_rows), self.name)

    def _read_fragments(self, wanted: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

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

    def batches_where(
        self, columns: Sequence[str], batch_rows: int, where: RowFilter
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows ``where`` selects: DuckDB reads the files with the filter pushed down.

        Row groups whose ``updated_at`` statistics lie before the mark are skipped unread
        (write the files sorted by it, or partitioned by day, and most are). In the others
        DuckDB decodes the text columns of the selected rows only: with edits spread over
        every row group, pyarrow's dataset scanner decoded all of their text to keep 1% of it
        (0.89 s against 0.2 s over a million rows, ``refresh_bench.py --watermark``).
        """
        import duckdb

        schema = self._dataset.schema
        column_type = schema.field(where.column).type
        if not pa.types.is_timestamp(column_type):
            # Dates, strings: compared after the engine's own cast, in memory.
            yield from filtered_in_memory(self, columns, batch_rows, where)
            return
        files = ", ".join("'" + path.replace("'", "''") + "'" for path in self._dataset.files)
        if not files:
            return
        hive = "true" if self.path.is_dir() else "false"
        clause, params = where.sql(column_type, _quote)
        projection = ", ".join(_quote(c) for c in columns)
        query = (
            f"SELECT {projection} FROM read_parquet([{files}], hive_partitioning = {hive}) "
            f"WHERE {clause}"
        )
        target = _projected(schema, columns)
        con = duckdb.connect()
        try:
            try:
                reader = con.sql(query, params=params).to_arrow_reader(batch_rows)
            except duckdb.Error as e:
                raise SourceReadError(f"could not read {self.name}: {e}") from e
            # Hive partition values come back as DuckDB typed them: cast to the dataset's.
            typed = (_cast_batch(batch, target) for batch in reader)
            yield from _typed_read(_rebatch(typed, target, batch_rows), self.name)
        finally:
            con.close()

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

    def batches_where(
        self, columns: Sequence[str], batch_rows: int, where: RowFilter
    ) -> Iterator[pa.RecordBatch]:
        """The rows ``where`` selects (an Arrow filter over the table in memory)."""
        kept = self._table.filter(where.mask(self._table)).select(list(columns))
        yield from kept.to_batches(max_chunksize=batch_rows)

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, computed by DuckDB over the table."""
        return _arrow_key_problems(self._table, key, limit)


class ArrowIPCSource:
    """Rows of Arrow IPC files (e.g. one shard of a source, split to local disk), read in order.

    It stands in for the source it was split from: it reports that source's ``name`` (so the
    lineage written on each row is unchanged) and the schema given at construction (the
    original source's types, so key and carry casts are validated exactly as they would be
    on the original). The files are read one record batch at a time and re-chunked to
    ``batch_rows``, so memory stays near one batch whatever the files hold.

    Args:
        paths: The IPC (Feather v2) files, in read order; none for an empty source.
        schema: The schema of the rows; every file holds exactly these columns.
        name: How the source is described in lineage (the original source's name).

    Raises:
        ConfigError: ``name`` is empty.

    Example:
        >>> source = ArrowIPCSource([], schema=pa.schema([("id", pa.int64())]), name="arrow")
        >>> list(source.batches(["id"], 10))
        []
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        schema: pa.Schema,
        name: str,
    ) -> None:
        if not name:
            raise ConfigError("ArrowIPCSource needs the name of the source it stands for")
        self.paths = [Path(p) for p in paths]
        self._schema = schema
        self._name = name

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    def schema(self) -> pa.Schema:
        """The schema given at construction."""
        return self._schema

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` file by file in batches of ``batch_rows`` rows (the last shorter)."""
        wanted = list(columns)
        schema = pa.schema([self._schema.field(c) for c in wanted])
        yield from _typed_read(_rebatch(self._read(wanted), schema, batch_rows), self._name)

    def batches_where(
        self, columns: Sequence[str], batch_rows: int, where: RowFilter
    ) -> Iterator[pa.RecordBatch]:
        """The rows ``where`` selects (an Arrow filter over each batch read)."""
        yield from filtered_in_memory(self, columns, batch_rows, where)

    def _read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for path in self.paths:
            with pa.OSFile(str(path)) as handle:
                reader = pa.ipc.open_file(handle)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i).select(columns)

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, counted in Arrow over the key column alone.

        The files are memory-mapped, so only the key column's pages are read (a query engine
        scanning IPC files reads whole record batches, texts included).
        """
        nulls = 0
        chunks: list[pa.Array] = []
        for path in self.paths:
            try:
                with pa.memory_map(str(path)) as mapped:
                    reader = pa.ipc.open_file(mapped)
                    for i in range(reader.num_record_batches):
                        column = reader.get_batch(i).column(key)
                        nulls += column.null_count
                        if pa.types.is_dictionary(column.type):
                            column = column.dictionary_decode()
                        # Copied out of the mapping, so that it is released with the file.
                        chunks.append(pa.concat_arrays([column.drop_null()]))
            except (pa.ArrowException, OSError) as e:
                raise SourceReadError(
                    f"could not read the key column {key!r} of {self._name} from {path}: {e}"
                ) from e
        if not chunks:
            return nulls, []
        values, repeats = pa.chunked_array(chunks).value_counts().flatten()
        repeated = pc.greater(repeats, 1)
        if not pc.any(repeated).as_py():
            return nulls, []
        dupes = pa.table({"key": values.filter(repeated), "n": repeats.filter(repeated)})
        # The order of the SQL of the other sources: most repeated first, then by key.
        dupes = dupes.sort_by([("n", "descending"), ("key", "ascending")]).slice(0, limit)
        return nulls, [(k, int(n)) for k, n in zip(*dupes.to_pydict().values(), strict=True)]


def _rebatch(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, rows: int
) -> Iterator[pa.RecordBatch]:
    """Re-chunk ``batches`` into batches of exactly ``rows`` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending, schema=schema)
            yield _single_batch(table.slice(0, rows))
            rest = table.slice(rows)
            pending = [b for b in rest.to_batches() if b.num_rows]
            held = rest.num_rows
    if held:
        yield _single_batch(pa.Table.from_batches(pending, schema=schema))


def _cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with ``schema``'s field types (its names and order)."""
    if batch.schema.equals(schema):
        return batch
    arrays = [
        column if column.type == field.type else column.cast(field.type)
        for column, field in zip(batch.columns, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _single_batch(table: pa.Table) -> pa.RecordBatch:
    # combine_chunks leaves one chunk per column, so the table is exactly one batch.
    return table.combine_chunks().to_batches()[0]


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


def parse_source(spec: str) -> DuckDBSource | ParquetSource | PostgresSource:
    """Build a source from its command-line form.

    Forms (surrounding whitespace is ignored):

    - ``duckdb:PATH::TABLE_OR_QUERY`` (e.g. ``duckdb:data/dw.duckdb::stg_documents``);
    - ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB::TABLE_OR_QUERY`` (``postgres://`` too; a
      table such as ``public.docs``, or a ``SELECT`` query);
    - ``env:VAR::TABLE_OR_QUERY``: PostgreSQL, with the connection URL (or a libpq
      ``key=value`` string) read from environment variable ``VAR`` (keeps the password off
      the command line and out of configuration);
    - ``parquet:PATH`` or a plain ``PATH`` to a Parquet file or directory.

    Other connection forms are recognised and refused with the form to write instead: a
    SQLAlchemy URL (``postgresql+psycopg://``), a JDBC URL, another scheme (``pg://``), a
    libpq ``key=value`` string given inline, a PostgreSQL URL with an unencoded ``/``, ``@``
    or space in its user or password.

    Raises:
        ConfigError: The form is not recognised or the file does not exist. No message
            repeats a password (:func:`~qwen3_pipeline.core.errors.redact_secrets`).

    Example:
        >>> parse_source("duckdb:dw.duckdb::docs")  # doctest: +SKIP
        >>> parse_source("env:QWEN3_PIPELINE_PG_URL::public.docs")  # doctest: +SKIP
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"empty source; give one of {SOURCE_FORMS}")
    if spec.lower().startswith(_POSTGRES_PREFIXES):
        url, target = split_postgres_spec(spec)
        check_url_form(url)
        if not target:
            # The spec is not repeated: it may hold a password.
            raise ConfigError(
                "a PostgreSQL source needs ::TABLE_OR_QUERY after the URL, e.g. "
                "postgresql://user@host:5432/dbname::public.docs (or a SELECT query)"
            )
        return PostgresSource(url, target)
    if spec.startswith("env:"):
        variable, sep, target = spec[len("env:") :].partition("::")
        if not sep or not _ENV_VARIABLE.match(variable) or not target.strip():
            raise ConfigError(
                f"source {redact_secrets(spec)!r}: write a PostgreSQL source whose URL is in an "
                "environment variable as env:VAR::TABLE_OR_QUERY, e.g. "
                "env:QWEN3_PIPELINE_PG_URL::public.docs"
            )
        return PostgresSource.from_env(variable, target)
    if spec.startswith("duckdb:"):
        body = spec[len("duckdb:") :]
        path, sep, target = body.partition("::")
        if not sep or not path or not target.strip():
            raise ConfigError(
                f"source {redact_secrets(spec)!r}: write a DuckDB source as "
                "duckdb:PATH::TABLE_OR_QUERY, e.g. duckdb:data/warehouse.duckdb::stg_documents"
            )
        return DuckDBSource(path, target)
    if _ANY_URL.match(spec):
        url, _ = split_postgres_spec(spec)
        check_url_form(url)  # refuses every scheme but postgresql:// (checked above)
    path = spec[len("parquet:") :] if spec.startswith("parquet:") else spec
    if not path:
        raise ConfigError(f"empty Parquet path; give one of {SOURCE_FORMS}")
    if _LIBPQ_KEYWORD.match(path) and not Path(path).exists():
        raise ConfigError(
            "the source looks like a libpq key=value connection string (host=... "
            "password=...); --source takes a URL: write it as "
            f"{URL_EXAMPLE}::TABLE_OR_QUERY, or put the key=value string in an environment "
            "variable and pass env:VAR::TABLE_OR_QUERY"
        )
    if Path(path).suffix.lower() in {".duckdb", ".db", ".ddb"}:
        shown = redact_secrets(path)
        raise ConfigError(
            f"source {redact_secrets(spec)!r} looks like a DuckDB file; write "
            f"duckdb:{shown}::TABLE_OR_QUERY"
        )
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"Parquet source {redact_secrets(path)!r} does not exist; check the path, or write "
            f"the source as one of {SOURCE_FORMS}"
        )
    return ParquetSource(path)


def _projected(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns])


def filtered_in_memory(
    source: Any, columns: Sequence[str], batch_rows: int, where: RowFilter
) -> Iterator[pa.RecordBatch]:
    """Read ``source`` batch by batch and keep the rows ``where`` selects (bounded memory)."""
    wanted = list(dict.fromkeys([*columns, where.column, where.key_column]))
    for batch in source.batches(wanted, batch_rows):
        kept = batch.filter(where.mask(batch))
        if kept.num_rows:
            yield kept.select(list(columns))
