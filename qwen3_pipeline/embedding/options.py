"""How to build one Qwen3 encoder: device, dtype, attention and the batch budget.

:class:`EncoderOptions` is the one copy of these settings: the local engine builds its encoder
from it, and the Ray engine ships it to each actor, which builds its own with
:meth:`EncoderOptions.build`. It imports no torch until ``build`` is called.
"""

from dataclasses import dataclass, fields
from typing import Any

from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import Embedder


@dataclass(frozen=True, kw_only=True)
class EncoderOptions:
    """How to build a :class:`~qwen3_pipeline.embedding.encoder.Qwen3Encoder`.

    Attributes:
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        attention: ``auto``, ``sdpa``, ``eager`` or ``flash_attention_2``.
        max_batch_tokens: Token budget per forward pass (None: the encoder's default, 16384 on
            CUDA and 4096 on CPU).
        max_batch_rows: Most rows per forward pass.

    Example:
        >>> EncoderOptions(device="cpu").max_batch_rows
        256
    """

    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    max_batch_tokens: int | None = None
    max_batch_rows: int = 256

    @classmethod
    def of(cls, settings: Any) -> "EncoderOptions":
        """The options named by ``settings``' attributes of the same names.

        For the objects that carry these settings among others (the engine options, the
        Dagster resources), so that each builds its encoder options the same way.

        Example:
            >>> from types import SimpleNamespace
            >>> settings = SimpleNamespace(device="cpu", dtype="auto", attention="sdpa",
            ...                            max_batch_tokens=None, max_batch_rows=8, workers=2)
            >>> EncoderOptions.of(settings).attention
            'sdpa'
        """
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def build(self, spec: EmbeddingSpec, *, progress: bool = False) -> Embedder:
        """Load the encoder for ``spec`` (imports torch; loads the weights).

        Raises:
            ModelLoadError: The model cannot be loaded.
        """
        from qwen3_pipeline.embedding.encoder import Qwen3Encoder

        return Qwen3Encoder(
            spec,
            device=self.device,
            dtype=self.dtype,
            attention=self.attention,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_rows=self.max_batch_rows,
            progress=progress,
        )
