"""A bare DataLoader over a ResumableSampler (no ResumableLoader): exact where it can be, loud where not.

Each test runs a loop with random numbers drawn in it, "kills" it after k batches by taking the sampler's and
the RNG's records, resumes in fresh objects and compares the concatenated log with the uninterrupted run's.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import resumekit as rk

DATA = torch.arange(40.0)
EPOCHS = 3


def _loop(
    *,
    kill: int | None = None,
    resume: tuple[dict[str, Any], dict[str, Any]] | None = None,
    workers: int = 0,
    batch_size: int | None = 8,
    drop_last: bool = False,
) -> tuple[list[tuple[list[float], float]], tuple[dict[str, Any], dict[str, Any]] | None]:
    """The documented resume loop; returns (per-batch log of samples and a loop random number, records)."""
    torch.manual_seed(0)
    sampler, rng = rk.ResumableSampler(DATA, seed=7), rk.RNGState()
    if resume is not None:
        sampler.load_state_dict(resume[0])
        rng.load_state_dict(resume[1])  # RNG last, as the Checkpointer does
    log: list[tuple[list[float], float]] = []
    for epoch in range(sampler.epoch, EPOCHS):
        sampler.set_epoch(epoch)
        loader = DataLoader(
            DATA, batch_size=batch_size, drop_last=drop_last, sampler=sampler, num_workers=workers
        )
        for batch in loader:
            log.append((batch.reshape(-1).tolist(), torch.rand(1).item()))
            if len(log) == kill:
                return log, (sampler.state_dict(), rng.state_dict())
    return log, None


@pytest.mark.parametrize(("batch_size", "drop_last"), [(8, False), (6, False), (6, True), (None, False)])
def test_num_workers_0_resumes_bit_for_bit_after_every_batch(batch_size: int | None, drop_last: bool) -> None:
    straight, _ = _loop(batch_size=batch_size, drop_last=drop_last)
    for k in range(1, len(straight)):
        head, saved = _loop(kill=k, batch_size=batch_size, drop_last=drop_last)
        assert saved is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # exact: nothing to warn about
            tail, _ = _loop(resume=saved, batch_size=batch_size, drop_last=drop_last)
        assert head + tail == straight, f"resumed after batch {k}"


def test_the_resumed_iterator_base_seed_draw_is_given_back_only_when_the_straight_run_did_not_make_it() -> (
    None
):
    # Saved between epochs (iteration ended, not at the end): the straight run re-creates the iterator too.
    torch.manual_seed(0)
    sampler, rng = rk.ResumableSampler(DATA, seed=1), rk.RNGState()
    it = iter(DataLoader(DATA, batch_size=8, sampler=sampler))
    next(it)
    del it  # the loop broke out: the next iteration creates a new iterator in both runs
    saved = (sampler.state_dict(), rng.state_dict())
    assert saved[0]["open_iterator"] == 0 and not saved[0]["in_iteration"]
    straight = [(b.tolist(), torch.rand(1).item()) for b in DataLoader(DATA, batch_size=8, sampler=sampler)]

    resumed_sampler = rk.ResumableSampler(DATA, seed=1)
    resumed_sampler.load_state_dict(saved[0])
    rk.RNGState().load_state_dict(saved[1])
    resumed = [
        (b.tolist(), torch.rand(1).item()) for b in DataLoader(DATA, batch_size=8, sampler=resumed_sampler)
    ]
    assert resumed == straight


def test_random_numbers_drawn_between_restore_and_loop_are_reported() -> None:
    _head, saved = _loop(kill=3)
    assert saved is not None
    sampler = rk.ResumableSampler(DATA, seed=7)
    sampler.load_state_dict(saved[0])
    rk.RNGState().load_state_dict(saved[1])
    torch.rand(1)  # a hidden consumer the library cannot undo
    with pytest.warns(RuntimeWarning, match="moved by more than the DataLoader iterator's base-seed draw"):
        next(iter(DataLoader(DATA, batch_size=8, sampler=sampler)))


@pytest.mark.timeout(120)
def test_num_workers_2_position_and_loop_randomness_exact_and_worker_randomness_warned() -> None:
    straight, _ = _loop(workers=2)
    for k in (2, 5, 10):  # mid-epoch, the last batch of an epoch, mid second epoch
        with warnings.catch_warnings(record=True) as at_save:
            warnings.simplefilter("always")
            head, saved = _loop(kill=k, workers=2)
        assert saved is not None
        messages = [str(w.message) for w in at_save if "ResumableSampler" in str(w.message)]
        assert len(messages) == 1, "warned once, at the first save"
        assert "num_workers=2" in messages[0] and "rk.ResumableLoader" not in messages[0]
        assert "resumekit.ResumableLoader(DataLoader(...))" in messages[0]
        assert "worker processes" in messages[0]
        assert saved[0]["unwrapped_workers"] == 2
        with pytest.warns(RuntimeWarning, match="written by a run whose DataLoader had num_workers=2"):
            tail, _ = _loop(resume=saved, workers=2)
        # Nothing skipped or repeated; the loop's own random numbers replay (DATA draws none in workers).
        assert head + tail == straight, f"resumed after batch {k}"


def test_a_position_counting_prefetch_is_flagged_in_the_record_and_at_restore() -> None:
    sampler = rk.ResumableSampler(DATA, seed=3)
    batches = torch.utils.data.BatchSampler(sampler, 4, False)

    class Custom:  # a batch sampler resumekit cannot read
        def __iter__(self) -> Any:
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    it = iter(DataLoader(DATA, batch_sampler=Custom(), num_workers=2))
    next(it)
    with pytest.warns(RuntimeWarning, match="counts the indices the workers prefetched"):
        record = sampler.state_dict()
    del it
    assert record["counts_prefetch"] and record["consumed"] > 4  # ahead of the one batch received: flagged
    with pytest.warns(RuntimeWarning, match="a resume skips up to"):
        rk.ResumableSampler(DATA, seed=3).load_state_dict(record)


# ------------------------------------------------------------------------- end of epoch (issue 17 item 8)


def test_state_after_an_ended_epoch_rolls_over_without_set_epoch_like_the_live_sampler() -> None:
    live = rk.ResumableSampler(list(range(10)), seed=4)
    first = list(live)  # the epoch is iterated to its end: the iteration is over
    saved = live.state_dict()
    assert not saved["in_iteration"]
    restored = rk.ResumableSampler(list(range(10)), seed=4)
    restored.load_state_dict(saved)
    assert len(restored) == len(live) == 10
    assert list(restored) == list(live) != first  # both start epoch 1
    assert restored.epoch == live.epoch == 1


def test_state_inside_the_last_batch_continues_that_iteration_like_the_live_sampler() -> None:
    live = rk.ResumableSampler(list(range(10)), seed=4)
    it = iter(live)
    head = [next(it) for _ in range(10)]  # the last sample received, the iteration not yet told it ended
    saved = live.state_dict()
    assert saved["in_iteration"]
    restored = rk.ResumableSampler(list(range(10)), seed=4)
    restored.load_state_dict(saved)
    assert list(restored) == list(it) == []  # the rest of the iteration in progress: nothing
    assert list(restored) == list(live) != head  # then epoch 1 in both


def test_resume_loop_with_set_epoch_keeps_the_restored_finished_epoch() -> None:
    live = rk.ResumableSampler(list(range(10)), seed=4)
    list(live)
    restored = rk.ResumableSampler(list(range(10)), seed=4)
    restored.load_state_dict(live.state_dict())
    restored.set_epoch(restored.epoch)  # the documented loop: for epoch in range(sampler.epoch, ...)
    assert list(restored) == []
    restored.set_epoch(1)
    live.set_epoch(1)
    assert list(restored) == list(live)


# ----------------------------------------------------------------------------- loaders in the state


@pytest.mark.parametrize("kind", ["DataLoader", "ResumableLoader", "StatefulDataLoader"])
def test_a_loader_in_the_state_is_refused_with_the_fix(kind: str, tmp_path: Any) -> None:
    sampler = rk.ResumableSampler(DATA)
    loader: Any
    if kind == "StatefulDataLoader":
        stateful = pytest.importorskip("torchdata.stateful_dataloader")
        loader = stateful.StatefulDataLoader(DATA, batch_size=4)
    else:
        loader = DataLoader(DATA, batch_size=4, sampler=sampler)
        if kind == "ResumableLoader":
            loader = rk.ResumableLoader(loader)
    ckpt = rk.Checkpointer(str(tmp_path))
    with pytest.raises(TypeError, match=rf"'loader' is a {kind}") as err:
        ckpt.save({"loader": loader, "sampler": sampler}, step=1)
    assert "resumekit.ResumableSampler(dataset" in str(err.value)
    assert "resumekit.ResumableLoader(DataLoader(...))" in str(err.value)
    assert isinstance(err.value, rk.ResumeKitError)  # `except ResumeKitError` catches it too
    assert ckpt.steps() == []
