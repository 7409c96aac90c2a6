"""The Dagster resource of the Qwen3 reranker: the second search stage of downstream assets.

:class:`Qwen3RerankerResource` *is* a :class:`~qwen3_pipeline.embedding.reranker.Reranker`:
an asset passes it straight to :func:`~qwen3_pipeline.consumers.vector_search.search`
(``rerank=reranker``). The model loads on the first :meth:`~Qwen3RerankerResource.score` call
of the run process (torch is imported only then, so loading the code location never imports
it; a run that scores nothing never loads it) and is released, with its accelerator memory,
in ``teardown_after_execution``.

The reranker shares the accelerator with the embedder: put the assets that use it in the
``gpu`` concurrency pool (``pool=`` :data:`~qwen3_pipeline.dagster.embedding_asset.DEFAULT_POOL`),
so a reranking step never runs beside an embedding step on one GPU.

Example:
    >>> import dagster as dg
    >>> from qwen3_pipeline.consumers.vector_search import open_vector_table, search
    >>> @dg.asset(pool="gpu")
    ... def json_answers(reranker: Qwen3RerankerResource) -> dg.MaterializeResult:
    ...     vectors = open_vector_table("data/lancedb", "long_documents_chunks")
    ...     hits = search(vectors, "how do I parse JSON?", k=5, rerank=reranker, candidates=50)
    ...     return dg.MaterializeResult(metadata={"best": hits.column("doc_key")[0].as_py()})
    >>> defs = dg.Definitions(
    ...     assets=[json_answers], resources={"reranker": Qwen3RerankerResource(device="cuda")}
    ... )
"""

# No `from __future__ import annotations`: Dagster reads the field annotations at runtime.

from collections.abc import Sequence

import dagster as dg
from pydantic import Field, PrivateAttr

from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError
from qwen3_pipeline.core.spec import MAX_CONTEXT
from qwen3_pipeline.dagster.accelerator import AcceleratorSettings
from qwen3_pipeline.embedding.reranker import (
    DEFAULT_RERANK_MAX_LENGTH,
    DEFAULT_RERANK_MODEL,
    Qwen3Reranker,
)


class RerankerLoadFailure(dg.Failure):
    """The reranker could not be built: missing checkpoint, unusable device, bad settings.

    Not retried: the same settings fail the same way. A load error's description says how to
    point the model setting at a local checkpoint.
    """

    def __init__(self, error: Qwen3PipelineError, model: str) -> None:
        hint = (
            ""
            if isinstance(error, ConfigError)
            else " -- set the reranker resource's `model` to a local Qwen3-Reranker checkpoint "
            "directory (config.json, tokenizer files, *.safetensors), or make the hub id "
            "reachable (network access, HF_HUB_OFFLINE unset)."
        )
        super().__init__(
            description=f"{error}{hint}",
            metadata={"error": type(error).__name__, "model": model},
            allow_retries=False,
        )


class Qwen3RerankerResource(AcceleratorSettings):
    """A Qwen3-Reranker checkpoint on this run's accelerator, loaded on first use.

    Builds :class:`~qwen3_pipeline.embedding.reranker.Qwen3Reranker` on the first
    :meth:`score` call of the run process and closes it in ``teardown_after_execution``.

    Example:
        >>> import dagster as dg
        >>> reranker = Qwen3RerankerResource(
        ...     model="Qwen/Qwen3-Reranker-4B", device="cuda", max_batch_tokens=32768
        ... )
        >>> reranker.loaded
        False
    """

    model: str = Field(
        default=DEFAULT_RERANK_MODEL,
        description="Hub id (Qwen/Qwen3-Reranker-0.6B, -4B, -8B) or a local checkpoint directory.",
    )
    revision: str | None = Field(
        default=None, description="Pinned hub revision (commit hash or tag); none by default."
    )
    max_length: int = Field(
        default=DEFAULT_RERANK_MAX_LENGTH,
        ge=2,
        le=MAX_CONTEXT,
        description="Tokens per (query, document) pair, template included; longer are cut.",
    )
    instruction: str | None = Field(
        default=None,
        description="What relevance means (the card's Instruct) when a call names none; null: "
        "the card's web-search task.",
    )

    _reranker: Qwen3Reranker | None = PrivateAttr(default=None)

    def get_reranker(self) -> Qwen3Reranker:
        """Return the reranker, loading it on first use (once per run process).

        Raises:
            RerankerLoadFailure: The checkpoint cannot be loaded or a setting is unusable
                (not retried).
        """
        if self._reranker is None:
            try:
                self._reranker = Qwen3Reranker(
                    self.model,
                    revision=self.revision,
                    max_length=self.max_length,
                    **self.encoder_kwargs(),
                )
            except Qwen3PipelineError as e:
                raise RerankerLoadFailure(e, self.model) from e
        return self._reranker

    def score(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[float]:
        """P(yes) per document, in input order (the :class:`Reranker` interface).

        ``instruction`` None uses the resource's ``instruction``. Loads the model on first use.
        """
        chosen = self.instruction if instruction is None else instruction
        return self.get_reranker().score(query, documents, chosen)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Release the model (and accelerator memory) at the end of the run process."""
        reranker, self._reranker = self._reranker, None
        if reranker is not None:
            reranker.close()

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded in this process."""
        return self._reranker is not None


__all__ = ["Qwen3RerankerResource", "RerankerLoadFailure"]
