"""Drift canary: refuse a model that no longer reproduces the table's vectors.

Vectors of one table must come from one vector space. The spec fingerprint guards the
settings (model id, revision, dim...), but not what is *behind* them: a library upgrade that
changes the arithmetic (a sentence-transformers release once silently changed vectors), weights
re-uploaded under the same hub id, another dtype or attention kernel. So when a table is
first filled, a small canary set is recorded beside it: fixed multilingual texts plus a sample
of the table's own documents, with the vectors the model gave them. Before a refresh writes
vectors made by a freshly loaded model, the canaries are embedded again and compared; below
the threshold (minimum cosine, default 0.999) the refresh stops with
:class:`~qwen3_pipeline.core.errors.EmbeddingDriftError` before anything is written.

The canaries live in a sidecar table of the same database, ``<table>__canary`` (one row per
text: the text, its kind, its vector, the spec fingerprint, when and by which run it was
recorded, and whether that recording accepted a drift). The check runs right before the
model's first real call of a refresh (:class:`DriftGuard`), so a refresh that embeds nothing,
or only re-projects, never loads the model for it.

The guard runs for every embedder: nothing an embedder declares turns it off (the shipped
fake's vectors are a pure function of the text, so its canaries simply pass). Which guard a
refresh uses is injected: ``RefreshOptions.drift_guard`` is a :data:`DriftGuardFactory`,
:class:`DriftGuard` itself by default; a test that counts the model's calls, or wants another
guard, passes its own factory there (one that returns None runs no guard). Drivers never set
it, so a production refresh always has the real guard.

Recording the canaries is upkeep that runs after the refresh's rows are committed: a store
failure while recording does not fail the refresh (a re-run would find nothing to embed, so
it would not record them either); it becomes a warning of the refresh report
(:attr:`DriftGuard.warnings`), and a later refresh that embeds records them.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

from qwen3_pipeline.core.errors import EmbeddingDriftError, Qwen3PipelineError, StoreError
from qwen3_pipeline.core.schema import TIMESTAMP_TYPE, validate_table_name
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult, embed_reporting

logger = logging.getLogger("qwen3_pipeline")
_T = TypeVar("_T")

CANARY_SUFFIX = "__canary"
DEFAULT_DRIFT_THRESHOLD = 0.999
SAMPLE_SIZE = 16
# Fixed texts in several scripts and registers: a change in tokenisation, normalisation or
# arithmetic shows on some of them even when the table's own documents are all alike.
FIXED_CANARIES = (
    "What is the capital of China?",
    "The capital of China is Beijing.",
    "中国的首都是北京。",
    "東京は日本の首都です。",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "La capitale de la France est Paris.",
    "La capital de España es Madrid.",
    "Столица России — Москва.",
    "عاصمة مصر هي القاهرة.",
    "भारत की राजधानी नई दिल्ली है।",
    "def add(a, b):\n    return a + b",
    "SELECT id, title FROM documents WHERE updated_at > now() - interval '1 day';",
    "Gravity is the force by which a planet draws objects toward its center.",
    "Résumé: naïve café owners façade — “quotes” and emoji 🙂",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
    "A",
)


def canary_table_name(table: str) -> str:
    """The sidecar table holding ``table``'s canaries.

    Example:
        >>> canary_table_name("docs")
        'docs__canary'
    """
    return validate_table_name(f"{table}{CANARY_SUFFIX}")


@dataclass(frozen=True, kw_only=True)
class CanaryCheck:
    """The outcome of comparing the loaded model with a table's canaries.

    Attributes:
        min_cosine: Lowest cosine between a recorded and a fresh canary vector.
        texts: How many canaries were compared.
        threshold: The minimum cosine accepted.
        worst_text: The canary text with the lowest cosine.
    """

    min_cosine: float
    texts: int
    threshold: float
    worst_text: str

    @property
    def passed(self) -> bool:
        """Whether every canary is at or above the threshold."""
        return self.min_cosine >= self.threshold


def compare(recorded: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Cosine of each recorded vector with the fresh one at the same row.

    Example:
        >>> compare(np.array([[1.0, 0.0]]), np.array([[0.6, 0.8]])).round(3).tolist()
        [0.6]
    """
    a = recorded / np.maximum(np.linalg.norm(recorded, axis=1, keepdims=True), 1e-12)
    b = fresh / np.maximum(np.linalg.norm(fresh, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


class Canaries:
    """The canary sidecar of one vector table.

    Args:
        db: A ``lancedb`` connection to the table's database.
        table: The vector table's name.
        spec: The spec the table holds (canaries of another spec are not compared).
    """

    def __init__(self, db: Any, table: str, spec: EmbeddingSpec) -> None:
        self.db = db
        self.name = canary_table_name(table)
        self.table = table
        self.spec = spec

    def recorded(self) -> pa.Table | None:
        """The recorded canaries of this spec, or None (none yet, or of another spec)."""
        from qwen3_pipeline.store import list_table_names

        if self.name not in list_table_names(self.db):
            return None
        rows = _lance(f"read the canaries in {self.name!r}", self._read)
        if not rows.num_rows or set(rows["spec_fingerprint"].to_pylist()) != {
            self.spec.fingerprint
        }:
            return None
        return rows

    def _read(self) -> pa.Table:
        return self.db.open_table(self.name).to_arrow()

    def check(self, embedder: Embedder, threshold: float) -> CanaryCheck | None:
        """Embed the recorded canaries with ``embedder`` and compare (None: none recorded)."""
        rows = self.recorded()
        if rows is None:
            return None
        texts = rows["text"].to_pylist()
        fresh = embedder.embed_documents(texts)
        recorded = np.stack(rows["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
        cosines = compare(recorded, np.asarray(fresh.vectors, dtype=np.float32))
        cosines = np.where(np.isfinite(cosines), cosines, -1.0)
        worst = int(np.argmin(cosines))
        return CanaryCheck(
            min_cosine=float(cosines[worst]),
            texts=len(texts),
            threshold=threshold,
            worst_text=texts[worst],
        )

    def record(
        self, embedder: Embedder, samples: Sequence[str], *, run_id: str, accepted_drift: bool
    ) -> int:
        """Embed the fixed canaries and ``samples`` and store them (replacing older ones).

        Returns:
            How many canaries were recorded (texts the model failed on are left out).
        """
        texts = list(dict.fromkeys([*FIXED_CANARIES, *samples[:SAMPLE_SIZE]]))
        kinds = ["fixed" if t in FIXED_CANARIES else "sample" for t in texts]
        result = embedder.embed_documents(texts)
        ok = np.array([i not in result.failures for i in range(len(texts))], dtype=bool)
        ok &= np.isfinite(result.vectors).all(axis=1)
        keep = np.flatnonzero(ok)
        vectors = np.asarray(result.vectors, dtype=np.float32)[keep]
        n, dim = len(keep), self.spec.output_dim
        now = datetime.now(UTC)
        rows = pa.table(
            {
                "text": pa.array([texts[i] for i in keep], pa.string()),
                "kind": pa.array([kinds[i] for i in keep], pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                "spec_fingerprint": pa.array([self.spec.fingerprint] * n, pa.string()),
                "recorded_at": pa.array([now] * n, TIMESTAMP_TYPE),
                "run_id": pa.array([run_id] * n, pa.string()),
                "accepted_drift": pa.array([accepted_drift] * n, pa.bool_()),
            }
        )
        from qwen3_pipeline.store import list_table_names

        if self.name in list_table_names(self.db):
            _lance(
                f"overwrite the canaries in {self.name!r}",
                lambda: self.db.open_table(self.name).add(rows, mode="overwrite"),
            )
        else:
            _lance(
                f"create the canary table {self.name!r}",
                lambda: self.db.create_table(self.name, data=rows),
            )
        logger.info(
            "recorded %d drift canaries for %s%s",
            n,
            self.table,
            " (re-recorded: drift accepted)" if accepted_drift else "",
        )
        return n


def _lance(what: str, action: Callable[[], _T]) -> _T:
    """Run a LanceDB call of the canary table, its errors typed as :class:`StoreError`."""
    from qwen3_pipeline.store import store_error

    try:
        return action()
    except Qwen3PipelineError:
        raise
    except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
        raise store_error(e, what) from e


def drift_message(table: str, spec: EmbeddingSpec, check: CanaryCheck) -> str:
    """What :class:`EmbeddingDriftError` says: what was found, the likely causes, the ways out."""
    return (
        f"the loaded model no longer reproduces the vectors of table {table!r}: its canary "
        f"texts now embed at a minimum cosine of {check.min_cosine:.6f} to the recorded vectors "
        f"(threshold {check.threshold}; worst: {check.worst_text[:60]!r}), under the same spec "
        f"(model={spec.model} revision={spec.revision} dim={spec.dim}). Likely causes: a "
        "library upgrade (transformers, torch, sentence-transformers), different weights under "
        "the same name or path, another dtype or attention implementation. Nothing was "
        "written. Ways out: rebuild the table with this model (--rebuild), pin the old "
        "weights/libraries again, or accept the drift (--accept-drift / accept_drift=True) to "
        "write anyway and re-record the canaries (the report says so)"
    )


class DriftGuard:
    """An embedder that checks the table's canaries before its first real model call.

    Args:
        embedder: The refresh's embedder.
        canaries: The table's canaries.
        threshold: Minimum cosine accepted.
        accept_drift: Go on below the threshold (the canaries are then re-recorded).
    """

    def __init__(
        self,
        embedder: Embedder,
        canaries: Canaries,
        *,
        threshold: float,
        accept_drift: bool,
    ) -> None:
        self.embedder = embedder
        self.canaries = canaries
        self.threshold = threshold
        self.accept_drift = accept_drift
        self.result: CanaryCheck | None = None
        self.checked = False
        self.samples: list[str] = []
        self.warnings: list[str] = []

    @property
    def spec(self) -> EmbeddingSpec:
        """The wrapped embedder's spec."""
        return self.embedder.spec

    def embed_documents(
        self, texts: Sequence[str], *, on_batch: BatchDone | None = None
    ) -> EncodeResult:
        """Check the canaries once, then embed ``texts`` (keeping a few as future samples)."""
        if not self.checked:
            self._check()
        if len(self.samples) < SAMPLE_SIZE:
            self.samples.extend(t for t in texts[: SAMPLE_SIZE - len(self.samples)] if t.strip())
        return embed_reporting(self.embedder, list(texts), on_batch)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries (no check: queries write nothing)."""
        return self.embedder.embed_queries(queries)

    def _check(self) -> None:
        self.checked = True
        self.result = self.canaries.check(self.embedder, self.threshold)
        if self.result is None or self.result.passed:
            return
        if not self.accept_drift:
            raise EmbeddingDriftError(
                drift_message(self.canaries.table, self.canaries.spec, self.result)
            )
        logger.warning(
            "embedding drift accepted on %s: canary minimum cosine %.6f < %s; the canaries "
            "will be re-recorded with this model",
            self.canaries.table,
            self.result.min_cosine,
            self.threshold,
        )

    @property
    def drift_accepted(self) -> bool:
        """Whether the check found drift and the refresh went on because it was accepted."""
        return self.result is not None and not self.result.passed and self.accept_drift

    def record_if_needed(self, *, run_id: str, wrote: bool) -> int:
        """Record canaries when there are none for this spec, or after an accepted drift.

        A store failure while recording is added to :attr:`warnings` (the refresh report
        carries it) instead of failing a refresh whose rows are committed; the next refresh
        that embeds records the canaries. Any other error is raised.

        Args:
            run_id: The refresh's run id (lineage of the canaries).
            wrote: Whether the refresh wrote vectors made by the model (only then is the
                loaded model known to be the one the table's vectors come from).

        Returns:
            How many canaries were recorded.
        """
        if not wrote or not self.checked:
            return 0
        if self.result is not None and not self.drift_accepted:
            return 0
        try:
            return self.canaries.record(
                self.embedder, self.samples, run_id=run_id, accepted_drift=self.drift_accepted
            )
        except StoreError as e:
            then = (
                "the next refresh finds the same drift; accept it again to re-record them"
                if self.drift_accepted
                else "the next refresh that embeds records them"
            )
            warning = (
                f"drift canaries of table {self.canaries.table!r} were not recorded ({e}); {then}"
            )
            logger.warning("%s", warning)
            self.warnings.append(warning)
            return 0


class DriftGuardFactory(Protocol):
    """Makes a refresh's drift guard (``RefreshOptions.drift_guard``): :class:`DriftGuard`.

    Called by the apply pass with the refresh's embedder and the table's canaries; None runs
    the refresh without a guard (for tests that count the model's calls).
    """

    def __call__(
        self, embedder: Embedder, canaries: Canaries, *, threshold: float, accept_drift: bool
    ) -> DriftGuard | None:
        """Return the guard that wraps ``embedder`` for one refresh, or None for none."""
        ...
