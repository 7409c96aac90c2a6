"""The code blocks of README.md and docs/ run as written, so the documentation cannot go stale.

The convention (docs/contributing.md, *Code blocks in the docs*):

- every fenced block names its language; ```` ```python ```` and ```` ```bash ```` blocks are
  run, the others (``text`` for output and diagrams, ``yaml``, ``json``, ``toml``) are shown only;
- the blocks of one page run in document order in a fresh copy of a small fixture data
  directory (a DuckDB warehouse shaped like the one ``make demo`` builds, at
  ``data/warehouse.duckdb``, plus ``texts.txt``, ``questions.jsonl``, ``golden.jsonl``); its
  Python blocks share one namespace;
- the hub ids ``Qwen/Qwen3-Embedding-0.6B`` and ``Qwen/Qwen3-Embedding-4B`` are replaced by
  tiny random-weight checkpoints with the real tokenizer (hidden size 256), so a block written
  for the hub runs offline on CPU;
- a bash block runs its ``qwen3-pipeline`` commands in-process and its ``export`` lines (see
  :mod:`tests.docs_runner`); a block that cannot run here is preceded by
  ``<!-- skip: reason -->``, the reason saying why.

All pages run in one subprocess (torch, LanceDB, Dagster and Airflow are imported once).
"""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN = frozenset({"python", "bash"})
SHOWN = frozenset({"text", "yaml", "json", "toml"})
UPDATED_AT = "2025-01-01 00:00:00"
HUB_IDS = ("Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-4B")
QUICK_TOKENIZER_MERGES = 20_000  # as tests/conftest.py: loads ~3x faster, same vocabulary

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[^`\s]*)[^`]*$")
_SKIP = re.compile(r"^\s*<!--\s*skip(?P<colon>:)?(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    page: str
    line: int
    lang: str
    code: str
    skip: str | None  # the reason given in <!-- skip: reason -->, or None


@dataclass(frozen=True)
class SkipMarker:
    """A ``<!-- skip ... -->`` line and whether a code block follows it."""

    page: str
    line: int
    reason: str
    before_block: bool


def page_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def read_page(path: Path) -> tuple[list[Block], list[SkipMarker]]:
    """The fenced blocks of a Markdown page, and its skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = page_name(path)
    blocks: list[Block] = []
    markers: list[SkipMarker] = []
    skip: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        marker, fence = _SKIP.match(lines[i]), _FENCE.match(lines[i])
        if marker:
            if skip is not None:
                markers.append(SkipMarker(name, skip[0], skip[1], before_block=False))
            reason = marker.group("reason").strip() if marker.group("colon") else ""
            skip = (i + 1, reason)
        elif fence:
            indent, close = fence.group("indent"), fence.group("fence")
            end = i + 1
            while end < len(lines) and lines[end].strip() != close:
                end += 1
            code = "\n".join(_dedent(line, indent) for line in lines[i + 1 : end])
            reason = skip[1] if skip is not None else None
            if skip is not None:
                markers.append(SkipMarker(name, skip[0], skip[1], before_block=True))
            blocks.append(Block(name, i + 1, fence.group("info").lower(), code + "\n", reason))
            skip = None
            i = end
        elif lines[i].strip() and skip is not None:
            markers.append(SkipMarker(name, skip[0], skip[1], before_block=False))
            skip = None
        i += 1
    if skip is not None:
        markers.append(SkipMarker(name, skip[0], skip[1], before_block=False))
    return blocks, markers


def _dedent(line: str, indent: str) -> str:
    return line[len(indent) :] if line.startswith(indent) else line.lstrip()


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in read_page(page)[0]]


# --------------------------------------------------------------------------- the convention


def test_the_docs_site_and_the_readme_have_pages() -> None:
    assert (REPO / "mkdocs.yml").is_file()
    assert len(PAGES) > 10
    assert any(block.lang in RUN and block.skip is None for block in all_blocks())


def test_every_block_names_a_known_language() -> None:
    unknown = [f"{b.page}:{b.line} ```{b.lang}" for b in all_blocks() if b.lang not in RUN | SHOWN]
    assert not unknown, (
        f"fenced blocks must be one of {sorted(RUN | SHOWN)} (python and bash run; use text "
        f"for output and diagrams): {unknown}"
    )


def test_every_skip_gives_a_reason_and_precedes_a_block() -> None:
    markers = [m for page in PAGES for m in read_page(page)[1]]
    bad = [f"{m.page}:{m.line}" for m in markers if not m.reason or not m.before_block]
    assert not bad, "write <!-- skip: why it cannot run here --> right before a code block: " + (
        ", ".join(bad)
    )
    shown_only = [
        f"{b.page}:{b.line}" for b in all_blocks() if b.skip is not None and b.lang not in RUN
    ]
    assert not shown_only, f"only python and bash blocks run, nothing to skip: {shown_only}"


def test_the_readme_is_a_front_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    assert "make demo" in readme
    assert "make test" in readme
    for page in (REPO / "docs").rglob("*.md"):
        if page.parent.name != "api" and page.name != "index.md":
            assert page.relative_to(REPO).as_posix() in readme, f"README links no {page}"


def test_the_architecture_page_maps_every_package_and_module() -> None:
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = REPO / "qwen3_pipeline"
    names = [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    names += [p.name for p in package.glob("*.py")]
    missing = [name for name in sorted(names) if name not in page]
    assert not missing, f"docs/architecture.md's module map does not name {missing}"


# --------------------------------------------------------------------------- running them


def _write_fixture_data(root: Path) -> None:
    """A small DuckDB warehouse shaped like the demo's, and the input files the pages read."""
    import duckdb

    # Short documents as the demo's (a title and a summary), a few long ones for chunking:
    # the tiny model's forward passes are most of the test's time.
    rows = []
    for obj in _documented_objects():
        kind = (
            "module" if inspect.ismodule(obj) else "class" if inspect.isclass(obj) else "function"
        )
        module = obj.__name__ if inspect.ismodule(obj) else obj.__module__
        doc = inspect.getdoc(obj) or ""
        rows.append([_doc_id(obj), _title(obj), module, kind, _title(obj), doc, UPDATED_AT])
    (root / "data").mkdir(parents=True)
    con = duckdb.connect(str(root / "data" / "warehouse.duckdb"))
    try:
        columns = "doc_id VARCHAR, title VARCHAR, module VARCHAR, kind VARCHAR, text VARCHAR"
        for table in ("documents", "long_documents"):
            con.execute(f"CREATE TABLE main.{table} ({columns}, updated_at TIMESTAMP)")
        con.executemany(
            "INSERT INTO main.documents SELECT $1, $2, $3, $4, "
            "$5 || chr(10) || chr(10) || left(split_part($6, chr(10) || chr(10), 1), 300), $7",
            rows,
        )
        con.executemany(
            "INSERT INTO main.long_documents SELECT $1, $2, $3, $4, "
            "$5 || chr(10) || chr(10) || left($6, 2000), $7 WHERE length($6) >= 1000",
            rows,
        )
    finally:
        con.close()
    (root / "texts.txt").write_text(
        "Beijing is the capital of China.\nParse a date string into a datetime.\n"
    )
    (root / "questions.jsonl").write_text(
        '{"text": "What is the capital of China?"}\n{"text": "How do I parse a date?"}\n'
    )
    golden = [
        {"query": "serialize an object to a JSON string", "relevant": ["json:dumps"]},
        {"query": "join path components", "relevant": ["posixpath:join"]},
    ]
    (root / "golden.jsonl").write_text("".join(json.dumps(g) + "\n" for g in golden))


def _documented_objects() -> list[object]:
    """Standard-library objects whose docstrings stand in for the demo's documents."""
    import argparse
    import collections
    import csv
    import functools
    import heapq
    import itertools
    import json
    import logging
    import os
    import re
    import shutil
    import textwrap
    import time

    return [
        argparse, csv, heapq, logging, json, json.dumps, json.loads, os.path.join, os.walk,
        shutil.copytree, time.strptime, time.strftime, re.sub,
        textwrap.dedent, functools.lru_cache, itertools.groupby, collections.Counter,
    ]  # fmt: skip


def _title(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or obj.__name__)


def _doc_id(obj: object) -> str:
    """The demo's key form: ``module:qualname`` (``module:`` for a module docstring)."""
    if inspect.ismodule(obj):
        return f"{obj.__name__}:"
    return f"{getattr(obj, '__module__', '')}:{_title(obj)}"


def _quick_copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    tokenizer = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:QUICK_TOKENIZER_MERGES]
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    return dest


def _with_local_models(code: str, models: dict[str, Path]) -> str:
    for hub_id, local in models.items():
        code = code.replace(hub_id, str(local))
    return code


def test_code_blocks_of_the_docs_run(tmp_path: Path, tiny_model_256_dir: Path) -> None:
    models = {
        HUB_IDS[0]: _quick_copy(tiny_model_256_dir, tmp_path / "models" / "qwen3-0.6b"),
        HUB_IDS[1]: _quick_copy(tiny_model_256_dir, tmp_path / "models" / "qwen3-4b"),
    }
    fixture = tmp_path / "fixture"
    _write_fixture_data(fixture)
    plan = []
    for path in PAGES:
        blocks = [b for b in read_page(path)[0] if b.lang in RUN and b.skip is None]
        if not blocks:
            continue
        workdir = tmp_path / "pages" / page_name(path).replace("/", "__")
        shutil.copytree(fixture, workdir)
        plan.append(
            {
                "name": page_name(path),
                "workdir": str(workdir),
                "blocks": [
                    {"lang": b.lang, "line": b.line, "code": _with_local_models(b.code, models)}
                    for b in blocks
                ],
            }
        )
    plan_file, results_file = tmp_path / "plan.json", tmp_path / "results.json"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWEN3_", "DAGSTER_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # The tiny model's matmuls gain nothing from threads; on a busy machine torch's
            # spinning worker threads doubled the CPU time of the run.
            "OMP_NUM_THREADS": "1",
        }
    )
    log_file = tmp_path / "runner.log"  # every block's output, with CPU seconds per block
    with log_file.open("w", encoding="utf-8") as log_out:
        done = subprocess.run(
            [sys.executable, "-m", "tests.docs_runner", str(plan_file), str(results_file)],
            cwd=tmp_path,
            env=env,
            stdout=log_out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    log = log_file.read_text(encoding="utf-8", errors="replace")[-6000:]
    assert done.returncode == 0, log
    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert set(results) == {page["name"] for page in plan}, log
    failed = {name: error for name, error in results.items() if error}
    assert not failed, "\n\n".join(f"{name}: {error}" for name, error in failed.items()) + (
        f"\n\nlog tail:\n{log}"
    )
