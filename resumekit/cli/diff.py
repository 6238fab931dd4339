"""``resumekit diff A B``: what differs between two checkpoints.

Entries added and removed; per tensor a dtype or shape change and the largest absolute difference;
non-tensor values of the saved state (optimizer hyper-parameters, counters, sampler positions); the
config and the environment. Every file read is checked against its manifest's crc32c first.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from resumekit.cli.access import Root, jsonable
from resumekit.cli.commands import entry_file_names, natural_key
from resumekit.format.codec import decode
from resumekit.format.layout import is_tensor_file
from resumekit.format.manifest import Manifest
from resumekit.format.tensorfile import tensors_from_buffer

__all__ = ["diff", "max_abs_diff"]

_CHUNK_ELEMS = 1 << 22
#: At most this many non-tensor value changes are listed (``values_truncated`` says when more exist).
MAX_VALUES = 500


def max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest ``|x - y|`` over two tensors of one shape, computed in double precision.

    Equal values count as 0, NaN against NaN included (so do equal infinities); NaN against a number
    gives NaN. Bit-identical tensors return 0.0 without any arithmetic.
    """
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.numel() == 0:
        return 0.0
    xa, ya = x.reshape(-1), y.reshape(-1)
    if x.dtype == y.dtype and torch.equal(xa.view(torch.uint8), ya.view(torch.uint8)):
        return 0.0
    work = torch.complex128 if (x.dtype.is_complex or y.dtype.is_complex) else torch.float64
    worst = 0.0
    for i in range(0, xa.numel(), _CHUNK_ELEMS):
        a = xa[i : i + _CHUNK_ELEMS].to(work)
        b = ya[i : i + _CHUNK_ELEMS].to(work)
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        d = torch.where(same, torch.zeros((), dtype=torch.float64), (a - b).abs())
        m = float(d.max())
        if math.isnan(m):
            return m
        worst = max(worst, m)
    return worst


def _spec(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    """Leaves of a decoded state, by dotted path; tensors and arrays are left out (compared apart)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return
    if isinstance(value, dict):
        if not value:
            out[path] = {}
        for k, v in value.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, (list, tuple)):
        if not value:
            out[path] = []
        for i, v in enumerate(value):
            _flatten(v, f"{path}.{i}" if path else str(i), out)
    else:
        out[path] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return repr(a) == repr(b)


def _logical(m: Manifest, name: str) -> dict[str, str]:
    """Entry files by their name inside the step, without the writer's private prefix."""
    return {rel[len(m.data_prefix) :]: rel for rel in entry_file_names(m, name)}


class _Side:
    def __init__(self, root: Root, step: int | None) -> None:
        self.root = root
        self.step = root.resolve(step)
        self.m = root.manifest(self.step)

    def read(self, rel: str) -> Any:
        return self.root.read_verified(self.step, rel, self.m.files[rel])

    def tensors(self, rel: str | None) -> dict[str, torch.Tensor]:
        if rel is None:
            return {}
        return tensors_from_buffer(self.read(rel), self.root.where(self.step, rel))

    def values(self, rel: str, entry: str) -> dict[str, Any]:
        skeleton = json.loads(bytes(self.read(rel)))
        # Tensors are compared file to file; here only the values around them matter.
        flat: dict[str, Any] = {}
        _flatten(decode(skeleton, lambda _name: torch.empty(0), entry), "", flat)
        return flat

    def describe(self) -> dict[str, Any]:
        return {"url": self.root.url, "step": self.step, "path": self.root.where(self.step)}


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        if key in a and key in b and _same(a[key], b[key]):
            continue
        change = "added" if key not in a else "removed" if key not in b else "changed"
        out.append({"key": key, "change": change, "a": jsonable(a.get(key)), "b": jsonable(b.get(key))})
    return out


def _flat_config(config: dict[str, Any] | None) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if config:
        _flatten(config, "", flat)
    return flat


def _compare_tensors(
    entry: str, file: str, ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], out: list[dict[str, Any]]
) -> int:
    """Append the changed tensors of one file to ``out``; return how many were identical."""
    identical = 0
    for name in sorted({*ta, *tb}, key=natural_key):
        x, y = ta.get(name), tb.get(name)
        row: dict[str, Any] = {
            "entry": entry,
            "file": file,
            "name": name,
            "change": "changed",
            "a": None if x is None else _spec(x),
            "b": None if y is None else _spec(y),
            "max_abs_diff": None,
        }
        if x is None or y is None:
            row["change"] = "added" if x is None else "removed"
        else:
            if x.shape == y.shape:
                d = max_abs_diff(x, y)
                row["max_abs_diff"] = jsonable(d)
                if d == 0.0 and x.dtype == y.dtype:
                    identical += 1
                    continue
        out.append(row)
    return identical


def diff(a_root: Root, a_step: int | None, b_root: Root, b_step: int | None) -> dict[str, Any]:
    """Compare checkpoint A with checkpoint B (each the given step, or its root's newest)."""
    a, b = _Side(a_root, a_step), _Side(b_root, b_step)
    names_a, names_b = set(a.m.entries), set(b.m.entries)
    common = sorted(names_a & names_b)
    tensor_changes: list[dict[str, Any]] = []
    value_changes: list[dict[str, Any]] = []
    files_added: list[str] = []
    files_removed: list[str] = []
    compared = identical = 0
    for entry in common:
        fa, fb = _logical(a.m, entry), _logical(b.m, entry)
        files_added += [f"{entry}:{f}" for f in sorted(set(fb) - set(fa))]
        files_removed += [f"{entry}:{f}" for f in sorted(set(fa) - set(fb))]
        for file in sorted(set(fa) & set(fb)):
            if is_tensor_file(file):
                ta, tb = a.tensors(fa[file]), b.tensors(fb[file])
                compared += len(set(ta) & set(tb))
                identical += _compare_tensors(entry, file, ta, tb, tensor_changes)
            else:
                for ch in _changes(a.values(fa[file], entry), b.values(fb[file], entry)):
                    value_changes.append({"entry": entry, "file": file, **ch})
        # A tensor file present on one side only: every tensor in it was added or removed.
        for file in sorted(set(fa) ^ set(fb)):
            if is_tensor_file(file):
                ta = a.tensors(fa.get(file)) if file in fa else {}
                tb = b.tensors(fb.get(file)) if file in fb else {}
                _compare_tensors(entry, file, ta, tb, tensor_changes)
    config = _changes(_flat_config(a.m.config), _flat_config(b.m.config))
    environment = _changes(a.m.environment, b.m.environment)
    added, removed = sorted(names_b - names_a), sorted(names_a - names_b)
    identical_state = not (
        added or removed or files_added or files_removed or tensor_changes or value_changes or config
    )
    return {
        "a": a.describe(),
        "b": b.describe(),
        "identical": identical_state,
        "entries": {
            "added": added,
            "removed": removed,
            "common": common,
        },
        "files": {"added": files_added, "removed": files_removed},
        "tensors": {"compared": compared, "identical": identical, "changes": tensor_changes},
        "values": value_changes[:MAX_VALUES],
        "values_truncated": len(value_changes) > MAX_VALUES,
        "config": config,
        "environment": environment,
    }
