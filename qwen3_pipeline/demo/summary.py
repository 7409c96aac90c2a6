"""The demo's end-of-run summary, whichever orchestrator ran the pipeline.

``make demo`` (Dagster) and ``make airflow-demo`` (Airflow) print the same lines: where the
vector table is, what the run did to it, how it is searched, the near-duplicate report, and a
sample search. Each orchestrator gathers the figures its own way (Dagster materialisation
metadata, Airflow XComs) into a :class:`DemoSummary`; the wording lives here, once.

A run refreshed by several tasks at once (Airflow's mapped tasks, one per hash shard) reports
once per task: :func:`combine_reports` adds their reports up into the run's totals.

Example:
    >>> summary = DemoSummary(
    ...     table_uri="/data/lancedb", table_name="documents", table_version=9, stored_rows=4,
    ...     counters={"inserted": 4, "embedded": 4}, tokens=40, padding_efficiency=0.9,
    ...     version_before=0, version_after=9, search_mode="exact",
    ...     near_duplicate_pairs=0, near_duplicate_table="warehouse.main.near_duplicates",
    ... )
    >>> print(summary.lines()[0])
    LanceDB table: /data/lancedb/documents.lance (version 9)
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.engine.report import ROW_COUNTERS, RefreshReport, merge_reports

_REPORT_FIELDS = frozenset(f.name for f in fields(RefreshReport))


def report_from_dict(values: Mapping[str, Any]) -> RefreshReport:
    """Rebuild a :class:`RefreshReport` from :meth:`RefreshReport.as_dict` (e.g. an XCom).

    Keys it does not know are ignored, so a report written by another version of the package
    still reads; JSON's lists stand in for the ``failures`` tuples.

    Example:
        >>> report_from_dict({"inserted": 2, "table_name": "docs", "new_field": 1}).inserted
        2
    """
    known = {k: v for k, v in values.items() if k in _REPORT_FIELDS}
    known["failures"] = [tuple(pair) for pair in known.get("failures") or ()]
    return RefreshReport(**known)


def combine_reports(reports: Iterable[RefreshReport | Mapping[str, Any]]) -> RefreshReport:
    """Add up the reports of the tasks of one run that refreshed disjoint scopes of one table.

    Tasks that ran concurrently (mapped shards) commit interleaved Lance versions, so the run
    spans from the smallest ``version_before`` to the largest ``version_after`` rather than
    from the first report to the last; everything else is :func:`merge_reports`.

    Raises:
        ConfigError: No report, or reports of different tables or specs.

    Example:
        >>> a = {"inserted": 2, "table_name": "docs", "version_before": 0, "version_after": 5}
        >>> b = {"inserted": 1, "table_name": "docs", "version_before": 3, "version_after": 4}
        >>> total = combine_reports([a, b])
        >>> total.inserted, total.version_before, total.version_after
        (3, 0, 5)
    """
    parsed = [r if isinstance(r, RefreshReport) else report_from_dict(r) for r in reports]
    if not parsed:
        raise ConfigError("combine_reports needs at least one report")
    ordered = sorted(parsed, key=lambda r: (r.version_before, r.version_after or 0))
    merged = merge_reports(ordered)
    after = [r.version_after for r in parsed if r.version_after is not None]
    return replace(
        merged,
        version_before=min(r.version_before for r in parsed),
        version_after=max(after) if after else None,
    )


@dataclass(frozen=True, kw_only=True)
class DemoSummary:
    """The figures the demo prints after a run.

    Attributes:
        table_uri: LanceDB database URI.
        table_name: Vector table name.
        table_version: The table's Lance version after the run (index upkeep included).
        stored_rows: Rows stored at that version.
        counters: The run's row totals (:data:`~qwen3_pipeline.engine.report.ROW_COUNTERS`).
        tokens: Tokens embedded by the run.
        padding_efficiency: Real tokens per computed position.
        version_before: Lance version before the refresh.
        version_after: Lance version after the refresh.
        search_mode: ``exact`` or ``ann`` (an ANN index exists).
        near_duplicate_pairs: Rows of the near-duplicate report.
        near_duplicate_table: Where the report is (``<db>.main.<table>``).
        read_rows: Source rows the run read with their text (a watermark run reads only the
            rows whose ``updated_at`` moved).
    """

    table_uri: str
    table_name: str
    table_version: int
    stored_rows: int
    counters: Mapping[str, int] = field(default_factory=dict)
    tokens: int = 0
    padding_efficiency: float = 1.0
    version_before: int | None = None
    version_after: int | None = None
    search_mode: str = "exact"
    near_duplicate_pairs: int = 0
    near_duplicate_table: str = "?"
    read_rows: int = 0

    @classmethod
    def from_report(cls, report: RefreshReport, **figures: Any) -> "DemoSummary":
        """Take the run's counters, tokens and versions from its (combined) refresh report.

        Args:
            report: The run's refresh report (see :func:`combine_reports`).
            **figures: The other attributes (table location and version, search mode...).
        """
        return cls(
            read_rows=report.read_rows,
            counters=report.counters(),
            tokens=report.tokens,
            padding_efficiency=report.padding_efficiency,
            version_before=report.version_before,
            version_after=report.version_after,
            **figures,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (an XCom); :meth:`from_dict` reads it back."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["counters"] = dict(self.counters)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DemoSummary":
        """Rebuild a summary from :meth:`as_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def lines(self) -> list[str]:
        """The summary lines, as ``make demo`` prints them."""
        totals = {name: int(self.counters.get(name, 0)) for name in ROW_COUNTERS}
        return [
            f"LanceDB table: {self.table_uri}/{self.table_name}.lance "
            f"(version {self.table_version})",
            f"rows: {self.stored_rows} stored | this run: {self.read_rows} read, "
            f"{totals['inserted']} inserted, "
            f"{totals['updated']} updated, {totals['deleted']} deleted, "
            f"{totals['unchanged']} unchanged, {totals['embedded']} embedded "
            f"({self.tokens} tokens, padding efficiency {self.padding_efficiency:.2f}); "
            f"lance version {self.version_before} -> {self.version_after}",
            f"search: {self.search_mode} | near-duplicate pairs: {self.near_duplicate_pairs} "
            f"in {self.near_duplicate_table}",
        ]


def search_lines(query: str, hits: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sample search's lines: the query, then ``similarity  key`` per hit, best first.

    A hit from a table of document chunks (it has ``doc_key``) names the document and the
    matching chunk's number and character span instead.

    Example:
        >>> search_lines("read a file", [{"key": "io:open", "similarity": 0.5}])
        ["search 'read a file':", '  0.500  io:open']
        >>> search_lines("q", [{"doc_key": 7, "chunk_seq": 2, "chunk_start": 80,
        ...                     "chunk_end": 200, "similarity": 0.5}])
        ["search 'q':", '  0.500  7  (chunk 2, characters 80-200)']
    """
    return [f"search {query!r}:"] + [
        f"  {hit['similarity']:.3f}  {_hit_label(hit)}" for hit in hits
    ]


def _hit_label(hit: Mapping[str, Any]) -> str:
    if "doc_key" not in hit:
        return str(hit["key"])
    where = [f"chunk {hit['chunk_seq']}"] if "chunk_seq" in hit else []
    if "chunk_start" in hit and "chunk_end" in hit:
        where.append(f"characters {hit['chunk_start']}-{hit['chunk_end']}")
    return f"{hit['doc_key']}  ({', '.join(where)})" if where else str(hit["doc_key"])
