"""Issue 18: ``strategy="ddp_spawn"`` (2 CPU processes, gloo).

The worker hands the final weights to the main process through the Trainer's CheckpointIO, and the main
process runs no callback hook. With only the callback this is refused in the workers' ``setup``, before
anything is trained or written; with ``plugins=[rk.checkpoint_io]`` both processes use resumekit's IO.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resumekit_lightning import ResumeKit, load_checkpoint

pytestmark = [pytest.mark.lightning, pytest.mark.distributed, pytest.mark.timeout(240)]


class SpawnLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _fit(tmp: Path, model: SpawnLit, rk: ResumeKit, plugins: list[Any] | None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[rk, ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)],
        plugins=plugins,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)


def test_ddp_spawn_with_the_callback_alone_is_refused_before_training(tmp_path: Path) -> None:
    model = SpawnLit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match=r"plugins=\[rk\.checkpoint_io\]") as info:
        _fit(tmp_path, model, ResumeKit(), None)
    assert "IsADirectoryError" not in str(info.value)
    assert not (tmp_path / "ckpt").exists()  # refused before the first save
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_ddp_spawn_with_the_plugin_returns_the_final_weights(tmp_path: Path) -> None:
    rk = ResumeKit()
    model = SpawnLit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(tmp_path, model, rk, [rk.checkpoint_io])
    last = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 2  # 16 samples, batch 4, 2 ranks
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), name  # trained in the worker ...
        assert torch.equal(value, last["state_dict"][name]), name  # ... and handed back to the main process
