"""Run the demo pipeline end to end without the UI: ``python -m qwen3_pipeline.demo.run``.

Materialises every asset of the demo code location (:mod:`qwen3_pipeline.demo.definitions`) in one
in-process run covering all shards: the standard-library docstrings into DuckDB, the dbt models,
the Qwen3 vectors in LanceDB (with their checks), the index upkeep and the near-duplicate
report. Then it prints where the vector table is, its counts and a sample search. Run it twice:
the second run embeds nothing and makes no Lance commit.

The run history goes to ``$DAGSTER_HOME`` if set, else ``<data_dir>/dagster_home``; point
``DAGSTER_HOME`` there and start ``dagster dev -w workspace.yaml`` to see these runs in the UI.

The dbt manifest is prepared under ``<data_dir>/dbt/target`` first if it is missing or out of
date (the code location only reads it).

Model: ``QWEN3_PIPELINE_MODEL`` if set. Otherwise the default hub model is used when it can be
loaded; when it cannot (offline, no cached copy), a random-weight demo checkpoint is built under
``<data_dir>/demo-model`` and a loud notice says that its vectors are not semantic.
"""

import argparse
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg

from qwen3_pipeline.core.errors import Qwen3PipelineError
from qwen3_pipeline.dagster.automation import all_partitions_tags
from qwen3_pipeline.dagster.metadata import (
    RUN_TOKENS,
    RUN_VERSION_BEFORE,
    TABLE_NAME,
    TABLE_ROWS,
    TABLE_VERSION,
    run_counters,
)
from qwen3_pipeline.dagster.resources import DEFAULT_MODEL
from qwen3_pipeline.dagster.vectors import open_vectors
from qwen3_pipeline.demo import model as demo_model
from qwen3_pipeline.demo.dbt import ensure_dbt_manifest
from qwen3_pipeline.demo.location import MODEL_ENV, DemoSettings, build_definitions
from qwen3_pipeline.demo.summary import DemoSummary, search_lines

EMBEDDING_ASSET = dg.AssetKey("document_vectors")
INDEX_ASSET = dg.AssetKey("document_vectors_index")
EVAL_ASSET = dg.AssetKey("golden_rerank_eval")
CHUNKS_ASSET = dg.AssetKey("document_chunks")
NEAR_DUPLICATES_ASSET = dg.AssetKey("near_duplicate_documents")
DEMO_MODEL_DIR = "demo-model"
DEFAULT_QUERY = "parse a JSON document into Python objects"
_RULE = "!" * 78


def hub_model_loadable(model: str, revision: str | None = None) -> bool:
    """Whether ``model`` can be loaded here: cached (config and weights), or the hub reachable.

    Never waits long offline: the cache is consulted first, then a 3-second connection test
    to the hub decides before any download is tried.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        return False
    try:
        for filename in ("config.json", "model.safetensors"):
            hf_hub_download(model, filename, revision=revision, local_files_only=True)
        return True
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        return False
    try:
        hf_hub_download(model, "config.json", revision=revision)
    except Exception:  # unknown id, gated, network failure: all mean "not loadable here"
        return False
    return True


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def build_demo_model(data_dir: Path) -> Path:
    """Build (once) the random-weight demo checkpoint under ``<data_dir>/demo-model``.

    The builder and the Qwen tokenizer ship with the package (:mod:`qwen3_pipeline.demo.model`).
    """
    target = (data_dir / DEMO_MODEL_DIR).resolve()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # Looked up on the module when called, so tests can stand in a fake builder.
    return demo_model.build_tiny_qwen3_checkpoint(target, **demo_model.SHAPES["demo"])


def choose_model(settings: DemoSettings, environ: dict[str, str] | os._Environ[str]) -> str:
    """Return the model to run: the configured one, the hub default, or the demo fallback."""
    if environ.get(MODEL_ENV):
        return settings.model
    if hub_model_loadable(DEFAULT_MODEL):
        return DEFAULT_MODEL
    fallback = build_demo_model(settings.data_dir)
    print(
        f"\n{_RULE}\n"
        f"  NOTICE: {DEFAULT_MODEL} could not be loaded (offline and not cached).\n"
        f"  Using a RANDOM-WEIGHT demo checkpoint: {fallback}\n"
        "  Its vectors are NOT semantic: search results and near duplicates are arbitrary.\n"
        f"  For real vectors set {MODEL_ENV} to a local Qwen3-Embedding checkpoint\n"
        f"  (e.g. a copy of {DEFAULT_MODEL}) or let this machine reach the Hugging Face hub.\n"
        f"{_RULE}\n",
        file=sys.stderr,
    )
    return str(fallback)


def demo_instance(data_dir: Path) -> dg.DagsterInstance:
    """The Dagster instance of the demo: ``$DAGSTER_HOME``, else ``<data_dir>/dagster_home``."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    home = (data_dir / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch()
    return dg.DagsterInstance.from_config(str(home))


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, Any]:
    entry = instance.get_latest_materialization_event(key)
    if entry is None or entry.asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in entry.asset_materialization.metadata.items()}


def run_demo(*, limit: int | None, query: str, settings: DemoSettings | None = None) -> int:
    """Materialise the whole demo pipeline once and print a summary.

    Args:
        limit: Load a seeded sample of this many docstrings (None: all of them).
        query: The sample search.
        settings: Location settings (default: from the environment, with the model chosen by
            :func:`choose_model`).

    Returns:
        The process exit status (0 on success).
    """
    if settings is None:
        settings = DemoSettings.from_env()
        settings = replace(settings, model=choose_model(settings, os.environ))
    # First use: the code location reads the dbt manifest but never builds it.
    ensure_dbt_manifest()
    defs = build_definitions(settings)
    embedding = defs.resolve_assets_def(EMBEDDING_ASSET)
    assert embedding.partitions_def is not None
    instance = demo_instance(settings.data_dir)
    print(f"model: {settings.model}   data: {settings.data_dir.resolve()}", file=sys.stderr)
    result = dg.materialize(
        # The reranking evaluation embeds the golden queries (a model load even when nothing
        # changed): launched from the UI, not by every demo run.
        [
            a
            for a in defs.assets or []
            if isinstance(a, dg.AssetsDefinition) and EVAL_ASSET not in a.keys
        ],
        resources=dict(defs.resources or {}),
        instance=instance,
        tags=all_partitions_tags(embedding.partitions_def),
        run_config={
            "ops": {"raw_docstrings": {"config": {"limit": limit}}},
            "loggers": {"console": {"config": {"log_level": "INFO"}}},
        },
        raise_on_error=False,
    )
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_failure]
        print("demo run failed:\n" + "\n".join(str(f) for f in failures), file=sys.stderr)
        return 1
    report = _latest_metadata(instance, EMBEDDING_ASSET)
    vectors = open_vectors(EMBEDDING_ASSET, instance=instance, index_asset_key=INDEX_ASSET)
    index = _latest_metadata(instance, INDEX_ASSET)
    near = _latest_metadata(instance, NEAR_DUPLICATES_ASSET)
    summary = DemoSummary(
        table_uri=vectors.uri,
        table_name=vectors.name,
        table_version=vectors.version,
        stored_rows=vectors.count_rows(),
        counters=run_counters(report),
        # A watermark run reports the rows it read; a plain run reads every row it scans.
        read_rows=int(report.get("qwen3/run/read_rows", run_counters(report).get("scanned", 0))),
        tokens=int(report.get(RUN_TOKENS, 0)),
        padding_efficiency=float(report.get("qwen3/run/padding_efficiency", 1.0)),
        version_before=report.get(RUN_VERSION_BEFORE),
        version_after=report.get(TABLE_VERSION),
        search_mode=str(index.get("qwen3/search_mode", "exact")),
        near_duplicate_pairs=int(near.get("dagster/row_count", 0)),
        near_duplicate_table=str(near.get("dagster/table_name", "?")),
    )
    from qwen3_pipeline.consumers.vector_search import search

    hits = search(vectors, query, k=5).to_pylist()
    chunks = _latest_metadata(instance, CHUNKS_ASSET)
    print("\n".join([*summary.lines(), chunks_line(chunks), *search_lines(query, hits)]))
    return 0


def chunks_line(metadata: dict[str, Any]) -> str:
    """One summary line for the chunk table, from its latest materialization's metadata."""
    counters = run_counters(metadata)
    return (
        f"chunks: {metadata.get(TABLE_ROWS, 0)} rows in {metadata.get(TABLE_NAME, '?')} "
        f"({counters['scanned']} long documents; this run "
        f"{metadata.get('qwen3/run/chunks_embedded', 0)} chunks embedded, "
        f"{metadata.get('qwen3/run/chunks_reused', 0)} reused, "
        f"{metadata.get('qwen3/run/chunks_deleted', 0)} deleted)"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m qwen3_pipeline.demo.run``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=int, default=None, help="load a sample of N docstrings (default: all)"
    )
    parser.add_argument("--query", default=DEFAULT_QUERY, help="the sample search")
    args = parser.parse_args(argv)
    try:
        return run_demo(limit=args.limit, query=args.query)
    except Qwen3PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
