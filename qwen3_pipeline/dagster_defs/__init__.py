"""Dagster definitions of the pipeline: resources, assets, checks, schedules and dbt wiring."""
