"""The Ray embedder resource: the embedding asset on a pool of Ray actors, through dagster-ray.

:class:`RayEmbedderResource` is an :class:`~.resources.EmbedderResource`, so the asset factory
uses it unchanged: bind it as ``embedder`` instead of :class:`~.resources.Qwen3EmbedderResource`.
The Ray cluster is a dagster-ray resource nested in it, which decides where Ray runs:

- ``dagster_ray.LocalRay()``: a local Ray instance started in the run's process (development,
  tests, one machine with several GPUs);
- ``dagster_ray.kuberay.KubeRayCluster(...)``: a cluster created for the run on Kubernetes
  (KubeRay), or ``KubeRayInteractiveJob``; see the dagster-ray docs;
- or no nested resource and ``ray_address`` (``ray://head:10001``) to join a cluster that is
  already running.

Each of the ``workers`` actors loads the model once per run (on the first embed call: a run
with nothing to embed starts no actor) with ``gpus_per_worker`` GPUs. This module imports
dagster-ray; it is part of the ``ray`` extra.

Example:
    >>> from dagster_ray import LocalRay
    >>> embedder = RayEmbedderResource(  # doctest: +SKIP
    ...     model="Qwen/Qwen3-Embedding-0.6B", dim=512, workers=8, gpus_per_worker=1,
    ...     ray_cluster=LocalRay(),
    ... )
"""

# No `from __future__ import annotations`: Dagster reads the field annotations at runtime.

from dagster_ray import RayResource
from pydantic import Field

from qwen3_pipeline.dagster.resources import Qwen3EmbedderResource
from qwen3_pipeline.embedding.engines import EngineOptions


class RayEmbedderResource(Qwen3EmbedderResource):
    """Qwen3-Embedding on ``workers`` Ray actors (one model each), same asset, same checks.

    The device settings inherited from :class:`Qwen3EmbedderResource` apply inside each actor.
    Only :meth:`engine_options` differs: the resource's
    :class:`~qwen3_pipeline.embedding.lazy.LazyEmbedder` builds the Ray embedder from them (its
    actors start on the first embed call), counts tokens with the driver's tokenizer, and
    reports ``engine=ray``, the workers and the actors' model loads.
    """

    workers: int = Field(default=1, description="Ray actors, one model each.")
    gpus_per_worker: float = Field(
        default=0.0, description="GPUs per actor (0: CPU actors; 0.5: two actors share a GPU)."
    )
    ray_address: str | None = Field(
        default=None,
        description="Join a running cluster (ray://head:10001) when no ray_cluster is given.",
    )
    ray_cluster: RayResource | None = Field(
        default=None,
        description="A dagster-ray resource (LocalRay, KubeRayCluster) that provides Ray.",
    )

    def engine_options(self) -> EngineOptions:
        """The Ray engine settings (the nested ``ray_cluster`` has connected Ray already)."""
        return EngineOptions(
            engine="ray",
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            ray_address=None if self.ray_cluster is not None else self.ray_address,
            **self.encoder_kwargs(),
            embedder_factory=self.embedder_factory,
        )
