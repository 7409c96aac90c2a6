"""Sources: where rows come from, which partition they are in, and how they become documents.

- :mod:`qwen3_pipeline.sources.readers`: :class:`DuckDBSource` (a table or query of a DuckDB
  file, e.g. a dbt model), :class:`ParquetSource` (a file or directory), :class:`ArrowSource`
  (an Arrow table or DataFrame), :class:`ArrowIPCSource` (Arrow IPC files, e.g. one shard of a
  source split to disk) and :func:`parse_source` (the CLI form);
- :mod:`qwen3_pipeline.sources.postgres`: :class:`PostgresSource` (a PostgreSQL table or query,
  streamed from one snapshot; needs the ``postgres`` extra);
- :mod:`qwen3_pipeline.sources.partitions`: stable hash shards and time windows;
- :mod:`qwen3_pipeline.sources.documents`: :class:`SourceConfig` and :func:`read_batches`,
  which renders, sanitises and labels rows into the engine's normalised batches;
- :mod:`qwen3_pipeline.sources.watermark`: :class:`Watermark` change capture (read only rows
  whose ``updated_at`` passed the stored mark) and the :class:`RowFilter` sources push down.
"""

from qwen3_pipeline.sources.documents import (
    DEFAULT_BATCH_ROWS,
    SourceConfig,
    carry_schema,
    output_schema,
    read_batches,
    validate_keys,
)
from qwen3_pipeline.sources.partitions import (
    UNPARTITIONED,
    Grain,
    Partition,
    Shard,
    Shards,
    TimeWindow,
    parse_shard,
    parse_shard_label,
    scope_partition_keys,
    shard_indices,
    shard_label,
    shard_of,
)
from qwen3_pipeline.sources.postgres import PostgresSource
from qwen3_pipeline.sources.readers import (
    ArrowIPCSource,
    ArrowSource,
    DuckDBSource,
    ParquetSource,
    Source,
    parse_source,
)
from qwen3_pipeline.sources.watermark import RowFilter, Watermark

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "UNPARTITIONED",
    "ArrowIPCSource",
    "ArrowSource",
    "DuckDBSource",
    "Grain",
    "ParquetSource",
    "Partition",
    "PostgresSource",
    "RowFilter",
    "Shard",
    "Shards",
    "Source",
    "SourceConfig",
    "TimeWindow",
    "Watermark",
    "carry_schema",
    "output_schema",
    "parse_shard",
    "parse_shard_label",
    "parse_source",
    "read_batches",
    "scope_partition_keys",
    "shard_indices",
    "shard_label",
    "shard_of",
    "validate_keys",
]
