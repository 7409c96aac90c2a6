"""What an embedding asset's materialisations say, in three plainly named scopes.

A single-run backfill of eight shards records eight materialisation events, one per partition,
and the Dagster UI shows whichever came last. So every event carries three groups of figures,
each named for what it covers:

- ``qwen3/rows_<counter>`` and ``dagster/partition_row_count``: *this partition's* own counts
  (in an unpartitioned asset, the whole table's), with ``qwen3/scope`` saying in words which
  partition of the run this event is and that ``qwen3/run/...`` are the run's totals;
- ``qwen3/run/...``: the whole run (every partition it refreshed): row totals, tokens, tokens/s,
  seconds, the Lance versions before and after, and a per-partition table in Markdown;
- ``qwen3/table/...``: the vector table after the run: its total rows, Lance version, URI, name
  and spec, so the asset page shows the table's state whichever shard ran last.

``qwen3/warnings`` (only when there are any) lists what went wrong without failing the run
(:attr:`~qwen3_pipeline.engine.report.RefreshReport.warnings`).

Example:
    >>> rows_key("inserted"), run_rows_key("inserted")
    ('qwen3/rows_inserted', 'qwen3/run/rows_inserted')
"""

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from qwen3_pipeline.engine.report import ROW_COUNTERS, RefreshReport

TABLE_NAME = "qwen3/table/name"
TABLE_URI = "qwen3/table/uri"
TABLE_ROWS = "qwen3/table/rows"
TABLE_VERSION = "qwen3/table/lance_version"
# The newest version tagged checked after the run: the run's own version when every check
# passed on it, an older one when they failed (readers keep reading that), None when none is.
TABLE_CHECKED_VERSION = "qwen3/table/checked_version"
TABLE_FINGERPRINT = "qwen3/table/spec_fingerprint"
TABLE_MODEL = "qwen3/table/model"
TABLE_DIM = "qwen3/table/dim"
RUN_PREFIX = "qwen3/run/"
RUN_VERSION_BEFORE = "qwen3/run/lance_version_before"
RUN_COMMITTED = "qwen3/run/committed"
RUN_TOKENS = "qwen3/run/tokens"
RUN_BY_PARTITION = "qwen3/run/by_partition"
FAILURES = "qwen3/run/failures"
# On a partition's event: which partition of the run it is, and which figures are the run's.
SCOPE = "qwen3/scope"
# What went wrong without failing the run (RefreshReport.warnings); present only when any did.
WARNINGS = "qwen3/warnings"

# The per-partition table's candidate columns, with short headers so that it fits the UI's
# metadata panel; only those non-zero somewhere in the run are shown.
_TABLE_COUNTERS = {
    "embedded": "emb",
    "inserted": "ins",
    "updated": "upd",
    "deleted": "del",
    "unchanged": "same",
    "failed": "fail",
}


def rows_key(counter: str) -> str:
    """The key of one scope's row counter, e.g. ``qwen3/rows_inserted``."""
    return f"qwen3/rows_{counter}"


def run_rows_key(counter: str) -> str:
    """The key of a run-wide row counter, e.g. ``qwen3/run/rows_inserted``."""
    return f"{RUN_PREFIX}rows_{counter}"


def run_counters(metadata: Mapping[str, Any]) -> dict[str, int]:
    """Read a run's row totals back from one of its events' metadata (values or raw numbers).

    Example:
        >>> run_counters({"qwen3/run/rows_inserted": 3})["inserted"]
        3
    """
    counts = {}
    for name in ROW_COUNTERS:
        value = metadata.get(run_rows_key(name), 0)
        counts[name] = int(getattr(value, "value", value) or 0)
    return counts


def rows_metadata(counts: Mapping[str, int]) -> dict[str, int]:
    """One scope's row counters (every name in ``ROW_COUNTERS``; missing ones are 0)."""
    return {rows_key(name): int(counts.get(name, 0)) for name in ROW_COUNTERS}


def partition_metadata(
    counts: Mapping[str, int], *, partition_rows: int, scope: str | None = None
) -> dict[str, Any]:
    """Return one partition's own figures: its row counters, its stored rows, its scope."""
    metadata: dict[str, Any] = {
        **rows_metadata(counts),
        "dagster/partition_row_count": partition_rows,
    }
    if scope is not None:
        metadata[SCOPE] = scope
    return metadata


def partition_scope(partition: str, keys: Sequence[str]) -> str:
    """Say which partition of the run an event is, and which of its figures are the run's.

    Example:
        >>> partition_scope("b", ["a", "b"])
        'partition b (2 of 2 in this run): qwen3/rows_* are its own; qwen3/run/* are the run totals'
    """
    ordered = sorted(keys)
    where = f" ({ordered.index(partition) + 1} of {len(ordered)} in this run)"
    return f"partition {partition}{where}: qwen3/rows_* are its own; qwen3/run/* are the run totals"


def _short_partition(partition: str) -> str:
    """``shard-03-of-08`` as ``03/08``; any other key unchanged."""
    parts = partition.split("-")
    if len(parts) == 4 and parts[0] == "shard" and parts[2] == "of":
        return f"{parts[1]}/{parts[3]}"
    return partition


def by_partition_markdown(report: RefreshReport) -> str:
    """A compact Markdown table of the run's counts per partition, with a total row.

    Shard keys are shortened (``shard-03-of-08`` is ``03/08``) and only the counters that are
    non-zero somewhere in the run get a column, so that the table fits the metadata panel.

    Example:
        >>> from qwen3_pipeline.engine.report import RefreshReport
        >>> report = RefreshReport(table_name="t", embedded_rows=3, inserted=3, per_partition={
        ...     "shard-01-of-02": {"embedded": 2, "inserted": 2},
        ...     "shard-02-of-02": {"embedded": 1, "inserted": 1}})
        >>> print(by_partition_markdown(report))
        | part | emb | ins |
        |---|--:|--:|
        | 01/02 | 2 | 2 |
        | 02/02 | 1 | 1 |
        | **all** | **3** | **3** |
    """
    partitions = sorted(report.per_partition)
    totals = {name: int(report.counters().get(name, 0)) for name in _TABLE_COUNTERS}
    shown = [
        name
        for name in _TABLE_COUNTERS
        if totals[name] or any(report.per_partition[p].get(name, 0) for p in partitions)
    ] or ["unchanged"]
    lines = [
        "| part | " + " | ".join(_TABLE_COUNTERS[name] for name in shown) + " |",
        "|---" + "|--:" * len(shown) + "|",
    ]
    for partition in partitions:
        counts = report.per_partition[partition]
        cells = " | ".join(str(int(counts.get(name, 0))) for name in shown)
        lines.append(f"| {_short_partition(partition)} | {cells} |")
    cells = " | ".join(f"**{totals[name]}**" for name in shown)
    lines.append(f"| **all** | {cells} |")
    return "\n".join(lines)


def run_metadata(report: RefreshReport, *, partitions: int = 0) -> dict[str, Any]:
    """Return the run-wide figures, each under ``qwen3/run/``.

    They are the same on every partition's event of a run, and say so by their names.

    Args:
        report: The run's refresh report.
        partitions: How many partitions the run refreshed (0: an unpartitioned asset).
    """
    totals = report.counters()
    metadata: dict[str, Any] = {run_rows_key(name): totals[name] for name in ROW_COUNTERS}
    metadata.update(
        {
            "qwen3/run/partitions": partitions,
            RUN_TOKENS: report.tokens,
            "qwen3/run/padded_tokens": report.padded_tokens,
            "qwen3/run/padding_efficiency": float(report.padding_efficiency),
            "qwen3/run/tokens_per_second": float(report.tokens_per_second),
            "qwen3/run/seconds": float(report.seconds),
            RUN_VERSION_BEFORE: report.version_before,
            RUN_COMMITTED: report.committed,
            "qwen3/run/engine": report.engine,
            "qwen3/run/workers": report.workers,
            "qwen3/run/model_loads": report.model_loads,
            RUN_BY_PARTITION: dg.MetadataValue.md(by_partition_markdown(report)),
        }
    )
    if report.chunked:
        # A chunk table's row counters count documents; these count its chunks.
        metadata.update(
            {
                "qwen3/run/chunks_embedded": report.embedded_rows,
                "qwen3/run/chunks_reused": report.chunks_reused,
                "qwen3/run/chunks_deleted": report.chunks_deleted,
                "qwen3/run/chunks_written": report.chunks_written,
            }
        )
    if report.watermark_before is not None or report.watermark_after is not None:
        # A watermark refresh: what it read, and the marks (ISO times).
        metadata.update(
            {
                "qwen3/run/read_rows": report.read_rows,
                "qwen3/run/keys_scanned": report.keys_scanned,
                "qwen3/run/watermark_before": report.watermark_before or "",
                "qwen3/run/watermark_after": report.watermark_after or "",
            }
        )
    if report.failures:
        metadata[FAILURES] = dg.MetadataValue.md(failures_markdown(report.failures))
    if report.warnings:
        metadata[WARNINGS] = dg.MetadataValue.md(warnings_markdown(report.warnings))
    return metadata


def warnings_markdown(warnings: Sequence[str]) -> str:
    """A Markdown list of the report's warnings."""
    return "\n".join(f"- {warning}" for warning in warnings)


def failures_markdown(failures: Sequence[tuple[str, str]]) -> str:
    """A Markdown list of the rows that could not be embedded (key: reason)."""
    return "\n".join(f"- `{key}`: {reason}" for key, reason in failures)


def table_metadata(
    report: RefreshReport,
    *,
    row_count: int,
    column_schema: dg.TableSchema | None = None,
    model: str = "",
    dim: int | None = None,
) -> dict[str, Any]:
    """Return the vector table's state after the run (``qwen3/table/...`` and ``dagster/*``)."""
    metadata: dict[str, Any] = {
        TABLE_NAME: report.table_name,
        TABLE_URI: report.table_uri,
        TABLE_ROWS: row_count,
        TABLE_VERSION: report.version_after,
        TABLE_FINGERPRINT: report.spec_fingerprint,
        TABLE_MODEL: model,
        TABLE_DIM: dim,
        "dagster/row_count": row_count,
        "dagster/table_name": report.table_name,
        "dagster/uri": f"{report.table_uri.rstrip('/')}/{report.table_name}.lance",
    }
    if column_schema is not None:
        metadata["dagster/column_schema"] = column_schema
    return metadata


def lance_column_schema(schema: Any) -> dg.TableSchema:
    """Describe a LanceDB table's Arrow schema as a Dagster ``TableSchema``."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type), description=None) for f in schema]
    )
