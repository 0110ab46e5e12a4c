"""The batch plan: disjoint shards, equal work per rank, and layouts that see the same examples."""

import math

import pytest

from dsum.batching import BatchPlan


def plan(n=37, bs=2, ga=3, world=1, rank=0, seed=5, shuffle=True):
    return BatchPlan(n, bs, ga, world, rank, seed, shuffle)


def test_one_epoch_covers_every_example_once_per_rank_set():
    for world in (1, 2, 3):
        seen = [i for r in range(world) for mb in plan(world=world, rank=r).micro_batches(0) for i in mb]
        assert sorted(set(seen)) == list(range(37))
        assert len(seen) - 37 == -37 % world  # padding only to a multiple of the world size


def test_every_rank_has_the_same_number_of_steps():
    counts = {len(plan(world=3, rank=r).windows(0)) for r in range(3)}
    assert counts == {plan(world=3).steps_per_epoch}


def test_two_ranks_see_what_one_rank_with_twice_the_batch_sees():
    # 36 examples: no padding, so the layouts hold exactly the same examples
    single = plan(n=36, bs=4, ga=1, world=1).micro_batches(2)
    ranks = [plan(n=36, bs=2, ga=1, world=2, rank=r).micro_batches(2) for r in range(2)]
    for k, batch in enumerate(single):
        assert sorted(batch) == sorted(ranks[0][k] + ranks[1][k])


def test_accumulation_windows_match_one_large_batch():
    windows = plan(n=40, bs=2, ga=4).windows(1)
    large = plan(n=40, bs=8, ga=1).micro_batches(1)
    assert [[i for mb in w for i in mb] for w in windows] == large


def test_order_changes_by_epoch_and_is_fixed_by_seed():
    assert plan().epoch_order(0) != plan().epoch_order(1)
    assert plan().epoch_order(3) == plan().epoch_order(3)
    assert plan(shuffle=False).epoch_order(0) == list(range(37))


@pytest.mark.parametrize("epochs, max_steps, expected", [(1, None, 7), (2.5, None, 18), (1, 3, 3)])
def test_total_steps(epochs, max_steps, expected):
    p = plan()  # 37 examples, 19 micro-batches of 2, windows of 3 -> 7 steps an epoch
    assert p.steps_per_epoch == 7
    assert p.total_steps(epochs, max_steps) == expected


LENGTHS = tuple((i * 7919) % 500 + 10 for i in range(3000))  # lengths in no order


def grouped(n=3000, bs=4, ga=2, world=1, rank=0, seed=5):
    return BatchPlan(n, bs, ga, world, rank, seed, lengths=LENGTHS[:n], group_by_length=True)


def padding(windows) -> float:
    """Padded positions over all, with every micro-batch padded to its longest example."""
    total = real = 0
    for window in windows:
        for mb in window:
            total += max(LENGTHS[i] for i in mb) * len(mb)
            real += sum(LENGTHS[i] for i in mb)
    return 1 - real / total


def test_grouping_by_length_cuts_padding_and_keeps_the_order_of_steps_random():
    plain = BatchPlan(3000, 4, 2, 1, 0, 5)
    assert padding(grouped().windows(0)) < 0.05 < 0.3 < padding(plain.windows(0))
    order = grouped().epoch_order(0)
    assert sorted(order) == list(range(3000))  # every example once
    assert order == grouped().epoch_order(0) and order != grouped().epoch_order(1)
    # The longest step is not always first: steps are shuffled inside each length-sorted group.
    step_max = [max(LENGTHS[i] for mb in w for i in mb) for w in grouped().windows(0)]
    assert step_max != sorted(step_max, reverse=True)
    assert step_max[:50] != sorted(step_max[:50], reverse=True)


def test_grouped_layouts_still_see_the_same_examples():
    windows = grouped(n=1000, bs=2, ga=4).windows(1)
    large = grouped(n=1000, bs=8, ga=1).micro_batches(1)
    assert [[i for mb in w for i in mb] for w in windows] == large
    ranks = [grouped(n=1000, bs=2, ga=2, world=2, rank=r).windows(1) for r in range(2)]
    single = grouped(n=1000, bs=4, ga=2).windows(1)
    for k, window in enumerate(single):
        assert sorted(i for mb in window for i in mb) == sorted(i for r in range(2) for mb in ranks[r][k] for i in mb)


def budget(n=3000, ga=2, world=1, rank=0, seed=5, tokens=2000, group=True, packed=False):
    return BatchPlan(n, 1, ga, world, rank, seed, lengths=LENGTHS[:n], group_by_length=group, max_tokens=tokens,
                     packed=packed)


def rank_tokens(mb, packed=False) -> int:
    rows = [LENGTHS[i] for i in mb]
    return sum(rows) if packed else len(rows) * max(rows)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_keeps_every_rank_within_it_and_covers_the_epoch(world, packed):
    ranks = [budget(world=world, rank=r, packed=packed).windows(1) for r in range(world)]
    assert len({len(w) for w in ranks}) == 1  # the same number of steps on every rank
    for r in range(world):
        for window in ranks[r]:
            assert all(mb and (rank_tokens(mb, packed) <= 2000 or len(mb) == 1) for mb in window)
    seen = sorted(i for windows in ranks for w in windows for mb in w for i in mb)
    assert sorted(set(seen)) == list(range(3000)) and len(seen) == 3000  # 3000 is a multiple of 1 and 3
    # Budgets are filled: a micro-batch could not have taken the next example's row.
    assert sum(rank_tokens(mb, packed) for w in ranks[0] for mb in w) / sum(len(w) for w in ranks[0]) > 1400


def test_token_budget_with_grouping_pads_little_and_the_steps_stay_shuffled():
    plain, grouped_plan = budget(group=False), budget()
    assert padding(grouped_plan.windows(0)) < 0.05 < 0.3 < padding(plain.windows(0))
    step_max = [max(LENGTHS[i] for mb in w for i in mb) for w in grouped_plan.windows(0)]
    assert step_max[:20] != sorted(step_max[:20], reverse=True)
    # Short examples make bigger batches: the number of rows follows the budget, not a fixed size.
    sizes = {len(mb) for w in grouped_plan.windows(0) for mb in w}
    assert min(sizes) < 5 and max(sizes) > 40


def test_an_example_longer_than_the_budget_trains_alone():
    windows = budget(tokens=100, group=False).windows(0)
    for mb in (mb for w in windows for mb in w):
        assert len(mb) == 1 or rank_tokens(mb) <= 100
    assert any(len(mb) == 1 and LENGTHS[mb[0]] > 100 for w in windows for mb in w)


def test_token_budget_epochs_differ_in_steps_and_the_loop_finds_its_place():
    p = budget(n=500, tokens=1500)
    counts = [p.steps_in_epoch(e) for e in range(3)]
    assert p.total_steps(2.5, None) == counts[0] + counts[1] + math.ceil(0.5 * counts[2])
    step = counts[0] + counts[1] + 3
    assert p.locate(step) == (2, 3)
    assert p.epochs_done(step) == pytest.approx(2 + 3 / counts[2])
    assert p.global_batch_size is None
