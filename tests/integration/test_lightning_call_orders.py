"""Issue 18: call orders and strategies Lightning's own tests exercise beyond a plain ``fit``.

``save_last="link"`` with a changing last name, ``trainer.save_checkpoint`` before ``fit``,
``fit(ckpt_path=<missing>)`` and ``load_from_checkpoint`` on a checkpoint folder. ``ddp_spawn`` has
its own file (test_lightning_spawn.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resumekit.errors import CheckpointNotFoundError, CommitConflictError, UnsafeCheckpointError
from resumekit_lightning import ResumeKit, ResumeKitCheckpointIO, load_checkpoint, load_from_checkpoint
from resumekit_lightning.callback import unsupported_strategy

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(120)]


class Lit(pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp: Path, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    kw.setdefault("max_epochs", 3)
    kw.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
        callbacks=callbacks,
        **kw,
    )


def _fit(trainer: pl.Trainer, model: pl.LightningModule, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stateless loader, few workers: not what these tests look at
        trainer.fit(model, **kw)


def _assert_no_pickle(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in (".json", ".safetensors"), path
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


# ------------------------------------------------------------------------ save_last="link", changing name


@pytest.mark.parametrize("top_k", [1, -1], ids=["targets-removed-first", "targets-kept"])
def test_link_last_with_a_changing_name_leaves_no_hidden_links(tmp_path: Path, top_k: int) -> None:
    folder = tmp_path / "ckpt"
    mc = ModelCheckpoint(dirpath=folder, save_last="link", every_n_epochs=1, save_top_k=top_k)
    mc.CHECKPOINT_NAME_LAST = "last-{epoch}"
    trainer = _trainer(tmp_path, [ResumeKit(), mc])
    _fit(trainer, Lit())
    names = sorted(p.name for p in folder.iterdir())
    kept = [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(3)][-1 if top_k == 1 else 0 :]
    # The top-k folders and one link to the newest; every older link is gone, hidden debris included.
    assert names == [*kept, "last-epoch=2.ckpt"], names
    link = folder / "last-epoch=2.ckpt"
    assert link.is_symlink()
    assert load_checkpoint(link)["global_step"] == 12


def test_removing_a_link_removes_the_link_only(tmp_path: Path) -> None:
    io = ResumeKitCheckpointIO()
    target = tmp_path / "epoch=0-step=4.ckpt"
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(2)}}, target)
    link = tmp_path / "last.ckpt"
    link.symlink_to(target.name)
    dangling = tmp_path / "last-v1.ckpt"
    dangling.symlink_to("gone.ckpt")

    io.remove_checkpoint(link)
    io.remove_checkpoint(dangling)

    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert load_checkpoint(target)["global_step"] == 4


def test_a_hidden_link_left_by_a_killed_removal_is_cleaned_by_the_next_save(tmp_path: Path) -> None:
    io = ResumeKitCheckpointIO()
    target = tmp_path / "epoch=0-step=4.ckpt"
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(2)}}, target)
    (tmp_path / ".last-epoch=0.ckpt.deleting-0123abcd").symlink_to(target.name)

    io.save_checkpoint({"global_step": 8, "state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")

    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, "last.ckpt"]
    assert load_checkpoint(target)["global_step"] == 4  # the link went, not what it pointed to


def test_a_first_save_never_replaces_a_folder_that_appeared_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"

    class Racing(ResumeKitCheckpointIO):
        """Another writer creates the path between this save's commit and its publishing rename."""

        def _checkpointer(self, url: str, storage_options: Any, keep_last: int | None = None) -> Any:
            inner = super()._checkpointer(url, storage_options, keep_last)

            class Save:
                def save(self, entries: Any, *, step: int) -> Any:
                    info = inner.save(entries, step=step)
                    path.mkdir()
                    return info

            return Save()

    with pytest.raises(CommitConflictError, match="already exists"):
        Racing().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no hidden staging left
    assert list(path.iterdir()) == []  # the other writer's folder, untouched


# ------------------------------------------------------------------------ save_checkpoint before fit


@pytest.mark.parametrize("plugin", [False, True], ids=["callback", "callback+plugin"])
def test_save_checkpoint_before_fit_writes_no_pickle(tmp_path: Path, plugin: bool) -> None:
    rk = ResumeKit()
    trainer = _trainer(tmp_path, [rk], plugins=[rk.checkpoint_io] if plugin else None)
    model = Lit(width=5)
    trainer.strategy.connect(model)  # attached, no setup hook yet: what Lightning's own tests do
    path = tmp_path / "early.ckpt"
    trainer.save_checkpoint(path)
    assert path.is_dir()
    _assert_no_pickle(path)
    assert trainer.strategy.checkpoint_io is rk.checkpoint_io

    resumed = Lit(width=5)
    _fit(_trainer(tmp_path, [ResumeKit()], max_epochs=1), resumed, ckpt_path=path)
    assert resumed.hparams["width"] == 5


def test_weights_only_save_before_fit_is_resumekits_with_the_plugin(tmp_path: Path) -> None:
    # Lightning calls no callback hook for a weights-only save: only the plugin covers it.
    rk = ResumeKit()
    trainer = _trainer(tmp_path, [rk], plugins=[rk.checkpoint_io])
    model = Lit()
    trainer.strategy.connect(model)
    path = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    _assert_no_pickle(path)
    got = load_checkpoint(path)
    assert "optimizer_states" not in got
    for name, value in model.state_dict().items():
        assert torch.equal(got["state_dict"][name], value), name


class Evaluated(Lit):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0])

    def val_dataloader(self) -> Any:
        return self.train_dataloader()

    test_dataloader = predict_dataloader = val_dataloader


@pytest.mark.parametrize("entry", ["validate", "test", "predict", "fit"])
def test_every_entry_point_of_a_fresh_trainer_reads_a_folder(tmp_path: Path, entry: str) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(_trainer(tmp_path, [ResumeKit(), mc], max_epochs=1), Evaluated())
    saved = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["state_dict"]

    model = Evaluated()
    trainer = _trainer(tmp_path, [ResumeKit()], max_epochs=1)  # max_epochs reached: fit only restores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(trainer, entry)(model, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert isinstance(trainer.strategy.checkpoint_io, ResumeKitCheckpointIO)
    for name, value in saved.items():
        assert torch.equal(model.state_dict()[name], value), name


# ------------------------------------------------------------------------ fit(ckpt_path=<missing>)


@pytest.mark.parametrize("kind", ["missing", "empty folder"])
def test_missing_checkpoint_keeps_lightnings_wording(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nothing.ckpt"
    if kind == "empty folder":
        path.mkdir()
    model = Lit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found") as info:
        _fit(_trainer(tmp_path, [ResumeKit()]), model, ckpt_path=path)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert str(path) in str(info.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# ------------------------------------------------------------------------ load_from_checkpoint


def test_load_from_checkpoint_builds_the_module_from_a_folder(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trained = Lit(width=6)
    _fit(_trainer(tmp_path, [ResumeKit(), mc], max_epochs=1), trained)
    path = tmp_path / "ckpt" / "last.ckpt"

    # Lightning's own method reads files only; it cannot open the folder.
    with pytest.raises(IsADirectoryError):
        Lit.load_from_checkpoint(path)

    model = load_from_checkpoint(Lit, path)
    assert isinstance(model, Lit) and model.hparams["width"] == 6
    assert load_from_checkpoint(Lit, path, map_location="cpu").net[0].weight.device.type == "cpu"
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    # kwargs override the saved hyper-parameters, as in Lightning (here into a shape the weights do not fit).
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_from_checkpoint(Lit, path, width=7)
    with pytest.raises(TypeError, match="map_location"):
        load_from_checkpoint(Lit, path, map_location={"cuda:0": "cpu"})  # type: ignore[arg-type]


def test_load_from_checkpoint_refuses_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "lightning.ckpt"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeCheckpointError, match="not a resumekit checkpoint folder"):
        load_from_checkpoint(Lit, path)


# ------------------------------------------------------------------------ strategies


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawning_strategies_need_the_plugin(tmp_path: Path, strategy: str) -> None:
    # The hook the workers run, called here directly: no process is started (test_lightning_spawn.py
    # runs the real thing).
    rk = ResumeKit()
    trainer = _trainer(tmp_path, [rk], strategy=strategy, devices=2)
    with pytest.raises(ValueError, match=r"plugins=\[rk\.checkpoint_io\]"):
        rk.setup(trainer, Lit(), "fit")
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO  # nothing installed

    rk = ResumeKit()
    trainer = _trainer(tmp_path, [rk], strategy=strategy, devices=2, plugins=[rk.checkpoint_io])
    rk.setup(trainer, Lit(), "fit")
    assert trainer.strategy.checkpoint_io is rk.checkpoint_io


def test_model_parallel_strategy_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    rk = ResumeKit()
    trainer = _trainer(tmp_path, [rk], strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="writes and reads its checkpoints itself"):
        rk.setup(trainer, Lit(), "fit")
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO

    trainer.strategy.connect(Lit())
    with pytest.raises(ValueError, match="writes and reads its checkpoints itself"):
        trainer.save_checkpoint(tmp_path / "early.ckpt")  # refused in on_save_checkpoint, before the write
    assert list(tmp_path.glob("*.ckpt")) == []


def test_fsdp_and_deepspeed_are_refused() -> None:
    # Neither builds a Trainer here (FSDP needs CUDA, DeepSpeed its package): the check sees the class.
    assert unsupported_strategy(FSDPStrategy()) is not None
    assert unsupported_strategy(object.__new__(DeepSpeedStrategy)) is not None
    assert unsupported_strategy(SingleDeviceStrategy("cpu")) is None
