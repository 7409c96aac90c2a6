"""A real text corpus that ships on every machine: the docstrings of the Python standard library.

The demo pipeline and the benchmarks need thousands of real, varied texts without a download.
The standard library's docstrings fit: several thousand texts, from one-line function summaries
to module docstrings of many pages (a skewed length distribution, like real document tables),
plus a few near-duplicates (the generated codec modules) that a near-duplicate report can find.

Texts are extracted by parsing the ``.py`` files with :mod:`ast`; no module is imported, so the
extraction runs no library code, has no side effects and gives the same records, in the same
order, every time for a given Python installation. Test suites, GUI packages (``idlelib``,
``tkinter``, ``turtledemo``), ``site-packages`` and generated data modules are skipped.

Example:
    >>> from qwen3_pipeline.demo.corpus import stdlib_docstrings
    >>> records = stdlib_docstrings(limit=3, seed=0)
    >>> len(records), records[0].kind in {"module", "class", "function"}
    (3, True)
"""

import ast
import concurrent.futures
import functools
import inspect
import logging
import os
import random
import re
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError, UnsafeNameError

logger = logging.getLogger(__name__)

DocKind = Literal["module", "class", "function"]

DEFAULT_TABLE = "raw_docstrings"

# Directory names skipped wherever they occur: test suites and their data files (some of which
# are deliberately invalid Python), GUI code, third-party packages, build configuration, and
# generated data modules whose only "docstring" is machine output.
_SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "pydoc_data",
        "lib-dynload",
    }
)
_SAFE_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DocRecord:
    """One docstring of the standard library.

    Attributes:
        doc_id: Stable unique key, ``"module:qualname"`` (``"module:"`` for a module docstring);
            a name defined twice in one module (platform branches) gets ``"#2"``, ``"#3"``...
        module: Dotted module name, e.g. ``"json.decoder"``.
        qualname: Qualified name inside the module, e.g. ``"JSONDecoder.decode"``; empty for a
            module docstring.
        kind: ``"module"``, ``"class"`` or ``"function"`` (methods and async functions included).
        title: The name shown for the text: the qualname, or the module name for a module.
        body: The docstring, cleaned with :func:`inspect.cleandoc` (may be empty).
        source_path: The file, relative to the standard library root (POSIX separators).
    """

    doc_id: str
    module: str
    qualname: str
    kind: DocKind
    title: str
    body: str
    source_path: str


CORPUS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("qualname", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("body", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
    ]
)


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(
    limit: int | None = None, *, seed: int = 0, root: str | os.PathLike[str] | None = None
) -> list[DocRecord]:
    """Return the docstrings of the standard library as records, in a deterministic order.

    The full corpus is ordered by source file path, then by position in the file. With a
    ``limit``, a seeded random sample of that size is returned (still in corpus order), so a
    small corpus keeps the variety and the length skew of the whole one. The full extraction
    runs once per process (a few seconds) and is cached.

    Args:
        limit: Maximum number of records; ``None`` returns all of them.
        seed: Seed of the sample drawn when ``limit`` is smaller than the corpus.
        root: Library directory to read instead of the running interpreter's standard
            library (:func:`stdlib_root`); the same files are skipped.

    Returns:
        The records; ``doc_id`` values are unique.

    Raises:
        ConfigError: ``limit`` is negative.

    Example:
        >>> docs = stdlib_docstrings(limit=5, seed=1)
        >>> docs == stdlib_docstrings(limit=5, seed=1)
        True
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    records = _all_records(Path(root).resolve() if root is not None else stdlib_root())
    if limit is None or limit >= len(records):
        return list(records)
    picked = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in picked]


def corpus_arrow_table(limit: int | None = None, *, seed: int = 0) -> pa.Table:
    """Return :func:`stdlib_docstrings` as an Arrow table with :data:`CORPUS_SCHEMA`.

    Args:
        limit: Maximum number of rows; ``None`` returns all of them.
        seed: Seed of the sample drawn when ``limit`` is smaller than the corpus.

    Returns:
        One row per record, columns in :class:`DocRecord` field order.

    Example:
        >>> corpus_arrow_table(limit=2).column_names[:2]
        ['doc_id', 'module']
    """
    records = stdlib_docstrings(limit, seed=seed)
    arrays = [
        pa.array([getattr(r, field.name) for r in records], type=field.type)
        for field in CORPUS_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=CORPUS_SCHEMA)


def load_corpus_into_duckdb(
    db_path: str | os.PathLike[str],
    table: str = DEFAULT_TABLE,
    limit: int | None = None,
    *,
    seed: int = 0,
    loaded_at: datetime | None = None,
) -> int:
    """Create or replace a DuckDB table holding the corpus, atomically.

    The table has the :class:`DocRecord` columns, ``doc_id`` as primary key, plus
    ``updated_at`` (``TIMESTAMP``, UTC): the time the row's content last changed. A row whose
    columns are identical to the row already stored under its ``doc_id`` keeps its old
    ``updated_at``; new and changed rows get ``loaded_at``. Rows no longer in the corpus
    disappear. The whole replacement is one transaction: readers see the old table or the new
    one, never a mix, and a failure leaves the old table in place.

    Args:
        db_path: The DuckDB database file (created, with its parent directory, if missing).
        table: Table name in the ``main`` schema; a plain SQL identifier.
        limit: Maximum number of rows (a seeded sample, see :func:`stdlib_docstrings`).
        seed: Seed of that sample.
        loaded_at: Timestamp given to new and changed rows; defaults to now. A timezone-aware
            value is converted to UTC; a naive one is taken as UTC.

    Returns:
        The number of rows in the table.

    Raises:
        UnsafeNameError: ``table`` is not a plain identifier.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "warehouse.duckdb"
        >>> load_corpus_into_duckdb(path, limit=10)
        10
    """
    if not _SAFE_IDENTIFIER.fullmatch(table):
        raise UnsafeNameError(
            f"table name {table!r} is not a plain SQL identifier (letters, digits, underscore, "
            "not starting with a digit, at most 63 characters)"
        )
    stamp = _as_naive_utc(loaded_at or datetime.now(UTC))
    incoming = corpus_arrow_table(limit, seed=seed)
    path = Path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)

    target = f'main."{table}"'
    content_columns = [c for c in CORPUS_SCHEMA.names if c != "doc_id"]
    column_defs = ",\n".join(
        f'"{name}" VARCHAR NOT NULL' + (" PRIMARY KEY" if name == "doc_id" else "")
        for name in CORPUS_SCHEMA.names
    )
    select_new = ", ".join(f'i."{c}"' for c in CORPUS_SCHEMA.names)
    all_columns = ", ".join(f'"{c}"' for c in [*CORPUS_SCHEMA.names, "updated_at"])

    con = duckdb.connect(str(path))
    try:
        con.register("incoming_corpus", incoming)
        con.execute("BEGIN TRANSACTION")
        try:
            if _has_columns(con, table, [*CORPUS_SCHEMA.names, "updated_at"]):
                unchanged = " AND ".join(f'o."{c}" = i."{c}"' for c in content_columns)
                con.execute(
                    f"""
                    CREATE TEMP TABLE incoming_stamped AS
                    SELECT {select_new},
                           CASE WHEN o.doc_id IS NOT NULL AND {unchanged}
                                THEN o.updated_at ELSE ?::TIMESTAMP END AS updated_at
                    FROM incoming_corpus AS i LEFT JOIN {target} AS o USING (doc_id)
                    """,
                    [stamp],
                )
            else:
                con.execute(
                    f"""
                    CREATE TEMP TABLE incoming_stamped AS
                    SELECT {select_new}, ?::TIMESTAMP AS updated_at FROM incoming_corpus AS i
                    """,
                    [stamp],
                )
            con.execute(
                f"CREATE OR REPLACE TABLE {target} ({column_defs},\n"
                '"updated_at" TIMESTAMP NOT NULL)'
            )
            con.execute(
                f"INSERT INTO {target} ({all_columns}) "
                f"SELECT {all_columns} FROM incoming_stamped ORDER BY doc_id"
            )
            con.execute("DROP TABLE incoming_stamped")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        (count,) = con.execute(f"SELECT count(*) FROM {target}").fetchone()  # type: ignore[misc]
    finally:
        con.close()
    logger.info("loaded %d docstrings into %s (%s)", count, table, path)
    return int(count)


def narrow_length_texts(
    n: int, seed: int = 0, *, min_chars: int = 200, max_chars: int = 240
) -> list[str]:
    """Return ``n`` distinct corpus texts whose lengths all lie in ``[min_chars, max_chars]``.

    A counterpart to the skewed corpus for benchmarks: with nearly equal lengths, batches
    carry almost no padding, so throughput can be compared with and without length skew.
    Each docstring, its whitespace collapsed to single spaces, is cut at word boundaries into
    consecutive pieces of at most ``max_chars``; pieces shorter than ``min_chars`` (the tail
    of a docstring, short docstrings) are not used. The default band (200-240 characters) is
    roughly 45-60 tokens of English prose; the whole corpus yields a few thousand texts in it.

    Args:
        n: Number of texts.
        seed: Seed of the shuffle that picks them.
        min_chars: Shortest allowed text, in characters.
        max_chars: Longest allowed text, in characters.

    Returns:
        ``n`` distinct strings in a seeded random order.

    Raises:
        ConfigError: The band is empty or invalid, ``n`` is negative, or the corpus has fewer
            than ``n`` distinct pieces that fit the band.

    Example:
        >>> texts = narrow_length_texts(3, seed=0)
        >>> all(200 <= len(t) <= 240 for t in texts)
        True
    """
    if not 0 < min_chars <= max_chars:
        raise ConfigError(
            f"need 0 < min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}"
        )
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    pool = _band_texts(min_chars, max_chars)
    if n > len(pool):
        raise ConfigError(
            f"the corpus has only {len(pool)} distinct texts of {min_chars}-{max_chars} "
            f"characters, fewer than the {n} requested; widen the band or ask for fewer"
        )
    return random.Random(seed).sample(pool, n)


@functools.lru_cache(maxsize=4)
def _band_texts(min_chars: int, max_chars: int) -> list[str]:
    seen: dict[str, None] = {}
    for record in _all_records(stdlib_root()):
        words = record.body.split()
        start = 0
        while start < len(words):
            # Greedy: as many whole words as fit in max_chars (a longer single word is skipped).
            end, length = start, -1
            while end < len(words) and length + 1 + len(words[end]) <= max_chars:
                length += 1 + len(words[end])
                end += 1
            if end == start:
                start += 1
                continue
            if length >= min_chars:
                seen.setdefault(" ".join(words[start:end]), None)
            start = end
    return list(seen)


@functools.lru_cache(maxsize=2)
def _all_records(root: Path) -> tuple[DocRecord, ...]:
    # Parsed in a thread of its own: CPython 3.11's AST conversion compares the thread's
    # recursion depth before and after, and after a library raised the recursion limit in
    # this thread (Airflow's operator code calls sys.setrecursionlimit(5000)) it can fail with
    # "SystemError: AST constructor recursion depth mismatch". A new thread starts clean.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_parse_records, root).result()


def _parse(source: bytes, filename: str, tries: int = 3) -> ast.Module:
    """``ast.parse``, retried on CPython 3.11's "AST constructor recursion depth mismatch".

    Its AST conversion keeps the depth in interpreter-wide state, so another thread
    converting an AST at the same moment (seen under the test runner) can trip the check;
    a file that still trips it is skipped by the caller like one that does not parse.
    """
    for attempt in range(tries):
        try:
            return ast.parse(source, filename=filename)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e) or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _parse_records(root: Path) -> tuple[DocRecord, ...]:
    started = time.perf_counter()
    records: list[DocRecord] = []
    seen_ids: dict[str, int] = {}
    skipped = 0
    for path in _source_files(root):
        relative = path.relative_to(root).as_posix()
        try:
            tree = _parse(path.read_bytes(), relative)
        except (SyntaxError, ValueError, UnicodeDecodeError, SystemError) as e:
            skipped += 1
            logger.debug("skipping %s: %s", relative, e)
            continue
        module = _module_name(relative)
        for qualname, kind, raw in _docstrings(tree):
            base_id = f"{module}:{qualname}"
            seen_ids[base_id] = seen_ids.get(base_id, 0) + 1
            occurrence = seen_ids[base_id]
            records.append(
                DocRecord(
                    doc_id=base_id if occurrence == 1 else f"{base_id}#{occurrence}",
                    module=module,
                    qualname=qualname,
                    kind=kind,
                    title=qualname or module,
                    body=_clean(raw),
                    source_path=relative,
                )
            )
    logger.info(
        "extracted %d docstrings from %s in %.2fs (%d unparsable files skipped)",
        len(records),
        root,
        time.perf_counter() - started,
        skipped,
    )
    return tuple(records)


def _source_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, subdirs, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting makes the walk order stable.
        subdirs[:] = sorted(
            d
            for d in subdirs
            if d not in _SKIPPED_DIRS and d.isidentifier()  # "config-3.11-..." is no package
        )
        found.extend(Path(directory) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _module_name(relative_path: str) -> str:
    parts = relative_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


_Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, DocKind, str]]:
    doc = ast.get_docstring(tree, clean=False)
    if doc is not None:
        yield "", "module", doc
    yield from _definitions(tree.body, prefix="")


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, DocKind, str]]:
    # Only module- and class-level definitions are public API. Their bodies are searched
    # through if/try/with blocks (platform- and version-specific definitions) but never
    # through function bodies, which also keeps the walk cheap.
    for node in body:
        if isinstance(node, _Definition):
            qualname = f"{prefix}{node.name}"
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                kind: DocKind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield qualname, kind, doc
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node.body, prefix=f"{qualname}.")
        elif isinstance(node, ast.If | ast.For | ast.While):
            yield from _definitions(node.body, prefix)
            yield from _definitions(node.orelse, prefix)
        elif isinstance(node, ast.With):
            yield from _definitions(node.body, prefix)
        elif isinstance(node, ast.Try | ast.TryStar):
            yield from _definitions(node.body, prefix)
            for handler in node.handlers:
                yield from _definitions(handler.body, prefix)
            yield from _definitions(node.orelse, prefix)
            yield from _definitions(node.finalbody, prefix)


def _clean(raw: str) -> str:
    text = inspect.cleandoc(raw)
    # A handful of docstrings hold lone surrogates or NULs written as escapes; make every text
    # valid UTF-8 without control NULs, keeping what was there visible as an escape.
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _has_columns(con: duckdb.DuckDBPyConnection, table: str, names: list[str]) -> bool:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() "
        "WHERE schema_name = 'main' AND table_name = ? AND NOT internal",
        [table],
    ).fetchall()
    return set(names) <= {name for (name,) in rows}


def _as_naive_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)
