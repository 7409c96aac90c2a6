"""Run the Airflow demo once, in-process: ``make airflow-demo``.

``python -m qwen3_pipeline.demo.airflow_run [--limit N] [--query Q]`` does the same.

The Airflow twin of ``make demo``: it runs the example DAG ``qwen3_demo`` of
``airflow_dags/qwen3_demo.py`` with ``dag.test()`` (no scheduler, no API server), then its
downstream DAG ``qwen3_demo_search`` (scheduled on the vector table's Asset) for the sample
search, and prints the same summary as ``make demo``. Run it twice: the second run embeds
nothing and makes no Lance commit.

Airflow's metadata database is SQLite under ``$AIRFLOW_HOME`` if set, else under
``<data_dir>/airflow_home`` (data directory ``QWEN3_PIPELINE_DATA_DIR``, default ``./data``);
it is created or migrated first (``airflow db migrate``), and the ``gpu`` pool that the
model-loading tasks use is created with ``QWEN3_PIPELINE_GPU_POOL_LIMIT`` slots (default 1)
if missing. The DAG file takes its pool from ``QWEN3_PIPELINE_AIRFLOW_POOL`` (this runner sets
``gpu`` unless it is set; unset, the DAG falls back to ``default_pool`` with a warning). Point
``AIRFLOW_HOME`` there and start ``airflow standalone`` with the same variables to see these
runs in the UI (docs/guides/airflow.md has the command). The demo's settings are the Dagster
demo's environment variables (:mod:`qwen3_pipeline.demo.location`), with the same model
fallback: a random-weight checkpoint, announced loudly, when the default hub model cannot be
loaded.

The helpers here that the DAG's tasks call (:func:`demo_settings`) import the demo's shared
settings code when a task runs, never when the DAG is parsed.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError

DAG_ID = "qwen3_demo"
SEARCH_DAG_ID = "qwen3_demo_search"
SETTINGS_TASK = "settings"
SUMMARY_TASK = "summary"
SEARCH_TASK = "search"
DAG_FILE = "qwen3_demo.py"
GPU_POOL = "gpu"
GPU_POOL_LIMIT_ENV = "QWEN3_PIPELINE_GPU_POOL_LIMIT"
# The pool the demo DAG's model-loading tasks use (read by the DAG file when it is parsed).
POOL_ENV = "QWEN3_PIPELINE_AIRFLOW_POOL"
DATA_DIR_ENV = "QWEN3_PIPELINE_DATA_DIR"
DEFAULT_DATA_DIR = "data"
AIRFLOW_HOME_DIR = "airflow_home"
# The example DAGs of a source checkout: <repository>/airflow_dags.
DEFAULT_DAGS_FOLDER = Path(__file__).resolve().parents[2] / "airflow_dags"


class DemoFailedError(Qwen3PipelineError):
    """A task of the demo DAG failed (its log above says why)."""


# --------------------------------------------------------------------------- task helpers


def demo_settings(*, lancedb_uri: str, table: str, shards: int) -> dict[str, Any]:
    """Return the demo's run settings (the ``settings`` task's XCom), read when the task runs.

    The model, device, dimension and engine come from the Dagster demo's environment
    variables and its model choice (:meth:`DemoSettings.from_env`, :func:`choose_model`), the
    source and its columns from the same code location, so both demos refresh the same table
    the same way. The DAG names the vector table's Asset when it is parsed (``lancedb_uri``,
    ``table``, ``shards``); they must agree with these settings.

    Raises:
        ConfigError: The DAG's table, URI or shard count differ from the settings.
    """
    from qwen3_pipeline.demo.dbt import (
        dbt_executable,
        dbt_project_dir,
        dbt_target_dir,
        duckdb_warehouse_path,
    )
    from qwen3_pipeline.demo.location import DOCUMENT_CONFIG, DOCUMENTS_TABLE, DemoSettings
    from qwen3_pipeline.demo.run import choose_model

    settings = DemoSettings.from_env()
    settings = replace(settings, model=choose_model(settings, os.environ))
    declared = (lancedb_uri, table, shards)
    expected = (settings.lancedb_uri, settings.table, settings.shards)
    if declared != expected:
        raise ConfigError(
            f"the DAG declares table {declared} (uri, name, shards) but the demo settings say "
            f"{expected}: set {DATA_DIR_ENV} the same for the DAG processor and the workers"
        )
    duckdb_path = duckdb_warehouse_path()
    return {
        "model": settings.model,
        "dim": settings.dim,
        "device": settings.device,
        "engine": settings.engine,
        "workers": settings.workers,
        "gpus_per_worker": settings.gpus_per_worker,
        "ray_address": settings.ray_address,
        "source": f"duckdb:{duckdb_path}::{DOCUMENTS_TABLE}",
        "key": DOCUMENT_CONFIG.key,
        "text": list(DOCUMENT_CONFIG.text_columns),
        "carry": list(DOCUMENT_CONFIG.carry),
        "updated_at": DOCUMENT_CONFIG.updated_at,
        "duckdb_path": str(duckdb_path),
        "dbt_project_dir": str(dbt_project_dir()),
        "dbt_target_dir": str(dbt_target_dir()),
        "dbt_executable": dbt_executable(),
    }


def dbt_build_command(settings: Mapping[str, Any], run_dir: Path) -> list[str]:
    """The ``dbt build`` of the demo's dbt project on the warehouse, writing under ``run_dir``.

    dbt's artifacts and log go to ``run_dir`` (in the data directory), never into the project.
    """
    import json

    project = str(settings["dbt_project_dir"])
    return [
        str(settings["dbt_executable"]),
        "build",
        "--project-dir",
        project,
        "--profiles-dir",
        project,
        "--target-path",
        str(run_dir),
        "--log-path",
        str(run_dir),
        "--vars",
        json.dumps({"duckdb_path": str(settings["duckdb_path"])}),
    ]


# --------------------------------------------------------------------------- the runner


def airflow_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The Airflow settings of the demo process: home, DAGs folder, no example DAGs, the pool.

    ``AIRFLOW_HOME`` is kept if set, else ``<data_dir>/airflow_home``; the DAGs folder is kept
    if set, else the repository's ``airflow_dags``; the DAG's pool
    (``QWEN3_PIPELINE_AIRFLOW_POOL``) is kept if set, else ``gpu`` (which :func:`run_demo`
    creates).
    """
    data_dir = Path(environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()
    home = environ.get("AIRFLOW_HOME") or str((data_dir / AIRFLOW_HOME_DIR).resolve())
    dags = environ.get("AIRFLOW__CORE__DAGS_FOLDER") or str(DEFAULT_DAGS_FOLDER)
    return {
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": dags,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        POOL_ENV: environ.get(POOL_ENV, "").strip() or GPU_POOL,
    }


def migrate_metadata_db() -> None:
    """Create or upgrade Airflow's metadata database (``airflow db migrate``, a subprocess).

    A subprocess, because the migration configures logging for itself; it reads the same
    environment as this process.

    Raises:
        DemoFailedError: The migration failed (its output is included).
    """
    done = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise DemoFailedError(f"airflow db migrate failed ({done.returncode}):\n{tail}")


def ensure_pool(name: str = GPU_POOL, slots: int | None = None) -> None:
    """Create the pool if missing (``slots`` default: ``$QWEN3_PIPELINE_GPU_POOL_LIMIT`` or 1).

    An existing pool keeps its size unless ``slots`` is given.
    """
    from airflow.models.pool import Pool

    if slots is None and Pool.get_pool(name) is not None:
        return
    if slots is None:
        raw = os.environ.get(GPU_POOL_LIMIT_ENV, "").strip() or "1"
        try:
            slots = int(raw)
        except ValueError:
            raise ConfigError(f"{GPU_POOL_LIMIT_ENV}={raw!r} is not an integer") from None
    Pool.create_or_update_pool(
        name,
        slots=slots,
        description="Tasks that load a Qwen3 model: one slot per model that fits on the GPU.",
        include_deferred=False,
    )


def load_dag_module(dags_folder: Path | None = None) -> ModuleType:
    """Import the demo DAG file from Airflow's DAGs folder (where ``dag.test()`` finds it)."""
    if dags_folder is None:
        from airflow.configuration import conf

        dags_folder = Path(conf.get("core", "dags_folder"))
    path = dags_folder / DAG_FILE
    if not path.is_file():
        raise ConfigError(
            f"Airflow's DAGs folder {dags_folder} has no {DAG_FILE}: set "
            f"AIRFLOW__CORE__DAGS_FOLDER to the repository's airflow_dags/ directory"
        )
    spec = importlib.util.spec_from_file_location("qwen3_demo_dag", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_result(dag_run: Any, task_id: str) -> Any:
    """The XCom ``return_value`` of ``task_id`` (unmapped) in ``dag_run``; None if absent."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id,
                key="return_value",
                dag_ids=dag_run.dag_id,
                task_ids=task_id,
            )
        ).first()
        return None if row is None else XComModel.deserialize_value(row)


def _check_succeeded(dag_run: Any) -> None:
    if str(dag_run.state) in ("success", "DagRunState.SUCCESS"):
        return
    failed = sorted(
        {ti.task_id for ti in dag_run.get_task_instances() if str(ti.state) != "success"}
    )
    raise DemoFailedError(
        f"DAG {dag_run.dag_id} run {dag_run.run_id} ended {dag_run.state}; tasks not "
        f"successful: {', '.join(failed)} (their logs are above)"
    )


def run_demo(*, limit: int | None, query: str) -> list[str]:
    """Run the demo DAG and its search DAG once with ``dag.test()``; return the summary lines.

    Airflow must be configured already (:func:`airflow_environment`, :func:`migrate_metadata_db`).

    Args:
        limit: Load a seeded sample of this many docstrings (None: all of them).
        query: The sample search.

    Raises:
        DemoFailedError: A task failed.
    """
    from qwen3_pipeline.demo.summary import DemoSummary, search_lines

    ensure_pool(os.environ.get(POOL_ENV, "").strip() or GPU_POOL)
    module = load_dag_module()
    run = module.qwen3_demo.test(run_conf={"limit": limit})
    _check_succeeded(run)
    settings = task_result(run, SETTINGS_TASK) or {}
    summary = DemoSummary.from_dict(task_result(run, SUMMARY_TASK))
    search = module.qwen3_demo_search.test(run_conf={"query": query})
    _check_succeeded(search)
    hits = task_result(search, SEARCH_TASK) or []
    header = f"model: {settings.get('model')}   data: {Path(summary.table_uri).parent}"
    return [header, *summary.lines(), *search_lines(query, hits)]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m qwen3_pipeline.demo.airflow_run``)."""
    from qwen3_pipeline.demo.run import DEFAULT_QUERY

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--limit", type=int, default=None, help="load a sample of N docstrings (default: all)"
    )
    parser.add_argument("--query", default=DEFAULT_QUERY, help="the sample search")
    args = parser.parse_args(argv)
    if "airflow" in sys.modules:
        print("error: run the Airflow demo in a fresh process", file=sys.stderr)
        return 2
    # Airflow reads its configuration when first imported: set it up before that.
    os.environ.update(airflow_environment(os.environ))
    try:
        migrate_metadata_db()
        lines = run_demo(limit=args.limit, query=args.query)
    except Qwen3PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DemoFailedError) else 2
    header, *summary = lines
    print(header, file=sys.stderr)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
