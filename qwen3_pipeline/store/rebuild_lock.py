"""One rebuild of a table at a time: an exclusive lock per local database and table.

Two rebuilds of one table to one spec share its staging table (that is how an interrupted
rebuild resumes): run at once, the first to finish swaps it in and drops it under the other,
which then fails on files that vanished. :func:`rebuild_lock` makes the second one stop
before it reads anything, with a transient error, whichever way it was started: the CLI,
Python, the Dagster rebuild job or the Airflow operator all go through
:func:`~qwen3_pipeline.engine.refresh.run_refresh`, which holds it for a rebuild.

The lock is an ``flock`` on a file in the system temp directory, released when the holder
leaves the block or its process ends, however it ends (a SIGKILL included). It covers the
processes of one machine and a local database directory; an object-store URI (``s3://``) is
not locked (run its rebuilds from one place, e.g. one Dagster job with a concurrency limit).
"""

import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen3_pipeline.core.errors import StoreConflictError
from qwen3_pipeline.core.schema import local_database

LOCK_DIRECTORY = "qwen3-pipeline-locks"
"""The folder of the lock files, under the system temp directory."""


@contextmanager
def rebuild_lock(db_uri: str, table: str) -> Iterator[None]:
    """Hold the exclusive rebuild lock of ``table`` in ``db_uri`` while the block runs.

    Args:
        db_uri: The LanceDB database (a local directory is locked, any other URI is not).
        table: The table rebuilt.

    Raises:
        StoreConflictError: Another rebuild of the table holds the lock (transient: run
            this one when it is done).

    Example:
        >>> import tempfile
        >>> with rebuild_lock(tempfile.mkdtemp(), "docs"):
        ...     pass
    """
    path = local_database(db_uri)
    if path is None:
        yield
        return
    locks = Path(tempfile.gettempdir()) / LOCK_DIRECTORY
    locks.mkdir(exist_ok=True)
    name = hashlib.sha256(f"{path.resolve()}\0{table}".encode()).hexdigest()[:24]
    with open(locks / f"rebuild-{name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreConflictError(
                f"another rebuild of table {table!r} in {db_uri!r} is running; run this one "
                "when it is done (it resumes from the staging table, or finds nothing to do)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
