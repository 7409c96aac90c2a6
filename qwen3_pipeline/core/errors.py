"""The package's error hierarchy.

Every error the package raises on purpose derives from :class:`Qwen3PipelineError`, so callers
can catch one type. Errors caused by bad input or configuration are raised before anything is
written and say which value is wrong and what to do about it.

Whether a retry can help is part of the type, never guessed from a message: errors that a
retry of the same work may fix (a commit conflict, an object-store hiccup, a file lock held by
another process) derive from :class:`TransientError`; every other error is permanent. The
boundaries to DuckDB, Arrow and LanceDB translate third-party exceptions into these types
(:func:`qwen3_pipeline.store.store_error` for LanceDB, the source readers), so orchestrators
decide retries by ``isinstance(error, TransientError)`` alone.

No message may carry a secret: :func:`redact_secrets` is the one scrubber every error path
that could repeat a connection string uses (source specs, PostgreSQL URLs, the CLI's error
line, the orchestrators' failure messages).
"""

import re

# ``scheme://user:SECRET@host``: the secret runs to the last "@" of the URL (a password may
# hold a raw "/", "?", "#" or "@"), so it is redacted whole even when mistyped.
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)[^\s]*@")
# ``password=SECRET`` in a libpq key=value string, a URL query (``?password=``, JDBC), an
# environment assignment (``PGPASSWORD=``) or similar (``sslpassword``, ``pwd``): the value up
# to whitespace, "&" or ";", or a quoted value whole.
_KEY_SECRET = re.compile(
    r"(?P<head>[A-Za-z_]*(?:password|passwd|pwd|secret|token)\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&;,'\"]+)",
    re.IGNORECASE,
)
REDACTED = "***"


class Qwen3PipelineError(Exception):
    """Base class of every error raised by qwen3_pipeline."""


class TransientError(Qwen3PipelineError):
    """A failure that a retry of the same work may fix (conflict, I/O hiccup, lock)."""


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


class SourceReadError(InputDataError):
    """The source could not be read: a corrupt file, a failing query (permanent)."""


class SourceUnavailableError(TransientError):
    """The source is busy or unreachable for now (a DuckDB file locked by a writer)."""


class MassDeleteError(Qwen3PipelineError):
    """A refresh would delete more of the table than allowed (an empty or broken source?)."""


class SpecMismatchError(Qwen3PipelineError):
    """A vector table was built with a different embedding spec than the one configured."""


class EmbeddingDriftError(Qwen3PipelineError):
    """The loaded model no longer reproduces the table's recorded canary vectors."""


class GateFailedError(Qwen3PipelineError):
    """A staging table scored worse than the live one on the golden set; it was not swapped in."""


class EmbeddingFailedError(Qwen3PipelineError):
    """One or more rows could not be embedded (out of memory alone, non-finite output)."""


class StoreError(Qwen3PipelineError):
    """The vector store failed in a way that is not the caller's input (permanent)."""


class StoreCorruptError(StoreError):
    """The table's files are damaged or missing (a deleted data file); rebuild to recover."""


class StoreTransientError(StoreError, TransientError):
    """The vector store failed in a way a retry may fix (I/O error, timeout, throttling)."""


class StoreConflictError(StoreTransientError):
    """A concurrent writer committed first and the bounded retries were used up."""


def redact_secrets(text: str) -> str:
    """``text`` with every password-like part of a connection string replaced by ``***``.

    Covers a URL's userinfo password (``postgresql://user:***@host/db``, up to the URL's last
    ``@``, so a password holding an unencoded ``/`` or ``@`` is hidden whole), ``password=``
    in a libpq key=value string or a URL query (``?password=``, JDBC URLs), and similar keys
    (``sslpassword``, ``PGPASSWORD``, ``pwd``, ``secret``, ``token``). It errs on the side of
    hiding too much: every message that may repeat a source spec or a database URI goes
    through it before it is shown.

    Example:
        >>> print(redact_secrets("postgresql://u:p/w@db:5432/app and host=db password='a b' x=1"))
        postgresql://u:***@db:5432/app and host=db password=*** x=1
    """
    text = _URL_USERINFO.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _KEY_SECRET.sub(lambda m: f"{m.group('head')}{REDACTED}", text)


def is_transient(error: BaseException) -> bool:
    """Whether a retry may succeed, decided by the error's type alone.

    :class:`TransientError` (commit conflicts, object-store I/O, a DuckDB file locked by a
    writer) and Python's own ``TimeoutError``/``ConnectionError`` (from a user's source) are
    worth retrying; everything else, unknown exceptions (bugs) included, is not. Every
    orchestrator layer (the Dagster assets, the Airflow operator) decides retries with this one
    function, so they never disagree about an error.

    Example:
        >>> is_transient(StoreConflictError("busy")), is_transient(InputDataError("dup keys"))
        (True, False)
    """
    return isinstance(error, TransientError | TimeoutError | ConnectionError)


def failure_message(error: BaseException) -> str:
    """The one-line description an orchestrator shows for a failure that is not retried.

    A package error's own message says what is wrong and what to do; any other exception is
    a bug or an environment problem, labelled as such with its type so it is not mistaken
    for bad input.

    Example:
        >>> failure_message(KeyError("x"))
        "internal error: KeyError: 'x'"
    """
    if isinstance(error, Qwen3PipelineError):
        return redact_secrets(str(error))
    return redact_secrets(f"internal error: {type(error).__name__}: {error}")
