"""What a refresh is asked to do, as one frozen value built once by each driver.

:class:`RefreshOptions` holds every choice of a refresh (rebuild, the mass-delete guard, the
drift canary, re-projection, the gate, chunk size, spill directory, progress, lineage labels).
The CLI, the Dagster asset and the Airflow operator each build it once from their own settings
and hand it down unchanged; the engine's functions read the fields they need from it. It is
validated when built, so a bad value fails before anything is read.

:class:`RefreshRequest` is one refresh: the source and its configuration, the embedder, the
vector table, and the options. Every path of the engine (a whole scope, shard by shard, a
rebuild, a resumed run) takes a request.

Example:
    >>> options = RefreshOptions(chunk_rows=2_000, allow_mass_delete=True)
    >>> options.chunk_rows, options.rebuild
    (2000, False)
    >>> RefreshOptions(chunk_rows=0)
    Traceback (most recent call last):
    ...
    qwen3_pipeline.core.errors.ConfigError: chunk_rows must be a positive integer, got 0
"""

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.failures import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF_S,
    FailurePolicy,
)
from qwen3_pipeline.embedding.interface import Embedder
from qwen3_pipeline.engine.canary import DEFAULT_DRIFT_THRESHOLD, DriftGuard, DriftGuardFactory
from qwen3_pipeline.sources import Source, SourceConfig

if TYPE_CHECKING:  # the gate module loads LanceDB search; only a gated rebuild needs it
    from qwen3_pipeline.lifecycle.gate import GateConfig

DEFAULT_CHUNK_ROWS = 10_000
"""Rows per source batch, and the most rows per embed call and per commit."""

DEFAULT_MAX_DELETE_SHARE = 0.5
"""The largest share of the stored scope a refresh may delete without ``allow_mass_delete``."""


@dataclass(frozen=True, kw_only=True)
class RefreshOptions:
    """Everything a refresh is asked to do besides what to read and where to write.

    Attributes:
        rebuild: Embed the whole source into a staging table and swap it in when complete
            (for a spec change); the live table is untouched until the swap.
        chunk_rows: Rows per source batch, and the most rows per embed call and per commit.
        allow_mass_delete: Let the refresh delete more than ``max_delete_share`` of the scope
            (or everything, for an empty source).
        max_delete_share: The largest share of the stored scope a refresh may delete.
        reproject: Derive vectors from a table of the same database that holds the same model
            at a larger or equal dim, for rows whose text it holds unchanged (Matryoshka
            re-projection, no model call for those rows); only from a table whose drift
            canaries the loaded model reproduces (verifying them loads the model).
        drift_threshold: Minimum cosine between the table's recorded canary vectors and the
            loaded model's; below it the refresh stops before writing.
        accept_drift: Write anyway when the canaries drifted, and re-record them.
        drift_guard: Makes the guard that checks the canaries before the model's first write
            (:class:`~qwen3_pipeline.engine.canary.DriftGuard`, always, for every driver).
            Injected, never switched by the embedder: a test passes its own factory (one
            returning None runs no guard, for tests that count the model's calls).
        gate: With ``rebuild``: evaluate live and staging on a golden set and swap only if
            staging scores as well (:class:`~qwen3_pipeline.lifecycle.gate.GateConfig`).
        max_attempts: Failed attempts after which a row is quarantined: recorded in the failure
            log and not sent to the model again until its text changes or it is replayed.
        retry_backoff_s: Seconds before a failed row is retried; each later retry waits twice
            as long (capped at a day). 0: retry failed rows on every refresh.
        spill_dir: Where the plan spills its work, and a run over several shards its split of
            the source (default: the system temp directory).
        progress: Report progress (a bar on a terminal, log lines otherwise).
        source_name: Lineage label written on each row (default: the source's name).
        run_id: Lineage id written on each row (default: a new UUID per refresh).
    """

    rebuild: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    allow_mass_delete: bool = False
    max_delete_share: float = DEFAULT_MAX_DELETE_SHARE
    reproject: bool = True
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    accept_drift: bool = False
    drift_guard: DriftGuardFactory = DriftGuard
    gate: "GateConfig | None" = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    spill_dir: str | None = None
    progress: bool = True
    source_name: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        chunk_rows = self.chunk_rows
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        share = self.max_delete_share
        if (
            isinstance(share, bool)
            or not isinstance(share, int | float)
            or not 0.0 <= float(share) <= 1.0
        ):
            raise ConfigError(f"max_delete_share must be in 0..1, got {share!r}")
        threshold = self.drift_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 < float(threshold) <= 1.0  # NaN fails too
        ):
            # Above 1 no model passes; at 0 or below (cosines are >= -1) any model does.
            raise ConfigError(
                f"drift_threshold must be a cosine in (0, 1] (default {DEFAULT_DRIFT_THRESHOLD}), "
                f"got {threshold!r}; to write despite a drift, pass accept_drift=True"
            )
        if self.gate is not None and not self.rebuild:
            raise ConfigError("a gate applies to a rebuild only: pass rebuild=True (--rebuild)")
        self.failure_policy  # noqa: B018  # validates max_attempts and retry_backoff_s

    @property
    def failure_policy(self) -> FailurePolicy:
        """When failed rows are retried and when they are quarantined."""
        return FailurePolicy(max_attempts=self.max_attempts, retry_backoff_s=self.retry_backoff_s)

    @classmethod
    def build(
        cls, options: "RefreshOptions | None" = None, overrides: Mapping[str, Any] | None = None
    ) -> "RefreshOptions":
        """``options`` (default: all defaults) with the fields named in ``overrides`` replaced.

        This is how the keyword fronts (:func:`~qwen3_pipeline.engine.refresh.refresh`,
        :func:`~qwen3_pipeline.engine.plan.plan_refresh`) accept ``rebuild=True`` and the like.

        Raises:
            TypeError: An override names no field of :class:`RefreshOptions`.
            ConfigError: A value is invalid.

        Example:
            >>> RefreshOptions.build(None, {"rebuild": True}).rebuild
            True
        """
        base = options if options is not None else cls()
        if not overrides:
            return base
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected refresh option(s): {', '.join(unknown)}")
        return replace(base, **overrides)

    def with_run_id(self) -> "RefreshOptions":
        """These options with a run id (a new UUID when none was given)."""
        return self if self.run_id else replace(self, run_id=uuid.uuid4().hex)


@dataclass(frozen=True, kw_only=True)
class RefreshRequest:
    """One refresh: what to read, with which model, into which table, and how.

    Attributes:
        source: Where the rows come from.
        config: Key, text/template, carry columns, ``updated_at``, chunking and the scope.
        embedder: The model (its spec decides the table).
        db_uri: LanceDB directory or object-store URI.
        table: The vector table's name.
        storage_options: Object-store options (credentials) for LanceDB.
        options: What the refresh is asked to do.
    """

    source: Source
    config: SourceConfig
    embedder: Embedder
    db_uri: str
    table: str
    storage_options: dict[str, str] | None = None
    options: RefreshOptions = field(default_factory=RefreshOptions)

    @property
    def source_label(self) -> str:
        """The lineage label written on each row."""
        return self.options.source_name or self.source.name


def override_for(error: BaseException) -> str | None:
    """The :class:`RefreshOptions` field that lets ``error``'s refusal through, if any.

    Drivers name it in their failure message, in their own terms (a CLI flag, a Dagster run
    config key, an Airflow operator argument or DAG param).

    Example:
        >>> from qwen3_pipeline.core.errors import MassDeleteError
        >>> override_for(MassDeleteError("would delete 90%")), override_for(ValueError())
        ('allow_mass_delete', None)
    """
    from qwen3_pipeline.core.errors import EmbeddingDriftError, MassDeleteError

    if isinstance(error, MassDeleteError):
        return "allow_mass_delete"
    if isinstance(error, EmbeddingDriftError):
        return "accept_drift"
    return None
