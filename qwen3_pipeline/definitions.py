"""The demo Dagster code location (``workspace.yaml`` loads ``qwen3_pipeline.definitions``).

Raw standard-library docstrings in DuckDB -> dbt models -> Qwen3 vectors in LanceDB (8 hash
shards) -> ANN index upkeep and a near-duplicate report; an hourly schedule and automation on
dbt updates. Configured by environment variables; see
:mod:`qwen3_pipeline.dagster_defs.location`. Loading it imports neither torch nor transformers:
the model is loaded when a run that needs it starts. Nor does it run dbt or write anything: the
dbt assets come from the manifest prepared under the data directory by
``python -m qwen3_pipeline.dagster_defs.dbt`` (also run by ``make setup`` and the demo), and
loading fails with a message naming that command when it is missing or out of date. Only
``dagster dev`` prepares it on load (see :mod:`qwen3_pipeline.dagster_defs.dbt`).

Run the UI with ``dagster dev -w workspace.yaml`` from the repository root, or
``dagster dev -m qwen3_pipeline.definitions`` where the package is installed.
"""

from qwen3_pipeline.dagster_defs.location import DemoSettings, build_definitions

defs = build_definitions(DemoSettings.from_env())
