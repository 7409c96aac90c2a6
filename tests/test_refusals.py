"""Refusals that hold on every path (issue 17): a rebuild's swap is judged by the mass-delete
guard like any refresh, against the rows of the LIVE table it replaces."""

import json

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.cli import main
from qwen3_pipeline.core.errors import MassDeleteError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.engine.plan import guard_plan, plan_refresh
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import spec, table_rows, table_version

CONFIG = SourceConfig(key="id", text_columns=("body",))
TABLE = "docs"
LIVE_ROWS = 300


def rows(keys: range | list[int], *, blank: frozenset[int] = frozenset()) -> ArrowSource:
    keys = list(keys)
    bodies = ["  " if k in blank else f"Document {k} says something." for k in keys]
    return ArrowSource(
        pa.table({"id": pa.array(keys, pa.int64()), "body": pa.array(bodies, pa.string())})
    )


def run(db: str, source: ArrowSource, *, dim: int = 32, **options):  # type: ignore[no-untyped-def]
    return refresh(source=source, config=CONFIG, embedder=FakeEmbedder(spec(dim)), db_uri=db,
                   table=TABLE, progress=False, **options)  # fmt: skip


def tables(db: str) -> set[str]:
    return set(lancedb.connect(db).list_tables().tables)


@pytest.fixture
def live(tmp_path) -> str:
    db = str(tmp_path / "db")
    run(db, rows(range(LIVE_ROWS)))
    return db


@pytest.mark.parametrize("dim", [32, 64], ids=["same_spec", "new_spec"])
def test_a_rebuild_that_would_drop_most_live_rows_is_refused_until_allowed(live, dim):
    version, before = table_version(live, TABLE), tables(live)
    with pytest.raises(MassDeleteError, match=r"rebuild would drop 270 of the 300 row\(s\)") as e:
        run(live, rows(range(30)), dim=dim, rebuild=True)
    assert "--allow-mass-delete" in str(e.value)
    assert "Nothing was written" in str(e.value)
    assert table_version(live, TABLE) == version
    assert table_rows(live, TABLE).num_rows == LIVE_ROWS
    assert tables(live) == before  # not even a staging table
    allowed = run(live, rows(range(30)), dim=dim, rebuild=True, allow_mass_delete=True)
    assert allowed.committed
    assert table_rows(live, TABLE).num_rows == 30


def test_a_rebuild_from_an_empty_source_is_refused_until_allowed(live):
    version = table_version(live, TABLE)
    with pytest.raises(MassDeleteError, match=r"no rows .* holds 300 row\(s\)"):
        run(live, rows([]), rebuild=True, max_delete_share=1.0)
    assert table_version(live, TABLE) == version
    assert table_rows(live, TABLE).num_rows == LIVE_ROWS
    run(live, rows([]), rebuild=True, allow_mass_delete=True)
    assert table_rows(live, TABLE).num_rows == 0


def test_a_rebuild_counts_rows_turned_blank_and_lets_a_small_loss_through(live):
    # 200 blank + 10 absent of 300: 70% would be lost by the swap.
    source = rows(range(290), blank=frozenset(range(200)))
    with pytest.raises(MassDeleteError, match="drop 210 of the 300"):
        run(live, source, rebuild=True)
    with plan_refresh(source=rows(range(280)), config=CONFIG, embedder=FakeEmbedder(spec()),
                      db_uri=live, table=TABLE, rebuild=True, progress=False) as plan:  # fmt: skip
        assert (plan.live_rows, plan.live_rows_dropped) == (300, 20)
        data = plan.as_dict()
        assert (data["live_rows"], data["live_rows_dropped"]) == (300, 20)
        assert data["delete_share"] == pytest.approx(20 / 300, abs=1e-6)
        guard_plan(plan, plan_options())  # 6.7%: under the default 50%
    report = run(live, rows(range(280)), rebuild=True)
    assert table_rows(live, TABLE).num_rows == 280
    assert report.committed


def plan_options():  # type: ignore[no-untyped-def]
    from qwen3_pipeline.engine.options import RefreshOptions

    return RefreshOptions()


def test_cli_dry_run_of_a_rebuild_shows_the_refusal(tiny_model_dir, tmp_path, capsys):
    db = str(tmp_path / "db")
    model_spec = EmbeddingSpec(model=str(tiny_model_dir), dim=32)
    refresh(source=rows(range(LIVE_ROWS)), config=CONFIG, embedder=FakeEmbedder(model_spec),
            db_uri=db, table=TABLE, progress=False)  # fmt: skip
    version = table_version(db, TABLE)
    path = tmp_path / "s.parquet"

    def args(*extra: str) -> list[str]:
        return [
            "refresh", "--source", str(path), "--key", "id", "--text", "body", "--db", db,
            "--table", TABLE, "--model", str(tiny_model_dir), "--dim", "32", "--device", "cpu",
            "--rebuild", *extra,
        ]  # fmt: skip

    for keys, dropped in ((list(range(30)), 270), ([], 300)):
        bodies = pa.array([f"b {k}" for k in keys], pa.string())
        pq.write_table(pa.table({"id": pa.array(keys, pa.int64()), "body": bodies}), path)
        assert main(args("--dry-run")) == 2
        out, err = capsys.readouterr()
        plan = json.loads(out)
        assert plan["refused"] is not None
        assert (plan["live_rows"], plan["live_rows_dropped"]) == (LIVE_ROWS, dropped)
        assert "--allow-mass-delete" in plan["refused"]
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: {plan['refused']}"
        ]
        assert main(args()) == 2
        assert "--allow-mass-delete" in capsys.readouterr().err
        assert table_version(db, TABLE) == version
        assert table_rows(db, TABLE).num_rows == LIVE_ROWS
