"""The ResumeKit callback's wiring: plugin installation, run facts for drift, per-rank RNG records."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resumekit.rng import RNGState
from resumekit_lightning import ResumeKit, ResumeKitCheckpointIO

pytestmark = pytest.mark.lightning


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.lin(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        x = torch.ones(8, 2)
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=2)


def _fit(tmp: Path, callbacks: list[Any], ckpt_path: str | None = None, **kw: Any) -> Any:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(Tiny(), ckpt_path=ckpt_path)
    return trainer


def test_user_plugin_is_kept_and_run_facts_reach_the_checkpoint(tmp_path: Path) -> None:
    io = ResumeKitCheckpointIO(config={"batch_size": 2})
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _fit(tmp_path, [ResumeKit(), mc], max_steps=2, plugins=[io])
    assert trainer.strategy.checkpoint_io is io
    io.load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert io.last_restore is not None
    assert io.last_restore.config == {
        "batch_size": 2,
        "lightning": {"accumulate_grad_batches": 1, "world_size": 1},
    }


def test_plain_dataloader_draws_one_warning(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="not stateful") as caught:
        _fit(tmp_path, [ResumeKit()], max_epochs=2, enable_checkpointing=False)
    assert sum("not stateful" in str(w.message) for w in caught) == 1


def test_another_checkpoint_io_is_refused(tmp_path: Path) -> None:
    class OtherIO(TorchCheckpointIO):
        pass

    with pytest.raises(ValueError, match="already uses the CheckpointIO OtherIO"):
        _fit(tmp_path, [ResumeKit()], max_steps=1, plugins=[OtherIO()])


def test_changed_accumulation_is_reported_on_resume(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path, [ResumeKit(), mc], max_epochs=1)
    mc2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(UserWarning, match="accumulate_grad_batches"):
        _fit(tmp_path, [ResumeKit(), mc2], ckpt_path="last", max_epochs=2, accumulate_grad_batches=2)


def test_each_rank_restores_its_own_record_and_a_new_rank_is_told() -> None:
    torch.manual_seed(1)
    rank0 = RNGState().state_dict()
    torch.manual_seed(2)
    rank1 = RNGState().state_dict()
    state = {"format": 1, "world_size": 2, "rng": [rank0, rank1]}

    def start(rank: int) -> None:
        cb = ResumeKit()
        cb.load_state_dict(state)
        cb.on_train_start(SimpleNamespace(global_rank=rank, train_dataloader=None), None)  # type: ignore[arg-type]

    torch.manual_seed(99)
    start(1)
    assert torch.equal(torch.get_rng_state(), rank1["torch_cpu"])
    start(0)
    assert torch.equal(torch.get_rng_state(), rank0["torch_cpu"])
    before = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="rank 2 has none"):
        start(2)
    assert torch.equal(torch.get_rng_state(), before)
