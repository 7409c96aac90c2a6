"""The demo warehouse as Dagster assets: the raw corpus in DuckDB and the dbt models above it.

``raw_docstrings`` loads the standard-library docstring corpus into DuckDB; the dbt project in
``dbt_models/`` stages it and renders the ``documents`` table that the embedding asset reads.
The raw asset's key is the one the dbt source ``raw.raw_docstrings`` declares (its
``meta.dagster.asset_key``, checked when the dbt assets are defined), so the lineage
raw -> stg -> documents is one graph.

Where the DuckDB file lives (read when an asset runs, not at import):

- ``QWEN3_PIPELINE_DUCKDB_PATH``: the database file itself, if set; otherwise
- ``<QWEN3_PIPELINE_DATA_DIR>/warehouse.duckdb``, the data directory defaulting to ``./data``.

The path is made absolute against the Dagster process's working directory and handed to dbt
as the ``duckdb_path`` var, because dbt runs with the dbt project as its working directory.

The dbt project ships inside the package (``qwen3_pipeline/resources/dbt_project``, in a source
checkout a link to ``dbt_models/`` at the repository root); ``QWEN3_PIPELINE_DBT_PROJECT_DIR``
points at another copy. Everything dbt writes goes under the data directory, never into the
project: the manifest (``<data_dir>/dbt/target/manifest.json``) and the artifacts and log of the
latest dbt run (``<data_dir>/dbt/target/last_run/``; each run works in a scratch directory of its
own, which replaces that one when the run ends, so runs leave nothing else behind).

The paths a dbt run uses (project, profiles, executable, artifacts, warehouse) are found when it
starts, on the machine that runs it: the ``dbt`` resource (:class:`WarehouseDbtCliResource`) has
no path fields, so the Dagster launchpad shows no path of the machine that loaded the code
location. The raw table and the dbt models form the
``warehouse`` asset group, and the dbt tests of the source ``raw.raw_docstrings`` are asset
checks of ``raw_docstrings``.

The dbt assets are defined from that manifest, and importing this module (or the code location)
neither builds it nor writes anything: prepare it once per data directory, and again after the
dbt project changes, with ``python -m qwen3_pipeline.demo.dbt`` (``make setup`` and the
demo do it too). Loading the dbt assets without a current manifest raises
:class:`DbtManifestNotPreparedError` naming that command, except under ``dagster dev``, where
the manifest is prepared on load when it is missing or older than a file of the dbt project
(dagster-dbt's ``prepare_if_dev`` convention, so model edits show up on reload).

Example:
    >>> import dagster as dg
    >>> from qwen3_pipeline.demo.dbt import (
    ...     dbt_cli_resource,
    ...     load_dbt_models_assets,
    ...     raw_docstrings,
    ... )
    >>> defs = dg.Definitions(  # doctest: +SKIP
    ...     assets=[raw_docstrings, load_dbt_models_assets()],
    ...     resources={"dbt": dbt_cli_resource()},
    ... )
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
    get_asset_key_for_model,
    get_asset_key_for_source,
)
from pydantic import Field

from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError
from qwen3_pipeline.demo.corpus import CORPUS_SCHEMA, DEFAULT_TABLE, load_corpus_into_duckdb

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "QWEN3_PIPELINE_DATA_DIR"
DUCKDB_PATH_ENV = "QWEN3_PIPELINE_DUCKDB_PATH"
DBT_PROJECT_DIR_ENV = "QWEN3_PIPELINE_DBT_PROJECT_DIR"
DEFAULT_DATA_DIR = "data"
WAREHOUSE_FILENAME = "warehouse.duckdb"
# Where dbt writes (manifest, run artifacts, logs), relative to the data directory.
DBT_TARGET_SUBDIR = Path("dbt", "target")
# Inside the target directory: the artifacts and log of the latest dbt run.
LAST_RUN_DIR = "last_run"
# The asset group of the warehouse tables: raw_docstrings and the dbt models above it.
WAREHOUSE_GROUP = "warehouse"
PREPARE_COMMAND = "python -m qwen3_pipeline.demo.dbt"
# The dbt project inside the package; setuptools copies the files behind this link into wheels.
PACKAGED_DBT_PROJECT = Path(__file__).resolve().parents[1] / "resources" / "dbt_project"
# Names inside the dbt project: the source that raw_docstrings feeds and the model to embed.
DBT_SOURCE_NAME = "raw"
DOCUMENTS_MODEL = "documents"
LONG_DOCUMENTS_MODEL = "long_documents"
RAW_DOCSTRINGS_KEY = dg.AssetKey(["raw_docstrings"])


class DbtManifestNotPreparedError(Qwen3PipelineError):
    """The dbt manifest is missing or older than the dbt project: prepare it, then reload."""


def _data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


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
    return (_data_dir() / WAREHOUSE_FILENAME).resolve()


def dbt_target_dir() -> Path:
    """Return the absolute directory that dbt writes to: ``<data_dir>/dbt/target``.

    Returns:
        ``$QWEN3_PIPELINE_DATA_DIR/dbt/target`` (data directory default ``./data``), resolved
        against the current working directory.
    """
    return (_data_dir() / DBT_TARGET_SUBDIR).resolve()


def dbt_project_dir() -> Path:
    """Return the directory of the dbt project.

    Returns:
        ``$QWEN3_PIPELINE_DBT_PROJECT_DIR`` if set, else the project shipped in the package
        (in a source checkout, ``dbt_models/`` at the repository root).
    """
    explicit = os.environ.get(DBT_PROJECT_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return PACKAGED_DBT_PROJECT.resolve()


def dbt_executable() -> str:
    """Return the dbt executable to run: the one installed beside this Python, else ``dbt``.

    A virtual environment's ``bin/`` is often not on ``PATH`` (a service, an IDE, ``.venv/bin/
    python -m pytest``), while dbt-core is installed in it as a dependency of this package.
    """
    beside_python = Path(sys.executable).with_name("dbt")
    return str(beside_python) if beside_python.is_file() else "dbt"


# Reads dbt_project.yml and writes nothing. The data directory is the one set at import.
dbt_project = DbtProject(project_dir=dbt_project_dir(), target_path=dbt_target_dir())


def resolve_dbt_cli() -> DbtCliResource:
    """Return a dbt CLI for the dbt project and executable of this process's environment.

    Returns:
        A :class:`DbtCliResource` on :func:`dbt_project_dir`, whose ``profiles.yml`` it uses,
        running :func:`dbt_executable`: absolute paths of this machine.
    """
    project_dir = dbt_project_dir()
    return DbtCliResource(
        project_dir=project_dir, profiles_dir=project_dir, dbt_executable=dbt_executable()
    )


class WarehouseDbtCliResource(dg.ConfigurableResource[DbtCliResource]):
    """The ``dbt`` resource of :data:`dbt_models_assets`: a dbt CLI found when a run starts.

    A :class:`DbtCliResource` bound in the definitions would carry the absolute project,
    profiles and executable paths of the machine that loaded the code location as its config,
    which the launchpad pre-fills into every run's config. This resource has no config: it
    hands the assets :func:`resolve_dbt_cli`'s resource, built in the process that runs them.
    """

    def create_resource(self, context: dg.InitResourceContext) -> DbtCliResource:
        """Build the dbt CLI for this run (see :func:`resolve_dbt_cli`).

        Args:
            context: The resource's init context (unused).

        Returns:
            The dbt CLI resource that the dbt assets receive as ``dbt``.
        """
        return resolve_dbt_cli()


def dbt_cli_resource() -> WarehouseDbtCliResource:
    """Return the ``dbt`` resource to bind for :data:`dbt_models_assets`."""
    return WarehouseDbtCliResource()


class WarehouseDbtTranslator(DagsterDbtTranslator):
    """How the dbt project appears in Dagster: groups and asset checks.

    - dbt nodes without a dbt ``group`` are in :data:`WAREHOUSE_GROUP`, beside
      :data:`raw_docstrings` (dagster-dbt's default leaves them in ``default``);
    - the tests of dbt sources are asset checks of the source's asset (``raw_docstrings``), run
      by ``dbt build`` in the dbt step. Without that setting dagster-dbt defines no check for
      them but dbt still runs them, and each run logged "Logging an `AssetObservation` instead of
      an `AssetCheckResult`" for each of them.
    """

    def __init__(self) -> None:
        """Create the translator with source tests loaded as asset checks."""
        super().__init__(DagsterDbtTranslatorSettings(enable_source_tests_as_checks=True))

    def get_asset_spec(
        self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None
    ) -> dg.AssetSpec:
        """Return dagster-dbt's spec of a dbt node, in :data:`WAREHOUSE_GROUP` unless dbt names one.

        Args:
            manifest: The parsed dbt manifest.
            unique_id: The dbt node's unique id.
            project: The dbt project.

        Returns:
            The node's asset spec.
        """
        spec = super().get_asset_spec(manifest, unique_id, project)
        if spec.group_name is None:
            return spec.replace_attributes(group_name=WAREHOUSE_GROUP)
        return spec


def prepare_dbt_manifest() -> Path:
    """Parse the dbt project and write the manifest, replacing the old one atomically.

    The same as ``dbt parse`` with the target path in the data directory (what
    :meth:`DbtProject.prepare_if_dev` runs), except that it uses :func:`dbt_executable` and
    parses into a scratch directory first, so a process loading the manifest concurrently never
    reads a half-written file.

    Returns:
        The path of the manifest, ``<data_dir>/dbt/target/manifest.json``.
    """
    target = dbt_project.target_path
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".parse-", dir=target) as scratch:
        resolve_dbt_cli().cli(["parse", "--quiet"], target_path=Path(scratch)).wait()
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


def ensure_dbt_manifest() -> Path:
    """Prepare the dbt manifest unless it is current (see :func:`manifest_is_current`).

    Returns:
        The path of the manifest.
    """
    if not manifest_is_current():
        logger.info("preparing dbt manifest %s", dbt_project.manifest_path)
        prepare_dbt_manifest()
    return dbt_project.manifest_path


@functools.cache
def load_dbt_models_assets() -> dg.AssetsDefinition:
    """Return the dbt models as Dagster assets, defined from the prepared manifest.

    Defined on first call, once per process; :data:`dbt_models_assets` is the same object.

    Raises:
        DbtManifestNotPreparedError: The manifest is missing or older than the dbt project
            (outside ``dagster dev``, which prepares it instead).
        ConfigError: The dbt source fed by :data:`raw_docstrings` declares another asset key.
    """
    if not manifest_is_current():
        if not dbt_project.preparer.using_dagster_dev():
            raise DbtManifestNotPreparedError(
                f"the dbt manifest {dbt_project.manifest_path} is missing or older than the dbt "
                f"project {dbt_project.project_dir}; prepare it with `{PREPARE_COMMAND}` "
                f"(same {DATA_DIR_ENV}), then load the definitions again"
            )
        # dagster dev reloads the code location after model edits. Reparsing only when the
        # project changed (prepare_if_dev would parse on every load: the code server and every
        # run worker, ~10 s each) picks those edits up just the same.
        ensure_dbt_manifest()
    assets = _define_dbt_models_assets(dbt_project.manifest_path)
    source_key = get_asset_key_for_source([assets], DBT_SOURCE_NAME)
    if source_key != RAW_DOCSTRINGS_KEY:
        raise ConfigError(
            f"dbt source {DBT_SOURCE_NAME!r} has asset key {source_key.to_user_string()!r}, but "
            f"raw_docstrings materialises {RAW_DOCSTRINGS_KEY.to_user_string()!r}; set the "
            "source's meta.dagster.asset_key to match"
        )
    return assets


def _define_dbt_models_assets(manifest: Path) -> dg.AssetsDefinition:
    @dbt_assets(
        manifest=manifest, project=dbt_project, dagster_dbt_translator=WarehouseDbtTranslator()
    )
    def dbt_models_assets(
        context: dg.AssetExecutionContext, dbt: dg.ResourceParam[DbtCliResource]
    ) -> Iterator[Any]:
        """Build the dbt models and run their tests (``dbt build``) on the DuckDB warehouse."""
        dbt_vars = json.dumps({"duckdb_path": str(duckdb_warehouse_path())})
        with _run_target_path(context) as target:
            yield from dbt.cli(
                ["build", "--vars", dbt_vars], context=context, target_path=target
            ).stream()

    return dbt_models_assets


@contextlib.contextmanager
def _run_target_path(context: dg.AssetExecutionContext) -> Iterator[Path]:
    # dagster-dbt's default is a fresh directory under <project>/target, which is inside the
    # installed package; the data directory (read at run time, like the warehouse) takes it.
    # Each run gets a directory of its own, so concurrent runs never mix their artifacts; when
    # it ends, pass or fail, it becomes last_run/ and the previous one is deleted.
    target = dbt_target_dir()
    target.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".run-{context.run.run_id[:8]}-", dir=target))
    try:
        yield scratch
    finally:
        _keep_as_last_run(scratch)


def _keep_as_last_run(scratch: Path) -> None:
    last_run = scratch.parent / LAST_RUN_DIR
    # A directory cannot be renamed onto a non-empty one: move the previous run's aside first.
    previous = scratch.parent / f".previous-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(FileNotFoundError):
        last_run.rename(previous)
    try:
        scratch.rename(last_run)
    except OSError:
        # Another run ended in between and took the name; its artifacts are as recent.
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def __getattr__(name: str) -> dg.AssetsDefinition:
    # `dbt_models_assets` needs the manifest, which importing this module must not build
    # (PEP 562: computed on first access, e.g. `from ... import dbt_models_assets`).
    if name == "dbt_models_assets":
        return load_dbt_models_assets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def documents_asset_key() -> dg.AssetKey:
    """Return the asset key of the dbt model ``documents``, the table of texts to embed."""
    return get_asset_key_for_model([load_dbt_models_assets()], DOCUMENTS_MODEL)


def long_documents_asset_key() -> dg.AssetKey:
    """Return the asset key of the dbt model ``long_documents``, the documents to chunk."""
    return get_asset_key_for_model([load_dbt_models_assets()], LONG_DOCUMENTS_MODEL)


class CorpusConfig(dg.Config):
    """Run configuration of :data:`raw_docstrings`."""

    limit: int | None = Field(
        default=None,
        ge=0,
        description="Load a seeded sample of this many docstrings; null loads all of them.",
    )
    seed: int = Field(default=0, description="Seed of the sample drawn when limit is set.")


@dg.asset(
    key=RAW_DOCSTRINGS_KEY,
    group_name=WAREHOUSE_GROUP,
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


def main(argv: list[str] | None = None) -> int:
    """Prepare the dbt manifest: ``python -m qwen3_pipeline.demo.dbt [--force]``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        description=f"Parse the dbt project into <{DATA_DIR_ENV}>/{DBT_TARGET_SUBDIR}/."
    )
    parser.add_argument(
        "--force", action="store_true", help="parse even if the manifest is current"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = prepare_dbt_manifest() if args.force else ensure_dbt_manifest()
    logger.info("dbt manifest ready: %s", manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
