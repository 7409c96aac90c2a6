"""Crash safety: SIGKILL a refresh at 100 random points, re-run it, check the table every time.

Three scenarios (see ``tests/refresh_helpers.build_scenarios``): ``initial`` (the table does
not exist yet; 3000 rows in chunks of 300), ``update`` (5% edits, 3% inserts, 3% deletes and
2% carry-only edits, in chunks of 40 rows; deletes in batches of 25 keys) and ``rebuild`` (the
same changes into a new spec, chunks of 300, swapped in at the end). A census run first
counts each scenario's embed calls and store operations; each kill point then picks, with a
seeded RNG, a scenario and one of:

- ``embed-N``: inside the N-th embed call (the chunk in flight is lost);
- ``before-OP-N`` / ``after-OP-N``: just before / after the N-th LanceDB call committing OP
  (``upsert``, ``update``, ``delete``, ``swap``, ``create``/``declare``/``index`` while creating
  a table; see ``COMMIT_OPS``);
- ``during-OP-N``: inside that call, as soon as a file it writes appears in the table's
  directory (``writing``: no new manifest yet; ``committed``: the manifest is there), or as it
  returns if no file was seen first (``returning``);
- ``time-Xms``: X ms after the refresh started (or at its end, if it ends sooner).

Each child records the phase it died in; the kill must have landed in the intended phase (a
child that exits otherwise is a failure). The refresh is then re-run to completion and the
table is compared with the independently computed expected state (no duplicate keys, nothing
lost or stale), and one more refresh must find nothing to do.

    python benchmarks/kill_bench.py                 # 100 kill points
    python benchmarks/kill_bench.py --points 20 --seed 3
"""

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.refresh_helpers import (  # noqa: E402
    COMMIT_OPS,
    FAULT_TABLE,
    KillPoint,
    Scenario,
    build_scenarios,
    child_census,
    fork_context,
    kill_and_recover,
)

SCENARIO_WEIGHTS = {"initial": 0.3, "update": 0.45, "rebuild": 0.25}
KIND_WEIGHTS = {"embed": 0.2, "before": 0.2, "after": 0.25, "during": 0.2, "time": 0.15}


def census(scenario: Scenario, workdir: Path) -> dict[str, Any]:
    db = workdir / f"census-{scenario.name}"
    if scenario.base is not None:
        shutil.copytree(scenario.base, db)
    ctx = fork_context()
    queue = ctx.Queue()
    process = ctx.Process(
        target=child_census,
        args=(str(db), FAULT_TABLE, scenario.source),
        kwargs={"dim": scenario.dim, "chunk_rows": scenario.chunk_rows, "rebuild": scenario.rebuild,
                "result": queue},
    )  # fmt: skip
    process.start()
    counts = queue.get(timeout=300)
    process.join()
    shutil.rmtree(db, ignore_errors=True)
    return counts


def draw(rng: np.random.Generator, censuses: dict[str, dict[str, Any]]) -> tuple[str, KillPoint]:
    names = list(SCENARIO_WEIGHTS)
    name = str(rng.choice(names, p=list(SCENARIO_WEIGHTS.values())))
    counts = censuses[name]
    kind = str(rng.choice(list(KIND_WEIGHTS), p=list(KIND_WEIGHTS.values())))
    if kind == "embed":
        return name, KillPoint("embed", int(rng.integers(1, counts["embed"] + 1)))
    if kind == "time":
        return name, KillPoint("time", delay_s=round(float(rng.uniform(0, counts["seconds"])), 3))
    ops = [op for op in COMMIT_OPS if counts.get(op)]
    op = str(rng.choice(ops))
    return name, KillPoint(kind, int(rng.integers(1, counts[op] + 1)), op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kill_bench_"))
    try:
        (workdir / "scenarios").mkdir()
        scenarios = build_scenarios(workdir / "scenarios", rows=args.rows)
        censuses = {name: census(s, workdir) for name, s in scenarios.items()}
        for name, counts in censuses.items():
            shown = ", ".join(f"{k}={v}" for k, v in counts.items() if k != "seconds")
            print(f"census {name:<8} {counts['seconds']:.1f}s: {shown}")
        rng = np.random.default_rng(args.seed)
        stages: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        by_scenario: Counter[str] = Counter()
        failures: list[str] = []
        rerun_share: list[float] = []
        for i in range(args.points):
            name, kill = draw(rng, censuses)
            point_dir = workdir / f"point-{i:03d}"
            point_dir.mkdir()
            label = f"{name}-{kill}"
            by_scenario[name] += 1
            try:
                facts = kill_and_recover(scenarios[name], kill, point_dir)
            except Exception as e:
                failures.append(f"{label}: {type(e).__name__}: {e}")
                traceback.print_exc()
                status = "FAILED"
                by_kind[kill.where]["failed"] += 1
            else:
                status = f"killed in {facts['phase']} ({facts['stage']})"
                stages[facts["stage"]] += 1
                by_kind[kill.where]["ok"] += 1
                full = scenarios[name].max_embedded
                rerun_share.append(facts["rerun_embedded"] / full if full else 0.0)
            shutil.rmtree(point_dir, ignore_errors=True)
            print(f"[{i + 1:3d}/{args.points}] {label:<28} {status}", flush=True)
        print("\nsummary")
        print(f"  kill points: {args.points}, each checked to land in its intended phase")
        print("  stages: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
        print("  by scenario: " + ", ".join(f"{k} {v}" for k, v in sorted(by_scenario.items())))
        for kind, counts in sorted(by_kind.items()):
            print(f"  {kind:<7} ok {counts['ok']:3d}  failed {counts['failed']}")
        print(f"  converged to the expected table with no duplicate keys: "
              f"{args.points - len(failures)}/{args.points}")  # fmt: skip
        if rerun_share:
            print(f"  re-run embedded on average {np.mean(rerun_share):.0%} of a full refresh's "
                  f"rows (committed chunks are not redone)")  # fmt: skip
        print(f"  total time {time.perf_counter() - started:.0f}s")
        for failure in failures:
            print(f"  FAILED {failure}")
        if failures:
            raise SystemExit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
