"""The embedding asset factory: one call builds a partitioned, checked, retried embedding asset.

:func:`build_embedding_asset` turns a source (e.g. the DuckDB table a dbt model builds), its
:class:`~qwen3_pipeline.sources.SourceConfig` and an
:class:`~qwen3_pipeline.core.spec.EmbeddingSpec`
into a Dagster asset whose materialisation is one :func:`qwen3_pipeline.engine.refresh.refresh` of
the
partitions in the run, followed in the same step (no second model load) by the checks of
:mod:`qwen3_pipeline.consumers.checks`. The asset body only maps Dagster concepts onto the engine:

- partitions: stable hash shards of the key (:class:`HashShards`, the default) or time windows
  on a column (:class:`TimePartitioning`); ``BackfillPolicy.single_run()`` makes a backfill of
  any number of partitions one run, so the model is loaded once, and the asset reads
  ``context.partition_keys`` / ``context.partition_time_window`` (never ``partition_key``);
- a ``gpu`` concurrency pool, which also serialises writers of the table;
- a retry policy that only transient failures reach: bad input, a spec mismatch or a missing
  model raise :class:`BadInputFailure` (``dg.Failure(allow_retries=False)``);
- ``code_version`` = the spec fingerprint, a data version = a digest of the stored keys and
  content hashes of the refreshed partitions, and materialisation metadata namespaced
  ``qwen3/...`` (counts per partition via ``context.add_asset_metadata(partition_key=...)``);
- asset checks (blocking by default: a failed check stops downstream assets of the run);
  when all of them pass, the version they read is tagged ``checked-v{N}`` (older checked tags
  pruned, :mod:`qwen3_pipeline.store.versions`), and readers read the newest checked version;
  ``no_embedding_drift`` and ``rebuild_gate`` are evaluated only by the runs that compare
  canaries or gate a rebuild, and skipped by the others;
- launch-time run config (:class:`RefreshRunConfig`) for each refusal's way out and for a
  gated rebuild (:mod:`qwen3_pipeline.dagster.rebuild_gate`), whose refused swap fails the step
  naming the ``gate_tolerance`` that would pass.

Example:
    >>> from qwen3_pipeline.sources import DuckDBSource, SourceConfig
    >>> from qwen3_pipeline.dagster.resources import Qwen3EmbedderResource
    >>> embedder = Qwen3EmbedderResource(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
    >>> document_vectors = build_embedding_asset(
    ...     key="document_vectors",
    ...     source=lambda: DuckDBSource("data/warehouse.duckdb", "main.documents"),
    ...     source_config=SourceConfig(key="doc_id", text_columns=("text",), carry=("title",)),
    ...     spec=embedder,  # the same object goes into Definitions(resources=...)
    ...     table="documents",
    ...     deps=["documents"],
    ... )
"""

import logging
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import dagster as dg
from pydantic import Field

from qwen3_pipeline.consumers.checks import (
    CHECK_DESCRIPTIONS,
    NO_QUARANTINED_ROWS,
    CheckOutcome,
    CheckReport,
    check_names,
    check_no_quarantined_rows,
    run_checks,
)
from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingDriftError,
    failure_message,
    is_transient,
)
from qwen3_pipeline.core.progress import engine_logs_at_info
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.metadata import (
    TABLE_CHECKED_VERSION,
    lance_column_schema,
    partition_metadata,
    partition_scope,
    rows_metadata,
    run_metadata,
    table_metadata,
)
from qwen3_pipeline.dagster.rebuild_gate import (
    REBUILD_GATE_CHECK,
    REBUILD_GATE_DESCRIPTION,
    REBUILD_TAG,
    GateSettings,
    gate_check_result,
    gate_refusal,
    gate_settings,
    gate_way_out,
    rebuild_gate,
)
from qwen3_pipeline.dagster.resources import EmbedderResource
from qwen3_pipeline.engine.options import DEFAULT_CHUNK_ROWS, RefreshOptions, override_for
from qwen3_pipeline.engine.refresh import RefreshReport, refresh, table_spec_for
from qwen3_pipeline.sources import (
    Grain,
    Partition,
    Shards,
    Source,
    SourceConfig,
    TimeWindow,
    scope_partition_keys,
    shard_label,
)
from qwen3_pipeline.store import latest_checked_version, prune_checked_tags, tag_checked
from qwen3_pipeline.store.failure_log import FailureLog

if TYPE_CHECKING:  # the gate loads LanceDB search: only a gated rebuild imports it
    from qwen3_pipeline.lifecycle.gate import GateConfig

DEFAULT_SHARDS = 8
DEFAULT_POOL = "gpu"
DEFAULT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

SourceFactory = Callable[[], Source]


# --------------------------------------------------------------------------- partitioning


@dataclass(frozen=True)
class HashShards:
    """Partition by stable hash shards of the key: ``shard-00-of-08`` ... ``shard-07-of-08``.

    A key's shard is ``xxh3_64(key) % count`` (:func:`qwen3_pipeline.sources.shard_of`), so it
    never changes between runs or machines. Changing ``count`` relabels rows (they are moved,
    not re-embedded, by the next refresh of all shards).

    Example:
        >>> HashShards(4).partitions_def().get_partition_keys()[:2]
        ['shard-00-of-04', 'shard-01-of-04']
    """

    count: int = DEFAULT_SHARDS

    def __post_init__(self) -> None:
        shard_label(0, self.count)  # validates the count

    def partitions_def(self) -> dg.StaticPartitionsDefinition:
        """The Dagster partitions: one static partition per shard."""
        return dg.StaticPartitionsDefinition(
            [shard_label(i, self.count) for i in range(self.count)]
        )


@dataclass(frozen=True, kw_only=True)
class TimePartitioning:
    """Partition by time windows of a timestamp or date column (UTC).

    Each partition refreshes the rows whose ``column`` falls in its window; a row whose time
    moves to another window is moved there by that window's refresh.

    Args:
        column: The source column that places a row in a window (e.g. ``updated_at``).
        start: The first window (``"2024-01-01"`` or a datetime).
        grain: ``hour``, ``day``, ``week`` (starting Sunday) or ``month``.
        end_offset: Extra windows after the current one (as in Dagster's definitions).

    Example:
        >>> TimePartitioning(column="updated_at", start="2024-01-01").partitions_def().cron_schedule
        '0 0 * * *'
    """

    column: str
    start: str | datetime
    grain: Grain = "day"
    end_offset: int = 0

    def __post_init__(self) -> None:
        if self.grain not in ("hour", "day", "week", "month"):
            raise ConfigError(f"grain must be hour, day, week or month, got {self.grain!r}")

    def partitions_def(self) -> dg.TimeWindowPartitionsDefinition:
        """The Dagster time partitions, in UTC with the key formats the engine labels rows with."""
        common: dict[str, Any] = {
            "start_date": self.start,
            "timezone": "UTC",
            "end_offset": self.end_offset,
        }
        if self.grain == "hour":
            return dg.HourlyPartitionsDefinition(**common)
        if self.grain == "day":
            return dg.DailyPartitionsDefinition(**common)
        if self.grain == "week":
            return dg.WeeklyPartitionsDefinition(**common)
        return dg.MonthlyPartitionsDefinition(**common)


Partitioning = HashShards | TimePartitioning


def run_scope(
    context: dg.AssetExecutionContext, partitioning: Partitioning | None
) -> Partition | None:
    """Return the engine's read scope for the partitions of this run.

    Reads ``context.partition_keys`` (a single partition or a whole backfill range) or
    ``context.partition_time_window``; never ``context.partition_key``, which fails for ranges.
    A run without partitions (checks launched on their own from the UI) covers every partition.
    """
    if partitioning is None:
        return None
    if not context.op_execution_context.has_partitions:
        return whole_scope(partitioning)
    if isinstance(partitioning, TimePartitioning):
        window = context.partition_time_window
        return TimeWindow(
            column=partitioning.column,
            start=window.start,
            end=window.end,
            grain=partitioning.grain,
        )
    return Shards.from_labels(list(context.partition_keys))


def whole_scope(partitioning: Partitioning) -> Partition | None:
    """Return the scope of every partition (labels included), or None when there are none yet."""
    if isinstance(partitioning, HashShards):
        return Shards(partitioning.count)
    partitions_def = partitioning.partitions_def()
    first = partitions_def.get_first_partition_window()
    last = partitions_def.get_last_partition_window()
    if first is None or last is None:
        return None
    return TimeWindow(
        column=partitioning.column, start=first.start, end=last.end, grain=partitioning.grain
    )


def backfill_policy(partitions_per_run: int | None) -> dg.BackfillPolicy:
    """One run for a whole backfill (None), or one run per ``partitions_per_run`` partitions.

    Raises:
        ConfigError: ``partitions_per_run`` is below 1.

    Example:
        >>> backfill_policy(None) == dg.BackfillPolicy.single_run()
        True
    """
    if partitions_per_run is None:
        return dg.BackfillPolicy.single_run()
    if partitions_per_run < 1:
        raise ConfigError(f"partitions_per_run must be at least 1, got {partitions_per_run}")
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run)


# --------------------------------------------------------------------------- failures


class RefreshRunConfig(dg.Config):
    """What one run of the embedding asset may let through (its config in the launchpad).

    Every refusal of the engine that the CLI can override can be overridden here, for one run.

    Example:
        Launchpad YAML that lets one run delete most of the table::

            ops:
              document_vectors:
                config:
                  allow_mass_delete: true
    """

    accept_drift: bool = Field(
        default=False,
        description=(
            "Write even when the loaded model no longer reproduces the table's canary vectors, "
            "and re-record the canaries with this model (the report says drift_accepted)."
        ),
    )
    drift_threshold: float | None = Field(
        default=None,
        description="Minimum canary cosine accepted (default 0.999); in (0, 1].",
    )
    allow_mass_delete: bool = Field(
        default=False,
        description=(
            "Let this run delete more than max_delete_share of the refreshed partitions (or "
            "everything, for an empty source)."
        ),
    )
    max_delete_share: float | None = Field(
        default=None,
        description="The largest share of the stored scope a run may delete (default 0.5).",
    )
    reproject: bool = Field(
        default=True,
        description=(
            "Derive vectors of unchanged rows from a table of the same model at a larger dim "
            "instead of embedding them (Matryoshka re-projection)."
        ),
    )
    rebuild: bool = Field(
        default=False,
        description=(
            "Embed the whole source into a staging table and swap it in when complete (a spec "
            "change, or a re-embed after a drift); the live table is untouched until the swap. "
            "The run must cover every partition. Runs of the rebuild job rebuild whatever this "
            "says (their qwen3/rebuild tag)."
        ),
    )
    gate_golden_set: str | None = Field(
        default=None,
        description=(
            'With rebuild: the path of a golden set (JSONL, one {"query": ..., "relevant": '
            "[keys]} per line); staging is swapped in only if its mean recall@k and nDCG@k are "
            "at least live's minus gate_tolerance (the rebuild_gate check shows the scores). "
            "Default: the run's qwen3/gate_golden_set tag (set by the gated rebuild job)."
        ),
    )
    gate_tolerance: float | None = Field(
        default=None,
        description=(
            "How much lower than live's the staging means may be, from 0 (not worse) to 1. "
            "Default: the run's qwen3/gate_tolerance tag, else 0."
        ),
    )
    gate_k: int | None = Field(
        default=None,
        description=(
            "Documents ranked and scored per golden query. Default: the run's qwen3/gate_k "
            "tag, else 10."
        ),
    )

    max_attempts: int | None = Field(
        default=None,
        description=(
            "Failed attempts after which a row is quarantined (not sent to the model again "
            "until its text changes or it is replayed); default 5."
        ),
    )
    retry_backoff_s: float | None = Field(
        default=None,
        description=(
            "Seconds before a failed row is retried, doubling after each failure (capped at a "
            "day); 0 retries on every run. Default 300."
        ),
    )
    replay: list[str] = Field(
        default=[],
        description=(
            "Failure records to make due before this run, so that it sends their rows to the "
            'model again (quarantined ones included): their keys, or ["all"].'
        ),
    )
    full_reconcile: bool = Field(
        default=False,
        description=(
            "With a watermark source: read every row this run (not only those whose "
            "updated_at passed the mark), to pick up edits the watermark cannot see. The "
            "nightly reconcile schedule sets it."
        ),
    )

    def rebuilds(self, tags: Mapping[str, str]) -> bool:
        """Whether the run rebuilds: ``rebuild: true``, or the rebuild job's run tag."""
        return self.rebuild or tags.get(REBUILD_TAG) == "true"

    def gate_settings(self, tags: Mapping[str, str]) -> GateSettings | None:
        """The run's gate (config keys first, then the run's tags), or None.

        Raises:
            ConfigError: A golden set without a rebuild, or an invalid value.
        """
        return gate_settings(
            golden_set=self.gate_golden_set,
            tolerance=self.gate_tolerance,
            k=self.gate_k,
            rebuild=self.rebuilds(tags),
            tags=tags,
        )

    def options(
        self,
        base: RefreshOptions,
        gate: "GateConfig | None" = None,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> RefreshOptions:
        """``base`` with this run's overrides.

        Args:
            base: The asset's own options.
            gate: The gate of a rebuild (:func:`~.rebuild_gate.rebuild_gate` builds it from
                :meth:`gate_settings`).
            tags: The run's tags (the rebuild job's runs rebuild by their tag).

        Raises:
            ConfigError: A value out of range, or a gate without a rebuild.
        """
        overrides: dict[str, Any] = {
            "accept_drift": self.accept_drift,
            "allow_mass_delete": self.allow_mass_delete,
            "reproject": self.reproject,
            "rebuild": self.rebuilds(tags or {}),
            "gate": gate,
        }
        if self.drift_threshold is not None:
            overrides["drift_threshold"] = self.drift_threshold
        if self.max_delete_share is not None:
            overrides["max_delete_share"] = self.max_delete_share
        if self.max_attempts is not None:
            overrides["max_attempts"] = self.max_attempts
        if self.retry_backoff_s is not None:
            overrides["retry_backoff_s"] = self.retry_backoff_s
        return RefreshOptions.build(base, overrides)

    def replay_keys(self) -> list[str] | None:
        """The keys to replay, None for every record (``["all"]``), [] for none."""
        if [k.strip().lower() for k in self.replay] == ["all"]:
            return None
        return [k for k in self.replay if k.strip()]


def way_out_hint(error: BaseException, op_name: str) -> str:
    """The launchpad run config that lets ``error``'s refusal through, or "" for other errors.

    Example:
        >>> from qwen3_pipeline.core.errors import MassDeleteError
        >>> way_out_hint(MassDeleteError("too many deletes"), "docs").split("config ")[1]
        'ops: {docs: {config: {allow_mass_delete: true}}}'
    """
    field = override_for(error)
    if field is None:
        return ""
    return (
        "To let it through from the launchpad, launch with run config "
        f"ops: {{{op_name}: {{config: {{{field}: true}}}}}}"
    )


class BadInputFailure(dg.Failure):
    """The refresh failed for a reason that a retry cannot fix; not retried.

    Null or duplicate keys, missing columns, an invalid setting, a table holding another spec,
    a model that cannot be found, or a bug (an unexpected exception): the description says
    what is wrong and what to do.
    """

    def __init__(self, error: BaseException, hint: str = "") -> None:
        message = failure_message(error)
        super().__init__(
            description=f"{message}. {hint}" if hint else message,
            metadata={"error": type(error).__name__},
            allow_retries=False,
        )


# --------------------------------------------------------------------------- checks


QUARANTINE_DESCRIPTION = (
    "No row of the refreshed partitions is quarantined: the model failed it max_attempts times "
    "with its current text, so it is no longer sent (a warning, never blocking: fix the text or "
    "the model, then replay it)."
)


def quarantine_result(outcome: CheckOutcome, asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    """The ``no_quarantined_rows`` outcome as a WARN-severity check result."""
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=outcome.name,
        passed=outcome.passed,
        description=outcome.description,
        metadata=outcome.metadata,
        severity=dg.AssetCheckSeverity.WARN,
    )


def check_results(report: CheckReport, asset_key: dg.AssetKey) -> list[dg.AssetCheckResult]:
    """Turn :func:`~qwen3_pipeline.consumers.checks.run_checks` outcomes into check results."""
    return [
        dg.AssetCheckResult(
            asset_key=asset_key,
            check_name=outcome.name,
            passed=outcome.passed,
            description=outcome.description,
            metadata=outcome.metadata,
            severity=dg.AssetCheckSeverity.ERROR,
        )
        for outcome in report.outcomes
    ]


DRIFT_CHECK = "no_embedding_drift"
DRIFT_DESCRIPTION = (
    "Before the refresh writes, the table's canary texts are embedded again with the loaded "
    "model and compared with their recorded vectors (minimum cosine >= the threshold); a drift "
    "fails the step before anything is written. Skipped (not evaluated) when the checks run "
    "alone (they never load the model), when the refresh embedded nothing, or on the first "
    "fill (the canaries are recorded then)."
)


def drift_skip_reason(report: RefreshReport | None) -> str:
    """Why the drift canaries were not compared: each case in its own words.

    Example:
        >>> drift_skip_reason(None)
        'the checks ran alone, without a refresh (they never load the model)'
    """
    if report is None:
        return "the checks ran alone, without a refresh (they never load the model)"
    if report.canaries_recorded:
        return (
            f"first fill: {report.canaries_recorded} canaries were recorded now and are "
            "compared from the next refresh on"
        )
    if report.embedded_rows == 0:
        return "the refresh embedded nothing, so the model was not loaded to compare"
    return "the table has no recorded canaries to compare with"


def drift_result(
    report: RefreshReport | None, asset_key: dg.AssetKey
) -> dg.AssetCheckResult | None:
    """The drift canary's check result, or None when the canaries were not compared.

    None (checks run alone, which never load the model; a refresh that embedded nothing; a
    first fill, whose canaries are recorded now) means the result is not yielded: Dagster
    then shows the selected check as *skipped* once the run succeeds (its planned evaluation
    never completes, ``AssetCheckExecutionResolvedStatus.SKIPPED``), never as passed.
    """
    if report is None or report.canary_min_cosine is None:
        return None
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=DRIFT_CHECK,
        passed=True,
        description=(
            "drift accepted (accept_drift): canaries re-recorded with this model"
            if report.drift_accepted
            else "the loaded model reproduces the table's canary vectors"
        ),
        metadata={
            "qwen3/canary_evaluated": True,
            "qwen3/canary_min_cosine": float(report.canary_min_cosine),
            "qwen3/drift_accepted": report.drift_accepted,
        },
    )


def _run_tags(context: dg.AssetExecutionContext) -> Mapping[str, str]:
    """The run's tags; none when the asset is called directly (``build_asset_context``)."""
    try:
        return context.run.tags
    except dg.DagsterError:  # a direct invocation has no run (DagsterInvalidPropertyError)
        return {}


class _ForwardToDagster(logging.Handler):
    def __init__(self, log: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        self._log.log(record.levelno, record.getMessage())


@contextmanager
def _engine_logs_to(log: logging.Logger) -> Iterator[None]:
    # The engine logs progress to "qwen3_pipeline"; show it in the run's log while it runs.
    engine = logging.getLogger("qwen3_pipeline")
    handler = _ForwardToDagster(log)
    engine.addHandler(handler)
    try:
        with engine_logs_at_info():
            yield
    finally:
        engine.removeHandler(handler)


# --------------------------------------------------------------------------- the factory


def _source_factory(source: Source | SourceFactory) -> SourceFactory:
    if hasattr(source, "batches"):
        fixed = cast(Source, source)
        return lambda: fixed
    return cast(SourceFactory, source)


@dataclass(frozen=True, kw_only=True)
class _EmbeddingStep:
    """What one materialisation (or a run of the checks alone) of the asset does.

    Fixed when the asset is defined; :meth:`run` maps the run's context onto the engine: the
    partitions in the run become the refresh's scope, the report becomes metadata, and the
    checks read the table the refresh wrote, in the same step (no second model load).
    """

    asset_key: dg.AssetKey
    table: str
    source_config: SourceConfig
    spec: EmbeddingSpec
    partitioning: Partitioning | None
    make_source: SourceFactory
    embedder_key: str
    lancedb_key: str
    options: RefreshOptions
    vector_sample_rows: int

    @property
    def table_fingerprint(self) -> str:
        """What the table records: the spec, plus the chunking settings for a chunk table."""
        return table_spec_for(self.spec, self.source_config).fingerprint

    @property
    def partitions_def(self) -> dg.PartitionsDefinition | None:
        """The asset's partitions (None: unpartitioned)."""
        return self.partitioning.partitions_def() if self.partitioning is not None else None

    def run(
        self, context: dg.AssetExecutionContext, config: RefreshRunConfig
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        """Refresh the run's partitions (when the asset is selected), then run the checks."""
        report, written, checked, checked_version, quarantine = yield from (
            self._refresh_and_check(context, config)
        )
        selected = context.selected_asset_check_keys
        drift = drift_result(report, self.asset_key)  # None: not evaluated, left skipped
        if drift is None and dg.AssetCheckKey(self.asset_key, DRIFT_CHECK) in selected:
            context.log.info(f"{DRIFT_CHECK} skipped: {drift_skip_reason(report)}")
        # Only a gated rebuild evaluates the gate; every other run leaves its check skipped.
        gate = report.gate if report is not None else None
        if gate is None and dg.AssetCheckKey(self.asset_key, REBUILD_GATE_CHECK) in selected:
            context.log.info(
                f"{REBUILD_GATE_CHECK} skipped: not a gated rebuild (run config rebuild: true "
                "with gate_golden_set, as the rebuild job launches it)"
            )
        evaluated = [
            *check_results(checked, self.asset_key),
            quarantine_result(quarantine, self.asset_key),
            *([drift] if drift else []),
            *([gate_check_result(gate, self.asset_key)] if gate else []),
        ]
        results = [
            r for r in evaluated if dg.AssetCheckKey(self.asset_key, r.check_name or "") in selected
        ]
        served = (
            f"readers read checked version {checked_version}"
            if checked_version is not None
            else "no version is checked: readers read the latest, with a warning"
        )
        read_version = int(written.version)
        context.log.info(
            f"lance version {read_version} of {self.table} "
            + ("tagged checked" if checked.passed else "NOT tagged checked (a check failed)")
            + f"; {served}"
        )
        if report is None:
            context.log.info(
                f"checked {self.table} at lance version {read_version} without refreshing it: "
                + ", ".join(f"{r.check_name} {'passed' if r.passed else 'FAILED'}" for r in results)
            )
            yield from results
            return
        yield self._materialize_result(context, report, written, checked, checked_version, results)

    def _refresh_and_check(
        self, context: dg.AssetExecutionContext, run_config: RefreshRunConfig
    ) -> Generator[
        dg.AssetCheckResult,
        None,
        tuple[RefreshReport | None, Any, CheckReport, int | None, CheckOutcome],
    ]:
        """The refresh (if selected) and the checks; errors typed for Dagster's retry policy."""
        lancedb = getattr(context.resources, self.lancedb_key)
        run_id = context.op_execution_context.run_id
        try:
            embedder = getattr(context.resources, self.embedder_key)
            self._check_resource(embedder)
            config = replace(self.source_config, partition=run_scope(context, self.partitioning))
            if run_config.full_reconcile:
                config = replace(config, watermark=None)
            rows = self.make_source()
            report = None
            failure_log = FailureLog.open(
                lancedb.resolved_uri(), self.table, storage_options=lancedb.options()
            )
            if self.asset_key in context.selected_asset_keys:
                if run_config.replay:
                    replayed = failure_log.replay(keys=run_config.replay_keys())
                    context.log.info(f"replay: {replayed} failure record(s) made due now")
                report = self._refresh(context, run_config, rows, config, embedder, lancedb)
                if report.gate is not None and not report.gate["passed"]:
                    yield from self._refuse_swap(context, run_config, report)
            elif not lancedb.table_exists(self.table):
                raise ConfigError(
                    f"table {self.table!r} does not exist yet: materialize "
                    f"{self.asset_key.to_user_string()} before running its checks alone"
                )
            written = lancedb.open_table(self.table if report is None else report.table_name)
            read_version = int(written.version)
            records = failure_log.read(self.table_fingerprint)
            checked = run_checks(
                table=written,
                source=rows,
                config=config,
                fingerprint=self.table_fingerprint,
                normalize=self.spec.normalize,
                # Checks run alone verify a sample of the stored vectors, not one run's.
                run_id=run_id if report is not None else None,
                failures=report.failures if report is not None else (),
                sample_rows=self.vector_sample_rows,
                failure_records=records,
            )
            quarantine = check_no_quarantined_rows(records, scope_partition_keys(config.partition))
            # Readers read the newest checked version: tag the version the checks read only
            # when every check passed (whether or not they block), never after a failure.
            if checked.passed:
                tag_checked(written, read_version)
                prune_checked_tags(written)
            checked_version = latest_checked_version(written)
        except EmbeddingDriftError as e:
            # The refresh stopped before writing anything: the check fails, and the step too.
            if dg.AssetCheckKey(self.asset_key, DRIFT_CHECK) in context.selected_asset_check_keys:
                yield dg.AssetCheckResult(
                    asset_key=self.asset_key,
                    check_name=DRIFT_CHECK,
                    passed=False,
                    description=str(e),
                    severity=dg.AssetCheckSeverity.ERROR,
                )
            raise BadInputFailure(e, way_out_hint(e, context.op_execution_context.op.name)) from e
        except dg.Failure:
            raise
        except Exception as e:  # typed errors decide retries; bugs must not be retried
            if is_transient(e):
                raise
            raise BadInputFailure(e, way_out_hint(e, context.op_execution_context.op.name)) from e
        return report, written, checked, checked_version, quarantine

    def _refresh(
        self,
        context: dg.AssetExecutionContext,
        run_config: RefreshRunConfig,
        rows: Source,
        config: SourceConfig,
        embedder: EmbedderResource,
        lancedb: Any,
    ) -> RefreshReport:
        """The engine's refresh (or gated rebuild) of the run's scope, logged to the run."""
        tags = _run_tags(context)
        settings = run_config.gate_settings(tags)
        with (
            rebuild_gate(settings, embedder=embedder, lancedb=lancedb, table=self.table) as gate,
            _engine_logs_to(context.log),
        ):
            options = run_config.options(self.options, gate, tags=tags)
            return refresh(
                source=rows,
                config=config,
                embedder=embedder,
                db_uri=lancedb.resolved_uri(),
                table=self.table,
                storage_options=lancedb.options(),
                options=replace(options, run_id=context.op_execution_context.run_id),
            )

    def _refuse_swap(
        self, context: dg.AssetExecutionContext, run_config: RefreshRunConfig, report: RefreshReport
    ) -> Iterator[dg.AssetCheckResult]:
        """Show the refused gate's scores as its check's result, then fail the step.

        The live table was not swapped, so nothing is materialized: the step fails, naming
        the ``gate_tolerance`` that would let the rebuild through.
        """
        decision = cast(dict[str, Any], report.gate)
        if dg.AssetCheckKey(self.asset_key, REBUILD_GATE_CHECK) in (
            context.selected_asset_check_keys
        ):
            yield gate_check_result(decision, self.asset_key)
        error = gate_refusal(decision, table=self.table, version=report.version_before)
        settings = cast(GateSettings, run_config.gate_settings(_run_tags(context)))
        hint = gate_way_out(decision, context.op_execution_context.op.name, settings)
        raise BadInputFailure(error, hint)

    def _check_resource(self, embedder: EmbedderResource) -> None:
        if embedder.spec.fingerprint != self.spec.fingerprint:
            raise ConfigError(
                f"the {self.embedder_key!r} resource is configured for model="
                f"{embedder.spec.model} dim={embedder.spec.dim} (fingerprint "
                f"{embedder.spec.fingerprint}) but asset {self.asset_key.to_user_string()} was "
                f"defined for model={self.spec.model} dim={self.spec.dim} (fingerprint "
                f"{self.spec.fingerprint}); configure both from the same settings"
            )

    def _materialize_result(
        self,
        context: dg.AssetExecutionContext,
        report: RefreshReport,
        written: Any,
        checked: CheckReport,
        checked_version: int | None,
        results: list[dg.AssetCheckResult],
    ) -> dg.MaterializeResult:
        partitions = 0 if self.partitions_def is None else len(context.partition_keys)
        if self.partitions_def is None:
            scope_metadata = rows_metadata(report.counters())
        else:
            scope_metadata = {}
            for partition_key in sorted(context.partition_keys):
                context.add_asset_metadata(
                    partition_metadata(
                        report.per_partition.get(partition_key, {}),
                        partition_rows=checked.rows_by_partition.get(partition_key, 0),
                        scope=partition_scope(partition_key, context.partition_keys),
                    ),
                    partition_key=partition_key,
                )
        return dg.MaterializeResult(
            asset_key=self.asset_key,
            metadata={
                **scope_metadata,
                **run_metadata(report, partitions=partitions),
                **table_metadata(
                    report,
                    row_count=int(written.count_rows()),
                    column_schema=lance_column_schema(written.schema),
                    model=self.spec.model,
                    dim=self.spec.dim,
                ),
                TABLE_CHECKED_VERSION: checked_version,
                **(
                    {"qwen3/table/documents": checked.stored_documents}
                    if self.source_config.chunking is not None
                    else {}
                ),
            },
            check_results=results,
            data_version=dg.DataVersion(checked.state_digest),
        )


def build_embedding_asset(
    *,
    key: dg.AssetKey | str | Sequence[str],
    source: Source | SourceFactory,
    source_config: SourceConfig,
    spec: "EmbeddingSpec | EmbedderResource",
    table: str,
    deps: Sequence[dg.AssetKey | str | Sequence[str]] = (),
    partitioning: Partitioning | None = HashShards(),
    embedder_key: str = "embedder",
    lancedb_key: str = "lancedb",
    group_name: str | None = None,
    description: str | None = None,
    pool: str | None = DEFAULT_POOL,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
    automation_condition: dg.AutomationCondition | None = None,
    blocking_checks: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    vector_sample_rows: int = 1_000,
    tags: Mapping[str, str] | None = None,
    partitions_per_run: int | None = None,
) -> dg.AssetsDefinition:
    """Build the asset that keeps LanceDB table ``table`` in sync with ``source``.

    Args:
        key: The asset key (e.g. ``"document_vectors"``).
        source: The rows to embed, or a zero-argument callable returning them at run time
            (so a path read from the environment is resolved when the asset runs).
        source_config: Key, text/template, ``updated_at`` and carry columns; its ``partition``
            must be None (the asset sets it per run).
        spec: The embedder resource the asset will run with (its spec is taken from it, so
            the settings are declared once: pass the same object to ``Definitions``), or an
            :class:`EmbeddingSpec`. Its fingerprint is the ``code_version``; the resource bound
            at run time must have the same spec (checked before anything is read).
        table: The LanceDB table name.
        deps: Upstream assets (e.g. the dbt model's key).
        partitioning: :class:`HashShards` (default, 8 shards), :class:`TimePartitioning`, or
            None for an unpartitioned asset.
        embedder_key: Resource key of an :class:`~.resources.EmbedderResource`.
        lancedb_key: Resource key of a :class:`~.resources.LanceDBResource`.
        group_name: Dagster asset group.
        description: Asset description (a default describes the table and model).
        pool: Concurrency pool of the step (``gpu``); it also serialises writers of the table.
        retry_policy: Applied to transient failures only.
        automation_condition: E.g. ``dg.AutomationCondition.eager()`` to refresh when the
            upstream model updates.
        blocking_checks: Whether a failed check stops downstream assets in the same run.
        chunk_rows: Rows per read/embed/write chunk of the engine.
        vector_sample_rows: Stored vectors of the scope checked besides the run's own.
        tags: Asset tags.
        partitions_per_run: The shape of a backfill. None (default): the whole range is one
            run, so the model is loaded once (``BackfillPolicy.single_run()``). ``k``: one run
            per ``k`` partitions (``BackfillPolicy.multi_run(k)``), so that a run launcher
            that starts each run in its own pod (dagster-k8s) spreads the shards over GPU pods.

    Returns:
        The asset, with its checks.

    Raises:
        ConfigError: ``source_config.partition`` is set, or a time column is not read.
    """
    if source_config.partition is not None:
        raise ConfigError(
            "source_config.partition must be None: the asset sets it from the run's partitions "
            "(choose the partitioning with partitioning=HashShards(n) or TimePartitioning(...))"
        )
    if isinstance(spec, EmbedderResource):
        spec = spec.embedding_spec()
    asset_key = dg.AssetKey.from_coercible(key)
    step = _EmbeddingStep(
        asset_key=asset_key,
        table=table,
        source_config=source_config,
        spec=spec,
        partitioning=partitioning,
        make_source=_source_factory(source),
        embedder_key=embedder_key,
        lancedb_key=lancedb_key,
        options=RefreshOptions(chunk_rows=chunk_rows, source_name=asset_key.to_user_string()),
        vector_sample_rows=vector_sample_rows,
    )
    descriptions = {
        **CHECK_DESCRIPTIONS,
        DRIFT_CHECK: DRIFT_DESCRIPTION,
        REBUILD_GATE_CHECK: REBUILD_GATE_DESCRIPTION,
    }
    check_specs = [
        dg.AssetCheckSpec(
            name, asset=asset_key, description=descriptions[name], blocking=blocking_checks
        )
        for name in [
            *check_names(chunked=source_config.chunking is not None),
            DRIFT_CHECK,
            REBUILD_GATE_CHECK,
        ]
    ]
    # A warning, never blocking: quarantined rows are reported, the run did all it could.
    check_specs.append(
        dg.AssetCheckSpec(
            NO_QUARANTINED_ROWS, asset=asset_key, description=QUARANTINE_DESCRIPTION, blocking=False
        )
    )
    description = description or (
        f"Qwen3 embeddings of the source rows in LanceDB table {table!r} "
        f"(model {spec.model}, dim {spec.dim}), refreshed incrementally by content hash."
    )

    def _refresh_and_check(
        context: dg.AssetExecutionContext, config: RefreshRunConfig
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        yield from step.run(context, config)

    asset_spec = dg.AssetSpec(
        key=asset_key,
        deps=list(deps),
        description=description,
        group_name=group_name,
        code_version=step.table_fingerprint,
        automation_condition=automation_condition,
        kinds={"python", "lancedb"},
        tags=dict(tags or {}),
        metadata={
            "qwen3/table_name": table,
            "qwen3/model": spec.model,
            "qwen3/dim": spec.dim,
            "qwen3/spec_fingerprint": spec.fingerprint,
            "dagster/table_name": table,
        },
    )
    with warnings.catch_warnings():
        # BackfillPolicy is "beta" in Dagster 1.13; the single-run policy is what makes a
        # backfill of any number of partitions one run (one model load), so it is deliberate.
        warnings.simplefilter("ignore", dg.BetaWarning)
        # A subsettable multi-asset (of one asset) so that its checks can run on their own
        # from the UI: they read the table and the source, and the model is never loaded.
        return dg.multi_asset(
            name=asset_key.to_python_identifier(),
            specs=[asset_spec],
            check_specs=check_specs,
            partitions_def=step.partitions_def,
            backfill_policy=(
                backfill_policy(partitions_per_run) if step.partitions_def is not None else None
            ),
            pool=pool,
            retry_policy=retry_policy,
            can_subset=True,
            required_resource_keys={embedder_key, lancedb_key},
        )(_refresh_and_check)
