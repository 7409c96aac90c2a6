"""The Airflow Asset of a LanceDB vector table, to schedule downstream DAGs on.

A vector table is named by where it lives and its name, in a URI of scheme ``lancedb``:

- a local directory ``/data/lancedb`` and table ``documents``: ``lancedb:///data/lancedb/documents``
  (Airflow normalises it to ``lancedb:/data/lancedb/documents``);
- an object store ``s3://bucket/vectors``: ``lancedb+s3://bucket/vectors/documents`` (likewise
  ``lancedb+gs://``, ``lancedb+az://``...);
- a destination known only by its Airflow connection ``lancedb_s3``:
  ``lancedb://lancedb_s3/documents``.

Producer and consumer DAGs call :func:`lancedb_asset` with the same arguments, so they name the
same Asset; the refresh operator declares it as its outlet by the same rule. Never put a secret
in a URI: credentials belong in the connection.

Example:
    >>> lancedb_asset_uri("documents", uri="s3://bucket/vectors/")
    'lancedb+s3://bucket/vectors/documents'
    >>> lancedb_asset_uri("documents", conn_id="lancedb_s3")
    'lancedb://lancedb_s3/documents'
"""

from pathlib import Path

from airflow.sdk import Asset

from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import validate_table_name, validate_uri

SCHEME = "lancedb"
_SCHEME_SEP = "://"


def local_uri(uri: str) -> str:
    """Return ``uri`` with a local path made absolute (an object-store URI unchanged)."""
    if _SCHEME_SEP in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def lancedb_asset_uri(table: str, *, uri: str | None = None, conn_id: str | None = None) -> str:
    """Return the Asset URI of vector table ``table`` (see the module docstring).

    Args:
        table: The vector table's name.
        uri: The LanceDB directory or object-store URI (no credentials in it).
        conn_id: The Airflow connection of the destination, when the URI is not stated in the
            DAG (exactly one of ``uri`` and ``conn_id``).

    Raises:
        ConfigError: Both or neither of ``uri`` and ``conn_id``, or an unsafe name or URI.
    """
    validate_table_name(table)
    if (uri is None) == (conn_id is None):
        raise ConfigError(
            "name a vector table's Asset by exactly one of uri= (its LanceDB directory or "
            "object-store URI) and conn_id= (its Airflow connection)"
        )
    if conn_id is not None:
        if not conn_id or "/" in conn_id or _SCHEME_SEP in conn_id:
            raise ConfigError(f"connection id {conn_id!r} cannot name an Asset")
        return f"{SCHEME}://{conn_id}/{table}"
    assert uri is not None
    if "@" in uri.split(_SCHEME_SEP, 1)[-1].split("/", 1)[0]:
        raise ConfigError(
            f"LanceDB URI {uri!r} holds user info: keep credentials in the Airflow connection"
        )
    located = local_uri(validate_uri(uri)).rstrip("/")
    if _SCHEME_SEP in located:
        scheme, rest = located.split(_SCHEME_SEP, 1)
        return f"{SCHEME}+{scheme.lower()}://{rest}/{table}"
    return f"{SCHEME}://{located}/{table}"


def lancedb_asset(table: str, *, uri: str | None = None, conn_id: str | None = None) -> Asset:
    """Return the Airflow Asset of vector table ``table`` (see :func:`lancedb_asset_uri`).

    Example:
        >>> lancedb_asset("documents", uri="/data/lancedb").uri
        'lancedb:/data/lancedb/documents'
    """
    return Asset(uri=lancedb_asset_uri(table, uri=uri, conn_id=conn_id))
