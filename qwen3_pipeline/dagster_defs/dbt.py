"""The demo warehouse as Dagster assets: the raw corpus in DuckDB and the dbt models above it.

``raw_docstrings`` loads the standard-library docstring corpus into DuckDB; the dbt project in
``dbt_models/`` stages it and renders the ``documents`` table that the embedding asset reads.
The raw asset takes the asset key of the dbt source (``raw.raw_docstrings``, whose dbt
``meta.dagster.asset_key`` is ``["raw_docstrings"]``), so the lineage raw -> stg -> documents
is one graph.

Where the DuckDB file lives (read when an asset runs, not at import):

- ``QWEN3_PIPELINE_DUCKDB_PATH``: the database file itself, if set; otherwise
- ``<QWEN3_PIPELINE_DATA_DIR>/warehouse.duckdb``, the data directory defaulting to ``./data``.

The path is made absolute against the Dagster process's working directory and handed to dbt
as the ``duckdb_path`` var, because dbt runs with the dbt project as its working directory.

The dbt manifest (``dbt_models/target/manifest.json``) is needed to define the dbt assets.
It is rebuilt on import when it is missing or older than a file of the dbt project (so model
edits are picked up, under ``dagster dev`` or not, while the code server and every run worker
of an unchanged project skip the ~10 s parse). When building a deployment, build it ahead with
``dbt parse --project-dir dbt_models --profiles-dir dbt_models`` (from the repository root) or
:func:`prepare_dbt_manifest`.

Example:
    >>> import dagster as dg
    >>> from qwen3_pipeline.dagster_defs.dbt import (
    ...     dbt_cli_resource,
    ...     dbt_models_assets,
    ...     raw_docstrings,
    ... )
    >>> defs = dg.Definitions(
    ...     assets=[raw_docstrings, dbt_models_assets],
    ...     resources={"dbt": dbt_cli_resource()},
    ... )
"""

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DbtCliResource,
    DbtProject,
    dbt_assets,
    get_asset_key_for_model,
    get_asset_key_for_source,
)
from pydantic import Field

from qwen3_pipeline.corpus import CORPUS_SCHEMA, DEFAULT_TABLE, load_corpus_into_duckdb

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "QWEN3_PIPELINE_DATA_DIR"
DUCKDB_PATH_ENV = "QWEN3_PIPELINE_DUCKDB_PATH"
DBT_PROJECT_DIR_ENV = "QWEN3_PIPELINE_DBT_PROJECT_DIR"
DEFAULT_DATA_DIR = "data"
WAREHOUSE_FILENAME = "warehouse.duckdb"
# Names inside dbt_models/: the source that raw_docstrings feeds and the model to embed.
DBT_SOURCE_NAME = "raw"
DOCUMENTS_MODEL = "documents"


def duckdb_warehouse_path() -> Path:
    """Return the absolute path of the DuckDB warehouse file, from the environment.

    Returns:
        ``$QWEN3_PIPELINE_DUCKDB_PATH`` if set, else
        ``$QWEN3_PIPELINE_DATA_DIR/warehouse.duckdb`` (data directory default ``./data``),
        resolved against the current working directory.
    """
    explicit = os.environ.get(DUCKDB_PATH_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return (Path(data_dir).expanduser() / WAREHOUSE_FILENAME).resolve()


def dbt_project_dir() -> Path:
    """Return the directory of the dbt project.

    Returns:
        ``$QWEN3_PIPELINE_DBT_PROJECT_DIR`` if set, else ``dbt_models/`` at the repository root
        (two levels above this package), which is where a source checkout keeps it.
    """
    explicit = os.environ.get(DBT_PROJECT_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "dbt_models"


def dbt_executable() -> str:
    """Return the dbt executable to run: the one installed beside this Python, else ``dbt``.

    A virtual environment's ``bin/`` is often not on ``PATH`` (a service, an IDE, ``.venv/bin/
    python -m pytest``), while dbt-core is installed in it as a dependency of this package.
    """
    beside_python = Path(sys.executable).with_name("dbt")
    return str(beside_python) if beside_python.is_file() else "dbt"


dbt_project = DbtProject(project_dir=dbt_project_dir())


def dbt_cli_resource() -> DbtCliResource:
    """Return the ``dbt`` resource for :data:`dbt_models_assets`, bound to :data:`dbt_project`."""
    return DbtCliResource(project_dir=dbt_project, dbt_executable=dbt_executable())


def prepare_dbt_manifest() -> Path:
    """Parse the dbt project and write ``target/manifest.json``, replacing the old one atomically.

    The same as ``dbt parse --project-dir dbt_models --profiles-dir dbt_models`` (which is what
    :meth:`DbtProject.prepare_if_dev` runs), except that it uses :func:`dbt_executable` and
    parses into a scratch directory first, so a process loading the manifest concurrently never
    reads a half-written file.

    Returns:
        The path of the manifest.
    """
    target = dbt_project.project_dir / dbt_project.target_path
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".parse-", dir=target) as scratch:
        dbt_cli_resource().cli(["parse", "--quiet"], target_path=Path(scratch)).wait()
        # The manifest last: its presence is what says the preparation is complete.
        for name in ("partial_parse.msgpack", "manifest.json"):
            os.replace(Path(scratch, name), target / name)
    return dbt_project.manifest_path


_NOT_PROJECT_FILES = frozenset({"target", "logs", "dbt_packages"})


def manifest_is_current() -> bool:
    """Whether the manifest exists and is newer than every file of the dbt project."""
    manifest = dbt_project.manifest_path
    if not manifest.is_file():
        return False
    built = manifest.stat().st_mtime
    root = dbt_project.project_dir
    for path in root.rglob("*"):
        if path.relative_to(root).parts[0] in _NOT_PROJECT_FILES or not path.is_file():
            continue
        if path.stat().st_mtime > built:
            return False
    return True


# DbtProject.prepare_if_dev() reparses on every load under `dagster dev` (the code server and
# every run worker, ~10 s each); reparsing only when the project changed picks up model edits
# just the same. The first load of a fresh checkout builds the manifest, which dagster-dbt would
# otherwise refuse as missing. The dbt used is the one beside this Python, not the first on PATH.
if not manifest_is_current():
    logger.info("preparing dbt manifest %s", dbt_project.manifest_path)
    prepare_dbt_manifest()


@dbt_assets(manifest=dbt_project.manifest_path, project=dbt_project)
def dbt_models_assets(context: dg.AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
    """Build the dbt models and run their tests (``dbt build``) on the DuckDB warehouse."""
    dbt_vars = json.dumps({"duckdb_path": str(duckdb_warehouse_path())})
    yield from dbt.cli(["build", "--vars", dbt_vars], context=context).stream()


def documents_asset_key() -> dg.AssetKey:
    """Return the asset key of the dbt model ``documents``, the table of texts to embed."""
    return get_asset_key_for_model([dbt_models_assets], DOCUMENTS_MODEL)


class CorpusConfig(dg.Config):
    """Run configuration of :data:`raw_docstrings`."""

    limit: int | None = Field(
        default=None,
        ge=0,
        description="Load a seeded sample of this many docstrings; null loads all of them.",
    )
    seed: int = Field(default=0, description="Seed of the sample drawn when limit is set.")


@dg.asset(
    key=get_asset_key_for_source([dbt_models_assets], DBT_SOURCE_NAME),
    group_name="corpus",
    kinds={"python", "duckdb"},
    description=(
        "Docstrings of the Python standard library (parsed, not imported), loaded into the "
        "DuckDB warehouse; rows whose content is unchanged keep their updated_at."
    ),
)
def raw_docstrings(context: dg.AssetExecutionContext, config: CorpusConfig) -> dg.MaterializeResult:
    """Load the standard-library docstring corpus into the DuckDB warehouse."""
    path = duckdb_warehouse_path()
    rows = load_corpus_into_duckdb(path, table=DEFAULT_TABLE, limit=config.limit, seed=config.seed)
    context.log.info(f"loaded {rows} docstrings into {path}")
    return dg.MaterializeResult(
        metadata={
            # The standard table keys (dagster's TableMetadataSet, which 1.13 does not export).
            "dagster/row_count": rows,
            "dagster/table_name": f"{path.stem}.main.{DEFAULT_TABLE}",
            "dagster/column_schema": _corpus_table_schema(),
            "duckdb_path": dg.MetadataValue.path(str(path)),
        }
    )


def _corpus_table_schema() -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name, "varchar") for name in CORPUS_SCHEMA.names]
        + [dg.TableColumn("updated_at", "timestamp")]
    )
