import numpy as np
import pytest

from qwen3_pipeline.embedding.batching import left_pad, padded_positions, plan_batches, split_batch


def _check_plan(lengths, budget, rows):
    batches = plan_batches(lengths, max_batch_tokens=budget, max_batch_rows=rows)
    seen = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= rows
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= budget
    return batches


@pytest.mark.parametrize("budget", [1, 7, 64, 1000, 10**6])
@pytest.mark.parametrize("rows", [1, 3, 256])
def test_plan_covers_every_row_once_within_budget(budget, rows):
    rng = np.random.default_rng(budget + rows)
    lengths = rng.integers(1, 300, size=500).tolist()
    _check_plan(lengths, budget, rows)


def test_plan_is_sorted_longest_first_and_stable():
    lengths = [5, 9, 5, 9, 1]
    batches = plan_batches(
        lengths, max_batch_tokens=18, max_batch_rows=10, batch_overhead_tokens=10
    )
    assert [b.tolist() for b in batches] == [[1, 3], [0, 2, 4]]
    # With a small per-batch overhead, the cheapest plan separates the 1 from the 5s.
    batches = plan_batches(lengths, max_batch_tokens=18, max_batch_rows=10, batch_overhead_tokens=1)
    assert [b.tolist() for b in batches] == [[1, 3], [0, 2], [4]]


def test_row_longer_than_budget_gets_its_own_batch():
    batches = _check_plan([100, 2, 3], 10, 8)
    assert batches[0].tolist() == [0]


def test_empty_input_has_no_batches():
    assert plan_batches([], max_batch_tokens=10, max_batch_rows=2) == []


def test_sorting_by_tokens_gives_high_padding_efficiency_on_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(4, 1.2, size=5000).astype(int) + 1, 8192)
    batches = plan_batches(lengths, max_batch_tokens=16384, max_batch_rows=256)
    padded = sum(padded_positions(lengths, b) for b in batches)
    assert lengths.sum() / padded > 0.95


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], max_batch_tokens=0, max_batch_rows=1)
    with pytest.raises(ValueError, match="non-negative"):
        plan_batches([-1], max_batch_tokens=4, max_batch_rows=1)


def test_split_batch_halves():
    first, second = split_batch(np.arange(5))
    assert first.tolist() == [0, 1]
    assert second.tolist() == [2, 3, 4]
    first, second = split_batch(np.arange(1))
    assert first.tolist() == [0]
    assert second.size == 0


def test_left_pad_puts_last_token_in_last_column():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_plan_never_computes_more_than_greedy_packing():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 500, size=300)
    optimal = plan_batches(lengths, max_batch_tokens=2048, max_batch_rows=64)
    order = np.argsort(-lengths, kind="stable")
    greedy, start = [], 0
    while start < len(order):
        size = max(1, min(64, 2048 // lengths[order[start]], len(order) - start))
        greedy.append(order[start : start + size])
        start += size
    cost = lambda plan: sum(padded_positions(lengths, b) + 2048 // 64 for b in plan)  # noqa: E731
    assert cost(optimal) <= cost(greedy)


# ---------------------------------------------------------------- the budget's edge


@pytest.mark.parametrize(("rows", "length"), [(1, 1), (4, 3), (7, 128), (64, 1)])
def test_a_batch_exactly_at_the_budget_is_one_batch(rows, length):
    plan = plan_batches([length] * rows, max_batch_tokens=rows * length, max_batch_rows=rows)
    assert [b.tolist() for b in plan] == [list(range(rows))]


@pytest.mark.parametrize(("rows", "length"), [(2, 1), (4, 3), (7, 128), (64, 1)])
def test_one_token_over_the_budget_splits(rows, length):
    budget = rows * length - 1
    # However large the per-batch overhead, the budget is a hard cap.
    for overhead in (None, 10**9):
        plan = plan_batches([length] * rows, max_batch_tokens=budget, max_batch_rows=rows,
                            batch_overhead_tokens=overhead)  # fmt: skip
        assert len(plan) == 2
        assert sorted(np.concatenate(plan).tolist()) == list(range(rows))
        assert all(padded_positions([length] * rows, b) <= budget for b in plan)


def test_padding_counts_against_the_budget_at_its_edge():
    # 4 rows padded to the longest (10) are 40 positions, though only 16 tokens are real.
    lengths = [2, 10, 2, 2]
    plan = plan_batches(lengths, max_batch_tokens=40, max_batch_rows=8, batch_overhead_tokens=100)
    assert [b.tolist() for b in plan] == [[1, 0, 2, 3]]
    plan = plan_batches(lengths, max_batch_tokens=39, max_batch_rows=8, batch_overhead_tokens=100)
    assert len(plan) == 2
    assert all(padded_positions(lengths, b) <= 39 for b in plan)


def test_the_row_cap_at_its_edge():
    assert len(plan_batches([5] * 8, max_batch_tokens=10**6, max_batch_rows=8)) == 1
    sizes = [len(b) for b in plan_batches([5] * 9, max_batch_tokens=10**6, max_batch_rows=8)]
    assert len(sizes) == 2
    assert max(sizes) <= 8


@pytest.mark.parametrize("budget", [1, 10, 4096])
def test_rows_longer_than_the_budget_get_a_batch_each(budget):
    lengths = [budget + 1, 1, budget * 3, 1]
    plan = plan_batches(lengths, max_batch_tokens=budget, max_batch_rows=8)
    assert [b.tolist() for b in plan[:2]] == [[2], [0]]  # longest first, one row each
    rest = sorted(np.concatenate(plan[2:]).tolist())
    assert rest == [1, 3]
    assert all(padded_positions(lengths, b) <= budget for b in plan[2:])


def test_encoder_batches_at_the_budget_edge(tiny_model_dir):
    from qwen3_pipeline.core.spec import EmbeddingSpec
    from qwen3_pipeline.embedding.encoder import Qwen3Encoder

    encoder = Qwen3Encoder(EmbeddingSpec(model=str(tiny_model_dir)), device="cpu", progress=False)
    texts, long_text = ["the same text"] * 4, "a much longer text " * 8
    ids, _ = encoder.tokenize([*texts, long_text])
    length = len(ids[0])
    assert len(ids[-1]) > 4 * length

    def run(budget, batch):
        encoder.max_batch_tokens = budget
        return encoder.embed_documents(batch)

    at = run(4 * length, texts)
    assert at.stats.batches == 1
    assert at.stats.padded_tokens == at.stats.real_tokens == 4 * length
    over = run(4 * length - 1, texts)
    assert over.stats.batches == 2
    np.testing.assert_allclose(over.vectors, at.vectors, rtol=0, atol=1e-5)
    # A row longer than the budget is embedded alone, not failed; the others still share one.
    mixed = run(4 * length, [*texts, long_text])
    assert mixed.stats.batches == 2
    assert not mixed.failures
    assert mixed.stats.padded_tokens == mixed.stats.real_tokens
    np.testing.assert_allclose(mixed.vectors[:4], at.vectors, rtol=0, atol=1e-5)
