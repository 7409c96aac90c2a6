"""Old module paths keep importing: each is an alias of the module that now holds its code.

The package was reorganised into layers (``core/``, ``embedding/``, ``engine/``...). Code that
imports a path from before, such as ``from qwen3_pipeline.refresh import refresh`` or
``qwen3_pipeline.dagster_defs.embedding``, gets the new module itself (the same objects, so
``isinstance`` and monkeypatching behave), with a :class:`DeprecationWarning` naming the new
path. New code should import from the package front (``qwen3_pipeline``,
``qwen3_pipeline.dagster``, ``qwen3_pipeline.airflow``) or the new paths.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

MOVED_MODULES = {
    "qwen3_pipeline.airflow.demo": "qwen3_pipeline.demo.airflow_run",
    "qwen3_pipeline.batching": "qwen3_pipeline.embedding.batching",
    "qwen3_pipeline.changes": "qwen3_pipeline.core.changes",
    "qwen3_pipeline.checks": "qwen3_pipeline.consumers.checks",
    "qwen3_pipeline.corpus": "qwen3_pipeline.demo.corpus",
    "qwen3_pipeline.dagster_defs": "qwen3_pipeline.dagster",
    "qwen3_pipeline.dagster_defs.automation": "qwen3_pipeline.dagster.automation",
    "qwen3_pipeline.dagster_defs.consumers": "qwen3_pipeline.dagster.consumer_assets",
    "qwen3_pipeline.dagster_defs.dbt": "qwen3_pipeline.demo.dbt",
    "qwen3_pipeline.dagster_defs.embedding": "qwen3_pipeline.dagster.embedding_asset",
    "qwen3_pipeline.dagster_defs.instance": "qwen3_pipeline.dagster.instance",
    "qwen3_pipeline.dagster_defs.location": "qwen3_pipeline.demo.location",
    "qwen3_pipeline.dagster_defs.metadata": "qwen3_pipeline.dagster.metadata",
    "qwen3_pipeline.dagster_defs.ray": "qwen3_pipeline.dagster.ray_resource",
    "qwen3_pipeline.dagster_defs.resources": "qwen3_pipeline.dagster.resources",
    "qwen3_pipeline.dagster_defs.vectors": "qwen3_pipeline.dagster.vectors",
    "qwen3_pipeline.definitions": "qwen3_pipeline.demo.definitions",
    "qwen3_pipeline.demo_model": "qwen3_pipeline.demo.model",
    "qwen3_pipeline.embedder": "qwen3_pipeline.embedding.interface",
    "qwen3_pipeline.encoder": "qwen3_pipeline.embedding.encoder",
    "qwen3_pipeline.engines": "qwen3_pipeline.embedding.engines",
    "qwen3_pipeline.errors": "qwen3_pipeline.core.errors",
    "qwen3_pipeline.gate": "qwen3_pipeline.lifecycle.gate",
    "qwen3_pipeline.lazy_embedder": "qwen3_pipeline.embedding.lazy",
    "qwen3_pipeline.near_duplicates": "qwen3_pipeline.consumers.near_duplicates",
    "qwen3_pipeline.progress": "qwen3_pipeline.core.progress",
    "qwen3_pipeline.ray_engine": "qwen3_pipeline.embedding.ray_pool",
    "qwen3_pipeline.refresh": "qwen3_pipeline.engine.refresh",
    "qwen3_pipeline.schema": "qwen3_pipeline.core.schema",
    "qwen3_pipeline.spec": "qwen3_pipeline.core.spec",
    "qwen3_pipeline.summary": "qwen3_pipeline.demo.summary",
    "qwen3_pipeline.upkeep": "qwen3_pipeline.store.upkeep",
}
"""Old dotted path -> the module that holds its code now."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path of :data:`MOVED_MODULES` to the new module (installed at import)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec for ``fullname`` when it is an old path, else None (other finders go on)."""
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(
            fullname, self, is_package=fullname == "qwen3_pipeline.dagster_defs"
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        """Use the default module creation (the placeholder is replaced in exec_module)."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Put the new module in ``sys.modules`` under the old name (the import returns it)."""
        new = MOVED_MODULES[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {new}; import it from there (or from the package "
            "front: qwen3_pipeline, qwen3_pipeline.dagster, qwen3_pipeline.airflow)",
            DeprecationWarning,
            stacklevel=2,
        )
        # importlib returns sys.modules[name] after exec_module: the new module itself, so old
        # and new paths share one module object (no second copy of its classes or state).
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Install the finder once (idempotent)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        # First: an old path under an aliased package (``dagster_defs.resources``) would
        # otherwise be found by the path finder in the new folder and loaded a second time.
        sys.meta_path.insert(0, MovedModuleFinder())
