"""Airflow 3 provider: the refresh engine as an operator, LanceDB as a connection and an Asset.

Install with the ``airflow`` extra (``pip install 'qwen3-pipeline[airflow]'``). Importing this
package works without Airflow; its Airflow classes are imported on first access (PEP 562), so
``import qwen3_pipeline.airflow`` never fails and the names below raise
:class:`AirflowNotInstalledError` (naming the extra) when Airflow is missing.

- :class:`~qwen3_pipeline.airflow.operators.Qwen3EmbeddingRefreshOperator`: one
  :func:`qwen3_pipeline.engine.refresh.refresh` per task (the same engine as the CLI and the Dagster
  assets), over one hash shard (``shard="3/8"``, mapped with ``.expand()``) or the whole
  source. Returns the refresh report as its XCom, emits the table's Asset with the report as
  the event's extra, and fails without retry on bad input.
- :class:`~qwen3_pipeline.airflow.hooks.LanceDBHook`: the ``lancedb`` connection type (URI in
  Host, the secret in Password, other options in the extra's ``storage_options``).
- :func:`~qwen3_pipeline.airflow.assets.lancedb_asset`: the Asset of a vector table, to
  schedule downstream DAGs on.
- :func:`~qwen3_pipeline.airflow.errors.retry_only_transient`: the retry rule, for tasks of
  one's own that call the package.

Example:
    >>> from qwen3_pipeline.airflow import Qwen3EmbeddingRefreshOperator  # doctest: +SKIP
"""

import importlib
from typing import TYPE_CHECKING, Any

from qwen3_pipeline.airflow.provider_info import get_provider_info
from qwen3_pipeline.core.errors import Qwen3PipelineError

if TYPE_CHECKING:
    from qwen3_pipeline.airflow.assets import lancedb_asset, lancedb_asset_uri
    from qwen3_pipeline.airflow.errors import retry_only_transient
    from qwen3_pipeline.airflow.hooks import LanceDBDestination, LanceDBHook
    from qwen3_pipeline.airflow.operators import Qwen3EmbeddingRefreshOperator

EXTRA_HINT = "pip install 'qwen3-pipeline[airflow]'"

# Public name -> submodule; the submodules import Airflow, this package does not.
_LAZY = {
    "LanceDBDestination": "hooks",
    "LanceDBHook": "hooks",
    "Qwen3EmbeddingRefreshOperator": "operators",
    "lancedb_asset": "assets",
    "lancedb_asset_uri": "assets",
    "retry_only_transient": "errors",
}

__all__ = [
    "AirflowNotInstalledError",
    "LanceDBDestination",
    "LanceDBHook",
    "Qwen3EmbeddingRefreshOperator",
    "get_provider_info",
    "lancedb_asset",
    "lancedb_asset_uri",
    "retry_only_transient",
]


class AirflowNotInstalledError(Qwen3PipelineError, ImportError):
    """Apache Airflow is not installed: install the package's ``airflow`` extra."""


def __getattr__(name: str) -> Any:
    submodule = _LAZY.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{submodule}")
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.split(".")[0] == "airflow":
            raise
        raise AirflowNotInstalledError(
            f"qwen3_pipeline.airflow.{name} needs Apache Airflow 3: {EXTRA_HINT}"
        ) from e
    return getattr(module, name)
