"""The demo: a real corpus, the dbt project, the Dagster code location and the Airflow twin.

Nothing in the engine imports this package. ``python -m qwen3_pipeline.demo`` (``make demo``)
runs the main job on the embedded defaults.

- :mod:`qwen3_pipeline.demo.run`: the ``make demo`` job;
- :mod:`qwen3_pipeline.demo.definitions`: the code location ``workspace.yaml`` loads;
- :mod:`qwen3_pipeline.demo.location`: the demo's Dagster definitions;
- :mod:`qwen3_pipeline.demo.dbt`: the dbt project (``dbt_models/``) wired into Dagster;
- :mod:`qwen3_pipeline.demo.corpus`: the standard-library docstring corpus;
- :mod:`qwen3_pipeline.demo.model`: a tiny random-initialised Qwen3 checkpoint (offline);
- :mod:`qwen3_pipeline.demo.summary`: the summary both demos print;
- :mod:`qwen3_pipeline.demo.airflow_run`: ``make airflow-demo``.
"""
