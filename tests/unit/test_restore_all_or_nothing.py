"""A restore applies completely or not at all (issue 16 item 4, issue 14 item 5).

Every refusal comes before any object changes: each test compares every tensor and the optimizer,
scheduler, scaler, sampler and dict state before and after. What can still fail after the plan (an
object's own ``load_state_dict``) names the entry, what was applied, and chains the cause.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import resumekit as rk
from resumekit.drift import DriftWarning
from resumekit.errors import DriftError, ResumeKitError, StateMismatchError
from resumekit.testing.strategies import assert_identical

SAVED_STEP = 17


def _state(seed: int, *, plateau: bool = False, vocab: int = 10, sampler_len: int = 100) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched: Any = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        if plateau
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    )
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0),
        "sampler": rk.ResumableSampler(list(range(sampler_len)), seed=seed),
        "progress": {"epoch": seed},
    }


def _train(state: dict[str, Any], steps: int) -> None:
    model, opt, sched, scaler = state["model"], state["optimizer"], state["scheduler"], state["scaler"]
    it = iter(state["sampler"])
    for i in range(steps):
        next(it)
        opt.zero_grad()
        loss = model(torch.tensor([i % 10, (i * 3) % 10])).pow(2).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()


def _saved(root: Path, **kwargs: Any) -> dict[str, Any]:
    state = _state(1, **kwargs)
    _train(state, SAVED_STEP)
    rk.Checkpointer(root, config={"lr": 0.1}).save(state, step=SAVED_STEP)
    return state


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Deep copies of every entry's state: tensors, optimizer moments, scheduler and scaler fields."""
    out: dict[str, Any] = {}
    for name, obj in state.items():
        sd = obj.state_dict() if hasattr(obj, "state_dict") else obj
        out[name] = copy.deepcopy(dict(sd) if isinstance(obj, nn.Module) else sd)
    # The live tensors themselves, not only what state_dict() reports about them.
    out["model.parameters"] = [p.detach().clone() for p in state["model"].parameters()]
    return out


def assert_unchanged(before: dict[str, Any], state: dict[str, Any]) -> None:
    assert_identical(before, snapshot(state))


def _drift_error(root: Path, state: dict[str, Any]) -> None:
    strict = rk.Checkpointer(root, config={"lr": 0.2}, drift_policy=rk.DriftPolicy({"config.lr": "error"}))
    strict.restore(state)


def _restore(root: Path, state: dict[str, Any]) -> None:
    rk.Checkpointer(root, config={"lr": 0.1}).restore(state)


REFUSALS: dict[str, tuple[type[Exception], str, Callable[[Path, dict[str, Any]], None]]] = {
    "drift": (DriftError, r"config\.lr", _drift_error),
    "shape": (StateMismatchError, r"0\.weight: checkpoint \[10, 4\], model \[12, 4\]", _restore),
    "only-splits-group": (
        StateMismatchError,
        r"restores \['optimizer'\] but not \['scheduler', 'scaler'\]",
        lambda root, s: rk.Checkpointer(root).restore(s, only=["model", "optimizer"]),
    ),
    "only-unknown": (
        StateMismatchError,
        r"only= names \['modle'\]",
        lambda root, s: rk.Checkpointer(root).restore(s, only=["modle"]),
    ),
    "strict-missing": (
        StateMismatchError,
        r"has no entries \['extra'\].*strict=False",
        lambda root, s: rk.Checkpointer(root).restore({**s, "extra": {"a": 1}}),
    ),
    "validate-hook": (
        StateMismatchError,
        r"dataset of length 100",
        lambda root, s: rk.Checkpointer(root).restore(
            {**s, "sampler": rk.ResumableSampler(list(range(5)), seed=0)}
        ),
    ),
}


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
def test_every_refusal_leaves_every_object_unchanged(tmp_path: Path, refusal: str) -> None:
    _saved(tmp_path)
    error, match, restore = REFUSALS[refusal]
    live = _state(2, vocab=12 if refusal == "shape" else 10)  # "shape": the vocabulary grew
    _train(live, 3)  # live state differs from the checkpoint everywhere
    before = snapshot(live)
    with pytest.raises(error, match=match) as info:
        restore(tmp_path, live)
    assert isinstance(info.value, ResumeKitError)
    assert_unchanged(before, live)


def test_a_scheduler_stepped_past_the_restored_step_is_refused_before_the_model_changes(
    tmp_path: Path,
) -> None:
    # Before: a bare ValueError raised by the reset, after the weights had been overwritten.
    _saved(tmp_path)
    live = _state(2)
    _train(live, SAVED_STEP + 5)
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=r"'scheduler'.*stepped 22 times, past the restored step 17"):
        rk.Checkpointer(tmp_path).restore(live, only=["model"])
    assert_unchanged(before, live)


def test_weights_only_with_reduce_lr_on_plateau_resets_it_with_a_warning(tmp_path: Path) -> None:
    # Before: a bare ValueError raised after the model's weights were overwritten.
    saved = _saved(tmp_path, plateau=True)
    live = _state(2, plateau=True)
    scheduler_before = copy.deepcopy(live["scheduler"].state_dict())
    with pytest.warns(UserWarning, match=r"'scheduler' is a ReduceLROnPlateau.*reset.*include the optimizer"):
        result = rk.Checkpointer(tmp_path).restore(live, only=["model"])
    assert result is not None and set(result.reset) == {"optimizer", "scheduler", "scaler"}
    assert_identical(dict(saved["model"].state_dict()), dict(live["model"].state_dict()))
    assert live["optimizer"].state_dict()["state"] == {}
    assert live["scaler"].get_scale() == 1024.0
    assert_identical(scheduler_before, live["scheduler"].state_dict())  # as passed: fresh


def test_reduce_lr_on_plateau_restored_with_its_optimizer_keeps_its_schedule(tmp_path: Path) -> None:
    saved = _saved(tmp_path, plateau=True)
    live = _state(2, plateau=True)
    rk.Checkpointer(tmp_path).restore(live)
    assert_identical(saved["scheduler"].state_dict(), live["scheduler"].state_dict())


class _Broken:
    """An entry whose own load_state_dict raises (e.g. its class changed since the save)."""

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise RuntimeError("version 1 is not supported any more")


def test_an_entry_whose_load_state_dict_raises_is_named_with_what_was_applied(tmp_path: Path) -> None:
    # Before: the bare RuntimeError, without the entry's name or what had been loaded.
    saved = _saved(tmp_path)
    state = {**_state(1), "broken": _Broken()}
    rk.Checkpointer(tmp_path).save({**saved, "broken": _Broken()}, step=SAVED_STEP + 1)
    with pytest.raises(StateMismatchError) as info:
        rk.Checkpointer(tmp_path).restore(state)
    msg = str(info.value)
    assert "'broken'" in msg and "version 1 is not supported" in msg
    assert "['model', 'optimizer', 'scheduler', 'scaler', 'sampler', 'progress']" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


class _Validated(dict):  # type: ignore[type-arg]
    """A dict entry with a validate hook that counts its calls."""

    def __init__(self) -> None:
        super().__init__(value=0)
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.update(state)

    def resumekit_validate(self, state: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return state


@pytest.mark.parametrize("verify_first", [False, True])
def test_validate_hooks_are_called_once(tmp_path: Path, verify_first: bool) -> None:
    # Before: twice on the in-place path (once to decide it, once before applying).
    model = nn.Linear(3, 3)
    rk.Checkpointer(tmp_path).save({"model": model, "counted": _Validated()}, step=1)
    target = _Validated()
    rk.Checkpointer(tmp_path).restore(
        {"model": nn.Linear(3, 3), "counted": target}, verify_first=verify_first
    )
    assert target.calls == 1 and dict(target) == {"value": 0}


def test_drift_warnings_still_reach_the_user_when_the_restore_applies(tmp_path: Path) -> None:
    _saved(tmp_path)
    live = _state(2)
    with pytest.warns(DriftWarning, match="config.lr"):
        result = rk.Checkpointer(tmp_path, config={"lr": 0.3}).restore(live)
    assert result is not None and [i.key for i in result.drift.warnings] == ["config.lr"]


def test_an_rng_record_this_process_cannot_restore_is_refused_before_the_model_changes(
    tmp_path: Path,
) -> None:
    # Before: RNGState refused only when applied (last, after every other entry had been loaded).
    saved = _saved(tmp_path)
    rng = rk.RNGState()
    rng.register("augment", torch.Generator().manual_seed(3))
    rk.Checkpointer(tmp_path).save({**saved, "rng": rng}, step=SAVED_STEP + 1)
    live = _state(2)
    _train(live, 3)
    other_kind = rk.RNGState()
    other_kind.register("augment", random.Random(3))  # registered as another kind of generator
    before = snapshot(live)
    torch_before, python_before = torch.get_rng_state(), random.getstate()
    with pytest.raises(
        StateMismatchError, match=r"generators\['augment'\].*torch\.Generator.*random\.Random"
    ):
        rk.Checkpointer(tmp_path).restore({**live, "rng": other_kind})
    assert_unchanged(before, live)
    assert torch.equal(torch_before, torch.get_rng_state()) and python_before == random.getstate()


def test_gradients_that_do_not_fit_are_refused_before_the_model_changes(tmp_path: Path) -> None:
    # Before: with allow_shape_mismatch=True the model loaded what fitted, then the gradients raised.
    saved = _saved(tmp_path)
    saved["model"](torch.tensor([1, 2])).pow(2).sum().backward()
    grads = {"grads": rk.AccumulatedGradients(saved["model"])}
    rk.Checkpointer(tmp_path).save({**saved, **grads}, step=SAVED_STEP + 1)
    live = _state(2, vocab=12)  # the vocabulary grew: the embedding's gradient no longer fits
    _train(live, 3)
    before = snapshot(live)
    grads_before = [None if p.grad is None else p.grad.clone() for p in live["model"].parameters()]
    with pytest.raises(StateMismatchError, match=r"gradient of '0\.weight' has shape \(10, 4\)"):
        rk.Checkpointer(tmp_path).restore(
            {**live, "grads": rk.AccumulatedGradients(live["model"])}, allow_shape_mismatch=True
        )
    assert_unchanged(before, live)
    assert_identical(grads_before, [None if p.grad is None else p.grad for p in live["model"].parameters()])
