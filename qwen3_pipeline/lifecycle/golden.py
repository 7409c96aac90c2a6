"""Golden sets: queries with the keys of the documents known to answer them.

:func:`load_golden_set` reads a golden set, JSONL with one
``{"query": "...", "relevant": [key, ...]}`` per line, strictly: every problem is a
:class:`~qwen3_pipeline.core.errors.ConfigError` naming its line (:func:`parse_golden_set` does
the same for lines already in memory).

Keys are the table's keys, of its type: on a table of whole documents the ``key`` column, on a
table of document chunks the document key ``doc_key`` (search there ranks documents by their
best chunk). Integer keys are written as JSON numbers, string keys as JSON strings.

Example:
    >>> golden = parse_golden_set(['{"query": "reset password", "relevant": ["kb-17"]}'])
    >>> len(golden), golden.key_type
    (1, <class 'str'>)
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen3_pipeline.core.errors import ConfigError

Key = int | str
_EXAMPLE_LINE = '{"query": "how do I reset my password?", "relevant": ["kb-17", "kb-42"]}'


@dataclass(frozen=True, kw_only=True)
class GoldenQuery:
    """One query of a golden set and the keys of the documents that answer it.

    Attributes:
        query: The query text, as it will be embedded.
        relevant: Keys of the relevant documents, in the file's order (no repeats).
        line: The line of the golden-set file it came from (1-based).
    """

    query: str
    relevant: tuple[Key, ...]
    line: int


@dataclass(frozen=True, kw_only=True)
class GoldenSet:
    """Queries with their relevant document keys; build it with :func:`load_golden_set`.

    Attributes:
        queries: The queries, in the file's order, each query once.
        source: Where the set came from (the file path), for messages and reports.
    """

    queries: tuple[GoldenQuery, ...]
    source: str = "<golden set>"

    def __post_init__(self) -> None:
        if not self.queries:
            raise ConfigError(f"golden set {self.source!r} holds no query; it needs at least one")

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[GoldenQuery]:
        return iter(self.queries)

    @property
    def key_type(self) -> type:
        """``int`` or ``str``: the one type of every relevant key in the set."""
        return type(self.queries[0].relevant[0])


def load_golden_set(path: str | Path) -> GoldenSet:
    """Read and validate a golden set: JSONL, one query object per line.

    Each non-blank line is ``{"query": "<text>", "relevant": [<key>, ...]}``: a non-empty
    query, and a non-empty list of the keys (integers or strings, one type in the whole file)
    of the documents that answer it. Other fields are allowed and ignored (an id, a note).
    Blank lines are skipped; line numbers in errors count them.

    Args:
        path: The JSONL file (UTF-8).

    Returns:
        The golden set, in the file's order.

    Raises:
        ConfigError: The file cannot be read, or a line is invalid (not JSON, no query, an
            empty relevant list, a repeated query, a key of another type...), or the file holds
            no query. The message names the file and the line.

    Example:
        >>> golden = load_golden_set("golden.jsonl")  # doctest: +SKIP
        >>> len(golden), golden.key_type  # doctest: +SKIP
        (120, <class 'str'>)
    """
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read golden set {where!r} ({e.strerror or e}); pass the path of a JSONL "
            f"file with one query per line, like {_EXAMPLE_LINE}"
        ) from e
    texts: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            # A byte-order mark (Windows editors) may open the file; it is not part of the JSON.
            texts.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"golden set {where!r} line {number}: not UTF-8 (byte {e.start + 1}); save the "
                "file as UTF-8"
            ) from e
    return parse_golden_set(texts, source=where)


def parse_golden_set(lines: Iterable[str], *, source: str = "<golden set>") -> GoldenSet:
    """Validate the lines of a golden set (pure; :func:`load_golden_set` reads the file).

    Args:
        lines: The lines, in order (line 1 first), with or without their line endings.
        source: Where the lines came from, for messages.

    Returns:
        The golden set.

    Raises:
        ConfigError: As :func:`load_golden_set`.

    Example:
        >>> golden = parse_golden_set(['{"query": "q", "relevant": [3, 1]}', ""])
        >>> golden.queries[0].relevant, golden.key_type
        ((3, 1), <class 'int'>)
    """
    queries: list[GoldenQuery] = []
    seen: dict[str, int] = {}
    first_key: tuple[Key, int] | None = None  # the first key read, and its line
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = _parse_line(text, number, source)
        duplicate = seen.get(item.query.strip())
        if duplicate is not None:
            raise ConfigError(
                f"golden set {source!r} line {number}: query {item.query!r} repeats line "
                f"{duplicate}; list each query once, with all its relevant keys on one line"
            )
        seen[item.query.strip()] = number
        first_key = first_key or (item.relevant[0], number)
        _check_one_key_type(item, first_key, source)
        queries.append(item)
    if not queries:
        raise ConfigError(
            f"golden set {source!r} holds no query (it is empty or only blank lines); write one "
            f"JSON object per line, like {_EXAMPLE_LINE}"
        )
    return GoldenSet(queries=tuple(queries), source=source)


def _parse_line(text: str, number: int, source: str) -> GoldenQuery:
    where = f"golden set {source!r} line {number}"
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one object per "
            f"line, like {_EXAMPLE_LINE}"
        ) from e
    if not isinstance(item, dict):
        raise ConfigError(
            f"{where}: expected a JSON object with 'query' and 'relevant', got "
            f"{type(item).__name__} {item!r:.60}; write one object per line, like {_EXAMPLE_LINE}"
        )
    query = item.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(
            f"{where}: 'query' must be a non-empty string, got {query!r:.60}; give the "
            "query text as users would type it"
        )
    relevant = item.get("relevant")
    if not isinstance(relevant, list) or not relevant:
        raise ConfigError(
            f"{where}: 'relevant' of query {query!r:.60} must be a non-empty list of document "
            f"keys, got {relevant!r:.60}; list the key of at least one document that answers "
            "it, or drop the line"
        )
    keys: list[Key] = []
    for key in relevant:
        # bool is an int in Python, and JSON true is never a table key.
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ConfigError(
                f"{where}: relevant key {key!r:.60} of query {query!r:.60} is a JSON "
                f"{_json_type(key)}; keys are integers or strings (the table's key, or "
                "doc_key on a table of document chunks)"
            )
        if key in keys:
            raise ConfigError(
                f"{where}: relevant key {key!r} of query {query!r:.60} is listed twice; list "
                "each key once"
            )
        keys.append(key)
    return GoldenQuery(query=query, relevant=tuple(keys), line=number)


def _check_one_key_type(item: GoldenQuery, first: tuple[Key, int], source: str) -> None:
    # A table has one key type, and 12 never equals "12": a mixed set would silently score
    # the keys of the other type as never found.
    first_key, first_line = first
    for key in item.relevant:
        if type(key) is not type(first_key):
            raise ConfigError(
                f"golden set {source!r} line {item.line}: relevant key {key!r} is "
                f"{_kind(key)} but key {first_key!r} (line {first_line}) is {_kind(first_key)}; "
                "a table has one key type, so write every key as a JSON number for integer keys "
                "or as a JSON string for string keys"
            )


def _json_type(value: Any) -> str:
    names = {bool: "boolean", float: "number (not an integer)", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _kind(key: Key) -> str:
    return "an integer" if isinstance(key, int) else "a string"
