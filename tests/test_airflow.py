"""The Airflow provider: the operator alone, the retry rule, the Asset, secrets, the demo DAG.

Airflow reads its configuration when first imported, so this module points it at a private
home (SQLite metadata database, DAGs folder) in a temporary directory before importing it, and
removes that directory when the session ends; nothing is written to the repository or to
``~/airflow``. ``dag.test()`` runs DAGs in-process, without a scheduler: the DAG files it runs
must be in the DAGs folder, so the tests copy ``airflow_dags/qwen3_demo.py`` and write their
own DAG file there.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

if "airflow" in sys.modules:  # pragma: no cover - another module configured Airflow first
    pytest.skip("Airflow was imported before its test home was set up", allow_module_level=True)

_ROOT = Path(tempfile.mkdtemp(prefix="qwen3-airflow-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_DAGS = _ROOT / "dags"
_DAGS.mkdir()
os.environ.update(
    {
        "AIRFLOW_HOME": str(_ROOT / "airflow_home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(_DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # Unpaused, a DAG scheduled on an Asset gets queued runs (a scheduler would start them).
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    }
)

import duckdb  # noqa: E402
import lancedb  # noqa: E402
from airflow.sdk import Asset  # noqa: E402
from airflow.sdk.exceptions import AirflowFailException  # noqa: E402

import qwen3_pipeline.embedding.encoder as encoder_module  # noqa: E402
from qwen3_pipeline.airflow import (  # noqa: E402
    LanceDBDestination,
    LanceDBHook,
    Qwen3EmbeddingRefreshOperator,
    get_provider_info,
    lancedb_asset,
    lancedb_asset_uri,
)
from qwen3_pipeline.airflow.hooks import (  # noqa: E402
    destination_from_connection,
    is_credential_option,
)
from qwen3_pipeline.core.errors import (  # noqa: E402
    ConfigError,
    InputDataError,
    MassDeleteError,
    SourceUnavailableError,
    StoreConflictError,
    is_transient,
)
from qwen3_pipeline.demo import airflow_run as airflow_demo  # noqa: E402
from qwen3_pipeline.demo.summary import DemoSummary, combine_reports, search_lines  # noqa: E402
from qwen3_pipeline.sources import shard_of  # noqa: E402
from qwen3_pipeline.store import list_table_names  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECRET_PASSWORD = "pw-Secret-4f9a1c"
SECRET_OPTION = "az-Secret-7b2e9d"


# --------------------------------------------------------------------------- fixtures


def _write_docs(path: Path, rows: list[tuple[int, str, str, str]]) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute(
            "CREATE OR REPLACE TABLE docs (id INTEGER, title VARCHAR, body VARCHAR, "
            "url VARCHAR, updated_at TIMESTAMP)"
        )
        con.executemany(
            "INSERT INTO docs VALUES (?, ?, ?, ?, TIMESTAMP '2024-01-01')", [list(r) for r in rows]
        )
    finally:
        con.close()


DOCS = [
    (1, "Open", "Open a file and return a stream.", "u1"),
    (2, "Loads", "Deserialize a JSON document to a Python object.", "u2"),
    (3, "Sleep", "Suspend execution for the given number of seconds.", "u3"),
    (4, "Join", "Join path components intelligently.", "u4"),
    (5, "Sort", "Return a new sorted list from the items in iterable.", "u5"),
    (6, "Hash", "Return the hash value of the object.", "u6"),
]


class _OutletEvents(dict):
    """What ``context["outlet_events"]`` is to an operator: an accessor per Asset."""

    def __missing__(self, asset: Asset) -> SimpleNamespace:
        self[asset] = SimpleNamespace(extra=None)
        return self[asset]


def _operator(
    db: Path, lance: Path, model: Path, **overrides: Any
) -> Qwen3EmbeddingRefreshOperator:
    settings: dict[str, Any] = {
        "task_id": "refresh",
        "source": f"duckdb:{db}::main.docs",
        "key": "id",
        "template": "{title}\n\n{body}",
        "carry": ["url"],
        "updated_at": "updated_at",
        "table": "docs",
        "db_uri": str(lance),
        "model": str(model),
        "device": "cpu",
    }
    settings.update(overrides)
    return Qwen3EmbeddingRefreshOperator(**settings)


def _execute(operator: Qwen3EmbeddingRefreshOperator) -> tuple[dict[str, Any], _OutletEvents]:
    events = _OutletEvents()
    values = operator.execute({"run_id": "manual__test", "outlet_events": events})  # type: ignore[arg-type]
    return values, events


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count model loads (a tokenizer alone is not one) of every Qwen3Encoder built."""
    loads: list[str] = []

    class CountingEncoder(encoder_module.Qwen3Encoder):
        def __init__(self, spec: Any, **kwargs: Any) -> None:
            if kwargs.get("load_model", True):
                loads.append(spec.model)
            super().__init__(spec, **kwargs)

    monkeypatch.setattr(encoder_module, "Qwen3Encoder", CountingEncoder)
    return loads


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata database migrated once, the demo DAG in the DAGs folder, a gpu pool."""
    airflow_demo.migrate_metadata_db()
    shutil.copy(REPO / "airflow_dags" / "qwen3_demo.py", _DAGS / "qwen3_demo.py")
    (_DAGS / "qwen3_test_dags.py").write_text(TEST_DAGS)
    airflow_demo.ensure_pool("gpu", 1)
    return _DAGS


def _load_dags(name: str) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"loaded_{name}", _DAGS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task_instances(run: Any) -> dict[str, Any]:
    return {ti.task_id: ti for ti in run.get_task_instances()}


# --------------------------------------------------------------------------- no Airflow


def test_the_package_imports_without_airflow_and_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["airflow"] = None  # as if Apache Airflow were not installed
        import qwen3_pipeline.airflow as provider
        assert provider.get_provider_info()["package-name"] == "qwen3-pipeline"
        try:
            provider.Qwen3EmbeddingRefreshOperator
        except provider.AirflowNotInstalledError as e:
            assert isinstance(e, ImportError)
            print(e)
        else:
            raise SystemExit("no error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'qwen3-pipeline[airflow]'" in done.stdout


def test_provider_info_is_valid_for_airflows_providers_manager() -> None:
    import jsonschema
    from airflow import providers_manager

    schema_path = Path(providers_manager.__file__).with_name("provider_info.schema.json")
    info = get_provider_info()
    jsonschema.validate(info, json.loads(schema_path.read_text()))
    (connection,) = info["connection-types"]
    assert connection["connection-type"] == "lancedb"
    assert connection["hook-class-name"] == "qwen3_pipeline.airflow.hooks.LanceDBHook"


# --------------------------------------------------------------------------- assets, hook


def test_the_lancedb_connection_type_is_registered_with_airflow() -> None:
    from airflow.providers_manager import ProvidersManager

    hook = ProvidersManager().hooks["lancedb"]
    assert hook is not None
    assert hook.hook_class_name == "qwen3_pipeline.airflow.hooks.LanceDBHook"
    assert hook.connection_testable


def test_asset_uris_name_the_table_where_it_lives() -> None:
    assert lancedb_asset_uri("docs", uri="/data/lancedb/") == "lancedb:///data/lancedb/docs"
    assert (
        lancedb_asset_uri("docs", uri="s3://Bucket/vectors") == "lancedb+s3://Bucket/vectors/docs"
    )
    assert lancedb_asset_uri("docs", conn_id="lancedb_s3") == "lancedb://lancedb_s3/docs"
    # Airflow normalises the empty authority away; producer and consumer get the same Asset.
    assert lancedb_asset("docs", uri="/data/lancedb").uri == "lancedb:/data/lancedb/docs"
    assert lancedb_asset("docs", uri="/data/lancedb") == lancedb_asset("docs", uri="/data/lancedb/")
    with pytest.raises(ConfigError, match="exactly one"):
        lancedb_asset_uri("docs")
    with pytest.raises(ConfigError, match="credentials"):
        lancedb_asset_uri("docs", uri="s3://key:secret@bucket/vectors")
    with pytest.raises(ConfigError):
        lancedb_asset_uri("../docs", uri="/data")


def test_connection_fields_map_to_storage_options_by_scheme(tmp_path: Path) -> None:
    s3 = destination_from_connection(
        host="s3://bucket/vectors",
        login="AKIAEXAMPLE",
        password="secret-key",
        extra={"storage_options": '{"region": "eu-west-1"}'},
    )
    assert s3.uri == "s3://bucket/vectors"
    assert s3.storage_options == {
        "region": "eu-west-1",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": "secret-key",
    }
    assert "secret-key" not in repr(s3)
    assert "aws_secret_access_key" in repr(s3)
    gs = destination_from_connection(
        host=None, login=None, password='{"key": 1}', extra={"uri": "gs://b/v"}
    )
    assert gs.storage_options == {"google_service_account_key": '{"key": 1}'}
    local = destination_from_connection(host="/tmp/vectors", login=None, password=None, extra={})
    assert local == LanceDBDestination(uri="/tmp/vectors")
    ok, message = LanceDBHook(None, uri=str(tmp_path)).test_connection()
    assert ok
    assert message == f"connected to {tmp_path}: 0 table(s)"
    with pytest.raises(ConfigError, match="password_option"):
        destination_from_connection(host="/tmp/v", login=None, password="x", extra={})
    with pytest.raises(ConfigError, match="not valid JSON"):
        destination_from_connection(
            host="/tmp/v", login=None, password=None, extra={"storage_options": "{"}
        )
    with pytest.raises(ConfigError, match="no URI"):
        destination_from_connection(host=None, login=None, password=None, extra={}, conn_id="c")
    assert is_credential_option("azure_storage_account_key")
    assert is_credential_option("aws_session_token")
    assert not is_credential_option("region")


# --------------------------------------------------------------------------- the operator alone


def test_operator_fills_then_does_nothing_then_applies_edits_with_exact_counts(
    tmp_path: Path,
    tiny_model_dir: Path,
    model_loads: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    _write_docs(db, DOCS)

    caplog.set_level("INFO")
    fill, events = _execute(_operator(db, lance, tiny_model_dir))
    summaries = [r for r in caplog.records if r.getMessage().startswith("refreshed docs:")]
    assert len(summaries) == 1  # the engine's line, not repeated by the operator
    caplog.clear()
    assert (fill["scanned"], fill["inserted"], fill["embedded_rows"]) == (6, 6, 6)
    assert fill["committed"]
    assert fill["version_before"] == 0
    assert fill["model_loads"] == 1
    assert len(model_loads) == 1
    asset = lancedb_asset("docs", uri=str(lance))
    assert events[asset].extra == fill  # the asset event carries the report
    assert json.loads(json.dumps(fill)) == fill  # a JSON XCom
    assert fill["run_id"] == "adhoc_airflow/manual__test"

    noop, _ = _execute(_operator(db, lance, tiny_model_dir))
    assert (noop["unchanged"], noop["embedded_rows"], noop["committed"]) == (6, 0, False)
    assert noop["version_before"] == noop["version_after"] == fill["version_after"]
    assert noop["model_loads"] == 0
    assert len(model_loads) == 1

    edited = [
        (1, "Open", "Open a file for reading or writing.", "u1"),
        (2, "Loads", "Parse JSON text into Python values.", "u2"),
        (4, "Join", "Join path components intelligently.", "u4-moved"),
        (5, "Sort", "Return a new sorted list from the items in iterable.", "u5"),
        (6, "Hash", "Return the hash value of the object.", "u6"),
        (7, "Walk", "Generate the file names in a directory tree.", "u7"),
    ]
    _write_docs(db, edited)
    edits, _ = _execute(_operator(db, lance, tiny_model_dir))
    counts = {k: edits[k] for k in ("scanned", "inserted", "updated", "deleted", "unchanged")}
    assert counts == {"scanned": 6, "inserted": 1, "updated": 2, "deleted": 1, "unchanged": 2}
    assert (edits["carry_updated"], edits["embedded_rows"], edits["model_loads"]) == (1, 3, 1)
    table = lancedb.connect(str(lance)).open_table("docs")
    assert table.version == edits["version_after"]
    assert table.count_rows() == 6


def test_operator_refreshes_one_shard_given_as_k_of_n_or_as_its_label(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    _write_docs(db, DOCS)
    in_shard_1 = sum(1 for row in DOCS if shard_of(row[0], 2) == 1)
    first, _ = _execute(_operator(db, lance, tiny_model_dir, shard="1/2"))
    assert first["inserted"] == in_shard_1
    assert first["partition_keys"] == ["shard-01-of-02"]
    again, _ = _execute(_operator(db, lance, tiny_model_dir, shard="shard-01-of-02"))
    assert again["unchanged"] == in_shard_1
    assert not again["committed"]
    with pytest.raises(AirflowFailException, match="K/N"):
        _execute(_operator(db, lance, tiny_model_dir, shard="1-of-2"))


def test_bad_input_fails_without_retry_and_transient_errors_are_raised_for_retries(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    _write_docs(db, [*DOCS, (3, "Again", "A duplicate key.", "u")])
    with pytest.raises(AirflowFailException, match="duplicate") as failed:
        _execute(_operator(db, lance, tiny_model_dir))
    assert isinstance(failed.value.__cause__, InputDataError)
    assert not lance.exists() or not list_table_names(lancedb.connect(str(lance)))

    _write_docs(db, DOCS)
    _execute(_operator(db, lance, tiny_model_dir))
    with pytest.raises(AirflowFailException, match="rebuild"):  # a spec mismatch
        _execute(_operator(db, lance, tiny_model_dir, dim=32))

    class LockedSource:
        name = "locked"

        def schema(self) -> Any:
            raise SourceUnavailableError("the DuckDB file is locked by a writer")

    with pytest.raises(SourceUnavailableError):  # raised as is: the task's retries apply
        _execute(_operator(db, lance, tiny_model_dir, source=LockedSource()))
    assert is_transient(StoreConflictError("busy"))
    assert not is_transient(ValueError("bug"))


def test_model_progress_bars_are_off_only_inside_the_block() -> None:
    from transformers.utils import logging as hf_logging

    from qwen3_pipeline.airflow.operators import quiet_model_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with quiet_model_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()  # Airflow logs stderr bars as errors
    assert hf_logging.is_progress_bar_enabled()


def _parse_demo_dag() -> ModuleType:
    import importlib.util

    path = REPO / "airflow_dags" / "qwen3_demo.py"
    spec = importlib.util.spec_from_file_location("parsed_qwen3_demo", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_dag_pool_is_opted_into_and_its_form_names_the_mass_delete_refusal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(airflow_demo.POOL_ENV, raising=False)
    caplog.set_level("WARNING")
    unset = _parse_demo_dag()
    # A missing pool would leave the tasks Scheduled forever: unset, the default pool.
    assert unset.qwen3_demo.get_task("refresh").pool == "default_pool"
    assert unset.qwen3_demo_search.get_task("search").pool == "default_pool"
    assert 'airflow pools set gpu 1 "Qwen3 model loads"' in caplog.text
    assert airflow_demo.POOL_ENV in caplog.text

    caplog.clear()
    monkeypatch.setenv(airflow_demo.POOL_ENV, "gpu")
    demo = _parse_demo_dag()
    assert demo.qwen3_demo.get_task("refresh").pool == "gpu"
    assert demo.qwen3_demo_search.get_task("search").pool == "gpu"
    assert "default_pool" not in caplog.text
    # make airflow-demo sets the variable (and creates the pool) unless it is set already.
    assert airflow_demo.airflow_environment({})[airflow_demo.POOL_ENV] == "gpu"
    kept = airflow_demo.airflow_environment({airflow_demo.POOL_ENV: "gpus"})
    assert kept[airflow_demo.POOL_ENV] == "gpus"

    params = demo.qwen3_demo.params
    assert "allow_mass_delete" in params.get_param("limit").description
    assert params["allow_mass_delete"] is False
    refresh = demo.qwen3_demo.get_task("refresh")
    # The refusals' ways out and the failed rows' settings come from the trigger form.
    for name, default in (
        ("allow_mass_delete", False),
        ("accept_drift", False),
        ("max_attempts", 5),
        ("retry_backoff_s", 300),
        ("replay", None),
    ):
        assert params[name] == default
        assert refresh.partial_kwargs[name] == f"{{{{ params.{name} }}}}"
        assert name in refresh.template_fields


def test_operator_arguments_are_checked_when_the_dag_is_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of text"):
        _operator(tmp_path, tmp_path, tmp_path, text=["body"])
    with pytest.raises(ConfigError, match="not both"):
        _operator(tmp_path, tmp_path, tmp_path, shard="0/2", shards=2)
    no_asset = _operator(tmp_path, tmp_path, tmp_path, asset=False)
    assert no_asset.outlets == []
    assert no_asset.asset is None
    by_connection = _operator(tmp_path, tmp_path, tmp_path, db_uri=None, lancedb_conn_id="lake")
    assert [o.uri for o in by_connection.outlets] == ["lancedb://lake/docs"]


def test_rendered_template_strings_become_the_engines_types(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Jinja renders every templated value to a string ("None" for an unset one).
    op = _operator(
        tmp_path,
        tmp_path,
        tiny_model_dir,
        dim="32",
        revision="None",
        engine="RAY",
        workers="2",
        gpus_per_worker="0.5",
        ray_address="None",
    )
    spec, options = op.embedding_spec(), op.engine_options()
    assert (spec.dim, spec.revision) == (32, None)
    assert (options.engine, options.workers, options.gpus_per_worker) == ("ray", 2, 0.5)
    assert options.ray_address is None
    with pytest.raises(ConfigError, match="workers must be an integer"):
        _operator(tmp_path, tmp_path, tiny_model_dir, workers="two").engine_options()


# --------------------------------------------------------------------------- summary


def test_reports_of_concurrent_shard_tasks_add_up_to_the_runs_summary() -> None:
    a = {
        "scanned": 3,
        "inserted": 3,
        "embedded_rows": 3,
        "tokens": 30,
        "padded_tokens": 40,
        "table_name": "docs",
        "version_before": 0,
        "version_after": 6,
        "embed_seconds": 1.0,
    }
    b = {
        "scanned": 2,
        "unchanged": 2,
        "table_name": "docs",
        "version_before": 2,
        "version_after": 4,
        "unknown_future_field": 1,
        "failures": [["k", "why"]],
    }
    total = combine_reports([a, b])
    assert (total.scanned, total.inserted, total.unchanged) == (5, 3, 2)
    assert (total.version_before, total.version_after) == (0, 6)
    assert total.failures == [("k", "why")]
    summary = DemoSummary.from_report(
        total,
        table_uri="/d/lancedb",
        table_name="docs",
        table_version=7,
        stored_rows=5,
        near_duplicate_pairs=1,
        near_duplicate_table="warehouse.main.near_duplicates",
    )
    assert summary.lines() == [
        "LanceDB table: /d/lancedb/docs.lance (version 7)",
        "rows: 5 stored | this run: 0 read, 3 inserted, 0 updated, 0 deleted, 2 unchanged, "
        "3 embedded "
        "(30 tokens, padding efficiency 0.75); lance version 0 -> 6",
        "search: exact | near-duplicate pairs: 1 in warehouse.main.near_duplicates",
    ]
    assert DemoSummary.from_dict(json.loads(json.dumps(summary.as_dict()))) == summary
    assert search_lines("q", [{"key": "a", "similarity": 0.5}]) == ["search 'q':", "  0.500  a"]


# --------------------------------------------------------------------------- DAG runs


TEST_DAGS = '''
"""DAGs of tests/test_airflow.py (written into the test DAGs folder)."""
import logging
import os

import pendulum
from airflow.sdk import DAG, Param, task

from qwen3_pipeline.airflow import LanceDBHook, Qwen3EmbeddingRefreshOperator, lancedb_asset
from qwen3_pipeline.core.errors import SourceUnavailableError

SOURCE = os.environ.get("QWEN3_TEST_SOURCE", "duckdb:/nowhere.duckdb::main.docs")
MODEL = os.environ.get("QWEN3_TEST_MODEL", "/nowhere")
START = pendulum.datetime(2024, 1, 1, tz="UTC")
COMMON = dict(key="id", template="{title}\\n\\n{body}", carry=["url"], model=MODEL, device="cpu")
VECTORS = lancedb_asset("docs", conn_id="lancedb_test")


class LockedSource:
    name = "locked"

    def schema(self):
        raise SourceUnavailableError("the DuckDB file is locked by a writer")


with DAG("qwen3_test_refresh", schedule=None, start_date=START) as qwen3_test_refresh:
    Qwen3EmbeddingRefreshOperator(
        task_id="refresh", source=SOURCE, table="docs", lancedb_conn_id="lancedb_test",
        retries=3, **COMMON,
    )

with DAG("qwen3_test_careless", schedule=None, start_date=START) as qwen3_test_careless:

    @task
    def careless():
        # What a careless task might log: the storage options and the connection itself.
        hook = LanceDBHook("lancedb_test")
        options = hook.destination().storage_options
        logging.getLogger("airflow.task").info("options: %s", options)
        logging.getLogger("airflow.task").info(
            "password: %s", hook.get_connection("lancedb_test").password
        )

    careless()

with DAG("qwen3_test_consumer", schedule=[VECTORS], start_date=START) as qwen3_test_consumer:

    @task
    def consume():
        return None

    consume()

# The refusals' and failed rows' settings, from DAG params (a trigger's conf sets them).
WAYS_OUT_PARAMS = {
    "allow_mass_delete": Param(False, type="boolean"),
    "accept_drift": Param(False, type="boolean"),
    "max_attempts": Param(5, type="integer", minimum=1),
    "retry_backoff_s": Param(300, type="number", minimum=0),
    "replay": Param(None, type=["null", "string", "array"]),
}
WAYS_OUT = {name: "{{ params.%s }}" % name for name in WAYS_OUT_PARAMS}
LANCE = os.environ.get("QWEN3_TEST_LANCE", "/nowhere")


def poisoned_embedder(spec):
    from qwen3_pipeline.testing import FakeEmbedder

    poison = os.environ.get("QWEN3_TEST_POISON", "")
    return FakeEmbedder(spec, fail_texts=poison.split("|") if poison else ())


with DAG("qwen3_test_ways_out", schedule=None, start_date=START,
         params=WAYS_OUT_PARAMS) as qwen3_test_ways_out:
    Qwen3EmbeddingRefreshOperator(
        task_id="refresh", source=SOURCE, table="docs", db_uri=LANCE, retries=3,
        retry_delay=0, **COMMON, **WAYS_OUT,
    )

with DAG("qwen3_test_poison", schedule=None, start_date=START,
         params=WAYS_OUT_PARAMS) as qwen3_test_poison:
    Qwen3EmbeddingRefreshOperator(
        task_id="refresh", source=SOURCE, table="docs", db_uri=LANCE, retries=3,
        retry_delay=0, embedder_factory=poisoned_embedder, **COMMON, **WAYS_OUT,
    )

with DAG("qwen3_test_retries", schedule=None, start_date=START) as qwen3_test_retries:
    Qwen3EmbeddingRefreshOperator(
        task_id="bad_input", source=SOURCE, table="dups", db_uri=os.environ.get(
            "QWEN3_TEST_LANCE", "/nowhere"), retries=3, retry_delay=0, **COMMON,
    )
    Qwen3EmbeddingRefreshOperator(
        task_id="transient", source=LockedSource(), table="locked", db_uri=os.environ.get(
            "QWEN3_TEST_LANCE", "/nowhere"), retries=1, retry_delay=0, **COMMON,
    )
'''


@pytest.fixture
def test_dag_env(
    tmp_path: Path, tiny_model_quick_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    monkeypatch.setenv("QWEN3_TEST_SOURCE", f"duckdb:{db}::main.docs")
    monkeypatch.setenv("QWEN3_TEST_MODEL", str(tiny_model_quick_dir))
    monkeypatch.setenv("QWEN3_TEST_LANCE", str(lance))
    connection = {
        "conn_type": "lancedb",
        "host": str(lance),
        "password": SECRET_PASSWORD,
        "extra": {
            "password_option": "aws_secret_access_key",
            "storage_options": {"azure_storage_account_key": SECRET_OPTION, "region": "eu-west-1"},
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_LANCEDB_TEST", json.dumps(connection))
    return {"db": db, "lance": lance}


def test_refresh_task_emits_the_table_asset_with_its_report_and_logs_no_secret(
    airflow_db: Path,
    test_dag_env: dict[str, Path],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.sdk._shared.secrets_masker import redact
    from airflow.utils.session import create_session
    from sqlalchemy import select

    _write_docs(test_dag_env["db"], DOCS)
    dags = _load_dags("qwen3_test_dags")
    assert redact(SECRET_OPTION) == SECRET_OPTION  # not known to Airflow's masker yet
    caplog.set_level("INFO")
    capfd.readouterr()
    run = dags.qwen3_test_refresh.test()
    output = capfd.readouterr()
    # dag.test() writes task logs to stdout or through the logging module (pytest's handler)
    logs = output.out + output.err + caplog.text

    assert str(run.state) == "success"
    report = airflow_demo.task_result(run, "refresh")
    assert report["inserted"] == 6
    assert report["table_uri"] == str(test_dag_env["lance"])
    assert "refreshed docs: 6 scanned, 6 inserted, 6 embedded" in logs  # the summary line
    with create_session() as session:
        asset = session.scalars(
            select(AssetModel).where(AssetModel.uri == "lancedb://lancedb_test/docs")
        ).one()
        events = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id)).all()
        assert [e.extra for e in events] == [report]
        assert events[0].source_task_id == "refresh"
        # A DAG scheduled on the table's Asset is queued to run.
        queued = session.scalars(
            select(AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id == asset.id)
        ).all()
        assert queued == ["qwen3_test_consumer"]
        rendered = session.scalars(
            select(RenderedTaskInstanceFields.rendered_fields).where(
                RenderedTaskInstanceFields.dag_id == "qwen3_test_refresh"
            )
        ).all()
    stored = json.dumps([report, rendered], default=str)
    for secret in (SECRET_PASSWORD, SECRET_OPTION):
        # The task never logs, returns or renders a credential...
        assert secret not in logs
        assert secret not in stored
        # ...and reading the connection registered each with the masker that Airflow's task
        # log writer applies to every line (the azure key only by the hook: Airflow's list
        # of sensitive names does not cover it).
        assert redact(f"key={secret}") == "key=***"

    # A task of one's own that logs the connection's secrets: its log lines are masked.
    capfd.readouterr()
    caplog.clear()
    careless = dags.qwen3_test_careless.test()
    output = capfd.readouterr()
    assert str(careless.state) == "success"
    lines = [redact(line) for line in (output.out + output.err + caplog.text).splitlines()]
    assert any("options:" in line and "***" in line for line in lines)
    assert not any(s in line for line in lines for s in (SECRET_PASSWORD, SECRET_OPTION))


def test_bad_input_task_fails_at_once_and_a_transient_failure_is_retried(
    airflow_db: Path, test_dag_env: dict[str, Path]
) -> None:
    _write_docs(test_dag_env["db"], [*DOCS, (3, "Again", "A duplicate key.", "u")])
    dags = _load_dags("qwen3_test_dags")
    run = dags.qwen3_test_retries.test()
    assert str(run.state) == "failed"
    tis = _task_instances(run)
    bad, transient = tis["bad_input"], tis["transient"]
    assert (str(bad.state), bad.try_number, bad.max_tries) == ("failed", 1, 3)
    assert (str(transient.state), transient.try_number) == ("failed", 2)


@pytest.mark.slow
def test_demo_dag_runs_twice_second_run_embeds_nothing_and_commits_nothing(
    airflow_db: Path,
    tmp_path: Path,
    tiny_model_quick_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_loads: list[str],
) -> None:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    data_dir = tmp_path / "data"
    monkeypatch.setenv("QWEN3_PIPELINE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QWEN3_PIPELINE_MODEL", str(tiny_model_quick_dir))
    monkeypatch.delenv("QWEN3_PIPELINE_DUCKDB_PATH", raising=False)
    lance = data_dir.resolve() / "lancedb"

    first = airflow_demo.run_demo(limit=120, query="read a file")
    # One load per shard task (each has rows to embed), one for the search's query encoder.
    assert len(model_loads) == 8 + 1
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    (documents,) = con.execute("SELECT count(*) FROM documents").fetchone()
    (pairs,) = con.execute("SELECT count(*) FROM near_duplicates").fetchone()
    con.close()
    version = lancedb.connect(str(lance)).open_table("documents").version
    assert first[1] == f"LanceDB table: {lance}/documents.lance (version {version})"
    assert first[2].startswith(
        f"rows: {documents} stored | this run: {documents} read, {documents} inserted, "
    )
    assert f"{documents} embedded" in first[2]
    assert first[3] == (
        f"search: exact | near-duplicate pairs: {pairs} in warehouse.main.near_duplicates"
    )
    assert first[4] == "search 'read a file':"
    assert len(first) == 5 + 5

    model_loads.clear()
    second = airflow_demo.run_demo(limit=120, query="read a file")
    assert model_loads == [str(tiny_model_quick_dir)]  # only the search's query encoder
    assert f"0 inserted, 0 updated, 0 deleted, {documents} unchanged, 0 embedded" in second[2]
    assert f"lance version {version} -> {version}" in second[2]
    assert lancedb.connect(str(lance)).open_table("documents").version == version

    with create_session() as session:
        asset = session.scalars(
            select(AssetModel).where(AssetModel.uri == f"lancedb:{lance}/documents")
        ).one()
        extras = [
            e.extra
            for e in session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id))
        ]
    assert len(extras) == 2 * 8  # one event per shard task and run
    assert sum(e["inserted"] for e in extras[:8]) == documents
    assert not any(e["committed"] for e in extras[8:])


def test_demo_settings_refuse_a_dag_that_names_another_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setenv("QWEN3_PIPELINE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("QWEN3_PIPELINE_MODEL", str(tiny_model_dir))
    settings = airflow_demo.demo_settings(
        lancedb_uri=str((tmp_path / "lancedb").resolve()), table="documents", shards=8
    )
    assert settings["model"] == str(tiny_model_dir)
    assert settings["source"] == f"duckdb:{tmp_path.resolve() / 'warehouse.duckdb'}::main.documents"
    with pytest.raises(ConfigError, match="QWEN3_PIPELINE_DATA_DIR"):
        airflow_demo.demo_settings(lancedb_uri="/elsewhere", table="documents", shards=8)


def test_operator_chunks_documents_when_asked(tmp_path: Path, tiny_model_dir: Path) -> None:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    long_docs = [
        (i, f"Doc {i}", "\n\n".join(f"Paragraph {j} of doc {i}. " * 6 for j in range(8)), f"u{i}")
        for i in range(1, 4)
    ]
    _write_docs(db, long_docs)
    chunked = {"tokens": 64, "splitter": "text"}
    fill, _ = _execute(_operator(db, lance, tiny_model_dir, chunking=chunked, dim=32))
    assert fill["chunked"] is True
    assert fill["inserted"] == 3
    assert fill["embedded_rows"] == fill["chunks_written"] > 3
    again, _ = _execute(_operator(db, lance, tiny_model_dir, chunking=chunked, dim=32))
    assert (again["unchanged"], again["embedded_rows"]) == (3, 0)
    with pytest.raises(ConfigError, match="chunking"):
        _operator(db, lance, tiny_model_dir, chunking="512")


def test_refusals_name_their_way_out_and_dag_params_let_them_through(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    _write_docs(db, DOCS)
    _execute(_operator(db, lance, tiny_model_dir))
    _write_docs(db, DOCS[:1])  # 5 of 6 rows gone: a mass delete

    with pytest.raises(AirflowFailException, match="would delete") as refused:
        _execute(_operator(db, lance, tiny_model_dir))
    assert isinstance(refused.value.__cause__, MassDeleteError)
    message = str(refused.value)
    assert "allow_mass_delete=True on the operator" in message
    assert '{"allow_mass_delete": true}' in message
    assert lancedb.connect(str(lance)).open_table("docs").count_rows() == len(DOCS)

    # What Jinja renders from `allow_mass_delete="{{ params.allow_mass_delete }}"` when the
    # DAG is triggered with config {"allow_mass_delete": true}.
    allowed, _ = _execute(_operator(db, lance, tiny_model_dir, allow_mass_delete="True"))
    assert allowed["deleted"] == len(DOCS) - 1
    op = _operator(db, lance, tiny_model_dir, accept_drift="false", drift_threshold="0.99",
                   reproject="False", max_delete_share="None")  # fmt: skip
    options = op.refresh_options()
    assert (options.accept_drift, options.drift_threshold, options.reproject) == (
        False,
        0.99,
        False,
    )
    assert options.max_delete_share == 0.5
    with pytest.raises(ConfigError, match="accept_drift must be true or false"):
        _operator(db, lance, tiny_model_dir, accept_drift="maybe").refresh_options()


# --------------------------------------------------------------------------- ways out, from conf

from tests.test_lifecycle import _perturb_weights  # noqa: E402  # one way to change weights


def _run_logged(
    dag: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, **conf: Any
) -> tuple[Any, str]:
    """``dag.test()`` triggered with ``conf``; the run and its logs."""
    capfd.readouterr()
    caplog.clear()
    run = dag.test(run_conf=conf or None)
    output = capfd.readouterr()
    return run, output.out + output.err + caplog.text


def _refused_at_once(run: Any) -> None:
    (ti,) = run.get_task_instances()
    # retries=3 on the task: a refusal is not retried.
    assert (str(run.state), str(ti.state), ti.try_number, ti.max_tries) == (
        "failed",
        "failed",
        1,
        3,
    )


def test_a_mass_delete_refused_by_a_run_is_let_through_by_a_trigger_config(
    airflow_db: Path,
    test_dag_env: dict[str, Path],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    _write_docs(test_dag_env["db"], DOCS)
    dags = _load_dags("qwen3_test_dags")
    fill, _ = _run_logged(dags.qwen3_test_ways_out, capfd, caplog)
    assert str(fill.state) == "success"
    version = lancedb.connect(str(test_dag_env["lance"])).open_table("docs").version

    _write_docs(test_dag_env["db"], DOCS[:1])  # 5 of 6 rows gone
    refused, logs = _run_logged(dags.qwen3_test_ways_out, capfd, caplog)
    _refused_at_once(refused)
    assert "would delete 5 of the 6 row(s)" in logs
    assert "allow_mass_delete=True on the operator" in logs
    assert '{"allow_mass_delete": true}' in logs
    assert airflow_demo.task_result(refused, "refresh") is None
    table = lancedb.connect(str(test_dag_env["lance"])).open_table("docs")
    assert (table.version, table.count_rows()) == (version, len(DOCS))

    allowed, _ = _run_logged(dags.qwen3_test_ways_out, capfd, caplog, allow_mass_delete=True)
    assert str(allowed.state) == "success"
    report = airflow_demo.task_result(allowed, "refresh")
    assert (report["deleted"], report["unchanged"]) == (len(DOCS) - 1, 1)
    assert lancedb.connect(str(test_dag_env["lance"])).open_table("docs").count_rows() == 1


def test_a_drift_refused_by_a_run_is_accepted_by_a_trigger_config(
    airflow_db: Path,
    test_dag_env: dict[str, Path],
    tiny_model_quick_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_quick_dir, model)
    monkeypatch.setenv("QWEN3_TEST_MODEL", str(model))
    _write_docs(test_dag_env["db"], DOCS)
    dags = _load_dags("qwen3_test_dags")
    fill, _ = _run_logged(dags.qwen3_test_ways_out, capfd, caplog)
    assert airflow_demo.task_result(fill, "refresh")["canaries_recorded"] > 0

    _perturb_weights(model)  # new weights under the same path: the same spec
    edited = [(1, "Open", "Open a file for reading or writing.", "u1"), *DOCS[1:]]
    _write_docs(test_dag_env["db"], edited)
    version = lancedb.connect(str(test_dag_env["lance"])).open_table("docs").version
    refused, logs = _run_logged(dags.qwen3_test_ways_out, capfd, caplog)
    _refused_at_once(refused)
    assert "no longer reproduces" in logs
    assert "accept_drift=True on the operator" in logs
    assert '{"accept_drift": true}' in logs
    assert lancedb.connect(str(test_dag_env["lance"])).open_table("docs").version == version

    accepted, _ = _run_logged(dags.qwen3_test_ways_out, capfd, caplog, accept_drift=True)
    assert str(accepted.state) == "success"
    report = airflow_demo.task_result(accepted, "refresh")
    assert (report["updated"], report["drift_accepted"]) == (1, True)
    assert report["canary_min_cosine"] < 0.999


def test_poison_rows_are_counted_quarantined_and_replayed_without_failing_the_task(
    airflow_db: Path,
    test_dag_env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qwen3_pipeline.store.failure_log import FailureLog

    caplog.set_level("INFO")
    poison = {3: "Sleep\n\nSuspend execution for the given number of seconds.",
              5: "Sort\n\nReturn a new sorted list from the items in iterable."}  # fmt: skip
    monkeypatch.setenv("QWEN3_TEST_POISON", "|".join(poison.values()))
    _write_docs(test_dag_env["db"], DOCS)
    dags = _load_dags("qwen3_test_dags")
    log = FailureLog.open(str(test_dag_env["lance"]), "docs")

    first, logs = _run_logged(dags.qwen3_test_poison, capfd, caplog, max_attempts=1)
    (ti,) = first.get_task_instances()
    assert (str(first.state), ti.try_number) == ("success", 1)
    report = airflow_demo.task_result(first, "refresh")
    assert (report["inserted"], report["failed"], report["quarantined"]) == (4, 2, 2)
    assert sorted(key for key, _ in report["failures"]) == ["3", "5"]
    assert "2 row(s) could not be embedded (3: fake failure; 5: fake failure)" in logs
    # The operator's own lines reach the task log (stdout here), not the logging module.
    (quarantined,) = [line for line in logs.splitlines() if "row(s) quarantined:" in line]
    assert "warning" in quarantined
    assert "replay='all' or a list of keys" in quarantined
    records = log.read()
    assert records["status"].to_pylist() == ["quarantined", "quarantined"]

    # Quarantined: left out (the model is not called), reported, the task succeeds.
    again, _ = _run_logged(dags.qwen3_test_poison, capfd, caplog, max_attempts=1)
    report = airflow_demo.task_result(again, "refresh")
    assert str(again.state) == "success"
    assert (report["failed"], report["quarantined"], report["embedded_rows"]) == (0, 2, 0)

    # The model is fixed: replay one key (from a list param), then all.
    monkeypatch.delenv("QWEN3_TEST_POISON")
    one, logs = _run_logged(dags.qwen3_test_poison, capfd, caplog, replay=["3"])
    report = airflow_demo.task_result(one, "refresh")
    assert (report["retried"], report["inserted"], report["quarantined"]) == (1, 1, 1)
    assert "replay: 1 failure record(s) of table 'docs' made due" in logs
    assert log.read()["doc_key"].to_pylist() == ["5"]
    rest, _ = _run_logged(dags.qwen3_test_poison, capfd, caplog, replay="all")
    report = airflow_demo.task_result(rest, "refresh")
    assert (report["retried"], report["inserted"], report["quarantined"]) == (1, 1, 0)
    assert log.read().num_rows == 0
    assert lancedb.connect(str(test_dag_env["lance"])).open_table("docs").count_rows() == 6


def test_failed_row_settings_come_from_params_and_bad_values_fail_without_retry(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from qwen3_pipeline.airflow.operators import _replay_selection

    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    _write_docs(db, DOCS)
    # What Jinja renders from "{{ params.max_attempts }}" and friends.
    options = _operator(db, lance, tiny_model_dir, max_attempts="3",
                        retry_backoff_s="60").refresh_options()  # fmt: skip
    assert (options.max_attempts, options.retry_backoff_s) == (3, 60.0)
    unset = _operator(db, lance, tiny_model_dir, max_attempts="None", retry_backoff_s="")
    assert (unset.refresh_options().max_attempts, unset.refresh_options().retry_backoff_s) == (
        5,
        300.0,
    )
    assert _replay_selection("all") == "all"
    assert _replay_selection("['3', '7']") == _replay_selection('["3", 7]') == ("3", "7")
    assert _replay_selection(" 3, 7,3 ") == ("3", "7")
    assert _replay_selection(["3"]) == ("3",)
    assert _replay_selection("None") is None
    assert _replay_selection("[]") is None
    for bad, match in (
        ({"max_attempts": "0"}, "max_attempts must be a positive integer"),
        ({"max_attempts": "two"}, "max_attempts must be an integer"),
        ({"max_attempts": 1.5}, "max_attempts must be an integer"),
        ({"retry_backoff_s": "-1"}, "retry_backoff_s must be seconds"),
        ({"retry_backoff_s": "soon"}, "retry_backoff_s must be a number"),
        ({"replay": "[1.5]"}, "replay must be 'all', a list of keys"),
        ({"replay": "[3"}, "replay must be 'all', a list of keys"),
        ({"replay": {"3": 1}}, "replay must be 'all', a list of keys"),
    ):
        with pytest.raises(AirflowFailException, match=match) as failed:
            _execute(_operator(db, lance, tiny_model_dir, **bad))
        assert isinstance(failed.value.__cause__, ConfigError)
    assert not lance.exists() or not list_table_names(lancedb.connect(str(lance)))


def test_the_watermark_is_an_operator_setting_from_params(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from qwen3_pipeline.core.errors import ConfigError

    db, lance = tmp_path / "src.duckdb", tmp_path / "lancedb"
    # What Jinja renders from "{{ params.watermark }}" and friends.
    config = _operator(db, lance, tiny_model_dir, watermark="True", watermark_lag_s="60",
                       key_scan="4").source_config()  # fmt: skip
    assert config.watermark is not None
    assert (config.watermark.lag_s, config.watermark.key_scan) == (60.0, 4)
    assert _operator(db, lance, tiny_model_dir, watermark="False").source_config().watermark is None
    with pytest.raises(ConfigError, match="key_scan"):
        _operator(db, lance, tiny_model_dir, watermark=True, key_scan="sometimes").source_config()
