"""The one counter set every driver prints: per-partition tallies, the plan and the report.

``ROW_COUNTERS`` names the row counts of a refresh once; the plan (:class:`RefreshPlan` in
:mod:`qwen3_pipeline.engine.plan`), the :class:`RefreshReport`, the CLI's JSON and the Dagster
materialisation metadata (``qwen3/rows_<name>``) are all derived from it.
"""

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.embedding.interface import EncodeStats

# Row counters of a refresh, in the order reports list them. ``embedded`` counts rows sent to
# the model; the others say what happened to source and stored rows.
ROW_COUNTERS = (
    "scanned",
    "unchanged",
    "inserted",
    "updated",
    "moved",
    "carry_updated",
    "deleted",
    "skipped_empty",
    "truncated",
    "failed",
    "embedded",
    "reprojected",
    "retried",
    "quarantined",
    "deferred",
)
# The counters a plan can know before anything is embedded (no truncated/failed yet).
PLAN_COUNTERS = (*ROW_COUNTERS[:8], "retried", "quarantined", "deferred")
MAX_SHOWN_FAILURES = 100


class Tally:
    """Mutable row counters of a refresh in progress, per partition and in total."""

    def __init__(self) -> None:
        self.by_partition: dict[str, Counter[str]] = defaultdict(Counter)
        self.total: Counter[str] = Counter()
        self.encode = EncodeStats()
        self.failures: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.commits = 0

    def add(
        self, name: str, partitions: pa.Array | pa.ChunkedArray, mask: np.ndarray | None = None
    ) -> None:
        """Count rows (those where ``mask`` is true) under ``name``, per partition label."""
        if mask is not None:
            if not mask.any():
                return
            partitions = partitions.filter(pa.array(mask))
        if not len(partitions):
            return
        for item in pc.value_counts(partitions).to_pylist():
            label, count = item["values"], item["counts"]
            self.by_partition[label][name] += count
            self.total[name] += count

    def per_partition(self) -> dict[str, dict[str, int]]:
        """Counters per partition label, sorted by label."""
        return {k: dict(v) for k, v in sorted(self.by_partition.items())}


@dataclass(frozen=True, kw_only=True)
class RefreshReport:
    """What one refresh did.

    Attributes:
        scanned: Source rows read in the scope.
        unchanged: Rows whose stored vector was already current.
        inserted: New keys embedded and written.
        updated: Existing keys re-embedded (content or spec changed).
        moved: Rows whose partition changed, updated without re-embedding.
        carry_updated: Rows whose carry-along columns or ``updated_at`` alone changed, updated
            without re-embedding.
        deleted: Stored rows removed (gone from the source, or now blank).
        skipped_empty: Source rows with empty or whitespace-only text (not embedded).
        truncated: Embedded rows cut to ``max_length`` tokens.
        failed: Rows that could not be embedded (their old vector, if any, is kept); each
            gets a failure record (``<table>__failures``).
        retried: Rows sent to the model again because their failure record was due.
        quarantined: Rows left out because they failed ``max_attempts`` times with their
            current text, plus rows quarantined by this refresh's failures (see
            ``qwen3-pipeline failures``; replay or change the text to try them again).
        deferred: Rows left out because they failed recently and their next retry is not
            due yet (``next_retry_at``).
        reprojected: Rows whose vector was derived from a stored one at a larger dim
            (Matryoshka re-projection, no model call); not counted in ``embedded_rows``.
        embedded_rows: Rows sent to the model.
        tokens: Real tokens embedded.
        padded_tokens: Positions the model computed.
        padding_efficiency: ``tokens / padded_tokens``.
        tokens_per_second: Embedding throughput.
        embed_seconds: Time spent in the model.
        plan_seconds: Time of the plan pass (read, validate, hash, diff).
        seconds: Wall-clock time of the refresh.
        version_before: Lance version of the live table before the refresh (0 when it did not
            exist: the commits creating it count as the refresh's own).
        version_after: Lance version after it.
        committed: Whether the refresh made any commit.
        table_uri: Database URI.
        table_name: Table name.
        spec_fingerprint: Fingerprint of the spec the vectors follow.
        partition_keys: The partitions refreshed (None: the whole table).
        per_partition: Counters per partition key.
        failures: ``(key, reason)`` of failed rows (first 100).
        run_id: Lineage id written on every row this refresh wrote.
        engine: ``local`` or ``ray``.
        workers: Model replicas the embedding ran on.
        model_loads: Model loads during the refresh (0 when nothing was embedded by a lazily
            loaded model; a Ray actor restarted after a crash counts again).
        model_loaded: Whether a model was loaded for this refresh (never, with a lazily
            loading embedder, when there was nothing to embed).
        canary_min_cosine: Lowest cosine between the table's recorded canary vectors and the
            loaded model's (None: not checked, nothing was embedded or none recorded yet).
        drift_accepted: The canaries drifted below the threshold and the refresh wrote anyway
            (``accept_drift``); they were re-recorded with this model.
        canaries_recorded: Canaries recorded by this refresh, with its first commit of vectors
            (first fill, new spec, a rebuild's staging table, or after an accepted drift).
        gate: For a gated rebuild, the decision (``GateDecision.as_dict()``: both tables'
            recall@k / nDCG@k, the deltas, ``passed`` and the reason); when it did not pass,
            live was not swapped and ``table_name`` is the staging table kept for inspection.
        chunked: The table holds chunks of documents. The row counters (``scanned``,
            ``inserted``, ``updated``, ``deleted``...) then count *documents*, and
            ``embedded_rows``, ``tokens`` and ``failed`` count chunks sent to the model.
        chunks_written: Chunk rows written (embedded or reused), for chunk tables.
        chunks_reused: Chunks of changed documents whose text was already stored for that
            document: they kept their vector, no model call.
        chunks_deleted: Stored chunks removed (cut differently, gone from a changed document,
            or of a deleted document).
        read_rows: Source rows read with their text (all of the scope, or a watermark
            refresh's changed rows).
        keys_scanned: Keys a watermark refresh read (the key column only) to find deletes.
        watermark_before: The scope's mark before a watermark refresh (ISO time), if any.
        watermark_after: Its mark after the refresh's last commit.
        warnings: What went wrong without failing the refresh and without changing what it
            wrote: a re-projection donor that could not be read or whose drift canaries the
            loaded model does not reproduce (its rows were embedded instead), drift canaries
            that could not be recorded or handed over by a rebuild's swap, a live table whose
            keys a rebuild could not count for the mass-delete guard. Empty on a clean run.
    """

    scanned: int = 0
    unchanged: int = 0
    inserted: int = 0
    updated: int = 0
    moved: int = 0
    carry_updated: int = 0
    deleted: int = 0
    skipped_empty: int = 0
    truncated: int = 0
    failed: int = 0
    reprojected: int = 0
    retried: int = 0
    quarantined: int = 0
    deferred: int = 0
    embedded_rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    padding_efficiency: float = 1.0
    tokens_per_second: float = 0.0
    embed_seconds: float = 0.0
    plan_seconds: float = 0.0
    seconds: float = 0.0
    version_before: int = 0
    version_after: int | None = None
    committed: bool = False
    table_uri: str = ""
    table_name: str = ""
    spec_fingerprint: str = ""
    partition_keys: list[str] | None = None
    per_partition: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    run_id: str = ""
    engine: str = "local"
    workers: int = 1
    model_loads: int = 0
    model_loaded: bool = False
    canary_min_cosine: float | None = None
    drift_accepted: bool = False
    canaries_recorded: int = 0
    gate: dict[str, Any] | None = None
    chunked: bool = False
    chunks_written: int = 0
    chunks_reused: int = 0
    chunks_deleted: int = 0
    warnings: list[str] = field(default_factory=list)
    read_rows: int = 0
    keys_scanned: int = 0
    watermark_before: str | None = None
    watermark_after: str | None = None

    def counters(self) -> dict[str, int]:
        """The run's totals of :data:`ROW_COUNTERS` (``embedded`` = rows sent to the model)."""
        values = asdict(self)
        values["embedded"] = self.embedded_rows
        return {name: int(values[name]) for name in ROW_COUNTERS}

    def as_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs: the counters that changed something, tokens, Lance versions."""
        counts = self.counters()
        shown = ", ".join(f"{counts[n]} {n}" for n in ROW_COUNTERS if counts[n] or n == "scanned")
        if self.chunked:
            shown = (
                f"documents: {shown}; chunks: {self.embedded_rows} embedded, "
                f"{self.chunks_reused} reused, {self.chunks_deleted} deleted"
            )
        return (
            f"refreshed {self.table_name}: {shown}; {self.tokens} tokens at "
            f"{self.tokens_per_second:.0f} tokens/s; lance version {self.version_before} -> "
            f"{self.version_after}"
            + (f"; {len(self.warnings)} warning(s)" if self.warnings else "")
        )


# Counters and times of consecutive refreshes that add up in a merged report.
_SUMMED = (
    *(name for name in ROW_COUNTERS if name != "embedded"),
    "read_rows",
    "keys_scanned",
    "embedded_rows",
    "tokens",
    "padded_tokens",
    "chunks_written",
    "chunks_reused",
    "chunks_deleted",
)
_SUMMED_SECONDS = ("embed_seconds", "plan_seconds", "seconds")


def merge_reports(reports: Sequence[RefreshReport]) -> RefreshReport:
    """Combine the reports of consecutive refreshes of disjoint scopes of one table into one.

    A run over many shards refreshes them one after another; its report is theirs merged:
    row counters, tokens and times are summed, ``per_partition`` merged, ``failures``
    concatenated (the first :data:`MAX_SHOWN_FAILURES`), ``warnings`` concatenated (each
    once), ``padding_efficiency`` and
    ``tokens_per_second`` recomputed from the sums. The Lance versions span the run
    (``version_before`` of the first report, ``version_after`` of the last), ``committed`` is
    true if any report committed, and ``partition_keys`` lists every report's (None if any
    report covered the whole table). ``run_id`` is the first report's. ``model_loads`` and
    ``workers`` are the largest reported: an embedder counts its loads over its lifetime, so
    the last report of a run already includes the earlier ones.

    Args:
        reports: The reports, in the order the refreshes ran.

    Returns:
        The merged :class:`RefreshReport`.

    Raises:
        ConfigError: ``reports`` is empty, or the reports are of different tables or specs.

    Example:
        >>> a = RefreshReport(scanned=2, inserted=2, table_name="docs", version_after=3)
        >>> b = RefreshReport(scanned=1, unchanged=1, table_name="docs", version_before=3,
        ...                   version_after=3)
        >>> merged = merge_reports([a, b])
        >>> merged.scanned, merged.inserted, merged.version_before, merged.version_after
        (3, 2, 0, 3)
    """
    if not reports:
        raise ConfigError("merge_reports needs at least one report")
    first, last = reports[0], reports[-1]
    for report in reports[1:]:
        theirs = (report.table_uri, report.table_name, report.spec_fingerprint)
        ours = (first.table_uri, first.table_name, first.spec_fingerprint)
        if theirs != ours:
            raise ConfigError(
                f"cannot merge reports of different tables or specs: {ours} and {theirs}"
            )
    summed: dict[str, Any] = {name: sum(int(getattr(r, name)) for r in reports) for name in _SUMMED}
    summed.update(
        {name: round(sum(getattr(r, name) for r in reports), 6) for name in _SUMMED_SECONDS}
    )
    tokens, padded, embed_seconds = (
        summed["tokens"],
        summed["padded_tokens"],
        summed["embed_seconds"],
    )
    per_partition: dict[str, Counter[str]] = defaultdict(Counter)
    for report in reports:
        for label, counters in report.per_partition.items():
            per_partition[label].update(counters)
    partition_keys: list[str] | None = None
    if all(r.partition_keys is not None for r in reports):
        partition_keys = list(dict.fromkeys(k for r in reports for k in r.partition_keys or ()))
    failures = [failure for r in reports for failure in r.failures][:MAX_SHOWN_FAILURES]
    return RefreshReport(
        **summed,
        padding_efficiency=round(tokens / padded, 6) if padded else 1.0,
        tokens_per_second=round(tokens / embed_seconds, 3) if embed_seconds > 0 else 0.0,
        version_before=first.version_before,
        version_after=last.version_after,
        committed=any(r.committed for r in reports),
        table_uri=first.table_uri,
        table_name=first.table_name,
        spec_fingerprint=first.spec_fingerprint,
        partition_keys=partition_keys,
        per_partition={k: dict(v) for k, v in sorted(per_partition.items())},
        failures=failures,
        run_id=first.run_id,
        engine=last.engine,
        workers=max(r.workers for r in reports),
        model_loads=max(r.model_loads for r in reports),
        model_loaded=any(r.model_loaded for r in reports),
        canary_min_cosine=min(
            (r.canary_min_cosine for r in reports if r.canary_min_cosine is not None),
            default=None,
        ),
        drift_accepted=any(r.drift_accepted for r in reports),
        canaries_recorded=sum(r.canaries_recorded for r in reports),
        chunked=first.chunked,
        warnings=list(dict.fromkeys(w for r in reports for w in r.warnings)),
    )
