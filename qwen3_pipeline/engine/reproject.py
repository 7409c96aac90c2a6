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
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qwen3_pipeline.errors import ConfigError, Qwen3PipelineError
from qwen3_pipeline.schema import META_SPEC, REBUILD_MARKER
from qwen3_pipeline.spec import EmbeddingSpec

logger = logging.getLogger("qwen3_pipeline")

# The spec fields that must agree for a stored vector to be re-projectable (dim may shrink).
_SAME_FIELDS = ("model", "revision", "max_length", "document_prompt", "normalize", "chunking")
_LOOKUP_COLUMNS = ["key", "content_hash", "vector", "n_tokens", "truncated", "embedded_at"]


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

    def lookup(
        self, keys: pa.Array | pa.ChunkedArray, content_hashes: pa.Array | pa.ChunkedArray
    ) -> Reprojected:
        """Re-project the rows the donor holds with the same key and content hash.

        Raises:
            StoreError: The donor could not be read.
        """
        from lancedb.expr import col

        from qwen3_pipeline.store import store_error

        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        wanted = pc.unique(keys).to_pylist()
        try:
            found = (
                self.table.search()
                .where(col("key").isin(wanted))
                .select(_LOOKUP_COLUMNS)
                .to_arrow()
            )
        except Qwen3PipelineError:
            raise
        except Exception as e:  # LanceDB raises RuntimeError/OSError/ValueError alike
            raise store_error(e, f"read donor table {self.name!r}") from e
        at = np.asarray(
            pc.fill_null(pc.index_in(keys, value_set=found.column("key")), -1).to_numpy(
                zero_copy_only=False
            ),
            dtype=np.int64,
        )
        if isinstance(content_hashes, pa.ChunkedArray):
            content_hashes = content_hashes.combine_chunks()
        hashes = np.asarray(content_hashes.to_pylist(), dtype=object)
        donor_hashes = np.asarray(found.column("content_hash").to_pylist(), dtype=object)
        hit = at >= 0
        hit[hit] = donor_hashes[at[hit]] == hashes[hit]
        rows = pa.array(at[hit])
        flat = found.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        stored = flat.reshape(-1, self.spec.output_dim)[at[hit]]
        return Reprojected(
            found=hit,
            vectors=project(stored, self.target.output_dim, normalize=self.target.normalize),
            n_tokens=np.asarray(found.column("n_tokens").take(rows).to_numpy(), dtype=np.int32),
            truncated=np.asarray(found.column("truncated").take(rows).to_numpy(), dtype=bool),
            embedded_at=found.column("embedded_at").take(rows).combine_chunks(),
        )


def find_donor(
    db: Any,
    table_names: Sequence[str],
    target: EmbeddingSpec,
    *,
    prefer: str | None = None,
) -> Donor | None:
    """The table of ``db`` whose vectors ``target`` can be re-projected from, if any.

    ``prefer`` (the live table of an in-place rebuild) is taken when it qualifies; otherwise
    the qualifying table with the smallest dim (the least data to read). Rebuild staging tables
    are never donors (they may be incomplete).

    Args:
        db: A ``lancedb`` connection.
        table_names: The tables to consider (e.g. every table of the database).
        target: The spec being written.
        prefer: A table to take first when it qualifies.
    """
    candidates: list[Donor] = []
    for name in sorted(table_names, key=lambda n: (n != prefer, n)):
        if REBUILD_MARKER in name:
            continue
        try:
            table = db.open_table(name)
            raw = (table.schema.metadata or {}).get(META_SPEC.encode())
            if raw is None:
                continue
            stored = EmbeddingSpec(**json.loads(raw.decode()))
        except Exception as e:  # an unreadable or foreign table is simply not a donor
            logger.debug("table %s is not a re-projection donor: %s", name, e)
            continue
        if can_reproject(target, stored):
            donor = Donor(table, name, stored, target)
            if name == prefer:
                return donor
            candidates.append(donor)
    if not candidates:
        return None
    return min(candidates, key=lambda d: d.spec.output_dim)
