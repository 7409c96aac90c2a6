r"""The demo code location, built from settings: corpus -> dbt -> vectors -> consumers.

Assets (lineage left to right)::

    raw_docstrings -> stg_docstrings -> documents -> document_vectors -> document_vectors_index
        (DuckDB)        (dbt view)      (dbt table)   (LanceDB, 8 shards)   (ANN upkeep)
                                                                       \\-> near_duplicate_documents
                                                                             (DuckDB table)
                                    documents -> long_documents -> document_chunks
                                                 (dbt table)       (LanceDB, one row per chunk)
                                    documents -> golden_queries  (the gate's golden set, JSONL)
                   document_vectors(_index), golden_queries -> golden_rerank_eval
                                           (recall/nDCG@10 without and with the reranker)

Jobs launched from the UI besides the assets': ``document_vectors_gated_rebuild`` (rebuild the
vector table into staging, gate the swap on ``golden_queries``) and ``document_vectors_rollback``
(restore an earlier version), see :mod:`qwen3_pipeline.dagster.lifecycle_jobs`.

Settings come from the environment (:meth:`DemoSettings.from_env`):

- ``QWEN3_PIPELINE_MODEL``: hub id or local checkpoint (default ``Qwen/Qwen3-Embedding-0.6B``);
- ``QWEN3_PIPELINE_DATA_DIR``: where the DuckDB warehouse, the LanceDB directory and the dbt
  manifest live (default ``./data``);
- ``QWEN3_PIPELINE_DEVICE``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:N``;
- ``QWEN3_PIPELINE_DIM``: output dimension (default: the model's hidden size);
- ``QWEN3_PIPELINE_RERANK_MODEL``: the Qwen3-Reranker (hub id or local checkpoint) that
  ``golden_rerank_eval`` compares with vector search alone; unset, that asset scores vector
  search only and says reranking was skipped (no random-weight fallback is built for it);
- ``QWEN3_PIPELINE_AUTOMATION``: ``off`` (default; also ``0``/``false``) leaves the hourly
  schedule and the automation sensor stopped, Dagster's own default, so opening the UI never
  launches a run that loads the model; ``on`` (``1``/``true``) starts both with the daemon
  (``dagster dev``). It sets their *default* status only: a schedule or sensor toggled in the
  UI keeps that state in the instance, whatever the variable says;
- ``QWEN3_PIPELINE_ENGINE``: ``local`` (default) or ``ray``: the embedder becomes a
  :class:`~.ray.RayEmbedderResource` with ``QWEN3_PIPELINE_WORKERS`` actors (default 1) of
  ``QWEN3_PIPELINE_GPUS_PER_WORKER`` GPUs (default 0), on a local Ray instance per run
  (dagster-ray's ``LocalRay``) or on the cluster at ``QWEN3_PIPELINE_RAY_ADDRESS``.

The executor is in-process: a run is one process, so the model is loaded once per run whatever
steps it holds (Dagster's default multiprocess executor would start a process per step).
"""

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dagster as dg

from qwen3_pipeline.chunking.config import ChunkingConfig
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.automation import build_automation_sensor, build_refresh_schedule
from qwen3_pipeline.dagster.component import ComponentSource, Qwen3EmbeddingComponent
from qwen3_pipeline.dagster.consumer_assets import (
    build_golden_rerank_eval_asset,
    build_near_duplicates_asset,
    build_vector_index_asset,
)
from qwen3_pipeline.dagster.lifecycle_jobs import build_rebuild_job, build_rollback_job
from qwen3_pipeline.dagster.reranker_resource import Qwen3RerankerResource
from qwen3_pipeline.dagster.resources import (
    DEFAULT_MODEL,
    EmbedderResource,
    LanceDBResource,
    Qwen3EmbedderResource,
)
from qwen3_pipeline.demo.dbt import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    dbt_cli_resource,
    documents_asset_key,
    duckdb_warehouse_path,
    load_dbt_models_assets,
    long_documents_asset_key,
    raw_docstrings,
)
from qwen3_pipeline.embedding.engines import ENGINES
from qwen3_pipeline.sources import DuckDBSource, Source, SourceConfig, Watermark

MODEL_ENV = "QWEN3_PIPELINE_MODEL"
DEVICE_ENV = "QWEN3_PIPELINE_DEVICE"
DIM_ENV = "QWEN3_PIPELINE_DIM"
RERANK_MODEL_ENV = "QWEN3_PIPELINE_RERANK_MODEL"
AUTOMATION_ENV = "QWEN3_PIPELINE_AUTOMATION"
ENGINE_ENV = "QWEN3_PIPELINE_ENGINE"
WORKERS_ENV = "QWEN3_PIPELINE_WORKERS"
GPUS_PER_WORKER_ENV = "QWEN3_PIPELINE_GPUS_PER_WORKER"
RAY_ADDRESS_ENV = "QWEN3_PIPELINE_RAY_ADDRESS"
_SWITCH_VALUES = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}

EMBEDDING_GROUP = "embeddings"
# The full reconcile beside the hourly watermark refresh: 03:00 UTC.
NIGHTLY = "0 3 * * *"
DOCUMENTS_TABLE = "main.documents"
DOCUMENT_CONFIG = SourceConfig(
    key="doc_id",
    text_columns=("text",),
    updated_at="updated_at",
    carry=("title", "module", "kind", "source_path"),
    # Hourly runs read only rows whose updated_at moved (the dbt model stamps it); the
    # nightly reconcile schedule reads everything (full_reconcile).
    watermark=Watermark(),
)
LONG_DOCUMENTS_TABLE = "main.long_documents"
# The long documents again, one vector per chunk of at most 256 Qwen tokens.
CHUNK_CONFIG = replace(DOCUMENT_CONFIG, chunking=ChunkingConfig(tokens=256))

EVALUATION_GROUP = "evaluation"
GOLDEN_SET_FILENAME = "golden_set.jsonl"
GOLDEN_QUERIES = 20
# The demo gate lets staging score up to 0.05 below live: rebuilding with the same model gives
# the same vectors up to float noise of batching, which can swap near-tied neighbours of a
# random-weight model; a real model upgrade would set its own tolerance in the launchpad.
DEMO_GATE_TOLERANCE = 0.05
# golden_rerank_eval: the reranker reorders the 20 nearest documents and the top 10 are scored.
EVAL_K = 10
EVAL_CANDIDATES = 20
# The demo table carries no document text (only title, module, kind, source_path), so the
# reranker reads the title: the qualified name (json.dumps' is "dumps"), a weak text for it.
# Carrying the docstring text would let it read the whole document, at the cost of storing the
# text twice (DuckDB and LanceDB) and a table schema change.
EVAL_TEXT_COLUMN = "title"
DEMO_EVAL_NOTE = (
    "With the demo's random-weight fallback checkpoints (the embedder offline, or a tiny test "
    "reranker) these numbers mean nothing; only real Qwen3 weights make them a measurement. "
    "The reranker reads each candidate's title (the demo table stores no document text)."
)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Settings of the demo code location.

    Attributes:
        model: Hub id or local checkpoint directory.
        data_dir: Directory of the LanceDB database (``<data_dir>/lancedb``).
        device: Torch device of the embedder.
        dim: Output dimension (None: the model's hidden size).
        rerank_model: Qwen3-Reranker hub id or local checkpoint of ``golden_rerank_eval``
            (None: that asset scores vector search only).
        automation: Start the schedule and the automation sensor by default (off: both
            start stopped, Dagster's default).
        shards: Hash shards of the vector table.
        table: LanceDB table name.
        chunk_table: LanceDB table of the long documents' chunks.
        engine: ``local`` (one model in the run's process) or ``ray`` (``workers`` Ray actors
            on a local Ray instance, or on the cluster at ``ray_address``).
        workers: Ray actors, one model each.
        gpus_per_worker: GPUs per Ray actor.
        ray_address: A running Ray cluster to join (None: a local Ray instance per run).
    """

    model: str = DEFAULT_MODEL
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    device: str = "auto"
    dim: int | None = None
    rerank_model: str | None = None
    automation: bool = False
    shards: int = 8
    table: str = "documents"
    chunk_table: str = "document_chunks"
    engine: str = "local"
    workers: int = 1
    gpus_per_worker: float = 0.0
    ray_address: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DemoSettings":
        """Read the settings from ``QWEN3_PIPELINE_*`` variables (see the module docstring).

        Raises:
            ConfigError: ``QWEN3_PIPELINE_DIM`` is not an integer, or the automation switch
                is not one of on/off/1/0/true/false.
        """
        env = os.environ if environ is None else environ
        raw_dim = env.get(DIM_ENV, "").strip()
        try:
            dim = int(raw_dim) if raw_dim else None
        except ValueError as e:
            raise ConfigError(f"{DIM_ENV}={raw_dim!r} is not an integer") from e
        # Off unless asked: a running schedule or sensor launches model-loading runs as soon as
        # the daemon starts, which a first look at the UI should not do.
        raw_switch = env.get(AUTOMATION_ENV, "").strip()
        switch = raw_switch.lower() or "off"
        if switch not in _SWITCH_VALUES:
            raise ConfigError(
                f"{AUTOMATION_ENV}={raw_switch!r}: use on or off (also 1/0, true/false)"
            )
        engine = (env.get(ENGINE_ENV) or "local").strip().lower()
        if engine not in ENGINES:
            raise ConfigError(f"{ENGINE_ENV}={engine!r}: use {' or '.join(ENGINES)}")
        return cls(
            model=env.get(MODEL_ENV) or DEFAULT_MODEL,
            data_dir=Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR),
            device=env.get(DEVICE_ENV) or "auto",
            dim=dim,
            rerank_model=env.get(RERANK_MODEL_ENV, "").strip() or None,
            automation=_SWITCH_VALUES[switch],
            engine=engine,
            workers=_number(env, WORKERS_ENV, int, 1),
            gpus_per_worker=_number(env, GPUS_PER_WORKER_ENV, float, 0.0),
            ray_address=env.get(RAY_ADDRESS_ENV) or None,
        )

    @property
    def lancedb_uri(self) -> str:
        """The LanceDB directory, absolute."""
        return str((self.data_dir.expanduser() / "lancedb").resolve())

    @property
    def golden_set_path(self) -> Path:
        """Where ``golden_queries`` writes the gate's golden set, absolute."""
        return (self.data_dir.expanduser() / GOLDEN_SET_FILENAME).resolve()


def _number(env: Mapping[str, str], name: str, kind: type, default: float) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a number") from e


def demo_embedder(settings: DemoSettings) -> EmbedderResource:
    """The embedder resource the settings select: local, or Ray through dagster-ray.

    Raises:
        ConfigError: ``engine=ray`` without the ``ray`` extra installed.
    """
    if settings.engine == "local":
        return Qwen3EmbedderResource(model=settings.model, dim=settings.dim, device=settings.device)
    try:
        from dagster_ray import LocalRay

        from qwen3_pipeline.dagster.ray_resource import RayEmbedderResource
    except ImportError as e:
        raise ConfigError(
            f"{ENGINE_ENV}=ray needs the ray extra: pip install 'qwen3-pipeline[ray]'"
        ) from e
    return RayEmbedderResource(
        model=settings.model,
        dim=settings.dim,
        device=settings.device,
        workers=settings.workers,
        gpus_per_worker=settings.gpus_per_worker,
        ray_address=settings.ray_address,
        ray_cluster=None if settings.ray_address else LocalRay(),
    )


def documents_source() -> Source:
    """The dbt model ``documents`` in the warehouse (path resolved when the asset runs)."""
    return DuckDBSource(duckdb_warehouse_path(), DOCUMENTS_TABLE)


def long_documents_source() -> Source:
    """The dbt model ``long_documents`` in the warehouse (the documents the demo chunks)."""
    return DuckDBSource(duckdb_warehouse_path(), LONG_DOCUMENTS_TABLE)


def demo_components(settings: DemoSettings) -> tuple[Qwen3EmbeddingComponent, ...]:
    """The demo's two vector tables as components: ``document_vectors``, ``document_chunks``.

    Each reads the table a dbt model builds in the DuckDB warehouse and depends on the model's
    asset; the second cuts the long documents into chunks of at most 256 tokens. Both read
    with a watermark on ``updated_at``. Their ``defs.yaml`` equivalent is in
    docs/guides/dagster-component.md.
    """
    watermark = DOCUMENT_CONFIG.watermark
    common: dict[str, Any] = {
        "key": DOCUMENT_CONFIG.key,
        "text": list(DOCUMENT_CONFIG.text_columns),
        "updated_at": DOCUMENT_CONFIG.updated_at,
        "carry": list(DOCUMENT_CONFIG.carry),
        "watermark": watermark is not None,
        "database": settings.lancedb_uri,
        "embedding_model": settings.model,
        "dim": settings.dim,
        "device": settings.device,
        "engine": settings.engine,
        **(
            {
                "workers": settings.workers,
                "gpus_per_worker": settings.gpus_per_worker,
                "ray_address": settings.ray_address,
            }
            if settings.engine == "ray"
            else {}
        ),
        "shards": settings.shards,
        "group_name": EMBEDDING_GROUP,
        "automation_condition": dg.AutomationCondition.eager(),
    }
    warehouse = duckdb_warehouse_path()
    documents = ComponentSource(
        kind="dbt", path=warehouse, relation=DOCUMENTS_TABLE, upstream=documents_asset_key()
    )
    long_documents = ComponentSource(
        kind="dbt",
        path=warehouse,
        relation=LONG_DOCUMENTS_TABLE,
        upstream=long_documents_asset_key(),
    )
    return (
        Qwen3EmbeddingComponent(
            source=documents,
            asset_key=dg.AssetKey("document_vectors"),
            table=settings.table,
            **common,
        ),
        Qwen3EmbeddingComponent(
            source=long_documents,
            asset_key=dg.AssetKey("document_chunks"),
            table=settings.chunk_table,
            chunking=CHUNK_CONFIG.chunking,
            **common,
        ),
    )


def golden_queries_from_documents(
    documents: Iterable[tuple[str, str]], count: int = GOLDEN_QUERIES
) -> list[dict[str, Any]]:
    r"""A known-item golden set: each query is a docstring's summary line, answered by its doc.

    A docstring's first line is how its author would describe the object in a search box,
    and its document is the one known answer. Documents are picked in a stable pseudo-random
    order (by a digest of the key, so the pick does not follow module order), skipping
    summaries of fewer than four words and repeated ones (generated modules share theirs).

    Args:
        documents: ``(doc_id, text)`` pairs; a text is the title, a blank line, the body.
        count: The most queries to return.

    Returns:
        Golden-set items ``{"query": ..., "relevant": [doc_id]}``.

    Example:
        >>> golden_queries_from_documents([("json:dumps", "dumps\n\nSerialize obj to JSON.")])
        [{'query': 'Serialize obj to JSON.', 'relevant': ['json:dumps']}]
    """
    picked: list[dict[str, Any]] = []
    seen: set[str] = set()
    ordered = sorted(documents, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    for doc_id, text in ordered:
        body = text.split("\n\n", 1)[-1]
        summary = " ".join(body.strip().split("\n", 1)[0].split())
        if len(summary.split()) < 4 or summary.lower() in seen:
            continue
        seen.add(summary.lower())
        picked.append({"query": summary, "relevant": [doc_id]})
        if len(picked) == count:
            break
    return picked


def build_golden_queries_asset(path: Path) -> dg.AssetsDefinition:
    """The asset that writes the demo's golden set to ``path`` from the ``documents`` model.

    Rematerialize it after the corpus changes: the gate refuses a golden set whose documents
    are no longer in the table.
    """

    @dg.asset(
        key="golden_queries",
        deps=[documents_asset_key()],
        group_name=EVALUATION_GROUP,
        kinds={"python", "duckdb"},
        description=(
            f"The golden set of the gated rebuild: {GOLDEN_QUERIES} docstring summary lines, "
            "each answered by its own document (known-item search), as JSONL."
        ),
    )
    def golden_queries(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        import duckdb

        con = duckdb.connect(str(duckdb_warehouse_path()), read_only=True)
        try:
            rows = con.execute(f"SELECT doc_id, text FROM {DOCUMENTS_TABLE}").fetchall()
        finally:
            con.close()
        items = golden_queries_from_documents(rows)
        if not items:
            # Not a failure of `make demo --limit 3`: the gate alone needs the set, and it
            # refuses an empty one with a message naming the file.
            context.log.warning(
                f"{DOCUMENTS_TABLE} holds no document with a summary line of four words or "
                f"more: {path} is empty; load more of the corpus (raw_docstrings limit) and "
                "materialize golden_queries again before a gated rebuild"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        context.log.info(f"wrote {len(items)} golden queries to {path}")
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(path)), "queries": len(items)}
        )

    return golden_queries


def build_definitions(
    settings: DemoSettings | None = None, *, embedder: EmbedderResource | None = None
) -> dg.Definitions:
    """Build the demo code location.

    Args:
        settings: Location settings (default: from the environment).
        embedder: The embedder resource to bind (default: a :class:`Qwen3EmbedderResource`
            from ``settings``); tests pass a fake.

    Raises:
        ConfigError: Invalid settings (e.g. a dimension the model does not support).
        ModelLoadError: The model's config cannot be read (unknown hub id offline, bad path).
        DbtManifestNotPreparedError: The dbt manifest was not prepared (see
            :mod:`qwen3_pipeline.demo.dbt`).
    """
    settings = settings or DemoSettings.from_env()
    embedder = embedder or demo_embedder(settings)
    eager = dg.AutomationCondition.eager()
    schedule_status = (
        dg.DefaultScheduleStatus.RUNNING
        if settings.automation
        else dg.DefaultScheduleStatus.STOPPED
    )
    vectors_component, chunks_component = demo_components(settings)
    document_vectors = vectors_component.build_asset(embedder)
    vector_index = build_vector_index_asset(
        embedding_asset=document_vectors,
        group_name=EMBEDDING_GROUP,
        automation_condition=eager,
    )
    near_duplicates = build_near_duplicates_asset(
        embedding_asset=document_vectors,
        duckdb_path=duckdb_warehouse_path,
        index_asset=vector_index,
        group_name=EMBEDDING_GROUP,
        automation_condition=eager,
    )
    document_chunks = chunks_component.build_asset(embedder)
    vector_assets = [document_vectors, vector_index, near_duplicates, document_chunks]
    # Not eager and in no schedule: it loads the embedder and the reranker, so it runs when
    # asked (materialize it in the UI, or `dagster asset materialize`).
    golden_rerank_eval = build_golden_rerank_eval_asset(
        embedding_asset=document_vectors,
        golden_set=settings.golden_set_path,
        golden_asset_key="golden_queries",
        text_column=EVAL_TEXT_COLUMN,
        k=EVAL_K,
        candidates=EVAL_CANDIDATES,
        index_asset=vector_index,
        reranker_key="reranker" if settings.rerank_model else None,
        note=DEMO_EVAL_NOTE,
        group_name=EVALUATION_GROUP,
    )
    rerankers: dict[str, Any] = {}
    if settings.rerank_model:
        rerankers["reranker"] = Qwen3RerankerResource(
            model=settings.rerank_model, device=settings.device
        )
    return dg.Definitions(
        assets=[
            raw_docstrings,
            load_dbt_models_assets(),
            *vector_assets,
            build_golden_queries_asset(settings.golden_set_path),
            golden_rerank_eval,
        ],
        jobs=[
            build_rebuild_job(
                document_vectors,
                golden_set=str(settings.golden_set_path),
                tolerance=DEMO_GATE_TOLERANCE,
            ),
            build_rollback_job(document_vectors),
        ],
        resources={
            "dbt": dbt_cli_resource(),
            "embedder": embedder,
            "lancedb": LanceDBResource(uri=settings.lancedb_uri),
            **rerankers,
        },
        schedules=[
            build_refresh_schedule(
                name="document_vectors_hourly",
                embedding_asset=document_vectors,
                downstream=[vector_index, near_duplicates],
                default_status=schedule_status,
            ),
            # The watermark misses edits that leave updated_at alone or move it backwards:
            # a nightly run reads every row and fixes them.
            build_refresh_schedule(
                name="document_vectors_nightly_reconcile",
                embedding_asset=document_vectors,
                downstream=[vector_index, near_duplicates],
                cron_schedule=NIGHTLY,
                default_status=schedule_status,
                run_config={
                    "ops": {document_vectors.op.name: {"config": {"full_reconcile": True}}}
                },
            ),
        ],
        sensors=[
            build_automation_sensor(
                name="document_vectors_automation",
                assets=vector_assets,
                default_status=(
                    dg.DefaultSensorStatus.RUNNING
                    if settings.automation
                    else dg.DefaultSensorStatus.STOPPED
                ),
            )
        ],
        executor=dg.in_process_executor,
    )
