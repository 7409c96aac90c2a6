"""Downstream consumer assets of an embedding asset: index upkeep, near duplicates, evaluation.

:func:`build_golden_rerank_eval_asset` scores a golden set with and without a reranker; it
loads the query embedder and the reranker, and it is not skipped (see its docstring). The
notes below are about the other two.

Both are thin: the logic lives in :mod:`qwen3_pipeline.consumers.vector_search`. Neither requires
the
embedder resource, so neither loads the model (whatever the executor).

Both skip their work when the vector table is at the Lance version they last processed (with
the same settings): each materialisation records the table it processed (``qwen3/table_uri``,
``qwen3/table_name``), the version (``qwen3/lance_version``: for the index asset, the version
*after* its own commit) and its settings (``qwen3/settings``); the next run reads them back from
the instance's latest materialisation of the asset and compares. A skipped run still
materialises, with ``qwen3/skipped: true``, the reason (``qwen3/reason``), the run whose outputs
are kept (``qwen3/computed_run_id``), the previous metadata carried over and the same data
version, so nothing further downstream becomes stale. Launch with run config
``force: true`` (:class:`ConsumerConfig`) to redo the work anyway.

Example:
    >>> index = build_vector_index_asset(embedding_asset=document_vectors)  # doctest: +SKIP
    >>> report = build_near_duplicates_asset(  # doctest: +SKIP
    ...     embedding_asset=document_vectors,
    ...     duckdb_path=lambda: Path("data/warehouse.duckdb"),
    ...     index_asset=index,
    ... )
"""

# No `from __future__ import annotations`: Dagster reads the `config` annotation at runtime.

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from pydantic import Field

from qwen3_pipeline.consumers.near_duplicates import near_duplicate_report
from qwen3_pipeline.consumers.vector_search import (
    IndexPolicy,
    VectorTable,
    maintain_vector_index,
)
from qwen3_pipeline.core.errors import ConfigError, UnsafeNameError
from qwen3_pipeline.dagster.vectors import open_vectors
from qwen3_pipeline.lifecycle.gate import check_golden_keys, evaluate, evaluate_with_rerank
from qwen3_pipeline.lifecycle.golden import load_golden_set
from qwen3_pipeline.lifecycle.metrics import Evaluation

DEFAULT_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Metadata keys of the skip decision (see the module docstring).
TABLE_URI = "qwen3/table_uri"
TABLE_NAME = "qwen3/table_name"
LANCE_VERSION = "qwen3/lance_version"
SETTINGS = "qwen3/settings"
SKIPPED = "qwen3/skipped"
REASON = "qwen3/reason"
COMPUTED_RUN_ID = "qwen3/computed_run_id"


class ConsumerConfig(dg.Config):
    """Run config of the consumer assets (the UI launchpad shows it).

    Example:
        Launchpad YAML that recomputes the near-duplicate report::

            ops:
              near_duplicate_documents:
                config:
                  force: true
    """

    force: bool = Field(
        default=False,
        description=(
            "Redo the work even when the vector table is at the version (and the settings are "
            "those) the asset last processed."
        ),
    )


# --------------------------------------------------------------------------- skip decision


@dataclass(frozen=True, kw_only=True)
class ProcessedState:
    """What a consumer asset works on: one vector table at one version, with its settings.

    Attributes:
        uri: Database URI of the vector table.
        table: Table name.
        version: Lance version.
        settings: The asset's own settings that shape its output (JSON types only).
    """

    uri: str
    table: str
    version: int
    settings: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """The materialisation metadata that the next run compares against."""
        return {
            TABLE_URI: self.uri,
            TABLE_NAME: self.table,
            LANCE_VERSION: self.version,
            SETTINGS: dg.MetadataValue.json(self.settings),
        }


@dataclass(frozen=True, kw_only=True)
class PreviousMaterialization:
    """The latest materialisation of a consumer asset, as recorded in the instance.

    Attributes:
        run_id: The run that recorded it.
        metadata: Its metadata as recorded (``MetadataValue`` objects), to carry over.
    """

    run_id: str
    metadata: Mapping[str, Any]

    @property
    def values(self) -> dict[str, Any]:
        """The metadata as plain values."""
        return {key: getattr(value, "value", value) for key, value in self.metadata.items()}

    @property
    def computed_run_id(self) -> str:
        """The run whose outputs it reports (an earlier one when it was itself skipped)."""
        recorded = self.values.get(COMPUTED_RUN_ID)
        return recorded if isinstance(recorded, str) and recorded else self.run_id


@dataclass(frozen=True)
class Decision:
    """Whether to skip the work, and why (the reason is recorded either way)."""

    skip: bool
    reason: str


def previous_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey
) -> PreviousMaterialization | None:
    """Return the latest materialisation of ``asset_key`` (None when there is none)."""
    entry = instance.get_latest_materialization_event(asset_key)
    materialization = entry.asset_materialization if entry is not None else None
    if entry is None or materialization is None:
        return None
    return PreviousMaterialization(run_id=entry.run_id, metadata=dict(materialization.metadata))


def json_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``settings`` as JSON types, so they compare equal to what the instance stores."""
    loaded: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    return loaded


def decide(
    previous: PreviousMaterialization | None, current: ProcessedState, *, force: bool
) -> Decision:
    """Decide whether the work on ``current`` was already done by ``previous`` (pure).

    Args:
        previous: The asset's latest materialisation, if any.
        current: The table, version and settings this run would process.
        force: Redo the work regardless.

    Returns:
        ``skip`` when the previous materialisation processed the same table at the same
        version with the same settings, with the reason for the decision.

    Example:
        >>> now = ProcessedState(uri="db", table="docs", version=3, settings={})
        >>> decide(None, now, force=False)
        Decision(skip=False, reason='first materialization')
    """
    if force:
        return Decision(False, "forced by run config (force: true)")
    if previous is None:
        return Decision(False, "first materialization")
    recorded = previous.values
    since = f"run {previous.computed_run_id[:8]}"
    version = recorded.get(LANCE_VERSION)
    # A bool is an int in Python, and an older materialisation may lack the keys: recompute.
    if not isinstance(version, int) or isinstance(version, bool):
        return Decision(False, f"{since} recorded no table version")
    if (recorded.get(TABLE_URI), recorded.get(TABLE_NAME)) != (current.uri, current.table):
        return Decision(
            False,
            f"table changed since {since}: {recorded.get(TABLE_URI)}/"
            f"{recorded.get(TABLE_NAME)} -> {current.uri}/{current.table}",
        )
    if version != current.version:
        return Decision(
            False, f"table {current.table!r} version {version} -> {current.version} since {since}"
        )
    if recorded.get(SETTINGS) != current.settings:
        return Decision(False, f"settings changed since {since}")
    return Decision(
        True, f"table {current.table!r} version {current.version} unchanged since {since}"
    )


def skipped_metadata(
    previous: PreviousMaterialization,
    current: ProcessedState,
    decision: Decision,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the metadata of a skipped run.

    The previous metadata is carried over (row count, schema, top pairs still describe the
    kept outputs, and the UI's plots do not drop to nothing), then ``overrides`` replace what
    describes this run's own actions.
    """
    return {
        **previous.metadata,
        **current.metadata(),
        SKIPPED: True,
        REASON: decision.reason,
        COMPUTED_RUN_ID: previous.computed_run_id,
        **(overrides or {}),
    }


def computed_metadata(context: dg.AssetExecutionContext, decision: Decision) -> dict[str, Any]:
    """Return the skip-decision metadata of a run that did the work."""
    return {SKIPPED: False, REASON: decision.reason, COMPUTED_RUN_ID: context.run.run_id}


def vector_table_name(embedding_asset: dg.AssetsDefinition) -> str:
    """Return the LanceDB table an asset of :func:`.embedding.build_embedding_asset` writes.

    Raises:
        ConfigError: The asset was not built by the factory.
    """
    spec = embedding_asset.specs_by_key[embedding_asset.key]
    value = (spec.metadata or {}).get("qwen3/table_name")
    name = getattr(value, "value", value)
    if not isinstance(name, str):
        raise ConfigError(
            f"asset {embedding_asset.key.to_user_string()} has no qwen3/table_name metadata; "
            "build it with build_embedding_asset()"
        )
    return name


def build_vector_index_asset(
    *,
    embedding_asset: dg.AssetsDefinition,
    key: dg.AssetKey | str | Sequence[str] | None = None,
    lancedb_key: str = "lancedb",
    policy: IndexPolicy | None = None,
    group_name: str | None = None,
    automation_condition: dg.AutomationCondition | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
) -> dg.AssetsDefinition:
    """Build the asset that keeps the vector table's ANN index.

    Below ``policy.min_rows`` rows it leaves the table unindexed (exact search); past it, it
    builds an IVF-HNSW-SQ cosine index once, then folds new rows in with ``optimize()`` after
    each refresh (through :func:`~qwen3_pipeline.store.upkeep.optimize_table`: old versions are
    pruned, tagged ones kept). It commits only when there is something to do.

    It records the table version after its own commit; a run that finds the live table still
    at that version, with the same policy, skips the upkeep (see the module docstring). Its
    data version is ``lance-v<version>``.

    Args:
        embedding_asset: The embedding asset whose table is indexed.
        key: Asset key (default: the embedding asset's key + ``_index``).
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        policy: Row threshold and index settings.
        group_name: Dagster asset group.
        automation_condition: E.g. ``dg.AutomationCondition.eager()``.
        retry_policy: Retries (LanceDB commit conflicts are transient).
    """
    table = vector_table_name(embedding_asset)
    upstream = embedding_asset.key
    asset_key = (
        dg.AssetKey.from_coercible(key)
        if key is not None
        else dg.AssetKey([*upstream.path[:-1], f"{upstream.path[-1]}_index"])
    )
    chosen = policy or IndexPolicy()
    settings = json_settings({"policy": dataclasses.asdict(chosen)})

    @dg.asset(
        key=asset_key,
        deps=[upstream],
        required_resource_keys={lancedb_key},
        group_name=group_name,
        automation_condition=automation_condition,
        retry_policy=retry_policy,
        kinds={"python", "lancedb"},
        description=(
            f"ANN index upkeep of LanceDB table {table!r}: exact search below "
            f"{chosen.min_rows} rows, then an IVF-HNSW-SQ cosine index kept current with "
            "optimize(). Skipped while the table version is the one it last left."
        ),
    )
    def _vector_index(
        context: dg.AssetExecutionContext, config: ConsumerConfig
    ) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        live = lancedb.open_table(table)
        current = ProcessedState(
            uri=lancedb.resolved_uri(), table=table, version=int(live.version), settings=settings
        )
        previous = previous_materialization(context.instance, context.asset_key)
        decision = decide(previous, current, force=config.force)
        if decision.skip and previous is not None:
            context.log.info(f"index upkeep of {table} skipped: {decision.reason}")
            return dg.MaterializeResult(
                metadata=skipped_metadata(
                    previous,
                    current,
                    decision,
                    # Row count, index name and unindexed rows still hold at this version;
                    # the action and the pruning were the previous run's.
                    overrides={
                        "qwen3/index_action": "skipped",
                        "qwen3/versions_pruned": 0,
                        "qwen3/upstream_lance_version": current.version,
                    },
                ),
                data_version=dg.DataVersion(f"lance-v{current.version}"),
            )
        upkeep = maintain_vector_index(live, chosen)
        context.log.info(f"index upkeep of {table} ({decision.reason}): {upkeep.as_dict()}")
        # The version after this asset's own commit is what the next run compares against.
        after = dataclasses.replace(current, version=upkeep.version_after)
        return dg.MaterializeResult(
            metadata={
                "qwen3/index_action": upkeep.action,
                "qwen3/search_mode": "ann" if upkeep.index_name else "exact",
                "qwen3/index_name": upkeep.index_name,
                "qwen3/unindexed_rows": upkeep.unindexed_rows,
                "qwen3/fragments": upkeep.fragments,
                "qwen3/versions_pruned": upkeep.versions_pruned,
                "qwen3/upstream_lance_version": upkeep.version_before,
                "dagster/row_count": upkeep.row_count,
                **after.metadata(),
                **computed_metadata(context, decision),
            },
            data_version=dg.DataVersion(f"lance-v{upkeep.version_after}"),
        )

    return _vector_index


def replace_duckdb_table(path: Path, table: str, rows: pa.Table) -> int:
    """Create or replace ``main.<table>`` in the DuckDB file ``path`` with ``rows``, atomically.

    Raises:
        UnsafeNameError: ``table`` is not a plain identifier.
    """
    import duckdb

    if not _IDENTIFIER.match(table):
        raise UnsafeNameError(f"DuckDB table name {table!r} is not a plain SQL identifier")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    try:
        con.register("incoming_rows", rows)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f'CREATE OR REPLACE TABLE main."{table}" AS SELECT * FROM incoming_rows')
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return rows.num_rows


def duckdb_table_exists(path: Path, table: str) -> bool:
    """Whether the DuckDB file ``path`` exists and holds ``main.<table>`` (opened read-only)."""
    import duckdb

    if not path.is_file():
        return False
    con = duckdb.connect(str(path), read_only=True)
    try:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_name = ?",
            [table],
        ).fetchone()
    finally:
        con.close()
    return bool(found and found[0])


def _markdown_pairs(pairs: pa.Table, limit: int = 10) -> str:
    columns = pairs.column_names
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in pairs.slice(0, limit).to_pylist():
        cells = [str(row[c]).replace("|", "\\|").replace("\n", " ")[:80] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_data_version(state: ProcessedState) -> dg.DataVersion:
    # The report is a function of the table version and the settings (output location
    # included): equal inputs give an equal data version, so a skip marks nothing stale.
    identity = json.dumps([state.uri, state.table, state.settings], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return dg.DataVersion(f"lance-v{state.version}-{digest}")


def build_near_duplicates_asset(
    *,
    embedding_asset: dg.AssetsDefinition,
    duckdb_path: Callable[[], Path],
    key: dg.AssetKey | str | Sequence[str] = "near_duplicate_documents",
    duckdb_table: str = "near_duplicates",
    label_columns: Sequence[str] = ("title",),
    threshold: float = 0.95,
    neighbors: int = 5,
    max_rows: int = 200_000,
    index_asset: dg.AssetsDefinition | None = None,
    lancedb_key: str = "lancedb",
    group_name: str | None = None,
    automation_condition: dg.AutomationCondition | None = None,
) -> dg.AssetsDefinition:
    """Build the asset that writes near-duplicate row pairs to a DuckDB table.

    It reads the vectors at the Lance version the embedding asset (or ``index_asset``) last
    recorded, keeps for each row its ``neighbors`` most similar rows with cosine similarity
    at least ``threshold``, and replaces ``main.<duckdb_table>`` with the pairs (plus the
    ``label_columns`` of both rows and the Lance version read).

    The report is ``O(n^2)``, so a run that would read the version the previous one read,
    with the same settings and output location, skips it and leaves the DuckDB table as it
    is, unless that table is gone (see the module docstring). Its data version is
    ``lance-v<version>-<settings digest>``.

    Args:
        embedding_asset: The embedding asset to read.
        duckdb_path: Returns the DuckDB file at run time.
        key: Asset key.
        duckdb_table: Output table name.
        label_columns: Carry-along columns copied beside each key (if the table has them).
        threshold: Smallest cosine similarity reported.
        neighbors: Neighbours considered per row.
        max_rows: The exact comparison is ``O(n^2)``; larger tables fail with a clear message.
        index_asset: The index-upkeep asset of the same table (read its version, run after it).
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        group_name: Dagster asset group.
        automation_condition: E.g. ``dg.AutomationCondition.eager()``.
    """
    upstream = embedding_asset.key
    deps = [upstream] + ([index_asset.key] if index_asset is not None else [])

    def compute(
        context: dg.AssetExecutionContext, vectors: VectorTable, path: Path
    ) -> dict[str, Any]:
        rows = vectors.count_rows()
        try:
            report = near_duplicate_report(
                vectors,
                label_columns=label_columns,
                threshold=threshold,
                neighbors=neighbors,
                max_rows=max_rows,
            )
        except ConfigError as e:  # too many rows: the same settings fail the same way
            raise dg.Failure(description=str(e), allow_retries=False) from e
        written = replace_duckdb_table(path, duckdb_table, report)
        context.log.info(f"{written} near-duplicate pairs among {rows} rows -> {path}")
        return {
            "dagster/row_count": written,
            "dagster/table_name": f"{path.stem}.main.{duckdb_table}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, str(f.type)) for f in report.schema]
            ),
            "qwen3/rows_compared": rows,
            "qwen3/threshold": threshold,
            "duckdb_path": dg.MetadataValue.path(str(path)),
            "qwen3/top_pairs": dg.MetadataValue.md(
                _markdown_pairs(report.drop_columns(["lance_version", "computed_at"]))
            ),
        }

    @dg.asset(
        key=dg.AssetKey.from_coercible(key),
        deps=deps,
        required_resource_keys={lancedb_key},
        group_name=group_name,
        automation_condition=automation_condition,
        kinds={"python", "duckdb"},
        description=(
            f"Pairs of rows of {upstream.to_user_string()} whose vectors have cosine "
            f"similarity >= {threshold} (up to {neighbors} per row), in DuckDB table "
            f"main.{duckdb_table}. Skipped while the vector version read is unchanged."
        ),
    )
    def _near_duplicates(
        context: dg.AssetExecutionContext, config: ConsumerConfig
    ) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        vectors = open_vectors(
            upstream,
            instance=context.instance,
            index_asset_key=index_asset.key if index_asset is not None else None,
            storage_options=lancedb.options(),
        )
        path = duckdb_path()
        current = ProcessedState(
            uri=vectors.uri,
            table=vectors.name,
            version=vectors.version,
            settings=json_settings(
                {
                    "threshold": threshold,
                    "neighbors": neighbors,
                    "label_columns": list(label_columns),
                    "duckdb_path": str(path),
                    "duckdb_table": duckdb_table,
                }
            ),
        )
        previous = previous_materialization(context.instance, context.asset_key)
        decision = decide(previous, current, force=config.force)
        # The kept output is the point of skipping: if someone dropped it, rebuild it.
        if decision.skip and not duckdb_table_exists(path, duckdb_table):
            decision = Decision(False, f"output table main.{duckdb_table} missing from {path}")
        if decision.skip and previous is not None:
            context.log.info(f"near-duplicate report skipped: {decision.reason}")
            return dg.MaterializeResult(
                metadata=skipped_metadata(previous, current, decision),
                data_version=_report_data_version(current),
            )
        context.log.info(f"near-duplicate report computed: {decision.reason}")
        return dg.MaterializeResult(
            metadata={
                **compute(context, vectors, path),
                **current.metadata(),
                **computed_metadata(context, decision),
            },
            data_version=_report_data_version(current),
        )

    return _near_duplicates


# Metadata of the golden-set evaluation asset (build_golden_rerank_eval_asset).
EVAL_K = "qwen3/eval/k"
EVAL_CANDIDATES = "qwen3/eval/candidates"
EVAL_QUERIES = "qwen3/eval/queries"
EVAL_EMBEDDING_MODEL = "qwen3/eval/embedding_model"
EVAL_RERANKER = "qwen3/eval/reranker_model"
EVAL_TEXT_COLUMN = "qwen3/eval/text_column"
EVAL_RECALL = "qwen3/eval/recall"
EVAL_NDCG = "qwen3/eval/ndcg"
EVAL_RERANKED_RECALL = "qwen3/eval/reranked_recall"
EVAL_RERANKED_NDCG = "qwen3/eval/reranked_ndcg"
EVAL_RECALL_DELTA = "qwen3/eval/recall_delta"
EVAL_NDCG_DELTA = "qwen3/eval/ndcg_delta"
EVAL_NOTE = "qwen3/eval/note"


def build_golden_rerank_eval_asset(
    *,
    embedding_asset: dg.AssetsDefinition,
    golden_set: Path | Callable[[], Path],
    golden_asset_key: dg.AssetKey | str | None = None,
    text_column: str,
    key: dg.AssetKey | str | Sequence[str] = "golden_rerank_eval",
    k: int = 10,
    candidates: int = 50,
    rerank_instruction: str | None = None,
    index_asset: dg.AssetsDefinition | None = None,
    embedder_key: str = "embedder",
    reranker_key: str | None = "reranker",
    lancedb_key: str = "lancedb",
    note: str | None = None,
    group_name: str | None = None,
    pool: str | None = "gpu",
) -> dg.AssetsDefinition:
    """Build the asset that scores a golden set on the vector table, without and with reranking.

    Each run reads the golden set (:func:`~qwen3_pipeline.lifecycle.golden.load_golden_set`),
    opens the table at the version readers see, and runs
    :func:`~qwen3_pipeline.lifecycle.gate.evaluate_with_rerank`: the same query vectors
    searched by vector alone and with the reranker over ``candidates`` vector candidates. Its
    metadata holds both means (``qwen3/eval/recall``, ``qwen3/eval/ndcg``,
    ``qwen3/eval/reranked_recall``, ``qwen3/eval/reranked_ndcg``), the deltas, ``k``,
    ``candidates``, the models and a per-query table. With ``reranker_key=None`` (no reranker
    configured) it scores the vector ranking only and says that reranking was skipped. An
    empty golden-set file (a corpus too small for queries) materialises ``qwen3/skipped: true``
    with the reason; a missing or malformed one, or relevant keys the table does not hold,
    fail the run (not retried).

    It loads the query embedder and the reranker, so it runs in the ``pool`` (the accelerator's).

    Args:
        embedding_asset: The embedding asset whose table is scored.
        golden_set: The golden-set JSONL file, or a function returning it at run time.
        golden_asset_key: The asset that writes the golden set (an upstream dependency).
        text_column: The column whose text the reranker reads (a carry column on a table of
            whole documents; ``chunk_text`` on a chunk table).
        key: Asset key.
        k: Documents ranked and scored per query.
        candidates: Vector candidates the reranker scores per query (at least ``k``).
        rerank_instruction: The reranker's ``Instruct`` (None: its default).
        index_asset: The index-upkeep asset of the same table (read its version, run after it).
        embedder_key: Resource key of the query embedder (the table's spec).
        reranker_key: Resource key of the reranker
            (:class:`~qwen3_pipeline.dagster.reranker_resource.Qwen3RerankerResource`); None
            when none is configured.
        lancedb_key: Resource key of the :class:`~.resources.LanceDBResource`.
        note: A caveat repeated in the description and the metadata (the demo's: random
            weights make the figures meaningless).
        group_name: Dagster asset group.
        pool: Dagster concurrency pool (the embedding assets' ``gpu``).

    Raises:
        ConfigError: ``candidates`` below ``k``.
    """
    if candidates < k:
        raise ConfigError(f"candidates={candidates} must be at least k={k}")
    upstream = embedding_asset.key
    deps: list[dg.AssetKey] = [upstream]
    if index_asset is not None:
        deps.append(index_asset.key)
    if golden_asset_key is not None:
        deps.append(dg.AssetKey.from_coercible(golden_asset_key))
    resource_keys = {lancedb_key, embedder_key} | ({reranker_key} if reranker_key else set())
    how = (
        f"and with reranking of the {candidates} nearest by {text_column!r}"
        if reranker_key
        else "(no reranker configured: reranking skipped)"
    )

    @dg.asset(
        key=dg.AssetKey.from_coercible(key),
        deps=deps,
        required_resource_keys=resource_keys,
        group_name=group_name,
        pool=pool,
        kinds={"python", "lancedb"},
        description=(
            f"recall@{k} and nDCG@{k} of the golden set on {upstream.to_user_string()}, by "
            f"vector search alone {how}, side by side." + (f" {note}" if note else "")
        ),
    )
    def _golden_rerank_eval(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        lancedb = getattr(context.resources, lancedb_key)
        embedder = getattr(context.resources, embedder_key)
        path = golden_set() if callable(golden_set) else golden_set
        if path.is_file() and not path.read_text(encoding="utf-8").strip():
            # The golden-set asset writes an empty file for a corpus too small to give queries
            # (the demo's `--limit 3`); that is no failure of a whole-pipeline run.
            context.log.warning(f"golden set {path} is empty: nothing to evaluate")
            return dg.MaterializeResult(
                metadata={
                    SKIPPED: True,
                    REASON: f"golden set {path} holds no query",
                    "golden_set": dg.MetadataValue.path(str(path)),
                }
            )
        try:
            golden = load_golden_set(path)
            vectors = open_vectors(
                upstream,
                instance=context.instance,
                index_asset_key=index_asset.key if index_asset is not None else None,
                storage_options=lancedb.options(),
            )
            # A golden key missing from the table scores 0 either way: refuse the set instead.
            check_golden_keys(vectors, golden)
            if reranker_key is None:
                vector = evaluate(vectors, golden, embedder, k=k)
                reranked = None
            else:
                comparison = evaluate_with_rerank(
                    vectors,
                    golden,
                    embedder,
                    getattr(context.resources, reranker_key),
                    k=k,
                    candidates=candidates,
                    text_column=text_column,
                    rerank_instruction=rerank_instruction,
                )
                vector, reranked = comparison.vector, comparison.reranked
        except ConfigError as e:  # a bad or stale golden set fails the same way on a retry
            raise dg.Failure(description=str(e), allow_retries=False) from e
        metadata: dict[str, Any] = {
            EVAL_K: k,
            EVAL_QUERIES: len(vector.queries),
            EVAL_EMBEDDING_MODEL: vector.model,
            EVAL_RECALL: round(vector.recall, 6),
            EVAL_NDCG: round(vector.ndcg, 6),
            TABLE_URI: vectors.uri,
            TABLE_NAME: vectors.name,
            LANCE_VERSION: vectors.version,
            "golden_set": dg.MetadataValue.path(str(path)),
        }
        if reranked is None:
            metadata[EVAL_RERANKER] = "none (reranking skipped: no reranker configured)"
            context.log.warning(f"no reranker configured: {vector.summary()}")
        else:
            metadata.update(
                {
                    EVAL_CANDIDATES: candidates,
                    EVAL_RERANKER: reranked.reranker,
                    EVAL_TEXT_COLUMN: text_column,
                    EVAL_RERANKED_RECALL: round(reranked.recall, 6),
                    EVAL_RERANKED_NDCG: round(reranked.ndcg, 6),
                    EVAL_RECALL_DELTA: round(reranked.recall - vector.recall, 6),
                    EVAL_NDCG_DELTA: round(reranked.ndcg - vector.ndcg, 6),
                }
            )
            context.log.info(comparison.summary())
        if note:
            metadata[EVAL_NOTE] = note
        metadata["qwen3/eval/per_query"] = dg.MetadataValue.md(_markdown_eval(vector, reranked, k))
        return dg.MaterializeResult(metadata=metadata)

    return _golden_rerank_eval


def _markdown_eval(vector: Evaluation, reranked: Evaluation | None, k: int, limit: int = 20) -> str:
    """Per-query nDCG@k by vector search and reranked, as a Markdown table."""
    head = f"| query | nDCG@{k} vector |" + (f" nDCG@{k} reranked |" if reranked else "")
    rule = "|---|---|" + ("---|" if reranked else "")
    rows = []
    pairs = zip(vector.queries, reranked.queries if reranked else vector.queries, strict=True)
    for i, (v, r) in enumerate(pairs):
        if i == limit:
            break
        query = v.query.replace("|", "\\|")[:80]
        rows.append(f"| {query} | {v.ndcg:.3f} |" + (f" {r.ndcg:.3f} |" if reranked else ""))
    return "\n".join([head, rule, *rows])
