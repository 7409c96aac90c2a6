"""The ``lancedb`` connection type: where a vector table lives, and the credentials to reach it.

A LanceDB connection holds:

- **Host**: the database URI, a local directory (``/data/lancedb``) or an object store
  (``s3://bucket/vectors``, ``gs://...``, ``az://...``); the extra's ``uri`` may hold it instead
  (for connections written as URIs, whose host cannot be a path);
- **Password** (and **Login**): the object-store credentials, passed to LanceDB as the storage
  options named by the URI's scheme (``aws_secret_access_key``/``aws_access_key_id`` for s3,
  ``azure_storage_account_key``/``azure_storage_account_name`` for az,
  ``google_service_account_key`` for gs), or by the extra's ``password_option``/
  ``login_option``;
- **Extra** ``storage_options``: any other LanceDB storage options (region, endpoint...), as a
  JSON object.

Airflow masks the password and the extra's sensitively named values wherever a task logs
them; :meth:`LanceDBHook.destination` also masks every storage option whose name reads as a
credential (``key``, ``secret``, ``token``, ``sas``...), which Airflow's name list misses for
some stores (``azure_storage_account_key``). The connection is read when the task runs, never
when the DAG is parsed.

Example:
    A connection given as an environment variable (JSON form)::

        AIRFLOW_CONN_LANCEDB_S3='{"conn_type": "lancedb", "host": "s3://my-bucket/vectors",
            "login": "AKIA...", "password": "...",
            "extra": {"storage_options": {"region": "eu-west-1"}}}'

    >>> hook = LanceDBHook("lancedb_s3")  # doctest: +SKIP
    >>> hook.open_table("documents").count_rows()  # doctest: +SKIP
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from qwen3_pipeline.airflow.assets import local_uri
from qwen3_pipeline.airflow.provider_info import CONNECTION_TYPE, DEFAULT_CONNECTION_ID
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import validate_uri

# (login option, password option) per URI scheme: the object-store option names LanceDB reads.
CREDENTIAL_OPTIONS: dict[str, tuple[str | None, str]] = {
    "s3": ("aws_access_key_id", "aws_secret_access_key"),
    "s3a": ("aws_access_key_id", "aws_secret_access_key"),
    "gs": (None, "google_service_account_key"),
    "gcs": (None, "google_service_account_key"),
    "az": ("azure_storage_account_name", "azure_storage_account_key"),
    "abfs": ("azure_storage_account_name", "azure_storage_account_key"),
    "abfss": ("azure_storage_account_name", "azure_storage_account_key"),
    "azure": ("azure_storage_account_name", "azure_storage_account_key"),
}
# Storage option names whose values are credentials (masked in task logs).
_CREDENTIAL_NAME = re.compile(r"key|secret|token|passw|credential|sas|signature", re.IGNORECASE)


@dataclass(frozen=True)
class LanceDBDestination:
    """A LanceDB database and the storage options to reach it.

    Its ``repr`` lists the option names only, so printing a destination never shows a secret.

    Attributes:
        uri: The database URI (a local path made absolute).
        storage_options: Options for ``lancedb.connect`` (None when there are none).
    """

    uri: str
    storage_options: dict[str, str] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        names = sorted(self.storage_options or {})
        return f"LanceDBDestination(uri={self.uri!r}, storage_options={names})"


def is_credential_option(name: str) -> bool:
    """Whether a storage option's value is a credential, judged by its name.

    Example:
        >>> is_credential_option("azure_storage_account_key"), is_credential_option("region")
        (True, False)
    """
    return bool(_CREDENTIAL_NAME.search(name))


def destination_from_connection(
    *,
    host: str | None,
    login: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    conn_id: str = "?",
) -> LanceDBDestination:
    """Read a LanceDB destination from a connection's fields (see the module docstring).

    Raises:
        ConfigError: No URI, storage options that are not a JSON object of strings, or a
            login/password whose storage option cannot be told from the URI's scheme.
    """
    uri = extra.get("uri") or host
    if not uri:
        raise ConfigError(
            f"LanceDB connection {conn_id!r} has no URI: set Host (or the extra's 'uri') to a "
            "directory or an object-store URI such as s3://bucket/vectors"
        )
    uri = local_uri(validate_uri(str(uri)))
    options = _storage_options(extra.get("storage_options"), conn_id)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    login_default, password_default = CREDENTIAL_OPTIONS.get(scheme, (None, None))
    for what, value, name in (
        ("login", login, extra.get("login_option") or login_default),
        ("password", password, extra.get("password_option") or password_default),
    ):
        if not value:
            continue
        if not name:
            raise ConfigError(
                f"LanceDB connection {conn_id!r} has a {what} but no storage option to pass "
                f"it as for URI {uri!r}: set the extra's '{what}_option' (e.g. "
                "'aws_secret_access_key'), or move it into the extra's storage_options"
            )
        options[str(name)] = str(value)
    return LanceDBDestination(uri=uri, storage_options=options or None)


def _storage_options(raw: Any, conn_id: str) -> dict[str, str]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"LanceDB connection {conn_id!r}: the extra's storage_options is not valid "
                f"JSON ({e.msg} at character {e.pos})"
            ) from None
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(
            f"LanceDB connection {conn_id!r}: the extra's storage_options must be a JSON "
            "object of option names to values"
        )
    return {k: str(v) for k, v in raw.items() if v is not None}


class LanceDBHook(BaseHook):
    """Reach a LanceDB database through an Airflow connection of type ``lancedb``.

    Args:
        lancedb_conn_id: The connection (URI and credentials); None to use ``uri`` alone.
        uri: A database URI stated in the DAG (no secrets); it takes precedence over the
            connection's, whose credentials still apply.

    Raises:
        ConfigError: Neither a connection nor a URI.
    """

    conn_name_attr = "lancedb_conn_id"
    default_conn_name = DEFAULT_CONNECTION_ID
    conn_type = CONNECTION_TYPE
    hook_name = "LanceDB"

    def __init__(
        self,
        lancedb_conn_id: str | None = DEFAULT_CONNECTION_ID,
        *,
        uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if lancedb_conn_id is None and uri is None:
            raise ConfigError("LanceDBHook needs a connection id (lancedb_conn_id=) or a uri=")
        self.lancedb_conn_id = lancedb_conn_id
        self.uri = uri
        self._destination: LanceDBDestination | None = None

    def destination(self) -> LanceDBDestination:
        """Return the database URI and storage options (the connection is read once).

        Every credential it returns is registered with Airflow's secrets masker first.

        Raises:
            ConfigError: The connection's fields do not describe a LanceDB destination.
        """
        if self._destination is not None:
            return self._destination
        if self.lancedb_conn_id is None:
            assert self.uri is not None
            found = LanceDBDestination(uri=local_uri(validate_uri(self.uri)))
        else:
            conn = self.get_connection(self.lancedb_conn_id)
            extra = dict(conn.extra_dejson)
            if self.uri is not None:
                extra["uri"] = self.uri  # the DAG's URI wins; the credentials still apply
            found = destination_from_connection(
                host=conn.host,
                login=conn.login,
                password=conn.password,
                extra=extra,
                conn_id=self.lancedb_conn_id,
            )
        for name, value in (found.storage_options or {}).items():
            if is_credential_option(name):
                mask_secret(value)
        self._destination = found
        return found

    def get_conn(self) -> Any:
        """Connect to the database (``lancedb.connect`` with the storage options)."""
        import lancedb

        found = self.destination()
        return lancedb.connect(found.uri, storage_options=found.storage_options)

    def open_table(self, name: str, *, version: int | None = None) -> Any:
        """Open table ``name``, checked out at ``version`` when given (read-only then)."""
        table = self.get_conn().open_table(name)
        if version is not None:
            table.checkout(version)
        return table

    def search(
        self,
        table: str,
        query: str,
        *,
        k: int = 10,
        version: int | None = None,
        chunks: bool = False,
        rerank_model: str | None = None,
        candidates: int | None = None,
        text_column: str | None = None,
        instruction: str | None = None,
        device: str = "auto",
    ) -> list[dict[str, Any]]:
        """Search a vector table of this connection, reranked when ``rerank_model`` is given.

        The query is embedded with the table's own model and spec; with ``rerank_model`` (a
        Qwen3-Reranker hub id or checkpoint directory) the ``candidates`` nearest rows are
        scored by the reranker and the ``k`` best returned, with ``similarity`` and
        ``rerank_score`` (see :func:`qwen3_pipeline.consumers.vector_search.search`). Both
        models load for this call and are released before it returns.

        Args:
            table: Vector table name.
            query: The query text.
            k: Rows (documents, on a chunk table) to return.
            version: Lance version to read (None: the newest checked version).
            chunks: On a chunk table, return chunks rather than documents.
            rerank_model: The reranker (None: vector order only).
            candidates: Vector candidates the reranker scores (default ``max(k, 50)``).
            text_column: The column the reranker reads (default ``chunk_text``; required on a
                table of whole documents: a carried text column).
            instruction: The reranker's instruction (None: the model card's web-search task).
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for both models.

        Returns:
            The result rows as dicts (JSON-ready for XCom but for timestamps, which Airflow
            serialises).

        Raises:
            ConfigError: A bad option (see ``search``), or the table does not exist.
        """
        from qwen3_pipeline.consumers.vector_search import open_vector_table, search
        from qwen3_pipeline.embedding.encoder import Qwen3Encoder
        from qwen3_pipeline.embedding.reranker import Qwen3Reranker

        found = self.destination()
        vectors = open_vector_table(
            found.uri, table, version=version, storage_options=found.storage_options
        )
        encoder = Qwen3Encoder(vectors.spec, device=device, progress=False)
        reranker = None if rerank_model is None else Qwen3Reranker(rerank_model, device=device)
        try:
            hits = search(
                vectors,
                query,
                k=k,
                embedder=encoder,
                chunks=chunks,
                rerank=reranker,
                candidates=candidates,
                text_column=text_column,
                rerank_instruction=instruction,
            )
        finally:
            encoder.close()
            if reranker is not None:
                reranker.close()
        return list(hits.to_pylist())

    def test_connection(self) -> tuple[bool, str]:
        """List the database's tables (the UI's *Test* button)."""
        try:
            from qwen3_pipeline.store import list_table_names

            names = list_table_names(self.get_conn())
        except Exception as e:  # the UI shows the reason; nothing is raised
            return False, f"{type(e).__name__}: {e}"
        return True, f"connected to {self.destination().uri}: {len(names)} table(s)"
