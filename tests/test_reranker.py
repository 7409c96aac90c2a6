"""Qwen3Reranker: parity with the model card's reference code, batching, order, bad input."""

import os

import numpy as np
import pytest
import torch

import qwen3_pipeline
from qwen3_pipeline.core.errors import ConfigError, EmbeddingFailedError, ModelLoadError
from qwen3_pipeline.embedding.reranker import (
    DEFAULT_INSTRUCTION,
    PREFIX,
    SUFFIX,
    Qwen3Reranker,
    Reranker,
    format_pair,
)
from tests.reranker_reference import CardReference, build_tiny_reranker_checkpoint

# As tests/test_encoder.py: the GPU check may rerun this module on CUDA (bf16 rounds
# differently from the reference); on CPU in float32 the bar is the 1e-5.
DEVICE = os.environ.get("QWEN3_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("QWEN3_TEST_DTYPE", "float32")
TOLERANCE = 1e-5 if DTYPE == "float32" else 2e-2
# Small enough that the long document is truncated, as the card's max_length would cut it.
MAX_LENGTH = 128
# The card's process_inputs passes max_length to tokenizer.pad, which warns that it ignores it.
pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored:UserWarning")

QUERY = "What is the capital of China?"
INSTRUCTION = "Given a geography question, judge whether the passage answers it"
LONG = "Beijing has been the capital for centuries; its history is long. " * 40
DOCUMENTS = [
    "The capital of China is Beijing.",
    "",
    LONG,
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "Гравитация притягивает тела друг к другу. 🚀",
    "Gravity is a force that attracts two bodies towards each other.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_reranker_checkpoint(tmp_path_factory.mktemp("tiny_reranker") / "model")


@pytest.fixture(scope="module")
def reranker(model_dir):
    return Qwen3Reranker(str(model_dir), device=DEVICE, dtype=DTYPE, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(model_dir):
    card = CardReference(model_dir, max_length=MAX_LENGTH)
    card.model.to(device=DEVICE, dtype=getattr(torch, DTYPE))
    return card


@pytest.mark.parametrize("instruction", [INSTRUCTION, None])
def test_scores_match_the_model_card_reference(reranker, reference, instruction):
    expected = reference.scores(QUERY, DOCUMENTS, instruction)
    scores = reranker.score(QUERY, DOCUMENTS, instruction)
    assert np.abs(np.array(scores) - np.array(expected)).max() <= TOLERANCE
    assert all(0.0 <= s <= 1.0 for s in scores)
    # The tiny head spreads the scores, so parity is not two constants agreeing.
    assert max(scores) - min(scores) > 0.1
    stats = reranker.last_stats
    assert stats is not None
    assert (stats.rows, stats.truncated_rows) == (len(DOCUMENTS), 1)


def test_pairs_are_tokenised_as_the_card_does(reranker, reference):
    ids, truncated = reranker.tokenize(QUERY, DOCUMENTS, INSTRUCTION)
    pairs = [reference.format_instruction(INSTRUCTION, QUERY, d) for d in DOCUMENTS]
    card = reference.process_inputs(pairs)
    rows = zip(card["input_ids"], card["attention_mask"], strict=True)
    assert ids == [row[mask.bool()].tolist() for row, mask in rows]
    assert truncated.tolist() == [d is LONG for d in DOCUMENTS]
    assert max(len(r) for r in ids) == MAX_LENGTH
    assert ids[1][: len(reference.prefix_tokens)] == reference.tokenizer.encode(
        PREFIX, add_special_tokens=False
    )
    assert ids[1][-len(reference.suffix_tokens) :] == reference.tokenizer.encode(
        SUFFIX, add_special_tokens=False
    )


def test_format_pair_is_the_cards_format_instruction(reference):
    for instruction in (None, INSTRUCTION, ""):
        assert format_pair(QUERY, "doc", instruction) == reference.format_instruction(
            instruction, QUERY, "doc"
        )
    assert DEFAULT_INSTRUCTION in format_pair(QUERY, "doc")


def test_a_pair_scores_the_same_alone_or_in_any_batch(model_dir, reranker):
    together = reranker.score(QUERY, DOCUMENTS, INSTRUCTION)
    one_batch = reranker.last_stats
    small = Qwen3Reranker(
        str(model_dir), device=DEVICE, dtype=DTYPE, max_length=MAX_LENGTH, max_batch_tokens=120
    )
    apart = small.score(QUERY, DOCUMENTS, INSTRUCTION)
    assert small.last_stats is not None
    assert one_batch is not None
    assert small.last_stats.batches > one_batch.batches
    assert np.abs(np.array(apart) - np.array(together)).max() <= TOLERANCE
    alone = [small.score(QUERY, [d], INSTRUCTION)[0] for d in DOCUMENTS]
    assert np.abs(np.array(alone) - np.array(together)).max() <= TOLERANCE


def test_scores_come_back_in_input_order(reranker):
    forward = reranker.score(QUERY, DOCUMENTS)
    backward = reranker.score(QUERY, DOCUMENTS[::-1])
    assert np.abs(np.array(backward[::-1]) - np.array(forward)).max() <= TOLERANCE
    twice = reranker.score(QUERY, [DOCUMENTS[0], DOCUMENTS[0]])
    assert twice[0] == twice[1]


def test_stats_count_padding(reranker):
    reranker.score(QUERY, DOCUMENTS)
    stats = reranker.last_stats
    assert stats is not None
    assert stats.real_tokens <= stats.padded_tokens
    assert 0 < stats.padding_efficiency <= 1


def test_no_documents_score_nothing(reranker):
    assert reranker.score(QUERY, []) == []


def test_bad_input_is_refused(reranker):
    with pytest.raises(ConfigError, match="wrap a single document"):
        reranker.score(QUERY, "one document")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"document\(s\) \[1\]"):
        reranker.score(QUERY, ["fine", None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="query must be a string"):
        reranker.score(None, ["doc"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="instruction must be"):
        reranker.score(QUERY, ["doc"], instruction=3)  # type: ignore[arg-type]


def test_bad_settings_are_config_errors(model_dir):
    with pytest.raises(ConfigError, match="template alone takes"):
        Qwen3Reranker(str(model_dir), device="cpu", max_length=40)
    with pytest.raises(ConfigError, match="exceeds"):
        Qwen3Reranker(str(model_dir), device="cpu", max_length=40_000)
    with pytest.raises(ConfigError, match="must be positive"):
        Qwen3Reranker(str(model_dir), device="cpu", max_batch_tokens=-1)
    with pytest.raises(ConfigError, match="dtype='float8'"):
        Qwen3Reranker(str(model_dir), device="cpu", dtype="float8")
    with pytest.raises(ConfigError, match="model must be"):
        Qwen3Reranker("")


def test_a_missing_checkpoint_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="--rerank-model"):
        Qwen3Reranker(str(tmp_path / "nowhere"), device="cpu")


def test_a_closed_reranker_refuses_to_score(model_dir):
    reranker = Qwen3Reranker(str(model_dir), device="cpu", max_length=MAX_LENGTH)
    reranker.close()
    with pytest.raises(ModelLoadError, match="closed"):
        reranker.score(QUERY, ["doc"])


def test_out_of_memory_halves_batches_and_names_pairs_that_never_fit(model_dir, monkeypatch):
    reranker = Qwen3Reranker(
        str(model_dir), device="cpu", max_length=MAX_LENGTH, max_batch_tokens=100_000
    )
    expected = reranker.score(QUERY, DOCUMENTS)
    real_forward = reranker._forward

    def forward_that_runs_out_of_memory(sequences):
        # More than two pairs, or the long (truncated) pair alone, "does not fit".
        if len(sequences) > 2 or max(len(s) for s in sequences) == MAX_LENGTH:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sequences)

    monkeypatch.setattr(reranker, "_forward", forward_that_runs_out_of_memory)
    with pytest.raises(EmbeddingFailedError, match=r"1 of 6 document\(s\).*document 2: out of"):
        reranker.score(QUERY, DOCUMENTS)
    fits = [d for d in DOCUMENTS if d is not LONG]
    halved = reranker.score(QUERY, fits)
    assert reranker.last_stats is not None
    assert reranker.last_stats.batches >= 3
    kept = [s for s, d in zip(expected, DOCUMENTS, strict=True) if d is not LONG]
    assert np.abs(np.array(halved) - np.array(kept)).max() <= 1e-5


def test_a_non_finite_score_is_recomputed_in_float32(model_dir, monkeypatch):
    reranker = Qwen3Reranker(str(model_dir), device="cpu", dtype="bfloat16", max_length=MAX_LENGTH)
    real_forward = reranker._forward

    def forward_nan_in_bf16(sequences):
        out = real_forward(sequences)
        if reranker._backbone.dtype == torch.bfloat16:
            out[0] = np.nan
        return out

    monkeypatch.setattr(reranker, "_forward", forward_nan_in_bf16)
    scores = reranker.score(QUERY, DOCUMENTS[:3])
    assert np.isfinite(scores).all()
    assert reranker._backbone.dtype == torch.bfloat16  # restored after the fp32 retry


def test_the_reranker_is_exported_and_fits_the_interface(reranker):
    assert qwen3_pipeline.Qwen3Reranker is Qwen3Reranker
    assert isinstance(reranker, Reranker)
