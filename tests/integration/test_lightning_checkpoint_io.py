"""ResumeKitCheckpointIO under a real Lightning Trainer: ModelCheckpoint, top-k, "last", portability, drift."""

from __future__ import annotations

import pickle
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

from resumekit import Checkpointer, DriftPolicy
from resumekit.errors import (
    CheckpointNotFoundError,
    DriftError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from resumekit.rng import RNGState
from resumekit_lightning import ResumeKit, ResumeKitCheckpointIO, load_checkpoint
from resumekit_lightning._gather import pack, unpack
from resumekit_lightning._layout import from_entries, to_entries

pytestmark = pytest.mark.lightning


class Lit(pl.LightningModule):
    def __init__(self, width: int = 8, tag: Any = "plain") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Dropout(0.2), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3)}

    def train_dataloader(self) -> Any:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)

    def val_dataloader(self) -> Any:
        x = torch.ones(8, 4)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp: Path, callbacks: list[Any], **kw: Any) -> Any:
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
        callbacks=callbacks,
        **kw,
    )


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def _assert_no_pickle(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in (".json", ".safetensors"), path
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


def test_top_k_last_remove_and_resume_from_last(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    mc = ModelCheckpoint(
        dirpath=ckpt_dir, monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True
    )
    trainer = _trainer(tmp_path, [ResumeKit(), mc])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Lit())
    assert trainer.global_step == 12

    # save_top_k=2: exactly the two best paths exist, each a folder with one committed step; the others
    # Lightning saved along the way were removed through remove_checkpoint.
    kept = {Path(p).name for p in mc.best_k_models}
    assert len(kept) == 2
    on_disk = {p.name for p in ckpt_dir.iterdir()}
    assert on_disk == kept | {"last.ckpt"}
    for name in on_disk:
        assert len(_steps(ckpt_dir / name)) == 1, name
    # last.ckpt was saved over several times: only its newest step is left.
    assert _steps(ckpt_dir / "last.ckpt") == [f"step-{12:012d}"]
    _assert_no_pickle(ckpt_dir)

    # ckpt_path="last" resolves to the folder and resumes at its step.
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen["step"] = trainer.global_step
            seen["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    mc2 = ModelCheckpoint(
        dirpath=ckpt_dir, monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True
    )
    model2 = Lit()
    trainer2 = _trainer(tmp_path, [ResumeKit(), mc2, Probe()], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.fit(model2, ckpt_path="last")
    assert seen["step"] == 12
    saved = load_checkpoint(ckpt_dir / "last.ckpt")
    assert trainer2.global_step == saved["global_step"] == 18
    first = load_checkpoint(str(ckpt_dir / "last.ckpt"))["state_dict"]
    assert first.keys() == seen["weights"].keys()

    # "best" goes through the plugin too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.validate(model2, ckpt_path="best")
    assert trainer2.ckpt_path == mc2.best_model_path


def test_checkpoint_dict_round_trips_with_lists_and_hparams(tmp_path: Path) -> None:
    io = ResumeKitCheckpointIO()
    opt_states = [
        {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ] * 2
    ckpt: dict[str, Any] = {
        "epoch": 1,
        "global_step": 7,
        "state_dict": {"w": torch.arange(3.0)},
        "optimizer_states": opt_states,
        "lr_schedulers": [],
        "hyper_parameters": {"path": Path("/data/x"), "sizes": (1, 2), "ns": {"a": 1}},
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}},
    }
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")
    io.save_checkpoint(ckpt, tmp_path / "a.ckpt")  # same global step again: a newer step, the old one gone
    assert _steps(tmp_path / "a.ckpt") == [f"step-{8:012d}"]
    back = io.load_checkpoint(tmp_path / "a.ckpt")
    assert set(back) == set(ckpt)
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert len(back["optimizer_states"]) == 2 and back["lr_schedulers"] == []
    assert torch.equal(back["optimizer_states"][1]["state"][0]["momentum_buffer"], torch.ones(2))
    assert back["hyper_parameters"] == {"path": "/data/x", "sizes": (1, 2), "ns": {"a": 1}}
    assert back["loops"] == ckpt["loops"]
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists() and list(tmp_path.iterdir()) == []


def test_unstorable_hparam_is_named_or_stored_as_repr() -> None:
    ckpt = {"state_dict": {}, "hyper_parameters": {"encoder": nn.Linear(1, 1), "lr": 0.1}}
    with pytest.raises(UnsupportedValueError, match=r"hyper_parameters\.encoder.*ignore=\['encoder'\]"):
        to_entries(ckpt)
    with pytest.warns(RuntimeWarning, match="encoder"):
        entries = to_entries(ckpt, unsupported_hparams="repr")
    values = {name: h.value for name, h in entries.items()}
    hp = from_entries(values, lightning_version="x")["hyper_parameters"]
    assert hp["lr"] == 0.1 and hp["encoder"].startswith("Linear(")


def test_torch_save_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(UnsafeCheckpointError, match="never reads pickles"):
        ResumeKitCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointNotFoundError):
        ResumeKitCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_config_drift_warns_or_refuses_before_loading(tmp_path: Path) -> None:
    ckpt = {"global_step": 1, "state_dict": {"w": torch.zeros(1)}}
    ResumeKitCheckpointIO(config={"batch_size": 4}).save_checkpoint(ckpt, tmp_path / "c.ckpt")
    with pytest.warns(UserWarning, match="batch_size"):
        ResumeKitCheckpointIO(config={"batch_size": 8}).load_checkpoint(tmp_path / "c.ckpt")
    strict = ResumeKitCheckpointIO(
        config={"batch_size": 8}, drift_policy=DriftPolicy({"config.batch_size": "error"})
    )
    with pytest.raises(DriftError, match="batch_size"):
        strict.load_checkpoint(tmp_path / "c.ckpt")
    assert strict.last_restore is None


def test_plain_checkpointer_run_continues_under_lightning(tmp_path: Path) -> None:
    # A plain loop trains the module and checkpoints it with the core Checkpointer.
    torch.manual_seed(0)
    plain = Lit()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        for batch in plain.train_dataloader():
            opt.zero_grad()
            plain.training_step(batch, 0).backward()
            opt.step()
    Checkpointer(tmp_path / "plain").save({"model": plain, "optimizer": opt}, step=6)

    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["momentum"] = [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values()]

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, [ResumeKit(), Probe()], max_steps=1).fit(Lit(), ckpt_path=str(tmp_path / "plain"))
    for k, v in plain.state_dict().items():
        assert torch.equal(seen["weights"][k], v), k
    expected = [s["momentum_buffer"] for s in opt.state.values()]
    assert len(seen["momentum"]) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["momentum"], expected))


def test_lightning_checkpoint_restores_in_a_plain_loop(tmp_path: Path) -> None:
    model = Lit()
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(tmp_path, [ResumeKit(), mc], max_epochs=1)
        trainer.fit(model)
    fresh = Lit()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    result = Checkpointer(tmp_path / "ckpt" / "last.ckpt").restore(
        {"model": fresh, "optimizer": opt}, strict=False
    )
    assert result is not None and result.step == trainer.global_step
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    trained = trainer.optimizers[0].state_dict()["state"]
    assert all(
        torch.equal(opt.state_dict()["state"][i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in trained.items()
    )


def test_rng_record_survives_the_pickle_free_gather_encoding() -> None:
    gen = torch.Generator().manual_seed(5)
    record = RNGState({"g": gen}).state_dict()
    back = unpack(pack(record))
    rng = RNGState({"g": torch.Generator()})
    rng.load_state_dict(back)
    restored = rng.generators["g"]
    assert isinstance(restored, torch.Generator)
    assert torch.equal(restored.get_state(), gen.get_state())
    assert torch.equal(back["torch_cpu"], record["torch_cpu"])


def test_failed_first_save_leaves_no_checkpoint_path(tmp_path: Path) -> None:
    io = ResumeKitCheckpointIO()
    # The model entry is written before the bad value in the 'lightning' entry is reached.
    bad = {"global_step": 3, "state_dict": {"w": torch.ones(2)}, "extra": object()}
    with pytest.raises(UnsupportedValueError, match="extra"):
        io.save_checkpoint(bad, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []  # neither last.ckpt nor hidden debris

    # Debris of a first save killed before its rename is ignored by "last" and removed by the next save,
    debris = tmp_path / ".last.ckpt.partial-0123456789ab"
    (debris / "step-000000000001").mkdir(parents=True)
    # ... and so is a removal killed between hiding the folder and deleting it.
    (tmp_path / ".epoch=0-step=5.ckpt.deleting-0123abcd" / "step-000000000005").mkdir(parents=True)
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert _steps(tmp_path / "last.ckpt") == [f"step-{4:012d}"]


def test_save_last_link_points_at_a_checkpoint_folder(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last="link", every_n_train_steps=3, save_top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(tmp_path, [ResumeKit(), mc], max_epochs=1)
        trainer.fit(Lit())
    link = tmp_path / "ckpt" / "last.ckpt"
    assert link.is_symlink() and (link.parent / link.readlink()).is_dir()
    assert load_checkpoint(link)["global_step"] == trainer.global_step == 6
