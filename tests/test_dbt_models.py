import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from qwen3_pipeline.demo.corpus import load_corpus_into_duckdb
from qwen3_pipeline.demo.dbt import (
    LAST_RUN_DIR,
    dbt_cli_resource,
    dbt_models_assets,
    documents_asset_key,
    raw_docstrings,
)
from tests.dbt_runs import DbtRuns

DBT_PROJECT = Path(__file__).resolve().parents[1] / "dbt_models"
LIMIT = 300
LOADED_AT = datetime(2025, 1, 1)
MESSY_BODY = "First line.   \r\n\r\n\r\n\r\nSecond paragraph.\t\r\n    indented code  \r\n"


def _query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _execute(db: Path, sql: str, params: list | None = None) -> None:
    con = duckdb.connect(str(db))
    try:
        con.execute(sql, params or [])
    finally:
        con.close()


@pytest.fixture(scope="module")
def dbt_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A limited corpus plus two hand-made rows, built with the real dbt CLI."""
    workdir = tmp_path_factory.mktemp("dbt")
    db = workdir / "warehouse.duckdb"
    load_corpus_into_duckdb(db, limit=LIMIT, loaded_at=LOADED_AT)
    _execute(
        db,
        "INSERT INTO raw_docstrings VALUES "
        "('zz_test:blank', 'zz_test', 'blank', 'function', 'blank', ' \n\t ', 'zz_test.py', ?), "
        "('zz_test:messy', 'zz_test', 'messy', 'function', ' messy ', ?, 'zz_test.py', ?)",
        [LOADED_AT, MESSY_BODY, LOADED_AT],
    )
    target = workdir / "target"
    env = {
        **os.environ,
        "QWEN3_PIPELINE_DUCKDB_PATH": str(db),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("dbt")),
            "build",
            "--project-dir",
            str(DBT_PROJECT),
            "--profiles-dir",
            str(DBT_PROJECT),
            "--target-path",
            str(target),
            "--log-path",
            str(workdir / "logs"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return db, target, result.stdout


def test_dbt_build_passes_every_node_without_deprecations(
    dbt_build: tuple[Path, Path, str],
) -> None:
    _, target, stdout = dbt_build
    results = json.loads((target / "run_results.json").read_text())["results"]

    statuses = {r["unique_id"]: r["status"] for r in results}
    assert statuses["model.qwen3_pipeline.documents"] == "success"
    assert statuses["model.qwen3_pipeline.stg_docstrings"] == "success"
    tests = {k: v for k, v in statuses.items() if k.startswith("test.")}
    assert len(tests) >= 5
    assert set(tests.values()) == {"pass"}
    assert "deprecat" not in stdout.lower()


def test_documents_has_one_row_per_nonempty_docstring(dbt_build: tuple[Path, Path, str]) -> None:
    db, _, _ = dbt_build

    ((raw, nonempty, stg, documents),) = _query(
        db,
        "SELECT (SELECT count(*) FROM raw_docstrings), "
        "(SELECT count(*) FROM raw_docstrings WHERE trim(body, ' \n\t\r') <> ''), "
        "(SELECT count(*) FROM stg_docstrings), (SELECT count(*) FROM documents)",
    )
    assert raw == LIMIT + 2
    assert documents == stg == nonempty == LIMIT + 1
    assert _query(db, "SELECT count(*) FROM documents WHERE doc_id = 'zz_test:blank'") == [(0,)]


def test_documents_text_is_title_blank_line_normalised_body(
    dbt_build: tuple[Path, Path, str],
) -> None:
    db, _, _ = dbt_build

    ((title, text),) = _query(
        db, "SELECT title, text FROM documents WHERE doc_id = ?", ["zz_test:messy"]
    )
    assert title == "messy"
    assert text == "messy\n\nFirst line.\n\nSecond paragraph.\n    indented code"
    rendered = _query(
        db,
        "SELECT count(*) FROM documents d JOIN raw_docstrings r USING (doc_id) "
        "WHERE d.text = r.title || chr(10) || chr(10) || r.body",
    )
    assert rendered[0][0] >= LIMIT * 0.9
    assert _query(db, "SELECT count(*) FROM documents WHERE text LIKE '%' || chr(13) || '%'") == [
        (0,)
    ]


def test_documents_contract_is_enforced(dbt_build: tuple[Path, Path, str]) -> None:
    db, target, _ = dbt_build
    manifest = json.loads((target / "manifest.json").read_text())
    node = manifest["nodes"]["model.qwen3_pipeline.documents"]

    assert node["config"]["contract"]["enforced"] is True
    assert node["config"]["materialized"] == "table"
    columns = _query(
        db,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'documents' ORDER BY ordinal_position",
    )
    assert columns == [
        ("doc_id", "VARCHAR", "NO"),
        ("title", "VARCHAR", "NO"),
        ("module", "VARCHAR", "NO"),
        ("kind", "VARCHAR", "NO"),
        ("text", "VARCHAR", "NO"),
        ("source_path", "VARCHAR", "YES"),
        ("updated_at", "TIMESTAMP", "NO"),
    ]
    source = manifest["sources"]["source.qwen3_pipeline.raw.raw_docstrings"]
    assert source["config"]["meta"]["dagster"]["asset_key"] == ["raw_docstrings"]


def test_dagster_lineage_connects_raw_to_documents() -> None:
    deps = dbt_models_assets.asset_deps

    assert raw_docstrings.key == dg.AssetKey(["raw_docstrings"])
    assert documents_asset_key() == dg.AssetKey(["documents"])
    assert deps[dg.AssetKey(["stg_docstrings"])] == {raw_docstrings.key}
    assert deps[documents_asset_key()] == {dg.AssetKey(["stg_docstrings"])}
    defs = dg.Definitions(
        assets=[raw_docstrings, dbt_models_assets], resources={"dbt": dbt_cli_resource()}
    )
    dg.Definitions.validate_loadable(defs)


def test_dagster_materializes_raw_and_dbt_then_propagates_a_change(dbt_runs: DbtRuns) -> None:
    # The runs are shared with test_dbt_noise.py (see conftest.py): raw and dbt on a sample,
    # then dbt alone after one raw row was rewritten (a failed build went first, same data dir).
    result = dbt_runs.first
    assert result.success
    raw_event = result.asset_materializations_for_node("raw_docstrings")[0]
    assert raw_event.metadata["dagster/row_count"].value == dbt_runs.limit
    checks = result.get_asset_check_evaluations()
    assert checks
    assert all(c.passed for c in checks)
    db = dbt_runs.warehouse
    assert dbt_runs.first_documents == dbt_runs.limit
    # dbt's artifacts and log go under the data directory, not into the (installed) project;
    # only the latest run's are kept.
    assert dbt_runs.first_target == [LAST_RUN_DIR]
    (run_target,) = dbt_runs.target.iterdir()
    assert run_target.name == LAST_RUN_DIR
    assert (run_target / "run_results.json").is_file()
    assert (run_target / "dbt.log").is_file()

    rerun = dbt_runs.second
    assert rerun.success
    ((title, text, updated_at),) = _query(
        db,
        "SELECT title, text, updated_at FROM documents WHERE doc_id = ?",
        [dbt_runs.changed_doc_id],
    )
    assert text == f"{title}\n\nRewritten."
    assert updated_at == dbt_runs.changed_at
    assert _query(db, "SELECT count(*) FROM documents") == [(dbt_runs.limit,)]
