"""Partial restore, shape mismatches and canonical keys through the Checkpointer (issue 5 items 3-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.errors import StateMismatchError

WARMUP, TOTAL = 5, 40


def _lr(step: int) -> float:
    return (step + 1) / WARMUP if step < WARMUP else max(0.0, 1 - (step - WARMUP) / (TOTAL - WARMUP))


def _setup(vocab: int = 10) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}


def _train(state: dict, steps: int) -> None:
    model, opt, sched, scaler = state["model"], state["optimizer"], state["scheduler"], state["scaler"]
    for i in range(steps):
        opt.zero_grad()
        loss = model(torch.tensor([i % 10, (i * 3) % 10])).pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def test_weights_only_resets_the_group_and_moves_the_scheduler(tmp_path: Path) -> None:
    saved = _setup()
    _train(saved, 17)
    with torch.no_grad():
        saved["scaler"]._scale.fill_(8.0)  # as if it had backed off: the reset must undo it
    rk.Checkpointer(tmp_path).save(saved, step=17)

    fresh = _setup()
    result = rk.Checkpointer(tmp_path).restore(fresh, only=["model"])
    assert result is not None and set(result.reset) == {"optimizer", "scheduler", "scaler"}
    for a, b in zip(saved["model"].parameters(), fresh["model"].parameters()):
        assert torch.equal(a, b)
    assert fresh["optimizer"].state_dict()["state"] == {}
    assert fresh["scaler"].get_scale() == 1024.0
    # The learning rate equals an uninterrupted scheduler's at the restored step.
    reference = _setup()
    _train(reference, 17)
    assert fresh["scheduler"].last_epoch == reference["scheduler"].last_epoch == 17
    assert fresh["optimizer"].param_groups[0]["lr"] == reference["optimizer"].param_groups[0]["lr"]
    assert fresh["scheduler"].get_last_lr() == reference["scheduler"].get_last_lr()


def test_only_refuses_to_split_the_optimisation_group(tmp_path: Path) -> None:
    state = _setup()
    rk.Checkpointer(tmp_path).save(state, step=1)
    with pytest.raises(ValueError, match=r"restores \['optimizer'\] but not \['scheduler', 'scaler'\]"):
        rk.Checkpointer(tmp_path).restore(_setup(), only=["model", "optimizer"])


def test_shape_mismatch_names_parameter_shapes_and_option_and_loads_nothing(tmp_path: Path) -> None:
    state = _setup(vocab=10)
    rk.Checkpointer(tmp_path).save(state, step=1)
    grown = _setup(vocab=12)  # the vocabulary grew
    with torch.no_grad():
        grown["model"][1].weight.fill_(7.0)
    with pytest.raises(StateMismatchError) as err:
        rk.Checkpointer(tmp_path).restore(grown, only=["model"])
    msg = str(err.value)
    assert "0.weight: checkpoint [10, 4], model [12, 4]" in msg
    assert "allow_shape_mismatch=True" in msg
    assert torch.all(grown["model"][1].weight == 7.0)  # nothing was loaded

    result = rk.Checkpointer(tmp_path).restore(grown, only=["model"], allow_shape_mismatch=True)
    assert result is not None and result.skipped_tensors == ("0.weight",)
    assert torch.equal(grown["model"][1].weight, state["model"][1].weight)


def test_wrapped_and_unwrapped_models_load_each_other(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    wrapped = nn.DataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    rk.Checkpointer(tmp_path / "a").save({"model": wrapped}, step=1)
    names = list(
        __import__("safetensors.torch").torch.load_file(
            str(tmp_path / "a/step-000000000001/model.safetensors")
        )
    )
    assert all(not n.startswith("module.") for n in names)  # canonical names on disk
    rk.Checkpointer(tmp_path / "a").restore({"model": plain})
    for a, b in zip(plain.state_dict().values(), wrapped.module.state_dict().values()):
        assert torch.equal(a, b)
    rk.Checkpointer(tmp_path / "b").save({"model": plain}, step=1)
    again = nn.DataParallel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    rk.Checkpointer(tmp_path / "b").restore({"model": again})
    for a, b in zip(plain.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(a, b)


def test_dataset_shorter_than_saved_position_fails_before_anything_loads(tmp_path: Path) -> None:
    data = list(range(100))
    sampler = rk.ResumableSampler(data, seed=0)
    it = iter(sampler)
    for _ in range(60):
        next(it)
    model = nn.Linear(2, 2)
    rk.Checkpointer(tmp_path).save({"model": model, "sampler": sampler}, step=60)

    fresh = nn.Linear(2, 2)
    with torch.no_grad():
        fresh.weight.fill_(3.0)
    shorter = rk.ResumableSampler(list(range(50)), seed=0)
    with pytest.raises(StateMismatchError, match=r"global sample 60 of epoch 0 of a dataset of length 100"):
        rk.Checkpointer(tmp_path).restore({"model": fresh, "sampler": shorter})
    assert torch.all(fresh.weight == 3.0)  # the model was not touched
