"""Prepare the Dagster instance of ``make dev``: runs that use the GPU queue, one at a time.

The embedding asset is in the ``gpu`` concurrency pool
(:data:`qwen3_pipeline.dagster.embedding_asset.DEFAULT_POOL`), but a pool without a limit limits
nothing: two refreshes (a schedule tick and a backfill, say) would each load the model onto the
same GPU at once. :func:`prepare_instance` sets up the instance under ``DAGSTER_HOME`` with
the two settings this takes, which Dagster keeps in different places:

- ``dagster.yaml``: ``concurrency.pools.granularity: run``. With Dagster's default (``op``) a
  slot is held only while a ``gpu`` step runs: a run whose first steps are outside the pool
  (the dbt models) is launched anyway and waits inside the step, and a run keeps its model in
  memory after its embedding step has released the slot (the in-process executor holds
  resources until the run ends), so the next run's model can join it on the GPU. With ``run``,
  the run queue keeps a run that contains a ``gpu`` step *queued* (no process, no model) while
  runs in progress hold the pool, each for its whole duration.
- the instance's storage: the limit itself (what ``dagster instance concurrency set gpu N`` and
  the UI's *Deployment -> Concurrency* page write). ``dagster.yaml`` can only give every pool
  one ``default_limit``; the limit here is for the ``gpu`` pool alone.

The preparation is idempotent and keeps what a user configured: an existing ``dagster.yaml`` that
already has a ``concurrency`` or ``run_queue`` section is left untouched (the latter because
Dagster refuses ``concurrency`` next to the older ``run_queue`` limits), otherwise the
``concurrency`` section is appended to it, comments and all; a pool limit already set (in the UI,
say) is kept unless a limit is asked for explicitly.

Usage: ``python -m qwen3_pipeline.dagster.instance [--home DIR] [--gpu-pool-limit N]``
(``make dev`` runs it; ``make dev GPU_POOL_LIMIT=2`` for two GPUs). The limit also comes from
``QWEN3_PIPELINE_GPU_POOL_LIMIT``; the home from ``--home``, else ``DAGSTER_HOME``.
"""

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml  # type: ignore[import-untyped]  # PyYAML comes with dagster, its stubs do not

from qwen3_pipeline.core.errors import ConfigError

logger = logging.getLogger(__name__)

# Not imported from the embedding module, which imports Arrow and the refresh engine, for one
# string (a test checks that the two agree).
GPU_POOL = "gpu"
GPU_POOL_LIMIT_ENV = "QWEN3_PIPELINE_GPU_POOL_LIMIT"
DEFAULT_GPU_POOL_LIMIT = 1
CONFIG_FILENAME = "dagster.yaml"

CONCURRENCY_SECTION = """\
# Written by `python -m qwen3_pipeline.dagster.instance` (`make dev`); yours to edit.
concurrency:
  pools:
    # `run`: a run that contains a step of a limited pool (the embedding asset is in the `gpu`
    # pool) stays queued until a slot is free, and holds the slot until it ends. The `gpu`
    # limit itself is stored in the instance: `dagster instance concurrency set gpu N`, the UI's
    # Deployment -> Concurrency page, or `make dev GPU_POOL_LIMIT=N`.
    granularity: run
"""


@dataclass(frozen=True)
class PreparedInstance:
    """What :func:`prepare_instance` found and did.

    Attributes:
        home: The instance directory (``DAGSTER_HOME``), absolute.
        config_written: Whether ``dagster.yaml`` was created or appended to.
        granularity: ``concurrency.pools.granularity`` of the instance (None: Dagster's
            default, ``op``).
        gpu_pool_limit: The limit of the ``gpu`` pool now stored in the instance.
    """

    home: Path
    config_written: bool
    granularity: str | None
    gpu_pool_limit: int


def gpu_pool_limit_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The ``gpu`` pool limit asked for by ``QWEN3_PIPELINE_GPU_POOL_LIMIT`` (None: unset).

    Raises:
        ConfigError: The value is not a positive integer.
    """
    env = os.environ if environ is None else environ
    raw = env.get(GPU_POOL_LIMIT_ENV, "").strip()
    if not raw:
        return None
    try:
        limit = int(raw)
    except ValueError as e:
        raise ConfigError(f"{GPU_POOL_LIMIT_ENV}={raw!r} is not an integer") from e
    return _checked_limit(limit, GPU_POOL_LIMIT_ENV)


def _checked_limit(limit: int, name: str) -> int:
    # 0 is a valid Dagster limit, but it would queue every embedding run forever.
    if limit < 1:
        raise ConfigError(f"{name}={limit}: the gpu pool limit must be at least 1")
    return limit


def _write_concurrency_config(config_path: Path) -> bool:
    """Create ``dagster.yaml``, or append the concurrency section; False if left as it was."""
    if not config_path.exists():
        config_path.write_text(CONCURRENCY_SECTION)
        return True
    text = config_path.read_text()
    existing = yaml.safe_load(text) or {}
    if not isinstance(existing, dict):
        raise ConfigError(f"{config_path} is not a YAML mapping; fix or remove it")
    if "concurrency" in existing or "run_queue" in existing:
        return False
    # Appending (rather than rewriting the parsed YAML) keeps the user's comments and layout.
    separator = "" if not text or text.endswith("\n") else "\n"
    config_path.write_text(f"{text}{separator}\n{CONCURRENCY_SECTION}")
    return True


def prepare_instance(home: Path | str, gpu_pool_limit: int | None = None) -> PreparedInstance:
    """Give the ``gpu`` pool of the Dagster instance in ``home`` a limit, enforced per run.

    Creates ``home`` and its SQLite storage if needed (as ``dagster dev`` would). Safe to run
    before every ``dagster dev``: see the module docstring for what it keeps.

    Args:
        home: The instance directory (what ``DAGSTER_HOME`` points at).
        gpu_pool_limit: Runs that may use the GPU pool at once (the number of GPUs). None keeps
            a limit already set in the instance, or sets :data:`DEFAULT_GPU_POOL_LIMIT` if
            there is none.

    Returns:
        What the instance holds now.

    Raises:
        ConfigError: ``gpu_pool_limit`` is below 1, or ``dagster.yaml`` is not a mapping.
    """
    if gpu_pool_limit is not None:
        _checked_limit(gpu_pool_limit, "gpu_pool_limit")
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config_written = _write_concurrency_config(home / CONFIG_FILENAME)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        explicit = {
            pool.name: pool.limit for pool in storage.get_pool_limits() if not pool.from_default
        }
        if gpu_pool_limit is not None:
            limit = gpu_pool_limit
        else:
            limit = explicit.get(GPU_POOL, DEFAULT_GPU_POOL_LIMIT)
        if explicit.get(GPU_POOL) != limit:
            storage.set_concurrency_slots(GPU_POOL, limit)
        granularity = instance.get_concurrency_config().pool_config.pool_granularity
    return PreparedInstance(
        home=home,
        config_written=config_written,
        granularity=granularity.value if granularity else None,
        gpu_pool_limit=limit,
    )


def main(argv: list[str] | None = None) -> int:
    """Prepare the instance: ``python -m qwen3_pipeline.dagster.instance``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m qwen3_pipeline.dagster.instance",
        description=f"Give the `{GPU_POOL}` concurrency pool of a Dagster instance a limit.",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="instance directory (default: $DAGSTER_HOME)",
    )
    parser.add_argument(
        "--gpu-pool-limit",
        type=int,
        default=None,
        help=(
            f"runs using the GPU at once (default: ${GPU_POOL_LIMIT_ENV}, else the limit already"
            f" set, else {DEFAULT_GPU_POOL_LIMIT})"
        ),
    )
    args = parser.parse_args(argv)
    # INFO for this module only: the instance's storage set-up logs alembic chatter at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    home = args.home or os.environ.get("DAGSTER_HOME")
    if not home:
        parser.error("give --home or set DAGSTER_HOME")
    try:
        limit = args.gpu_pool_limit
        if limit is None:
            limit = gpu_pool_limit_from_env()
        prepared = prepare_instance(home, limit)
    except ConfigError as e:
        parser.error(str(e))
    logger.info(
        "Dagster instance %s: pool `%s` limit %d (%s)",
        prepared.home,
        GPU_POOL,
        prepared.gpu_pool_limit,
        "dagster.yaml written" if prepared.config_written else "dagster.yaml kept as it was",
    )
    if prepared.granularity != "run":
        # A user's own concurrency section wins; say what it means for GPU runs.
        logger.warning(
            "concurrency.pools.granularity is %r in %s: runs that use the GPU may start "
            "together and wait for the pool inside the step; set it to `run` to queue them",
            prepared.granularity or "op",
            prepared.home / CONFIG_FILENAME,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
