"""Shared helpers for the Checkpointer-level storage tests: one view of every backend, and test state.

A :class:`Backend` pairs a checkpoint URL (what a user passes to ``Checkpointer``) with a raw fsspec
filesystem on the same bytes, so a test can look at and damage the store behind resumekit's back.
"""

from __future__ import annotations

import copy
import fnmatch
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resumekit.testing.strategies import assert_identical

__all__ = ["Backend", "HookedStorage", "assert_restored", "make_state", "snapshot", "step_dir"]


def step_dir(step: int) -> str:
    """The folder name of ``step`` (the on-storage layout is part of the documented format)."""
    return f"step-{step:012d}"


@dataclass
class Backend:
    """A checkpoint root seen two ways: by resumekit (``url``) and raw (``fs`` + ``root``).

    Attributes:
        name: ``local``, ``memory``, ``s3`` or ``gcs``.
        url: What a user passes to ``Checkpointer``.
        options: ``storage_options`` for ``Checkpointer`` (None for local disk and memory).
        fs: A raw fsspec filesystem over the same bytes.
        root: ``url`` as a path of ``fs``.
    """

    name: str
    url: str
    options: dict[str, Any] | None
    fs: Any
    root: str

    @property
    def object_store(self) -> bool:
        """True for backends without rename (data go under ``w-<writer>/``, the manifest is PUT last)."""
        return self.name != "local"

    def path(self, step: int, rel: str = "") -> str:
        """Raw path of ``rel`` inside ``step``'s folder."""
        return f"{self.root}/{step_dir(step)}/{rel}".rstrip("/")

    def files(self, step: int | None = None) -> list[str]:
        """Every object under the root (or under one step), as paths relative to the root."""
        self.fs.invalidate_cache()
        base = self.root if step is None else self.path(step)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] if str(p).startswith(prefix) else str(p) for p in found)

    def glob(self, step: int, pattern: str) -> list[str]:
        """Raw paths of files inside ``step`` whose step-relative path matches ``pattern``."""
        base = step_dir(step) + "/"
        return [
            f"{self.root}/{f}"
            for f in self.files(step)
            if f.startswith(base) and fnmatch.fnmatch(f[len(base) :], pattern)
        ]

    def read(self, path: str) -> bytes:
        """The bytes of a raw path."""
        self.fs.invalidate_cache()
        data: bytes = self.fs.cat_file(path)
        return data

    def write(self, path: str, data: bytes) -> None:
        """Create or replace a raw path."""
        if self.name == "local":
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        self.fs.invalidate_cache()

    def rm(self, path: str, recursive: bool = False) -> None:
        """Delete a raw path."""
        self.fs.rm(path, recursive=recursive)
        self.fs.invalidate_cache()

    def exists(self, path: str) -> bool:
        """Whether a raw path exists now."""
        self.fs.invalidate_cache()
        return bool(self.fs.exists(path))


class _HookedStage:
    def __init__(self, inner: Any, before_commit: Any) -> None:
        self._inner = inner
        self._before_commit = before_commit
        self.data_prefix = inner.data_prefix

    def open_write(self, relpath: str) -> Any:
        return self._inner.open_write(relpath)

    def commit(self, manifest: bytes) -> None:
        self._before_commit(self._inner, manifest)
        self._inner.commit(manifest)

    def abort(self) -> None:
        self._inner.abort()


class HookedStorage:
    """A storage wrapper that calls ``before_commit(stage, manifest)`` once the data files are durable.

    Passed as ``Checkpointer(url, storage=HookedStorage(open_storage(url), hook))``; everything else
    is delegated unchanged. This is the "storage
    wrapper" fault-injection point of the design: it observes the instant between data and manifest.
    """

    def __init__(self, inner: Any, before_commit: Any) -> None:
        self._inner = inner
        self._before_commit = before_commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stage(self, step: int, writer_id: str) -> _HookedStage:
        """Start writing ``step`` through the wrapped backend, with the hook before its commit."""
        return _HookedStage(self._inner.stage(step, writer_id), self._before_commit)


def make_state(seed: int, width: int = 8) -> dict[str, Any]:
    """A small but varied training state: a model, AdamW after one step, and a plain dict."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, width, generator=g)).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    extra = {
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (7,), generator=g),
        "mask": torch.rand(6, generator=g) > 0.5,
        "neg_zero": torch.tensor([-0.0, float("inf"), float("nan")]),
        "note": f"seed {seed}",
        "lr": 0.1 * (seed + 1),
        "nested": {"a": [1, 2.5, None], "uid": uuid.UUID(int=seed).hex},
    }
    return {"model": model, "optimizer": opt, "extra": extra}


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of what ``state`` would save, for comparing after a restore."""
    return {
        k: copy.deepcopy(v.state_dict() if hasattr(v, "state_dict") else dict(v)) for k, v in state.items()
    }


def assert_restored(expected: dict[str, Any], state: dict[str, Any]) -> None:
    """Assert that ``state`` now holds exactly (bit for bit) the snapshot ``expected``."""
    assert_identical(expected, snapshot(state))
