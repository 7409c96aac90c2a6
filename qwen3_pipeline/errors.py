"""The package's error hierarchy.

Every error the package raises on purpose derives from :class:`Qwen3PipelineError`, so callers
can catch one type. Errors caused by bad input or configuration are raised before anything is
written and say which value is wrong and what to do about it.
"""


class Qwen3PipelineError(Exception):
    """Base class of every error raised by qwen3_pipeline."""


class ConfigError(Qwen3PipelineError, ValueError):
    """A configuration value is invalid (bad dimension, max_length, device, name...)."""


class InvalidDimensionError(ConfigError):
    """The requested output dimension is outside 32..hidden size of the model."""


class UnsafeNameError(ConfigError):
    """A table name or URI could escape its directory or is otherwise unsafe."""


class ModelLoadError(Qwen3PipelineError):
    """The model or tokenizer could not be found or loaded."""


class InputDataError(Qwen3PipelineError, ValueError):
    """Source rows are invalid: null or duplicate keys, missing columns, empty input."""


class SpecMismatchError(Qwen3PipelineError):
    """A vector table was built with a different embedding spec than the one configured."""


class EmbeddingFailedError(Qwen3PipelineError):
    """One or more rows could not be embedded (out of memory alone, non-finite output)."""


class StoreError(Qwen3PipelineError):
    """The vector store failed in a way that is not the caller's input."""


class StoreConflictError(StoreError):
    """A concurrent writer committed first and the bounded retries were used up (transient)."""
