"""PostgreSQL source: a table, view or query, streamed in Arrow batches from one snapshot.

The driver is psycopg 3 (``pip install 'qwen3-pipeline[postgres]'``). Rows are read through a
named (server-side) cursor, ``FETCH``-ed ``batch_rows`` at a time and converted to Arrow per
batch, so client memory stays near one batch whatever the table holds. Every read runs in a
``REPEATABLE READ READ ONLY`` transaction: one call of :meth:`PostgresSource.batches` sees one
snapshot from its first row to its last, whatever other sessions commit meanwhile.

Credentials never leave the URL: :attr:`PostgresSource.name` (the lineage label written on
every row, and the source's name in messages) is the URL without its password, and every
error raised here has the password scrubbed out (the password itself, and whatever
:func:`~qwen3_pipeline.core.errors.redact_secrets` recognises). A URL that libpq would misread
(an unencoded ``/``, ``@`` or space in the user or password, a scheme other than
``postgresql://``/``postgres://``) is refused before it is parsed, so a password never ends
up in a host or database name that a message would repeat.
"""

import os
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa

from qwen3_pipeline.core.errors import (
    ConfigError,
    SourceReadError,
    SourceUnavailableError,
    redact_secrets,
)

if TYPE_CHECKING:
    import psycopg

    from qwen3_pipeline.sources.watermark import RowFilter

APPLICATION_NAME = "qwen3-pipeline"
DEFAULT_CONNECT_TIMEOUT_S = 10
_CURSOR_NAME = "qwen3_pipeline_read"
_LISTED_TABLES = 50

# A table or view name, optionally schema-qualified; each part bare or double-quoted. Anything
# else is run as a query.
_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_TABLE_NAME = re.compile(rf"^{_PART}(?:\.{_PART})?$")
# Connection failures that a retry cannot fix: wrong credentials, database or role.
_PERMANENT_CONNECT = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|database \".*\" does not exist|"
    r"role \".*\" does not exist|no password supplied|SSL is not enabled|invalid sslmode|"
    r"invalid (?:integer|port) value",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*?:([^/?#@]*)@")
# The whole userinfo password of a URL, mistyped or not: from the first ":" to the last "@".
_URL_PASSWORD_GREEDY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:(.*)@")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES = ("postgresql", "postgres")
URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:5432/DBNAME"
# libpq quotes the piece of a connection string it could not parse; that piece may be part of
# a password, so it is masked (a connection option's name is kept: it is no secret).
_QUOTED = re.compile(r'(?<!option )"([^"]*)"')

# Arrow types of the PostgreSQL types read natively (by type OID); any other type (json,
# enums, inet, interval, citext...) is read as its text form.
_NATIVE_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    17: pa.binary(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    26: pa.int64(),  # oid
    700: pa.float32(),
    701: pa.float64(),
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
    1000: pa.list_(pa.bool_()),
    1005: pa.list_(pa.int16()),
    1007: pa.list_(pa.int32()),
    1016: pa.list_(pa.int64()),
    1021: pa.list_(pa.float32()),
    1022: pa.list_(pa.float64()),
    1009: pa.list_(pa.string()),
    1015: pa.list_(pa.string()),
}
_NUMERIC = 1700
_MAX_DECIMAL_DIGITS = 38


@dataclass(frozen=True)
class _Column:
    name: str
    type: pa.DataType
    as_text: bool  # selected as ``column::text`` (uuid, text types, anything not native)

    def select(self) -> str:
        quoted = _quote(self.name)
        return f"{quoted}::text" if self.as_text else quoted


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _column_of(name: str, type_oid: int, precision: int | None, scale: int | None) -> _Column:
    if type_oid in _NATIVE_TYPES:
        return _Column(name, _NATIVE_TYPES[type_oid], as_text=False)
    if (
        type_oid == _NUMERIC
        and precision is not None
        and scale is not None
        and 0 < precision <= _MAX_DECIMAL_DIGITS
    ):
        return _Column(name, pa.decimal128(precision, scale), as_text=False)
    # uuid becomes its canonical string, unconstrained numeric its exact decimal text, and
    # text, varchar, char, json and every other type exactly what PostgreSQL prints.
    return _Column(name, pa.string(), as_text=True)


def _display_url(params: dict[str, Any]) -> str:
    """``postgresql://user@host:port/db`` from parsed connection parameters (no password)."""
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port") or ""
    dbname = params.get("dbname") or ""
    userinfo = f"{urllib.parse.quote(user, safe='')}@" if user else ""
    socket = host.startswith("/")
    netloc = "" if socket else (f"[{host}]" if ":" in host and "," not in host else host)
    if port and not socket:
        netloc += f":{port}"
    url = f"postgresql://{userinfo}{netloc}/{urllib.parse.quote(dbname, safe='')}"
    return f"{url}?host={host}" if socket else url


class PostgresSource:
    """Rows of a PostgreSQL table, view or query, read from one consistent snapshot.

    Each :meth:`batches` call opens one connection, starts a ``REPEATABLE READ READ ONLY``
    transaction and streams the rows through a server-side cursor, ``batch_rows`` rows per
    ``FETCH``: the read sees one snapshot from its first batch to its last (rows committed by
    others meanwhile are not seen), and memory stays near one batch. :meth:`schema` and
    :meth:`key_problems` each run in their own snapshot: a refresh that checks keys in one and
    reads rows in a later one still rejects a null or duplicate key that appeared in between
    (the plan checks every key it reads), and a column whose type changed in between makes
    the read fail with :class:`SourceUnavailableError`, so a retry starts over consistently.

    Column types: integers, floats, booleans, ``bytea``, ``date``, ``time``, ``timestamp``
    (naive) and ``timestamptz`` (``timestamp[us, tz=UTC]``), ``numeric(p, s)`` with
    ``p <= 38`` (``decimal128``) and one-dimensional int/float/bool/text arrays map to the
    matching Arrow types; ``uuid`` (canonical lowercase text), unconstrained ``numeric``
    (exact text), text types, ``json``/``jsonb``, enums and every other type are read as
    their PostgreSQL text form (``string``).

    Args:
        url: A libpq connection URL (``postgresql://user:password@host:port/db``) or
            ``key=value`` connection string. Parameters it leaves out come from the libpq
            environment (``PGPASSWORD``, ``PGHOST``, ``~/.pgpass``...).
        table_or_query: A table or view name (``docs``, ``public.docs``; resolved like SQL
            does, so unquoted names fold to lower case and follow ``search_path``), or a
            ``SELECT`` query (anything that is not a name runs as SQL).

    Raises:
        ConfigError: psycopg is not installed, the URL cannot be parsed, or
            ``table_or_query`` is empty.

    Example:
        >>> source = PostgresSource("postgresql://reader:pw@db:5432/app", "docs")  # doctest: +SKIP
        >>> source.name  # doctest: +SKIP
        'postgresql://reader@db:5432/app::docs'
    """

    def __init__(self, url: str, table_or_query: str) -> None:
        _psycopg()
        from psycopg.conninfo import conninfo_to_dict

        if not isinstance(url, str) or not url.strip():
            raise ConfigError(
                "PostgresSource needs a connection URL, e.g. postgresql://user@host:5432/db"
            )
        if not isinstance(table_or_query, str) or not table_or_query.strip():
            raise ConfigError("PostgresSource needs a table name or a query, got an empty string")
        self._secrets = _url_secrets(url)
        check_url_form(url)
        try:
            params = conninfo_to_dict(url.strip())
        except Exception as e:
            detail = _QUOTED.sub(lambda m: m.group(0) if m.group(1) == "=" else '"***"', str(e))
            raise ConfigError(
                self._scrub(
                    f"could not parse the PostgreSQL connection URL: {_one_line(detail)}. "
                    f"Write it as {URL_EXAMPLE} (percent-encode special characters of the "
                    "password: %2F for /, %40 for @, %20 for a space)"
                )
            ) from None
        password = params.get("password")
        if password:
            self._secrets.add(str(password))
        self._conninfo = url.strip()
        self._params = {k: str(v) for k, v in params.items() if k != "password"}
        self.table_or_query = table_or_query.strip()
        self._schema: pa.Schema | None = None

    @classmethod
    def from_env(cls, variable: str, table_or_query: str) -> "PostgresSource":
        """Build a source whose connection URL is the value of an environment variable.

        Keeps the URL (and its password) out of code, configuration and process listings:
        e.g. a Dagster code location builds the source in the run, from a variable set in
        the deployment's secrets.

        Args:
            variable: The environment variable holding the URL (e.g. ``QWEN3_PIPELINE_PG_URL``).
            table_or_query: As for :class:`PostgresSource`.

        Raises:
            ConfigError: The variable is unset or empty (its value is never shown).

        Example:
            >>> PostgresSource.from_env("QWEN3_PIPELINE_PG_URL", "public.docs")  # doctest: +SKIP
        """
        value = os.environ.get(variable, "")
        if not value.strip():
            raise ConfigError(
                f"environment variable {variable} is not set (or empty); set it to the "
                "PostgreSQL connection URL, e.g. postgresql://user:password@host:5432/dbname"
            )
        return cls(value, table_or_query)

    @property
    def name(self) -> str:
        """``postgresql://user@host:port/db::TABLE_OR_QUERY``, never with the password."""
        return f"{self.url}::{self.table_or_query}"

    @property
    def url(self) -> str:
        """The connection URL without its password (user, host, port and database only)."""
        return _display_url(self._params)

    def __repr__(self) -> str:
        return f"PostgresSource({self.url!r}, {self.table_or_query!r})"

    # ----------------------------------------------------------------------- reading

    def schema(self) -> pa.Schema:
        """The Arrow schema of the table or query (described with ``LIMIT 0``, no rows read).

        Raises:
            SourceReadError: The table does not exist, the query fails, or it returns two
                columns with the same name.
            SourceUnavailableError: The server cannot be reached.
        """
        with self._snapshot() as conn:
            columns = self._describe(conn, self._relation(conn))
        schema = pa.schema([pa.field(c.name, c.type) for c in columns])
        self._schema = schema
        return schema

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` through a server-side cursor, ``batch_rows`` rows per batch.

        The whole read is one ``REPEATABLE READ`` snapshot; the connection is closed when the
        iterator is exhausted, closed or garbage-collected.

        Raises:
            SourceUnavailableError: The connection failed or dropped mid-read, or a column's
                type changed since :meth:`schema` (a migration ran: re-run).
            SourceReadError: A missing column, a failing query, or a value Arrow cannot hold.
        """
        yield from self._stream(list(columns), batch_rows, None)

    def batches_where(
        self, columns: Sequence[str], batch_rows: int, where: "RowFilter"
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows ``where`` selects: a ``WHERE`` the server evaluates.

        An index on the ``updated_at`` column (``CREATE INDEX ON documents (updated_at)``)
        makes a watermark read touch only the changed rows.

        Raises:
            SourceUnavailableError: As :meth:`batches`.
            SourceReadError: As :meth:`batches`.
        """
        yield from self._stream(list(columns), batch_rows, where)

    def _stream(
        self, wanted: list[str], batch_rows: int, where: "RowFilter | None"
    ) -> Iterator[pa.RecordBatch]:
        with self._snapshot() as conn:
            relation = self._relation(conn)
            described = {c.name: c for c in self._describe(conn, relation)}
            missing = [c for c in wanted if c not in described]
            if missing:
                raise SourceReadError(
                    self._scrub(
                        f"column(s) {missing} not found in {self.name}; available columns: "
                        f"{list(described)}"
                    )
                )
            chosen = [described[c] for c in wanted]
            self._check_unchanged(chosen)
            projection = ", ".join(c.select() for c in chosen)
            query, params = f"SELECT {projection} FROM {relation}", None
            if where is not None:
                column_type = described[where.column].type if where.column in described else None
                clause, params = where.sql(
                    column_type or pa.timestamp("us", "UTC"), _quote, placeholder="%s"
                )
                query = f"{query} WHERE {clause}"
            cursor = conn.cursor(name=_CURSOR_NAME, binary=True)
            self._call("reading", cursor.execute, query, params)
            while True:
                rows = self._call("reading", cursor.fetchmany, batch_rows)
                if not rows:
                    return
                yield self._to_batch(rows, chosen)

    def key_problems(self, key: str, limit: int) -> tuple[int, list[tuple[Any, int]]]:
        """Null and duplicated keys, computed by PostgreSQL (one aggregate query each).

        Raises:
            SourceReadError: The key column does not exist or the query fails.
            SourceUnavailableError: The server cannot be reached.
        """
        with self._snapshot() as conn:
            relation = self._relation(conn)
            described = {c.name: c for c in self._describe(conn, relation)}
            if key not in described:
                raise SourceReadError(
                    self._scrub(
                        f"key column {key!r} not found in {self.name}; available columns: "
                        f"{list(described)}"
                    )
                )
            column = described[key].select()
            nulls_sql = f"SELECT count(*) FROM {relation} WHERE {_quote(key)} IS NULL"
            dupes_sql = (
                f"SELECT {column} AS k, count(*) AS n FROM {relation} "
                f"WHERE {_quote(key)} IS NOT NULL GROUP BY 1 HAVING count(*) > 1 "
                f"ORDER BY n DESC, k LIMIT {int(limit)}"
            )
            cursor = conn.cursor()
            self._call("checking keys", cursor.execute, nulls_sql)
            nulls = self._call("checking keys", cursor.fetchone)[0]
            self._call("checking keys", cursor.execute, dupes_sql)
            dupes = self._call("checking keys", cursor.fetchall)
        return int(nulls), [(k, int(n)) for k, n in dupes]

    # ----------------------------------------------------------------------- internals

    @contextmanager
    def _snapshot(self) -> Iterator["psycopg.Connection[Any]"]:
        """One connection in a ``REPEATABLE READ READ ONLY`` transaction, closed on exit.

        The transaction is never committed: closing the connection ends it, and a read-only
        transaction has nothing to keep.
        """
        psycopg = _psycopg()
        extra: dict[str, Any] = {}
        if "application_name" not in self._params:
            # Names the session in pg_stat_activity, so a DBA sees who holds the snapshot.
            extra["application_name"] = APPLICATION_NAME
        if "connect_timeout" not in self._params:
            extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
        conn = self._call("connecting", psycopg.connect, self._conninfo, **extra)
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            yield conn
        finally:
            conn.close()

    def _relation(self, conn: "psycopg.Connection[Any]") -> str:
        """The FROM-clause: a table name resolved by PostgreSQL, or the query as a subquery."""
        if not _TABLE_NAME.match(self.table_or_query):
            # The newline keeps a trailing "-- comment" in the query from eating the parenthesis.
            return f"({self.table_or_query.rstrip().rstrip(';')}\n) AS src"
        cursor = conn.cursor()
        # to_regclass parses the name as SQL would (case folding, quotes, search_path) and
        # its text form is the name correctly quoted and qualified for use in a query.
        self._call("resolving the table", cursor.execute,
                   "SELECT to_regclass(%s)::text", (self.table_or_query,))  # fmt: skip
        row = self._call("resolving the table", cursor.fetchone)
        if row is None or row[0] is None:
            self._call(
                "listing tables",
                cursor.execute,
                "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') "
                f"ORDER BY 1 LIMIT {_LISTED_TABLES}",
            )
            tables = [r[0] for r in self._call("listing tables", cursor.fetchall)]
            raise SourceReadError(
                self._scrub(
                    f"table or view {self.table_or_query!r} not found in {self.url} (or not "
                    f"visible to its user); tables and views there: {tables}"
                )
            )
        return str(row[0])

    def _describe(self, conn: "psycopg.Connection[Any]", relation: str) -> list[_Column]:
        cursor = conn.cursor()
        self._call("describing", cursor.execute, f"SELECT * FROM {relation} LIMIT 0")
        description = cursor.description or []
        columns = [_column_of(d.name, d.type_code, d.precision, d.scale) for d in description]
        names = [c.name for c in columns]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SourceReadError(
                self._scrub(
                    f"{self.name} returns column(s) {repeated} more than once; give each "
                    "column of the query a distinct name (SELECT a.id AS a_id, ...)"
                )
            )
        return columns

    def _check_unchanged(self, chosen: list[_Column]) -> None:
        if self._schema is None:
            return
        changed = [
            f"{c.name} ({self._schema.field(c.name).type} -> {c.type})"
            for c in chosen
            if c.name in self._schema.names and self._schema.field(c.name).type != c.type
        ]
        if changed:
            raise SourceUnavailableError(
                self._scrub(
                    f"column type(s) of {self.name} changed while it was being read: "
                    f"{changed} (a migration ran?); re-run the refresh"
                )
            )

    def _to_batch(self, rows: list[tuple[Any, ...]], columns: list[_Column]) -> pa.RecordBatch:
        values = list(zip(*rows, strict=True))
        arrays = []
        for column, data in zip(columns, values, strict=True):
            try:
                arrays.append(pa.array(data, type=column.type))
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                raise SourceReadError(
                    self._scrub(
                        f"column {column.name!r} of {self.name} holds a value that does not "
                        f"fit {column.type}: {e}. Cast or filter it in a query source"
                    )
                ) from e
        return pa.RecordBatch.from_arrays(arrays, names=[c.name for c in columns])

    def _call(self, doing: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a psycopg function, turning its errors into this package's typed errors."""
        psycopg = _psycopg()
        try:
            return function(*args, **kwargs)
        except psycopg.Error as e:
            self._raise_typed(doing, e)

    def _raise_typed(self, doing: str, error: "psycopg.Error") -> NoReturn:
        psycopg = _psycopg()
        detail = " ".join(str(error).split())
        cause = self._safe_cause(error)
        transient = isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        if doing == "connecting" and (not transient or _PERMANENT_CONNECT.search(detail)):
            raise ConfigError(
                self._scrub(
                    f"could not connect to PostgreSQL at {self.url}: {detail}. Check the "
                    "URL's host, port, database, user and password"
                )
            ) from cause
        if transient:
            raise SourceUnavailableError(
                self._scrub(
                    f"PostgreSQL source {self.url} is unavailable ({doing} "
                    f"{self.table_or_query!r}): {detail} (the connection was refused or "
                    "dropped: re-run when the server is reachable)"
                )
            ) from cause
        if isinstance(error, psycopg.DataError):
            raise SourceReadError(
                self._scrub(
                    f"{self.name} holds a value that cannot be read ({doing}): {detail}. "
                    "Cast or filter it in a query source"
                )
            ) from cause
        raise SourceReadError(
            self._scrub(f"PostgreSQL source {self.name} failed ({doing}): {detail}")
        ) from cause

    def _safe_cause(self, error: BaseException) -> BaseException | None:
        """``error`` to chain as the cause, or None where its text holds a secret."""
        text = str(error)
        return error if self._scrub(text) == text else None

    def _scrub(self, message: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        return redact_secrets(message)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _url_secrets(url: str) -> set[str]:
    """The password of a URL (raw and percent-decoded) and of ``password=`` parameters."""
    secrets: set[str] = set()
    url = url.strip()
    for pattern in (_URL_PASSWORD, _URL_PASSWORD_GREEDY):
        found = pattern.match(url)
        if found and found.group(1):
            secrets |= {found.group(1), urllib.parse.unquote(found.group(1))}
    for match in re.finditer(r"password\s*=\s*('[^']*'?|[^&\s]+)", url, re.IGNORECASE):
        value = match.group(1).strip("'")
        secrets |= {value, urllib.parse.unquote(value)}
    return {s for s in secrets if s}


def check_url_form(url: str) -> None:
    """Refuse a connection URL that libpq would misread, before it is parsed.

    A ``key=value`` connection string passes (libpq parses its quoting). A URL must use the
    ``postgresql://`` or ``postgres://`` scheme and hold no raw space, and its user and
    password no raw ``/`` or ``@``: libpq ends the userinfo at the first ``@`` or ``/``, so
    a password ``a/b`` would become a host and a database name, and ``a@b`` part of the host,
    both repeated by later messages (and a connection attempt to a host that does not exist
    looks transient). The messages name the expected form and never repeat the password.

    Raises:
        ConfigError: The URL's scheme or form is wrong; the message says what to write.

    Example:
        >>> check_url_form("postgresql://reader:p%2Fw@db:5432/app")
        >>> check_url_form("postgresql://reader:p/w@db:5432/app")
        Traceback (most recent call last):
        ...
        qwen3_pipeline.core.errors.ConfigError: the PostgreSQL URL postgresql://reader:***@db:5432/app has an '@' after its host: a '/' in the user or password must be percent-encoded as %2F (an '@' as %40)
    """  # noqa: E501
    url = url.strip()
    if url.lower().startswith("jdbc:"):
        _refuse_scheme("jdbc")
    scheme = _URL_SCHEME.match(url)
    if scheme is None:
        if re.match(r"^(?:postgresql|postgres):", url, re.IGNORECASE):
            raise ConfigError(
                f"a PostgreSQL URL starts with postgresql:// (two slashes); write it as "
                f"{URL_EXAMPLE}"
            )
        return  # a key=value connection string: libpq parses its quoting
    name = scheme.group(1).lower()
    if name not in _SCHEMES:
        _refuse_scheme(name)
    if any(c.isspace() for c in url):
        raise ConfigError(
            "the PostgreSQL URL holds a space; percent-encode it (%20), or put the URL in an "
            "environment variable (env:VAR::TABLE_OR_QUERY) if a password holds spaces"
        )
    rest = url[scheme.end() :]
    cut = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=len(rest))
    shown = redact_secrets(url)
    if cut < len(rest) and rest[cut] == "@":
        host = re.split(r"[/?]", rest[cut + 1 :], maxsplit=1)[0]
        if "@" in host:
            raise ConfigError(
                f"the PostgreSQL URL {shown} has more than one '@' before its host: an '@' in "
                "the user or password must be percent-encoded as %40"
            )
        return
    path = rest[cut:].split("?", 1)[0]
    if "@" in path:
        raise ConfigError(
            f"the PostgreSQL URL {shown} has an '@' after its host: a '/' in the user or "
            "password must be percent-encoded as %2F (an '@' as %40)"
        )


def _refuse_scheme(name: str) -> NoReturn:
    if name.startswith(_SCHEMES) and "+" in name:
        raise ConfigError(
            f"{name}:// is a SQLAlchemy URL (driver suffix {name[name.index('+') :]!r}); "
            f"the PostgreSQL source takes a libpq URL: write it as {URL_EXAMPLE}"
        )
    if name == "jdbc":
        raise ConfigError(
            "a JDBC URL (jdbc:postgresql://...) is not a libpq URL: drop the 'jdbc:' prefix "
            f"and write it as {URL_EXAMPLE} (user and password may also be ?user=...&password=...)"
        )
    raise ConfigError(
        f"{name}:// is not a PostgreSQL URL scheme; write it as {URL_EXAMPLE} (postgres:// "
        "works too)"
    )


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise ConfigError(
            "the PostgreSQL source needs psycopg 3; install it with "
            "pip install 'qwen3-pipeline[postgres]'"
        ) from e
    return psycopg


def split_postgres_spec(spec: str) -> tuple[str, str]:
    """Split ``URL::TABLE_OR_QUERY`` at the first ``::`` outside ``[...]`` (IPv6 hosts).

    Returns:
        The URL and the table or query (stripped; empty when there is none).
    """
    depth = 0
    for i, char in enumerate(spec):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and spec.startswith("::", i):
            return spec[:i], spec[i + 2 :].strip()
    return spec, ""
