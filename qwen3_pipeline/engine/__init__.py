"""The refresh engine: a plan pass that finds everything, then an apply pass that writes it.

- :mod:`qwen3_pipeline.engine.plan`: read -> render/validate -> hash -> diff; exact counts,
  work spilled to disk, nothing written (a dry run is the plan printed);
- :mod:`qwen3_pipeline.engine.apply`: embed what the plan lists, write in chunks, delete at
  the end, swap a rebuild in;
- :mod:`qwen3_pipeline.engine.report`: the one counter set every driver prints.

Drivers (the CLI, Dagster, later Airflow) call :func:`qwen3_pipeline.engine.refresh.refresh`, or the
two passes themselves.
"""
