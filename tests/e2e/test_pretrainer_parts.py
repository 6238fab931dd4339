"""The pretrainer's pure pieces: schedule arithmetic, the stop budget, history records, URLs, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load

from reference_trainer import history as hist
from reference_trainer.model import ProfileEncoder
from reference_trainer.outputs import final_model_bytes, json_bytes
from reference_trainer.resume import split_step_url
from reference_trainer.schedule import StopBudget, optimizer_steps_per_epoch, warmup_cosine, window_size


@pytest.mark.parametrize(("micro", "accum"), [(14, 3), (12, 3), (1, 4), (7, 1)])
def test_windows_cover_the_epoch_and_match_the_optimizer_step_count(micro: int, accum: int) -> None:
    in_window, steps, weights = 0, 0, []
    for left in range(micro, 0, -1):
        size = window_size(in_window, left, accum)
        weights.append(1 / size)
        in_window += 1
        if in_window == size:
            steps, in_window = steps + 1, 0
    assert in_window == 0, "an epoch never ends inside a window"
    assert steps == optimizer_steps_per_epoch(micro, accum)
    # Each window's micro-batch weights sum to 1: its gradient is a mean, also for a short last window.
    assert math.isclose(sum(weights), steps)


def test_warmup_then_cosine_reaches_zero_exactly_at_the_last_step() -> None:
    f = warmup_cosine(total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(10) == 0.0 and 0.0 < f(9) < f(5) < 1.0


def test_stop_budget_stops_for_epochs_and_before_the_time_runs_out() -> None:
    epochs = StopBudget(max_micro=3, seconds=None, started=0.0)
    epochs.trained = 2
    assert epochs.reason(1e9, epoch_ends_next=True) is None
    epochs.trained = 3
    assert epochs.reason(0.0, epoch_ends_next=False) == "max-epochs-per-run"
    clock = StopBudget(max_micro=None, seconds=10.0, started=0.0, finish_reserve=1.0)
    assert clock.reason(9.9, epoch_ends_next=False) is None, "always at least one micro-batch per run"
    clock.trained, clock.slowest_micro, clock.slowest_save, clock.slowest_validation = 5, 1.0, 1.0, 2.0
    assert clock.reason(5.9, epoch_ends_next=False) is None  # 5.9 + 1.5 * 2 + 1 < 10
    assert clock.reason(6.1, epoch_ends_next=False) == "time-budget"
    assert clock.reason(3.0, epoch_ends_next=True) == "time-budget"  # + 1.5 * validation


def test_history_replaces_a_retrained_epoch_and_only_complete_says_complete() -> None:
    h = hist.new_history(3)
    hist.record_epoch(h, {"epoch": 1, "val_loss": 0.5})
    hist.record_epoch(h, {"epoch": 2, "val_loss": 0.4})
    hist.record_epoch(h, {"epoch": 2, "val_loss": 0.4})  # re-trained after a resume from before its end
    assert [r["epoch"] for r in h["epochs"]] == [1, 2] and h["last_completed_epoch"] == 2
    for status in ("running", "incomplete", "failed"):
        hist.set_status(h, status)
        assert h["complete"] is False
    hist.set_status(h, "complete", reason="complete")
    assert h["complete"] is True
    with pytest.raises(ValueError, match="unknown history status"):
        hist.set_status(h, "done")


def test_history_json_is_strict_json() -> None:
    h = hist.new_history(1)
    hist.record_epoch(h, {"epoch": 1, "val_loss": float("nan"), "val_spread_ratio": float("inf")})
    record = json.loads(json_bytes(h))["epochs"][0]
    assert record["val_loss"] is None and record["val_spread_ratio"] is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("runs/a/checkpoints/step-000000000120", ("runs/a/checkpoints", 120)),
        ("s3://b/run/checkpoints/step-000000000007/", ("s3://b/run/checkpoints", 7)),
        ("runs/a/checkpoints", ("runs/a/checkpoints", None)),
        ("step-000000000003", ("step-000000000003", None)),
    ],
)
def test_split_step_url(url: str, expected: tuple[str, int | None]) -> None:
    assert split_step_url(url) == expected


def test_final_model_bytes_are_deterministic_plain_safetensors() -> None:
    torch.manual_seed(0)
    model = ProfileEncoder(8, hidden_dims=(4,), embedding_dim=3)
    meta = {"last_epoch": 3, "early_stopped": False, "model": {"b": 1, "a": [2]}, "format": "x"}
    data = final_model_bytes(model, meta)
    # Same weights and metadata in any order: the same bytes (safetensors' own writer orders the header's
    # metadata arbitrarily, which would break a bitwise comparison of two runs).
    assert final_model_bytes(model, dict(reversed(list(meta.items())))) == data
    # A state dict (what --fsdp gathers) writes the same bytes as the model it came from.
    assert final_model_bytes(dict(reversed(list(model.state_dict().items()))), meta) == data
    loaded = load(data)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert (
        header["__metadata__"]["last_epoch"] == "3" and header["__metadata__"]["model"] == '{"a":[2],"b":1}'
    )
