"""Partitions of a source: stable hash shards of the key, and time windows on a column.

A row's partition key is always *its own* partition, whatever range is read:

- no partition: every row is in ``UNPARTITIONED`` (``""``);
- hash shards: :class:`Shard` ``(index, count)`` reads one shard, :class:`Shards`
  ``(count, indices)`` several (a backfill range) or, with ``indices=None``, all of them;
  each row is labelled ``shard_label(shard_of(key, count), count)``, e.g. ``"shard-03-of-16"``.
  The shard of a key is ``xxh3_64(canonical key) % count`` where the canonical form is the
  decimal string of an integer key or the string itself, so it never changes between runs,
  machines or Python versions;
- :class:`TimeWindow` reads ``start <= column < end`` and labels each row with the window of
  ``grain`` (hour/day/week/month) that holds it, formatted as Dagster formats time partition
  keys (``"2024-05-01"``, hourly ``"2024-05-01-13:00"``).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import numpy as np
import pyarrow as pa
import xxhash

from qwen3_pipeline.core.errors import ConfigError, InputDataError

UNPARTITIONED = ""
_SHARD_LABEL = re.compile(r"^shard-(\d+)-of-(\d+)$")
Grain = Literal["hour", "day", "week", "month"]


# --------------------------------------------------------------------------- partitions


def shard_label(index: int, count: int) -> str:
    """Return the partition key of shard ``index`` of ``count`` (``"shard-03-of-16"``).

    Numbers are zero-padded to the width of ``count - 1`` (at least two digits), so the labels
    of one sharding sort in shard order.

    Example:
        >>> shard_label(3, 16), shard_label(7, 128)
        ('shard-03-of-16', 'shard-007-of-128')
    """
    _check_shard(index, count)
    width = max(2, len(str(count - 1)))
    return f"shard-{index:0{width}d}-of-{count:0{width}d}"


def parse_shard_label(label: str) -> tuple[int, int]:
    """Return ``(index, count)`` of a :func:`shard_label`.

    Raises:
        ConfigError: ``label`` is not a shard label.

    Example:
        >>> parse_shard_label("shard-03-of-16")
        (3, 16)
    """
    match = _SHARD_LABEL.match(label)
    if not match:
        raise ConfigError(f"{label!r} is not a shard partition key like 'shard-03-of-16'")
    index, count = int(match.group(1)), int(match.group(2))
    _check_shard(index, count)
    return index, count


def _check_shard(index: int, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"shard count must be a positive integer, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"shard index must be an integer in 0..{count - 1}, got {index!r}")


def _canonical_key(key: int | str) -> bytes:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise InputDataError(f"a key must be an int or a str, got {type(key).__name__} {key!r}")
    return str(key).encode("utf-8")


def shard_of(key: int | str, count: int) -> int:
    """Return the shard of ``key`` among ``count`` (stable: xxh3_64 of its canonical form).

    Example:
        >>> shard_of(42, 16) == shard_of("42", 16)
        True
    """
    _check_shard(0, count)
    return xxhash.xxh3_64_intdigest(_canonical_key(key)) % count


def shard_indices(keys: pa.Array | pa.ChunkedArray, count: int) -> np.ndarray:
    """Vectorised :func:`shard_of` over an Arrow array of integer or string keys."""
    _check_shard(0, count)
    values = keys.to_pylist()
    encoded = (
        map(str.encode, map(str, values))
        if pa.types.is_integer(keys.type)
        else map(str.encode, values)
    )
    digests = np.fromiter(map(xxhash.xxh3_64_intdigest, encoded), np.uint64, count=len(values))
    return (digests % np.uint64(count)).astype(np.int64)


@dataclass(frozen=True)
class Shard:
    """Read one hash shard of the source: the rows whose key is in shard ``index`` of ``count``.

    Example:
        >>> Shard(3, 16).partition_keys()
        ['shard-03-of-16']
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        _check_shard(self.index, self.count)

    @property
    def label(self) -> str:
        """This shard's partition key."""
        return shard_label(self.index, self.count)

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers."""
        return [self.label]

    def as_shards(self) -> "Shards":
        """The same selection as a :class:`Shards`."""
        return Shards(self.count, (self.index,))


@dataclass(frozen=True)
class Shards:
    """Read several hash shards (``indices``), or all of them (``indices=None``).

    Every row is labelled with its own shard, so reading all shards at once (an unpartitioned
    materialisation or a full backfill) stores the same partition keys as reading them one
    by one.

    Example:
        >>> Shards.from_labels(["shard-01-of-04", "shard-02-of-04"])
        Shards(count=4, indices=(1, 2))
    """

    count: int
    indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_shard(0, self.count)
        if self.indices is not None:
            for index in self.indices:
                _check_shard(index, self.count)
            object.__setattr__(self, "indices", tuple(sorted(set(self.indices))))

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> "Shards":
        """Build a selection from shard partition keys (e.g. a Dagster backfill range).

        Raises:
            ConfigError: A label is malformed, the labels disagree on the count, or none given.
        """
        if not labels:
            raise ConfigError("from_labels needs at least one shard partition key")
        parsed = [parse_shard_label(label) for label in labels]
        counts = {count for _, count in parsed}
        if len(counts) != 1:
            raise ConfigError(f"shard partition keys mix shard counts {sorted(counts)}: {labels}")
        return cls(counts.pop(), tuple(index for index, _ in parsed))

    @property
    def selects_all(self) -> bool:
        """True when every shard is read."""
        return self.indices is None or len(self.indices) == self.count

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers."""
        indices = range(self.count) if self.indices is None else self.indices
        return [shard_label(i, self.count) for i in indices]


@dataclass(frozen=True, kw_only=True)
class TimeWindow:
    """Read the rows with ``start <= column < end``, each labelled with its ``grain`` window.

    Naive datetimes (and dates) are taken as UTC. ``grain=None`` labels every row with the
    label of ``start`` (one partition per read). Rows whose ``column`` is null belong to no
    window and are not read.

    Example:
        >>> w = TimeWindow(column="updated_at", start=date(2024, 5, 1), end=date(2024, 5, 3))
        >>> w.partition_keys()
        ['2024-05-01', '2024-05-02']
    """

    column: str
    start: datetime | date
    end: datetime | date
    grain: Grain | None = "day"

    def __post_init__(self) -> None:
        start, end = _as_utc(self.start, "start"), _as_utc(self.end, "end")
        if not start < end:
            raise ConfigError(f"time window start {start} must be before end {end}")
        if self.grain not in (None, "hour", "day", "week", "month"):
            raise ConfigError(
                f"time window grain must be 'hour', 'day', 'week', 'month' or None, "
                f"got {self.grain!r}"
            )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def start_utc(self) -> datetime:
        """``start`` as an aware UTC datetime."""
        return _as_utc(self.start, "start")

    @property
    def end_utc(self) -> datetime:
        """``end`` as an aware UTC datetime."""
        return _as_utc(self.end, "end")

    def label_of(self, moment: datetime) -> str:
        """Return the partition key of the window holding ``moment``."""
        if self.grain is None:
            return _time_label(self.start_utc, "hour" if self.start_utc.hour else "day")
        return _time_label(_floor(_as_utc(moment, "moment"), self.grain), self.grain)

    def partition_keys(self) -> list[str]:
        """The partition keys this read covers (every window of ``grain`` it overlaps)."""
        if self.grain is None:
            return [self.label_of(self.start_utc)]
        keys: list[str] = []
        moment = _floor(self.start_utc, self.grain)
        while moment < self.end_utc:
            keys.append(_time_label(moment, self.grain))
            moment = _step(moment, self.grain)
        return keys


Partition = Shard | Shards | TimeWindow


def _as_utc(value: datetime | date, what: str) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ConfigError(f"time window {what} must be a datetime or a date, got {value!r}")


def _floor(moment: datetime, grain: Grain) -> datetime:
    if grain == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if grain == "day":
        return day
    if grain == "week":  # Dagster's weekly partitions start on Sunday by default
        return day - timedelta(days=(day.weekday() + 1) % 7)
    return day.replace(day=1)


def _step(moment: datetime, grain: Grain) -> datetime:
    if grain == "hour":
        return moment + timedelta(hours=1)
    if grain == "day":
        return moment + timedelta(days=1)
    if grain == "week":
        return moment + timedelta(days=7)
    year, month = divmod(moment.month, 12)
    return moment.replace(year=moment.year + year, month=month + 1)


def _time_label(moment: datetime, grain: Grain) -> str:
    return moment.strftime("%Y-%m-%d-%H:%M" if grain == "hour" else "%Y-%m-%d")


def scope_partition_keys(partition: Partition | None) -> list[str] | None:
    """Return the partition keys a read covers, or ``None`` when it covers the whole table.

    Use it to restrict the stored state a refresh diffs against and deletes from: a read of
    shard 3 must never delete rows of shard 4.

    Example:
        >>> scope_partition_keys(Shard(1, 4)), scope_partition_keys(Shards(4))
        (['shard-01-of-04'], None)
    """
    if partition is None:
        return None
    if isinstance(partition, Shards) and partition.selects_all:
        return None
    return partition.partition_keys()


def parse_shard(value: str) -> tuple[int, int]:
    """Parse ``K/N`` (shard K of N, 0-based) for ``--shard``.

    Raises:
        InputDataError: Not two integers with ``0 <= K < N``.
    """
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError as e:
        raise InputDataError(f"--shard {value!r} must look like K/N, e.g. 3/16") from e
    if not 0 <= index < count:
        raise InputDataError(f"--shard {value!r}: K must be in 0..N-1")
    return index, count
