"""Model lifecycle: re-projection instead of re-inference, lazy model loads, updated_at-only edits.

Re-projection is checked on the real tiny Qwen3 checkpoint (hidden size 256): vectors derived
from a dim-256 table by slicing and re-normalising equal a fresh embedding at dim 64.
"""

import datetime as dt
import json
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen3_pipeline.cli import main
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.encoder import Qwen3Encoder
from qwen3_pipeline.engine.refresh import refresh
from qwen3_pipeline.engine.reproject import can_reproject, project
from qwen3_pipeline.sources import ArrowSource, SourceConfig
from qwen3_pipeline.testing import FakeEmbedder
from tests.refresh_helpers import no_drift_guard

CONFIG = SourceConfig(key="id", text_columns=("body",))
TEXTS = [
    f"Document {i}: {' '.join(['the quick brown fox', 'jumps over', 'a lazy dog'][: i % 3 + 1])}"
    for i in range(40)
]


def source(texts: list[str]) -> ArrowSource:
    return ArrowSource(pa.table({"id": list(range(len(texts))), "body": texts}))


def vectors_of(db: Path, table: str) -> tuple[list[int], np.ndarray]:
    rows = lancedb.connect(str(db)).open_table(table).to_arrow().sort_by("key")
    return rows["key"].to_pylist(), np.stack(rows["vector"].to_numpy(zero_copy_only=False))


# --------------------------------------------------------------------------- re-projection


def test_can_reproject_needs_the_same_model_settings_and_a_smaller_dim():
    big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=1024)
    assert can_reproject(EmbeddingSpec(model=big.model, dim=256), big)
    assert can_reproject(big, big)
    assert not can_reproject(EmbeddingSpec(model=big.model, dim=256, max_length=512), big)
    assert not can_reproject(EmbeddingSpec(model="Qwen/Qwen3-Embedding-4B", dim=256), big)
    assert not can_reproject(EmbeddingSpec(model=big.model, dim=256, document_prompt="x"), big)
    chunked = EmbeddingSpec(model=big.model, dim=256).with_chunking('{"tokens":64}')
    assert not can_reproject(chunked, big.with_chunking('{"tokens":64}'))


def test_project_slices_and_renormalises():
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    assert np.allclose(project(v, 2, normalize=True), [[0.6, 0.8]])
    assert np.allclose(project(v, 2, normalize=False), [[3.0, 4.0]])


def test_in_place_rebuild_to_a_smaller_dim_reprojects_without_the_model(
    tiny_model_256_dir, tmp_path
):
    db = tmp_path / "db"
    full = EmbeddingSpec(model=str(tiny_model_256_dir), dim=256)
    small = EmbeddingSpec(model=str(tiny_model_256_dir), dim=64)
    encoder = Qwen3Encoder(full, device="cpu", progress=False)
    first = refresh(source=source(TEXTS), config=CONFIG, embedder=encoder, db_uri=str(db),
                    table="docs", progress=False)  # fmt: skip
    assert first.embedded_rows == len(TEXTS)
    edited = [*TEXTS]
    edited[5] = "A document rewritten while the dimension changes."
    fake = FakeEmbedder(small)  # would write wrong vectors: it must only see the edited row
    report = refresh(source=source(edited), config=CONFIG, embedder=fake, db_uri=str(db),
                     table="docs", rebuild=True, progress=False,
                     drift_guard=no_drift_guard)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, fake.calls) == (len(TEXTS) - 1, 1, [1])
    assert report.counters()["reprojected"] == len(TEXTS) - 1
    keys, stored = vectors_of(db, "docs")
    fresh = Qwen3Encoder(small, device="cpu", progress=False).embed_documents(edited).vectors
    cosines = np.sum(stored * fresh[keys], axis=1)
    kept = [k for k in keys if k != 5]
    assert cosines[kept].min() >= 0.99999
    table = lancedb.connect(str(db)).open_table("docs").to_arrow()
    assert set(table["spec_fingerprint"].to_pylist()) == {small.fingerprint}
    assert set(table["dim"].to_pylist()) == {64}


def test_a_second_table_at_a_smaller_dim_is_filled_from_the_first(tiny_model_256_dir, tmp_path):
    db = str(tmp_path / "db")
    full = EmbeddingSpec(model=str(tiny_model_256_dir), dim=256)
    small = EmbeddingSpec(model=str(tiny_model_256_dir), dim=32)
    encoder = Qwen3Encoder(full, device="cpu", progress=False)
    refresh(source=source(TEXTS), config=CONFIG, embedder=encoder, db_uri=db, table="docs_256",
            progress=False)  # fmt: skip
    # The same model at dim 32 (a fake would not reproduce docs_256's canaries: no donor).
    small_encoder = Qwen3Encoder(small, device="cpu", progress=False)
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=small_encoder, db_uri=db,
                     table="docs_32", progress=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, report.warnings) == (len(TEXTS), 0, [])
    # Kept in sync afterwards: an edit embedded into the big table is re-projected into the small.
    edited = [*TEXTS]
    edited[0] = "An edited first document."
    big_run = refresh(source=source(edited), config=CONFIG, embedder=encoder, db_uri=db,
                      table="docs_256", progress=False)  # fmt: skip
    assert big_run.updated == 1
    small_run = refresh(source=source(edited), config=CONFIG, embedder=small_encoder, db_uri=db,
                        table="docs_32", progress=False)  # fmt: skip
    assert (small_run.updated, small_run.reprojected, small_run.embedded_rows) == (1, 1, 0)
    keys, stored = vectors_of(tmp_path / "db", "docs_32")
    fresh = Qwen3Encoder(small, device="cpu", progress=False).embed_documents(edited).vectors
    assert np.sum(stored * fresh[keys], axis=1).min() >= 0.99999


def test_reproject_can_be_turned_off(tmp_path):
    db = str(tmp_path / "db")
    big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=128)
    small = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(big), db_uri=db,
            table="big", progress=False)  # fmt: skip
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(small),
                     db_uri=db, table="small", progress=False, reproject=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows) == (0, len(TEXTS))


def _write_docs(db: str, table: str, spec: EmbeddingSpec) -> None:
    refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(spec), db_uri=db,
            table=table, progress=False)  # fmt: skip


def test_a_donor_that_cannot_be_read_is_a_warning_of_the_report(tmp_path):
    db = str(tmp_path / "db")
    big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    small = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    _write_docs(db, "docs_64", big)
    for data_file in (tmp_path / "db" / "docs_64.lance" / "data").iterdir():
        data_file.unlink()  # lost by the object store: the donor's rows cannot be read
    fake = FakeEmbedder(small)
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=fake, db_uri=db,
                     table="docs_32", progress=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, report.inserted) == (0, 40, 40)
    (warning,) = report.warnings
    assert "stopped re-projecting from table 'docs_64'" in warning
    assert "embedded by the model instead" in warning
    assert report.as_dict()["warnings"] == [warning]


def test_a_table_whose_spec_cannot_be_read_is_passed_over_with_a_warning(tmp_path):
    from qwen3_pipeline.core.schema import META_SPEC

    db = str(tmp_path / "db")
    schema = pa.schema([pa.field("key", pa.int64())], metadata={META_SPEC: "{not json"})
    lancedb.connect(db).create_table("damaged", schema=schema)
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(spec),
                     db_uri=db, table="docs", progress=False)  # fmt: skip
    assert (report.inserted, report.reprojected) == (40, 0)
    (warning,) = report.warnings
    assert "table 'damaged' was not considered for re-projection" in warning


# --------------------------------------------------------------------------- lazy model load


def test_a_cli_refresh_with_nothing_to_embed_never_loads_the_model(
    tiny_model_dir, tmp_path, capsys
):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["one text", "another text"]}), path)
    args = [
        "refresh", "--source", str(path), "--key", "id", "--text", "body",
        "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_dir),
        "--dim", "32", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["model_loaded"], first["model_loads"]) == (True, 1)
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["model_loaded"], again["model_loads"], again["unchanged"]) == (False, 0, 2)


# --------------------------------------------------------------------------- updated_at only


def test_an_updated_at_only_change_updates_lineage_without_the_model(tmp_path):
    config = SourceConfig(key="id", text_columns=("body",), updated_at="ts")
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)

    def run(second: dt.datetime) -> tuple[dict[str, int], list[int]]:
        stamps = pa.array([dt.datetime(2024, 1, 1), second], pa.timestamp("us"))
        rows = pa.table({"id": [1, 2], "body": ["a b", "c d"], "ts": stamps})
        fake = FakeEmbedder(spec)
        report = refresh(source=ArrowSource(rows), config=config, embedder=fake,
                         db_uri=str(tmp_path), table="t", progress=False)  # fmt: skip
        return report.counters(), fake.calls

    run(dt.datetime(2024, 1, 1))
    counts, calls = run(dt.datetime(2024, 1, 1))
    assert (counts["unchanged"], calls) == (2, [])
    counts, calls = run(dt.datetime(2024, 2, 1))
    assert (counts["carry_updated"], counts["unchanged"], counts["embedded"], calls) == (
        1,
        1,
        0,
        [],
    )
    stored = lancedb.connect(str(tmp_path)).open_table("t").to_arrow().sort_by("key")
    assert stored["source_updated_at"][1].as_py() == dt.datetime(2024, 2, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("dim", [32])
def test_report_says_reprojected_in_the_cli_json(tmp_path, tiny_model_256_dir, capsys, dim):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "body": TEXTS[:6]}), path)
    base = [
        "refresh", "--source", str(path), "--key", "id", "--text", "body",
        "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_256_dir),
        "--device", "cpu",
    ]  # fmt: skip
    assert main([*base, "--dim", "128"]) == 0
    capsys.readouterr()
    assert main([*base, "--dim", str(dim), "--rebuild"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The model is loaded (once) to verify the donor's canaries, yet embeds no row.
    assert (report["reprojected"], report["embedded_rows"], report["model_loaded"]) == (6, 0, True)
    assert report["model_loads"] == 1


# --------------------------------------------------------------------------- drift canary


def _perturb_weights(model_dir: Path, scale: float = 0.05) -> None:
    """Change the checkpoint's weights in place, under the same path (a silent re-upload)."""
    import torch  # the checkpoint is bf16, which numpy cannot hold
    from safetensors.torch import load_file, save_file

    (path,) = model_dir.glob("*.safetensors")
    generator = torch.Generator().manual_seed(0)
    weights = load_file(str(path))
    for name, value in weights.items():
        if value.is_floating_point() and value.ndim == 2:
            noise = torch.randn(value.shape, generator=generator) * value.float().std() * scale
            weights[name] = (value.float() + noise).to(value.dtype)
    save_file(weights, str(path), metadata={"format": "pt"})


def test_changed_weights_under_the_same_path_are_refused_then_accepted(
    tiny_model_dir, tmp_path, capsys
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = tmp_path / "s.parquet"
    texts = [f"Canary test document {i} about topic {i % 5}." for i in range(12)]

    def args(*extra: str) -> list[str]:
        return [
            "refresh", "--source", str(path), "--key", "id", "--text", "body",
            "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(model),
            "--dim", "32", "--device", "cpu", *extra,
        ]  # fmt: skip

    def write(bodies: list[str]) -> None:
        pq.write_table(pa.table({"id": list(range(len(bodies))), "body": bodies}), path)

    write(texts)
    assert main(args()) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["canaries_recorded"] >= 16 + 1  # the fixed texts plus a sample of the table
    canaries = lancedb.connect(str(tmp_path / "db")).open_table("docs__canary").to_arrow()
    assert set(canaries["kind"].to_pylist()) == {"fixed", "sample"}

    texts[0] = "An edited document, embedded by the same model."
    write(texts)
    assert main(args()) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["canary_min_cosine"] >= 0.99999
    assert same["drift_accepted"] is False

    _perturb_weights(model)
    texts[1] = "An edited document, to be embedded by changed weights."
    write(texts)
    version = lancedb.connect(str(tmp_path / "db")).open_table("docs").version
    assert main(args()) == 2
    err = capsys.readouterr().err
    assert "no longer reproduces" in err
    assert "--accept-drift" in err
    assert lancedb.connect(str(tmp_path / "db")).open_table("docs").version == version

    assert main(args("--accept-drift")) == 0
    accepted = json.loads(capsys.readouterr().out)
    assert accepted["drift_accepted"] is True
    assert accepted["canary_min_cosine"] < 0.999
    assert accepted["canaries_recorded"] > 0
    canaries = lancedb.connect(str(tmp_path / "db")).open_table("docs__canary").to_arrow()
    assert set(canaries["accepted_drift"].to_pylist()) == {True}
    assert set(canaries["run_id"].to_pylist()) == {accepted["run_id"]}

    texts[2] = "Another edit, after the drift was accepted."
    write(texts)
    assert main(args()) == 0
    after = json.loads(capsys.readouterr().out)
    assert (after["drift_accepted"], after["canary_min_cosine"] >= 0.99999) == (False, True)


class _Salted(FakeEmbedder):
    """A fake whose vectors depend on a 'weights' salt, flagged as the old opt-out was."""

    deterministic = True  # what used to turn the guard off: no flag of an embedder does now

    def __init__(self, spec: EmbeddingSpec, salt: str) -> None:
        super().__init__(spec)
        self.salt = salt

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        return super().embed_documents([f"{self.salt}{t}" for t in texts], on_batch=on_batch)


def test_the_drift_guard_runs_for_every_embedder_and_is_replaced_only_by_injection(tmp_path):
    from qwen3_pipeline.core.errors import EmbeddingDriftError
    from qwen3_pipeline.engine.canary import DriftGuard
    from qwen3_pipeline.engine.options import RefreshOptions

    assert RefreshOptions().drift_guard is DriftGuard
    db = str(tmp_path / "db")
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)

    def run(texts, embedder, **options):  # type: ignore[no-untyped-def]
        return refresh(source=source(texts), config=CONFIG, embedder=embedder, db_uri=db,
                       table="docs", progress=False, **options)  # fmt: skip

    first = run(TEXTS, FakeEmbedder(spec))  # the fake is guarded too: canaries recorded
    assert first.canaries_recorded >= 16
    assert "docs__canary" in lancedb.connect(db).list_tables().tables
    edited = [*TEXTS]
    edited[0] = "An edited document."
    same = run(edited, _Salted(spec, ""))  # same vectors: the canaries pass
    assert (same.canary_min_cosine or 0.0) >= 0.99999
    edited[1] = "Another edited document."
    version = lancedb.connect(db).open_table("docs").version
    with pytest.raises(EmbeddingDriftError, match="no longer reproduces"):
        run(edited, _Salted(spec, "new weights "))
    assert lancedb.connect(db).open_table("docs").version == version
    # Only the caller that builds the options can replace the guard (here: with none).
    unguarded = run(edited, _Salted(spec, "new weights "), drift_guard=no_drift_guard)
    assert (unguarded.updated, unguarded.canary_min_cosine) == (1, None)


def test_canaries_that_cannot_be_recorded_are_a_warning_of_the_report(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / "docs__canary.lance").write_text("a file where the canary table would be")
    spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(spec),
                     db_uri=str(db), table="docs", progress=False)  # fmt: skip
    assert (report.inserted, report.committed, report.canaries_recorded) == (40, True, 0)
    (warning,) = [w for w in report.warnings if "canaries" in w]
    assert "drift canaries of table 'docs' were not recorded" in warning
    assert "warning(s)" in report.summary()


# ------------------------------------------------- re-projection needs a donor the model reproduces


def test_a_rebuild_after_drift_embeds_every_row_and_never_reprojects(
    tiny_model_dir, tmp_path, capsys
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = tmp_path / "s.parquet"
    texts = [f"Drift test document {i} about topic {i % 5}." for i in range(12)]
    pq.write_table(pa.table({"id": list(range(12)), "body": texts}), path)
    db = tmp_path / "db"
    args = [
        "refresh", "--source", str(path), "--key", "id", "--text", "body", "--db", str(db),
        "--table", "docs", "--model", str(model), "--dim", "32", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    _perturb_weights(model)
    # The advised way out of the drift: a rebuild, with no edit to the source.
    assert main([*args, "--rebuild"]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert (rebuilt["reprojected"], rebuilt["embedded_rows"]) == (0, 12)
    assert rebuilt["model_loaded"] is True
    (warning,) = [w for w in rebuilt["warnings"] if "re-projection" in w]
    assert "'docs'" in warning
    assert "minimum cosine" in warning
    # Every stored vector is the new weights' own.
    keys, stored = vectors_of(db, "docs")
    fresh = Qwen3Encoder(EmbeddingSpec(model=str(model), dim=32), device="cpu", progress=False)
    want = fresh.embed_documents([texts[k] for k in keys]).vectors
    assert np.sum(stored * want, axis=1).min() >= 0.9999
    # The canaries now describe the new weights: an edit is embedded without a drift error.
    texts[0] = "An edit after the rebuild."
    pq.write_table(pa.table({"id": list(range(12)), "body": texts}), path)
    assert main(args) == 0
    after = json.loads(capsys.readouterr().out)
    assert (after["updated"], after["drift_accepted"]) == (1, False)
    assert after["canary_min_cosine"] >= 0.9999


class _CtrlC:
    """Wraps an embedder; Ctrl-C (KeyboardInterrupt) lands in the call that embeds ``text``."""

    def __init__(self, embedder: Qwen3Encoder, text: str) -> None:
        self.embedder = embedder
        self.text = text

    @property
    def spec(self) -> EmbeddingSpec:
        return self.embedder.spec

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        if self.text in texts:
            raise KeyboardInterrupt
        return self.embedder.embed_documents(texts, on_batch=on_batch)

    def embed_queries(self, queries):  # type: ignore[no-untyped-def]
        return self.embedder.embed_queries(queries)


def test_a_first_fill_interrupted_then_run_by_changed_weights_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from qwen3_pipeline.core.errors import EmbeddingDriftError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    db = str(tmp_path / "db")
    model_spec = EmbeddingSpec(model=str(model), dim=32)

    def run(embedder):  # type: ignore[no-untyped-def]
        return refresh(source=source(TEXTS[:20]), config=CONFIG, embedder=embedder, db_uri=db,
                       table="docs", chunk_rows=4, progress=False)  # fmt: skip

    encoder = Qwen3Encoder(model_spec, device="cpu", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(_CtrlC(encoder, TEXTS[10]))  # Ctrl-C in the third chunk
    # The first chunk is committed; the second, embedded while the first was written, is
    # committed too unless the interrupt came before its commit began (the pipelined apply
    # finishes the commit in progress, and starts none after an interrupt).
    assert lancedb.connect(db).open_table("docs").count_rows() in (4, 8)
    _perturb_weights(model)
    version = lancedb.connect(db).open_table("docs").version
    with pytest.raises(EmbeddingDriftError, match="no longer reproduces"):
        run(Qwen3Encoder(model_spec, device="cpu", progress=False))
    assert lancedb.connect(db).open_table("docs").version == version


class _StopAt(FakeEmbedder):
    """A fake interrupted (Ctrl-C) in the call that embeds ``text``."""

    def __init__(self, spec: EmbeddingSpec, text: str) -> None:
        super().__init__(spec)
        self.text = text

    def embed_documents(self, texts, *, on_batch=None):  # type: ignore[no-untyped-def]
        if self.text in texts:
            raise KeyboardInterrupt
        return super().embed_documents(texts, on_batch=on_batch)


def test_a_resumed_rebuild_is_checked_against_its_staging_tables_canaries(tmp_path):
    from qwen3_pipeline.core.errors import EmbeddingDriftError
    from qwen3_pipeline.core.schema import rebuild_table_name

    db = str(tmp_path / "db")
    old = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    new = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)

    def rebuild(embedder):  # type: ignore[no-untyped-def]
        return refresh(source=source(TEXTS), config=CONFIG, embedder=embedder, db_uri=db,
                       table="docs", rebuild=True, chunk_rows=8, progress=False)  # fmt: skip

    refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(old), db_uri=db,
            table="docs", progress=False)  # fmt: skip
    staging = rebuild_table_name("docs", new)
    with pytest.raises(KeyboardInterrupt):
        rebuild(_StopAt(new, TEXTS[20]))  # one or two chunks of the staging table committed
    assert f"{staging}__canary" in lancedb.connect(db).list_tables().tables
    # Resumed by other weights: refused, the staging table would mix two models.
    with pytest.raises(EmbeddingDriftError, match="drop the staging table"):
        rebuild(_Salted(new, "new weights "))
    # Resumed by the same weights: completed and swapped; the canaries go with it.
    report = rebuild(FakeEmbedder(new))
    assert report.committed
    assert report.inserted in (len(TEXTS) - 16, len(TEXTS) - 8)  # see the interrupt above
    tables = set(lancedb.connect(db).list_tables().tables)
    assert staging not in tables
    assert f"{staging}__canary" not in tables
    canaries = lancedb.connect(db).open_table("docs__canary").to_arrow()
    assert set(canaries["spec_fingerprint"].to_pylist()) == {new.fingerprint}


def test_a_donor_without_canaries_or_from_other_weights_is_not_used(tmp_path):
    db = str(tmp_path / "db")
    big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    small = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    # docs_64 was filled by other weights than the model now loaded.
    refresh(source=source(TEXTS), config=CONFIG, embedder=_Salted(big, "old weights "),
            db_uri=db, table="docs_64", progress=False)  # fmt: skip
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(small),
                     db_uri=db, table="docs_32", progress=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, report.inserted) == (0, 40, 40)
    (warning,) = report.warnings
    assert "table 'docs_64' is not used for re-projection" in warning
    assert "minimum cosine" in warning
    keys, stored = vectors_of(tmp_path / "db", "docs_32")
    assert np.allclose(
        stored, FakeEmbedder(small).embed_documents([TEXTS[k] for k in keys]).vectors
    )

    # A donor with no canaries cannot show where its vectors came from: not used either.
    other = str(tmp_path / "other")
    refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(big), db_uri=other,
            table="docs_64", progress=False)  # fmt: skip
    lancedb.connect(other).drop_table("docs_64__canary")
    fresh = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(small),
                    db_uri=other, table="docs_32", progress=False)  # fmt: skip
    assert (fresh.reprojected, fresh.embedded_rows) == (0, 40)
    (warning,) = fresh.warnings
    assert "table 'docs_64' is not used for re-projection" in warning
    assert "no drift canaries" in warning

    # A donor whose drift was accepted holds the vectors of two models (its canaries, of the
    # new one, would pass): not used either, until it is rebuilt.
    mixed = str(tmp_path / "mixed")
    refresh(source=source(TEXTS), config=CONFIG, embedder=_Salted(big, "old weights "),
            db_uri=mixed, table="docs_64", progress=False)  # fmt: skip
    edited = [*TEXTS]
    edited[0] = "One row embedded by the new weights."
    accepted = refresh(source=source(edited), config=CONFIG, embedder=FakeEmbedder(big),
                       db_uri=mixed, table="docs_64", accept_drift=True,
                       progress=False)  # fmt: skip
    assert (accepted.drift_accepted, accepted.updated) == (True, 1)
    report = refresh(source=source(edited), config=CONFIG, embedder=FakeEmbedder(small),
                     db_uri=mixed, table="docs_32", progress=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows) == (0, 40)
    (warning,) = report.warnings
    assert "table 'docs_64' is not used for re-projection" in warning
    assert "accepted drift" in warning


def test_a_verified_donor_is_reprojected_and_the_new_table_gets_canaries(tmp_path):
    from qwen3_pipeline.core.errors import EmbeddingDriftError

    db = str(tmp_path / "db")
    big = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    small = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32)
    refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(big), db_uri=db,
            table="docs_64", progress=False)  # fmt: skip
    report = refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(small),
                     db_uri=db, table="docs_32", progress=False)  # fmt: skip
    assert (report.reprojected, report.embedded_rows, report.warnings) == (40, 0, [])
    assert report.canaries_recorded >= 16  # filled without embedding a row, guarded all the same
    edited = [*TEXTS]
    edited[0] = "An edit embedded by other weights."
    with pytest.raises(EmbeddingDriftError, match="docs_32"):
        refresh(source=source(edited), config=CONFIG, embedder=_Salted(small, "new weights "),
                db_uri=db, table="docs_32", progress=False)  # fmt: skip


# --------------------------------------------------------------------------- gated rebuilds


class _Mirror(FakeEmbedder):
    """Embeds a query exactly like a document of the same text, so it finds that document."""

    def embed_queries(self, queries):  # type: ignore[no-untyped-def]
        return self.embed_documents(queries)


def test_a_gated_rebuild_swaps_only_a_better_table(tmp_path):
    from qwen3_pipeline.lifecycle.gate import GateConfig
    from qwen3_pipeline.lifecycle.golden import parse_golden_set

    db = str(tmp_path / "db")
    mirror_spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=64)
    plain_spec = EmbeddingSpec(model="Qwen/Qwen3-Embedding-0.6B", dim=32, max_length=4096)
    golden = parse_golden_set(
        [json.dumps({"query": TEXTS[i], "relevant": [i]}) for i in (0, 7, 19, 33)]
    )

    def rebuild(embedder, live_embedder):  # type: ignore[no-untyped-def]
        gate = GateConfig(golden=golden, k=3, live_embedder=live_embedder)
        return refresh(source=source(TEXTS), config=CONFIG, embedder=embedder, db_uri=db,
                       table="docs", rebuild=True, gate=gate, progress=False)  # fmt: skip

    # A first build has no live table to beat.
    first = rebuild(_Mirror(mirror_spec), None)
    assert first.gate is not None
    assert (first.gate["passed"], first.gate["live"]) == (True, None)
    live_version = lancedb.connect(db).open_table("docs").version
    # A rebuild whose queries find nothing is refused: live untouched, staging kept.
    worse = rebuild(FakeEmbedder(plain_spec), _Mirror(mirror_spec))
    assert worse.gate is not None
    assert worse.gate["passed"] is False
    assert worse.gate["live"]["ndcg"] == 1.0
    assert worse.table_name.startswith("docs__rebuild_")
    assert lancedb.connect(db).open_table("docs").version == live_version
    tables = lancedb.connect(db).list_tables().tables
    assert worse.table_name in tables
    stored = lancedb.connect(db).open_table("docs").to_arrow()
    assert set(stored["dim"].to_pylist()) == {64}
    with pytest.raises(Exception, match="rebuild"):
        refresh(source=source(TEXTS), config=CONFIG, embedder=FakeEmbedder(plain_spec), db_uri=db,
                table="docs", gate=GateConfig(golden=golden), progress=False)  # fmt: skip


def test_cli_gate_failure_exits_2_and_keeps_live(tmp_path, tiny_model_256_dir, capsys):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": list(range(12)), "body": TEXTS[:12]}), path)
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        "\n".join(json.dumps({"query": TEXTS[i], "relevant": [i]}) for i in range(6)) + "\n"
    )
    base = [
        "refresh", "--source", str(path), "--key", "id", "--text", "body",
        "--db", str(tmp_path / "db"), "--table", "docs", "--model", str(tiny_model_256_dir),
        "--device", "cpu", "--no-reproject",
    ]  # fmt: skip
    assert main([*base, "--dim", "256"]) == 0
    capsys.readouterr()
    assert main([*base, "--dim", "32", "--gate", str(golden)]) == 2  # needs --rebuild
    assert "--rebuild" in capsys.readouterr().err
    # An impossible bar: staging must beat live by more than the metrics' range.
    status = main([*base, "--dim", "32", "--rebuild", "--gate", str(golden),
                   "--gate-tolerance", "0"])  # fmt: skip
    out = capsys.readouterr()
    if status == 0:  # the smaller dim happened to score as well: the gate passed, swapped
        assert json.loads(out.out)["gate"]["passed"] is True
    else:
        assert status == 2
        assert "gate failed" in out.err
        table = lancedb.connect(str(tmp_path / "db")).open_table("docs").to_arrow()
        assert set(table["dim"].to_pylist()) == {256}
