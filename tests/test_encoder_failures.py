"""One bad row never fails its neighbours: the encoder isolates rows that fail on their own.

Real tiny Qwen3 checkpoint; the failure is injected around the real forward pass (a row whose
token ids raise), as a kernel assertion or a bad input would.
"""

import numpy as np
import pytest

from qwen3_pipeline.core.errors import EmbeddingFailedError
from qwen3_pipeline.core.spec import EmbeddingSpec
from qwen3_pipeline.embedding.encoder import Qwen3Encoder

TEXTS = [f"document number {i} about topic {i % 5}" for i in range(12)]
POISON = 7


@pytest.fixture
def encoder(tiny_model_dir):
    return Qwen3Encoder(
        EmbeddingSpec(model=str(tiny_model_dir)), device="cpu", max_batch_tokens=100_000,
        progress=False,
    )  # fmt: skip


def test_a_failing_forward_pass_is_bisected_to_the_bad_row(encoder, monkeypatch):
    expected = encoder.encode_documents(TEXTS)
    poison_ids = encoder.tokenize(TEXTS)[0][POISON]
    real_forward = encoder._forward
    passes: list[int] = []

    def forward(sequences):
        passes.append(len(sequences))
        if poison_ids in sequences:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        return real_forward(sequences)

    monkeypatch.setattr(encoder, "_forward", forward)
    result = encoder.embed_documents(TEXTS)
    assert list(result.failures) == [POISON]
    failure = result.failures[POISON]
    assert (failure.step, failure.error_type) == ("embed", "RuntimeError")
    assert "device-side assert" in failure
    ok = [i for i in range(len(TEXTS)) if i != POISON]
    np.testing.assert_allclose(result.vectors[ok], expected[ok], atol=1e-5)
    assert np.isnan(result.vectors[POISON]).all()
    # 12 rows in one batch: 1 failing pass, then log2(12) levels of halves, not 12 passes.
    assert passes[0] == len(TEXTS)
    assert len(passes) <= 1 + 2 * 4


def test_a_model_that_fails_on_every_row_raises_instead_of_blaming_the_rows(encoder, monkeypatch):
    def broken(sequences):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(encoder, "_forward", broken)
    with pytest.raises(EmbeddingFailedError, match="the model is failing, not the rows"):
        encoder.embed_documents(TEXTS)


def test_a_text_the_tokenizer_rejects_is_a_tokenize_failure(encoder, monkeypatch):
    real_tokenize = encoder.tokenize

    def tokenize(texts):
        if any("topic 3" in t for t in texts):
            raise ValueError("tokenizer rejected the text (simulated)")
        return real_tokenize(texts)

    monkeypatch.setattr(encoder, "tokenize", tokenize)
    result = encoder.embed_documents(TEXTS)
    bad = [i for i, t in enumerate(TEXTS) if "topic 3" in t]
    assert sorted(result.failures) == bad
    assert {f.step for f in result.failures.values()} == {"tokenize"}
    good = [i for i in range(len(TEXTS)) if i not in bad]
    assert np.isfinite(result.vectors[good]).all()
