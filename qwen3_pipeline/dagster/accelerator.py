"""Where a Qwen3 model runs and how big its forward passes are, as Dagster resource config.

:class:`AcceleratorSettings` holds the settings the embedder resources
(:class:`~qwen3_pipeline.dagster.resources.Qwen3EmbedderResource`, and through it the Ray
one) and :class:`~qwen3_pipeline.dagster.reranker_resource.Qwen3RerankerResource` share, so
each is declared, described and validated once, and turned into the one
:class:`~qwen3_pipeline.embedding.options.EncoderOptions` the model code takes.
"""

# No `from __future__ import annotations`: Dagster reads the field annotations at runtime.

from dataclasses import asdict
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from qwen3_pipeline.embedding.options import EncoderOptions


class AcceleratorSettings(dg.ConfigurableResource):
    """Device, dtype, attention kernel and batch budget of a Qwen3 model resource.

    A base class: the resources that load a model inherit these fields.

    Example:
        >>> from qwen3_pipeline.dagster import Qwen3RerankerResource
        >>> options = Qwen3RerankerResource(device="cpu", max_batch_rows=64).encoder_options()
        >>> (options.device, options.dtype, options.max_batch_rows)
        ('cpu', 'auto', 64)
    """

    device: str = Field(
        default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto is bfloat16 on CUDA and float32 on CPU."
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="auto is flash-attention-2 when the flash_attn package imports on CUDA.",
    )
    max_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Token budget per forward pass, padding included; null: 16384 CUDA, 4096 CPU.",
    )
    max_batch_rows: int = Field(
        default=256,
        ge=1,
        description="Most inputs per forward pass (texts to embed, or query-document pairs).",
    )

    def encoder_options(self) -> EncoderOptions:
        """These settings as the :class:`EncoderOptions` the model code takes."""
        return EncoderOptions.of(self)

    def encoder_kwargs(self) -> dict[str, Any]:
        """:meth:`encoder_options` as keyword arguments (``device=...``, ``dtype=...``)."""
        return asdict(self.encoder_options())
