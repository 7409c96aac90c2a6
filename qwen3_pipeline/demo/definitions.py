"""The demo Dagster code location (``workspace.yaml`` loads ``qwen3_pipeline.demo.definitions``).

Raw standard-library docstrings in DuckDB -> dbt models -> Qwen3 vectors in LanceDB (8 hash
shards) -> ANN index upkeep and a near-duplicate report; an hourly schedule and automation on
dbt updates (both stopped unless ``QWEN3_PIPELINE_AUTOMATION=on``). Configured by environment
variables; see
:mod:`qwen3_pipeline.demo.location`. Loading it imports neither torch nor transformers:
the model is loaded by a run on its first embed call. Nor does it run dbt or write anything: the
dbt assets come from the manifest prepared under the data directory by
``python -m qwen3_pipeline.demo.dbt`` (also run by ``make setup`` and the demo), and
loading fails with a message naming that command when it is missing or out of date. Only
``dagster dev`` prepares it on load (see :mod:`qwen3_pipeline.demo.dbt`).

Run the UI with ``make dev`` (it first gives the instance's ``gpu`` pool a limit, see
:mod:`qwen3_pipeline.dagster.instance`), or ``dagster dev -w workspace.yaml`` from the
repository root, or ``dagster dev -m qwen3_pipeline.demo.definitions`` where the package is
installed.
Loading warns when every run would recompile transformers from source
(:func:`warn_if_runs_recompile_transformers`).
"""

import importlib.util
import logging
import sys
from pathlib import Path

from qwen3_pipeline.demo.location import DemoSettings, build_definitions

logger = logging.getLogger(__name__)


def warn_if_runs_recompile_transformers() -> bool:
    """Warn when every run would recompile transformers from source (no bytecode, none written).

    Each run is a new process that imports torch and transformers to load the model. Python
    reads their ``.pyc`` files if the install wrote them (pip does; uv only with
    ``--compile-bytecode``, which ``make setup`` passes) and otherwise compiles the sources
    again, writing the result unless ``PYTHONDONTWRITEBYTECODE`` is set, in which case every run
    pays it (on a 2-core machine about 14 s more per run, 5 s of it in the model load). The
    flag is not overridden here: it is a deliberate setting in read-only images, and a library
    should not change interpreter-wide state on import; the fix belongs to the install.

    Returns:
        Whether the warning was logged.
    """
    if not sys.dont_write_bytecode:
        return False
    spec = importlib.util.find_spec("transformers")  # finds, does not import
    if spec is None or spec.origin is None:
        return False
    # A module every model load imports; its __init__ alone may have been cached by a CLI call.
    source = Path(spec.origin).with_name("modeling_utils.py")
    if not source.exists() or Path(importlib.util.cache_from_source(str(source))).exists():
        return False
    site_packages = Path(spec.origin).parents[1]
    logger.warning(
        "PYTHONDONTWRITEBYTECODE is set and transformers has no bytecode cache: every run "
        "will recompile it from source before loading the model. Compile it once: "
        "`%s -m compileall -q %s` (or install with `uv pip install --compile-bytecode`).",
        sys.executable,
        site_packages,
    )
    return True


warn_if_runs_recompile_transformers()
defs = build_definitions(DemoSettings.from_env())
