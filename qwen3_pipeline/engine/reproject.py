"""Matryoshka re-projection: derive vectors at a smaller dim from stored ones, no model.

Qwen3-Embedding is Matryoshka-trained: the vector at dimension ``d`` is the first ``d``
components of the full vector, L2-normalised again. A stored vector at dimension ``D >= d``
(itself ``normalize(full[:D])``) therefore gives the vector at ``d`` exactly:
``normalize(stored[:d]) == normalize(full[:d])``. So when a table's spec changes only by a
smaller ``dim`` (same model, revision, max_length, document prompt, normalisation, chunking),
every row whose text is unchanged can be *re-projected* from a vector already stored, instead
of being embedded again.

A :class:`Donor` is such a table: the live table during an in-place rebuild
(``refresh --dim 256 --rebuild``), or another table of the same database (``docs_1024`` when
``docs_256`` is first filled). The apply pass asks it for each batch of rows to embed; rows it
holds with the same content hash are re-projected, the rest go to the model. Only row tables
(one vector per source row) are re-projected; a chunk table is embedded as usual.

Equal specs do not make equal vectors: weights re-uploaded under the same name, or another
library version, give other vectors under the same spec. So a donor is used only when the
loaded model reproduces its drift canaries (``verify`` of :func:`find_donor`, which the
refresh's :class:`~qwen3_pipeline.engine.canary.DriftGuard` provides); a rebuild after a
drift therefore embeds every row instead of copying the old vectors.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from qwen3_pipeline.core.errors import ConfigError, Qwen3PipelineError
from qwen3_pipeline.core.schema import META_SPEC, REBUILD_MARKER
from qwen3_pipeline.core.spec import EmbeddingSpec

logger = logging.getLogger("qwen3_pipeline")

# The spec fields that must agree for a stored vector to be re-projectable (dim may shrink).
_SAME_FIELDS = ("model", "revision", "max_length", "document_prompt", "normalize", "chunking")


def can_reproject(target: EmbeddingSpec, stored: EmbeddingSpec) -> bool:
    """Whether vectors stored under ``stored`` give ``target``'s by slicing (no model).

    Example:
        >>> big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=1024)
        >>> small = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=256)
        >>> can_reproject(small, big), can_reproject(big, small)
        (True, False)
    """
    same = all(getattr(target, f) == getattr(stored, f) for f in _SAME_FIELDS)
    return same and target.chunking is None and target.output_dim <= stored.output_dim


def project(vectors: np.ndarray, dim: int, *, normalize: bool) -> np.ndarray:
    """The first ``dim`` components of each row, L2-normalised again when ``normalize``.

    Example:
        >>> project(np.array([[0.6, 0.8, 0.0]], dtype=np.float32), 1, normalize=True).tolist()
        [[1.0]]
    """
    sliced = np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)
    if not normalize:
        return sliced
    norms = np.linalg.norm(sliced, axis=1, keepdims=True)
    return sliced / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True, kw_only=True)
class Reprojected:
    """What a donor gave for one batch of rows.

    Attributes:
        found: Per requested row, whether it was re-projected.
        vectors: ``float32 [found.sum(), dim]`` re-projected vectors, in row order.
        n_tokens: The donor's token counts of those rows (same max_length: same counts).
        truncated: The donor's truncation flags of those rows.
        embedded_at: When the donor's vectors were computed by the model.
    """

    found: np.ndarray
    vectors: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    embedded_at: pa.Array


class Donor:
    """A stored table whose vectors the new spec can be re-projected from.

    Args:
        table: The donor's ``lancedb`` table.
        name: Its name (for messages).
        spec: The spec the donor holds.
        target: The spec being written.
    """

    def __init__(self, table: Any, name: str, spec: EmbeddingSpec, target: EmbeddingSpec) -> None:
        if not can_reproject(target, spec):
            raise ConfigError(
                f"table {name!r} (model={spec.model} dim={spec.dim}) cannot give vectors for "
                f"model={target.model} dim={target.dim}: re-projection needs the same model, "
                "revision, max_length, document prompt and normalisation, and a dim at least "
                "as large"
            )
        self.table = table
        self.name = name
        self.spec = spec
        self.target = target
        self._key_index: pd.Index | None = None
        self._hashes: np.ndarray | None = None
        self._row_ids: np.ndarray | None = None

    def lookup(
        self, keys: pa.Array | pa.ChunkedArray, content_hashes: pa.Array | pa.ChunkedArray
    ) -> Reprojected:
        """Re-project the rows the donor holds with the same key and content hash.

        The first call indexes the donor's keys and hashes (one scan, about 50 bytes a row,
        never vectors); each call then reads only the vectors it re-projects, by row id, so a
        rebuild reads the donor once however many batches it has.

        Raises:
            StoreError: The donor could not be read.
        """
        index, hashes, row_ids = self._index()
        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        if isinstance(content_hashes, pa.ChunkedArray):
            content_hashes = content_hashes.combine_chunks()
        at = index.get_indexer(np.asarray(keys.to_numpy(zero_copy_only=False)))
        hit = at >= 0
        incoming = np.asarray(content_hashes.to_numpy(zero_copy_only=False)).astype(hashes.dtype)
        hit[hit] = hashes[at[hit]] == incoming[hit]
        wanted = row_ids[at[hit]]
        found = self._read(
            lambda: (
                self.table.take_row_ids(wanted.tolist())
                .select(["key", "vector", "n_tokens", "truncated", "embedded_at"])
                .with_row_id()
                .to_arrow()
            )
        )
        # take_row_ids returns rows in no particular order: align them with ``wanted``.
        order = pd.Index(found.column("_rowid").to_numpy()).get_indexer(wanted)
        if (order < 0).any():  # the donor changed under us: re-project nothing of this batch
            return self._nothing(len(hit))
        rows = found.take(pa.array(order))
        if rows.column("key").to_pylist() != keys.filter(pa.array(hit)).to_pylist():
            return self._nothing(len(hit))
        flat = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        stored = flat.reshape(-1, self.spec.output_dim)
        return Reprojected(
            found=hit,
            vectors=project(stored, self.target.output_dim, normalize=self.target.normalize),
            n_tokens=np.asarray(rows.column("n_tokens").to_numpy(), dtype=np.int32),
            truncated=np.asarray(rows.column("truncated").to_numpy(), dtype=bool),
            embedded_at=rows.column("embedded_at").combine_chunks(),
        )

    def _index(self) -> tuple[pd.Index, np.ndarray, np.ndarray]:
        if self._key_index is None:
            scan = self._read(
                lambda: (
                    self.table.search().select(["key", "content_hash"]).with_row_id(True).to_arrow()
                )
            )
            self._key_index = pd.Index(scan.column("key").to_numpy())
            # Fixed-width bytes: content hashes are 32 hex digits.
            self._hashes = np.asarray(
                scan.column("content_hash").to_numpy(zero_copy_only=False)
            ).astype("S32")
            self._row_ids = np.asarray(scan.column("_rowid").to_numpy(), dtype=np.uint64)
        assert self._hashes is not None
        assert self._row_ids is not None
        return self._key_index, self._hashes, self._row_ids

    def _read(self, action: Callable[[], pa.Table]) -> pa.Table:
        from qwen3_pipeline.store import store_error

        try:
            return action()
        except Qwen3PipelineError:
            raise
        except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
            raise store_error(e, f"read donor table {self.name!r}") from e

    def _nothing(self, n: int) -> Reprojected:
        return Reprojected(
            found=np.zeros(n, dtype=bool),
            vectors=np.zeros((0, self.target.output_dim), dtype=np.float32),
            n_tokens=np.zeros(0, dtype=np.int32),
            truncated=np.zeros(0, dtype=bool),
            embedded_at=pa.array([], pa.timestamp("us", tz="UTC")),
        )


def find_donor(
    db: Any,
    table_names: Sequence[str],
    target: EmbeddingSpec,
    *,
    prefer: str | None = None,
    warnings: list[str] | None = None,
    verify: Callable[[str, EmbeddingSpec], str | None] | None = None,
) -> Donor | None:
    """The table of ``db`` whose vectors ``target`` can be re-projected from, if any.

    ``prefer`` (the live table of an in-place rebuild) is taken when it qualifies; otherwise
    the qualifying table with the smallest dim (the least data to read). Rebuild staging tables
    and tables without a recorded spec (not written by this package, e.g. canary sidecars) are
    never donors. A table that cannot be opened, or whose recorded spec cannot be read, is
    passed over with a line saying why appended to ``warnings`` (the refresh report carries
    it): re-projection only saves model calls, and another table's damage must not fail this
    refresh.

    ``verify(name, spec)`` (the drift guard's :meth:`~qwen3_pipeline.engine.canary.DriftGuard.
    verify_donor`) is asked about each qualifying table in that order until one passes; a
    table it refuses is not used, with its reason in ``warnings``. Without it every
    qualifying table is trusted (tests that inject no drift guard).

    Args:
        db: A ``lancedb`` connection.
        table_names: The tables to consider (e.g. every table of the database).
        target: The spec being written.
        prefer: A table to take first when it qualifies.
        warnings: Where to add a line for each table passed over because it could not be read
            or was refused by ``verify`` (None: logged only).
        verify: Says why a qualifying table must not be used (None: it may), e.g.
            :meth:`~qwen3_pipeline.engine.canary.DriftGuard.verify_donor`; None trusts all.
    """
    from qwen3_pipeline.store import store_error

    def pass_over(name: str, error: BaseException) -> None:
        warning = f"table {name!r} was not considered for re-projection: {error}"
        logger.warning("%s", warning)
        if warnings is not None:
            warnings.append(warning)

    def refused(name: str, reason: str) -> None:
        warning = (
            f"table {name!r} is not used for re-projection: {reason}; its rows are embedded "
            "by the model instead"
        )
        logger.warning("%s", warning)
        if warnings is not None:
            warnings.append(warning)

    candidates: list[Donor] = []
    for name in sorted(table_names, key=lambda n: (n != prefer, n)):
        if REBUILD_MARKER in name:
            continue
        try:
            table = db.open_table(name)
            raw = (table.schema.metadata or {}).get(META_SPEC.encode())
        except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
            pass_over(name, store_error(e, f"open table {name!r}"))
            continue
        if raw is None:
            continue
        try:
            stored = EmbeddingSpec.from_json(raw.decode())
        except (Qwen3PipelineError, ValueError, TypeError) as e:  # bad JSON, unknown fields
            pass_over(name, e)
            continue
        if can_reproject(target, stored):
            candidates.append(Donor(table, name, stored, target))
    # The preferred table first, then the smallest dim (a stable sort keeps names in order).
    candidates.sort(key=lambda d: (d.name != prefer, d.spec.output_dim))
    for donor in candidates:
        reason = None if verify is None else verify(donor.name, donor.spec)
        if reason is None:
            return donor
        refused(donor.name, reason)
    return None
