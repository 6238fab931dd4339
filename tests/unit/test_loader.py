"""ResumableLoader: the saved position is what the loop consumed, and a resume replays bit for bit.

These tests run real DataLoader worker processes doing random augmentation with torch, random and NumPy.
"""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset

from resumekit.loader import ResumableLoader, _SeededDataset, sample_seed
from resumekit.rng import RNGState
from resumekit.sampler import ResumableSampler, _TaggedIndex

EPOCHS = 2
N = 45
B = 4


class Augmented(Dataset):
    """Every sample draws from all three global streams, as random augmentation does."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.opened = False

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        assert type(index) is int  # the per-sample seed tag never reaches user code
        noise = torch.rand(2)
        return torch.tensor([float(index), noise[0], noise[1], random.random(), float(np.random.rand())])


@pytest.fixture(autouse=True)
def _isolate_global_streams() -> Iterator[None]:
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def build(num_workers: int, **loader_kw: Any) -> tuple[ResumableSampler, ResumableLoader[Any]]:
    ds = Augmented()
    sampler = ResumableSampler(ds, seed=11)
    return sampler, ResumableLoader(
        DataLoader(ds, batch_size=B, sampler=sampler, num_workers=num_workers, **loader_kw)
    )


def train(
    loader: ResumableLoader[Any], sampler: ResumableSampler, start_epoch: int, stop_at: int | None = None
) -> tuple[list[torch.Tensor], dict[str, Any] | None]:
    """The natural loop. Each step also draws from the global torch stream (dropout stands in)."""
    seen: list[torch.Tensor] = []
    snapshot = None
    rng = RNGState()
    for epoch in range(start_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for batch in loader:
            seen.append(batch + torch.rand(()))
            if stop_at is not None and len(seen) == stop_at:
                snapshot = copy.deepcopy({"sampler": sampler.state_dict(), "rng": rng.state_dict()})
    return seen, snapshot


def straight_then_resumed(
    num_workers: int, stop_at: int, resume_workers: int | None = None, **loader_kw: Any
) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    sampler, loader = build(num_workers, **loader_kw)
    s1, snapshot = train(loader, sampler, 0, stop_at=stop_at)
    tail1 = (torch.rand(4), random.random(), np.random.rand())
    assert snapshot is not None

    torch.manual_seed(1234)  # the new process starts from unrelated streams
    random.seed(1234)
    np.random.seed(1234)
    sampler2, loader2 = build(num_workers if resume_workers is None else resume_workers, **loader_kw)
    sampler2.load_state_dict(snapshot["sampler"])
    RNGState().load_state_dict(snapshot["rng"])
    s2, _ = train(loader2, sampler2, snapshot["sampler"]["epoch"])
    tail2 = (torch.rand(4), random.random(), np.random.rand())

    assert len(s2) == len(s1) - stop_at
    for a, b in zip(s1[stop_at:], s2):
        assert torch.equal(a, b)  # bitwise, augmentation and training draws alike
    assert torch.equal(tail1[0], tail2[0]) and tail1[1:] == tail2[1:]


BATCHES_PER_EPOCH = -(-N // B)


@pytest.mark.parametrize(
    ("num_workers", "loader_kw"),
    [
        (2, {}),
        (2, {"persistent_workers": True}),
        (2, {"prefetch_factor": 4}),
        (0, {}),
    ],
    ids=["workers", "persistent", "prefetch4", "main-process"],
)
def test_mid_epoch_resume_replays_bit_for_bit(num_workers: int, loader_kw: dict[str, Any]) -> None:
    straight_then_resumed(num_workers, BATCHES_PER_EPOCH + 3, **loader_kw)  # inside the second epoch


def test_resume_from_the_last_batch_of_an_epoch_starts_the_next_epoch() -> None:
    straight_then_resumed(2, BATCHES_PER_EPOCH)


def test_resume_with_a_different_num_workers_replays_bit_for_bit() -> None:
    straight_then_resumed(2, BATCHES_PER_EPOCH + 5, resume_workers=0)


def test_augmentation_does_not_depend_on_num_workers() -> None:
    torch.manual_seed(0)
    sampler, loader = build(0)
    s0, _ = train(loader, sampler, 0)
    torch.manual_seed(0)
    sampler, loader = build(2)
    s2, _ = train(loader, sampler, 0)
    assert all(torch.equal(a, b) for a, b in zip(s0, s2)) and len(s0) == len(s2)


def test_position_is_what_the_loop_received_not_what_workers_prefetched() -> None:
    ds = Augmented()
    sampler = ResumableSampler(ds, num_replicas=2, rank=0, seed=1)
    loader = ResumableLoader(DataLoader(ds, batch_size=3, sampler=sampler, num_workers=2, prefetch_factor=4))
    it = iter(loader)
    for k in range(1, 4):
        next(it)
        # Workers hold up to 8 batches ahead; the global count moves by batch size x replicas per batch.
        assert sampler.consumed == k * 3 * 2
    del it


def test_partial_last_batch_and_drop_last_are_counted_exactly() -> None:
    for drop_last, expected_end in ((False, 11), (True, 8)):
        ds = Augmented(11)
        sampler = ResumableSampler(ds, shuffle=False)
        loader = ResumableLoader(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=drop_last))
        sizes = [len(b) for b in loader]
        assert sizes == ([4, 4, 3] if not drop_last else [4, 4])
        assert sampler.consumed == expected_end
        state = sampler.state_dict()
        resumed = ResumableSampler(Augmented(11), shuffle=False)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)
        loader2 = ResumableLoader(DataLoader(ds, batch_size=4, sampler=resumed, drop_last=drop_last))
        assert list(loader2) == []  # the epoch has nothing left for the loop


def test_without_set_epoch_a_drop_last_loader_moves_on_to_the_next_epoch() -> None:
    ds = Augmented(11)
    sampler = ResumableSampler(ds, seed=2)
    loader = ResumableLoader(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True))
    first = [b[:, 0].tolist() for b in loader]
    second = [b[:, 0].tolist() for b in loader]
    assert (len(first), len(second), sampler.epoch) == (2, 2, 1)
    assert first != second


def test_explicit_batch_sampler_and_unbatched_loaders_are_supported() -> None:
    ds = Augmented(10)
    sampler = ResumableSampler(ds, shuffle=False)
    loader = ResumableLoader(DataLoader(ds, batch_sampler=BatchSampler(sampler, 3, drop_last=False)))
    assert len(loader) == 4
    next(iter(loader))
    assert sampler.consumed == 3

    sampler = ResumableSampler(ds, shuffle=False)
    unbatched = ResumableLoader(DataLoader(ds, batch_size=None, sampler=sampler))
    it = iter(unbatched)
    first = next(it)
    assert first.shape == (5,) and sampler.consumed == 1


def test_len_after_a_mid_epoch_resume_is_the_batches_left() -> None:
    sampler, loader = build(0)
    assert len(loader) == BATCHES_PER_EPOCH
    state = sampler.state_dict()
    state["consumed"] = 5 * B
    sampler.load_state_dict(state)
    assert len(loader) == BATCHES_PER_EPOCH - 5
    assert sampler.num_samples == N  # the full epoch, for schedulers and epoch boundaries


def test_the_users_loader_is_left_unchanged() -> None:
    ds = Augmented(8)
    sampler = ResumableSampler(ds)
    dl = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)
    wrapped = ResumableLoader(dl)
    list(wrapped)
    assert dl.dataset is ds and dl.generator is None
    assert wrapped.batch_size == 2 and wrapped.loader is dl and wrapped.sampler is sampler


# ----------------------------------------------------------------------- the hidden consumers, pinned


def test_plain_dataloader_iterator_draws_from_the_global_stream_and_the_wrapper_does_not() -> None:
    ds = Augmented(8)
    torch.manual_seed(0)
    reference = torch.rand(3)

    torch.manual_seed(0)
    iter(DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=0))
    assert not torch.equal(torch.rand(3), reference), "torch no longer draws the base seed globally"

    torch.manual_seed(0)
    iter(ResumableLoader(DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=0)))
    next(iter(ResumableLoader(DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=2))))
    assert torch.equal(torch.rand(3), reference)


def test_main_process_augmentation_leaves_the_training_streams_alone() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    reference = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    _, loader = build(0)
    list(loader)
    after = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(after[0], reference[0]) and after[1:] == reference[1:]


def test_plain_dataloader_workers_do_not_replay_after_a_mid_epoch_resume() -> None:
    """Without the wrapper, worker augmentation depends on which worker served what: the field lesson."""
    ds = Augmented()

    def epoch_from(consumed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        sampler = ResumableSampler(ds, seed=3)
        state = sampler.state_dict()
        state["consumed"] = consumed
        sampler.load_state_dict(state)
        return list(DataLoader(ds, batch_size=B, sampler=sampler, num_workers=2))

    full, resumed = epoch_from(0), epoch_from(3 * B)
    assert not all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(full[3:], resumed))  # same samples, though


# ----------------------------------------------------------------------- pieces and refusals


def test_sample_seed_is_a_pure_function_that_separates_its_arguments() -> None:
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    assert len({sample_seed(1, 2, 3), sample_seed(1, 3, 2), sample_seed(2, 1, 3), sample_seed(1, 2, 4)}) == 4
    assert 0 <= sample_seed(-5, 0, 0) < 2**128


def test_seeded_dataset_and_tagged_index_survive_worker_transport() -> None:
    ds = Augmented(5)
    wrapped = pickle.loads(pickle.dumps(_SeededDataset(ds)))
    tag = pickle.loads(pickle.dumps(_TaggedIndex(3, 7, 1)))
    assert (int(tag), tag.seed, tag.epoch) == (3, 7, 1)
    assert torch.equal(wrapped[tag], wrapped[_TaggedIndex(3, 7, 1)])
    assert wrapped.n == 5 and len(wrapped) == 5
    wrapped.opened = True  # a worker_init_fn setting a handle on get_worker_info().dataset
    assert wrapped._rk_dataset.opened is True


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))


def test_loaders_it_cannot_make_exact_are_refused_with_the_fix() -> None:
    ds = Augmented(8)
    with pytest.raises(TypeError, match=r"RandomSampler, not a ResumableSampler.*sampler=resumekit"):
        ResumableLoader(DataLoader(ds, batch_size=2, shuffle=True))
    with pytest.raises(TypeError, match="IterableDataset"):
        ResumableLoader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ValueError, match="in_order=False"):
        ResumableLoader(
            DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=1, in_order=False)
        )
    dl = DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=1, persistent_workers=True)
    iter(dl)
    with pytest.raises(ValueError, match="already iterated"):
        ResumableLoader(dl)
    rewrapped = DataLoader(
        ds, batch_size=2, sampler=ResumableSampler(ds), num_workers=1, persistent_workers=True
    )
    list(ResumableLoader(rewrapped))
    assert len(list(ResumableLoader(rewrapped))) == 4  # wrapping again after a wrapped iteration is fine
    with pytest.warns(RuntimeWarning, match="generator= is not used"):
        ResumableLoader(
            DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), generator=torch.Generator())
        )


def test_world_size_change_through_the_loader_covers_the_rest_of_the_epoch() -> None:
    ds = Augmented(23)

    def loaders(world: int, state: dict[str, Any] | None) -> list[ResumableLoader[Any]]:
        out = []
        for rank in range(world):
            s = ResumableSampler(ds, num_replicas=world, rank=rank, seed=5)
            if state is not None:
                s.load_state_dict(copy.deepcopy(state))
            out.append(ResumableLoader(DataLoader(ds, batch_size=2, sampler=s)))
        return out

    first = loaders(2, None)
    iters = [iter(x) for x in first]
    seen = {int(i) for it in iters for _ in range(3) for i in next(it)[:, 0]}
    state = first[0].sampler.state_dict()
    assert state["consumed"] == 3 * 2 * 2
    rest = [int(i) for x in loaders(3, state) for b in x for i in b[:, 0]]
    assert set(rest) == set(range(23)) - seen
    assert len(rest) == 12  # 11 unseen samples padded to 3 ranks x 4


def test_without_the_wrapper_a_single_process_loader_counts_exactly() -> None:
    ds = Augmented(10)
    sampler = ResumableSampler(ds, shuffle=False)
    it = iter(DataLoader(ds, batch_size=3, sampler=sampler, num_workers=0))
    next(it)
    next(it)
    assert sampler.consumed == 6  # pulled == consumed when nothing prefetches


# ----------------------------------------------------------------------- real torch.distributed ranks


def _ddp_rank(rank: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ds = Augmented(N)
        sampler = ResumableSampler(ds, seed=4)  # num_replicas and rank from the process group
        loader = ResumableLoader(DataLoader(ds, batch_size=B, sampler=sampler, num_workers=2))
        sampler.set_epoch(0)
        batches = iter(loader)
        rows = torch.cat([next(batches) for _ in range(3)])
        seen = [int(i) for i in rows[:, 0]]
        results.put((rank, sampler.num_replicas, sampler.rank, seen, sampler.state_dict(), rows))
        del batches
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_then_resume_on_one() -> None:
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        out = sorted(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [(o[1], o[2]) for o in out] == [(2, 0), (2, 1)]
    states = [o[4] for o in out]
    assert states[0] == states[1] and states[0]["consumed"] == 3 * B * 2
    seen = out[0][3] + out[1][3]
    assert len(set(seen)) == len(seen) == 3 * B * 2
    # Each sample's augmentation is a function of (seed, epoch, index) alone: the same in any process.
    reference = _SeededDataset(Augmented(N))
    for o in out:
        expected = torch.stack(reference.__getitems__([_TaggedIndex(i, 4, 0) for i in o[3]]))
        assert torch.equal(o[5], expected)

    single = ResumableSampler(Augmented(N), num_replicas=1, rank=0, seed=4)
    single.load_state_dict(states[0])
    single.set_epoch(0)
    rest = [
        int(i)
        for b in ResumableLoader(DataLoader(Augmented(N), batch_size=B, sampler=single))
        for i in b[:, 0]
    ]
    assert sorted(seen + rest) == list(range(N))
