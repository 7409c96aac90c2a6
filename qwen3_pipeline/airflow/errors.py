"""Airflow's side of the retry rule: transient errors use the task's retries, nothing else does.

Whether a retry can help is decided by :func:`qwen3_pipeline.core.errors.is_transient`, the function
the Dagster assets use too. Here a permanent error (null or duplicate keys, a spec mismatch, a
model that cannot be loaded, an invalid setting, or a bug) becomes
:class:`~airflow.sdk.exceptions.AirflowFailException`, which fails the task at once whatever its
``retries``; a transient one (a commit conflict that outlasted the store's own retries, an
object-store hiccup, a DuckDB file locked by a writer) is raised as is, so the task's
``retries``/``retry_delay`` apply.

Example:
    >>> @task(retries=3)  # doctest: +SKIP
    ... def upkeep():
    ...     with retry_only_transient():
    ...         maintain_vector_index(table)
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from qwen3_pipeline.core.errors import failure_message, is_transient

logger = logging.getLogger(__name__)


@contextmanager
def retry_only_transient() -> Iterator[None]:
    """Turn permanent errors raised inside the block into ``AirflowFailException`` (no retry).

    Airflow's own exceptions (a skip, a fail already decided) pass through unchanged.

    Raises:
        AirflowFailException: The block raised an error a retry cannot fix.
    """
    try:
        yield
    except AirflowException:
        raise
    except Exception as e:
        if is_transient(e):
            logger.warning("transient %s; the task's retries apply: %s", type(e).__name__, e)
            raise
        logger.error("%s is permanent; failing without retry", type(e).__name__)
        raise AirflowFailException(failure_message(e)) from e
