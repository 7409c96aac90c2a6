"""The gate of a rebuild launched from Dagster: its settings, its asset check, its way out.

A run of the embedding asset with ``rebuild: true`` and ``gate_golden_set`` in its run config
(or as run tags: the rebuild job of :mod:`qwen3_pipeline.dagster.lifecycle_jobs` sets both)
embeds the whole source into a staging table; the engine then scores the live and the
staging table on the golden set and swaps staging in only if it scores at least as well
(:func:`qwen3_pipeline.lifecycle.gate.gate_rebuild`). A refused staging table is kept and the
live table is untouched. This module maps that onto Dagster and keeps the decision itself in
the engine:

- :class:`GateSettings` and :func:`gate_settings`: the golden set, tolerance and k of a run,
  from its run config or else from its tags (the rebuild job's runs carry ``qwen3/rebuild`` and
  the ``qwen3/gate_*`` tags: a partitioned job's default run config does not reach a run over
  every partition, its tags do);
- :func:`rebuild_gate`: the run's :class:`~qwen3_pipeline.lifecycle.gate.GateConfig`, with
  the query embedder of the live table (the run's own model when the live table follows its
  spec; otherwise one built for the live spec on first use, freed when the run ends);
- :func:`gate_check_result`: the decision as the result of the ``rebuild_gate`` asset check,
  with both tables' recall@k and nDCG@k in its metadata;
- :func:`gate_refusal` and :func:`gate_way_out`: the error of a refused rebuild and the run
  config that lets it through (the smallest ``gate_tolerance`` that passes).

Example:
    >>> decision = {"passed": False, "recall_delta": -0.25, "ndcg_delta": -0.3125}
    >>> passing_tolerance(decision)
    0.313
"""

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg

from qwen3_pipeline.core.errors import ConfigError, GateFailedError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.dagster.resources import EmbedderResource, LanceDBResource
from qwen3_pipeline.lifecycle.metrics import DEFAULT_K, check_k

if TYPE_CHECKING:  # the gate loads LanceDB search: only a gated rebuild imports it
    from qwen3_pipeline.lifecycle.gate import GateConfig

REBUILD_GATE_CHECK = "rebuild_gate"
REBUILD_GATE_DESCRIPTION = (
    "A gated rebuild (run config rebuild: true with gate_golden_set) scores the live and the "
    "staging table on the golden set (mean recall@k and nDCG@k) and swaps staging in only if "
    "neither mean is more than gate_tolerance below live's; a refusal fails the step and leaves "
    "the live table untouched. Skipped (not evaluated) by every other run."
)
GATE_PREFIX = "qwen3/gate/"
# Run tags of the rebuild job: they make every run of the job a (gated) rebuild.
REBUILD_TAG = "qwen3/rebuild"
GOLDEN_SET_TAG = "qwen3/gate_golden_set"
TOLERANCE_TAG = "qwen3/gate_tolerance"
K_TAG = "qwen3/gate_k"


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    """The gate of one rebuild: the golden set, the tolerance and k (validated when built).

    Example:
        >>> GateSettings(golden_set="golden.jsonl", tolerance=0.05).tags()[TOLERANCE_TAG]
        '0.05'
    """

    golden_set: str
    tolerance: float = 0.0
    k: int = DEFAULT_K

    def __post_init__(self) -> None:
        # Checked before the rebuild: the engine would only judge them after embedding it all.
        if not self.golden_set.strip():
            raise ConfigError("gate_golden_set is empty: give the path of a golden set (JSONL)")
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not 0.0 <= tolerance <= 1.0:
            raise ConfigError(
                f"gate_tolerance must be a number from 0 to 1 (the largest drop of mean "
                f"recall@k or nDCG@k allowed), got {tolerance!r}"
            )
        check_k(self.k)

    def tags(self) -> dict[str, str]:
        """The run tags that carry these settings (with the rebuild tag)."""
        return {
            REBUILD_TAG: "true",
            GOLDEN_SET_TAG: self.golden_set,
            TOLERANCE_TAG: f"{self.tolerance:g}",
            K_TAG: str(self.k),
        }


def gate_settings(
    *,
    golden_set: str | None,
    tolerance: float | None,
    k: int | None,
    rebuild: bool,
    tags: Mapping[str, str],
) -> GateSettings | None:
    """The run's gate: each setting from the run config when given, else from the run's tags.

    Args:
        golden_set: ``gate_golden_set`` of the run config (None: the ``qwen3/gate_golden_set``
            tag, or no gate).
        tolerance: ``gate_tolerance`` (None: its tag, else 0).
        k: ``gate_k`` (None: its tag, else 10).
        rebuild: Whether the run rebuilds (config ``rebuild`` or the ``qwen3/rebuild`` tag).
        tags: The run's tags.

    Returns:
        The settings, or None for a run without a golden set.

    Raises:
        ConfigError: A golden set without a rebuild, gate settings without a golden set, or an
            invalid value (a tag's value named).

    Example:
        >>> tags = {REBUILD_TAG: "true", GOLDEN_SET_TAG: "g.jsonl", K_TAG: "5"}
        >>> gate_settings(golden_set=None, tolerance=0.1, k=None, rebuild=True, tags=tags)
        GateSettings(golden_set='g.jsonl', tolerance=0.1, k=5)
    """
    golden = golden_set if golden_set is not None else tags.get(GOLDEN_SET_TAG)
    if golden is None:
        if tolerance is not None or k is not None:
            raise ConfigError(
                "gate_tolerance and gate_k set a rebuild's gate: give gate_golden_set too"
            )
        return None
    if not rebuild:
        raise ConfigError(
            "gate_golden_set gates a rebuild: launch with rebuild: true as well (or launch the "
            "rebuild job, whose runs rebuild)"
        )
    return GateSettings(
        golden_set=golden,
        tolerance=tolerance if tolerance is not None else _tag(tags, TOLERANCE_TAG, float, 0.0),
        k=k if k is not None else _tag(tags, K_TAG, int, DEFAULT_K),
    )


def _tag(tags: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    raw = tags.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise ConfigError(f"run tag {name}={raw!r} is not a {kind.__name__}") from e


@contextmanager
def rebuild_gate(
    settings: GateSettings | None,
    *,
    embedder: EmbedderResource,
    lancedb: LanceDBResource,
    table: str,
) -> Iterator["GateConfig | None"]:
    """The gate of this run's rebuild, or None without gate settings.

    The live table is scored with a query embedder of its own spec: the run's model when the
    live table follows the run's spec (a rebuild after a drift, or to re-embed: no second
    model), else an embedder of the live spec built by ``embedder`` on first use (a model
    upgrade) and released when the block exits.

    Args:
        settings: The golden set (JSONL, see :mod:`qwen3_pipeline.lifecycle.golden`), how much
            lower staging's mean recall@k and nDCG@k may be than live's, and k.
        embedder: The run's embedder resource (it embeds the staging table's queries).
        lancedb: Where the live table is.
        table: The live table's name.

    Yields:
        The :class:`~qwen3_pipeline.lifecycle.gate.GateConfig`, or None.

    Raises:
        ConfigError: The golden set cannot be read or is invalid (its file and line named).
    """
    if settings is None:
        yield None
        return
    from qwen3_pipeline.embedding.lazy import LazyEmbedder
    from qwen3_pipeline.lifecycle.gate import GateConfig, load_golden_set

    golden = load_golden_set(settings.golden_set)  # read before the rebuild: fails first
    live_spec = _live_spec(lancedb, table)
    if live_spec is None or _same_model(live_spec, embedder.spec):
        yield GateConfig(
            golden=golden, tolerance=settings.tolerance, k=settings.k, live_embedder=embedder
        )
        return
    live = LazyEmbedder(live_spec, embedder.engine_options(), build=embedder.load_embedder)
    try:
        yield GateConfig(
            golden=golden, tolerance=settings.tolerance, k=settings.k, live_embedder=live
        )
    finally:
        live.close()


def _live_spec(lancedb: LanceDBResource, table: str) -> EmbeddingSpec | None:
    from qwen3_pipeline.consumers.vector_search import recorded_spec

    if not lancedb.table_exists(table):
        return None  # a first build: the gate passes with nothing to compare with
    return recorded_spec(lancedb.open_table(table))


def _same_model(a: EmbeddingSpec, b: EmbeddingSpec) -> bool:
    # Chunking changes the table, not how a query is embedded.
    return a.with_chunking(None).fingerprint == b.with_chunking(None).fingerprint


def gate_check_result(decision: Mapping[str, Any], asset_key: dg.AssetKey) -> dg.AssetCheckResult:
    """The ``rebuild_gate`` check's result for a gate decision (``RefreshReport.gate``).

    Example:
        >>> staging = {"table": "docs_r", "version": 3, "recall": 0.5, "ndcg": 0.4}
        >>> decision = {"passed": True, "reason": "first build", "tolerance": 0.0, "k": 10,
        ...             "queries": 2, "live": None, "staging": staging, "recall_delta": None,
        ...             "ndcg_delta": None, "regressions": []}
        >>> gate_check_result(decision, dg.AssetKey("docs")).metadata["qwen3/gate/staging_recall"]
        FloatMetadataValue(value=0.5)
    """
    passed = bool(decision["passed"])
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=REBUILD_GATE_CHECK,
        passed=passed,
        description=f"gate {'passed' if passed else 'refused the swap'}: {decision['reason']}",
        metadata=gate_metadata(decision),
        severity=dg.AssetCheckSeverity.ERROR,
    )


def gate_metadata(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The decision's scores as namespaced metadata (``qwen3/gate/...``).

    Both tables' mean recall@k and nDCG@k and their deltas (staging minus live; absent on a
    first build, which has no live table), the settings, the tables and versions compared, and
    the queries staging answers worse (a Markdown table, when there are any).
    """
    live, staging = decision.get("live"), decision["staging"]
    metadata: dict[str, Any] = {
        f"{GATE_PREFIX}k": int(decision["k"]),
        f"{GATE_PREFIX}tolerance": float(decision["tolerance"]),
        f"{GATE_PREFIX}queries": int(decision["queries"]),
        f"{GATE_PREFIX}golden_set": str(staging.get("golden_set", "")),
        f"{GATE_PREFIX}staging_table": str(staging["table"]),
        f"{GATE_PREFIX}staging_version": int(staging["version"]),
        f"{GATE_PREFIX}staging_recall": float(staging["recall"]),
        f"{GATE_PREFIX}staging_ndcg": float(staging["ndcg"]),
    }
    if live is not None:
        metadata |= {
            f"{GATE_PREFIX}live_table": str(live["table"]),
            f"{GATE_PREFIX}live_version": int(live["version"]),
            f"{GATE_PREFIX}live_recall": float(live["recall"]),
            f"{GATE_PREFIX}live_ndcg": float(live["ndcg"]),
            f"{GATE_PREFIX}recall_delta": float(decision["recall_delta"]),
            f"{GATE_PREFIX}ndcg_delta": float(decision["ndcg_delta"]),
        }
    regressions = decision.get("regressions") or []
    if regressions:
        metadata[f"{GATE_PREFIX}regressions"] = dg.MetadataValue.md(
            _regressions_markdown(regressions)
        )
    return metadata


def _regressions_markdown(regressions: list[Mapping[str, Any]]) -> str:
    rows = [
        f"| {str(r['query'])[:80].replace('|', '/')} | {r['live_ndcg']:.3f} | "
        f"{r['staging_ndcg']:.3f} |"
        for r in regressions
    ]
    return "\n".join(["| query | live nDCG | staging nDCG |", "|---|---|---|", *rows])


def passing_tolerance(decision: Mapping[str, Any]) -> float | None:
    """The smallest ``gate_tolerance`` (rounded up to 0.001) that passes this decision.

    None when the decision has no live table to compare with (a first build always passes).
    """
    deltas = [decision.get("recall_delta"), decision.get("ndcg_delta")]
    drops = [-float(delta) for delta in deltas if delta is not None]
    if not drops:
        return None
    # Rounded up, so the value shown is never below the drop it must absorb.
    return min(1.0, max(0.0, math.ceil(max(drops) * 1000 - 1e-6) / 1000))


def gate_refusal(decision: Mapping[str, Any], *, table: str, version: int) -> GateFailedError:
    """The error of a rebuild the gate refused (the live table at ``version``, untouched)."""
    staging = decision["staging"]
    return GateFailedError(
        f"gate refused the rebuild of {table!r}: {decision['reason']}. The live table is "
        f"untouched (version {version}); staging table {staging['table']!r} (version "
        f"{staging['version']}) is kept for inspection and a re-run resumes it"
    )


def gate_way_out(decision: Mapping[str, Any], op_name: str, settings: GateSettings) -> str:
    """The launchpad run config that lets a refused rebuild through.

    Example:
        >>> decision = {"recall_delta": -0.5, "ndcg_delta": -0.25}
        >>> hint = gate_way_out(decision, "docs", GateSettings(golden_set="g.jsonl", k=1))
        >>> hint.split("config ")[1][:52]
        'ops: {docs: {config: {rebuild: true, gate_golden_set'
        >>> hint.endswith("gate_tolerance: 0.5}}}")
        True
    """
    tolerance = passing_tolerance(decision)
    if tolerance is None:
        return ""
    config = (
        f"rebuild: true, gate_golden_set: {json.dumps(settings.golden_set)}, "
        f"gate_k: {settings.k}, gate_tolerance: {tolerance:g}"
    )
    return (
        "To swap it in anyway (staging may then score that much lower than live), launch the "
        f"rebuild again with run config ops: {{{op_name}: {{config: {{{config}}}}}}}"
    )
