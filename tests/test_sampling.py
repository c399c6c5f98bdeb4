"""Tests for distbp.data.sampling: mini-batches as a pure function of (seed, epoch, index)."""

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from distbp.data.sampling import batch_ordinals, epoch_and_index, in_range, permute, steps_per_epoch

# n = 1, primes, powers of 2 and one past them (the Feistel domain just doubled)
SIZES = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 64, 65, 97, 1000, 1024, 1025, 4099]


def epoch_batches(seed, epoch, batch, n):
    return [batch_ordinals(seed, epoch, i, batch, n) for i in range(steps_per_epoch(n, batch))]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 3, 7, 64, 5000])
def test_one_epoch_visits_every_ordinal_exactly_once(n, batch):
    batches = epoch_batches(seed=11, epoch=2, batch=batch, n=n)
    everything = np.concatenate(batches)
    assert everything.dtype == np.int64
    assert np.array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("n", range(1, 70))
def test_permute_is_a_bijection_exhaustively(n):
    for seed, epoch in [(0, 0), (1, 0), (0, 1), (2**40 + 3, 17)]:
        image = permute(np.arange(n), n, seed, epoch)
        assert np.array_equal(np.sort(image), np.arange(n))


def test_permute_keeps_the_shape_and_agrees_elementwise():
    n = 1000
    whole = permute(np.arange(n), n, 5, 3)
    assert permute(np.arange(n).reshape(10, 100), n, 5, 3).shape == (10, 100)
    assert int(permute(417, n, 5, 3)) == whole[417]
    assert np.array_equal(permute([9, 3, 9], n, 5, 3), whole[[9, 3, 9]])


def test_permute_rejects_positions_outside_the_range():
    with pytest.raises(ValueError):
        permute([10], 10, 0, 0)
    with pytest.raises(ValueError):
        permute([-1], 10, 0, 0)
    with pytest.raises(ValueError):
        permute([0], 0, 0, 0)


def test_different_epochs_and_seeds_give_different_orders():
    n = 500
    orders = {(seed, epoch): tuple(permute(np.arange(n), n, seed, epoch))
              for seed in range(3) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders)
    # and not merely different: the first batch of the next epoch is a fresh draw
    a, b = batch_ordinals(0, 0, 0, 100, n), batch_ordinals(0, 1, 0, 100, n)
    assert len(np.intersect1d(a, b)) < 50  # about 100 * 100 / 500 = 20 expected


def test_the_order_looks_shuffled():
    n = 10_000
    order = permute(np.arange(n), n, 0, 0)
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.05
    assert np.count_nonzero(order == np.arange(n)) < 10  # about 1 fixed point expected
    # every batch is spread over the whole file, not a contiguous block of it
    for batch in epoch_batches(0, 0, 1000, n):
        assert 4000 < batch.mean() < 6000


def test_same_arguments_give_the_same_output():
    first = batch_ordinals(7, 3, 4, 100, 12345)
    again = batch_ordinals(7, 3, 4, 100, 12345)
    assert np.array_equal(first, again)
    code = ("from distbp.data.sampling import batch_ordinals; "
            "print(batch_ordinals(7, 3, 4, 100, 12345).tolist())")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == str(first.tolist())


@pytest.mark.parametrize("n,batch,sizes", [
    (10, 3, [3, 3, 3, 1]),
    (10, 5, [5, 5]),
    (10, 10, [10]),
    (10, 64, [10]),
    (1, 1, [1]),
    (1, 8, [1]),
    (17, 4, [4, 4, 4, 4, 1]),
])
def test_batch_sizes_including_the_partial_last_batch(n, batch, sizes):
    assert steps_per_epoch(n, batch) == len(sizes)
    assert [len(b) for b in epoch_batches(0, 0, batch, n)] == sizes


def test_batches_are_sorted_and_distinct():
    for b in epoch_batches(3, 1, 37, 1000):
        assert np.all(np.diff(b) > 0)


def test_batch_index_outside_the_epoch_is_refused():
    with pytest.raises(ValueError):
        batch_ordinals(0, 0, 4, 3, 10)  # 10 rows in batches of 3: indices 0..3
    with pytest.raises(ValueError):
        batch_ordinals(0, 0, -1, 3, 10)


def test_batch_index_is_the_position_range_through_the_permutation():
    n, batch = 100, 30
    order = permute(np.arange(n), n, 4, 9)
    for i, got in enumerate(epoch_batches(4, 9, batch, n)):
        assert np.array_equal(got, np.sort(order[i * batch:(i + 1) * batch]))


@pytest.mark.parametrize("step,expected", [
    (1, (0, 0)), (2, (0, 1)), (4, (0, 3)), (5, (1, 0)), (8, (1, 3)), (9, (2, 0)), (401, (100, 0)),
])
def test_epoch_and_index_of_a_global_step(step, expected):
    assert epoch_and_index(step, n=10, batch=3) == expected  # 4 batches per epoch


def test_epoch_and_index_refuses_step_zero():
    with pytest.raises(ValueError):
        epoch_and_index(0, 10, 3)


def test_steps_per_epoch_is_the_ceiling():
    assert [steps_per_epoch(n, 4) for n in (1, 3, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def random_partition(rng, n, parts):
    """Cut [0, n) into `parts` contiguous ranges, some possibly empty."""
    cuts = np.sort(rng.integers(0, n + 1, size=parts - 1))
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("n", [1, 7, 100, 1025])
def test_workers_splitting_a_batch_by_row_range_recover_it_exactly(n):
    rng = np.random.default_rng(n)
    for trial in range(30):
        batch = int(rng.integers(1, n + 1))
        ordinals = batch_ordinals(1, trial, int(rng.integers(0, steps_per_epoch(n, batch))), batch, n)
        parts = int(rng.integers(1, 9))
        ranges = random_partition(rng, n, parts)
        pieces = [in_range(ordinals, a, b) for a, b in ranges]
        for (a, b), piece in zip(ranges, pieces):
            assert np.all((piece >= a) & (piece < b))
        assert np.array_equal(np.concatenate(pieces), ordinals)  # disjoint, in order, complete


def test_in_range_keeps_exactly_the_ordinals_in_the_range():
    ordinals = np.array([0, 3, 4, 9, 12, 20])
    assert in_range(ordinals, 3, 12).tolist() == [3, 4, 9]
    assert in_range(ordinals, 0, 1).tolist() == [0]
    assert in_range(ordinals, 5, 9).tolist() == []
    assert in_range(ordinals, 12, 21).tolist() == [12, 20]


def test_memory_is_per_batch_not_per_dataset():
    n = 10**12  # a permutation of n int64 would need 8 TB
    tracemalloc.start()
    try:
        ordinals = batch_ordinals(3, 1, 123_456_789, 256, n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert len(ordinals) == 256 and len(np.unique(ordinals)) == 256
    assert ordinals.min() >= 0 and ordinals.max() < n
    last = batch_ordinals(3, 1, steps_per_epoch(n, 256) - 1, 256, n)  # 10**12 = 256 * 3906250000
    assert len(last) == 256 and last.max() < n


def test_batches_are_disjoint_where_cycle_walking_works_hardest():
    # n just past a power of two: half the Feistel domain is outside [0, n) and gets re-walked
    for n in (2**22 + 1, 10**9):
        batches = [batch_ordinals(0, 0, i, 8192, n) for i in range(20)]
        together = np.concatenate(batches)
        assert len(np.unique(together)) == 20 * 8192  # no row twice within the epoch
        assert together.min() >= 0 and together.max() < n


def test_imports_no_ray_or_click():
    code = "import sys, distbp.data.sampling; print([m for m in ('ray', 'click') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
