"""The ``qwen3-pipeline`` command line.

Each command prints one JSON object on stdout (machine-readable results and stats) and
progress and errors on stderr. Every failure ends with exactly one ``error: ...`` line on stderr
and a non-zero exit status:

- 2 (:data:`EXIT_BAD_INPUT`): bad input, configuration or state (any
  :class:`~qwen3_pipeline.core.errors.Qwen3PipelineError` but failed rows and transient errors),
  including a refused mass delete; nothing written.
- 1 (:data:`EXIT_FAILED_ROWS`): rows could not be embedded. ``embed`` writes nothing;
  ``refresh`` prints its report first (the failed rows keep their old vectors).
- 1 (:data:`EXIT_INTERNAL`): a transient failure (commit conflicts outlasting the retries,
  object-store I/O, a locked DuckDB file, a Ray cluster that cannot be reached: re-running may
  succeed) or any other exception, a bug or an environment problem; ``--debug`` adds the
  traceback.
- 130 (:data:`EXIT_INTERRUPTED`): Ctrl-C.
- 143 (:data:`EXIT_TERMINATED`): SIGTERM. It is turned into an exception, so the run unwinds
  as for Ctrl-C: the plan's spill files are removed and the table stays at its last commit.

No error line repeats a secret: each goes through
:func:`~qwen3_pipeline.core.errors.redact_secrets` (URL passwords, ``password=`` values).
"""

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from qwen3_pipeline.core.changes import is_blank, sanitize_text, sanitize_texts
from qwen3_pipeline.core.errors import (
    ConfigError,
    EmbeddingFailedError,
    InputDataError,
    Qwen3PipelineError,
    SpecMismatchError,
    TransientError,
    redact_secrets,
)
from qwen3_pipeline.core.failures import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF_S,
    FailureStatus,
    FailureStep,
)
from qwen3_pipeline.core.schema import local_database
from qwen3_pipeline.core.spec import DEFAULT_MAX_LENGTH, DEFAULT_QUERY_TASK, EmbeddingSpec
from qwen3_pipeline.embedding.engines import ENGINES, EngineOptions, open_embedder
from qwen3_pipeline.embedding.reranker import DEFAULT_RERANK_MAX_LENGTH

if TYPE_CHECKING:
    from qwen3_pipeline.chunking.config import ChunkingConfig
    from qwen3_pipeline.engine.options import RefreshOptions
    from qwen3_pipeline.lifecycle.gate import GateConfig
    from qwen3_pipeline.sources import Watermark
    from qwen3_pipeline.store.failure_log import FailureLog

EXIT_BAD_INPUT = 2
EXIT_FAILED_ROWS = 1
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM

# How many line numbers an error message lists before "(+N more)".
_SHOWN = 10

_INTERRUPTED = {
    "embed": "interrupted; nothing was written",
    "refresh": "interrupted; the table is at its last committed version, re-run to continue",
    "search": "interrupted",
    "rollback": "interrupted; a rollback is one commit: the table holds its old or its "
    "restored version",
    "failures": "interrupted",
    "replay": "interrupted; a replay is one commit: the records are all due now or unchanged",
}

_DEBUG_HELP = "on an error, also print the full traceback on stderr"

_EXIT_STATUSES = (
    "exit status: 0 done; 1 rows could not be embedded, a transient failure (re-run) or an "
    "internal error; 2 bad input, configuration or state (nothing written); 130 interrupted "
    "(Ctrl-C); 143 terminated (SIGTERM)"
)
# What --ray-address accepts: auto, or [ray://]HOST:PORT (a bracketed IPv6 host too).
_RAY_ADDRESS = re.compile(r"^(?:auto|(?:ray://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5})$")

_EMBED_DESCRIPTION = """\
Embed a file of texts into a float32 [rows, dim] .npy array, in input order.

Plain text: one text per line, lines end at "\\n" only (a trailing "\\r" is dropped, so CRLF
files work; form feeds, U+2028, NEL and other separators stay inside the text). JSONL (a .jsonl
or .ndjson name, or a first non-blank line starting with "{"): one object with a string "text"
per line; blank lines between records are ignored. Invalid UTF-8 becomes U+FFFD and NUL
characters are dropped, as in refresh. A blank (empty or whitespace-only) text is an error
naming its line numbers, so row i of the output is always text i of the input. The output path
is checked before anything is loaded.
"""


def _format_lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOWN])
    more = f" (+{len(numbers) - _SHOWN} more)" if len(numbers) > _SHOWN else ""
    return f"{shown}{more}"


def _read_numbered_texts(path: Path) -> list[tuple[int, str]]:
    """Return ``(line number, text)`` of every text in ``path``; see :func:`read_texts`."""
    if not path.is_file():
        raise InputDataError(f"input file {str(path)!r} does not exist")
    try:
        content = path.read_bytes()
    except OSError as e:
        raise InputDataError(f"cannot read input file {str(path)!r}: {e.strerror}") from e
    raw_lines = content.split(b"\n")
    if raw_lines[-1] == b"":
        # The "\n" that ends the last line does not start another (and an empty file has none).
        raw_lines.pop()
    raw_lines = [line[:-1] if line.endswith(b"\r") else line for line in raw_lines]
    # The refresh's own sanitiser, so a line becomes the text a source row with the same bytes
    # would (invalid UTF-8 -> U+FFFD, NUL dropped); ``view`` skips Arrow's UTF-8 validation so
    # the sanitiser sees the raw bytes.
    lines: list[str] = sanitize_texts(
        pa.array(raw_lines, pa.binary()).view(pa.string())
    ).to_pylist()
    if lines and lines[0].startswith("\ufeff"):
        # A UTF-8 byte order mark (Windows editors) is an encoding marker, not text.
        lines[0] = lines[0][1:]
    first = next((line for line in lines if not is_blank(line)), "")
    numbered: list[tuple[int, str]] = []
    if path.suffix in {".jsonl", ".ndjson"} or first.lstrip().startswith("{"):
        for number, line in enumerate(lines, start=1):
            if is_blank(line):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{path}:{number}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputDataError(f"{path}:{number}: each JSONL record needs a string 'text'")
            # JSON escapes can spell NUL and lone surrogates, which raw bytes cannot.
            numbered.append((number, sanitize_text(record["text"])))
    else:
        numbered = list(enumerate(lines, start=1))
    if not numbered:
        raise InputDataError(f"input file {str(path)!r} has no texts")
    blank = [number for number, text in numbered if is_blank(text)]
    if blank:
        raise InputDataError(
            f"{path}: blank text on line(s) {_format_lines(blank)}: every text must have "
            "something to embed (row i of the output is text i of the input); remove those lines"
        )
    return numbered


def read_texts(path: Path) -> list[str]:
    r"""Read texts from a text file (one per line) or JSONL with a ``text`` field.

    A file whose name ends in ``.jsonl``/``.ndjson``, or whose first non-blank line starts with
    ``{``, is read as JSONL, where blank lines between records are ignored. Otherwise each line
    ending in ``"\n"`` is one text (one trailing ``"\r"`` is dropped, for CRLF files); other
    separators (``"\f"``, U+2028, NEL, ``"\x1e"``...) stay inside the text. Texts are sanitised
    like the refresh's (:func:`~qwen3_pipeline.core.changes.sanitize_texts`): invalid UTF-8 becomes
    U+FFFD and NUL characters are dropped. A leading UTF-8 byte order mark is ignored.

    Args:
        path: The input file.

    Returns:
        The texts in file order, none of them blank.

    Raises:
        InputDataError: Missing or unreadable file, no texts, a blank (empty or whitespace-only)
            text (the message names its line numbers), bad JSON, or a record without ``text``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "texts.txt"
        >>> _ = path.write_bytes(b"first\r\nsecond\x0cpage\n")
        >>> read_texts(path)
        ['first', 'second\x0cpage']
    """
    return [text for _, text in _read_numbered_texts(path)]


def check_output_path(path: Path) -> None:
    """Check that ``path`` can receive the ``.npy`` array, before any work is done.

    The path must end in ``.npy`` and not be a directory; its parent must exist, or be
    creatable, and be writable (probed by creating, then removing, a nameless temporary file
    in the nearest existing ancestor; nothing is left behind).

    Args:
        path: The ``--output`` path.

    Raises:
        InputDataError: The path cannot receive the array; the message says why.
    """
    if path.suffix != ".npy":
        raise InputDataError(f"--output {str(path)!r} must end in .npy")
    try:
        if path.is_dir():
            raise InputDataError(f"--output {str(path)!r} is a directory; name a .npy file")
        parent = path.parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not existing.is_dir():
            raise InputDataError(
                f"cannot write --output {str(path)!r}: {str(existing)!r} is not a directory"
            )
        # A real file creation answers for ACLs, read-only mounts and root, where
        # os.access would not.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputDataError(f"cannot write --output {str(path)!r}: {e.strerror or e}") from e


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


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: one model in this process (default); ray: a pool of Ray actors",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="Ray actors, one model each"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join a Ray cluster (ray://head:10001, auto); default: a local Ray for this run",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per Ray actor (default 1 when this machine has CUDA, else 0)",
    )
    parser.add_argument(
        "--embedder-factory",
        default=None,
        metavar="MODULE:CALLABLE",
        help="build the embedder with this callable (spec -> Embedder) instead of the Qwen3 "
        "encoder, e.g. a TEI/vLLM client; in this process, or in each actor with --engine ray",
    )


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """Return the engine settings of ``embed``/``refresh`` arguments.

    Raises:
        ConfigError: Ray flags without ``--engine ray``, an invalid value, or an
            ``--embedder-factory`` that cannot be imported or is not callable.
    """
    ray_flags = (
        args.workers is not None or args.ray_address is not None or args.gpus_per_worker is not None
    )
    if args.engine == "local" and ray_flags:
        raise ConfigError(
            "--workers, --ray-address and --gpus-per-worker need --engine ray "
            "(the local engine is one model in this process)"
        )
    _require_positive("--workers", args.workers)
    _require_positive("--max-batch-tokens", args.max_batch_tokens)
    if args.ray_address is not None and not _RAY_ADDRESS.match(args.ray_address):
        raise ConfigError(
            f"--ray-address {args.ray_address!r} is not a Ray address: give auto (the cluster "
            "this machine belongs to), ray://HEAD:10001 (Ray Client) or HEAD:6379 (the head "
            "node's GCS)"
        )
    if args.embedder_factory is not None:
        from qwen3_pipeline.embedding.factory import import_embedder_factory

        try:
            import_embedder_factory(args.embedder_factory)
        except ConfigError as e:
            raise ConfigError(f"--embedder-factory: {e}") from e
    gpus = args.gpus_per_worker
    if args.engine == "ray" and gpus is None:
        gpus = 1.0 if args.device != "cpu" and _cuda_available() else 0.0
    return EngineOptions(
        engine=args.engine,
        workers=args.workers or 1,
        ray_address=args.ray_address,
        gpus_per_worker=gpus or 0.0,
        device=args.device,
        dtype=args.dtype,
        max_batch_tokens=args.max_batch_tokens,
        embedder_factory=args.embedder_factory,
    )


def _require_positive(flag: str, value: int | None) -> None:
    """Refuse a count flag below 1 (0 would be silently read as "unset" or do nothing)."""
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")


def _check_refresh_flags(args: argparse.Namespace) -> None:
    """Refuse ``refresh`` flag values the engine would read as something else.

    Raises:
        ConfigError: ``--shards`` below 1, or a ``--drift-threshold`` outside (0, 1] (above 1
            every model would fail the check; 0 or below would pass any model).
    """
    _require_positive("--shards", args.shards)
    threshold = args.drift_threshold
    if math.isnan(threshold) or not 0.0 < threshold <= 1.0:
        raise ConfigError(
            f"--drift-threshold must be a cosine in (0, 1] (default 0.999), got {threshold}: "
            "above 1 no model could pass, at 0 or below any would; to write despite a drift, "
            "pass --accept-drift"
        )


def check_db(db: str, *, must_exist: bool) -> None:
    """Check ``--db`` before LanceDB sees it (LanceDB creates a missing directory on connect).

    Args:
        db: The ``--db`` value (object-store URIs are not checked here).
        must_exist: The command only reads (``search``, ``rollback``): a missing directory
            is refused rather than created empty.

    Raises:
        ConfigError: ``--db`` is a regular file, lies under one, or (``must_exist``) does
            not exist. Nothing is created.
    """
    path = local_database(db)
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--db {db!r} is a file, not a LanceDB database directory; name a directory "
            "(a refresh creates it)"
        )
    existing = next((p for p in path.parents if p.exists()), None)
    if not path.exists() and existing is not None and not existing.is_dir():
        raise ConfigError(f"--db {db!r} cannot be a directory: {str(existing)!r} is a file")
    if must_exist and not path.exists():
        raise ConfigError(
            f"--db {db!r} does not exist, so it holds no table; check the path (a refresh "
            "creates the database; nothing was created)"
        )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``qwen3-pipeline`` command."""
    parser = argparse.ArgumentParser(
        prog="qwen3-pipeline",
        description="Qwen3-Embedding vectors kept in sync with LanceDB.",
        epilog=_EXIT_STATUSES,
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand from resetting a
    # ``--debug`` given before it to False.
    debug_after = argparse.ArgumentParser(add_help=False)
    debug_after.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_embed_command(commands, debug_after)
    _add_refresh_command(commands, debug_after)
    _add_search_command(commands, debug_after)
    _add_rollback_command(commands, debug_after)
    _add_failures_commands(commands, debug_after)
    return parser


def _add_embed_command(commands: Any, debug_after: argparse.ArgumentParser) -> None:
    embed = commands.add_parser(
        "embed",
        parents=[debug_after],
        help="embed a file of texts into a .npy array",
        description=_EMBED_DESCRIPTION,
        epilog=_EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(embed)
    _add_engine_arguments(embed)
    embed.add_argument("--query", action="store_true", help="embed as queries (instruction)")
    embed.add_argument("--task", default=DEFAULT_QUERY_TASK, help="query instruction")
    embed.add_argument(
        "--input", required=True, type=Path, help="text file (one text a line) or JSONL ('text')"
    )
    embed.add_argument("--output", required=True, type=Path, help="where to write the .npy")


def _add_refresh_command(commands: Any, debug_after: argparse.ArgumentParser) -> None:
    sync = commands.add_parser(
        "refresh", parents=[debug_after], help="sync a LanceDB table with a source table"
    )
    _add_source_arguments(sync)
    sync.add_argument("--db", required=True, help="LanceDB directory or URI")
    sync.add_argument("--table", required=True, help="vector table name")
    sync.add_argument("--rebuild", action="store_true", help="re-embed all into a new table, swap")
    sync.add_argument("--chunk-rows", type=int, default=10_000, help="rows per commit")
    _add_drift_arguments(sync)
    _add_gate_arguments(sync)
    sync.add_argument(
        "--no-reproject",
        action="store_true",
        help="embed every row instead of re-projecting vectors of a table at a larger dim",
    )
    _add_chunking_arguments(sync)
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (exact counts, rows and tokens to embed) and write nothing",
    )
    _add_delete_guard_arguments(sync)
    _add_retry_arguments(sync)
    _add_model_arguments(sync)
    _add_engine_arguments(sync)


def _add_retry_arguments(sync: argparse.ArgumentParser) -> None:
    """When rows the model failed on are tried again, and when they are quarantined."""
    sync.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help="failed attempts after which a row is quarantined: not sent to the model again "
        f"until its text changes or it is replayed (default {DEFAULT_MAX_ATTEMPTS})",
    )
    sync.add_argument(
        "--retry-backoff",
        type=float,
        default=DEFAULT_RETRY_BACKOFF_S,
        metavar="SECONDS",
        help="wait before retrying a failed row, doubling after each failure, capped at a day "
        f"(default {DEFAULT_RETRY_BACKOFF_S:.0f}; 0 retries on every refresh)",
    )


def _add_failures_commands(commands: Any, debug_after: argparse.ArgumentParser) -> None:
    listing = commands.add_parser(
        "failures",
        parents=[debug_after],
        help="list the rows of a table that could not be embedded",
        description="List the failure records of a vector table: rows the model could not "
        "embed (they keep any previous vector), the step that failed, the error, attempts, "
        "and whether they are retried (when) or quarantined.",
        epilog=_EXIT_STATUSES,
    )
    listing.add_argument("--db", required=True, help="LanceDB directory or URI")
    listing.add_argument("--table", required=True, help="vector table name")
    listing.add_argument("--json", action="store_true", help="print the records as JSON")
    listing.add_argument(
        "--status", choices=[s.value for s in FailureStatus], help="only records in this state"
    )
    replay = commands.add_parser(
        "replay",
        parents=[debug_after],
        help="make failed or quarantined rows due for the next refresh",
        description="Make failure records due now: the next refresh sends their rows to the "
        "model again (a quarantined row gets one more attempt; one whose text changed is "
        "retried anyway).",
        epilog=_EXIT_STATUSES,
    )
    replay.add_argument("--db", required=True, help="LanceDB directory or URI")
    replay.add_argument("--table", required=True, help="vector table name")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", action="extend", nargs="+", metavar="K", help="the keys to replay")
    which.add_argument("--all", action="store_true", help="every record")
    which.add_argument(
        "--step", choices=[s.value for s in FailureStep], help="every record of this step"
    )


def _add_source_arguments(sync: argparse.ArgumentParser) -> None:
    """The source table, its key, text and carry columns, and the scope of a refresh."""
    sync.add_argument(
        "--source",
        required=True,
        help="a Parquet file or directory, duckdb:PATH::TABLE_OR_QUERY, "
        "postgresql://USER@HOST:PORT/DB::TABLE_OR_QUERY, or env:VAR::TABLE_OR_QUERY "
        "(PostgreSQL, the URL read from environment variable VAR)",
    )
    sync.add_argument("--key", required=True, help="unique, non-null key column")
    text = sync.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", nargs="+", metavar="COL", help="text column(s), joined")
    text.add_argument("--template", help="str.format template over columns, e.g. '{title}: {body}'")
    sync.add_argument("--carry", nargs="+", default=[], metavar="COL", help="columns kept beside")
    sync.add_argument("--updated-at", default=None, metavar="COL", help="last-modified column")
    sync.add_argument(
        "--watermark",
        action="store_true",
        help="read only rows whose --updated-at is later than the stored mark of this table "
        "and scope (the first run reads everything and records the mark)",
    )
    sync.add_argument(
        "--watermark-lag",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --watermark: also read rows up to SECONDS before the mark (late commits; "
        "default 0)",
    )
    sync.add_argument(
        "--key-scan",
        default=None,
        metavar="every|N|never",
        help="with --watermark: read the source's keys to find deletes on every refresh "
        "(default), every N-th, or never",
    )
    scope = sync.add_mutually_exclusive_group()
    scope.add_argument("--shard", default=None, metavar="K/N", help="refresh hash shard K of N")
    scope.add_argument(
        "--shards", type=int, default=None, metavar="N", help="label rows by N shards"
    )


def _add_drift_arguments(sync: argparse.ArgumentParser) -> None:
    """The drift canary: how close the model must reproduce the table's recorded vectors."""
    sync.add_argument(
        "--accept-drift",
        action="store_true",
        help="write even if the model no longer reproduces the table's canary vectors "
        "(re-records them)",
    )
    sync.add_argument(
        "--drift-threshold",
        type=float,
        default=0.999,
        metavar="COS",
        help="minimum cosine of the canary texts to their recorded vectors (default 0.999)",
    )


def _add_gate_arguments(sync: argparse.ArgumentParser) -> None:
    """The blue/green gate of a rebuild (see :func:`_gate_config`)."""
    sync.add_argument(
        "--gate",
        type=Path,
        default=None,
        metavar="GOLDEN.jsonl",
        help="with --rebuild: swap only if the rebuilt table scores at least as well as the "
        'live one on this golden set ({"query": ..., "relevant": [keys]} per line)',
    )
    sync.add_argument(
        "--gate-tolerance",
        type=float,
        default=0.0,
        metavar="T",
        help="how much lower recall@k / nDCG@k the rebuilt table may score (default 0)",
    )
    sync.add_argument("--gate-k", type=int, default=10, metavar="K", help="k of the gate metrics")


def _add_chunking_arguments(sync: argparse.ArgumentParser) -> None:
    """The ``--chunk-*`` options (see :func:`chunking_config`)."""
    chunks = sync.add_argument_group(
        "chunking", "cut long documents into chunks, one vector each (a table of chunks)"
    )
    chunks.add_argument(
        "--chunk-tokens", type=int, default=None, metavar="N", help="largest chunk, in Qwen tokens"
    )
    chunks.add_argument(
        "--chunk-overlap", type=int, default=None, metavar="M", help="tokens repeated (default 0)"
    )
    chunks.add_argument(
        "--chunk-splitter",
        choices=("text", "markdown", "code"),
        default=None,
        help="structure chunk boundaries follow (default text)",
    )
    chunks.add_argument(
        "--chunk-language",
        default=None,
        metavar="LANG",
        help="tree-sitter grammar for --chunk-splitter code (e.g. python)",
    )


def _add_delete_guard_arguments(sync: argparse.ArgumentParser) -> None:
    """The mass-delete guard: how much of the stored scope one refresh may delete."""
    sync.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="allow deleting more than --max-delete-share of the scope (or all of it)",
    )
    sync.add_argument(
        "--max-delete-share",
        type=float,
        default=0.5,
        metavar="F",
        help="largest share of the stored scope a refresh may delete (default 0.5)",
    )


def _add_search_command(commands: Any, debug_after: argparse.ArgumentParser) -> None:
    find = commands.add_parser(
        "search", parents=[debug_after], help="search a vector table with a query"
    )
    find.add_argument("--db", required=True, help="LanceDB directory or URI")
    find.add_argument("--table", required=True, help="vector table name")
    find.add_argument("--model", required=True, help="must match the table's model")
    find.add_argument("--revision", default=None, help="must match the table's revision")
    find.add_argument("--dim", type=int, default=None, help="must match the table's dim")
    find.add_argument("--task", default=None, help="query instruction (default: the table's)")
    find.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    find.add_argument(
        "--version",
        type=int,
        default=None,
        help="pinned Lance version (default: the newest checked version, else the latest)",
    )
    find.add_argument("-k", type=int, default=10, help="results to return")
    find.add_argument(
        "--chunks",
        action="store_true",
        help="on a table of document chunks, return the nearest chunks rather than documents",
    )
    rerank = find.add_argument_group(
        "reranking",
        "score the nearest candidates with a Qwen3-Reranker and return the best k by its score "
        "(each result keeps its similarity and gains rerank_score)",
    )
    rerank.add_argument(
        "--rerank-model",
        default=None,
        metavar="M",
        help="Qwen3-Reranker hub id or local directory (e.g. Qwen/Qwen3-Reranker-0.6B)",
    )
    rerank.add_argument(
        "--candidates",
        type=int,
        default=None,
        metavar="N",
        help="vector candidates the reranker scores, at least k (default: max(k, 50))",
    )
    rerank.add_argument(
        "--instruction",
        default=None,
        help="what relevance means to the reranker (default: the model card's web-search task)",
    )
    rerank.add_argument(
        "--rerank-text",
        default=None,
        metavar="COLUMN",
        help="the column the reranker reads (default: chunk_text; a table of whole documents "
        "needs a carried text column)",
    )
    rerank.add_argument(
        "--rerank-max-length",
        type=int,
        default=DEFAULT_RERANK_MAX_LENGTH,
        metavar="T",
        help=f"tokens per (query, document) pair, template included (default "
        f"{DEFAULT_RERANK_MAX_LENGTH})",
    )
    find.add_argument("query", help="query text")


def _add_rollback_command(commands: Any, debug_after: argparse.ArgumentParser) -> None:
    back = commands.add_parser(
        "rollback",
        parents=[debug_after],
        help="restore an earlier version of a vector table in one commit",
        description="Restore an earlier version of a vector table as its newest version, in one "
        "commit (nothing is copied). By default the version tagged before the last rebuild "
        "swap. The new version counts as checked only if the restored one was; checked tags "
        "of the rolled-back versions are deleted, so readers follow the rollback.",
        epilog=_EXIT_STATUSES,
    )
    back.add_argument("--db", required=True, help="LanceDB directory or URI")
    back.add_argument("--table", required=True, help="vector table name")
    back.add_argument(
        "--to",
        default=None,
        metavar="TAG_OR_VERSION",
        help="a tag (e.g. before-swap-v12-20250101T120000Z, checked-v9) or a version number "
        "(default: the newest before-swap tag)",
    )


def chunking_config(args: argparse.Namespace) -> "ChunkingConfig | None":
    """The ``--chunk-*`` options as a ``ChunkingConfig``, or None without ``--chunk-tokens``.

    Raises:
        ConfigError: A chunk option without ``--chunk-tokens``, or an invalid value.
    """
    others = {
        "--chunk-overlap": args.chunk_overlap,
        "--chunk-splitter": args.chunk_splitter,
        "--chunk-language": args.chunk_language,
    }
    if args.chunk_tokens is None:
        given = [name for name, value in others.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --chunk-tokens N (the chunk size)")
        return None
    from qwen3_pipeline.chunking.config import ChunkingConfig

    return ChunkingConfig(
        tokens=args.chunk_tokens,
        overlap=args.chunk_overlap or 0,
        splitter=args.chunk_splitter or "text",
        code_language=args.chunk_language,
    )


def run_refresh(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline refresh``: returns the report printed on stdout."""
    from qwen3_pipeline.engine.refresh import refresh
    from qwen3_pipeline.sources import Shard, Shards, SourceConfig, parse_shard, parse_source

    _check_refresh_flags(args)
    check_db(args.db, must_exist=False)
    options = engine_options(args)
    partition: Shard | Shards | None = None
    if args.shard:
        partition = Shard(*parse_shard(args.shard))
    elif args.shards is not None:
        partition = Shards(args.shards)
    config = SourceConfig(
        key=args.key,
        text_columns=tuple(args.text or ()),
        template=args.template,
        carry=tuple(args.carry),
        updated_at=args.updated_at,
        partition=partition,
        chunking=chunking_config(args),
        watermark=watermark_of(args),
    )
    source = parse_source(args.source)
    spec = EmbeddingSpec(
        model=args.model, revision=args.revision, dim=args.dim, max_length=args.max_length
    )
    if args.dry_run:
        return _dry_run(args, source, config, spec)
    from qwen3_pipeline.embedding.lazy import LazyEmbedder

    refresh_options = refresh_options_of(args)
    # Loaded on the first embed: a refresh with nothing to embed never loads the model. A
    # rebuild holds the table's rebuild lock in the engine (store/rebuild_lock.py).
    with LazyEmbedder(spec, options) as embedder:
        report = refresh(
            source=source,
            config=config,
            embedder=embedder,
            db_uri=args.db,
            table=args.table,
            options=refresh_options,
        )
    if report.gate is not None and not report.gate["passed"]:
        from qwen3_pipeline.core.errors import GateFailedError

        raise GateFailedError(
            f"gate failed, {args.table!r} not swapped (live untouched; the rebuilt table "
            f"{report.table_name!r} is kept for inspection): {report.gate['reason']}"
        )
    return report.as_dict()


def watermark_of(args: argparse.Namespace) -> "Watermark | None":
    """The ``--watermark*`` and ``--key-scan`` options as a ``Watermark`` (None without one).

    Raises:
        ConfigError: ``--watermark-lag`` or ``--key-scan`` without ``--watermark``, or a bad
            value.
    """
    from qwen3_pipeline.sources import Watermark

    if not args.watermark:
        stray = [f for f, v in (("--watermark-lag", args.watermark_lag),
                                ("--key-scan", args.key_scan)) if v is not None]  # fmt: skip
        if stray:
            raise ConfigError(f"{' and '.join(stray)} need(s) --watermark")
        return None
    return Watermark(
        lag_s=0.0 if args.watermark_lag is None else args.watermark_lag,
        key_scan="every" if args.key_scan is None else args.key_scan,
    )


def refresh_options_of(args: argparse.Namespace) -> "RefreshOptions":
    """The ``refresh`` options as the one :class:`RefreshOptions` the engine takes.

    Raises:
        ConfigError: An invalid value, or ``--gate`` without ``--rebuild``.
    """
    from qwen3_pipeline.engine.options import RefreshOptions as Options

    return Options(
        rebuild=args.rebuild,
        chunk_rows=args.chunk_rows,
        allow_mass_delete=args.allow_mass_delete,
        max_delete_share=args.max_delete_share,
        reproject=not args.no_reproject,
        drift_threshold=args.drift_threshold,
        accept_drift=args.accept_drift,
        gate=_gate_config(args),
        max_attempts=args.max_attempts,
        retry_backoff_s=args.retry_backoff,
    )


def _gate_config(args: argparse.Namespace) -> "GateConfig | None":
    """The ``--gate*`` options as a ``GateConfig`` (None without ``--gate``).

    Raises:
        ConfigError: ``--gate`` without ``--rebuild``, or a bad golden set.
    """
    if args.gate is None:
        return None
    if not args.rebuild:
        raise ConfigError(
            "--gate needs --rebuild: it decides whether a rebuilt table is swapped in"
        )
    from qwen3_pipeline.lifecycle.gate import GateConfig, load_golden_set

    return GateConfig(
        golden=load_golden_set(args.gate),
        tolerance=args.gate_tolerance,
        k=args.gate_k,
        # The live table's query encoder (a second model) runs where this run's model does.
        live_encoder=engine_options(args).encoder_options,
    )


def _dry_run(args: argparse.Namespace, source: Any, config: Any, spec: EmbeddingSpec) -> Any:
    """Plan the refresh with the tokenizer only (no model) and return the plan as JSON.

    A plan the mass-delete guard refuses is printed too, then the refusal is raised (exit 2).
    """
    from qwen3_pipeline.core.errors import MassDeleteError
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder
    from qwen3_pipeline.engine.plan import guard_plan, plan_refresh

    tokenizer = Qwen3Encoder(spec, device="cpu", load_model=False, progress=False)
    options = refresh_options_of(args)
    with (
        _database_to_plan(args.db) as db_uri,
        plan_refresh(
            source=source,
            config=config,
            embedder=tokenizer,
            db_uri=db_uri,
            table=args.table,
            options=options,
        ) as plan,
    ):
        output = {"dry_run": True, **plan.as_dict(), "refused": None}
        if db_uri != args.db:  # planned against an empty stand-in: show the real URI
            output["table_uri"] = args.db
        try:
            guard_plan(plan, options)
        except MassDeleteError as e:
            print(json.dumps({**output, "refused": str(e)}, default=str))
            raise
    return output


@contextmanager
def _database_to_plan(db: str) -> Iterator[str]:
    """``db``, or for a local database that does not exist yet an empty stand-in.

    A dry run writes nothing, not even the database directory that connecting to LanceDB
    would create: a first fill is planned against an empty temporary directory (removed after).
    """
    path = local_database(db)
    if path is None or path.exists():
        yield db
        return
    with tempfile.TemporaryDirectory(prefix="qwen3-dry-run-") as empty:
        yield empty


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline search``: returns the results printed on stdout."""
    from dataclasses import replace

    from qwen3_pipeline.consumers.vector_search import open_vector_table, rerank_plan, search
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    check_db(args.db, must_exist=True)
    vectors = open_vector_table(args.db, args.table, version=args.version)
    if args.chunks and not vectors.chunked:
        # Refused before the model loads (search() would refuse it too, after).
        raise ConfigError(
            f"--chunks needs a table of document chunks, but {args.table!r} holds one row per "
            "document; search it without --chunks"
        )
    rerank_options: dict[str, Any] = {}
    if args.rerank_model is None:
        given = [
            flag
            for flag, value in (
                ("--candidates", args.candidates),
                ("--instruction", args.instruction),
                ("--rerank-text", args.rerank_text),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --rerank-model")
    else:
        # Checked against the table before either model loads.
        plan = rerank_plan(
            vectors, k=args.k, candidates=args.candidates, text_column=args.rerank_text
        )
        rerank_options = {
            "candidates": plan.candidates,
            "text_column": plan.text_column,
            "rerank_instruction": args.instruction,
        }
    recorded = vectors.spec
    asked = EmbeddingSpec(
        model=args.model,
        revision=args.revision,
        dim=recorded.dim if args.dim is None else args.dim,
        max_length=recorded.max_length,
        document_prompt=recorded.document_prompt,
        normalize=recorded.normalize,
        chunking=recorded.chunking,
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
    if args.rerank_model is not None:
        from qwen3_pipeline.embedding.reranker import Qwen3Reranker

        rerank_options["rerank"] = Qwen3Reranker(
            args.rerank_model, device=args.device, max_length=args.rerank_max_length
        )
    found = search(
        vectors, args.query, k=args.k, embedder=encoder, chunks=args.chunks, **rerank_options
    )
    return {
        "table": args.table,
        "version": vectors.version,
        "checked": vectors.checked,
        "query": args.query,
        "results": found.to_pylist(),
    }


def run_rollback(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline rollback``: returns the result printed on stdout.

    Raises:
        ConfigError: No such table, or ``--to`` names no tag or version of it (the message
            lists the tags); without ``--to``, a table that no rebuild has swapped.
    """
    from qwen3_pipeline.store import open_lance_table, rollback
    from qwen3_pipeline.store.watermark_log import forget_watermarks

    check_db(args.db, must_exist=True)
    table = open_lance_table(args.db, args.table)
    result = rollback(table, args.to).as_dict()
    # The restored rows are older than the marks: the next watermark refresh reads all.
    result["watermarks_forgotten"] = forget_watermarks(args.db, args.table)
    return result


def _failure_log(args: argparse.Namespace) -> "FailureLog":
    """The failure log of ``--table`` in ``--db``, both checked to exist.

    Raises:
        ConfigError: No database at ``--db``, or no table ``--table`` in it.
    """
    from qwen3_pipeline.store import list_table_names
    from qwen3_pipeline.store.failure_log import FailureLog

    check_db(args.db, must_exist=True)
    log = FailureLog.open(args.db, args.table)
    names = list_table_names(log.db)
    if args.table not in names:
        tables = sorted(n for n in names if "__" not in n)
        raise ConfigError(
            f"no table {args.table!r} in {args.db!r}; its tables: {', '.join(tables) or 'none'}"
        )
    return log


def run_failures(args: argparse.Namespace) -> dict[str, Any] | str:
    """Run ``qwen3-pipeline failures``: the records as JSON (``--json``) or a text table.

    Raises:
        ConfigError: No such database or table.
    """
    rows = _failure_log(args).read().to_pylist()
    if args.status is not None:
        rows = [r for r in rows if r["status"] == args.status]
    counts = {s.value: sum(r["status"] == s.value for r in rows) for s in FailureStatus}
    if args.json:
        return {"table": args.table, "counts": counts, "records": rows}
    return format_failures(args.table, rows)


def format_failures(table: str, rows: list[dict[str, Any]]) -> str:
    """The failure records as a text table, one line per row, newest failure first.

    Example:
        >>> print(format_failures("docs", []))
        docs: no failure records
    """
    if not rows:
        return f"{table}: no failure records"
    rows = sorted(rows, key=lambda r: r["last_failed_at"], reverse=True)
    quarantined = sum(r["status"] == FailureStatus.QUARANTINED for r in rows)
    lines = [
        f"{table}: {len(rows)} failure record(s), {quarantined} quarantined",
        f"{'key':<24} {'step':<9} {'attempts':>8}  {'status':<12} {'next retry':<20} error",
    ]
    for r in rows:
        next_retry = (
            "replay to retry"
            if r["status"] == FailureStatus.QUARANTINED
            else r["next_retry_at"].strftime("%Y-%m-%d %H:%M:%S")
        )
        error = f"{r['error_type']}: {r['message']}"
        lines.append(
            f"{r['key'][:24]:<24} {r['step']:<9} {r['attempts']:>8}  {r['status']:<12} "
            f"{next_retry:<20} {error[:120]}"
        )
    return "\n".join(lines)


def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline replay``: returns how many records were made due.

    Raises:
        ConfigError: No such database or table, or a ``--key`` without a failure record.
    """
    log = _failure_log(args)
    if args.key is not None:
        known = set(log.read().column("doc_key").to_pylist())
        missing = [k for k in dict.fromkeys(args.key) if k not in known]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ConfigError(
                f"no failure record for key(s) {shown} in table {args.table!r}; "
                "list them with: qwen3-pipeline failures"
            )
    replayed = log.replay(keys=args.key, step=args.step)
    return {"table": args.table, "replayed": replayed}


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``qwen3-pipeline embed``: returns the stats printed on stdout.

    Raises:
        InputDataError: Bad ``--input`` or ``--output`` (checked before the model loads).
        EmbeddingFailedError: Some rows could not be embedded; nothing is written.
    """
    options = engine_options(args)
    check_output_path(args.output)
    numbered = _read_numbered_texts(args.input)
    texts = [text for _, text in numbered]
    spec = EmbeddingSpec(
        model=args.model,
        revision=args.revision,
        dim=args.dim,
        max_length=args.max_length,
        query_task=args.task,
    )
    with open_embedder(spec, options) as embedder:
        result = embedder.embed_queries(texts) if args.query else embedder.embed_documents(texts)
    if result.failures:
        shown = "; ".join(
            f"line {numbered[row][0]}: {why}" for row, why in list(result.failures.items())[:_SHOWN]
        )
        more = f" (+{len(result.failures) - _SHOWN} more)" if len(result.failures) > _SHOWN else ""
        raise EmbeddingFailedError(
            f"{len(result.failures)} row(s) could not be embedded ({shown}{more}); "
            f"nothing was written to {str(args.output)!r}"
        )
    save_npy_atomically(args.output, result.vectors)
    return {
        "output": str(args.output),
        "shape": list(result.vectors.shape),
        "model": spec.model,
        "dim": spec.dim,
        "kind": "queries" if args.query else "documents",
        **result.stats.as_dict(),
    }


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _report_error(args: argparse.Namespace, error: BaseException, message: str) -> None:
    if getattr(args, "debug", False):
        # The traceback repeats messages and arguments (a source DSN): scrubbed like the rest.
        trace = "".join(traceback.format_exception(error))
        print(redact_secrets(trace), file=sys.stderr, end="")
    print(f"error: {redact_secrets(_one_line(message))}", file=sys.stderr)


def _terminated_message(args: argparse.Namespace) -> str:
    return _INTERRUPTED[args.command].replace("interrupted", "interrupted (SIGTERM)", 1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the run unwinds (context managers close).

    A :class:`KeyboardInterrupt`, so that code which lets Ctrl-C through (``except
    Exception`` does) lets it through too.
    """


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread only).

    A second SIGTERM during the unwinding ends the process at once (the default action).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwen3-pipeline`` console script; returns the exit status.

    The one error boundary of the command line: whatever a command raises ends as a single
    ``error: ...`` line on stderr and an exit status (see the module docstring), never as a
    traceback unless ``--debug`` asks for it.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, else :data:`EXIT_BAD_INPUT`, :data:`EXIT_FAILED_ROWS`,
        :data:`EXIT_INTERNAL`, :data:`EXIT_INTERRUPTED` or :data:`EXIT_TERMINATED`.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {
        "embed": run_embed,
        "refresh": run_refresh,
        "search": run_search,
        "rollback": run_rollback,
        "failures": run_failures,
        "replay": run_replay,
    }
    try:
        with _sigterm_raises():
            output = handlers[args.command](args)
    except Terminated as e:
        _report_error(args, e, _terminated_message(args))
        return EXIT_TERMINATED
    except SystemExit as e:
        # ray.init() replaces the SIGTERM handler with one that calls sys.exit(SIGTERM): with
        # the Ray engine a SIGTERM arrives as this (the run has unwound the same way).
        if getattr(args, "engine", None) != "ray" or e.code != signal.SIGTERM:
            raise
        _report_error(args, e, _terminated_message(args))
        return EXIT_TERMINATED
    except KeyboardInterrupt as e:
        _report_error(args, e, _INTERRUPTED[args.command])
        return EXIT_INTERRUPTED
    except EmbeddingFailedError as e:
        _report_error(args, e, str(e))
        return EXIT_FAILED_ROWS
    except TransientError as e:
        _report_error(args, e, f"{e} (a transient failure: re-running may succeed)")
        return EXIT_INTERNAL
    except Qwen3PipelineError as e:
        _report_error(args, e, str(e))
        return EXIT_BAD_INPUT
    except (ConnectionError, TimeoutError) as e:
        # Raised by what the run connects to beyond the package's typed boundaries (a Ray
        # cluster that is not up, a timeout): transient, as is_transient() decides it.
        hint = " (check --ray-address)" if getattr(args, "ray_address", None) else ""
        _report_error(
            args,
            e,
            f"could not connect: {type(e).__name__}: {e}{hint} (a transient failure: "
            "re-running may succeed)",
        )
        return EXIT_INTERNAL
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        hint = "" if args.debug else " (re-run with --debug for the traceback)"
        _report_error(args, e, f"internal error: {detail}{hint}")
        return EXIT_INTERNAL
    print(output if isinstance(output, str) else json.dumps(output, default=str))
    failed = (
        output.get("failed", 0) if isinstance(output, dict) and args.command == "refresh" else 0
    )
    if failed:
        print(
            f"error: {failed} row(s) could not be embedded; they keep any previous vector and "
            f"are retried by later refreshes (list them: qwen3-pipeline failures --db "
            f"{redact_secrets(args.db)} --table {args.table})",
            file=sys.stderr,
        )
        return EXIT_FAILED_ROWS
    return 0


if __name__ == "__main__":
    sys.exit(main())
