"""Check that each test of ``tests/test_guarantees.py`` fails on the mutation it guards against.

Not a test module (pytest does not collect it). Run from the repository root::

    .venv/bin/python tests/mutation_check.py            # every mutation (~1-3 minutes)
    .venv/bin/python tests/mutation_check.py a1 b       # some of them

The working tree is never touched: the repository (without ``.venv``, ``data``, ``.git`` and
caches) is copied to a temporary directory; each mutation replaces one exact snippet of one file
there (the snippet must occur exactly once, so a refactor that moves the code makes the check
fail loudly instead of passing vacuously), the named test runs against the copy with
``PYTHONPATH`` pointing at it (checked: the copy's package is the one imported, not the
editable install), it must fail with the expected message, and the file is restored. The
unmutated copy must pass first. See ``tests/MUTATIONS.md`` for the list in prose.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_guarantees.py"
IGNORE = shutil.ignore_patterns(
    ".venv", "data", ".git", ".mypy_cache", ".import_linter_cache", ".ruff_cache", "__pycache__",
    "*.egg-info", ".pytest_cache",
)  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    test: str
    expect: str  # a piece of the failure output that shows the test failed for the right reason


MUTATIONS = [
    Mutation(
        "a1",
        "qwen3_pipeline/engine/chunk_writer.py",
        ".reshape(-1, dim)[source_rows]",
        ".reshape(-1, dim)[reused]",
        "test_reused_chunks_keep_the_vector_of_their_own_text_when_positions_shift",
        "holds a vector that is not its text's",
    ),
    Mutation(
        "a2",
        "qwen3_pipeline/engine/chunk_writer.py",
        'stored.column("embedded_at").to_numpy()[source_rows]',
        'stored.column("embedded_at").to_numpy()[reused]',
        "test_reused_chunks_keep_the_vector_of_their_own_text_when_positions_shift",
        "took the lineage of another stored chunk",
    ),
    Mutation(
        "a3",
        "qwen3_pipeline/engine/chunk_writer.py",
        'stored.column("n_tokens").to_numpy()[source_rows]',
        'stored.column("n_tokens").to_numpy()[reused]',
        "test_reused_chunks_keep_the_vector_of_their_own_text_when_positions_shift",
        "took the lineage of another stored chunk",
    ),
    Mutation(
        "b",
        "qwen3_pipeline/store/table.py",
        ".when_not_matched_by_source_delete(scope)",
        "",
        "test_a_document_that_shrinks_loses_its_trailing_chunks_in_the_same_commit",
        "mixes old and new chunks of document 1",
    ),
    Mutation(
        "c",
        "qwen3_pipeline/engine/plan.py",
        'scan.planned.add("deleted", delete_partitions)',
        'scan.planned.add("deleted", delete_partitions.slice('
        "0, len(delete_keys) - sum(len(b) for b in scan.blank_keys)))",
        "test_turning_most_rows_blank_is_refused_and_nothing_is_written",
        "DID NOT RAISE",
    ),
    Mutation(
        "d1",
        "qwen3_pipeline/engine/row_writer.py",
        "n_tokens[found] = reprojected.n_tokens",
        "n_tokens[found] = 0",
        "test_reprojected_rows_keep_n_tokens_truncated_and_the_donors_embedded_at",
        "assert (0, False) == (",
    ),
    Mutation(
        "d2",
        "qwen3_pipeline/engine/row_writer.py",
        "truncated[found] = reprojected.truncated",
        "truncated[found] = False",
        "test_reprojected_rows_keep_n_tokens_truncated_and_the_donors_embedded_at",
        ", False) == (",
    ),
    Mutation(
        "d3",
        "qwen3_pipeline/engine/row_writer.py",
        "stamps[found] = reprojected.embedded_at",
        "_unused = reprojected.embedded_at",
        "test_reprojected_rows_keep_n_tokens_truncated_and_the_donors_embedded_at",
        "got a new embedded_at",
    ),
    Mutation(
        "e1",
        "qwen3_pipeline/engine/reproject.py",
        "return min(candidates, key=lambda d: d.spec.output_dim)",
        "return max(candidates, key=lambda d: d.spec.output_dim)",
        "test_the_donor_is_the_smallest_table_at_least_as_large",
        "was not re-projected from the donor",
    ),
    Mutation(
        "e2",
        "qwen3_pipeline/engine/reproject.py",
        "return min(candidates, key=lambda d: d.spec.output_dim)",
        "return candidates[0]",
        "test_the_donor_is_the_smallest_table_at_least_as_large",
        "was not re-projected from the donor",
    ),
    Mutation(
        "e3",
        "qwen3_pipeline/engine/reproject.py",
        "if name == prefer:",
        "if False:",
        "test_an_in_place_rebuild_reprojects_from_the_live_table_first",
        "was not re-projected from the donor",
    ),
    Mutation(
        "e4",
        "qwen3_pipeline/engine/reproject.py",
        '_SAME_FIELDS = ("model", "revision", "max_length", ',
        '_SAME_FIELDS = ("model", "revision", ',
        "test_the_donor_is_the_smallest_table_at_least_as_large",
        "was not re-projected from the donor",
    ),
]


def _pytest(copy: Path, selector: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", selector, "-p", "no:cacheprovider", "-q"]
    command += ["-o", "addopts=", "-p", "no:randomly", "--no-header", "-x"]
    return subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    if names and len(chosen) != len(set(names)):
        print(f"unknown mutation(s); known: {[m.name for m in MUTATIONS]}")
        return 2
    with tempfile.TemporaryDirectory(prefix="qwen3-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        where = subprocess.run(
            [sys.executable, "-c", "import qwen3_pipeline; print(qwen3_pipeline.__file__)"],
            cwd=copy, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not where.startswith(str(copy)):
            print(f"the copy is not what gets imported ({where}); cannot check mutations")
            return 2
        baseline = _pytest(copy, TESTS)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:])
            print("the unmutated copy fails: fix the tests first")
            return 1
        failed = []
        for m in chosen:
            target = copy / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: snippet found {original.count(m.old)} times in {m.path}")
                failed.append(m.name)
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                result = _pytest(copy, f"{TESTS}::{m.test}")
            finally:
                target.write_text(original)
            output = result.stdout + result.stderr
            if result.returncode == 1 and m.expect in output:
                first = next((x for x in output.splitlines() if x.startswith("E ")), "")
                print(f"{m.name}: killed by {m.test}\n    {first}")
            else:
                verdict = "SURVIVED" if result.returncode == 0 else "failed for another reason"
                print(f"{m.name}: {verdict} (rc {result.returncode})\n{output[-2000:]}")
                failed.append(m.name)
    print(f"{len(chosen) - len(failed)}/{len(chosen)} mutations killed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
