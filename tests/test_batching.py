import numpy as np
import pytest

from qwen3_pipeline.batching import left_pad, padded_positions, plan_batches, split_batch


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
