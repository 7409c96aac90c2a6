"""Run the code blocks of documentation pages in order, one page at a time, in this process.

Used by ``tests/test_docs.py`` in a subprocess of its own (``python -m tests.docs_runner
PLAN RESULTS``): the plan is a JSON list of pages, each with its working directory and its
blocks (language, first line, code, model ids already replaced by the test's checkpoint).
One process runs every page, so torch, LanceDB, Dagster and Airflow are imported once.

For each page: change into its working directory (a fresh copy of the fixture data), run its
blocks in document order with one namespace shared by the page's Python blocks (a page reads
like one session: a later block uses what an earlier one defined; ``__name__`` is
``"__main__"``, as for a script), then restore the environment and the directory. The first
failing block ends its page; the other pages still run. Results go to RESULTS as
``{page: null | "error text"}``.

Bash blocks run without a shell: each command is split with :mod:`shlex` (a quoted string or
a trailing backslash continues it on the next line; ``#`` starts a comment), ``$VAR`` is
expanded from the environment, then ``qwen3-pipeline ARGS`` calls
:func:`qwen3_pipeline.cli.main` in-process and must exit 0, and ``export NAME=VALUE`` sets an
environment variable. Any other command is an error: a block that needs one is marked
``<!-- skip: reason -->`` in the page.
"""

import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_STARTED = time.monotonic()


class BlockFailed(Exception):
    """A block raised, or a command failed."""


def run_bash(code: str) -> None:
    """Run the ``qwen3-pipeline`` and ``export`` commands of a bash block, in order."""
    for command in shell_commands(code):
        words = [os.path.expandvars(word) for word in command]
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                os.environ[name] = value
        elif words[0] == "qwen3-pipeline":
            from qwen3_pipeline.cli import main

            print(f"$ {shlex.join(words)}", flush=True)
            status = main(words[1:])
            sys.stdout.flush()
            if status != 0:
                raise BlockFailed(f"`{shlex.join(words)}` exited {status}")
        else:
            raise BlockFailed(
                f"`{words[0]}` is not run by the docs test (only qwen3-pipeline and export are);"
                " mark the block with <!-- skip: reason --> if it cannot run here"
            )


def shell_commands(code: str) -> list[list[str]]:
    """Split a bash block into commands (lists of words), joining continued lines."""
    commands: list[list[str]] = []
    pending = ""
    for line in code.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quotation: the string goes on on the next line
            continue
        if words:
            commands.append(words)
        pending = ""
    if pending.strip():
        raise BlockFailed(f"unterminated command: {pending!r}")
    return commands


def run_page(page: dict[str, Any]) -> str | None:
    """Run one page's blocks in its working directory; return None or the error."""
    namespace: dict[str, Any] = {"__name__": "__main__"}  # as `python page_block.py` runs it
    environ, cwd = dict(os.environ), os.getcwd()
    os.chdir(page["workdir"])
    block: dict[str, Any] = {}
    try:
        for block in page["blocks"]:
            elapsed = time.process_time()
            print(
                f"--- [{elapsed:6.1f}s] {page['name']}:{block['line']} ({block['lang']})",
                flush=True,
            )
            if block["lang"] == "python":
                exec(compile(block["code"], f"{page['name']}:{block['line']}", "exec"), namespace)
            else:
                run_bash(block["code"])
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        detail = "" if isinstance(e, BlockFailed) else traceback.format_exc()
        return f"the {block.get('lang')} block at {page['name']}:{block.get('line')}: {e}\n{detail}"
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    return None


def main(argv: list[str]) -> int:
    """Run every page of the plan (``argv[0]``); write the results to ``argv[1]``."""
    plan = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    results = {}
    for page in plan:
        results[page["name"]] = run_page(page)
        Path(argv[1]).write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
