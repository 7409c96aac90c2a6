"""The package works installed from its wheel, away from this checkout.

Fast checks of what an installed package relies on: the demo checkpoint builder and the Qwen
tokenizer ship inside the package, the wheel's package data covers the dbt project, and the dbt
assets load from a manifest prepared under the data directory (never built on import, except
under ``dagster dev``). The slow test builds the wheel, installs it into a fresh virtual
environment outside the checkout (reusing this environment's dependencies through a ``.pth``
file, offline) and there loads the code location from a prepared manifest, builds a demo
checkpoint and runs the command line, checking that nothing is written into site-packages.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qwen3_pipeline
from qwen3_pipeline.demo import dbt as dbt_defs
from qwen3_pipeline.demo import model as demo_model
from qwen3_pipeline.demo import run as demo

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(qwen3_pipeline.__file__).resolve().parent
# Files of dbt_models/ that dbt writes or git ignores; everything else must ship.
DBT_GENERATED = {"target", "logs", "dbt_packages"}


def _package_data_globs() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-data"]["qwen3_pipeline"]


def _dbt_project_files() -> list[str]:
    root = REPO / "dbt_models"
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and path.relative_to(root).parts[0] not in DBT_GENERATED
        and not path.name.startswith(".")
    )


def test_the_tokenizer_and_the_dbt_project_are_package_data() -> None:
    assert demo_model.TOKENIZER_PATH.is_file()
    assert demo_model.TOKENIZER_PATH.resolve().is_relative_to(PACKAGE)
    assert dbt_defs.PACKAGED_DBT_PROJECT.parent == PACKAGE / "resources"
    assert dbt_defs.PACKAGED_DBT_PROJECT.resolve() == REPO / "dbt_models"

    # setuptools expands package-data globs with glob.glob(recursive=True), from the package.
    matched = {
        Path(path).relative_to(PACKAGE).as_posix()
        for pattern in _package_data_globs()
        for path in glob.glob(str(PACKAGE / pattern), recursive=True)
        if Path(path).is_file()
    }
    needed = {"resources/qwen3_tokenizer.json.gz"} | {
        f"resources/dbt_project/{name}" for name in _dbt_project_files()
    }
    assert "resources/dbt_project/models/marts/documents.sql" in needed
    missing = sorted(needed - matched)
    assert missing == [], "add these to [tool.setuptools.package-data] in pyproject.toml"


def test_the_tests_fixture_module_is_the_packaged_builder() -> None:
    from tests.fixtures import tiny_qwen3

    assert tiny_qwen3 is demo_model


def test_the_demo_builds_its_checkpoint_without_the_tests_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[dict] = []

    def fake_builder(dest: Path, **shape: int) -> Path:
        built.append(shape)
        return dest

    # An installed package has no tests/ beside it.
    monkeypatch.setitem(sys.modules, "tests.fixtures.tiny_qwen3", None)
    monkeypatch.setattr(demo_model, "build_tiny_qwen3_checkpoint", fake_builder)
    assert demo.build_demo_model(tmp_path) == (tmp_path / "demo-model").resolve()
    assert built == [demo_model.SHAPES["demo"]]


def test_the_dbt_assets_need_a_prepared_manifest_outside_dagster_dev(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prepared: list[bool] = []
    monkeypatch.setattr(dbt_defs, "manifest_is_current", lambda: False)
    monkeypatch.setattr(dbt_defs, "prepare_dbt_manifest", lambda: prepared.append(True))
    monkeypatch.delenv("DAGSTER_IS_DEV_CLI", raising=False)
    with pytest.raises(dbt_defs.DbtManifestNotPreparedError, match=dbt_defs.PREPARE_COMMAND):
        dbt_defs.load_dbt_models_assets.__wrapped__()
    assert prepared == []

    monkeypatch.setenv("DAGSTER_IS_DEV_CLI", "1")
    assets = dbt_defs.load_dbt_models_assets.__wrapped__()
    assert prepared == [True]
    assert dbt_defs.get_asset_key_for_source([assets], "raw") == dbt_defs.RAW_DOCSTRINGS_KEY


def test_dbt_writes_under_the_data_directory(tmp_path: Path) -> None:
    env = {**os.environ, "QWEN3_PIPELINE_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from qwen3_pipeline.demo import dbt; "
            "print(dbt.dbt_project.manifest_path, dbt.dbt_project.project_dir)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    manifest, project = done.stdout.split()
    assert Path(manifest) == (tmp_path / "data" / "dbt" / "target" / "manifest.json").resolve()
    assert Path(project) == REPO / "dbt_models"
    assert not (tmp_path / "data").exists()


# --- the wheel, installed outside the checkout ---------------------------------------------------

# Records every process started and every file opened for writing, from before the import on.
LOAD_SCRIPT = r"""
import json, os, sys

spawned, written = [], []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def audit(event, args):
    if event in {"subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn"}:
        spawned.append([str(a) for a in args[1]])
    elif event in {"os.system", "os.fork", "os.forkpty"}:
        spawned.append([event, *map(str, args)])
    elif event == "open" and isinstance(args[2], int) and args[2] & WRITE:
        written.append(str(args[0]))

sys.addaudithook(audit)

import dagster as dg
import qwen3_pipeline
from qwen3_pipeline.demo.definitions import defs

dg.Definitions.validate_loadable(defs)
repo = defs.get_repository_def()
print(json.dumps({
    "package": qwen3_pipeline.__file__,
    "spawned": spawned,
    "written": written,
    "assets": sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()),
}))
"""


@dataclass(frozen=True, kw_only=True)
class _Installed:
    python: Path
    bin: Path
    site_packages: Path
    workdir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def files(self) -> dict[str, float]:
        """Every file of site-packages with its modification time."""
        return {
            str(p.relative_to(self.site_packages)): p.stat().st_mtime
            for p in self.site_packages.rglob("*")
            if p.is_file()
        }


def _build_wheel(workdir: Path) -> Path:
    # From a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    # symlinks=True keeps resources/dbt_project a link, now to the copy's dbt_models/.
    shutil.copytree(
        REPO / "qwen3_pipeline",
        src / "qwen3_pipeline",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copytree(
        REPO / "dbt_models",
        src / "dbt_models",
        ignore=shutil.ignore_patterns(*DBT_GENERATED, ".user.yml"),
    )
    out = workdir / "dist"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"),
            *("--no-build-isolation", "-w", str(out), str(src)),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("qwen3_pipeline-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> _Installed:
    workdir = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(workdir)
    names = zipfile.ZipFile(wheel).namelist()
    assert "qwen3_pipeline/resources/qwen3_tokenizer.json.gz" in names
    assert "qwen3_pipeline/resources/dbt_project/dbt_project.yml" in names
    assert "qwen3_pipeline/resources/dbt_project/models/marts/documents.sql" in names
    assert not [n for n in names if "/target/" in n or "/logs/" in n or n.startswith("tests/")]

    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible, so pip cannot mistake this checkout's
    # editable install for one to replace.
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=300,
    )
    site_packages = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    # This environment's dependencies, offline; a plain path entry, so the checkout's editable
    # install (a .pth file there) stays inactive.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_qwen3_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    # The console script that installing dbt-core into this environment would create.
    dbt = venv / "bin" / "dbt"
    dbt.write_text(f"#!{python}\nimport sys\nfrom dbt.cli.main import cli\nsys.exit(cli())\n")
    dbt.chmod(0o755)

    run_dir = workdir / "run"
    run_dir.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QWEN3_PIPELINE_", "DAGSTER_", "DBT_"))
        and k not in {"PYTHONPATH", "VIRTUAL_ENV"}
    }
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "QWEN3_PIPELINE_DATA_DIR": str(workdir / "data"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # Python's own bytecode cache would be a write into site-packages too.
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return _Installed(
        python=python, bin=venv / "bin", site_packages=site_packages, workdir=run_dir, env=env
    )


@pytest.mark.slow
def test_installed_code_location_loads_from_a_manifest_prepared_in_the_data_dir(
    installed: _Installed,
) -> None:
    before = installed.files()
    data = Path(installed.env["QWEN3_PIPELINE_DATA_DIR"])

    prepared = installed.run(str(installed.python), "-m", "qwen3_pipeline.demo.dbt")
    assert prepared.returncode == 0, prepared.stderr
    assert (data / "dbt" / "target" / "manifest.json").is_file()

    done = installed.run(str(installed.python), "-c", LOAD_SCRIPT)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(loaded["package"]).is_relative_to(installed.site_packages)
    # dagster's vendored croniter runs `file -b <python>` (platform.architecture) on import.
    assert [argv for argv in loaded["spawned"] if argv[0] != "file"] == []
    assert [path for path in loaded["written"] if path != "/dev/null"] == []
    assert {"raw_docstrings", "stg_docstrings", "documents", "document_vectors"} <= set(
        loaded["assets"]
    )
    assert installed.files() == before


@pytest.mark.slow
def test_installed_cli_refreshes_and_searches_with_the_packaged_demo_model(
    installed: _Installed,
) -> None:
    before = installed.files()
    work = installed.workdir
    model = work / "demo-model"
    built = installed.run(
        str(installed.python), "-m", "qwen3_pipeline.demo.model", "--out", str(model)
    )
    assert built.returncode == 0, built.stderr
    assert (model / "tokenizer.json").is_file()
    source = work / "docs.parquet"
    texts = ["Read a file into memory.", "Parse JSON text.", "Open a network socket."]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), source)
    cli = str(installed.bin / "qwen3-pipeline")

    table = ["--db", str(work / "lancedb"), "--table", "docs", "--model", str(model)]
    refreshed = installed.run(
        cli, "refresh", "--source", str(source), "--key", "id", "--text", "text", *table
    )
    assert refreshed.returncode == 0, refreshed.stderr
    found = installed.run(cli, "search", *table, "-k", "2", "parse JSON")
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout.strip().splitlines()[-1])["results"]
    assert len(results) == 2
    assert {row["key"] for row in results} <= {"a", "b", "c"}
    assert installed.files() == before
