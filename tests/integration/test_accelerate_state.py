"""AcceleratorCheckpointer with a real single-process CPU ``Accelerator``, in process.

What is saved and where, exact positions without reading skipped samples, epoch boundaries, retention
only after commit, fsspec URLs, drift, unsupported dataloaders, and portability to and from a plain
:class:`resumekit.Checkpointer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration

import resumekit as rk
from resumekit_accelerate import AcceleratorCheckpointer, UnsupportedDataLoaderError

pytestmark = pytest.mark.accelerate

N, BATCH = 40, 4  # 10 batches an epoch


class CountingDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style data that records every index it is asked for."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 3, generator=g)
        self.y = torch.randn(n, 1, generator=g)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append(int(i))
        return self.x[i], self.y[i]


class Counter:
    """A custom object for register_for_checkpointing."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _setup(ds: Dataset[Any] | None = None, **acc_kwargs: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, **acc_kwargs)
    ds = ds if ds is not None else CountingDataset()
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    dl = DataLoader(ds, batch_size=BATCH, shuffle=True)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return {
        "acc": accelerator,
        "model": model,
        "opt": opt,
        "sched": sched,
        "dl": dl,
        "counter": counter,
        "ds": ds,
    }


def _train_batches(s: dict[str, Any], it: Iterator[Any], n: int) -> list[torch.Tensor]:
    seen = []
    for _ in range(n):
        x, y = next(it)
        loss = nn.functional.mse_loss(s["model"](x), y)
        s["acc"].backward(loss)
        s["opt"].step()
        s["sched"].step()
        s["opt"].zero_grad()
        s["counter"].value += 1
        seen.append(x)
    return seen


def _reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_checkpoint_holds_every_prepared_object_without_pickle(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    _train_batches(s, iter(s["dl"]), 3)
    info = ckpt.save_state(step=3)
    step_dir = Path(info.url)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    entries = set(manifest["entries"])
    assert {
        "model",
        "grads",
        "optimizer",
        "scheduler",
        "dataloader",
        "custom_0",
        "rng",
        "accelerator",
    } <= entries
    assert manifest["entries"]["rng"]["scope"] == "rank"
    assert manifest["entries"]["grads"]["scope"] == "rank"
    suffixes = {p.suffix for p in step_dir.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    assert manifest["config"]["gradient_accumulation_steps"] == 1
    assert manifest["config"]["per_device_batch_size"] == BATCH


def test_resume_mid_epoch_reads_no_skipped_sample_and_continues_exactly(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    it = iter(s["dl"])
    _train_batches(s, it, 4)
    ckpt.save_state(step=4)
    assert ckpt.position(s["dl"]) == (0, 4 * BATCH)
    rest = _train_batches(s, it, 6)  # the rest of epoch 0
    weights = {k: v.clone() for k, v in s["acc"].unwrap_model(s["model"]).state_dict().items()}
    _reset()

    s2 = _setup()
    ckpt2 = AcceleratorCheckpointer(s2["acc"], tmp_path / "run")
    result = ckpt2.load_state()
    assert result is not None and result.step == 4
    assert s2["counter"].value == 4
    assert s2["dl"].iteration == 0
    s2["ds"].reads.clear()
    it2 = iter(s2["dl"])
    first = _train_batches(s2, it2, 1)
    # Accelerate looks one batch ahead: the first resumed batch and the next were read, nothing before.
    assert len(s2["ds"].reads) == 2 * BATCH
    rest2 = first + _train_batches(s2, it2, 5)
    assert all(torch.equal(a, b) for a, b in zip(rest, rest2))
    with pytest.raises(StopIteration):
        next(it2)
    for k, v in s2["acc"].unwrap_model(s2["model"]).state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert ckpt2.position(s2["dl"]) == (1, 0)


def test_checkpoint_after_an_epochs_last_batch_resumes_at_the_next_epoch(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    it = iter(s["dl"])
    _train_batches(s, it, N // BATCH)  # the whole epoch; the loader has not yet signalled its end
    ckpt.save_state(step=10)
    with pytest.raises(StopIteration):  # the loop's next step: the pass ends, the epoch counter moves on
        next(it)
    epoch1 = [x for x, _ in s["dl"]]
    _reset()
    s2 = _setup()
    ckpt2 = AcceleratorCheckpointer(s2["acc"], tmp_path / "run")
    ckpt2.load_state()
    assert ckpt2.position(s2["dl"]) == (1, 0)
    assert s2["dl"].iteration == 1
    resumed = [x for x, _ in s2["dl"]]
    assert len(resumed) == len(epoch1) and all(torch.equal(a, b) for a, b in zip(epoch1, resumed))


def test_set_epoch_to_another_epoch_drops_the_restored_position(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    _train_batches(s, iter(s["dl"]), 3)
    ckpt.save_state(step=3)
    _reset()
    s2 = _setup()
    ckpt2 = AcceleratorCheckpointer(s2["acc"], tmp_path / "run")
    ckpt2.load_state()
    s2["dl"].set_epoch(0)  # the epoch in progress: the position is kept
    assert len(list(s2["dl"])) == N // BATCH - 3
    s2["dl"].set_epoch(0)  # once that pass is over, the same epoch again starts at its beginning
    assert len(list(s2["dl"])) == N // BATCH


def test_failed_save_keeps_every_older_checkpoint_and_retention_runs_after_commit(tmp_path: Path) -> None:
    class Exploding:
        armed = False

        def state_dict(self) -> dict[str, Any]:
            if self.armed:
                raise RuntimeError("boom while collecting state")
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    bomb = Exploding()
    s = _setup(project_config=ProjectConfiguration(project_dir=str(tmp_path), total_limit=2))
    ckpt = AcceleratorCheckpointer(s["acc"], extra_state={"bomb": bomb})  # url and keep_last from the project
    assert Path(ckpt.url) == tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_state(step=step)
    bomb.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_state(step=3)
    assert ckpt.steps() == [1, 2]  # Accelerate's total_limit would already have deleted step 1
    bomb.armed = False
    ckpt.save_state(step=4)
    assert ckpt.steps() == [2, 4]


def test_fsspec_url_round_trip() -> None:
    s = _setup()
    url = "memory://resumekit-accelerate-test/run"
    ckpt = AcceleratorCheckpointer(s["acc"], url)
    _train_batches(s, iter(s["dl"]), 2)
    ckpt.save_state(step=2)
    saved = {k: v.clone() for k, v in s["acc"].unwrap_model(s["model"]).state_dict().items()}
    _reset()
    s2 = _setup()
    restored = AcceleratorCheckpointer(s2["acc"], url).load_state()
    assert restored is not None and restored.step == 2
    for k, v in s2["acc"].unwrap_model(s2["model"]).state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_changed_gradient_accumulation_is_reported_as_drift(tmp_path: Path) -> None:
    s = _setup()
    AcceleratorCheckpointer(s["acc"], tmp_path / "run").save_state(step=0)
    _reset()
    s2 = _setup(gradient_accumulation_steps=4)
    with pytest.warns(Warning, match="gradient_accumulation_steps changed: 1 at save, 4 now"):
        result = AcceleratorCheckpointer(s2["acc"], tmp_path / "run").load_state()
    assert result is not None
    keys = {item.key: item for item in result.drift.items}
    assert keys["config.gradient_accumulation_steps"].saved == 1
    assert keys["config.gradient_accumulation_steps"].current == 4


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.zeros(8, 3))


def test_iterable_dataset_is_refused_unless_exact_dataloaders_is_off(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    dl = accelerator.prepare(DataLoader(Stream(), batch_size=2))
    with pytest.raises(UnsupportedDataLoaderError, match="map-style"):
        AcceleratorCheckpointer(accelerator, tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="restarts its epoch"):
        ckpt = AcceleratorCheckpointer(accelerator, tmp_path / "run", exact_dataloaders=False)
    assert "dataloader" not in ckpt.state()
    assert len(list(dl)) == 4


def test_dataloader_iterated_before_the_checkpointer_is_refused(tmp_path: Path) -> None:
    s = _setup()
    list(s["dl"])
    with pytest.raises(UnsupportedDataLoaderError, match=r"right after accelerator\.prepare"):
        AcceleratorCheckpointer(s["acc"], tmp_path / "run")


def _plain_objects() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_plain_checkpointer_run_continues_under_accelerate(tmp_path: Path) -> None:
    model, opt = _plain_objects()
    ds = CountingDataset()
    for i in range(3):
        x, y = ds[i]
        nn.functional.mse_loss(model(x[None]), y[None]).backward()
        opt.step()
        opt.zero_grad()
    rk.Checkpointer(tmp_path / "run").save({"model": model, "optimizer": opt}, step=3)

    s = _setup()
    result = AcceleratorCheckpointer(s["acc"], tmp_path / "run").load_state(strict=False)
    assert result is not None and result.step == 3
    assert {"model", "optimizer"}.isdisjoint(result.not_restored)
    assert {"dataloader", "rng", "scheduler"} <= set(result.not_restored)
    for k, v in s["acc"].unwrap_model(s["model"]).state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    loaded = s["opt"].state_dict()["state"]
    for idx, st in opt.state_dict()["state"].items():
        assert torch.equal(loaded[idx]["momentum_buffer"], st["momentum_buffer"])


def test_accelerate_checkpoint_loads_into_a_plain_loop(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    _train_batches(s, iter(s["dl"]), 3)
    ckpt.save_state(step=3)
    model, opt = _plain_objects()
    result = rk.Checkpointer(tmp_path / "run").restore({"model": model, "optimizer": opt})
    assert result is not None and result.step == 3
    for k, v in s["acc"].unwrap_model(s["model"]).state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    theirs = s["opt"].state_dict()["state"]
    for idx, st in opt.state_dict()["state"].items():
        assert torch.equal(theirs[idx]["momentum_buffer"], st["momentum_buffer"])


def test_epoch_sampler_order_is_distributed_samplers_and_a_resume_slices_it() -> None:
    from torch.utils.data.distributed import DistributedSampler

    from resumekit_accelerate import EpochSampler

    data = CountingDataset()
    sampler = EpochSampler(data, seed=5, shuffle=True)
    reference: DistributedSampler[Any] = DistributedSampler(
        data, num_replicas=1, rank=0, shuffle=True, seed=5
    )
    sampler.set_epoch(3)
    reference.set_epoch(3)
    full = list(sampler)
    assert full == list(reference)
    sampler.pending = (3, 24)  # what a restore sets
    sampler.set_epoch(3)
    assert list(sampler) == full[24:]  # nothing before the position is produced
    assert list(sampler) == full  # the restored position is used once
    sampler.pending = (3, 24)
    sampler.set_epoch(4)  # another epoch: the position does not apply
    assert sampler.pending is None and len(list(sampler)) == N


def test_asynchronous_save_holds_the_values_at_the_call(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    it = iter(s["dl"])
    _train_batches(s, it, 2)
    at_call = {k: v.clone() for k, v in s["acc"].unwrap_model(s["model"]).state_dict().items()}
    ckpt.save_state_async(step=2)
    _train_batches(s, it, 2)  # changes the weights while the save may still be writing
    info = ckpt.wait()
    assert info is not None and info.step == 2
    ckpt.close()
    _reset()
    s2 = _setup()
    AcceleratorCheckpointer(s2["acc"], tmp_path / "run").load_state()
    for k, v in s2["acc"].unwrap_model(s2["model"]).state_dict().items():
        assert torch.equal(v, at_call[k]), k
    assert s2["counter"].value == 2


def test_worker_prefetch_does_not_move_the_saved_position(tmp_path: Path) -> None:
    def setup() -> tuple[Accelerator, Any]:
        accelerator = Accelerator(cpu=True)
        loader = DataLoader(
            CountingDataset(), batch_size=BATCH, shuffle=True, num_workers=2, prefetch_factor=2
        )
        return accelerator, accelerator.prepare(loader)

    acc, dl = setup()
    ckpt = AcceleratorCheckpointer(acc, tmp_path / "run")
    it = iter(dl)
    for _ in range(3):
        next(it)  # the workers have pulled several batches ahead by now
    ckpt.save_state(step=3)
    assert ckpt.position(dl) == (0, 3 * BATCH)
    rest = [x for x, _ in it]
    _reset()
    acc2, dl2 = setup()
    AcceleratorCheckpointer(acc2, tmp_path / "run").load_state()
    resumed = [x for x, _ in dl2]
    assert len(resumed) == len(rest) == N // BATCH - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, resumed))


def test_native_save_state_and_skip_first_batches_resume_another_order_ours_does_not(tmp_path: Path) -> None:
    """What docs/accelerate.md claims about Accelerate's own resume path (checked on Accelerate 1.15)."""
    from accelerate.utils import set_seed

    def setup() -> tuple[Accelerator, Any]:
        accelerator = Accelerator(cpu=True)
        set_seed(0)
        return accelerator, accelerator.prepare(DataLoader(CountingDataset(), batch_size=BATCH, shuffle=True))

    acc, dl = setup()
    it = iter(dl)
    for _ in range(3):
        next(it)
    acc.save_state(str(tmp_path / "native"))
    rest = [x for x, _ in it]
    _reset()
    acc, dl = setup()
    acc.load_state(str(tmp_path / "native"))
    native = [x for x, _ in acc.skip_first_batches(dl, 3)]
    assert len(native) == len(rest)
    assert not all(torch.equal(a, b) for a, b in zip(rest, native)), (
        "Accelerate's own resume now continues the interrupted order; update docs/accelerate.md"
    )
    _reset()

    acc, dl = setup()
    ckpt = AcceleratorCheckpointer(acc, tmp_path / "ours")
    it = iter(dl)
    for _ in range(3):
        next(it)
    ckpt.save_state(step=3)
    rest = [x for x, _ in it]
    _reset()
    acc, dl = setup()
    AcceleratorCheckpointer(acc, tmp_path / "ours").load_state()
    ours = [x for x, _ in dl]
    assert len(ours) == len(rest) and all(torch.equal(a, b) for a, b in zip(rest, ours))


def test_position_saved_by_two_processes_continues_at_the_same_global_sample_in_one(tmp_path: Path) -> None:
    from resumekit.sampler import epoch_order

    s = _setup()
    position = AcceleratorCheckpointer(s["acc"], tmp_path / "run").state()["dataloader"]
    # What two processes with 4 samples each write after consuming one batch each of epoch 2.
    saved = {"format": 1, "epoch": 2, "consumed": 8, "seed": 0, "shuffle": True, "dataset_length": N}
    position.load_state_dict(
        {**saved, "batch_size": BATCH, "total_batch_size": 2 * BATCH, "num_processes": 2}
    )
    unseen = epoch_order(0, 2, N, True)[8:]
    got = torch.cat([x for x, _ in s["dl"]])
    assert torch.equal(got, s["ds"].x[unseen])
    assert s["dl"].iteration == 3


def test_with_drop_last_the_last_full_batch_ends_the_epoch(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    dl = accelerator.prepare(
        DataLoader(CountingDataset(N + 2), batch_size=BATCH, shuffle=True, drop_last=True)
    )
    ckpt = AcceleratorCheckpointer(accelerator, tmp_path / "run")
    it = iter(dl)
    for _ in range(N // BATCH):
        next(it)
    # Two samples are left over, but no batch: the next batch the loop receives is epoch 1's first.
    assert ckpt.position(dl) == (1, 0)


def test_a_dataset_that_changed_length_mid_epoch_is_an_error_naming_both_lengths(tmp_path: Path) -> None:
    s = _setup()
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    _train_batches(s, iter(s["dl"]), 2)
    ckpt.save_state(step=2)
    _reset()
    s2 = _setup(CountingDataset(N + 4))
    with pytest.raises(rk.errors.StateMismatchError, match=f"length {N}, but .* has length {N + 4}"):
        AcceleratorCheckpointer(s2["acc"], tmp_path / "run").load_state()


def test_extra_state_may_not_reuse_an_adapter_entry_name(tmp_path: Path) -> None:
    s = _setup()
    with pytest.raises(ValueError, match="'optimizer_1' collides"):
        AcceleratorCheckpointer(s["acc"], tmp_path / "run", extra_state={"optimizer_1": {}})
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run", extra_state={"models_seen": {"n": 1}})
    assert "models_seen" in ckpt.state()


def test_seedable_sampler_keeps_its_data_seed(tmp_path: Path) -> None:
    from accelerate import DataLoaderConfiguration
    from accelerate.data_loader import get_sampler

    from resumekit_accelerate import EpochSampler

    config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=5)
    s = _setup(dataloader_config=config)
    ckpt = AcceleratorCheckpointer(s["acc"], tmp_path / "run")
    assert isinstance(get_sampler(s["dl"]), EpochSampler)
    assert ckpt.state()["dataloader"].state_dict()["seed"] == 5
