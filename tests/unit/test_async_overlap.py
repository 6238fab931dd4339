"""save_async with overlapped staging: every kind of write right after the call leaves the committed
checkpoint equal to a snapshot taken at the call, under every staging mode; writes nothing intercepts
fail the save loudly; the write guard leaves the user's torch function modes alone."""

from __future__ import annotations

import copy
import errno
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import resumekit as rk
from resumekit.errors import StagingError
from resumekit.staging import buffers as _staging
from resumekit.storage import open_storage

# (staging, staging_budget): the old full copy, the default, a bounded pool, and no pool at all
# (every pending tensor is streamed by the writer straight from live memory).
MODES = [("copy", None), ("overlap", None), ("overlap", 3 << 20), ("overlap", 0)]


class Counter:
    """Python-only state (no tensors): captured at the call."""

    def __init__(self) -> None:
        self.seen = 0
        self.history: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seen, self.history = sd["seen"], list(sd["history"])


def _objects(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    # 1024x1024 float32 weights (4 MiB) are above the inline threshold: they are staged in the background.
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return {"model": model, "optimizer": opt, "scheduler": sched, "counter": Counter(), "extra": {"k": 1}}


def _train_step(state: dict[str, Any]) -> None:
    model, opt = state["model"], state["optimizer"]
    loss = model(torch.randn(4, 1024)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _frozen(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (copy.deepcopy(v) if isinstance(v, dict) else copy.deepcopy(v.state_dict()))
        for k, v in state.items()
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the background copier until the test releases it, so the writes below really come first."""
    event = threading.Event()
    original = _staging.OverlapStager._copy_all

    def held(self: _staging.OverlapStager) -> None:
        event.wait(timeout=30)
        original(self)

    monkeypatch.setattr(_staging.OverlapStager, "_copy_all", held)
    return event


def _mutate_everything(state: dict[str, Any]) -> None:
    other = _objects(seed=1)
    _train_step(other)
    _train_step(state)  # forward, backward, optimizer step: every parameter and moment
    with torch.no_grad():
        for p in state["model"].parameters():
            p.mul_(3.0)  # an in-place op on a parameter
        state["model"][0].weight[0, :5] = 7.0  # __setitem__ on a view of a parameter
        torch._foreach_add_(list(state["model"].parameters()), 1.0)
    state["scheduler"].step()
    state["counter"].seen += 5
    state["counter"].history.append(3)
    state["extra"]["k"] = 99
    state["model"].load_state_dict(other["model"].state_dict())  # copy_ into every parameter
    state["optimizer"].load_state_dict(other["optimizer"].state_dict())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("staging", "budget"), MODES)
def test_checkpoint_holds_the_values_of_the_call(
    tmp_path: Path, gate: threading.Event, staging: str, budget: int | None
) -> None:
    state = _objects()
    _train_step(state)  # optimizer moments exist
    state["scheduler"].step()
    state["counter"].seen, state["counter"].history = 2, [1]
    expected = _frozen(state)
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async(state, step=1, staging=staging, staging_budget=budget)
        stager = ckpt._async.guard.stager
        if staging == "overlap":
            assert stager is not None and stager.pending  # the copies had not run when writes began
        else:
            assert stager is None  # everything was copied at the call: nothing to guard
        releaser = threading.Timer(0.2, gate.set)  # budget 0 needs no copier; others get it late
        releaser.start()
        _mutate_everything(state)
        releaser.join()
        info = ckpt.wait()
        if budget is not None:
            assert ckpt._async.buffers.peak_bytes <= budget  # large tensors never took more than the budget
    assert info is not None and info.step == 1
    fresh = _objects(seed=2)
    rk.Checkpointer(tmp_path).restore(fresh)
    _assert_same(_frozen(fresh), expected, "restored")


@pytest.mark.timeout(60)
def test_a_write_nothing_intercepts_fails_the_save_loudly(tmp_path: Path, gate: threading.Event) -> None:
    state = _objects()
    weight = state["model"][0].weight
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async({"model": state["model"]}, step=1)

        def elsewhere() -> None:  # another thread: the write guard (thread-local) does not see it
            with torch.no_grad():
                weight.add_(1.0)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join(timeout=30)
        gate.set()
        with pytest.raises(StagingError, match=r"'model' tensor '0\.weight'"):
            ckpt.wait()
        assert ckpt.steps() == []  # nothing committed: the new value never became a checkpoint


@pytest.mark.timeout(60)
def test_wait_staged_makes_any_write_safe(tmp_path: Path) -> None:
    state = _objects()
    expected = copy.deepcopy(state["model"].state_dict())
    with rk.Checkpointer(tmp_path) as ckpt:
        ckpt.save_async({"model": state["model"]}, step=1)
        ckpt.wait_staged()
        assert ckpt._async.guard.stager is None  # disarmed: nothing is pending

        def elsewhere() -> None:
            with torch.no_grad():
                for p in state["model"].parameters():
                    p.zero_()

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join(timeout=30)
        ckpt.wait()
    fresh = _objects(seed=3)
    rk.Checkpointer(tmp_path).restore({"model": fresh["model"]})
    _assert_same(fresh["model"].state_dict(), expected)


@pytest.mark.timeout(60)
def test_guard_leaves_the_users_function_modes_in_order(tmp_path: Path, gate: threading.Event) -> None:
    state = _objects()
    depth = torch._C._len_torch_function_stack()
    with rk.Checkpointer(tmp_path) as ckpt:
        with torch.device("cpu"):  # a TorchFunctionMode entered before the call, exited while armed
            ckpt.save_async({"model": state["model"]}, step=1)
            assert torch._C._len_torch_function_stack() == depth + 2
        assert torch._C._len_torch_function_stack() == depth + 1  # ours stayed, the user's was popped
        assert type(torch._C._get_function_stack_at(0)).__name__ == "_WriteGuardMode"
        gate.set()
        _train_step(state)  # the step waits for the copies, then the guard removes itself
        assert torch._C._len_torch_function_stack() == depth
        ckpt.wait()


class _FullDisk:
    """Storage whose stage() fails with ENOSPC: the background writer fails before any tensor."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def stage(self, step: int, writer_id: str) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.timeout(60)
def test_writer_failure_releases_a_waiting_training_thread(tmp_path: Path) -> None:
    # Budget 0: no tensor is copied; each would be streamed by the writer, which fails first. A write
    # waiting for the writer to pass its tensor must be released, not hang.
    state = _objects()
    with rk.Checkpointer(tmp_path, storage=_FullDisk(open_storage(str(tmp_path)))) as ckpt:
        ckpt.save_async({"model": state["model"]}, step=1, staging_budget=0)
        done = threading.Event()

        def write() -> None:
            with torch.no_grad():
                state["model"][0].weight.add_(1.0)
            done.set()

        write()
        assert done.is_set()
        with pytest.raises(OSError) as err:
            ckpt.wait()
        assert err.value.errno == errno.ENOSPC


def test_bad_staging_options_are_refused_before_anything_happens(tmp_path: Path) -> None:
    state = _objects()
    ckpt = rk.Checkpointer(tmp_path)
    cases: list[tuple[Callable[[], None], str]] = [
        (lambda: ckpt.save_async(state, step=1, staging="lazy"), "staging must be one of"),
        (lambda: ckpt.save_async(state, step=1, staging_budget=-1), "staging_budget"),
        (
            lambda: ckpt.save_async(state, step=1, staging="copy", staging_budget=1 << 20),
            "bounds staging='overlap' only",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert ckpt.steps() == [] and ckpt._async.guard.stager is None
    ckpt.close()
