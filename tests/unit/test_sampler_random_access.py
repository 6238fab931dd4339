"""ResumableSampler(order="random-access"): a bijection per epoch, the torch order's partition rules, exact
resume, and a shuffle that looks uniform."""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from _sampler_helpers import Unreadable, assert_exact_repartition, take
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from resumekit.data import permutation as _permutation
from resumekit.data.permutation import RandomAccessPermutation
from resumekit.errors import ResumeKitError, StateMismatchError
from resumekit.sampler import ResumableSampler, epoch_order, partition_indices, per_rank_count

RA = "random-access"


CONSTRUCTIONS = ["table", "feistel"]


@contextmanager
def construction(kind: str) -> Iterator[None]:
    """Use ``kind`` for every range: ``feistel`` lowers the table limit so small ranges use the network."""
    with pytest.MonkeyPatch.context() as mp:
        if kind == "feistel":
            mp.setattr(_permutation, "SMALL", -1)
        yield


def ranks(n: int, world: int, **kw: Any) -> list[ResumableSampler]:
    return [ResumableSampler(Unreadable(n), num_replicas=world, rank=r, order=RA, **kw) for r in range(world)]


def restored(state: dict[str, Any], n: int, world: int, **kw: Any) -> list[ResumableSampler]:
    out = ranks(n, world, **kw)
    for s in out:
        s.load_state_dict(copy.deepcopy(state))
        s.set_epoch(state["epoch"])  # the resume pattern: continue the restored epoch, even if finished
    return out


def order(n: int, seed: int, epoch: int) -> list[int]:
    return RandomAccessPermutation(n, seed, epoch).full().tolist()


# --------------------------------------------------------------------------------- the permutation

SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 13, 31, 32, 33, 97, 127, 128, 129, 1023, 1024, 1025, 4099]
LARGE = [65_535, 65_536, 65_537, 131_071, 131_072, 131_073, 999_983, 1 << 20]


@pytest.mark.parametrize("path", CONSTRUCTIONS)
@pytest.mark.parametrize("n", SIZES)
def test_every_small_size_is_a_bijection_on_both_constructions(n: int, path: str) -> None:
    with construction(path):
        assert (RandomAccessPermutation(n, 0, 0)._table is None) == (path == "feistel")
        for seed, epoch in [(0, 0), (1, 0), (0, 1), (123_456_789, 7), (-5, 2**70)]:
            assert sorted(order(n, seed, epoch)) == list(range(n)), (path, seed, epoch)
    assert (RandomAccessPermutation(n, 0, 0)._table is None) == (n > _permutation.SMALL), "patch undone"


@pytest.mark.parametrize("n", LARGE)
def test_large_sizes_are_bijections(n: int) -> None:
    # Around the table limit and the powers of two, where the Feistel domain and cycle walking change.
    full = RandomAccessPermutation(n, 3, 1).full()
    assert np.array_equal(np.sort(full), np.arange(n))


@pytest.mark.parametrize("n", [1000, 70_001])
def test_random_access_agrees_with_the_materialised_order(n: int) -> None:
    perm = RandomAccessPermutation(n, 11, 4)
    full = perm.full()
    positions = np.random.default_rng(0).integers(0, n, size=(7, 13))
    assert np.array_equal(perm.at(positions), full[positions])
    assert perm.at(positions).shape == (7, 13)
    with pytest.raises(IndexError, match=f"0, {n}"):
        perm.at(np.array([n]))
    with pytest.raises(IndexError):
        perm.at(np.array([-1]))


def test_bad_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="length"):
        RandomAccessPermutation(-1, 0, 0)


@pytest.mark.parametrize("n", [50, 100_003])
def test_order_is_deterministic_and_each_epoch_and_seed_differ(n: int) -> None:
    base = order(n, 5, 0)
    assert order(n, 5, 0) == base
    others = [order(n, 5, e) for e in range(1, 6)] + [order(n, s, 0) for s in (4, 6)]
    for other in others:
        assert other != base
        # Unrelated shuffles agree at about one position in n, not at many.
        assert sum(a == b for a, b in zip(base, other)) < 10
    # torch's order of (seed, epoch) depends on seed + epoch only; this one does not.
    assert order(n, 1, 0) != order(n, 0, 1)


def test_the_sampler_order_is_epoch_order_random_access() -> None:
    s = ResumableSampler(Unreadable(300), seed=8, order=RA)
    s.set_epoch(2)
    assert list(s) == order(300, 8, 2) == epoch_order(8, 2, 300, True, RA).tolist()
    assert list(s) == order(300, 8, 3), "iterating again without set_epoch moves on to the next epoch"
    assert epoch_order(8, 2, 300, False, RA).tolist() == list(range(300))


# --------------------------------------------------------------------------------- statistics


def _chi_square_limit(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z=4.75 is a false alarm about once in a million."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _element_position_chi_square(orders: list[list[int]], n: int) -> float:
    counts = np.zeros((n, n))
    for o in orders:
        counts[np.arange(n), o] += 1
    expected = len(orders) / n
    return float(((counts - expected) ** 2 / expected).sum())


def _naive_shuffle(n: int, rng: random.Random) -> list[int]:
    # The classic biased shuffle (swap with any position): the control that the test can fail.
    a = list(range(n))
    for i in range(n):
        j = rng.randrange(n)
        a[i], a[j] = a[j], a[i]
    return a


def test_each_element_lands_on_each_position_equally_often() -> None:
    n, seeds = 10, 2000
    limit = _chi_square_limit((n - 1) ** 2)
    chi = _element_position_chi_square([order(n, s, 0) for s in range(seeds)], n)
    assert chi < limit, f"chi-square {chi:.0f} over the limit {limit:.0f}"
    epochs = _element_position_chi_square([order(n, 17, e) for e in range(seeds)], n)
    assert epochs < limit, f"across epochs of one seed: chi-square {epochs:.0f} over {limit:.0f}"
    rng = random.Random(0)
    control = _element_position_chi_square([_naive_shuffle(n, rng) for _ in range(seeds)], n)
    assert control > limit, "the test must be able to reject a known-biased shuffle"


def test_ordered_pairs_at_the_first_two_positions_are_uniform() -> None:
    n, seeds = 7, 4200
    pairs = Counter(tuple(order(n, s, 3)[:2]) for s in range(seeds))
    expected = seeds / (n * (n - 1))
    chi = sum((pairs.get((a, b), 0) - expected) ** 2 / expected for a in range(n) for b in range(n) if a != b)
    assert chi < _chi_square_limit(n * (n - 1) - 1)


def test_large_orders_are_far_from_identity_and_monotone() -> None:
    n = 1_000_000  # Feistel network with cycle walking
    full = RandomAccessPermutation(n, 0, 0).full().astype(np.float64)
    positions = np.arange(n, dtype=np.float64)
    # A uniform shuffle has correlation ~ N(0, 1/n) with its positions and ~n/2 ascents.
    assert abs(np.corrcoef(positions, full)[0, 1]) < 5 / math.sqrt(n)
    ascents = int((np.diff(full) > 0).sum())
    assert abs(ascents - (n - 1) / 2) < 5 * math.sqrt(n / 12)
    assert int((full == positions).sum()) < 10  # ~1 fixed point expected
    # Position buckets x value buckets: each of the 16x16 cells holds ~n/256.
    b = 16
    counts = np.zeros((b, b))
    np.add.at(counts, (((positions * b) // n).astype(np.int64), ((full * b) // n).astype(np.int64)), 1)
    expected = n / b / b
    assert float(((counts - expected) ** 2 / expected).sum()) < _chi_square_limit((b - 1) ** 2)


# --------------------------------------------------------------------------------- the partition rules


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 120),
    world=st.integers(1, 7),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    data=st.data(),
)
def test_partition_rules_are_the_torch_orders(
    n: int, world: int, drop_last: bool, seed: int, epoch: int, data: st.DataObject
) -> None:
    """Padding, drop_last and the rank split applied lazily equal _partition on the materialised order."""
    rank = data.draw(st.integers(0, world - 1))
    start = data.draw(st.integers(0, n))
    local = data.draw(st.integers(0, per_rank_count(n - start, world, drop_last)))
    state = {
        **ResumableSampler(Unreadable(n), order=RA).state_dict(),
        "seed": seed,
        "epoch": epoch,
        "partition_start": start,
        "consumed": start + local * world,
        "num_replicas": world,
        "drop_last": drop_last,
    }
    for shuffle in (True, False):
        s = ResumableSampler(Unreadable(n), world, rank, shuffle, seed, drop_last, order=RA)
        s.load_state_dict({**state, "shuffle": shuffle})
        s.set_epoch(epoch)  # the resume pattern: continue the restored epoch, even if finished
        expected = partition_indices(
            epoch_order(seed, epoch, n, shuffle, RA), start, world, rank, drop_last, local
        )
        assert len(s) == len(expected)
        assert list(s) == expected
        if not shuffle:  # the unshuffled order is the same for both kinds, so the records must yield the same
            t = ResumableSampler(Unreadable(n), world, rank, False, seed, drop_last)
            t.load_state_dict({**state, "shuffle": False, "order": "torch"})
            t.set_epoch(epoch)
            assert list(t) == expected


# --------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("path", CONSTRUCTIONS)
@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 80),
    world=st.integers(1, 5),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_resume_with_same_world_size_continues_exactly(
    path: str, n: int, world: int, drop_last: bool, seed: int, data: st.DataObject
) -> None:
    with construction(path):
        kw = dict(seed=seed, drop_last=drop_last)
        straight = [list(s) for s in ranks(n, world, **kw)]
        per_rank = len(straight[0])
        k = data.draw(st.integers(0, per_rank))
        first = ranks(n, world, **kw)
        head = take(first, k)
        state = first[0].state_dict()
        assert (state["consumed"], state["order"]) == (k * world, RA)
        for r, s in enumerate(restored(state, n, world, **kw)):
            s.set_epoch(0)
            assert len(s) == per_rank - k
            assert head[r] + list(s) == straight[r]


@pytest.mark.parametrize("path", CONSTRUCTIONS)
@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 90),
    world=st.integers(1, 6),
    new_world=st.integers(1, 6),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_new_world_size_visits_every_unseen_sample_exactly_once(
    path: str, n: int, world: int, new_world: int, drop_last: bool, seed: int, data: st.DataObject
) -> None:
    with construction(path):
        assume(new_world != world)
        kw = dict(seed=seed, drop_last=drop_last)
        first = ranks(n, world, **kw)
        k = data.draw(st.integers(0, len(first[0])))
        seen = [i for rank_list in take(first, k) for i in rank_list]
        state = first[0].state_dict()

        after = restored(state, n, new_world, **kw)
        assert_exact_repartition(seen, after, n, k, world, new_world, drop_last)


def test_fast_forward_deep_into_a_huge_epoch_reads_nothing_and_lands_exactly() -> None:
    n = 10**12  # randperm of this would need 8 TB; the random-access order needs one small chunk
    s = ResumableSampler(Unreadable(n), num_replicas=4, rank=3, seed=2, order=RA)
    state = {**s.state_dict(), "consumed": n - 8}
    s.load_state_dict(state)
    assert len(s) == 2
    perm = RandomAccessPermutation(n, 2, 0)
    assert list(s) == perm.at(np.array([n - 5, n - 1])).tolist()  # rank 3 of the last 8 positions


def test_epoch_rollover_and_set_epoch_follow_the_torch_rules() -> None:
    s = ResumableSampler(list(range(40)), seed=3, order=RA)
    head = [i for _, i in zip(range(15), s)]
    saved = s.state_dict()
    r = ResumableSampler(list(range(40)), seed=3, order=RA)
    r.load_state_dict(saved)
    r.set_epoch(0)  # the epoch in progress keeps its position
    assert head + list(r) == order(40, 3, 0)
    assert list(r) == order(40, 3, 1)  # finished: iterating again starts the next epoch
    r.set_epoch(1)  # the epoch just finished starts over
    assert (r.consumed, list(r)) == (0, order(40, 3, 1))


# --------------------------------------------------------------------------------- the record


def test_record_names_its_kind_and_a_record_without_it_is_torch() -> None:
    torch_state = ResumableSampler(list(range(30))).state_dict()
    assert torch_state["order"] == "torch"
    legacy = {k: v for k, v in torch_state.items() if k != "order"}
    legacy["consumed"] = 12
    s = ResumableSampler(list(range(30)))
    s.load_state_dict(legacy)
    assert list(s) == torch.randperm(30, generator=torch.Generator().manual_seed(0))[12:].tolist()
    with pytest.raises(StateMismatchError, match="random-access"):
        ResumableSampler(list(range(30)), order=RA).load_state_dict(legacy)


@pytest.mark.parametrize(("saved", "loading"), [(RA, "torch"), ("torch", RA)])
def test_loading_a_record_of_the_other_kind_fails_before_anything_changes(saved: str, loading: str) -> None:
    source = ResumableSampler(list(range(30)), seed=1, order=saved)  # type: ignore[arg-type]
    _ = [i for _, i in zip(range(10), source)]
    target = ResumableSampler(list(range(30)), seed=4, order=loading)  # type: ignore[arg-type]
    before = target.state_dict()
    with pytest.raises(StateMismatchError) as err:
        target.load_state_dict(source.state_dict())
    assert isinstance(err.value, ResumeKitError) and isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"order={saved!r}" in message and f"order={loading!r}" in message
    assert f"ResumableSampler(..., order={saved!r})" in message, "the fix names the kind to build"
    assert target.state_dict() == before
    with pytest.raises(StateMismatchError):
        target.resumekit_validate(source.state_dict())


@pytest.mark.parametrize("value", ["feistel", 1, None])
def test_unknown_kind_in_a_record_is_an_error(value: Any) -> None:
    state = {**ResumableSampler(list(range(10))).state_dict(), "order": value}
    with pytest.raises(StateMismatchError, match="'order' must be one of"):
        ResumableSampler(list(range(10))).load_state_dict(state)


def test_unknown_kind_in_the_constructor_is_an_error() -> None:
    with pytest.raises(ValueError, match="order must be one of"):
        ResumableSampler(list(range(10)), order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order must be one of"):
        epoch_order(0, 0, 10, True, "random")  # type: ignore[arg-type]


def test_checkpointer_round_trip_keeps_the_kind_and_lands_exactly(tmp_path: Any) -> None:
    import resumekit as rk

    first = ResumableSampler(Unreadable(200_000), num_replicas=2, rank=1, seed=6, order=RA)
    head = [i for _, i in zip(range(700), first)]
    rk.Checkpointer(str(tmp_path)).save({"sampler": first}, step=1)

    resumed = ResumableSampler(Unreadable(200_000), num_replicas=2, rank=1, seed=6, order=RA)
    assert rk.Checkpointer(str(tmp_path)).restore({"sampler": resumed}) is not None
    resumed.set_epoch(0)
    straight = ResumableSampler(Unreadable(200_000), num_replicas=2, rank=1, seed=6, order=RA)
    assert head + [i for _, i in zip(range(300), resumed)] == [i for _, i in zip(range(1000), straight)]
    with pytest.raises(StateMismatchError, match="order='random-access'"):
        rk.Checkpointer(str(tmp_path)).restore({"sampler": ResumableSampler(Unreadable(200_000), 2, 1)})
