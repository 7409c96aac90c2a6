"""Airflow's side of the retry rule: transient errors use the task's retries, nothing else does.

Whether a retry can help is decided by :func:`qwen3_pipeline.core.errors.is_transient`, the function
the Dagster assets use too. Here a permanent error (null or duplicate keys, a spec mismatch, a
model that cannot be loaded, an invalid setting, or a bug) becomes
:class:`~airflow.sdk.exceptions.AirflowFailException`, which fails the task at once whatever its
``retries``; a transient one (a commit conflict that outlasted the store's own retries, an
object-store hiccup, a DuckDB file locked by a writer) is raised as is, so the task's
``retries``/``retry_delay`` apply.

A refusal (a mass delete, a drift of the model) is permanent too, and its message says which
operator argument, DAG param and trigger config let it through (:func:`way_out_hint`).

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


def way_out_hint(error: BaseException) -> str:
    """How to let ``error``'s refusal through from Airflow, or "" for other errors.

    The operator argument, the DAG param it can be templated from, and the trigger config.

    Example:
        >>> from qwen3_pipeline.core.errors import MassDeleteError
        >>> way_out_hint(MassDeleteError("would delete 90%")).split(", or ")[0]
        'To let it through from Airflow: allow_mass_delete=True on the operator'
        >>> way_out_hint(ValueError("bug"))
        ''
    """
    from qwen3_pipeline.engine.options import override_for  # the engine loads at run time

    field = override_for(error)
    if field is None:
        return ""
    return (
        f"To let it through from Airflow: {field}=True on the operator, or "
        f'{field}="{{{{ params.{field} }}}}" with the DAG param {field} and a trigger with '
        f'config {{"{field}": true}}'
    )
