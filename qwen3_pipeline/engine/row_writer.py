"""The row writer of the apply pass: prepare, embed (or re-project) and upsert chunks of rows.

The apply pass runs each chunk of the plan's rows through three steps, each on its own thread
when pipelined (:mod:`.pipeline`):

1. :meth:`TableWriter.prepare`: everything before the model that only reads (the texts to
   embed; rows a donor table holds unchanged are re-projected instead; a donor that cannot be
   read is dropped with a warning in the report);
2. :meth:`TableWriter.embed`: the model call, nothing else (it runs on the thread that called
   the refresh, so Ctrl-C and SIGTERM land in it);
3. :meth:`TableWriter.write`: the rows the model failed on are left out (they keep their old
   vectors and are counted as failed), the rest is upserted in one ``merge_insert`` commit;
   then the drift guard hears of the commit
   (:meth:`~qwen3_pipeline.engine.canary.DriftGuard.after_commit`: the first one records the
   table's canaries when it has none), the failure records are updated, and the rows are
   counted. Only this step writes and counts, so the tally has one writer.

:class:`RowWriter` writes a table of one row per document; the chunk table's writer is
:class:`~qwen3_pipeline.engine.chunk_writer.ChunkWriter`. Rows that only moved partition or
changed carry-along columns get a column update, no model call
(:meth:`TableWriter.write_updates`).
"""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa

from qwen3_pipeline.core.changes import RowStatus
from qwen3_pipeline.core.errors import StoreError
from qwen3_pipeline.core.failures import RowFailure, as_row_failure
from qwen3_pipeline.core.progress import Progress
from qwen3_pipeline.core.schema import (
    MOVED_COLUMN,
    STATUS_COLUMN,
    TEXT_COLUMN,
    TIMESTAMP_TYPE,
)
from qwen3_pipeline.embedding.interface import Embedder, EncodeResult, EncodeStats, embed_reporting
from qwen3_pipeline.engine.canary import SAMPLE_SIZE, DriftGuard
from qwen3_pipeline.engine.failure_records import FailureRecords
from qwen3_pipeline.engine.report import MAX_SHOWN_FAILURES, Tally
from qwen3_pipeline.engine.reproject import Donor, Reprojected
from qwen3_pipeline.store import VectorStore
from qwen3_pipeline.store.failure_log import FailedRow

logger = logging.getLogger("qwen3_pipeline")

PreparedT = TypeVar("PreparedT")
EmbeddedT = TypeVar("EmbeddedT")


class TableWriter(ABC, Generic[PreparedT, EmbeddedT]):
    """Writes the plan's rows chunk by chunk, counting what landed in ``tally``.

    The three steps of a chunk (:meth:`prepare`, :meth:`embed`, :meth:`write`) may run on
    three threads at once, each on a different chunk; they share no mutable state but what
    each step owns: :meth:`prepare` the donor, :meth:`embed` the model and the progress line,
    :meth:`write` the store's commits, the drift guard's commit hook, the failure records and
    the tally.

    Args:
        store: The table written.
        embedder: The model (the refresh sets the drift guard in front of it).
        tally: The refresh's counters.
        carry_names: The carry-along columns written beside each vector.
        label: The source's name (lineage).
        run_id: The refresh's run id (lineage).
    """

    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        tally: Tally,
        *,
        carry_names: list[str],
        label: str,
        run_id: str,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tally = tally
        self.carry_names = carry_names
        self.label = label
        self.run_id = run_id
        self.guard: DriftGuard | None = None
        self.failures: FailureRecords | None = None

    @abstractmethod
    def prepare(self, rows: pa.Table) -> PreparedT:
        """Everything before the model call that only reads; no commit, no count."""

    @abstractmethod
    def embed(self, prepared: PreparedT, bar: Progress) -> EmbeddedT:
        """The model call of one chunk; ``bar`` hears of each forward pass."""

    @abstractmethod
    def write(self, embedded: EmbeddedT) -> None:
        """Commit one embedded chunk, then its failure records; count it in ``tally``."""

    def write_updates(self, rows: pa.Table) -> None:
        """Update the moved or carry-only rows of ``rows`` (one commit, no model call)."""
        tally = self.tally
        written = self.store.update_columns(rows.drop_columns([MOVED_COLUMN]))
        tally.commits += written is not None
        moved = np.asarray(rows.column(MOVED_COLUMN).to_numpy(), dtype=bool)
        partitions = rows.column("partition_key")
        tally.add("moved", partitions, moved)
        tally.add("carry_updated", partitions, ~moved)

    def record_outcome(
        self,
        failed: list[FailedRow],
        written_keys: pa.Array | pa.ChunkedArray,
        failed_partitions: pa.Array,
    ) -> None:
        """After a commit of vectors: record the rows that failed, clear those written.

        Done after the vector commit, so a kill between the two leaves a row retried (no
        record yet) or a stale record that the next plan finds and clears: never a row
        skipped for good.
        """
        if self.failures is None:
            return
        keys = written_keys.cast(pa.string())
        quarantined = self.failures.after_commit(
            failed, keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        )
        self.tally.add("quarantined", failed_partitions, quarantined)


@dataclass(frozen=True, kw_only=True)
class PreparedRows:
    """One chunk of the plan's rows, ready for the model.

    Attributes:
        rows: The chunk as the plan spilled it.
        texts: The documents sent to the model (rows where ``to_embed``), in row order.
        to_embed: Per row, whether the model embeds it (else a donor re-projected it).
        reprojected: What the donor gave (None without a donor).
        warnings: For the report (a donor dropped because it could not be read).
    """

    rows: pa.Table
    texts: list[str]
    to_embed: np.ndarray
    reprojected: Reprojected | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class EmbeddedRows:
    """One chunk of rows after the model: what :meth:`RowWriter.write` commits.

    Attributes:
        prepared: The chunk before the model.
        encoded: What the model gave for ``prepared.texts`` (None: no text went to it).
    """

    prepared: PreparedRows
    encoded: EncodeResult | None


class RowWriter(TableWriter[PreparedRows, EmbeddedRows]):
    """Embeds (or re-projects) and upserts rows of a table of one row per document.

    Attributes:
        donor: A table whose vectors are re-projected instead of embedding the same texts
            again (None: every row goes to the model).
    """

    donor: Donor | None = None

    def prepare(self, rows: pa.Table) -> PreparedRows:
        """The texts to embed, after re-projecting what the donor holds unchanged."""
        reprojected = None
        warnings: list[str] = []
        if self.donor is not None:
            try:
                reprojected = self.donor.lookup(rows.column("key"), rows.column("content_hash"))
            except StoreError as e:
                # Re-projection only saves work: a donor that cannot be read is dropped, its
                # rows go to the model, and the report says so.
                warning = (
                    f"stopped re-projecting from table {self.donor.name!r}, which could not be "
                    f"read ({e}); its rows were embedded by the model instead"
                )
                logger.warning("%s", warning)
                warnings.append(warning)
                self.donor = None
        to_embed = np.ones(rows.num_rows, dtype=bool) if reprojected is None else ~reprojected.found
        texts = rows.column(TEXT_COLUMN).filter(pa.array(to_embed)).to_pylist()
        return PreparedRows(
            rows=rows,
            texts=texts,
            to_embed=to_embed,
            reprojected=reprojected,
            warnings=tuple(warnings),
        )

    def embed(self, prepared: PreparedRows, bar: Progress) -> EmbeddedRows:
        """Embed the chunk's texts; ``bar`` hears of each forward pass and of re-projections."""

        def on_batch(rows: int, tokens: int) -> None:
            bar.update(rows, tokens=tokens)

        if prepared.reprojected is not None:
            bar.update(int(prepared.reprojected.found.sum()))
        encoded = (
            embed_reporting(self.embedder, prepared.texts, on_batch) if prepared.texts else None
        )
        return EmbeddedRows(prepared=prepared, encoded=encoded)

    def write(self, embedded: EmbeddedRows) -> None:
        """Upsert the chunk's rows but those the model failed on (one commit), then record."""
        tally, store = self.tally, self.store
        prepared = embedded.prepared
        chunk = prepared.rows
        encoded = _merge_reprojected(
            embedded.encoded, prepared.reprojected, prepared.to_embed, store.spec.output_dim
        )
        tally.warnings.extend(prepared.warnings)
        partitions = chunk.column("partition_key").combine_chunks()
        if prepared.reprojected is not None:
            tally.add("reprojected", partitions, prepared.reprojected.found)
        tally.encode = tally.encode + encoded.stats
        tally.add("embedded", partitions, prepared.to_embed)
        ok = np.ones(chunk.num_rows, dtype=bool)
        failed: list[FailedRow] = []
        if encoded.failures:
            failed_keys = chunk.column("key").cast(pa.string()).to_pylist()
            hashes = chunk.column("content_hash").to_pylist()
            labels = partitions.to_pylist()
            for index, reason in encoded.failures.items():
                ok[index] = False
                failure = as_row_failure(reason)
                key = failed_keys[index]
                failed.append(
                    FailedRow(
                        doc_key=key,
                        key=key,
                        failure=failure,
                        content_hash=hashes[index],
                        partition_key=labels[index],
                    )
                )
                if len(tally.failures) < MAX_SHOWN_FAILURES:
                    tally.failures.append((key, failure.message))
            tally.add("failed", partitions, ~ok)
            logger.error("%d row(s) could not be embedded; their old vectors are kept", (~ok).sum())
        keep = pa.array(np.flatnonzero(ok))
        written = chunk.take(keep) if not ok.all() else chunk
        statuses = np.asarray(written.column(STATUS_COLUMN).to_numpy(), dtype=np.int8)
        kept_partitions = partitions.take(keep) if not ok.all() else partitions
        tally.add("inserted", kept_partitions, statuses == RowStatus.NEW)
        tally.add("updated", kept_partitions, statuses != RowStatus.NEW)
        tally.add("truncated", kept_partitions, encoded.truncated[ok])
        carry = written.select(self.carry_names) if self.carry_names else None
        rows_to_write = store.build_rows(
            keys=written.column("key").combine_chunks(),
            vectors=encoded.vectors[ok],
            content_hashes=written.column("content_hash").combine_chunks(),
            n_tokens=encoded.n_tokens[ok],
            truncated=encoded.truncated[ok],
            partition_keys=written.column("partition_key").combine_chunks(),
            source=self.label,
            run_id=self.run_id,
            source_updated_at=written.column("source_updated_at").combine_chunks(),
            carry=carry,
            embedded_at=(
                None if encoded.embedded_at is None else encoded.embedded_at.filter(pa.array(ok))
            ),
        )
        committed = store.upsert(rows_to_write) is not None
        tally.commits += committed
        if committed and self.guard is not None:
            samples = written.column(TEXT_COLUMN).slice(0, SAMPLE_SIZE).to_pylist()
            self.guard.after_commit(samples, run_id=self.run_id)
        failed_partitions = partitions.filter(pa.array(~ok))
        self.record_outcome(failed, written.column("key"), failed_partitions)


@dataclass(frozen=True, kw_only=True)
class _Vectors:
    """One chunk's vectors, embedded or re-projected, in row order."""

    vectors: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    failures: dict[int, "RowFailure | str"]
    stats: EncodeStats
    embedded_at: pa.Array | None


def _merge_reprojected(
    encoded: EncodeResult | None,
    reprojected: "Reprojected | None",
    embedded: np.ndarray,
    dim: int,
) -> _Vectors:
    """Put the model's rows (where ``embedded``) and the re-projected ones back in row order."""
    n = len(embedded)
    vectors = np.zeros((n, dim), dtype=np.float32)
    n_tokens = np.zeros(n, dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(embedded)
    failures: dict[int, RowFailure | str] = {}
    if encoded is not None:
        vectors[rows] = encoded.vectors
        n_tokens[rows] = encoded.n_tokens
        truncated[rows] = encoded.truncated
        failures = {int(rows[i]): reason for i, reason in encoded.failures.items()}
    embedded_at = None
    if reprojected is not None:
        found = reprojected.found
        vectors[found] = reprojected.vectors
        n_tokens[found] = reprojected.n_tokens
        truncated[found] = reprojected.truncated
        # A re-projected vector keeps the time the model computed it; embedded rows: now.
        stamps = np.full(n, np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us"))
        stamps[found] = reprojected.embedded_at.cast(pa.timestamp("us")).to_numpy(
            zero_copy_only=False
        )
        embedded_at = pa.array(stamps).cast(TIMESTAMP_TYPE)
    stats = encoded.stats if encoded is not None else EncodeStats()
    return _Vectors(
        vectors=vectors,
        n_tokens=n_tokens,
        truncated=truncated,
        failures=failures,
        stats=stats,
        embedded_at=embedded_at,
    )
