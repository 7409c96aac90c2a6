"""The package front, the old module paths, and the layering contracts.

- ``import qwen3_pipeline`` stays cheap (no torch, LanceDB or Dagster) and exports the user API;
- every module path from before the reorganisation still imports, as the new module itself;
- the import-linter contracts pass, and fail on an import running up a layer.
"""

import importlib
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import qwen3_pipeline
from qwen3_pipeline.compat import MOVED_MODULES

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_loads_no_heavy_library() -> None:
    code = (
        "import sys, qwen3_pipeline, qwen3_pipeline.dagster, qwen3_pipeline.airflow, "
        "qwen3_pipeline.embedding\n"
        "heavy = [m for m in ('torch', 'transformers', 'lancedb', 'dagster', 'airflow', 'ray') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == ""


@pytest.mark.parametrize("name", qwen3_pipeline.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(qwen3_pipeline, name) is not None


def test_the_front_names_the_user_api() -> None:
    wanted = {
        "refresh",
        "SourceConfig",
        "ParquetSource",
        "DuckDBSource",
        "PostgresSource",
        "ArrowSource",
        "ChunkingConfig",
        "EmbeddingSpec",
        "Qwen3Encoder",
        "search",
        "open_vector_table",
    }
    assert wanted <= set(qwen3_pipeline.__all__)
    from qwen3_pipeline.engine.refresh import refresh

    assert qwen3_pipeline.refresh is refresh


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = qwen3_pipeline.nope  # type: ignore[attr-defined]


def test_the_dagster_front_exports_builders_and_resources() -> None:
    import qwen3_pipeline.dagster as front
    from qwen3_pipeline.dagster.embedding_asset import build_embedding_asset
    from qwen3_pipeline.dagster.resources import LanceDBResource, Qwen3EmbedderResource

    assert front.build_embedding_asset is build_embedding_asset
    assert front.Qwen3EmbedderResource is Qwen3EmbedderResource
    assert front.LanceDBResource is LanceDBResource
    for name in front.__all__:
        assert getattr(front, name) is not None


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_old_module_paths_are_the_new_modules(old: str, new: str) -> None:
    if "airflow" in old:
        pytest.importorskip("airflow")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    if old in sys.modules and any(issubclass(w.category, DeprecationWarning) for w in caught):
        assert any(new in str(w.message) for w in caught)


def test_importing_the_old_refresh_path_keeps_the_function_at_the_front() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from qwen3_pipeline.refresh import plan_refresh, refresh  # the README's old path

    assert callable(refresh)
    assert callable(plan_refresh)
    assert isinstance(qwen3_pipeline.refresh, types.FunctionType)
    assert qwen3_pipeline.refresh is refresh


def test_old_dagster_paths_share_one_module_object() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import qwen3_pipeline.dagster_defs.resources as old

    import qwen3_pipeline.dagster.resources as new

    assert old is new


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--no-cache"],
        cwd=package_parent,
        env={"PATH": str(lint.parent), "PYTHONPATH": str(package_parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layer_contracts_hold_and_catch_an_upward_import(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    shutil.copytree(
        ROOT / "qwen3_pipeline",
        copy / "qwen3_pipeline",
        ignore=shutil.ignore_patterns("__pycache__", "resources"),
    )
    kept = _lint_imports(copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout

    # The pure core importing the engine: an import running up four layers.
    spec = copy / "qwen3_pipeline" / "core" / "spec.py"
    spec.write_text(spec.read_text() + "\nimport qwen3_pipeline.engine.refresh  # noqa\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "qwen3_pipeline.core is not allowed to import qwen3_pipeline.engine" in broken.stdout


def test_table_metadata_keys_are_those_existing_tables_hold() -> None:
    # Stored in the schema metadata of every vector table: a renamed key (the layer move once
    # renamed two by accident) would make every existing table unreadable as ours.
    from qwen3_pipeline.core import schema

    assert schema.META_SPEC == "qwen3_pipeline.spec"
    assert schema.META_FINGERPRINT == "qwen3_pipeline.fingerprint"
    assert schema.META_PACKAGE_VERSION == "qwen3_pipeline.package_version"
    assert schema.META_SOURCE_KEY == "qwen3_pipeline.source_key"
    assert schema.META_CHUNKING == "qwen3_pipeline.chunking"
