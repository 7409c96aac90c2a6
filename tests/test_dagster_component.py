"""Qwen3EmbeddingComponent: its YAML schema, errors that name the key, what it builds, and dg.

The component is a shell over ``build_embedding_asset``: the unit tests compare what both build
and check each error names its YAML key; the ``dg`` test scaffolds a throwaway project with
the real ``dg`` CLI (a subprocess, offline), checks it, checks a YAML with a bad key, then
loads the project's definitions and materialises the asset on the shipped fake embedder.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from jsonschema import Draft202012Validator

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.component import ComponentSource, Qwen3EmbeddingComponent
from qwen3_pipeline.dagster.embedding_asset import HashShards, build_embedding_asset
from qwen3_pipeline.dagster.resources import FakeEmbedderResource, LanceDBResource

TYPE_NAME = "qwen3_pipeline.dagster.component.Qwen3EmbeddingComponent"
DG = Path(sys.executable).with_name("dg")


def attributes(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "source": {"parquet": {"path": str(tmp_path / "documents.parquet")}},
        "key": "id",
        "text": ["text"],
        "carry": ["title"],
        "table": "documents",
        "database": str(tmp_path / "lancedb"),
        "dim": 64,
        "shards": 4,
        "engine": "fake",
    }
    return {**base, **changes}


def load(attrs: dict[str, Any]) -> Qwen3EmbeddingComponent:
    component = Qwen3EmbeddingComponent.from_attributes_dict(attributes=attrs)
    assert isinstance(component, Qwen3EmbeddingComponent)
    return component


def build(component: Qwen3EmbeddingComponent) -> dg.Definitions:
    return dg.component_defs(component=component)


def write_documents(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"doc-{i}" for i in range(count)],
                "title": [f"title {i}" for i in range(count)],
                "text": [f"document {i} says something about topic {i % 3}" for i in range(count)],
            }
        ),
        path,
    )


PROJECT_TOML = """\
[project]
name = "{name}"
version = "0.1.0"
requires-python = ">=3.11"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "{name}"

[tool.dg.cli.telemetry]
enabled = false
"""

DEFINITIONS_PY = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def make_project(root: Path, name: str) -> Path:
    """A minimal `dg` project whose package sits at its root (importable from there)."""
    package = root / name
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PROJECT_TOML.format(name=name))
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS_PY)
    return package


def run_dg(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(project / ".dagster_home"), "NO_COLOR": "1"}
    (project / ".dagster_home").mkdir(exist_ok=True)
    return subprocess.run(
        [str(DG), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


# --------------------------------------------------------------------------- what it builds


def test_the_package_registers_the_component_for_dg() -> None:
    (entry,) = [
        ep
        for ep in importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
        if ep.name == "qwen3_pipeline"
    ]
    module = entry.load()  # dg lists the components of the module the entry point names
    assert module.Qwen3EmbeddingComponent is Qwen3EmbeddingComponent
    assert issubclass(Qwen3EmbeddingComponent, dg.Component)


def test_it_builds_what_build_embedding_asset_builds(tmp_path: Path) -> None:
    defs = build(load(attributes(tmp_path)))
    asset = defs.get_assets_def("documents")
    twin = build_embedding_asset(
        key="documents",
        source=load(attributes(tmp_path)).source.open,
        source_config=load(attributes(tmp_path)).source_config(),
        spec=FakeEmbedderResource(dim=64),
        table="documents",
        partitioning=HashShards(4),
    )
    assert {spec.name for spec in asset.check_specs} == {spec.name for spec in twin.check_specs}
    assert asset.partitions_def == twin.partitions_def
    assert asset.code_versions_by_key == twin.code_versions_by_key
    assert asset.required_resource_keys == twin.required_resource_keys
    assert {"embedder", "lancedb"} <= twin.required_resource_keys
    assert asset.backfill_policy == twin.backfill_policy
    assert asset.op.pool == twin.op.pool == "gpu"
    assert asset.specs_by_key[asset.key].metadata == twin.specs_by_key[twin.key].metadata
    resources = defs.resources or {}
    assert isinstance(resources["embedder"], FakeEmbedderResource)
    assert resources["lancedb"] == LanceDBResource(uri=str(tmp_path / "lancedb"))


def test_optional_settings_reach_the_asset(tmp_path: Path) -> None:
    component = load(
        attributes(
            tmp_path,
            source={
                "dbt": {"model": "documents", "duckdb": str(tmp_path / "wh.duckdb")},
            },
            asset_key="vectors/documents",
            deps=["corpus"],
            group_name="embeddings",
            shards=None,
            template="{title}\n\n{text}\n",
            text=None,
            chunking={"tokens": 64, "overlap": 8},
            schedule={"cron": "0 3 * * *"},
            automation_condition="{{ dg.AutomationCondition.eager() }}",
        )
    )
    # A str.format template is passed through untouched (Jinja would drop the last newline).
    assert component.template == "{title}\n\n{text}\n"
    assert component.source == ComponentSource(
        kind="dbt",
        path=tmp_path / "wh.duckdb",
        relation="main.documents",
        upstream=dg.AssetKey("documents"),
    )
    defs = build(component)
    key = dg.AssetKey(["vectors", "documents"])
    asset = defs.get_assets_def(key)
    assert asset.partitions_def is None
    assert asset.group_names_by_key[key] == "embeddings"
    assert set(asset.asset_deps[key]) == {dg.AssetKey("documents"), dg.AssetKey("corpus")}
    assert asset.automation_conditions_by_key[key] is not None
    assert "chunks_consistent" in {spec.name for spec in asset.check_specs}
    (schedule,) = defs.schedules or ()
    assert isinstance(schedule, dg.ScheduleDefinition)
    assert schedule.name == "vectors__documents_schedule"
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_paths_in_a_defs_yaml_are_relative_to_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = make_project(tmp_path, "qwen3_relative_paths_project")
    folder = package / "defs" / "vectors"
    folder.mkdir()
    (folder / "defs.yaml").write_text(
        yaml.safe_dump(
            {
                "type": TYPE_NAME,
                "attributes": attributes(
                    tmp_path,
                    source={"duckdb": {"path": "warehouse.duckdb", "query": "SELECT 1 AS id"}},
                    database="lancedb",
                ),
            }
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tree = dg.ComponentTree.for_project(package)
    component = tree.load_component("vectors", Qwen3EmbeddingComponent)
    assert component.source.path == folder / "warehouse.duckdb"
    assert component.source.relation == "SELECT 1 AS id"
    assert component.database == str(folder / "lancedb")
    uri = load(attributes(tmp_path, database="s3://bucket/vectors")).database
    assert uri == "s3://bucket/vectors"


def test_a_text_column_given_as_a_string_is_one_column(tmp_path: Path) -> None:
    assert load(attributes(tmp_path, text="text")).source_config().text_columns == ("text",)


def test_equal_settings_share_one_resource_object(tmp_path: Path) -> None:
    first = build(load(attributes(tmp_path, table="documents")))
    second = build(load(attributes(tmp_path, table="chunks")))
    merged = dg.Definitions.merge(first, second)  # one object per resource key, or it raises
    assert (merged.resources or {})["embedder"] is (first.resources or {})["embedder"]
    other = build(load(attributes(tmp_path, table="others", dim=32)))
    with pytest.raises(dg.DagsterInvariantViolationError, match="'embedder'"):
        dg.Definitions.merge(first, other)
    keyed = build(load(attributes(tmp_path, table="others", dim=32, embedder_key="small")))
    dg.Definitions.merge(first, keyed)


def test_the_source_opens_at_run_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    component = load(
        attributes(tmp_path, source={"postgres": {"url_env": "DOCS_URL", "table": "docs"}})
    )
    build(component)  # loading needs neither the variable nor the database
    monkeypatch.delenv("DOCS_URL", raising=False)
    with pytest.raises(ConfigError, match="environment variable DOCS_URL is not set"):
        component.source.open()
    with pytest.raises(ConfigError, match="does not exist"):
        load(attributes(tmp_path)).source.open()


# --------------------------------------------------------------------------- errors name the key


def schema_errors(attrs: dict[str, Any]) -> list[str]:
    """What `dg check defs` reports, from the component's JSON schema."""
    schema = Qwen3EmbeddingComponent.get_model_cls().model_json_schema()
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in Draft202012Validator(schema).iter_errors(attrs)
    ]


def test_the_schema_names_a_bad_key_even_inside_a_block(tmp_path: Path) -> None:
    assert schema_errors(attributes(tmp_path)) == []
    bad = attributes(
        tmp_path,
        source={"parquet": {"pth": "x.parquet"}},
        chunking={"tokens": 64, "overlapp": 8},
        shard=4,
    )
    errors = schema_errors(bad)
    assert any(e.startswith(": ") and "'shard' was unexpected" in e for e in errors), errors
    assert any(e.startswith("source.parquet: ") and "'pth' was unexpected" in e for e in errors)
    assert any(e.startswith("chunking: ") and "'overlapp' was unexpected" in e for e in errors)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tabel": "x"}, "tabel"),
        ({"engine": "gpu"}, "engine must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"dim": "wide"}, "dim must be an integer"),
        ({"workers": 2}, "workers=2 .* need engine: ray"),
        ({"table": "../escape"}, "table name '../escape' is not allowed"),
        ({"template": "{title}"}, "give exactly one of text .* and template"),
        ({"text": None}, "give exactly one of text .* and template"),
        ({"carry": ["title", "title"]}, "carry lists column"),
        ({"chunking": {"tokens": 4}}, "chunking tokens=4"),
        ({"source": {}}, "source: give exactly one of duckdb, parquet, postgres, dbt; got none"),
        (
            {"source": {"duckdb": {"path": "w.duckdb", "table": "t", "query": "SELECT 1"}}},
            "source.duckdb: give exactly one of table and query",
        ),
        (
            {"source": {"parquet": {"path": "a"}, "dbt": {"model": "m", "duckdb": "w"}}},
            "got parquet, dbt",
        ),
    ],
)
def test_a_bad_value_fails_the_load_naming_its_key(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=message):
        load(attributes(tmp_path, **changes))


# --------------------------------------------------------------------------- dg, end to end


@pytest.mark.slow
def test_dg_scaffolds_checks_loads_and_materialises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "qwen3_component_project"
    package = make_project(tmp_path, name)

    scaffold = run_dg(
        tmp_path, "scaffold", "defs", TYPE_NAME, "document_vectors", "--source", "parquet",
        "--engine", "fake",
    )  # fmt: skip
    assert scaffold.returncode == 0, scaffold.stdout + scaffold.stderr
    defs_yaml = package / "defs" / "document_vectors" / "defs.yaml"
    scaffolded = yaml.safe_load(defs_yaml.read_text())
    assert scaffolded["type"] == TYPE_NAME
    assert scaffolded["attributes"]["table"] == "document_vectors"
    assert scaffolded["attributes"]["source"] == {
        "parquet": {"path": "{{ context.project_root }}/data/documents.parquet"}
    }

    checked = run_dg(tmp_path, "check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    # Loaded and materialised as scaffolded: every shard in one run, on the fake embedder.
    write_documents(tmp_path / "data" / "documents.parquet", 24)
    monkeypatch.syspath_prepend(str(tmp_path))
    defs = dg.load_from_defs_folder(path_within_project=package)
    asset = defs.get_assets_def("document_vectors")
    assert asset.partitions_def is not None
    result = dg.materialize(
        [asset],
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
        tags=all_partitions_tags(asset.partitions_def),
    )
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    lancedb = (defs.resources or {})["lancedb"]
    assert lancedb.open_table("document_vectors").count_rows() == 24

    # A misspelt key, inside a block: the check names it and its line, and fails.
    defs_yaml.write_text(
        defs_yaml.read_text().replace("      path:", "      pth:").replace("shards:", "shard:")
    )
    bad = run_dg(tmp_path, "check", "defs")
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0, output
    assert "attributes.source.parquet.pth Additional properties are not allowed" in output
    assert "('pth' was unexpected)" in output
    assert "attributes.shard Additional properties are not allowed" in output
