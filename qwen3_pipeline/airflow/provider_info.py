"""What Airflow's providers manager learns about this package (no Airflow import here).

The ``apache_airflow_provider`` entry point of the distribution points at
:func:`get_provider_info`; Airflow calls it while discovering providers, so it must stay cheap
and import nothing. It registers the ``lancedb`` connection type (shown in the UI's connection
form with the fields relabelled for a LanceDB destination) and lists the operator and hook.
"""

from typing import Any

CONNECTION_TYPE = "lancedb"
DEFAULT_CONNECTION_ID = "lancedb_default"
HOOK_CLASS = "qwen3_pipeline.airflow.hooks.LanceDBHook"

# How the UI's generic connection form reads for a LanceDB destination. The secret goes in
# Password (always masked by Airflow); the other options go in the extra's storage_options.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "port"],
    "relabeling": {
        "host": "LanceDB URI",
        "login": "Access key id / account name (optional)",
        "password": "Secret key / account key (optional)",
    },
    "placeholders": {
        "host": "s3://my-bucket/vectors, gs://..., az://..., or /data/lancedb",
        "login": "passed as login_option: aws_access_key_id for s3:// by default",
        "password": "passed as password_option: aws_secret_access_key for s3:// by default",
    },
}

CONN_FIELDS: dict[str, Any] = {
    "storage_options": {
        "label": "Storage options",
        "description": (
            "JSON object of object-store options (region, endpoint...). Keep secrets in "
            "Password; option values named like credentials are masked in task logs too."
        ),
        "schema": {"type": ["string", "null"]},
    },
    "login_option": {
        "label": "Storage option for Login",
        "description": (
            "Default by URI scheme: aws_access_key_id (s3), azure_storage_account_name (az)."
        ),
        "schema": {"type": ["string", "null"]},
    },
    "password_option": {
        "label": "Storage option for Password",
        "description": (
            "Default by URI scheme: aws_secret_access_key (s3), azure_storage_account_key (az), "
            "google_service_account_key (gs)."
        ),
        "schema": {"type": ["string", "null"]},
    },
}


def get_provider_info() -> dict[str, Any]:
    """Return the provider description Airflow's providers manager reads.

    Example:
        >>> get_provider_info()["connection-types"][0]["connection-type"]
        'lancedb'
    """
    return {
        "package-name": "qwen3-pipeline",
        "name": "Qwen3 embeddings in LanceDB",
        "description": (
            "Keep a LanceDB vector table in sync with a source table using Qwen3-Embedding: "
            "an incremental refresh operator and a LanceDB connection type."
        ),
        "integrations": [
            {
                "integration-name": "LanceDB",
                "external-doc-url": "https://lancedb.github.io/lancedb/",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "LanceDB",
                "python-modules": ["qwen3_pipeline.airflow.operators"],
            }
        ],
        "hooks": [
            {
                "integration-name": "LanceDB",
                "python-modules": ["qwen3_pipeline.airflow.hooks"],
            }
        ],
        "connection-types": [
            {
                "connection-type": CONNECTION_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": "LanceDB",
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
