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
model's first real call of a refresh (:class:`DriftGuard`), so a refresh that embeds nothing
never loads the model for it.

They are recorded with the *first commit* of vectors into a table that has none (or right
after an accepted drift), not at the end of the fill: a first fill interrupted after some
commits (Ctrl-C, a killed worker) is already guarded, so a re-run by changed weights is
refused instead of mixing two vector spaces. A rebuild writes a staging table, and so records
the canaries of the staging table (``<staging>__canary``), checked when an interrupted
rebuild resumes; the swap hands them over to the live table (:func:`hand_over_canaries`). The
live table's own canaries do not judge a rebuild: a rebuild is the way out of a drift.

Re-projection copies vectors from a donor table (:mod:`.reproject`); they belong to this
table's vector space only if the loaded model reproduces the donor's canaries.
:meth:`DriftGuard.verify_donor` embeds the donor's canary texts and compares them (the
recorded vectors cut to this table's dim); a donor without canaries, or whose canaries
drifted, is not used, and the report's warnings say why. Verifying runs the model on those
few texts, so a refresh that re-projects loads the model even when it embeds no row itself;
only a refresh with rows to embed or re-project looks for a donor, so a refresh with nothing
to do still never loads it.

The guard runs for every embedder: nothing an embedder declares turns it off (the shipped
fake's vectors are a pure function of the text, so its canaries simply pass). Which guard a
refresh uses is injected: ``RefreshOptions.drift_guard`` is a :data:`DriftGuardFactory`,
:class:`DriftGuard` itself by default; a test that counts the model's calls, or wants another
guard, passes its own factory there (one that returns None runs no guard). Drivers never set
it, so a production refresh always has the real guard.

Recording the canaries is upkeep that runs after a commit of the refresh's rows: a store
failure while recording does not fail the refresh (a re-run would find nothing to embed, so
it would not record them either); it becomes a warning of the refresh report
(:attr:`DriftGuard.warnings`), and a later refresh that embeds records them.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from qwen3_pipeline.core.errors import EmbeddingDriftError, StoreError
from qwen3_pipeline.core.schema import REBUILD_MARKER, TIMESTAMP_TYPE, validate_table_name
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.interface import BatchDone, Embedder, EncodeResult, embed_reporting
from qwen3_pipeline.store.retries import run_typed
from qwen3_pipeline.store.side_tables import side_table_exists

logger = logging.getLogger("qwen3_pipeline")

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
        if not side_table_exists(self.db, self.name):
            return None
        rows = run_typed(self._read, f"read the canaries in {self.name!r}")
        if not rows.num_rows or set(rows["spec_fingerprint"].to_pylist()) != {
            self.spec.fingerprint
        }:
            return None
        return rows

    def _read(self) -> pa.Table:
        return self.db.open_table(self.name).to_arrow()

    def check(
        self, embedder: Embedder, threshold: float, *, rows: pa.Table | None = None
    ) -> CanaryCheck | None:
        """Embed the recorded canaries with ``embedder`` and compare (None: none recorded).

        Canaries recorded at a larger dim than ``embedder``'s (a re-projection donor's) are
        compared by their first ``dim`` components: the Matryoshka vector at the smaller dim.
        ``rows``: the :meth:`recorded` canaries when already read.
        """
        rows = self.recorded() if rows is None else rows
        if rows is None:
            return None
        texts = rows["text"].to_pylist()
        fresh = np.asarray(embedder.embed_documents(texts).vectors, dtype=np.float32)
        recorded = np.stack(rows["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
        if recorded.shape[1] > fresh.shape[1]:
            recorded = recorded[:, : fresh.shape[1]]  # compare() normalises again
        cosines = compare(recorded, fresh)
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
        if side_table_exists(self.db, self.name):
            run_typed(
                lambda: self.db.open_table(self.name).add(rows, mode="overwrite"),
                f"overwrite the canaries in {self.name!r}",
            )
        else:
            run_typed(
                lambda: self.db.create_table(self.name, data=rows),
                f"create the canary table {self.name!r}",
            )
        logger.info(
            "recorded %d drift canaries for %s%s",
            n,
            self.table,
            " (re-recorded: drift accepted)" if accepted_drift else "",
        )
        return n


def drop_canaries(db: Any, table: str) -> None:
    """Remove the canaries of ``table`` (no error when there are none).

    Raises:
        StoreError: LanceDB failed.
    """
    name = canary_table_name(table)
    if side_table_exists(db, name):
        run_typed(lambda: db.drop_table(name), f"drop the canary table {name!r}")


def hand_over_canaries(db: Any, staging: str, live: str) -> str | None:
    """After a rebuild's swap: the staging table's canaries become the live table's.

    The live table's old canaries describe vectors it no longer holds, so they are replaced,
    or dropped when the staging table has none (the next refresh that embeds records them).
    The staging sidecar is removed.

    Returns:
        None, or a warning when the store failed (the swap itself is committed).
    """
    source, target = canary_table_name(staging), canary_table_name(live)
    try:
        if not side_table_exists(db, source):
            drop_canaries(db, live)
            return None
        rows = run_typed(
            lambda: db.open_table(source).to_arrow(), f"read the canaries in {source!r}"
        )
        if side_table_exists(db, target):
            run_typed(
                lambda: db.open_table(target).add(rows, mode="overwrite"),
                f"overwrite the canaries in {target!r}",
            )
        else:
            run_typed(
                lambda: db.create_table(target, data=rows),
                f"create the canary table {target!r}",
            )
        drop_canaries(db, staging)
    except StoreError as e:
        warning = (
            f"the drift canaries of the rebuilt table {live!r} were not handed over from "
            f"{source!r} ({e}); the next refresh may report a drift that is not there "
            "(--accept-drift re-records them) or record them anew"
        )
        logger.warning("%s", warning)
        return warning
    return None


def drift_message(table: str, spec: EmbeddingSpec, check: CanaryCheck) -> str:
    """What :class:`EmbeddingDriftError` says: what was found, the likely causes, the ways out."""
    if REBUILD_MARKER in table:
        way_out = (
            f"drop the staging table {table!r} (and {canary_table_name(table)!r}) to start "
            "the rebuild over with this model"
        )
    else:
        way_out = "rebuild the table with this model (--rebuild)"
    return (
        f"the loaded model no longer reproduces the vectors of table {table!r}: its canary "
        f"texts now embed at a minimum cosine of {check.min_cosine:.6f} to the recorded vectors "
        f"(threshold {check.threshold}; worst: {check.worst_text[:60]!r}), under the same spec "
        f"(model={spec.model} revision={spec.revision} dim={spec.dim}). Likely causes: a "
        "library upgrade (transformers, torch, sentence-transformers), different weights under "
        "the same name or path, another dtype or attention implementation. Nothing was "
        f"written. Ways out: {way_out}, pin the old "
        "weights/libraries again, or accept the drift (--accept-drift / accept_drift=True) to "
        "write anyway and re-record the canaries (the report says so)"
    )


class DriftGuard:
    """An embedder that checks the table's canaries before its first real model call.

    The writers also tell it of each commit of vectors (:meth:`after_commit`): the first one
    records the canaries when the table has none (or after an accepted drift). Before vectors
    of a donor table are re-projected, :meth:`verify_donor` checks that the loaded model
    reproduces the donor's canaries, and :meth:`check_now` checks this table's.

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
        self.canaries_recorded = 0
        self._recording_done = False

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
        self._add_samples(texts)
        return embed_reporting(self.embedder, list(texts), on_batch)

    def _add_samples(self, texts: Sequence[str]) -> None:
        for text in texts:
            if len(self.samples) >= SAMPLE_SIZE:
                return
            if text.strip() and text not in self.samples:
                self.samples.append(text)

    def embed_queries(self, queries: Sequence[str]) -> EncodeResult:
        """Embed queries (no check: queries write nothing)."""
        return self.embedder.embed_queries(queries)

    def check_now(self) -> CanaryCheck | None:
        """Check this table's canaries now, unless done (before re-projected rows are written).

        Raises:
            EmbeddingDriftError: They drifted and the drift is not accepted.
        """
        if not self.checked:
            self._check()
        return self.result

    def verify_donor(self, table: str, spec: EmbeddingSpec) -> str | None:
        """Why the vectors of ``table`` (holding ``spec``) must not be re-projected, or None.

        They may be only when the loaded model reproduces that table's canaries (its recorded
        vectors cut to this table's dim) at the threshold: otherwise they come from other
        weights, libraries or settings than this refresh's, whatever the specs say. A table
        whose canaries were re-recorded after an accepted drift holds vectors of two models
        and is no donor either; an accepted drift of this table does not extend to a donor.

        Returns:
            None when the donor's canaries pass; else the reason, for the report's warning.
        """
        donor = Canaries(self.canaries.db, table, spec)
        try:
            rows = donor.recorded()
            if rows is None:
                return (
                    "it has no drift canaries for its spec, so nothing shows that its vectors "
                    "come from the loaded model"
                )
            if any(rows["accepted_drift"].to_pylist()):
                return (
                    "its drift canaries were re-recorded after an accepted drift, so it holds "
                    "vectors of two models until it is rebuilt"
                )
            check = donor.check(self.embedder, self.threshold, rows=rows)
        except StoreError as e:
            return f"its drift canaries could not be read ({e})"
        assert check is not None  # rows were recorded
        if not check.passed:
            return (
                f"the loaded model reproduces its drift canaries only at a minimum cosine of "
                f"{check.min_cosine:.6f} (threshold {self.threshold}): its vectors come from "
                "other weights or libraries"
            )
        return None

    def after_commit(self, texts: Sequence[str], *, run_id: str) -> int:
        """Vectors were committed: with the first commit, record the canaries if needed.

        Recorded when the table has none for this spec, or after an accepted drift, once per
        refresh; ``texts`` (the committed documents) give the samples when the model has not
        seen any (rows re-projected from a verified donor).

        Returns:
            How many canaries were recorded now.
        """
        self._add_samples(texts)
        if self._recording_done or not self.checked:
            return 0
        self._recording_done = True
        self.canaries_recorded = self.record_if_needed(run_id=run_id, wrote=True)
        return self.canaries_recorded

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
            wrote: Whether the refresh committed vectors made by the model, or re-projected
                from a donor it verified (only then is the loaded model known to be the one
                the table's vectors come from).

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
