"""The Airflow twin of the Dagster demo: stdlib docstrings -> DuckDB -> dbt -> Qwen3 vectors.

``qwen3_demo`` (hourly, created paused like every new Airflow DAG)::

    settings -> load_corpus -> dbt_build -> refresh[shard 0/8 .. 7/8] -> index_upkeep
        -> near_duplicates -> summary

- ``settings``: the Dagster demo's settings, from the same environment variables
  (``QWEN3_PIPELINE_MODEL``, ``_DATA_DIR``, ``_DEVICE``, ``_DIM``, ``_ENGINE``, ``_WORKERS``,
  ``_GPUS_PER_WORKER``, ``_RAY_ADDRESS``) and with the same model fallback;
- ``load_corpus``: the standard-library docstrings into the DuckDB warehouse (the ``limit``
  param loads a seeded sample);
- ``dbt_build``: ``dbt build`` of ``dbt_models/`` (``stg_docstrings`` -> ``documents``);
- ``refresh``: :class:`~qwen3_pipeline.airflow.Qwen3EmbeddingRefreshOperator` mapped over the 8
  hash shards with ``.expand()``, in the pool named by ``QWEN3_PIPELINE_AIRFLOW_POOL``
  (``make airflow-demo`` sets ``gpu``; unset: ``default_pool``, with a warning when the DAG is
  parsed): each task loads the model at most once
  (only when its shard has rows to embed) and emits the vector table's Asset with its refresh
  report as the event's extra;
- ``index_upkeep``: the ANN index policy (exact search below 50k rows);
- ``near_duplicates``: near-duplicate pairs into DuckDB table ``main.near_duplicates``;
- ``summary``: the run's totals (the lines ``make demo`` prints) as the task's XCom.

``qwen3_demo_search`` is scheduled on the vector table's Asset: after each refresh it runs a
sample search on the table at the Lance version the latest asset event reports.

Run both once without a scheduler: ``make airflow-demo``. A second run embeds nothing and
makes no Lance commit. Under a scheduler, create the pool (one slot per model that fits on the
GPU) with ``airflow pools set gpu 1 "Qwen3 model loads"`` and set
``QWEN3_PIPELINE_AIRFLOW_POOL=gpu`` for the DAG processor: a task in a pool that does not
exist stays *Scheduled* forever, so this file never names one that was not asked for.

The ``limit`` param loads a sample; a smaller sample than the previous run's deletes the other
rows, which the refresh refuses (more than half the table) unless ``allow_mass_delete`` is
checked too. ``accept_drift`` lets a refresh write after the model's weights changed under the
same name (the drift canaries no longer match). Rows the model fails on never fail a task:
they are counted in its XCom, retried by later runs and quarantined after ``max_attempts``
failures (``retry_backoff_s`` apart, doubling); ``replay`` (``all`` or keys) sends them to the
model again in this run.

Parsing this file imports Airflow and the operator only; the demo's settings and the engine
are imported when the tasks run.
"""

import logging
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, chain, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from qwen3_pipeline.airflow import (
    LanceDBHook,
    Qwen3EmbeddingRefreshOperator,
    lancedb_asset,
    retry_only_transient,
)

# Known when the DAG is parsed: the Asset that downstream DAGs schedule on is named by them.
# The settings task checks that they agree with the demo settings the workers read.
DATA_DIR = Path(os.environ.get("QWEN3_PIPELINE_DATA_DIR") or "data").expanduser()
LANCEDB_URI = str((DATA_DIR / "lancedb").resolve())
TABLE = "documents"
SHARDS = 8
# The model-loading tasks' pool. Parsing has no metadata database to check that a pool
# exists, and a task in a missing pool waits in Scheduled forever: the pool is opted into.
POOL_ENV = "QWEN3_PIPELINE_AIRFLOW_POOL"
GPU_POOL = os.environ.get(POOL_ENV, "").strip() or "default_pool"
if GPU_POOL == "default_pool":
    logging.getLogger(__name__).warning(
        "qwen3_demo: the model-loading tasks use default_pool, so nothing limits how many "
        'models load at once; create a pool (airflow pools set gpu 1 "Qwen3 model loads") and '
        "set %s=gpu where the DAG is parsed",
        POOL_ENV,
    )
VECTORS = lancedb_asset(TABLE, uri=LANCEDB_URI)
NEAR_DUPLICATES_TABLE = "near_duplicates"
DEFAULT_QUERY = "parse a JSON document into Python objects"

DEFAULT_ARGS: dict[str, Any] = {
    # Transient failures only (commit conflicts, I/O, a locked DuckDB file): bad input fails
    # at once, whatever these say.
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
}

with DAG(
    dag_id="qwen3_demo",
    description="stdlib docstrings -> DuckDB -> dbt -> Qwen3 vectors in LanceDB (8 shards)",
    schedule="@hourly",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "limit": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            description=(
                "Load a seeded sample of this many docstrings (null: all of them). A smaller "
                "sample than the previous run's deletes the other rows from the vector table: "
                "the refresh refuses that (more than half the table) unless allow_mass_delete "
                "is checked."
            ),
        ),
        "allow_mass_delete": Param(
            False,
            type="boolean",
            description=(
                "Let the refresh delete more than half of the stored rows (e.g. after a "
                "smaller limit than the previous run's)."
            ),
        ),
        "accept_drift": Param(
            False,
            type="boolean",
            description=(
                "Write even though the model no longer reproduces the table's drift canaries "
                "(its weights changed under the same name); the canaries are re-recorded."
            ),
        ),
        "max_attempts": Param(
            5,
            type="integer",
            minimum=1,
            description=(
                "Failed attempts after which a row the model fails on is quarantined (not sent "
                "to the model again until its text changes or it is replayed)."
            ),
        ),
        "retry_backoff_s": Param(
            300,
            type="number",
            minimum=0,
            maximum=86400,
            description=(
                "Seconds before a failed row is retried, doubling after each failure (0: every "
                "run)."
            ),
        ),
        "replay": Param(
            None,
            type=["null", "string", "array"],
            description=(
                "Failure records to retry in this run, quarantined ones included: all, or keys "
                "separated by commas (list them: qwen3-pipeline failures --db "
                f"{LANCEDB_URI} --table {TABLE})."
            ),
        ),
    },
    tags=["qwen3", "demo", "lancedb"],
    doc_md=__doc__,
) as qwen3_demo:

    @task(multiple_outputs=True)
    def settings() -> dict[str, Any]:
        """Read the demo settings (model, device, engine, source) shared with the Dagster demo."""
        from qwen3_pipeline.demo.airflow_run import demo_settings

        with retry_only_transient():
            return demo_settings(lancedb_uri=LANCEDB_URI, table=TABLE, shards=SHARDS)

    @task
    def load_corpus(duckdb_path: str) -> int:
        """Load the standard-library docstrings into the DuckDB warehouse."""
        from qwen3_pipeline.demo.corpus import DEFAULT_TABLE, load_corpus_into_duckdb

        limit = get_current_context()["params"].get("limit")
        with retry_only_transient():
            return load_corpus_into_duckdb(duckdb_path, table=DEFAULT_TABLE, limit=limit)

    @task
    def dbt_build(config: dict[str, Any]) -> None:
        """Build and test the dbt models (``documents`` is the table the refresh reads)."""
        from qwen3_pipeline.demo.airflow_run import dbt_build_command

        run_dir = Path(config["dbt_target_dir"]) / "airflow_last_run"
        run_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            dbt_build_command(config, run_dir),
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "DO_NOT_TRACK": "1"},
        )
        print(done.stdout[-20_000:], done.stderr[-5_000:])
        if done.returncode == 1:  # a model or a test failed: the same build fails again
            raise AirflowFailException(f"dbt build failed: see {run_dir / 'dbt.log'}")
        if done.returncode != 0:  # dbt could not run (e.g. the warehouse is locked): retry
            raise RuntimeError(f"dbt build could not run (exit status {done.returncode})")

    @task
    def index_upkeep() -> dict[str, Any]:
        """Keep the ANN index policy: exact search below 50k rows, then an index kept current."""
        from qwen3_pipeline.consumers.vector_search import IndexPolicy, maintain_vector_index

        with retry_only_transient():
            table = LanceDBHook(None, uri=LANCEDB_URI).open_table(TABLE)
            upkeep = maintain_vector_index(table, IndexPolicy())
        return {**upkeep.as_dict(), "search_mode": "ann" if upkeep.index_name else "exact"}

    @task
    def near_duplicates(upkeep: dict[str, Any], duckdb_path: str) -> dict[str, Any]:
        """Write the near-duplicate pairs at the version the upkeep left into DuckDB."""
        from qwen3_pipeline.consumers.near_duplicates import near_duplicate_report
        from qwen3_pipeline.consumers.vector_search import open_vector_table
        from qwen3_pipeline.dagster.consumer_assets import replace_duckdb_table

        with retry_only_transient():
            vectors = open_vector_table(LANCEDB_URI, TABLE, version=upkeep["version_after"])
            report = near_duplicate_report(vectors, label_columns=("title",))
            path = Path(duckdb_path)
            pairs = replace_duckdb_table(path, NEAR_DUPLICATES_TABLE, report)
        return {"pairs": pairs, "table": f"{path.stem}.main.{NEAR_DUPLICATES_TABLE}"}

    @task
    def summary(
        reports: list[dict[str, Any]], upkeep: dict[str, Any], near: dict[str, Any]
    ) -> dict[str, Any]:
        """Add up the shards' refresh reports into the run's summary (``make demo``'s lines)."""
        from qwen3_pipeline.consumers.vector_search import open_vector_table
        from qwen3_pipeline.demo.summary import DemoSummary, combine_reports

        with retry_only_transient():
            vectors = open_vector_table(LANCEDB_URI, TABLE, version=upkeep["version_after"])
            # By index: iterating a mapped task's XComs probes one past the end (logged as an
            # error by Airflow's client), len() asks for the count instead.
            result = DemoSummary.from_report(
                combine_reports(reports[i] for i in range(len(reports))),
                table_uri=LANCEDB_URI,
                table_name=TABLE,
                table_version=vectors.version,
                stored_rows=vectors.count_rows(),
                search_mode=upkeep["search_mode"],
                near_duplicate_pairs=near["pairs"],
                near_duplicate_table=near["table"],
            )
        for line in result.lines():
            print(line)
        return result.as_dict()

    config = settings()
    corpus = load_corpus(config["duckdb_path"])
    models = dbt_build(config)
    refresh = Qwen3EmbeddingRefreshOperator.partial(
        task_id="refresh",
        source=config["source"],
        key=config["key"],
        text=config["text"],
        carry=config["carry"],
        updated_at=config["updated_at"],
        table=TABLE,
        db_uri=LANCEDB_URI,
        model=config["model"],
        dim=config["dim"],
        device=config["device"],
        engine=config["engine"],
        workers=config["workers"],
        gpus_per_worker=config["gpus_per_worker"],
        ray_address=config["ray_address"],
        allow_mass_delete="{{ params.allow_mass_delete }}",
        accept_drift="{{ params.accept_drift }}",
        max_attempts="{{ params.max_attempts }}",
        retry_backoff_s="{{ params.retry_backoff_s }}",
        replay="{{ params.replay }}",
        pool=GPU_POOL,
        map_index_template="{{ task.shard }}",
    ).expand(shard=[f"{i}/{SHARDS}" for i in range(SHARDS)])
    upkeep = index_upkeep()
    near = near_duplicates(upkeep, config["duckdb_path"])
    chain(corpus, models, refresh, upkeep)
    summary(refresh.output, upkeep, near)


with DAG(
    dag_id="qwen3_demo_search",
    description="A sample search each time the vector table changes (scheduled on its Asset)",
    schedule=[VECTORS],
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    default_args=DEFAULT_ARGS,
    params={"query": Param(DEFAULT_QUERY, type="string", description="The sample search.")},
    tags=["qwen3", "demo", "lancedb"],
) as qwen3_demo_search:

    @task(inlets=[VECTORS], pool=GPU_POOL)
    def search() -> list[dict[str, Any]]:
        """Search the table at the Lance version of the latest refresh (its asset event)."""
        from qwen3_pipeline.airflow.operators import quiet_model_progress_bars
        from qwen3_pipeline.consumers.vector_search import open_vector_table
        from qwen3_pipeline.consumers.vector_search import search as search_table

        context = get_current_context()
        events = context["inlet_events"][VECTORS]
        if not len(events):
            raise RuntimeError(f"no refresh has written {VECTORS.uri} yet")
        report = events[-1].extra
        query = context["params"]["query"]
        with retry_only_transient(), quiet_model_progress_bars():
            vectors = open_vector_table(
                report["table_uri"], report["table_name"], version=report["version_after"]
            )
            hits = search_table(vectors, query, k=5)
        found = [{"key": row["key"], "similarity": row["similarity"]} for row in hits.to_pylist()]
        print(f"search {query!r} at lance version {vectors.version}:")
        for hit in found:
            print(f"  {hit['similarity']:.3f}  {hit['key']}")
        return found

    search()
