"""The ``qwen3-pipeline`` command line.

Each command prints one JSON object on stdout (machine-readable results and stats) and
progress and errors on stderr. Bad input gets a one-line ``error: ...`` message, exit status 2,
and nothing written.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen3_pipeline.errors import InputDataError, Qwen3PipelineError, SpecMismatchError
from qwen3_pipeline.spec import DEFAULT_MAX_LENGTH, DEFAULT_QUERY_TASK, EmbeddingSpec

EXIT_BAD_INPUT = 2
EXIT_FAILED_ROWS = 3


def read_texts(path: Path) -> list[str]:
    """Read texts from a text file (one per line) or JSONL with a ``text`` field.

    A file whose name ends in ``.jsonl``/``.ndjson``, or whose first non-blank line starts with
    ``{``, is read as JSONL.

    Raises:
        InputDataError: Missing file, empty input, bad JSON, or a record without ``text``.
    """
    if not path.is_file():
        raise InputDataError(f"input file {str(path)!r} does not exist")
    content = path.read_text(encoding="utf-8", errors="surrogateescape")
    lines = content.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if path.suffix in {".jsonl", ".ndjson"} or first.lstrip().startswith("{"):
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{path}:{number}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputDataError(f"{path}:{number}: each JSONL record needs a string 'text'")
            texts.append(record["text"])
    else:
        texts = lines
    if not texts:
        raise InputDataError(f"input file {str(path)!r} has no texts")
    return texts


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file, so a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npy.partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, array)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    parser.add_argument("--revision", default=None, help="pinned hub revision")
    parser.add_argument("--dim", type=int, default=None, help="output dimension (32..hidden)")
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="token limit per text"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="padded tokens per forward pass"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``qwen3-pipeline`` command."""
    parser = argparse.ArgumentParser(
        prog="qwen3-pipeline", description="Qwen3-Embedding vectors kept in sync with LanceDB."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a file of texts into a .npy array")
    _add_model_arguments(embed)
    embed.add_argument("--query", action="store_true", help="embed as queries (instruction)")
    embed.add_argument("--task", default=DEFAULT_QUERY_TASK, help="query instruction")
    embed.add_argument("--input", required=True, type=Path, help="text file or JSONL ('text')")
    embed.add_argument("--output", required=True, type=Path, help="where to write the .npy")

    sync = commands.add_parser("refresh", help="sync a LanceDB table with a source table")
    sync.add_argument(
        "--source",
        required=True,
        help="a Parquet file or directory, or duckdb:PATH::TABLE_OR_QUERY",
    )
    sync.add_argument("--key", required=True, help="unique, non-null key column")
    text = sync.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", nargs="+", metavar="COL", help="text column(s), joined")
    text.add_argument("--template", help="str.format template over columns, e.g. '{title}: {body}'")
    sync.add_argument("--carry", nargs="+", default=[], metavar="COL", help="columns kept beside")
    sync.add_argument("--updated-at", default=None, metavar="COL", help="last-modified column")
    scope = sync.add_mutually_exclusive_group()
    scope.add_argument("--shard", default=None, metavar="K/N", help="refresh hash shard K of N")
    scope.add_argument(
        "--shards", type=int, default=None, metavar="N", help="label rows by N shards"
    )
    sync.add_argument("--db", required=True, help="LanceDB directory or URI")
    sync.add_argument("--table", required=True, help="vector table name")
    sync.add_argument("--rebuild", action="store_true", help="re-embed all into a new table, swap")
    sync.add_argument("--chunk-rows", type=int, default=10_000, help="rows per commit")
    _add_model_arguments(sync)

    find = commands.add_parser("search", help="search a vector table with a query")
    find.add_argument("--db", required=True, help="LanceDB directory or URI")
    find.add_argument("--table", required=True, help="vector table name")
    find.add_argument("--model", required=True, help="must match the table's model")
    find.add_argument("--revision", default=None, help="must match the table's revision")
    find.add_argument("--dim", type=int, default=None, help="must match the table's dim")
    find.add_argument("--task", default=None, help="query instruction (default: the table's)")
    find.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    find.add_argument("--version", type=int, default=None, help="pinned Lance version")
    find.add_argument("-k", type=int, default=10, help="results to return")
    find.add_argument("query", help="query text")
    return parser


def parse_shard(value: str) -> "tuple[int, int]":
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


def run_refresh(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline refresh``: returns the report printed on stdout."""
    from qwen3_pipeline.encoder import Qwen3Encoder
    from qwen3_pipeline.refresh import refresh
    from qwen3_pipeline.sources import Shard, Shards, SourceConfig, parse_source

    partition: Shard | Shards | None = None
    if args.shard:
        partition = Shard(*parse_shard(args.shard))
    elif args.shards:
        partition = Shards(args.shards)
    config = SourceConfig(
        key=args.key,
        text_columns=tuple(args.text or ()),
        template=args.template,
        carry=tuple(args.carry),
        updated_at=args.updated_at,
        partition=partition,
    )
    source = parse_source(args.source)
    spec = EmbeddingSpec(
        model=args.model, revision=args.revision, dim=args.dim, max_length=args.max_length
    )
    encoder = Qwen3Encoder(
        spec, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
    )
    report = refresh(
        source=source,
        config=config,
        embedder=encoder,
        db_uri=args.db,
        table=args.table,
        rebuild=args.rebuild,
        chunk_rows=args.chunk_rows,
    )
    return report.as_dict()


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline search``: returns the results printed on stdout."""
    from dataclasses import replace

    from qwen3_pipeline.consumers import open_vector_table, search
    from qwen3_pipeline.encoder import Qwen3Encoder

    vectors = open_vector_table(args.db, args.table, version=args.version)
    recorded = vectors.spec
    asked = EmbeddingSpec(
        model=args.model,
        revision=args.revision,
        dim=recorded.dim if args.dim is None else args.dim,
        max_length=recorded.max_length,
        document_prompt=recorded.document_prompt,
        normalize=recorded.normalize,
    )
    if asked.fingerprint != recorded.fingerprint:
        raise SpecMismatchError(
            f"table {args.table!r} was embedded with model={recorded.model} "
            f"revision={recorded.revision} dim={recorded.dim}, but the query asks for "
            f"model={asked.model} revision={asked.revision} dim={asked.dim}; search with the "
            "table's model and dim"
        )
    query_spec = recorded if args.task is None else replace(recorded, query_task=args.task)
    encoder = Qwen3Encoder(query_spec, device=args.device, progress=False)
    found = search(vectors, args.query, k=args.k, embedder=encoder)
    return {
        "table": args.table,
        "version": vectors.version,
        "query": args.query,
        "results": found.to_pylist(),
    }


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline embed``: returns the stats printed on stdout."""
    from qwen3_pipeline.encoder import Qwen3Encoder

    if args.output.suffix != ".npy":
        raise InputDataError(f"--output {str(args.output)!r} must end in .npy")
    texts = read_texts(args.input)
    spec = EmbeddingSpec(
        model=args.model,
        revision=args.revision,
        dim=args.dim,
        max_length=args.max_length,
        query_task=args.task,
    )
    encoder = Qwen3Encoder(
        spec, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
    )
    result = encoder.embed_queries(texts) if args.query else encoder.embed_documents(texts)
    vectors = result.raise_on_failure()
    save_npy_atomically(args.output, vectors)
    return {
        "output": str(args.output),
        "shape": list(vectors.shape),
        "model": spec.model,
        "dim": spec.dim,
        "kind": "queries" if args.query else "documents",
        **result.stats.as_dict(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwen3-pipeline`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {"embed": run_embed, "refresh": run_refresh, "search": run_search}
    try:
        output = handlers[args.command](args)
    except Qwen3PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(output, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
