"""ResumableSampler: DistributedSampler's order, exact resume, and world-size changes that lose nothing."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from _sampler_helpers import Unreadable, assert_exact_repartition, take
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler, SequentialSampler

from resumekit.errors import StateMismatchError
from resumekit.sampler import ResumableSampler, per_rank_count


def ranks(n: int, world: int, **kw: Any) -> list[ResumableSampler]:
    return [ResumableSampler(Unreadable(n), num_replicas=world, rank=r, **kw) for r in range(world)]


def restored(state: dict[str, Any], n: int, world: int, **kw: Any) -> list[ResumableSampler]:
    out = ranks(n, world, **kw)
    for s in out:
        s.load_state_dict(copy.deepcopy(state))
        s.set_epoch(state["epoch"])  # the resume pattern: continue the restored epoch, even if finished
    return out


# --------------------------------------------------------------------------------- equivalences


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 120),
    world=st.integers(1, 8),
    data=st.data(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    drop_last=st.booleans(),
)
def test_yields_exactly_what_distributed_sampler_yields(
    n: int, world: int, data: st.DataObject, shuffle: bool, seed: int, epoch: int, drop_last: bool
) -> None:
    rank = data.draw(st.integers(0, world - 1))
    ds = list(range(n))
    ref: DistributedSampler[int] = DistributedSampler(
        ds,  # type: ignore[arg-type]  # a list is a map-style dataset at runtime
        num_replicas=world,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    ours = ResumableSampler(
        ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    ref.set_epoch(epoch)
    ours.set_epoch(epoch)
    assert len(ours) == len(ref)
    assert list(ours) == list(ref)
    assert (ours.num_samples, ours.total_size) == (ref.num_samples, ref.total_size)


@pytest.mark.parametrize("n", [0, 1, 17])
def test_unshuffled_single_replica_is_sequential_sampler(n: int) -> None:
    ds = list(range(n))
    assert list(ResumableSampler(ds, shuffle=False)) == list(SequentialSampler(ds))


def test_defaults_without_torch_distributed_are_one_replica_rank_zero() -> None:
    s = ResumableSampler(list(range(5)))
    assert (s.num_replicas, s.rank) == (1, 0)


def test_order_is_a_pure_function_of_seed_epoch_and_length() -> None:
    a, b = ResumableSampler(list(range(50)), seed=4), ResumableSampler(list(range(50)), seed=4)
    torch.manual_seed(1)
    a.set_epoch(3)
    first = list(a)
    torch.manual_seed(2)  # the global stream plays no part
    b.set_epoch(3)
    assert list(b) == first
    b.set_epoch(4)
    assert list(b) != first


def test_iteration_does_not_touch_the_global_torch_stream() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(ResumableSampler(list(range(100)), seed=1))
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------- exact resume


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 80),
    world=st.integers(1, 5),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_resume_with_same_world_size_continues_exactly(
    n: int, world: int, drop_last: bool, shuffle: bool, seed: int, data: st.DataObject
) -> None:
    kw = dict(shuffle=shuffle, seed=seed, drop_last=drop_last)
    straight = [list(s) for s in ranks(n, world, **kw)]
    per_rank = len(straight[0])
    k = data.draw(st.integers(0, per_rank))
    first = ranks(n, world, **kw)
    head = take(first, k)
    state = first[0].state_dict()
    assert state["consumed"] == k * world
    resumed = restored(state, n, world, **kw)
    for r, s in enumerate(resumed):
        s.set_epoch(0)  # the natural loop calls set_epoch(start_epoch) right after restore
        assert len(s) == per_rank - k
        assert head[r] + list(s) == straight[r]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 90),
    world=st.integers(1, 6),
    new_world=st.integers(1, 6),
    drop_last=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_new_world_size_visits_every_unseen_sample_exactly_once(
    n: int, world: int, new_world: int, drop_last: bool, seed: int, data: st.DataObject
) -> None:
    assume(new_world != world)  # the same world size continues the saved partition (tested above)
    kw = dict(seed=seed, drop_last=drop_last)
    first = ranks(n, world, **kw)
    k = data.draw(st.integers(0, len(first[0])))
    seen = [i for rank_list in take(first, k) for i in rank_list]
    state = first[0].state_dict()

    assert_exact_repartition(seen, restored(state, n, new_world, **kw), n, k, world, new_world, drop_last)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), worlds=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data())
def test_repeated_world_size_changes_cover_the_epoch(n: int, worlds: list[int], data: st.DataObject) -> None:
    seen: list[int] = []
    state = ranks(n, worlds[0], seed=9)[0].state_dict()
    for world in worlds:
        samplers = restored(state, n, world, seed=9)
        k = data.draw(st.integers(0, len(samplers[0])))
        seen += [i for r in take(samplers, k) for i in r]
        state = samplers[0].state_dict()
    samplers = restored(state, n, worlds[-1], seed=9)
    seen += [i for s in samplers for i in s]
    assert set(seen) == set(range(n))


def test_fast_forward_reads_no_sample_and_lands_on_the_position() -> None:
    n = 1_000_003
    s = ResumableSampler(Unreadable(n), seed=2)
    state = s.state_dict()
    state["consumed"] = n - 3
    s.load_state_dict(state)
    assert len(s) == 3
    tail = list(s)  # Unreadable raises if any sample were read
    assert tail == torch.randperm(n, generator=torch.Generator().manual_seed(2))[-3:].tolist()


# --------------------------------------------------------------------------------- epochs


def test_set_epoch_on_the_restored_epoch_keeps_the_position_another_epoch_resets() -> None:
    s = ResumableSampler(list(range(10)), seed=1)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = copy.deepcopy(s.state_dict())

    keep = ResumableSampler(list(range(10)), seed=1)
    keep.load_state_dict(state)
    keep.set_epoch(2)
    assert head + list(keep) == _epoch(10, 1, 2)

    reset = ResumableSampler(list(range(10)), seed=1)
    reset.load_state_dict(state)
    reset.set_epoch(3)
    assert list(reset) == _epoch(10, 1, 3)


def _epoch(n: int, seed: int, epoch: int) -> list[int]:
    s = ResumableSampler(list(range(n)), seed=seed)
    s.set_epoch(epoch)
    return list(s)


def test_checkpoint_at_the_last_sample_resumes_at_the_next_epoch() -> None:
    s = ResumableSampler(list(range(6)), seed=0)
    s.set_epoch(4)
    list(s)
    state = copy.deepcopy(s.state_dict())
    r = ResumableSampler(list(range(6)), seed=0)
    r.load_state_dict(state)
    seen = []
    for epoch in range(4, 6):  # the natural loop, resumed at the saved epoch
        r.set_epoch(epoch)
        seen.append(list(r))
    assert seen == [[], _epoch(6, 0, 5)]


def test_same_epoch_after_finishing_it_starts_over() -> None:
    s = ResumableSampler(list(range(5)), shuffle=False)
    s.set_epoch(0)
    assert list(s) == [0, 1, 2, 3, 4]
    s.set_epoch(0)  # a validation loop that calls set_epoch(0) before every evaluation
    assert list(s) == [0, 1, 2, 3, 4]


def test_iterating_again_without_set_epoch_moves_to_the_next_epoch() -> None:
    s = ResumableSampler(list(range(30)), seed=3)
    first, second = list(s), list(s)
    assert (first, second) == (_epoch(30, 3, 0), _epoch(30, 3, 1))
    assert s.epoch == 1 and len(s) == 30


def test_len_is_the_remaining_count_after_resume_and_stable_during_iteration() -> None:
    s = ResumableSampler(list(range(10)), num_replicas=2, rank=1)
    state = s.state_dict()
    state["consumed"] = 4
    s.load_state_dict(state)
    assert len(s) == 3
    it = iter(s)
    next(it)
    assert len(s) == 3 and s.remaining() == 2


# --------------------------------------------------------------------------------- changed data


def test_position_beyond_a_shorter_dataset_is_a_clear_error() -> None:
    s = ResumableSampler(list(range(100)))
    state = s.state_dict()
    state["consumed"] = 80
    with pytest.raises(StateMismatchError) as info:
        ResumableSampler(list(range(50))).load_state_dict(state)
    msg = str(info.value)
    assert "80" in msg and "100" in msg and "50" in msg and "set_epoch(1)" in msg
    assert not isinstance(info.value, IndexError)


def test_changed_length_mid_epoch_is_an_error_even_when_the_position_fits() -> None:
    state = ResumableSampler(list(range(100))).state_dict()
    state["consumed"] = 10
    with pytest.raises(StateMismatchError, match=r"length 100.*length 120"):
        ResumableSampler(list(range(120))).load_state_dict(state)


def test_changed_length_at_position_zero_is_accepted() -> None:
    state = ResumableSampler(list(range(100))).state_dict()
    state["epoch"] = 3
    s = ResumableSampler(list(range(40)))
    s.load_state_dict(state)
    s.set_epoch(3)
    assert sorted(s) == list(range(40))


# --------------------------------------------------------------------------------- the record


def test_state_dict_holds_the_documented_plain_values() -> None:
    s = ResumableSampler(list(range(9)), num_replicas=3, rank=2, seed=5, drop_last=True)
    state = s.state_dict()
    assert set(state) == {
        "format", "seed", "epoch", "consumed", "partition_start", "dataset_length", "num_replicas",
        "shuffle", "drop_last", "order", "in_iteration", "open_iterator", "unwrapped_workers",
        "counts_prefetch",
    }  # fmt: skip
    assert state.pop("order") == "torch"
    assert all(isinstance(v, (int, bool)) for v in state.values())
    assert (state["dataset_length"], state["num_replicas"], state["drop_last"]) == (9, 3, True)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("consumed", "3", "must be an int"),
        ("consumed", 5, "does not lie on a step of 2"),
        ("consumed", 400, "does not lie"),
        ("partition_start", 6, "does not lie"),
        ("shuffle", "yes", "must be a bool"),
        ("num_replicas", 0, "out of range"),
    ],
)
def test_malformed_record_is_an_error(key: str, value: Any, match: str) -> None:
    state = ResumableSampler(list(range(20)), num_replicas=2, rank=0).state_dict()
    state[key] = value
    with pytest.raises(StateMismatchError, match=match):
        ResumableSampler(list(range(20)), num_replicas=2, rank=0).load_state_dict(state)


def test_missing_key_is_an_error() -> None:
    state = ResumableSampler(list(range(20))).state_dict()
    del state["epoch"]
    with pytest.raises(StateMismatchError, match="'epoch'"):
        ResumableSampler(list(range(20))).load_state_dict(state)


def test_numpy_and_tensor_scalars_from_storage_are_accepted() -> None:
    import numpy as np

    s = ResumableSampler(list(range(20)), seed=3)
    state = s.state_dict()
    state["consumed"] = np.int64(7)
    state["seed"] = torch.tensor(3)
    state["shuffle"] = np.bool_(True)
    r = ResumableSampler(list(range(20)), seed=3)
    r.load_state_dict(state)
    assert r.consumed == 7 and len(r) == 13


def test_checkpoint_seed_wins_over_the_constructor_with_a_warning() -> None:
    state = ResumableSampler(list(range(20)), seed=1).state_dict()
    s = ResumableSampler(list(range(20)), seed=2)
    with pytest.warns(RuntimeWarning, match="seed=2 was passed but the checkpoint was written with seed=1"):
        s.load_state_dict(state)
    assert s.seed == 1 and list(s) == _epoch(20, 1, 0)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="rank 3"):
        ResumableSampler(list(range(4)), num_replicas=2, rank=3)
    with pytest.raises(ValueError, match="num_replicas"):
        ResumableSampler(list(range(4)), num_replicas=0, rank=0)
    with pytest.raises(TypeError, match="__len__"):
        ResumableSampler(iter(range(4)))  # type: ignore[arg-type]


def test_per_rank_count_matches_distributed_sampler_arithmetic() -> None:
    for n in range(0, 30):
        for w in range(1, 6):
            assert per_rank_count(n, w, False) == math.ceil(n / w)
            assert per_rank_count(n, w, True) == n // w
