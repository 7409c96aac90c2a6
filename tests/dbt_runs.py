"""Dagster runs of the warehouse assets that test modules share (not a test module).

A ``dbt build`` costs ~15 s on a small machine. :func:`run_dbt_models` makes the runs that
``tests/test_dbt_noise.py`` and ``tests/test_dbt_models.py`` inspect, in one data directory,
once per session (the ``dbt_runs`` fixture of ``conftest.py``), and keeps what each run left
behind at the moment it ended.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from qwen3_pipeline.demo.dbt import (
    LAST_RUN_DIR,
    dbt_cli_resource,
    dbt_models_assets,
    raw_docstrings,
)

LIMIT = 300
CHANGED_AT = datetime(2030, 1, 1)


@dataclass(frozen=True, kw_only=True)
class DbtRuns:
    """Three runs of the warehouse assets in one data directory, and what each left.

    ``failed``: the dbt models alone on a new, empty warehouse (no raw table: dbt fails);
    ``first``: ``raw_docstrings`` (a sample of ``limit`` docstrings) and the dbt models;
    ``second``: the dbt models alone, after the raw row ``changed_doc_id`` was rewritten
    (body ``Rewritten.``, ``updated_at`` ``changed_at``).
    ``*_target``: the names in the dbt target directory when that run ended;
    ``failed_log``: the failed run's ``last_run/dbt.log`` ("" if missing).
    """

    limit: int
    data_dir: Path
    instance: dg.DagsterInstance
    failed: dg.ExecuteInProcessResult
    failed_target: list[str]
    failed_log: str
    first: dg.ExecuteInProcessResult
    first_target: list[str]
    first_documents: int
    changed_doc_id: str
    changed_at: datetime
    second: dg.ExecuteInProcessResult

    @property
    def target(self) -> Path:
        """The dbt target directory, ``<data_dir>/dbt/target``."""
        return self.data_dir / "dbt" / "target"

    @property
    def warehouse(self) -> Path:
        """The DuckDB warehouse file."""
        return self.data_dir / "warehouse.duckdb"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def run_dbt_models(data_dir: Path) -> DbtRuns:
    """Run the failed, first and second runs of :class:`DbtRuns` in ``data_dir``."""
    target = data_dir / "dbt" / "target"
    warehouse = data_dir / "warehouse.duckdb"
    assets = [raw_docstrings, dbt_models_assets]
    resources = {"dbt": dbt_cli_resource()}
    models_only = dg.AssetSelection.assets(dbt_models_assets)
    instance = dg.DagsterInstance.ephemeral()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3_PIPELINE_DATA_DIR", str(data_dir))
        mp.delenv("QWEN3_PIPELINE_DUCKDB_PATH", raising=False)

        # No raw table in the (new) warehouse: the source tests and the models fail.
        failed = dg.materialize(
            assets,
            resources=resources,
            instance=instance,
            selection=models_only,
            raise_on_error=False,
        )
        failed_target = _names(target)
        log = target / LAST_RUN_DIR / "dbt.log"
        failed_log = log.read_text() if log.is_file() else ""

        first = dg.materialize(
            assets,
            resources=resources,
            instance=instance,
            run_config={"ops": {"raw_docstrings": {"config": {"limit": LIMIT}}}},
        )
        first_target = _names(target)
        con = duckdb.connect(str(warehouse))
        try:
            (first_documents,) = con.execute("SELECT count(*) FROM documents").fetchone() or (0,)
            ((doc_id,),) = con.execute("SELECT min(doc_id) FROM raw_docstrings").fetchall()
            con.execute(
                "UPDATE raw_docstrings SET body = 'Rewritten.', updated_at = ? WHERE doc_id = ?",
                [CHANGED_AT, doc_id],
            )
        finally:
            con.close()

        second = dg.materialize(
            assets, resources=resources, instance=instance, selection=models_only
        )
    return DbtRuns(
        limit=LIMIT,
        data_dir=data_dir,
        instance=instance,
        failed=failed,
        failed_target=failed_target,
        failed_log=failed_log,
        first=first,
        first_target=first_target,
        first_documents=first_documents,
        changed_doc_id=doc_id,
        changed_at=CHANGED_AT,
        second=second,
    )
