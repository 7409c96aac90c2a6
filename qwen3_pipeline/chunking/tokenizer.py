"""The Qwen3 tokenizer the chunker counts with: the packaged one, or the model's own.

Chunk sizes are promises in the model's tokens, so the chunker counts with the exact
tokenizer the encoder uses: :func:`packaged_tokenizer` (the real Qwen3 tokenizer shipped with
the package, offline) or the one a caller hands over, unwrapped by :func:`backend_tokenizer`.
"""

import functools
import gzip
from typing import Any

from qwen3_pipeline.core.errors import ConfigError, ModelLoadError
from qwen3_pipeline.core.resources import TOKENIZER_PATH


@functools.lru_cache(maxsize=1)
def packaged_tokenizer() -> Any:
    """Return the real Qwen3 tokenizer shipped with the package (offline; loaded once).

    Returns:
        A ``tokenizers.Tokenizer`` (the same ids as ``Qwen/Qwen3-Embedding-*``'s tokenizer).
        Shared: do not change its truncation or padding.
    """
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(gzip.decompress(TOKENIZER_PATH.read_bytes()).decode("utf-8"))
    except Exception as e:  # OSError for the file; tokenizers raises a bare Exception
        raise ModelLoadError(f"could not load the packaged tokenizer {TOKENIZER_PATH}: {e}") from e


def backend_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer``, without truncation or padding.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` or a transformers fast tokenizer. One with
            truncation or padding set is copied, never changed.

    Raises:
        ConfigError: ``tokenizer`` is of another type.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers' fast tokenizers
    if not isinstance(backend, Tokenizer):
        raise ConfigError(
            f"the chunker needs a Hugging Face tokenizers.Tokenizer (or a transformers fast "
            f"tokenizer), got {type(tokenizer).__name__}"
        )
    if backend.truncation is not None or backend.padding is not None:
        # Truncation would cap every count at its limit; copy rather than change the caller's.
        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend
