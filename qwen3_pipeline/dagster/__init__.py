"""The Dagster layer: resources, the embedding asset and its checks, automation, consumers.

A thin driver over the engine (:func:`qwen3_pipeline.refresh`): it builds the run's options
from the launchpad config and turns the refresh report into metadata and check results.

- :mod:`qwen3_pipeline.dagster.resources`: :class:`Qwen3EmbedderResource` (the model, lazily
  loaded once per run process), :class:`FakeEmbedderResource`, :class:`LanceDBResource`;
- :mod:`qwen3_pipeline.dagster.ray_resource`: :class:`RayEmbedderResource` (the actor pool);
- :mod:`qwen3_pipeline.dagster.embedding_asset`: :func:`build_embedding_asset` (the asset,
  its partitions, checks and backfill policy);
- :mod:`qwen3_pipeline.dagster.automation`: the refresh schedule and sensor;
- :mod:`qwen3_pipeline.dagster.lifecycle_jobs`: the gated rebuild job and the rollback job
  (:mod:`qwen3_pipeline.dagster.rebuild_gate`: the gate's settings and its asset check);
- :mod:`qwen3_pipeline.dagster.consumer_assets`: downstream assets (ANN index, near duplicates);
- :mod:`qwen3_pipeline.dagster.vectors`: open the vectors at the materialized version;
- :mod:`qwen3_pipeline.dagster.metadata`: the report as namespaced metadata;
- :mod:`qwen3_pipeline.dagster.instance`: prepare an instance (the ``gpu`` pool).

Names are imported on first access (``import qwen3_pipeline.dagster`` does not import Dagster).

Example:
    >>> from qwen3_pipeline.dagster import build_embedding_asset, Qwen3EmbedderResource
"""

from qwen3_pipeline.core.lazy_exports import lazy_exports

_WHERE = {
    "BadInputFailure": "qwen3_pipeline.dagster.embedding_asset",
    "EmbedderLoadFailure": "qwen3_pipeline.dagster.resources",
    "EmbedderResource": "qwen3_pipeline.dagster.resources",
    "FakeEmbedderResource": "qwen3_pipeline.dagster.resources",
    "HashShards": "qwen3_pipeline.dagster.embedding_asset",
    "LanceDBResource": "qwen3_pipeline.dagster.resources",
    "Qwen3EmbedderResource": "qwen3_pipeline.dagster.resources",
    "Qwen3RerankerResource": "qwen3_pipeline.dagster.reranker_resource",
    "RayEmbedderResource": "qwen3_pipeline.dagster.ray_resource",
    "RefreshRunConfig": "qwen3_pipeline.dagster.embedding_asset",
    "RollbackConfig": "qwen3_pipeline.dagster.lifecycle_jobs",
    "TimePartitioning": "qwen3_pipeline.dagster.embedding_asset",
    "build_automation_sensor": "qwen3_pipeline.dagster.automation",
    "build_embedding_asset": "qwen3_pipeline.dagster.embedding_asset",
    "build_near_duplicates_asset": "qwen3_pipeline.dagster.consumer_assets",
    "build_rebuild_job": "qwen3_pipeline.dagster.lifecycle_jobs",
    "build_refresh_schedule": "qwen3_pipeline.dagster.automation",
    "build_rollback_job": "qwen3_pipeline.dagster.lifecycle_jobs",
    "build_vector_index_asset": "qwen3_pipeline.dagster.consumer_assets",
    "open_vectors": "qwen3_pipeline.dagster.vectors",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
