"""Documents: how source rows become the normalised batches the engine diffs and embeds.

:class:`SourceConfig` says which column is the key, how the document text is rendered
(``text_columns`` joined, or a ``str.format`` template), which columns ride along and which
partition is read. :func:`read_batches` turns any source into batches of at most
``batch_rows`` rows with these columns, in this order:

- ``key``: the key column, as ``int64`` (any integer type) or ``string``;
- ``TEXT_COLUMN``: the rendered document, sanitised (no NUL, valid UTF-8), never null;
- ``partition_key``: the partition the row belongs to, never null;
- ``source_updated_at``: ``timestamp[us, tz=UTC]`` from ``updated_at`` (null without one;
  nanosecond timestamps are floored to the microsecond, and a log line says so);
- the carry-along columns under their own names.

Text columns may be strings, binary (decoded as UTF-8, invalid bytes becoming U+FFFD exactly
as in a string column), or scalars Arrow renders as text (numbers, booleans, dates...); a
list, struct or map column is refused, naming it, before anything is read.
"""

import logging
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.core.changes import decode_utf8, is_binary_type, sanitize_texts
from qwen3_pipeline.core.errors import ConfigError, InputDataError
from qwen3_pipeline.core.schema import TEXT_COLUMN, TIMESTAMP_TYPE, check_carry_names
from qwen3_pipeline.sources.partitions import (
    UNPARTITIONED,
    Partition,
    Shard,
    Shards,
    TimeWindow,
    shard_indices,
    shard_label,
)
from qwen3_pipeline.sources.readers import Source
from qwen3_pipeline.sources.watermark import RowFilter, Watermark, filtered_batches

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 50_000
# The fixed columns of every batch read_batches yields (carry-along columns follow).
OUTPUT_COLUMNS = ("key", TEXT_COLUMN, "partition_key", "source_updated_at")
_SHOWN = 10


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
        chunking: Cut each document into chunks (a ``ChunkingConfig``), one vector per chunk;
            ``None`` (the default) embeds each row as one vector, truncated at ``max_length``.
        watermark: Read only rows whose ``updated_at`` moved past the scope's stored mark
            (a :class:`~qwen3_pipeline.sources.watermark.Watermark`; needs ``updated_at``).

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
    chunking: ChunkingConfig | None = None
    watermark: Watermark | None = None
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
        check_carry_names(self.carry)
        repeated = sorted({c for c in self.carry if self.carry.count(c) > 1})
        if repeated:
            raise ConfigError(f"carry lists column(s) {repeated} more than once")
        if self.partition is not None and not isinstance(
            self.partition, Shard | Shards | TimeWindow
        ):
            raise ConfigError(
                f"partition must be a Shard, Shards or TimeWindow, got {self.partition!r}"
            )
        if self.watermark is not None:
            if not isinstance(self.watermark, Watermark):
                raise ConfigError(
                    f"watermark must be a Watermark (e.g. Watermark(lag_s=60)), got "
                    f"{self.watermark!r}"
                )
            if not self.updated_at:
                raise ConfigError(
                    "a watermark needs updated_at: the column whose value moves forward when a "
                    "row changes (--updated-at COL)"
                )
            if isinstance(self.partition, TimeWindow):
                raise ConfigError(
                    "a watermark cannot be combined with time-window partitions (rows move "
                    "between windows as updated_at changes); use hash shards or none"
                )
        if self.chunking is not None and not isinstance(self.chunking, ChunkingConfig):
            raise ConfigError(
                f"chunking must be a ChunkingConfig (e.g. ChunkingConfig(tokens=512)), "
                f"got {self.chunking!r}"
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


# --------------------------------------------------------------------------- reading


def output_schema(source: Source, config: SourceConfig) -> pa.Schema:
    """Return the schema :func:`read_batches` yields for ``source`` (checks the columns).

    Raises:
        InputDataError: A configured column is missing, or a column has an unusable type.
    """
    schema = source.schema()
    _check_columns(schema, config, source.name)
    _check_text_types(schema, config)
    fields = [
        pa.field("key", _key_type(schema.field(config.key).type, config.key), nullable=False),
        pa.field(TEXT_COLUMN, pa.string(), nullable=False),
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
    source: Source,
    config: SourceConfig,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    where: RowFilter | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream the source as normalised batches (see the module docstring for the columns).

    Only the configured columns are read; a partitioned read keeps only the rows of its
    partitions. Empty batches are not yielded. Memory stays bounded by ``batch_rows``.

    Args:
        source: Where the rows come from.
        config: Key, text, carry and partition settings.
        batch_rows: Most rows per batch read from the source.
        where: Read only the rows it selects (a watermark read), filtered by the source
            where it can.

    Yields:
        Record batches matching :func:`output_schema`.

    Raises:
        ConfigError: ``batch_rows`` is not positive.
        InputDataError: Missing columns, unusable types, or a null key (named by row number).

    Example:
        >>> from qwen3_pipeline.sources.readers import ArrowSource
        >>> table = pa.table({"id": [1, 2], "body": ["a", "b"]})
        >>> cfg = SourceConfig(key="id", text_columns=("body",))
        >>> [b.num_rows for b in read_batches(ArrowSource(table), cfg)]
        [2]
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ConfigError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    schema = output_schema(source, config)
    _log_nanoseconds(source.schema(), config)
    render = _renderer(config)
    offset = 0
    raws = (
        source.batches(config.columns, batch_rows)
        if where is None
        else filtered_batches(source, config.columns, batch_rows, where)
    )
    for raw in raws:
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


def _text_fields(config: SourceConfig) -> tuple[str, ...]:
    return config.text_columns or config.template_fields


def _check_text_types(schema: pa.Schema, config: SourceConfig) -> None:
    """Refuse text columns that cannot be rendered as text, naming them.

    Strings and binary are text; other scalars are rendered by Arrow's cast (a template with a
    format spec formats them in Python). Lists, structs and maps have no one text form.
    """
    vectorised = config.template is None or _template_is_plain(config.template)
    for column in _text_fields(config):
        source_type = schema.field(column).type
        value_type = source_type.value_type if pa.types.is_dictionary(source_type) else source_type
        if _is_string(value_type) or is_binary_type(value_type):
            continue
        nested = pa.types.is_nested(value_type) or pa.types.is_list_view(value_type)
        if not nested and not vectorised:
            continue
        if not nested:
            try:
                pa.array([], value_type).cast(pa.string())
                continue
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                pass
        raise InputDataError(
            f"text column {column!r} has type {source_type}, which has no text form; a "
            "document is made of string columns (or numbers, dates, binary). Turn it into a "
            f"string in the source query (e.g. array_to_string({column}, ', ') for a list in "
            "PostgreSQL or DuckDB, or a JSON cast)"
        )


def _log_nanoseconds(schema: pa.Schema, config: SourceConfig) -> None:
    columns = [config.updated_at]
    if isinstance(config.partition, TimeWindow):
        columns.append(config.partition.column)
    for column in dict.fromkeys(c for c in columns if c):
        source_type = schema.field(column).type
        if pa.types.is_timestamp(source_type) and source_type.unit == "ns":
            logger.info(
                "column %r holds nanosecond timestamps (%s): they are floored to the "
                "microsecond (the vector table stores timestamp[us, tz=UTC])",
                column,
                source_type,
            )


def _check_time_type(source_type: pa.DataType, column: str) -> None:
    if not (pa.types.is_timestamp(source_type) or pa.types.is_date(source_type)):
        raise InputDataError(
            f"column {column!r} has type {source_type}; a time column must be a timestamp or "
            "a date. Cast it in the source query (e.g. CAST(updated_at AS TIMESTAMP))"
        )


def _as_timestamps(values: pa.Array | pa.ChunkedArray, column: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_timestamp(values.type) and values.type.unit == "ns":
        # Floored (not rounded) to the microsecond the table stores: the same instant always
        # gives the same value, and never a later one.
        values = pc.floor_temporal(values, 1, "microsecond")
    try:
        # Naive timestamps and dates are taken as UTC (casting only attaches the zone).
        return values.cast(TIMESTAMP_TYPE)
    except pa.ArrowInvalid as e:
        raise InputDataError(
            f"time column {column!r} holds a value that does not fit {TIMESTAMP_TYPE}: {e}. "
            "Filter or cast it in the source query"
        ) from e


def _as_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if is_binary_type(values.type):
        # Decoded as invalid UTF-8 in a string column is (U+FFFD), before rendering.
        return decode_utf8(values)
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
        data = {name: _python_values(batch.column(name)) for name in fields}
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


def _python_values(values: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column as Python values for ``str.format``.

    Text (string or binary) is decoded as valid UTF-8 first (invalid bytes become U+FFFD, as
    on the vectorised paths): binary renders as text, not ``b'...'``, and a string column
    written without UTF-8 validation does not fail the conversion.
    """
    value_type = values.type.value_type if pa.types.is_dictionary(values.type) else values.type
    if _is_string(value_type) or is_binary_type(value_type):
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        return decode_utf8(values).to_pylist()
    return values.to_pylist()


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
        moments = _as_timestamps(raw.column(partition.column), partition.column)
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
        _as_timestamps(raw.column(config.updated_at), config.updated_at)
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
