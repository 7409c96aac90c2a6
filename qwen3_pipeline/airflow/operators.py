"""The refresh operator: one :func:`qwen3_pipeline.engine.refresh.refresh` per Airflow task.

:class:`Qwen3EmbeddingRefreshOperator` maps Airflow's idioms onto the engine the CLI and the
Dagster assets run, adding no logic of its own:

- a task refreshes one hash shard (``shard="3/8"``, mapped over all shards with ``.expand()``),
  several shards' labels (``shards=8``, in one task), or the whole source;
- the model is loaded at most once per task, and only when there is something to embed
  (:class:`~qwen3_pipeline.embedding.lazy.LazyEmbedder`): a no-op refresh loads no weights;
- the refresh report (a small JSON dict) is the task's XCom ``return_value``; the engine's
  progress lines and its one-line summary (``refreshed ...``) go to the task log, and
  transformers' progress bars are off while the task runs (Airflow logs stderr as errors);
- the vector table's Asset (:func:`~qwen3_pipeline.airflow.assets.lancedb_asset`) is an outlet,
  and the asset event's ``extra`` is the report, so downstream DAGs scheduled on the table know
  what changed and which Lance version to read;
- bad input fails the task without retry (``AirflowFailException``), transient errors use the
  task's ``retries`` (:func:`~qwen3_pipeline.airflow.errors.retry_only_transient`); a refused
  mass delete or drift fails it without retry too, naming the argument (and DAG param) that
  lets it through;
- rows the model fails on never fail the task: they are counted in the report (``failed``,
  ``retried``, ``quarantined``, ``deferred``, ``failures``), logged, recorded in the table's
  failure log and retried by later refreshes (``max_attempts``, ``retry_backoff_s``);
  ``replay`` makes their records due before the refresh;
- the destination is a LanceDB connection (:class:`~qwen3_pipeline.airflow.hooks.LanceDBHook`)
  and/or a URI stated in the DAG; credentials never appear in the DAG, its XComs or its logs.

Example:
    >>> refresh = Qwen3EmbeddingRefreshOperator.partial(  # doctest: +SKIP
    ...     task_id="refresh",
    ...     source="duckdb:/data/warehouse.duckdb::main.documents",
    ...     key="doc_id",
    ...     text=["title", "body"],
    ...     table="documents",
    ...     db_uri="s3://my-bucket/vectors",
    ...     lancedb_conn_id="lancedb_s3",
    ...     model="Qwen/Qwen3-Embedding-0.6B",
    ...     dim=256,
    ...     pool="gpu",
    ... ).expand(shard=[f"{i}/8" for i in range(8)])
"""

import ast
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import Asset, BaseOperator

from qwen3_pipeline.airflow.assets import lancedb_asset
from qwen3_pipeline.airflow.errors import retry_only_transient, way_out_hint
from qwen3_pipeline.airflow.hooks import LanceDBDestination, LanceDBHook
from qwen3_pipeline.airflow.provider_info import DEFAULT_CONNECTION_ID
from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError, redact_secrets
from qwen3_pipeline.core.progress import engine_logs_at_info

if TYPE_CHECKING:
    from airflow.sdk import Context

    from qwen3_pipeline.chunking.config import ChunkingConfig
    from qwen3_pipeline.core.spec import EmbeddingSpec
    from qwen3_pipeline.embedding.engines import EngineOptions
    from qwen3_pipeline.embedding.lazy import EmbedderBuilder
    from qwen3_pipeline.engine.options import RefreshOptions
    from qwen3_pipeline.engine.report import RefreshReport
    from qwen3_pipeline.sources import Shard, Shards, Source, SourceConfig, Watermark

# Airflow re-parses a DAG file often: the engine (torch, lancedb, duckdb) is imported in
# execute(), never at module import.

ReplaySelection = tuple[str, ...] | Literal["all"] | None
"""The failure records ``replay`` asks for: these doc keys, every one, or none."""

_SHOWN_FAILED_ROWS = 10  # failed rows named in the task log (the XCom lists up to 100)


class Qwen3EmbeddingRefreshOperator(BaseOperator):
    """Bring a LanceDB vector table to the state of a source (scope), embedding what changed.

    Args:
        source: The rows: ``duckdb:PATH::TABLE_OR_QUERY``, a Parquet file or directory (the
            CLI's ``--source``), or a :class:`~qwen3_pipeline.sources.Source`. Templated.
        key: The unique, non-null key column. Templated.
        text: Text column(s), joined with blank lines (exactly one of ``text``/``template``).
            Templated.
        template: A ``str.format`` template over columns, e.g. ``"{title}: {body}"``.
        carry: Columns stored beside each vector (title, url...). Templated.
        updated_at: The rows' last-modified column. Templated.
        table: The vector table. Not templated: with the destination it names the Asset, which
            Airflow must know when it parses the DAG.
        model: Hub id or local checkpoint directory. Templated.
        revision: Pinned hub revision. Templated.
        dim: Matryoshka output dimension (None: the model's hidden size). Templated.
        max_length: Token limit per document (None: the spec's default).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``. Templated.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2``.
        max_batch_tokens: Token budget per forward pass (None: 16384 on CUDA, 4096 on CPU).
        max_batch_rows: Most rows per forward pass.
        engine: ``local`` (the model in the task's process) or ``ray``. Templated.
        workers: Ray actors (``ray``). Templated.
        gpus_per_worker: GPUs per Ray actor (``ray``). Templated.
        ray_address: Ray cluster to join (``ray``; None starts a local one). Templated.
        shard: One hash shard, ``"K/N"`` (``"3/8"``) or its label (``"shard-03-of-08"``);
            map over ``[f"{i}/{n}" for i in range(n)]`` with ``.expand(shard=...)``.
            Templated.
        shards: Label rows by ``N`` hash shards and refresh them all in this task (exclusive
            with ``shard``). Neither: the whole source, unpartitioned.
        db_uri: The LanceDB directory or object-store URI (no secrets); default: the
            connection's. Not templated (it names the Asset).
        lancedb_conn_id: LanceDB connection (credentials, and the URI when ``db_uri`` is
            None); default ``lancedb_default`` without ``db_uri``, none with it.
        asset: ``True`` (default): the table's Asset by
            :func:`~qwen3_pipeline.airflow.assets.lancedb_asset` (``db_uri`` if given, else the
            connection id) is an outlet; an ``Asset``: that one; ``False``: none.
        chunk_rows: Rows per read/embed/commit chunk (None: the engine's default).
        allow_mass_delete: Let the refresh delete more than ``max_delete_share`` of the scope.
        max_delete_share: Largest share of the stored scope a refresh may delete (None: 0.5).
        rebuild: Re-embed everything into a new table and swap it in (for a spec change).
        source_name: Lineage label written on each row (default: the source's name).
        spill_dir: Scratch directory of the refresh (default: the system temp directory).
        chunking: Cut long documents into chunks, one vector each: a ``ChunkingConfig`` or
            its keyword arguments (``{"tokens": 512, "overlap": 0, "splitter": "text"}``).
        accept_drift: Write even if the loaded model no longer reproduces the table's canary
            vectors (re-records them; see the drift canary in docs/guides/operations.md).
        drift_threshold: Minimum cosine of the canaries to their recorded vectors (None: 0.999).
        reproject: Derive vectors of unchanged rows from a table of the same model at a larger
            dim instead of embedding them (Matryoshka re-projection).
        max_attempts: Failed attempts after which a row the model fails on is quarantined:
            not sent to the model again until its text changes or it is replayed (None: 5).
            Templated.
        retry_backoff_s: Seconds before a failed row is retried; each later retry waits twice
            as long, capped at a day (None: 300; 0: retry on every refresh). Templated.
        replay: Failure records to make due before the refresh, so that it sends their rows to
            the model again (quarantined ones included): ``"all"``, a list of keys, or keys
            separated by commas (None: none). A task with a ``shard`` replays the records of
            its shard only. Templated.
        embedder_factory: Builds the embedder of the spec instead of the Qwen3 encoder: an
            importable ``"module:callable"`` (run in the task's process, or in each Ray actor
            with ``engine="ray"``), or a callable ``spec -> Embedder`` (an embedding
            service's client, or :class:`~qwen3_pipeline.testing.FakeEmbedder` in tests).
            Not templated (Airflow would call a callable template field).
        watermark: Read only rows whose ``updated_at`` is later than the table's stored mark
            for this task's scope (needs ``updated_at``; see docs/guides/change-capture.md).
            Templated.
        watermark_lag_s: With ``watermark``: also read rows up to this many seconds before
            the mark (late commits; None: 0). Templated.
        key_scan: With ``watermark``: read the source's keys to find deletes ``"every"``
            refresh (None: the default), every N-th, or ``"never"``. Templated.
        **kwargs: :class:`~airflow.sdk.BaseOperator` arguments (``pool="gpu"``, ``retries``...).

    Rows the model fails on never fail the task: the refresh writes the others, and the task
    succeeds with the counts in its XCom (``failed``, ``quarantined``...); the failed rows are
    logged as errors, quarantined ones as a warning (docs/guides/airflow.md, *Rows the model
    fails on*).

    Raises:
        ConfigError: Both or neither of ``text``/``template``, both ``shard`` and ``shards``,
            or an Asset that cannot be named (when the DAG is parsed).
    """

    template_fields: Sequence[str] = (
        "source",
        "key",
        "text",
        "carry",
        "updated_at",
        "model",
        "revision",
        "dim",
        "device",
        "engine",
        "workers",
        "gpus_per_worker",
        "ray_address",
        "shard",
        "source_name",
        # The refusals' ways out, so a DAG can take them from its params at trigger time:
        # allow_mass_delete="{{ params.allow_mass_delete }}".
        "allow_mass_delete",
        "max_delete_share",
        "accept_drift",
        "drift_threshold",
        "reproject",
        # Failed rows: max_attempts="{{ params.max_attempts }}", replay="{{ params.replay }}".
        "max_attempts",
        "retry_backoff_s",
        "replay",
        # Change capture: watermark="{{ params.watermark }}" (a nightly DAG run sets False).
        "watermark",
        "watermark_lag_s",
        "key_scan",
    )
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        source: "str | Source",
        key: str,
        table: str,
        model: str,
        text: str | Sequence[str] | None = None,
        template: str | None = None,
        carry: Sequence[str] = (),
        updated_at: str | None = None,
        revision: str | None = None,
        dim: int | str | None = None,
        max_length: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        max_batch_tokens: int | None = None,
        max_batch_rows: int = 256,
        engine: str = "local",
        workers: int | str = 1,
        gpus_per_worker: float | str = 0.0,
        ray_address: str | None = None,
        shard: str | None = None,
        shards: int | None = None,
        db_uri: str | None = None,
        lancedb_conn_id: str | None = None,
        asset: Asset | bool = True,
        chunk_rows: int | None = None,
        allow_mass_delete: bool | str = False,
        max_delete_share: float | str | None = None,
        rebuild: bool = False,
        source_name: str | None = None,
        spill_dir: str | None = None,
        chunking: "ChunkingConfig | Mapping[str, Any] | None" = None,
        accept_drift: bool | str = False,
        drift_threshold: float | str | None = None,
        reproject: bool | str = True,
        max_attempts: int | str | None = None,
        retry_backoff_s: float | str | None = None,
        replay: str | Sequence[str | int] | None = None,
        embedder_factory: "EmbedderBuilder | str | None" = None,
        watermark: bool | str = False,
        watermark_lag_s: float | str | None = None,
        key_scan: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        if (text is None or text == [] or text == ()) == (template is None):
            raise ConfigError(
                "give exactly one of text (column(s), e.g. ['title', 'body']) and template "
                "(e.g. '{title}\\n\\n{body}')"
            )
        if shard is not None and shards is not None:
            raise ConfigError("give shard (one shard, 'K/N') or shards (N, all of them), not both")
        outlet = _outlet(table=table, db_uri=db_uri, lancedb_conn_id=lancedb_conn_id, asset=asset)
        outlets = list(kwargs.pop("outlets", None) or ())
        if outlet is not None and all(_uri(o) != outlet.uri for o in outlets):
            outlets.append(outlet)
        super().__init__(outlets=outlets, **kwargs)
        self.source = source
        self.key = key
        self.text = [text] if isinstance(text, str) else text
        self.template = template
        self.carry = carry
        self.updated_at = updated_at
        self.table = table
        self.model = model
        self.revision = revision
        self.dim = dim
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows
        self.engine = engine
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.ray_address = ray_address
        self.shard = shard
        self.chunking = _chunking(chunking)
        self.accept_drift = accept_drift
        self.drift_threshold = drift_threshold
        self.reproject = reproject
        self.shards = shards
        self.db_uri = db_uri
        self.lancedb_conn_id = lancedb_conn_id
        self.asset = outlet
        self.chunk_rows = chunk_rows
        self.allow_mass_delete = allow_mass_delete
        self.max_delete_share = max_delete_share
        self.rebuild = rebuild
        self.source_name = source_name
        self.spill_dir = spill_dir
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.replay = replay
        self.embedder_factory = embedder_factory
        self.watermark = watermark
        self.watermark_lag_s = watermark_lag_s
        self.key_scan = key_scan

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """Airflow's ``partial()``, declaring the table's Asset as the mapped task's outlet.

        A mapped task's outlets are read from ``partial()`` when the DAG is parsed (its
        ``__init__`` runs only when a mapped instance executes), so the default outlet is
        added here too.

        Raises:
            ConfigError: ``table`` is mapped (``expand(table=...)``) while an Asset is asked
                for: one mapped task declares one set of outlets.
        """
        asset = kwargs.get("asset", True)
        if asset is not False:
            if "table" not in kwargs:
                raise ConfigError(
                    "table must be given to partial(), not expand(): the outlet Asset is "
                    "named by it (or pass asset=False)"
                )
            outlet = _outlet(
                table=kwargs["table"],
                db_uri=kwargs.get("db_uri"),
                lancedb_conn_id=kwargs.get("lancedb_conn_id"),
                asset=asset,
            )
            outlets = list(kwargs.get("outlets") or ())
            if outlet is not None and all(_uri(o) != outlet.uri for o in outlets):
                kwargs["outlets"] = [*outlets, outlet]
        return super().partial(**kwargs)

    def execute(self, context: "Context") -> dict[str, Any]:
        """Run the refresh; return its report (also the outlet's asset event extra).

        Rows the model failed on do not fail the task (they are in the report and the log).

        Raises:
            AirflowFailException: Bad input or configuration (not retried).
            TransientError: A failure a retry may fix (the task's retries apply).
        """
        with retry_only_transient(), engine_logs_at_info(), quiet_model_progress_bars():
            report = self._refresh(context)
        values: dict[str, Any] = json.loads(json.dumps(report.as_dict()))
        # The engine has logged the report's summary line ("refreshed ..."); add the scope.
        scope = f"shard {self.shard}" if self.shard else "all rows"
        self.log.info("done: %s, %d model load(s)", scope, int(report.model_loads))
        self._log_row_failures(report)
        outlet_events = context.get("outlet_events")
        if self.asset is not None and outlet_events is not None:
            outlet_events[self.asset].extra = values
        return values

    # ------------------------------------------------------------------------- the refresh

    def destination(self) -> LanceDBDestination:
        """The LanceDB database and storage options this task writes to."""
        if self.db_uri is not None and self.lancedb_conn_id is None:
            return LanceDBHook(None, uri=self.db_uri).destination()
        return LanceDBHook(
            self.lancedb_conn_id or DEFAULT_CONNECTION_ID, uri=self.db_uri
        ).destination()

    def source_config(self) -> "SourceConfig":
        """The engine's source config for this task's (rendered) settings."""
        from qwen3_pipeline.sources import SourceConfig

        return SourceConfig(
            key=self.key,
            text_columns=tuple(self.text or ()),
            template=self.template,
            carry=tuple(self.carry or ()),
            updated_at=_optional_text(self.updated_at),
            partition=self.partition(),
            chunking=self.chunking,
            watermark=self.watermark_setting(),
        )

    def watermark_setting(self) -> "Watermark | None":
        """The task's :class:`~qwen3_pipeline.sources.watermark.Watermark`, or None.

        Raises:
            ConfigError: A bad lag or key scan.
        """
        from qwen3_pipeline.sources import Watermark

        if not _flag(self.watermark, "watermark"):
            return None
        lag = self.watermark_lag_s
        scan = _optional_text(self.key_scan)
        return Watermark(
            lag_s=0.0 if lag in (None, "", "None") else _number(lag, "watermark_lag_s"),
            key_scan="every" if scan is None else scan,
        )

    def partition(self) -> "Shard | Shards | None":
        """The scope: one shard (``shard``), all of ``shards``, or None (everything).

        Raises:
            InputDataError: ``shard`` is neither ``K/N`` nor a shard label.
        """
        from qwen3_pipeline.sources import Shard, Shards, parse_shard, parse_shard_label

        if self.shard:
            text = str(self.shard).strip()
            if text.startswith("shard-"):
                return Shard(*parse_shard_label(text))
            return Shard(*parse_shard(text))
        if self.shards is not None:
            return Shards(_integer(self.shards, "shards"))
        return None

    def embedding_spec(self) -> "EmbeddingSpec":
        """The spec the vectors follow (reads the model's config; no weights)."""
        from qwen3_pipeline.core.spec import DEFAULT_MAX_LENGTH, EmbeddingSpec

        return EmbeddingSpec(
            model=str(self.model),
            revision=_optional_text(self.revision),
            dim=_optional_integer(self.dim, "dim"),
            max_length=DEFAULT_MAX_LENGTH if self.max_length is None else self.max_length,
        )

    def engine_options(self) -> "EngineOptions":
        """Where and how to run the model (the engine settings the CLI and Dagster take)."""
        from qwen3_pipeline.embedding.engines import EngineOptions

        engine = str(self.engine or "local").strip().lower()
        return EngineOptions(
            engine=engine,  # type: ignore[arg-type]  # checked by EngineOptions
            workers=_integer(self.workers, "workers"),
            ray_address=_optional_text(self.ray_address),
            gpus_per_worker=_number(self.gpus_per_worker, "gpus_per_worker"),
            device=str(self.device or "auto"),
            dtype=self.dtype,
            attention=self.attention,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_rows=self.max_batch_rows,
            # A "module:callable" travels in the options (to Ray actors too); a callable
            # object is handed to the lazy embedder instead (see execute).
            embedder_factory=(
                _optional_text(self.embedder_factory)
                if isinstance(self.embedder_factory, str)
                else None
            ),
        )

    def refresh_options(self, run_id: str | None = None) -> "RefreshOptions":
        """What the refresh is asked to do, as the engine's one options value.

        Raises:
            ConfigError: An invalid value.
        """
        from qwen3_pipeline.engine.options import RefreshOptions as Options

        tuning: dict[str, Any] = {
            name: value
            for name, value in (
                ("chunk_rows", _optional_integer(self.chunk_rows, "chunk_rows")),
                ("max_delete_share", _optional_number(self.max_delete_share, "max_delete_share")),
                ("drift_threshold", _optional_number(self.drift_threshold, "drift_threshold")),
                ("max_attempts", _optional_integer(self.max_attempts, "max_attempts")),
                ("retry_backoff_s", _optional_number(self.retry_backoff_s, "retry_backoff_s")),
            )
            if value is not None
        }
        return Options(
            rebuild=self.rebuild,
            allow_mass_delete=_flag(self.allow_mass_delete, "allow_mass_delete"),
            accept_drift=_flag(self.accept_drift, "accept_drift"),
            reproject=_flag(self.reproject, "reproject"),
            spill_dir=self.spill_dir,
            source_name=_optional_text(self.source_name),
            run_id=f"{self.dag_id}/{run_id}" if run_id else None,
            **tuning,
        )

    def replay_selection(self) -> ReplaySelection:
        """The failure records ``replay`` names: a tuple of keys, ``"all"``, or None.

        Raises:
            ConfigError: ``replay`` is neither ``"all"``, keys, nor unset.
        """
        return _replay_selection(self.replay)

    def _replay_failures(self, found: LanceDBDestination, selection: ReplaySelection) -> int:
        from qwen3_pipeline.sources import scope_partition_keys
        from qwen3_pipeline.store.failure_log import FailureLog

        log = FailureLog.open(found.uri, self.table, storage_options=found.storage_options)
        records = log.read()
        asked = None if selection == "all" else set(selection or ())
        if asked is not None:
            # A warning, not an error: another shard's task (or this task's previous try) may
            # have embedded the row and cleared its record already.
            missing = sorted(asked - set(records.column("doc_key").to_pylist()))
            if missing:
                self.log.warning(
                    "replay: no failure record for key(s) %s in table %r (embedded since, or "
                    "never failed); list the records: qwen3-pipeline failures --db %s --table %s",
                    ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
                    self.table,
                    redact_secrets(found.uri),
                    self.table,
                )
        # A shard's task replays its own shard's records: the other shards' tasks replay theirs,
        # and none overwrites a record that another one's refresh is updating.
        scope = scope_partition_keys(self.partition())
        keys = [
            key
            for key, partition in zip(
                records.column("doc_key").to_pylist(),
                records.column("partition_key").to_pylist(),
                strict=True,
            )
            if (asked is None or key in asked) and (scope is None or partition in scope)
        ]
        replayed = log.replay(keys=keys) if keys else 0
        self.log.info(
            "replay: %d failure record(s) of %s made due for this refresh",
            replayed,
            f"shard {self.shard}" if scope is not None else f"table {self.table!r}",
        )
        return replayed

    def _log_row_failures(self, report: "RefreshReport") -> None:
        # The task succeeds: the other rows are written, and a retry would find the failed
        # rows deferred (not due yet) and pass without trying them.
        if report.failed:
            shown = report.failures[:_SHOWN_FAILED_ROWS]
            self.log.error(
                "%d row(s) could not be embedded (%s%s); they keep any previous vector, are "
                "retried by later refreshes (after retry_backoff_s, doubling) and quarantined "
                "after max_attempts; the task succeeds with failed/failures in its XCom",
                report.failed,
                "; ".join(f"{key}: {reason}" for key, reason in shown),
                " ..." if report.failed > len(shown) else "",
            )
        if report.quarantined:
            self.log.warning(
                "%d row(s) quarantined: not sent to the model until their text changes or they "
                "are replayed (replay='all' or a list of keys, e.g. from a DAG param); list "
                "them: qwen3-pipeline failures --db %s --table %s",
                report.quarantined,
                redact_secrets(report.table_uri),
                self.table,
            )

    def _refresh(self, context: "Context") -> "RefreshReport":
        from qwen3_pipeline.embedding.lazy import LazyEmbedder
        from qwen3_pipeline.engine.refresh import refresh
        from qwen3_pipeline.sources import parse_source

        config = self.source_config()
        options = self.engine_options()
        spec = self.embedding_spec()
        found = self.destination()
        refresh_options = self.refresh_options(context.get("run_id"))
        replay = self.replay_selection()
        source = parse_source(self.source) if isinstance(self.source, str) else self.source
        self.log.info(
            "refreshing %s/%s from %s (%s), model %s dim %s on %s",
            found.uri,
            self.table,
            getattr(source, "name", source),
            f"shard {self.shard}" if self.shard else "all rows",
            spec.model,
            spec.dim,
            options.engine,
        )
        if replay is not None:
            self._replay_failures(found, replay)
        build = None if isinstance(self.embedder_factory, str) else self.embedder_factory
        with LazyEmbedder(spec, options, build=build) as embedder:
            try:
                return refresh(
                    source=source,
                    config=config,
                    embedder=embedder,
                    db_uri=found.uri,
                    table=self.table,
                    storage_options=found.storage_options,
                    options=refresh_options,
                )
            except Qwen3PipelineError as e:
                hint = way_out_hint(e)
                if not hint:
                    raise
                # The same error type (not retried), naming the argument that lets it through.
                raise type(e)(f"{e}. {hint}") from e


# --------------------------------------------------------------------------- helpers


@contextmanager
def quiet_model_progress_bars() -> Iterator[None]:
    """Turn off transformers' (and the hub's) progress bars while the block runs, then restore.

    Their tqdm bars (``Loading weights``) write to stderr, which Airflow's task log records at
    ERROR level; the engine's own progress lines are log records and are not affected. Use it
    around model loads in tasks of one's own. A no-op when transformers is not installed.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _outlet(
    *, table: str, db_uri: str | None, lancedb_conn_id: str | None, asset: Asset | bool
) -> Asset | None:
    if asset is False:
        return None
    if isinstance(asset, Asset):
        return asset
    if db_uri is not None:
        return lancedb_asset(table, uri=db_uri)
    return lancedb_asset(table, conn_id=lancedb_conn_id or DEFAULT_CONNECTION_ID)


def _uri(outlet: Any) -> Any:
    return getattr(outlet, "uri", None)


def _integer(value: Any, name: str) -> int:
    # A templated field renders to a string ("8"); an XComArg or a literal stays an int.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _is_unset(value: Any) -> bool:
    # Jinja renders an unset value as the string "None" (Airflow renders strings, not objects).
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "null"))


def _optional_text(value: Any) -> str | None:
    return None if _is_unset(value) else str(value)


def _optional_integer(value: Any, name: str) -> int | None:
    return None if _is_unset(value) else _integer(value, name)


def _optional_number(value: Any, name: str) -> float | None:
    return None if _is_unset(value) else _number(value, name)


def _flag(value: Any, name: str) -> bool:
    # A templated flag renders to "True"/"False" (or "true"/"false" from a JSON param).
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _replay_selection(value: Any) -> ReplaySelection:
    """``replay`` as given or as Jinja rendered it: ``"all"``, keys, or None.

    A list param renders as its Python repr (``"['3', '7']"``), a JSON conf list as the same;
    a string param may hold ``all`` or keys separated by commas.

    Raises:
        ConfigError: Not ``"all"``, a list of keys (strings or integers), keys separated by
            commas, or unset.

    Example:
        >>> _replay_selection("all"), _replay_selection("None"), _replay_selection("['3', 7]")
        ('all', None, ('3', '7'))
        >>> _replay_selection(" 3, 7 ")
        ('3', '7')
    """
    if _is_unset(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "all":
            return "all"
        if not text.startswith("["):
            return _replay_keys([part for part in text.split(",") if part.strip()], value)
        try:
            parsed = json.loads(text)
        except ValueError:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(_replay_hint(value)) from None
        return _replay_keys(parsed, value)
    return _replay_keys(value, value)


def _replay_keys(items: Any, given: Any) -> ReplaySelection:
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise ConfigError(_replay_hint(given))
    keys: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ConfigError(_replay_hint(given))
        key = str(item).strip()
        if key:
            keys.append(key)
    return tuple(dict.fromkeys(keys)) or None


def _replay_hint(given: Any) -> str:
    return (
        f"replay must be 'all', a list of keys, or keys separated by commas "
        f"(None: replay nothing), got {given!r}"
    )


def _chunking(value: "ChunkingConfig | Mapping[str, Any] | None") -> "ChunkingConfig | None":
    """A ``ChunkingConfig`` from the operator's ``chunking`` argument (checked at parse time).

    Raises:
        ConfigError: Not a ``ChunkingConfig``, a mapping of its settings, or None.
    """
    if value is None:
        return None
    from qwen3_pipeline.chunking.config import ChunkingConfig

    if isinstance(value, ChunkingConfig):
        return value
    if isinstance(value, Mapping):
        return ChunkingConfig.from_dict(dict(value))
    raise ConfigError(f"chunking must be a ChunkingConfig or a dict of its settings, got {value!r}")
