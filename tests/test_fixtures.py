"""Checks of the offline Qwen3-Embedding fixtures (tokenizer and tiny checkpoints)."""

import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.build_qwen_tokenizer import (
    EOS_TOKEN_ID,
    QWEN3_ADDED_TOKENS,
    SAMPLE_IDS,
    SAMPLE_TEXT,
    VOCAB_SIZE,
    load_fixture_tokenizer,
)
from tests.fixtures.tiny_qwen3 import (
    QUERY_PROMPT,
    build_tiny_qwen3_checkpoint,
    main,
    write_tokenizer,
)

MULTILINGUAL = [
    SAMPLE_TEXT,
    "中国的首都是北京。",
    "Größe naïve café — “quoted” … 😀🚀",
    "def f(x):\n    return x ** 2\n\n",
    "Привет, мир! مرحبا بالعالم",
]


@pytest.fixture(scope="module")
def fast_tokenizer():
    return load_fixture_tokenizer()


# --- the tokenizer fixture --------------------------------------------------------------------


def test_fixture_encodes_sample_sentence(fast_tokenizer):
    assert fast_tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False).ids == SAMPLE_IDS
    assert fast_tokenizer.encode(SAMPLE_TEXT).ids == [*SAMPLE_IDS, EOS_TOKEN_ID]


def test_fixture_appends_endoftext_once_per_sequence(fast_tokenizer):
    ids = fast_tokenizer.encode("a", "b").ids
    assert ids.count(EOS_TOKEN_ID) == 2
    assert ids[-1] == EOS_TOKEN_ID


def test_fixture_normalises_to_nfc(fast_tokenizer):
    decomposed, composed = "e\u0301", "\u00e9"
    assert decomposed != composed
    assert fast_tokenizer.encode(decomposed).ids == fast_tokenizer.encode(composed).ids
    text = "Cafe\u0301 re\u0301sume\u0301"
    assert (
        fast_tokenizer.encode(text).ids
        == fast_tokenizer.encode(unicodedata.normalize("NFC", text)).ids
    )


def test_fixture_has_the_qwen3_added_tokens(fast_tokenizer):
    assert fast_tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    added = fast_tokenizer.get_added_tokens_decoder()
    assert sorted(added) == list(range(EOS_TOKEN_ID, VOCAB_SIZE))
    for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=EOS_TOKEN_ID):
        assert added[token_id].content == content
        assert added[token_id].special is special
        assert fast_tokenizer.encode(content, add_special_tokens=False).ids == [token_id]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_fixture_round_trips_text(fast_tokenizer, text):
    ids = fast_tokenizer.encode(text, add_special_tokens=False).ids
    assert fast_tokenizer.decode(ids) == text


# --- transformers loading -----------------------------------------------------------------------


def test_auto_tokenizer_matches_the_fixture(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == EOS_TOKEN_ID
    assert tokenizer.model_max_length == 32768
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer(SAMPLE_TEXT)["input_ids"] == [*SAMPLE_IDS, EOS_TOKEN_ID]
    assert tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] == SAMPLE_IDS
    assert tokenizer("e\u0301")["input_ids"] == tokenizer("\u00e9")["input_ids"]


def test_auto_tokenizer_pads_left_and_truncates_before_endoftext(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["hi", SAMPLE_TEXT], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, len(SAMPLE_IDS) + 1)
    assert batch["attention_mask"][:, -1].all()  # every row ends in a real token
    assert batch["input_ids"][:, -1].tolist() == [EOS_TOKEN_ID, EOS_TOKEN_ID]
    assert batch["attention_mask"][0].tolist() == [0] * 6 + [1, 1]
    truncated = tokenizer(SAMPLE_TEXT, truncation=True, max_length=4)["input_ids"]
    assert truncated == [*SAMPLE_IDS[:3], EOS_TOKEN_ID]


def test_qwen2_tokenizer_class_gives_the_same_ids(tmp_path, tiny_model_dir):
    """The hub repo names Qwen2Tokenizer, which rebuilds the backend: it must agree with ours."""
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, tokenizer_class="Qwen2Tokenizer")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    qwen2 = AutoTokenizer.from_pretrained(tmp_path)
    ours = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(qwen2).__name__ == "Qwen2Tokenizer"
    texts = [*MULTILINGUAL, "<|im_start|>user\n<think>hm</think><|im_end|>"]
    assert qwen2(texts)["input_ids"] == ours(texts)["input_ids"]
    assert (
        qwen2(texts, padding=True)["attention_mask"] == ours(texts, padding=True)["attention_mask"]
    )


def test_checkpoint_layout_matches_the_published_model(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vocab_size"] == VOCAB_SIZE
    assert config["max_position_embeddings"] == 32768
    assert config["hidden_size"] == 64
    assert config["head_dim"] == 16
    assert config["dtype"] == "bfloat16"
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)

    from safetensors import safe_open

    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" in keys  # bare backbone keys, as in the published checkpoint
    assert not any(key.startswith("model.") for key in keys)


def test_auto_model_loads_and_runs(tiny_model_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert type(model).__name__ == "Qwen3Model"
    assert model.dtype == torch.bfloat16  # the stored dtype, as for the published model
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(MULTILINGUAL, padding=True, return_tensors="pt")
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModel.from_pretrained(tiny_model_dir, dtype=dtype).eval()
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        assert hidden.shape == (len(MULTILINGUAL), batch["input_ids"].shape[1], 64)
        assert torch.isfinite(hidden).all()


def test_embedding_spec_reads_the_checkpoint(tiny_model_dir, tiny_model_256_dir):
    from qwen3_pipeline.core.spec import EmbeddingSpec

    assert EmbeddingSpec(model=str(tiny_model_dir)).hidden_size == 64
    assert EmbeddingSpec(model=str(tiny_model_256_dir), dim=128).output_dim == 128


# --- sentence-transformers loading ------------------------------------------------------------


def test_sentence_transformer_loads_like_the_published_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    names = [type(module).__name__ for module in model]
    assert names == ["Transformer", "Pooling", "Normalize"]
    assert model[1].pooling_mode == "lasttoken"
    assert model.max_seq_length == 8192
    assert model.prompts == {"query": QUERY_PROMPT, "document": ""}
    assert model.default_prompt_name is None
    assert model.similarity_fn_name == "cosine"
    assert model.get_embedding_dimension() == 64
    assert model.tokenizer.padding_side == "left"

    queries = model.encode_query(["What is the capital of China?", "x"])
    documents = model.encode_document(MULTILINGUAL)
    assert queries.shape == (2, 64)
    assert documents.shape == (len(MULTILINGUAL), 64)
    for vectors in (queries, documents):
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)  # bf16


def test_sentence_transformer_is_last_token_pooling_of_the_backbone(tiny_model_dir):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model = SentenceTransformer(
        str(tiny_model_dir), device="cpu", model_kwargs={"dtype": torch.float32}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def manual(texts):
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            last = backbone(**batch).last_hidden_state[:, -1]
        return torch.nn.functional.normalize(last, dim=-1).numpy()

    query = "What is the capital of China?"
    np.testing.assert_allclose(
        model.encode_document(MULTILINGUAL), manual(MULTILINGUAL), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        model.encode_query([query]), manual([QUERY_PROMPT + query]), rtol=1e-4, atol=1e-5
    )


def test_sentence_transformer_loads_the_256_checkpoint(tiny_model_256_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_256_dir), device="cpu")
    assert model.get_embedding_dimension() == 256
    assert np.isfinite(model.encode_document(["hello"])).all()


# --- building ---------------------------------------------------------------------------------


def test_build_is_deterministic(tmp_path):
    shape = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    a = build_tiny_qwen3_checkpoint(tmp_path / "a", sentence_transformers_files=False, **shape)
    b = build_tiny_qwen3_checkpoint(tmp_path / "b", sentence_transformers_files=False, **shape)
    c = build_tiny_qwen3_checkpoint(
        tmp_path / "c", sentence_transformers_files=False, seed=1, **shape
    )
    weights = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert not (a / "modules.json").exists()


def test_build_does_not_touch_the_global_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_qwen3_checkpoint(
        tmp_path,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        sentence_transformers_files=False,
    )
    assert torch.equal(torch.rand(3), expected)


def test_build_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_qwen3_checkpoint(tmp_path, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        build_tiny_qwen3_checkpoint(tmp_path, num_heads=4, num_kv_heads=3)


def test_cli_builds_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--hidden", "32", "--layers", "1", "--heads", "2"]
    assert main([*args, "--kv-heads", "1", "--intermediate", "64", "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["dtype"]) == (32, 16, "float32")
    assert (out / "modules.json").is_file()
    assert "wrote" in capsys.readouterr().out


def test_cli_shape_preset_is_qwen3_0_6b(tmp_path, monkeypatch):
    import tests.fixtures.tiny_qwen3 as tiny_qwen3

    calls = []
    monkeypatch.setattr(
        tiny_qwen3, "build_tiny_qwen3_checkpoint", lambda dest, **kw: calls.append(kw) or dest
    )
    assert main(["--out", str(tmp_path), "--shape", "0.6b"]) == 0
    assert main(["--out", str(tmp_path), "--shape", "0.6b", "--layers", "2"]) == 0
    expected = {
        "hidden_size": 1024,
        "num_layers": 28,
        "num_heads": 16,
        "num_kv_heads": 8,
        "intermediate_size": 3072,
        "head_dim": 128,
    }
    assert {k: calls[0][k] for k in expected} == expected
    assert calls[1]["num_layers"] == 2
    assert calls[1]["head_dim"] == 128


def test_offline_environment():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_fixture_file_is_small():
    from tests.fixtures.build_qwen_tokenizer import FIXTURE_PATH

    assert Path(FIXTURE_PATH).stat().st_size < 5_000_000
