"""Change detection: sanitising, hashing and diffing source rows against the stored state.

Pure functions and plain data structures over Arrow arrays and NumPy; no LanceDB, no model.
The refresh engine uses them per batch:

1. :func:`sanitize_texts` on the rendered documents (sources already do this), then
   :func:`content_hashes` of exactly the text that is tokenised;
2. :func:`diff` of the batch against an :class:`ExistingIndex` built once from the stored state
   of the refresh scope, which classifies every row as one of :class:`RowStatus`;
3. :class:`ScopeTracker` across batches: rejects duplicate keys and yields, at the end, the
   stored keys that the source no longer has (the deletions).

Everything that scales with the number of rows is vectorised (Arrow compute, pandas hash
tables); only the hashing itself is a Python loop over ``xxhash`` calls (about 0.4 s per
million short texts).
"""

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from qwen3_pipeline.core.errors import InputDataError, StoreError

# The columns an existing-state table must have (see ``VectorStore.existing_state``); any other
# column is compared as a carry-along value.
REQUIRED_STATE_COLUMNS = ("key", "content_hash", "spec_fingerprint", "partition_key")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN = 10


# --------------------------------------------------------------------------- sanitising


def sanitize_text(text: str) -> str:
    r"""Return ``text`` with NUL bytes removed and lone surrogates replaced by U+FFFD.

    Deterministic: the same input always gives the same output, so hashes are stable. A
    surrogate *pair* left in a Python string (e.g. from JSON ``"\ud83d\ude00"``) is joined
    into the character it encodes; only unpaired halves become ``"\ufffd"``.

    Args:
        text: Any Python string.

    Returns:
        A string that encodes to valid UTF-8 and contains no ``"\x00"``.

    Example:
        >>> sanitize_text("a\x00b\ud800c") == "ab\ufffdc"
        True
    """
    if "\x00" in text:
        text = text.replace("\x00", "")
    if _SURROGATE.search(text):
        # UTF-16 round trip: pairs become their code point, lone halves become U+FFFD.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def sanitize_texts(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Vectorised :func:`sanitize_text` over an Arrow string array; nulls become ``""``.

    Arrow strings cannot hold surrogates, but they can hold NUL bytes and (when a file was
    written without validation) invalid UTF-8; the latter is decoded with U+FFFD replacement
    (:func:`decode_utf8`, which takes binary arrays too).

    Args:
        texts: A string, large-string or binary Arrow array.

    Returns:
        A ``pa.string()`` array of the same length, without nulls.
    """
    texts = decode_utf8(texts)
    texts = pc.fill_null(texts, "")
    return pc.replace_substring(texts, "\x00", "")


def is_binary_type(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` holds raw bytes (binary, large, view or fixed-size binary)."""
    return (
        pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_binary_view(data_type)
        or pa.types.is_fixed_size_binary(data_type)
    )


def decode_utf8(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    r"""A ``pa.string()`` array of valid UTF-8 from string or binary values, nulls kept.

    Invalid UTF-8 (in a binary column, or in a string column written without validation) is
    decoded with U+FFFD replacement, byte for byte as Python's ``bytes.decode("utf-8",
    "replace")``: deterministic, so the same bytes always hash the same.

    Args:
        values: A string, large-string, string-view or binary-like Arrow array.

    Returns:
        The values as a valid ``pa.string()`` array.

    Example:
        >>> decode_utf8(pa.array([b"caf\xc3\xa9", b"bad \xff", None])).to_pylist() == [
        ...     "caf\xe9", "bad \ufffd", None
        ... ]
        True
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if is_binary_type(values.type):
        # The same layout as a string array: a view skips the UTF-8 validation of a cast.
        raw = values if pa.types.is_binary(values.type) else values.cast(pa.binary())
        values = raw.view(pa.string())
    elif not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        raw_bytes = values.view(pa.binary()).to_pylist()
        values = pa.array(
            [None if b is None else b.decode("utf-8", "replace") for b in raw_bytes], pa.string()
        )
    return values


def is_blank(text: str) -> bool:
    r"""Return True when ``text`` is empty or only whitespace (nothing to embed).

    Example:
        >>> is_blank(" \n\t"), is_blank(" x ")
        (True, False)
    """
    return not text or text.isspace()


def blank_mask(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Vectorised :func:`is_blank`: a boolean NumPy mask of empty or whitespace-only texts."""
    empty = pc.equal(pc.utf8_length(texts), 0)
    space = pc.utf8_is_space(texts)
    mask = pc.fill_null(pc.or_(empty, space), True)
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


# --------------------------------------------------------------------------- hashing


def content_hash(text: str) -> str:
    """Return the 128-bit content hash (xxh3_128, 32 hex digits) of a rendered document.

    The hash is over the UTF-8 bytes of exactly the text that is tokenised (after
    :func:`sanitize_text`); the document prompt of the spec is covered by the spec
    fingerprint instead.

    Example:
        >>> len(content_hash("hello"))
        32
    """
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def content_hashes(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Vectorised :func:`content_hash`: a ``pa.string()`` array of hex digests.

    Args:
        texts: Sanitised texts (a list of ``str`` or an Arrow string array without nulls).

    Returns:
        The hashes, aligned with ``texts``.

    Raises:
        InputDataError: A text is null (sanitise first: :func:`sanitize_texts`).
    """
    values = texts.to_pylist() if isinstance(texts, pa.Array | pa.ChunkedArray) else texts
    try:
        return pa.array(list(map(xxhash.xxh3_128_hexdigest, map(str.encode, values))), pa.string())
    except TypeError as e:
        raise InputDataError(
            "content_hashes got a null text; pass the texts through sanitize_texts first"
        ) from e


# --------------------------------------------------------------------------- diff


class RowStatus(enum.IntEnum):
    """What a refresh does with one source row.

    ``NEW``, ``CHANGED`` and ``RESPEC`` are embedded; ``MOVED`` and ``CARRY_ONLY`` get a
    column update without re-embedding; ``UNCHANGED`` is skipped. A row whose content changed
    *and* whose partition moved is ``CHANGED`` (re-embedded and written with its new
    partition key).
    """

    NEW = 0
    CHANGED = 1
    RESPEC = 2
    MOVED = 3
    CARRY_ONLY = 4
    UNCHANGED = 5

    @property
    def label(self) -> str:
        """The lower-case name used in counters and reports (``"carry_only"``)."""
        return self.name.lower()


EMBED_STATUSES = (RowStatus.NEW, RowStatus.CHANGED, RowStatus.RESPEC)
UPDATE_STATUSES = (RowStatus.MOVED, RowStatus.CARRY_ONLY)


class ExistingIndex:
    """The stored state of a refresh scope, indexed by key for vectorised lookups.

    Built once per refresh from ``VectorStore.existing_state(...)`` (columns ``key``,
    ``content_hash``, ``spec_fingerprint``, ``partition_key`` and any carry-along columns),
    then probed batch by batch by :func:`diff`.

    Lookups go through a pandas int64 hash table: integer keys directly, string keys through
    their 64-bit xxh3 hash, verified against the stored key (so a hash collision can never
    match the wrong row). The low-cardinality columns are dictionary-encoded and the content
    hashes viewed as fixed-width bytes, so per-batch gathers are plain NumPy indexing.

    Args:
        state: The stored state; keys must be unique and non-null.

    Raises:
        InputDataError: ``state`` lacks one of the required columns.
        StoreError: The stored keys are not unique (the table is corrupt; rebuild it).

    Example:
        >>> state = pa.table({"key": [1, 2], "content_hash": ["a", "b"],
        ...                   "spec_fingerprint": ["f", "f"], "partition_key": ["", ""]})
        >>> ExistingIndex(state).lookup(pa.array([2, 3])).tolist()
        [1, -1]
    """

    def __init__(self, state: pa.Table) -> None:
        missing = [c for c in REQUIRED_STATE_COLUMNS if c not in state.column_names]
        if missing:
            raise InputDataError(
                f"existing state lacks column(s) {missing}; it has {state.column_names}. "
                "Build it with VectorStore.existing_state()"
            )
        self._state = state
        self._columns: dict[str, pa.Array] = {}
        self._keys = self.column("key")
        self._key_type = self._keys.type
        self._hashed_keys = not pa.types.is_integer(self._key_type)
        import pandas as pd  # imported when a table is diffed: `embed` never pays for it

        self._index = pd.Index(self._key_codes(self._keys))
        if not self._index.is_unique and self._hashed_keys:
            # A 64-bit collision between two stored keys (or a true duplicate): fall back to
            # an exact index on the strings themselves.
            self._hashed_keys = False
            self._index = pd.Index(self._keys.to_numpy(zero_copy_only=False), dtype=object)
        if not self._index.is_unique:
            dupes = self._index[self._index.duplicated()].unique()[:_SHOWN].tolist()
            raise StoreError(
                f"the vector table holds duplicate keys (e.g. {dupes}); it was written without "
                "a declared key. Rebuild it (rebuild=True / --rebuild)"
            )
        self.hashes = _FixedWidthColumn(self.column("content_hash"))
        self.partitions = _CodedColumn(self.column("partition_key"))
        self.fingerprints = _CodedColumn(self.column("spec_fingerprint"))

    @classmethod
    def empty(cls, key_type: pa.DataType, carry: pa.Schema | None = None) -> "ExistingIndex":
        """Return an index of an empty scope (first refresh)."""
        fields = [
            pa.field("key", key_type),
            pa.field("content_hash", pa.string()),
            pa.field("spec_fingerprint", pa.string()),
            pa.field("partition_key", pa.string()),
            *(carry or []),
        ]
        return cls(pa.schema(fields).empty_table())

    def __len__(self) -> int:
        return self._state.num_rows

    @property
    def state(self) -> pa.Table:
        """The indexed stored state (row ``i`` is what :meth:`lookup` returns as ``i``)."""
        return self._state

    @property
    def keys(self) -> pa.Array:
        """The stored keys, in row order."""
        return self._keys

    @property
    def key_type(self) -> pa.DataType:
        """The Arrow type of the stored keys."""
        return self._key_type

    @property
    def attribute_columns(self) -> list[str]:
        """The carry-along columns held beside the required ones."""
        return [c for c in self._state.column_names if c not in REQUIRED_STATE_COLUMNS]

    def column(self, name: str) -> pa.Array:
        """Return one stored column as a single contiguous array."""
        if name not in self._columns:
            chunked = self._state.column(name)
            self._columns[name] = (
                chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            )
        return self._columns[name]

    def lookup(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Return the stored row of each key, or -1 where the key is not stored."""
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if pa.types.is_integer(self._key_type) != pa.types.is_integer(keys.type):
            raise InputDataError(
                f"source keys are {keys.type} but the stored keys are {self._key_type}; the key "
                "column's type changed, so rebuild the table (rebuild=True / --rebuild)"
            )
        if not self._hashed_keys:
            probe = (
                keys.cast(pa.int64()).to_numpy(zero_copy_only=False)
                if pa.types.is_integer(keys.type)
                else keys.to_numpy(zero_copy_only=False)
            )
            return np.asarray(self._index.get_indexer(probe), dtype=np.int64)
        rows = np.asarray(self._index.get_indexer(self._key_codes(keys)), dtype=np.int64)
        hit = np.flatnonzero(rows >= 0)
        if len(hit):
            same = pc.equal(
                keys.take(pa.array(hit)).cast(self._key_type), self._keys.take(pa.array(rows[hit]))
            )
            wrong = ~np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
            rows[hit[wrong]] = -1
        return rows

    def _key_codes(self, keys: pa.Array) -> np.ndarray:
        return key_codes(keys, hashed=self._hashed_keys)


def key_codes(keys: pa.Array, *, hashed: bool) -> np.ndarray:
    """The int64 code of each key: an integer key itself, or a string key's 64-bit xxh3 hash.

    Example:
        >>> key_codes(pa.array([7, 3]), hashed=False).tolist()
        [7, 3]
    """
    if not hashed:
        return np.asarray(keys.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    values = keys.to_pylist()
    # map() over C functions: no per-row Python frame (str.encode defaults to UTF-8).
    digests = map(xxhash.xxh3_64_intdigest, map(str.encode, values))
    return np.fromiter(digests, dtype=np.uint64, count=len(values)).view(np.int64)


class _FixedWidthColumn:
    """A string column gathered and compared as NumPy fixed-width bytes when it can be."""

    def __init__(self, values: pa.Array) -> None:
        self.values = values
        self.fixed = _fixed_width_view(values)

    def differs(self, rows: np.ndarray, found: np.ndarray, incoming: pa.Array) -> np.ndarray:
        """Where ``incoming`` differs from the stored value at ``rows`` (only where found)."""
        out = np.zeros(len(rows), dtype=bool)
        hit = np.flatnonzero(found)
        if not len(hit):
            return out
        mine = _fixed_width_view(incoming) if self.fixed is not None else None
        if self.fixed is not None and mine is not None and mine.dtype == self.fixed.dtype:
            out[hit] = mine[hit] != self.fixed[rows[hit]]
        else:
            old = self.values.take(pa.array(rows[hit]))
            out[hit] = _differs(_as_string_array(incoming).take(pa.array(hit)), old)
        return out


def _fixed_width_view(values: pa.Array) -> np.ndarray | None:
    """Zero-copy ``S<width>`` view of a null-free string array whose values share one length."""
    if values.type != pa.string() or values.null_count or not len(values):
        return None
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[
        values.offset : values.offset + len(values) + 1
    ]
    width = int(offsets[1] - offsets[0])
    if width <= 0 or not np.all(np.diff(offsets) == width):
        return None
    data = values.buffers()[2]
    return np.frombuffer(data, dtype=f"S{width}", count=len(values), offset=int(offsets[0]))


class _CodedColumn:
    """A low-cardinality string column held as dictionary codes (-1 for null)."""

    def __init__(self, values: pa.Array) -> None:
        encoded = values.dictionary_encode()
        self.dictionary: pa.Array = encoded.dictionary
        self.codes = np.asarray(
            pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64
        )

    def encode(self, incoming: pa.Array) -> np.ndarray:
        """Codes of ``incoming`` values in this dictionary (-2 for values it lacks)."""
        found = pc.index_in(_as_string_array(incoming), value_set=self.dictionary)
        return np.asarray(pc.fill_null(found, -2).to_numpy(zero_copy_only=False), dtype=np.int64)

    def gather(self, rows: np.ndarray, found: np.ndarray) -> np.ndarray:
        """Stored codes at ``rows`` (-3 where not found)."""
        return np.where(found, self.codes[np.where(found, rows, 0)] if len(self.codes) else -3, -3)


@dataclass(frozen=True, kw_only=True)
class DiffResult:
    """The classification of one incoming batch.

    Attributes:
        status: ``RowStatus`` code per incoming row (``int8``).
        existing_rows: The matching row of the :class:`ExistingIndex`, -1 for new keys
            (what :meth:`ScopeTracker.observe` takes).
        moved: Where the stored partition key differs from the incoming one.
        carry_changed: Per compared carry column, where the incoming value differs.
        fingerprint: The configured spec fingerprint the rows were compared with.
        existing: The index the batch was compared with.
        partition_keys: The incoming partition keys.
    """

    status: np.ndarray
    existing_rows: np.ndarray
    moved: np.ndarray
    carry_changed: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprint: str
    existing: ExistingIndex = field(repr=False)
    partition_keys: pa.Array = field(repr=False)

    def __len__(self) -> int:
        return len(self.status)

    def mask(self, *statuses: RowStatus) -> np.ndarray:
        """Return a boolean mask of the rows with any of ``statuses``."""
        return np.isin(self.status, np.array([int(s) for s in statuses], dtype=np.int8))

    @cached_property
    def counts(self) -> dict[str, int]:
        """Rows per status label, every status present (zeros included)."""
        found = np.bincount(self.status, minlength=len(RowStatus))
        return {s.label: int(found[s]) for s in RowStatus}

    def reasons(self) -> list[str]:
        """Return a human-readable reason per row (built on demand; not for hot paths).

        Examples: ``"new key"``, ``"content changed"``, ``"spec fingerprint 1a2b -> 3c4d"``,
        ``"partition 'shard-01-of-04' -> 'shard-02-of-04'; carry changed: title"``.
        """
        out: list[str] = [RowStatus.UNCHANGED.label] * len(self.status)
        for i in np.flatnonzero(self.status != RowStatus.UNCHANGED).tolist():
            status = RowStatus(int(self.status[i]))
            if status is RowStatus.NEW:
                out[i] = "new key"
                continue
            row = int(self.existing_rows[i])
            parts: list[str] = []
            if status is RowStatus.CHANGED:
                parts.append("content changed")
            elif status is RowStatus.RESPEC:
                old_fp = self.existing.column("spec_fingerprint")[row].as_py()
                parts.append(f"spec fingerprint {old_fp} -> {self.fingerprint}")
            if self.moved[i]:
                old_part = self.existing.column("partition_key")[row].as_py()
                parts.append(f"partition {old_part!r} -> {self.partition_keys[i].as_py()!r}")
            changed = [name for name, rows in self.carry_changed.items() if rows[i]]
            if changed:
                parts.append("carry changed: " + ", ".join(changed))
            out[i] = "; ".join(parts)
        return out


def diff(
    *,
    keys: pa.Array | pa.ChunkedArray,
    content_hashes: pa.Array | pa.ChunkedArray,
    partition_keys: pa.Array | pa.ChunkedArray,
    existing: ExistingIndex,
    fingerprint: str,
    carry: pa.Table | pa.RecordBatch | None = None,
) -> DiffResult:
    """Classify each incoming row against the stored state (vectorised).

    Precedence per row: ``NEW`` (key not stored) > ``CHANGED`` (content hash differs, moved or
    not) > ``RESPEC`` (stored spec fingerprint differs from ``fingerprint``) > ``MOVED``
    (partition key differs; carry changes ride along) > ``CARRY_ONLY`` > ``UNCHANGED``.

    Carry columns are compared only where the stored state has a column of the same name;
    null equals null and NaN equals NaN, so an unchanged value never looks changed. Any
    non-vector column can be compared this way (``source_updated_at`` for instance).

    Args:
        keys: Incoming keys (unique within the batch; see :class:`ScopeTracker`).
        content_hashes: :func:`content_hashes` of the incoming texts.
        partition_keys: The partition key each incoming row belongs to.
        existing: The stored state of the scope.
        fingerprint: The configured ``EmbeddingSpec.fingerprint``.
        carry: Incoming carry-along columns, aligned with ``keys``.

    Returns:
        The :class:`DiffResult` of the batch.

    Raises:
        InputDataError: Inputs are not aligned, or the key type differs from the stored one.

    Example:
        >>> state = pa.table({"key": [1, 2], "content_hash": ["h1", "h2"],
        ...                   "spec_fingerprint": ["f", "f"], "partition_key": ["a", "a"]})
        >>> result = diff(keys=pa.array([1, 2, 3]), content_hashes=pa.array(["h1", "x", "h3"]),
        ...               partition_keys=pa.array(["a", "a", "a"]),
        ...               existing=ExistingIndex(state), fingerprint="f")
        >>> [RowStatus(s).label for s in result.status]
        ['unchanged', 'changed', 'new']
    """
    n = len(keys)
    for name, values in (("content_hashes", content_hashes), ("partition_keys", partition_keys)):
        if len(values) != n:
            raise InputDataError(f"diff: {name} has {len(values)} rows but keys has {n}")
    if carry is not None and carry.num_rows != n:
        raise InputDataError(f"diff: carry has {carry.num_rows} rows but keys has {n}")
    new_parts = _as_string_array(partition_keys)

    rows = existing.lookup(keys)
    found = rows >= 0
    hit = np.flatnonzero(found)

    hash_differs = existing.hashes.differs(rows, found, _as_string_array(content_hashes))
    fp_code = existing.fingerprints.encode(pa.array([fingerprint], pa.string()))[0]
    fp_differs = found & (existing.fingerprints.gather(rows, found) != fp_code)
    moved = found & (
        existing.partitions.gather(rows, found) != existing.partitions.encode(new_parts)
    )

    carry_changed: dict[str, np.ndarray] = {}
    if carry is not None:
        stored_names = set(existing.attribute_columns)
        take_new, take_old = pa.array(hit), pa.array(rows[hit])
        for name in carry.column_names:
            if name not in stored_names:
                continue
            changed = np.zeros(n, dtype=bool)
            if len(hit):
                old = existing.column(name).take(take_old)
                new = _align(carry.column(name), old.type, name).take(take_new)
                changed[hit] = _differs(new, old)
            carry_changed[name] = changed
    any_carry = np.zeros(n, dtype=bool)
    for changed in carry_changed.values():
        any_carry |= changed

    status = np.full(n, RowStatus.UNCHANGED, dtype=np.int8)
    status[any_carry] = RowStatus.CARRY_ONLY
    status[moved] = RowStatus.MOVED
    status[fp_differs] = RowStatus.RESPEC
    status[hash_differs] = RowStatus.CHANGED
    status[~found] = RowStatus.NEW
    return DiffResult(
        status=status,
        existing_rows=rows,
        moved=moved,
        carry_changed=carry_changed,
        fingerprint=fingerprint,
        existing=existing,
        partition_keys=new_parts,
    )


def _as_string_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if values.type == pa.string() else values.cast(pa.string())


def _align(values: pa.Array | pa.ChunkedArray, target: pa.DataType, name: str) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.type == target:
        return values
    try:
        return values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputDataError(
            f"carry column {name!r} is {values.type} in the source but {target} in the table; "
            "cast it in the source, or rebuild the table (rebuild=True / --rebuild)"
        ) from e


def _differs(new: pa.Array, old: pa.Array) -> np.ndarray:
    """Null-aware inequality: null == null, NaN == NaN; a null on one side only differs."""
    new_null = np.asarray(new.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    old_null = np.asarray(old.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    try:
        unequal = pc.not_equal(new, old)
        if pa.types.is_floating(new.type):
            both_nan = pc.and_(pc.is_nan(new), pc.is_nan(old))
            unequal = pc.and_(unequal, pc.invert(both_nan))
        values = np.asarray(pc.fill_null(unequal, False).to_numpy(zero_copy_only=False), dtype=bool)
    except pa.ArrowNotImplementedError:
        # Nested types (lists, structs) have no vectorised equality; compare as Python values.
        values = np.fromiter(
            (a != b for a, b in zip(new.to_pylist(), old.to_pylist(), strict=True)),
            dtype=bool,
            count=len(new),
        )
    return np.where(new_null | old_null, new_null != old_null, values)


# --------------------------------------------------------------------------- scope tracking


class ScopeTracker:
    """Follows the keys of one refresh scope across batches.

    It rejects a key that appears twice in the scope (before anything of a later batch is
    written; the engine should still check the whole source up front, see
    ``sources.validate_keys``) and, after the last batch, returns the stored keys that were
    never seen: the rows to delete.

    Args:
        existing: The stored state of the scope, as passed to :func:`diff`.

    Example:
        >>> state = pa.table({"key": [1, 2], "content_hash": ["a", "b"],
        ...                   "spec_fingerprint": ["f", "f"], "partition_key": ["", ""]})
        >>> index = ExistingIndex(state)
        >>> tracker = ScopeTracker(index)
        >>> keys = pa.array([2, 5])
        >>> tracker.observe(keys, index.lookup(keys))
        >>> tracker.unseen_keys().to_pylist(), tracker.seen
        ([1], 2)
    """

    def __init__(self, existing: ExistingIndex) -> None:
        self._existing = existing
        self._seen_rows = np.zeros(len(existing), dtype=bool)
        self._new_keys = KeyRuns()
        self.seen = 0

    def observe(self, keys: pa.Array | pa.ChunkedArray, existing_rows: np.ndarray) -> None:
        """Record a batch of keys (``existing_rows`` from :func:`diff` or ``lookup``).

        Raises:
            InputDataError: A key of this batch was already seen in the scope, or repeats
                within the batch; the message names up to ten such keys.
        """
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        found = existing_rows >= 0
        rows = existing_rows[found]
        duplicates: list[Any] = []
        if len(rows):
            unique_rows, counts = np.unique(rows, return_counts=True)
            repeated = unique_rows[counts > 1]
            again = unique_rows[self._seen_rows[unique_rows]]
            bad = np.union1d(repeated, again)
            if len(bad):
                duplicates.extend(self._existing.keys.take(pa.array(bad[:_SHOWN])).to_pylist())
            self._seen_rows[rows] = True
        if not found.all():
            fresh = keys.filter(pa.array(~found))
            if pc.count_distinct(fresh).as_py() != len(fresh):
                counts = pc.value_counts(fresh)
                repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
                duplicates.extend(repeated.to_pylist())
            again = fresh.filter(pa.array(self._new_keys.contains(fresh)))
            duplicates.extend(sorted(set(again.to_pylist()), key=str))
            self._new_keys.add(fresh)
        self.seen += len(keys)
        if duplicates:
            raise InputDataError(
                f"duplicate key(s) in the source: {duplicates[:_SHOWN]!r}; the key column must "
                "be unique. Fix the source (e.g. deduplicate in the dbt model) and re-run"
            )

    def unseen_keys(self, partition_keys: Sequence[str] | None = None) -> pa.Array:
        """Return the stored keys that no batch contained: the rows to delete.

        Args:
            partition_keys: Only stored rows in these partitions. Pass the read's scope when
                the index holds more than it (e.g. the whole table, built so that rows moving
                in from another partition are recognised): a read of one partition must never
                delete the rows of another.
        """
        unseen = ~self._seen_rows
        if partition_keys is not None:
            in_scope = pc.is_in(
                self._existing.column("partition_key"),
                value_set=pa.array(list(partition_keys), pa.string()),
            )
            unseen &= np.asarray(
                pc.fill_null(in_scope, False).to_numpy(zero_copy_only=False), dtype=bool
            )
        return self._existing.keys.filter(pa.array(unseen))


class KeyRuns:
    """A set of keys held as sorted runs of int64 codes (a log-structured set), exact.

    A refresh's new keys (not stored yet) are checked for repeats across batches. A Python
    set of them cost about 75 bytes per key (a 5M-row backfill's plan held 360 MiB in it);
    these runs cost 8 bytes per integer key, and 8 plus the key's bytes per string key (whose
    code is its 64-bit hash, verified against the key itself, so a collision is never taken
    for a repeat). Adding a batch is a sort of the batch; runs of similar size are merged,
    so each key is merged about log2(keys / batch) times, and a lookup probes that many
    sorted runs.

    Example:
        >>> runs = KeyRuns()
        >>> runs.add(pa.array(["a", "b"]))
        >>> runs.contains(pa.array(["b", "c"])).tolist()
        [True, False]
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, pa.Array | None]] = []
        self._hashed: bool | None = None

    def __len__(self) -> int:
        return sum(len(codes) for codes, _ in self._runs)

    def add(self, keys: pa.Array) -> None:
        """Add keys (none of them already in the set; a repeat would be kept twice)."""
        if not len(keys):
            return
        if self._hashed is None:
            self._hashed = not pa.types.is_integer(keys.type)
        codes = key_codes(keys, hashed=self._hashed)
        order = np.argsort(codes, kind="stable")
        self._runs.append((codes[order], keys.take(pa.array(order)) if self._hashed else None))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (codes_a, keys_a), (codes_b, keys_b) = self._runs[-2], self._runs[-1]
            merged = np.concatenate([codes_a, codes_b])
            order = np.argsort(merged, kind="stable")
            merged_keys = None
            if keys_a is not None and keys_b is not None:
                merged_keys = pa.concat_arrays([keys_a, keys_b.cast(keys_a.type)])
                merged_keys = merged_keys.take(pa.array(order))
            self._runs[-2:] = [(merged[order], merged_keys)]

    def contains(self, keys: pa.Array) -> np.ndarray:
        """Return whether each key is in the set."""
        found = np.zeros(len(keys), dtype=bool)
        if not len(keys) or not self._runs:
            return found
        codes = key_codes(keys, hashed=bool(self._hashed))
        for run_codes, run_keys in self._runs:
            left = np.searchsorted(run_codes, codes, side="left")
            right = np.searchsorted(run_codes, codes, side="right")
            if run_keys is None:  # integer keys: the code is the key
                found |= right > left
                continue
            for row in np.flatnonzero((right > left) & ~found):
                # Every stored key with this code (two only after a 64-bit collision).
                candidates = run_keys.slice(int(left[row]), int(right[row] - left[row]))
                found[row] = keys[row].as_py() in candidates.to_pylist()
        return found
