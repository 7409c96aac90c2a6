r"""The embedding asset as a Dagster component: :class:`Qwen3EmbeddingComponent`, set up in YAML.

A thin, typed shell over :func:`~qwen3_pipeline.dagster.embedding_asset.build_embedding_asset`:
the component's fields are the ``defs.yaml`` schema, and :meth:`Qwen3EmbeddingComponent.build_defs`
calls the factory and binds the resources it needs, so a component-built asset has the same
partitions, checks, retry policy, pool and run config as a Python-built one. The package
registers this module for ``dg`` through the ``dagster_dg_cli.registry_modules`` entry point, so
``dg list components`` shows the component and ``dg scaffold defs`` writes a starting
``defs.yaml`` (:class:`Qwen3EmbeddingScaffolder`).

Example:
    A ``defs.yaml`` (``dg scaffold defs qwen3_pipeline.dagster.component.Qwen3EmbeddingComponent
    document_vectors`` writes one like it)::

        type: qwen3_pipeline.dagster.component.Qwen3EmbeddingComponent
        attributes:
          source:
            duckdb:
              path: "{{ context.project_root }}/data/warehouse.duckdb"
              table: main.documents
          key: doc_id
          text: [text]
          carry: [title]
          table: document_vectors
          database: "{{ context.project_root }}/data/lancedb"
          model: Qwen/Qwen3-Embedding-0.6B
          dim: 256

    The same component in Python (the YAML key ``model`` is the field ``embedding_model``):

    >>> component = Qwen3EmbeddingComponent(
    ...     source=ComponentSource(kind="parquet", path=Path("data/documents.parquet")),
    ...     key="doc_id", text=["text"], carry=["title"], table="documents",
    ...     database="data/lancedb", embedding_model="Qwen/Qwen3-Embedding-0.6B", dim=256,
    ... )
    >>> component.build_asset().partitions_def.get_partition_keys()[:2]
    ['shard-00-of-08', 'shard-01-of-08']
"""

# No `from __future__ import annotations`: Dagster reads the field annotations at runtime.

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, create_model

from qwen3_pipeline.chunking.config import ChunkingConfig, SplitterKind
from qwen3_pipeline.core.errors import ConfigError
from qwen3_pipeline.core.schema import validate_table_name
from qwen3_pipeline.core.spec import DEFAULT_MAX_LENGTH
from qwen3_pipeline.dagster.automation import HOURLY, build_refresh_schedule
from qwen3_pipeline.dagster.embedding_asset import (
    DEFAULT_POOL,
    DEFAULT_SHARDS,
    HashShards,
    build_embedding_asset,
)
from qwen3_pipeline.dagster.resources import (
    DEFAULT_MODEL,
    EmbedderResource,
    FakeEmbedderResource,
    LanceDBResource,
    Qwen3EmbedderResource,
)
from qwen3_pipeline.sources import (
    DuckDBSource,
    ParquetSource,
    PostgresSource,
    Source,
    SourceConfig,
    Watermark,
)

SourceKind = Literal["duckdb", "parquet", "postgres", "dbt"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)
# `fake` is the shipped model-free embedder (qwen3_pipeline.testing.FakeEmbedder): tests and
# dry runs of a project's wiring, never production vectors.
ComponentEngine = Literal["local", "ray", "fake"]
COMPONENT_ENGINES: tuple[str, ...] = get_args(ComponentEngine)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
_URI_SCHEME_SEP = "://"


# --------------------------------------------------------------------------- the YAML schema


def _objects_not_templates(schema: dict[str, Any]) -> None:
    # Dagster lets every attribute be a template string, and an optional block may be null, so
    # a block's JSON schema is anyOf[object, string, null]: `dg check defs` then reports a bad
    # key inside it only as "not valid under any of the given schemas". A template cannot stand
    # for a whole block, and leaving a block out is how it is not given, so the block's schema
    # is its object schema alone, and the check names the unknown key and its line.
    for prop in schema.get("properties", {}).values():
        refs = [branch for branch in prop.get("anyOf", ()) if "$ref" in branch]
        if len(refs) == 1:
            del prop["anyOf"]
            prop.update(refs[0])


@functools.cache
def _yaml_model(derived: type[BaseModel]) -> type[BaseModel]:
    extra = derived.model_config.get("json_schema_extra")  # Dagster's title and field order
    dagster_extra = dict(extra) if isinstance(extra, dict) else {}

    def schema_extra(schema: dict[str, Any], model: type[BaseModel]) -> None:
        schema.update(dagster_extra)
        _objects_not_templates(schema)

    model = create_model(derived.__name__, __base__=derived)
    model.model_config["json_schema_extra"] = schema_extra
    return model


class DuckDBSourceModel(dg.Model):
    """``source.duckdb``: a table, view or query of a DuckDB database file (read-only)."""

    path: str = Field(
        description="The DuckDB file; a relative path is relative to this defs.yaml's folder.",
        examples=["{{ context.project_root }}/data/warehouse.duckdb"],
    )
    table: str | None = Field(
        default=None, description="A table or view (main.documents). Give table or query."
    )
    query: str | None = Field(
        default=None,
        description="A SELECT query whose rows are the documents. Give table or query.",
    )


class ParquetSourceModel(dg.Model):
    """``source.parquet``: a Parquet file, or a directory of them (hive partitioning read)."""

    path: str = Field(
        description="A .parquet file or a directory; relative to this defs.yaml's folder.",
        examples=["{{ context.project_root }}/data/documents.parquet"],
    )


class PostgresSourceModel(dg.Model):
    """``source.postgres``: a PostgreSQL table or query, its URL read from the environment."""

    url_env: str = Field(
        description=(
            "The environment variable holding the connection URL (postgresql://user:pw@host/db), "
            "read when a run starts, so the URL never appears in the definitions or the UI."
        ),
        examples=["DOCUMENTS_DATABASE_URL"],
    )
    table: str | None = Field(
        default=None, description="A table or view (public.documents). Give table or query."
    )
    query: str | None = Field(
        default=None,
        description="A SELECT query whose rows are the documents. Give table or query.",
    )


class DbtModelSourceModel(dg.Model):
    """``source.dbt``: the table a dbt model builds in DuckDB (dbt-duckdb), a dependency too."""

    model: str = Field(description="The dbt model's name (documents).")
    duckdb: str = Field(
        description="The DuckDB file dbt-duckdb writes; relative to this defs.yaml's folder.",
        examples=["{{ context.project_root }}/data/warehouse.duckdb"],
    )
    table: str | None = Field(
        default=None, description="The relation the model builds; default main.<model>."
    )
    asset_key: str | None = Field(
        default=None,
        description=(
            "The dbt model's asset key (a/b for a prefixed key); default the model's name, as "
            "dagster-dbt names it. The embedding asset depends on it."
        ),
    )


class SourceModel(dg.Model):
    """``source``: exactly one of ``duckdb``, ``parquet``, ``postgres`` or ``dbt``."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _objects_not_templates(schema))

    duckdb: DuckDBSourceModel | None = Field(default=None, description="A DuckDB table or query.")
    parquet: ParquetSourceModel | None = Field(
        default=None, description="A Parquet file or directory."
    )
    postgres: PostgresSourceModel | None = Field(
        default=None, description="A PostgreSQL table or query."
    )
    dbt: DbtModelSourceModel | None = Field(default=None, description="A dbt model's DuckDB table.")


class ChunkingModel(dg.Model):
    """``chunking``: cut each document into chunks, one vector per chunk (see ChunkingConfig)."""

    tokens: int = Field(description="Maximum tokens of a chunk, overlap included (16..32768).")
    overlap: int = Field(default=0, description="Tokens repeated from the previous chunk.")
    splitter: SplitterKind = Field(default="text", description="text, markdown or code.")
    code_language: str | None = Field(
        default=None, description="The tree-sitter grammar of splitter: code (python)."
    )


class ScheduleModel(dg.Model):
    """``schedule``: refresh every partition in one run on a cron (stopped unless running)."""

    cron: str = Field(default=HOURLY, description="When to refresh (default hourly).")
    name: str | None = Field(default=None, description="Default <asset>_schedule.")
    running: bool = Field(
        default=False,
        description="Start running when the code location loads (default: stopped, as Dagster).",
    )
    timezone: str = Field(default="UTC", description="Timezone of the cron.")


# --------------------------------------------------------------------------- resolved values


@dataclass(frozen=True, kw_only=True)
class ComponentSource:
    """Where a component's rows come from (``source:`` resolved); opened when a run starts.

    Paths are absolute once resolved from YAML. Nothing is opened at load time: the file may
    not exist until an upstream asset (a dbt model) has run, and a PostgreSQL URL is read from
    its environment variable only by the run.

    Attributes:
        kind: ``duckdb``, ``parquet``, ``postgres`` or ``dbt``.
        path: The DuckDB or Parquet file (not for ``postgres``).
        relation: The table, view or query (not for ``parquet``).
        url_env: The environment variable of the PostgreSQL URL (``postgres`` only).
        upstream: The dbt model's asset key (``dbt`` only): a dependency of the asset.

    Raises:
        ConfigError: A field the kind needs is missing, or one it does not use is set.

    Example:
        >>> ComponentSource(kind="parquet", path=Path("docs.parquet")).kind
        'parquet'
    """

    kind: SourceKind
    path: Path | None = None
    relation: str | None = None
    url_env: str | None = None
    upstream: dg.AssetKey | None = None

    def __post_init__(self) -> None:
        needs = {
            "duckdb": {"path", "relation"},
            "parquet": {"path"},
            "postgres": {"url_env", "relation"},
            "dbt": {"path", "relation", "upstream"},
        }.get(self.kind)
        if needs is None:
            raise ConfigError(f"source kind must be one of {list(SOURCE_KINDS)}, got {self.kind!r}")
        given = {
            name for name in ("path", "relation", "url_env", "upstream") if getattr(self, name)
        }
        if given != needs:
            raise ConfigError(
                f"a {self.kind} source takes {sorted(needs)}, got {sorted(given) or 'nothing'}"
            )

    def open(self) -> Source:
        """Open the source (at run time).

        Raises:
            ConfigError: The file does not exist, or the URL's environment variable is unset.
        """
        if self.kind == "parquet":
            return ParquetSource(_given(self.path))
        if self.kind == "postgres":
            return PostgresSource.from_env(_given(self.url_env), _given(self.relation))
        return DuckDBSource(_given(self.path), _given(self.relation))


T = TypeVar("T")


def _given(value: T | None) -> T:
    assert value is not None  # __post_init__ checked what the kind needs
    return value


def _relation(where: str, table: str | None, query: str | None) -> str:
    if (table is None) == (query is None):
        raise ConfigError(f"{where}: give exactly one of table and query")
    return table if table is not None else str(query)


def _local_path(context: dg.ResolutionContext, value: str) -> Path:
    # As dagster-dbt resolves a project directory: relative to the folder of the defs.yaml.
    return context.resolve_source_relative_path(str(value))


def resolve_source(context: dg.ResolutionContext, model: SourceModel) -> ComponentSource:
    """Resolve ``source:`` (templates rendered, paths made absolute) into a ComponentSource.

    Raises:
        ConfigError: Not one source block, or not exactly one of table and query.
    """
    if not isinstance(model, SourceModel):  # a template string rendered to something else
        raise ConfigError(f"source must be a mapping with one of {list(SOURCE_KINDS)}")
    given = [kind for kind in SOURCE_KINDS if getattr(model, kind) is not None]
    if len(given) != 1:
        raise ConfigError(
            f"source: give exactly one of {', '.join(SOURCE_KINDS)}; got "
            f"{', '.join(given) if given else 'none'}"
        )
    kind = given[0]
    where = context.at_path(kind)
    values: dict[str, Any] = where.resolve_value(getattr(model, kind).model_dump(exclude_none=True))
    if kind == "parquet":
        return ComponentSource(kind="parquet", path=_local_path(where, values["path"]))
    if kind == "postgres":
        return ComponentSource(
            kind="postgres",
            url_env=values["url_env"],
            relation=_relation("source.postgres", values.get("table"), values.get("query")),
        )
    if kind == "dbt":
        return ComponentSource(
            kind="dbt",
            path=_local_path(where, values["duckdb"]),
            relation=values.get("table") or f"main.{values['model']}",
            upstream=dg.AssetKey.from_user_string(values.get("asset_key") or values["model"]),
        )
    return ComponentSource(
        kind="duckdb",
        path=_local_path(where, values["path"]),
        relation=_relation("source.duckdb", values.get("table"), values.get("query")),
    )


def resolve_chunking(context: dg.ResolutionContext, model: ChunkingModel) -> ChunkingConfig:
    """Resolve ``chunking:`` into a validated :class:`ChunkingConfig`.

    Raises:
        ConfigError: A value out of range (``tokens``, ``overlap``) or a bad ``code_language``.
    """
    return ChunkingConfig(**model.model_dump())


def resolve_database(context: dg.ResolutionContext, value: str) -> str:
    """Resolve ``database:``: a URI as given, a local path made absolute (see _local_path)."""
    if _URI_SCHEME_SEP in value:
        return value
    return str(_local_path(context, value))


# --------------------------------------------------------------------------- the component

# Definitions.merge accepts one resource object per key across a project's components: two
# components with the same embedder (or database) settings must get the *same* object, which
# also means one model load per run that refreshes both. Interned by settings, so a component
# with other settings never receives a stale one.
_SHARED_RESOURCES: dict[tuple[Any, ...], Any] = {}
R = TypeVar("R")


def _shared(settings: tuple[Any, ...], build: Callable[[], R]) -> R:
    if settings not in _SHARED_RESOURCES:
        _SHARED_RESOURCES[settings] = build()
    return _SHARED_RESOURCES[settings]


def _as_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    # `text: body` means the one column, not its letters.
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


_INTEGER_FIELDS = (
    "dim",
    "max_length",
    "max_batch_tokens",
    "workers",
    "shards",
    "partitions_per_run",
)


def _describe(text: str) -> Any:
    return dg.Resolver.default(description=text)


class Qwen3EmbeddingScaffoldParams(BaseModel):
    """Options of ``dg scaffold defs ... Qwen3EmbeddingComponent PATH`` (``--source``...)."""

    source: SourceKind = Field(default="duckdb", description="The source block to write.")
    engine: ComponentEngine = Field(default="local", description="local, ray or fake.")


def starter_attributes(name: str, source: SourceKind, engine: ComponentEngine) -> dict[str, Any]:
    """The ``attributes`` a scaffolded ``defs.yaml`` starts with (every one editable).

    Example:
        >>> starter_attributes("document_vectors", "parquet", "fake")["source"]
        {'parquet': {'path': '{{ context.project_root }}/data/documents.parquet'}}
    """
    warehouse = "{{ context.project_root }}/data/warehouse.duckdb"
    sources: dict[str, dict[str, Any]] = {
        "duckdb": {"duckdb": {"path": warehouse, "table": "main.documents"}},
        "parquet": {"parquet": {"path": "{{ context.project_root }}/data/documents.parquet"}},
        "postgres": {
            "postgres": {"url_env": "DOCUMENTS_DATABASE_URL", "table": "public.documents"}
        },
        "dbt": {"dbt": {"model": "documents", "duckdb": warehouse}},
    }
    return {
        "source": sources[source],
        "key": "id",
        "text": ["text"],
        "carry": ["title"],
        "table": name,
        "database": "{{ context.project_root }}/data/lancedb",
        "model": DEFAULT_MODEL,
        "dim": 256,
        "shards": DEFAULT_SHARDS,
        "engine": engine,
    }


class Qwen3EmbeddingScaffolder(dg.Scaffolder[Qwen3EmbeddingScaffoldParams]):
    """Writes a ``defs.yaml`` that loads as it is: the table is named after the folder."""

    @classmethod
    def get_scaffold_params(cls) -> type[Qwen3EmbeddingScaffoldParams]:
        """The scaffold options: which source block and which engine to start from."""
        return Qwen3EmbeddingScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[Qwen3EmbeddingScaffoldParams]) -> None:
        """Write ``defs.yaml`` (or ``component.py`` with ``--format python``)."""
        name = validate_table_name(request.target_path.name.replace("-", "_"))
        params = request.params or Qwen3EmbeddingScaffoldParams()
        dg.scaffold_component(request, starter_attributes(name, params.source, params.engine))


@dg.scaffold_with(Qwen3EmbeddingScaffolder)
@dataclass(kw_only=True)
class Qwen3EmbeddingComponent(dg.Component, dg.Resolvable):
    r"""Keep a LanceDB table of Qwen3 embeddings in sync with a source: a checked asset.

    Builds exactly what :func:`~qwen3_pipeline.dagster.embedding_asset.build_embedding_asset`
    builds (hash-shard partitions, the data checks in the same step, the ``gpu`` pool, retries
    of transient failures only, launchpad run config), plus its resources (the embedder and the
    LanceDB database) and, when asked, a refresh schedule.

    Scaffold one in a ``dg`` project, then edit its ``defs.yaml``::

        dg scaffold defs qwen3_pipeline.dagster.component.Qwen3EmbeddingComponent \
            document_vectors --source duckdb
        dg check defs

    Two components share a resource object when their settings are equal (one model load for
    a run that refreshes both); components with other embedder or database settings need their
    own ``embedder_key`` / ``lancedb_key``. With ``watermark: true`` (and ``updated_at``) a
    refresh reads only the rows whose ``updated_at`` moved past the stored mark; without it,
    every refresh reads its partitions whole and re-embeds only what changed, by content hash.

    Example:
        ``defs.yaml``::

            type: qwen3_pipeline.dagster.component.Qwen3EmbeddingComponent
            attributes:
              source:
                dbt:
                  model: documents
                  duckdb: "{{ context.project_root }}/data/warehouse.duckdb"
              key: doc_id
              template: "{title}\n\n{text}"
              carry: [title, module]
              table: document_vectors
              database: "{{ context.project_root }}/data/lancedb"
              dim: 256
              schedule:
                cron: "0 * * * *"
    """

    source: Annotated[
        ComponentSource,
        dg.Resolver(
            resolve_source,
            model_field_type=SourceModel,
            description=(
                "Where the rows come from: exactly one of duckdb (path, table or query), parquet "
                "(path), postgres (url_env, table or query) or dbt (model, duckdb)."
            ),
            examples=[
                {"duckdb": {"path": "{{ context.project_root }}/data/wh.duckdb", "table": "docs"}}
            ],
        ),
    ]
    key: Annotated[str, _describe("The unique, non-null key column of the source.")]
    table: Annotated[str, _describe("The LanceDB table the vectors are written to.")]
    database: Annotated[
        str,
        dg.Resolver(
            resolve_database,
            model_field_type=str,
            description=(
                "The LanceDB directory (relative to this defs.yaml's folder) or URI (s3://...)."
            ),
            examples=["{{ context.project_root }}/data/lancedb"],
        ),
    ]
    text: Annotated[
        str | Sequence[str] | None,
        _describe("The text column(s) of a document, joined by separator. Or template."),
    ] = None
    # Passed through untouched: `{column}` fields are str.format fields, not Jinja, and Jinja
    # rendering would drop a trailing newline.
    template: Annotated[
        str | None,
        dg.Resolver.passthrough(
            description="A str.format template over columns ('{title}\\n\\n{body}'). Or text.",
        ),
    ] = None
    separator: Annotated[
        str, dg.Resolver.passthrough(description="What joins the text columns.")
    ] = "\n\n"
    updated_at: Annotated[
        str | None, _describe("A column with the row's last-modified time (lineage).")
    ] = None
    carry: Annotated[
        str | Sequence[str] | None, _describe("Columns stored beside each vector (title, url...).")
    ] = None
    watermark: Annotated[
        bool,
        _describe(
            "Read only rows whose updated_at moved past the stored mark (needs updated_at; "
            "see the change-capture guide)."
        ),
    ] = False
    watermark_lag_s: Annotated[
        float, _describe("With watermark: also read rows up to this many seconds before the mark.")
    ] = 0.0
    key_scan: Annotated[
        str,
        _describe("With watermark: find deletes by a key scan every refresh, every N, or never."),
    ] = "every"
    chunking: Annotated[
        ChunkingConfig | None,
        dg.Resolver(
            resolve_chunking,
            model_field_type=ChunkingModel,
            description="Cut documents into chunks of at most `tokens` tokens, one vector each.",
        ),
    ] = None
    asset_key: Annotated[
        dg.ResolvedAssetKey | None,
        _describe("The asset's key (a/b for a prefixed key); default the table name."),
    ] = None
    deps: Annotated[
        Sequence[dg.ResolvedAssetKey] | None,
        _describe("Upstream asset keys (a dbt source adds its model)."),
    ] = None
    group_name: Annotated[str | None, _describe("The asset group.")] = None
    description: Annotated[str | None, _describe("The asset description.")] = None
    # `model` is the YAML key; the attribute cannot be called so (Resolvable.model() exists).
    embedding_model: Annotated[
        str,
        dg.Resolver(
            lambda context, value: value,  # a template is rendered before this is called
            model_field_name="model",
            model_field_type=str,
            description="Hub id (Qwen/Qwen3-Embedding-0.6B, -4B, -8B) or a checkpoint directory.",
        ),
    ] = DEFAULT_MODEL
    revision: Annotated[str | None, _describe("Pinned hub revision.")] = None
    dim: Annotated[
        int | None, _describe("Matryoshka output dimension, 32..hidden size; null: hidden size.")
    ] = None
    max_length: Annotated[int, _describe("Token limit per document.")] = DEFAULT_MAX_LENGTH
    device: Annotated[str, _describe("auto, cpu, cuda or cuda:N.")] = "auto"
    dtype: Annotated[Dtype, _describe("auto, float32, bfloat16 or float16.")] = "auto"
    max_batch_tokens: Annotated[
        int | None, _describe("Token budget per forward pass; null: 16384 CUDA, 4096 CPU.")
    ] = None
    engine: Annotated[
        ComponentEngine,
        _describe("local (one model in the run), ray (workers actors) or fake (no model; tests)."),
    ] = "local"
    workers: Annotated[int, _describe("Ray actors, one model each (engine: ray).")] = 1
    gpus_per_worker: Annotated[float, _describe("GPUs per Ray actor (engine: ray).")] = 0.0
    ray_address: Annotated[
        str | None, _describe("A running Ray cluster to join (engine: ray); null: local Ray.")
    ] = None
    shards: Annotated[
        int | None, _describe("Hash-shard partitions of the key; null: unpartitioned.")
    ] = DEFAULT_SHARDS
    partitions_per_run: Annotated[
        int | None, _describe("Backfill shape: null is one run for any number of shards.")
    ] = None
    pool: Annotated[str | None, _describe("Concurrency pool of the step.")] = DEFAULT_POOL
    automation_condition: Annotated[
        dg.AutomationCondition | None,
        dg.Resolver.default(
            model_field_type=str | None,
            description="When to refresh automatically: {{ dg.AutomationCondition.eager() }}.",
        ),
    ] = None
    schedule: Annotated[
        ScheduleModel | None, _describe("A cron refresh of every partition in one run.")
    ] = None
    embedder_key: Annotated[str, _describe("Resource key of the embedder.")] = "embedder"
    lancedb_key: Annotated[str, _describe("Resource key of the LanceDB database.")] = "lancedb"

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        """The model of ``attributes``: Dagster's, whose object blocks name their bad keys."""
        return _yaml_model(cls.model())

    def __post_init__(self) -> None:
        # The YAML schema accepts a template string for every field, so the types of the
        # resolved values are checked here, each error naming its key.
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(
            self.gpus_per_worker, int | float
        ):
            raise ConfigError(f"gpus_per_worker must be a number, got {self.gpus_per_worker!r}")
        if self.engine not in COMPONENT_ENGINES:
            raise ConfigError(
                f"engine must be one of {list(COMPONENT_ENGINES)}, got {self.engine!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.engine != "ray" and (self.workers != 1 or self.ray_address):
            raise ConfigError(
                f"workers={self.workers} and ray_address={self.ray_address!r} need engine: ray"
            )
        validate_table_name(self.table)
        self.source_config()

    # ------------------------------------------------------------------ what it builds

    def source_config(self) -> SourceConfig:
        """The :class:`SourceConfig` of ``key``, ``text``/``template``, ``carry``, ``chunking``.

        Raises:
            ConfigError: Both or neither of text and template, a malformed template, or a bad
                carry column.
        """
        if bool(_as_names(self.text)) == (self.template is not None):
            raise ConfigError(
                "give exactly one of text (the column(s) of a document: [title, body]) and "
                "template (a str.format template: '{title}\\n\\n{body}')"
            )
        return SourceConfig(
            key=self.key,
            text_columns=_as_names(self.text),
            template=self.template,
            separator=self.separator,
            updated_at=self.updated_at,
            carry=_as_names(self.carry),
            chunking=self.chunking,
            watermark=(
                Watermark(lag_s=self.watermark_lag_s, key_scan=self.key_scan)
                if self.watermark
                else None
            ),
        )

    def embedder_resource(self) -> EmbedderResource:
        """The embedder resource of ``engine`` (shared by components with equal settings).

        Raises:
            ConfigError: ``engine: ray`` without the ``ray`` extra installed.
        """
        settings = (
            self.engine,
            self.embedding_model,
            self.revision,
            self.dim,
            self.max_length,
            self.device,
            self.dtype,
            self.max_batch_tokens,
            self.workers,
            self.gpus_per_worker,
            self.ray_address,
        )
        return _shared(("embedder", *settings), self._build_embedder)

    def _build_embedder(self) -> EmbedderResource:
        common: dict[str, Any] = {
            "model": self.embedding_model,
            "revision": self.revision,
            "dim": self.dim,
            "max_length": self.max_length,
        }
        if self.engine == "fake":
            return FakeEmbedderResource(**common)
        local = {
            **common,
            "device": self.device,
            "dtype": self.dtype,
            "max_batch_tokens": self.max_batch_tokens,
        }
        if self.engine == "local":
            return Qwen3EmbedderResource(**local)
        try:
            from dagster_ray import LocalRay

            from qwen3_pipeline.dagster.ray_resource import RayEmbedderResource
        except ImportError as e:
            raise ConfigError(
                "engine: ray needs the ray extra: pip install 'qwen3-pipeline[ray]'"
            ) from e
        return RayEmbedderResource(
            **local,
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            ray_address=self.ray_address,
            ray_cluster=None if self.ray_address else LocalRay(),
        )

    def lancedb_resource(self) -> LanceDBResource:
        """The LanceDB resource of ``database`` (shared by components with the same one)."""
        return _shared(("lancedb", self.database), lambda: LanceDBResource(uri=self.database))

    def build_asset(self, embedder: EmbedderResource | None = None) -> dg.AssetsDefinition:
        """The embedding asset and its checks, from ``build_embedding_asset``.

        Args:
            embedder: The resource whose spec the asset is defined for (default
                :meth:`embedder_resource`); bind the same object under ``embedder_key``.

        Raises:
            ConfigError: An invalid setting (dim, shards...).
            ModelLoadError: The model's config cannot be read.
        """
        upstream = [self.source.upstream] if self.source.upstream is not None else []
        return build_embedding_asset(
            key=self.asset_key or self.table,
            source=self.source.open,
            source_config=self.source_config(),
            spec=embedder or self.embedder_resource(),
            table=self.table,
            deps=[*upstream, *(self.deps or ())],
            partitioning=HashShards(self.shards) if self.shards is not None else None,
            embedder_key=self.embedder_key,
            lancedb_key=self.lancedb_key,
            group_name=self.group_name,
            description=self.description,
            pool=self.pool,
            automation_condition=self.automation_condition,
            partitions_per_run=self.partitions_per_run,
        )

    def build_schedule(self, asset: dg.AssetsDefinition) -> dg.ScheduleDefinition | None:
        """The refresh schedule of ``schedule:`` for ``asset``, or None without one."""
        if self.schedule is None:
            return None
        return build_refresh_schedule(
            name=self.schedule.name or f"{asset.key.to_python_identifier()}_schedule",
            embedding_asset=asset,
            cron_schedule=self.schedule.cron,
            default_status=(
                dg.DefaultScheduleStatus.RUNNING
                if self.schedule.running
                else dg.DefaultScheduleStatus.STOPPED
            ),
            execution_timezone=self.schedule.timezone,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """The asset with its checks, its two resources and the optional schedule.

        Raises:
            ConfigError: An invalid setting (dim, shards, engine: ray without the extra...).
            ModelLoadError: The model's config cannot be read.
        """
        embedder = self.embedder_resource()
        asset = self.build_asset(embedder)
        schedule = self.build_schedule(asset)
        return dg.Definitions(
            assets=[asset],
            schedules=[schedule] if schedule is not None else None,
            resources={self.embedder_key: embedder, self.lancedb_key: self.lancedb_resource()},
        )


__all__ = [
    "ComponentSource",
    "Qwen3EmbeddingComponent",
    "Qwen3EmbeddingScaffolder",
]
