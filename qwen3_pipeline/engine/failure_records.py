"""Failure records in a refresh: leave out what is not due, record what fails, clear the rest.

A refresh reads the table's failure records once, when it plans (:meth:`FailureRecords.read`).
The scan asks :meth:`FailureRecords.classify` about every row it would send to the model:

- a row whose record is for its *current* text and is quarantined is left out (counted
  ``quarantined``); one not due yet (``next_retry_at`` in the future) is left out too
  (``deferred``); one that is due is sent again (``retried``);
- a row whose text changed since it failed is sent like any changed row (its record is
  replaced or cleared by the outcome);
- a row found stored with its current text has a stale record (a refresh killed between its
  vector commit and its record commit): the apply clears it.

The writers call :meth:`FailureRecords.after_commit` after each commit of vectors: the rows
that failed get their record (attempts counted, backoff, quarantine after ``max_attempts``),
the rows written lose theirs. A rebuild leaves nothing out (it is a fresh start: every row is
tried once more) but records the same way.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.core.failures import FailurePolicy, FailureStatus
from qwen3_pipeline.store.failure_log import FailedRow, FailureLog, utc_now

logger = logging.getLogger("qwen3_pipeline")


@dataclass(frozen=True)
class Classified:
    """What the failure records say about a batch of rows (boolean masks, row order).

    Attributes:
        retried: A due record for the row's current text: sent to the model again.
        quarantined: A quarantined record for its current text: left out.
        deferred: A record for its current text, not due yet: left out.
        recorded: Any record of the row (whatever its text).
    """

    retried: np.ndarray
    quarantined: np.ndarray
    deferred: np.ndarray
    recorded: np.ndarray

    @property
    def held_back(self) -> np.ndarray:
        """Rows left out of this refresh."""
        return self.quarantined | self.deferred


class FailureRecords:
    """The failure records one refresh plans with and updates.

    Args:
        log: The table's failure log.
        records: Its records of the refresh's spec, read when planning.
        policy: Backoff and quarantine.
        spec_fingerprint: The spec the refresh embeds with.
        hold_back: Leave out rows that are quarantined or not due (False for a rebuild).
        now: The time the refresh compares ``next_retry_at`` with.
    """

    def __init__(
        self,
        log: FailureLog,
        records: pa.Table,
        *,
        policy: FailurePolicy,
        spec_fingerprint: str,
        hold_back: bool = True,
        now: datetime | None = None,
    ) -> None:
        self.log = log
        self.records = records
        self.policy = policy
        self.spec_fingerprint = spec_fingerprint
        self.hold_back = hold_back
        self.now = now or utc_now()
        self._doc_keys = records.column("doc_key").combine_chunks()
        self._hashes = records.column("content_hash").combine_chunks()
        self._due = _due(records, self.now, policy)
        self._quarantined = np.asarray(
            pc.equal(records["status"], str(FailureStatus.QUARANTINED))
            .combine_chunks()
            .to_numpy(zero_copy_only=False),
            dtype=bool,
        )
        self.cleared: set[str] = set()
        self.seen: list[pa.Array] = []

    @classmethod
    def read(
        cls,
        log: FailureLog,
        *,
        policy: FailurePolicy,
        spec_fingerprint: str,
        hold_back: bool = True,
    ) -> "FailureRecords":
        """The records of ``log`` for ``spec_fingerprint`` (an empty set when it has none).

        Raises:
            StoreError: The failure log could not be read.
        """
        return cls(
            log,
            log.read(spec_fingerprint),
            policy=policy,
            spec_fingerprint=spec_fingerprint,
            hold_back=hold_back,
        )

    def __len__(self) -> int:
        return self.records.num_rows

    def classify(self, doc_keys: pa.Array, content_hashes: pa.Array) -> Classified:
        """What the records say about rows of ``doc_keys`` (as text) with ``content_hashes``."""
        n = len(doc_keys)
        none = np.zeros(n, dtype=bool)
        if not len(self):
            return Classified(none, none, none, none)
        index = pc.index_in(doc_keys, value_set=self._doc_keys).to_numpy(zero_copy_only=False)
        recorded = ~np.isnan(index.astype(np.float64))
        if recorded.any():
            self.seen.append(doc_keys.filter(pa.array(recorded)))
        rows = np.where(recorded, np.nan_to_num(index.astype(np.float64)), 0).astype(np.int64)
        same_text = recorded & np.asarray(
            pc.equal(content_hashes, self._hashes.take(pa.array(rows))).to_numpy(
                zero_copy_only=False
            ),
            dtype=bool,
        )
        due = same_text & self._due[rows]
        if not self.hold_back:
            return Classified(same_text, none, none, recorded)
        quarantined = same_text & self._quarantined[rows]
        deferred = same_text & ~due & ~quarantined
        return Classified(due, quarantined, deferred, recorded)

    def due_keys(self) -> pa.Array:
        """``doc_key`` of the records due for a retry now (a watermark read adds them)."""
        return self._doc_keys.filter(pa.array(self._due & ~self._quarantined))

    def orphans(self, scope: Sequence[str] | None) -> pa.Array:
        """Recorded keys of the scope that the source no longer holds (call after the scan).

        Args:
            scope: The partitions the scan read (None: the whole source).
        """
        if not len(self):
            return pa.array([], pa.string())
        seen = pa.concat_arrays(self.seen) if self.seen else pa.array([], pa.string())
        unseen = pc.invert(pc.is_in(self._doc_keys, value_set=seen))
        if scope is not None:
            partitions = self.records.column("partition_key").combine_chunks()
            unseen = pc.and_(unseen, pc.is_in(partitions, value_set=pa.array(list(scope))))
        return self._doc_keys.filter(unseen)

    def after_commit(self, failed: Sequence[FailedRow], written: Sequence[str]) -> np.ndarray:
        """Record ``failed`` and clear the records of ``written`` doc keys, after a commit.

        Returns:
            For each of ``failed``: whether it is now quarantined.
        """
        quarantined = np.zeros(len(failed), dtype=bool)
        if failed:
            records = self.log.record_failures(
                failed,
                previous=self.records,
                spec_fingerprint=self.spec_fingerprint,
                policy=self.policy,
            )
            status = dict(
                zip(records["doc_key"].to_pylist(), records["status"].to_pylist(), strict=True)
            )
            quarantined = np.array(
                [status.get(row.doc_key) == FailureStatus.QUARANTINED for row in failed],
                dtype=bool,
            )
            if quarantined.any():
                # A warning: the rows are reported and held back, the run did all it could.
                logger.warning(
                    "%d row(s) quarantined after %d failed attempts: not sent to the model again "
                    "until their text changes or they are replayed (qwen3-pipeline failures)",
                    int(quarantined.sum()),
                    self.policy.max_attempts,
                )
        self.clear(written)
        return quarantined

    def clear(self, doc_keys: Sequence[str] | pa.Array) -> None:
        """Remove the records of ``doc_keys`` that have one (no commit when none has)."""
        if not len(self) or not len(doc_keys):
            return
        keys = doc_keys if isinstance(doc_keys, pa.Array) else pa.array(doc_keys, pa.string())
        known = keys.filter(pc.is_in(keys, value_set=self._doc_keys))
        todo = set(known.to_pylist()) - self.cleared
        if todo:
            self.log.clear(todo)
            self.cleared |= todo


def _due(records: pa.Table, now: datetime, policy: FailurePolicy) -> np.ndarray:
    """Which records a refresh at ``now`` retries: retrying, and due by either clock.

    Due when ``next_retry_at`` has passed (a replay sets it to now), or when the backoff of
    *this* refresh's policy has passed since the last failure: lowering ``retry_backoff_s``
    takes effect on records written under a longer one.
    """
    if not records.num_rows:
        return np.zeros(0, dtype=bool)
    retrying = np.asarray(
        pc.equal(records["status"], str(FailureStatus.RETRYING)).to_numpy(zero_copy_only=False),
        dtype=bool,
    )
    naive = pa.timestamp("us")
    moment = np.datetime64(now, "us")
    next_retry = records["next_retry_at"].cast(naive).to_numpy(zero_copy_only=False)
    last_failed = records["last_failed_at"].cast(naive).to_numpy(zero_copy_only=False)
    attempts = records["attempts"].to_numpy(zero_copy_only=False)
    waits = np.array([int(policy.delay_s(int(a)) * 1e6) for a in attempts], dtype="timedelta64[us]")
    return retrying & ((next_retry <= moment) | (last_failed + waits <= moment))
