"""``resumekit ls``, ``inspect``, ``verify`` and ``drift``: each builds a JSON-ready dict.

The dicts are the ``--json`` output (keys documented in docs/cli.md and kept stable); the text tables
are rendered from the same dicts by :mod:`resumekit.cli.text`, so both forms always agree.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from resumekit.cli.access import CliError, Root
from resumekit.cli.shards import cross_check, entry_sharding, index_spans, shard_files, step_mesh
from resumekit.drift import DriftPolicy, compare
from resumekit.engine.environment import collect_environment
from resumekit.errors import ResumeKitError, UnsupportedFormatError
from resumekit.format.layout import MANIFEST, file_kind, is_tensor_file, meta_entry, step_dir
from resumekit.format.manifest import (
    FORMAT_VERSION,
    FileRecord,
    Manifest,
    current_format,
)
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import TensorSpec, parse_head
from resumekit.sharding.metadata import ShardingMeta, index_file
from resumekit.sharding.reshard import read_meta
from resumekit.storage.verify import file_problem

__all__ = ["drift", "entry_file_names", "inspect", "ls", "natural_key", "verify"]


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def entry_file_names(m: Manifest, name: str) -> list[str]:
    """The files of entry ``name`` that the manifest lists (skeleton, then tensors; per rank)."""
    return [p for p in m.files_of(name) if p in m.files]


# -- ls ---------------------------------------------------------------------------------------------

_LS_KEYS = (
    "step",
    "folder",
    "status",
    "detail",
    "files",
    "bytes",
    "created_unix",
    "age_seconds",
    "world_size",
    "format_version",
    "entries",
    "mesh",
    "shards",
)


def ls(root: Root, step: int | None) -> dict[str, Any]:
    """Every step folder of the root, newest last: committed ones from their manifest only."""
    now = time.time()
    rows: list[dict[str, Any]] = []
    for s in root.candidates():
        row: dict[str, Any] = {
            "step": s,
            "folder": step_dir(s),
            "status": "ok",
            "detail": None,
            "files": None,
            "bytes": None,
            "created_unix": None,
            "age_seconds": None,
            "world_size": None,
            "format_version": None,
            "entries": None,
            "mesh": None,
            "shards": None,
        }
        try:
            m = root.manifest(s) if root.raw_manifest(s) is not None else None
        except (ResumeKitError, OSError) as exc:
            row.update(status="unreadable", detail=f"manifest unreadable: {exc}")
        else:
            if m is None:
                row.update(status="incomplete", detail="no manifest")
            else:
                row.update(
                    files=len(m.files),
                    bytes=sum(r.size for r in m.files.values()),
                    created_unix=m.created_unix or None,
                    age_seconds=round(now - m.created_unix, 3) if m.created_unix else None,
                    world_size=m.world_size,
                    format_version=m.format_version,
                    entries=sorted(m.entries),
                    mesh=step_mesh(m),
                    shards=len(shard_files(m)) if m.format_version >= 2 else None,
                )
        rows.append(row)
    for s, folder in root.unfinished():
        rows.append(
            {
                **dict.fromkeys(_LS_KEYS),
                "step": s,
                "folder": folder,
                "status": "incomplete",
                "detail": "unfinished save (temporary folder)",
            }
        )
    rows.sort(key=lambda r: (r["step"], r["folder"]))
    if step is not None:
        rows = [r for r in rows if r["step"] == step]
        if not rows:
            raise CliError(f"'{root.url}' has no step {step}")
    return {"url": root.url, "steps": rows}


# -- inspect ----------------------------------------------------------------------------------------


def _tensors(root: Root, step: int, rel: str, size: int) -> tuple[list[dict[str, Any]] | None, str | None]:
    try:
        specs = root.tensor_specs(step, rel, size)
    except (ResumeKitError, OSError) as exc:
        return None, str(exc)
    out = [
        {
            "name": name,
            "dtype": str(spec.dtype).removeprefix("torch."),
            "shape": list(spec.shape),
            "bytes": spec.end - spec.begin,
        }
        for name, spec in sorted(specs.items(), key=lambda kv: natural_key(kv[0]))
    ]
    return out, None


def inspect(root: Root, step: int | None) -> dict[str, Any]:
    """The manifest of one step, its entries with their files and tensors, environment and config."""
    s = root.resolve(step)
    m = root.manifest(s)
    entries: list[dict[str, Any]] = []
    owned: set[str] = set()
    for name in sorted(m.entries):
        e = m.entries[name]
        files = []
        for rel in entry_file_names(m, name):
            owned.add(rel)
            rec = m.files[rel]
            f: dict[str, Any] = {
                "path": rel,
                "size": rec.size,
                "crc32c": rec.crc32c,
                "tensors": None,
                "error": None,
            }
            if is_tensor_file(rel):
                f["tensors"], f["error"] = _tensors(root, s, rel, rec.size)
            files.append(f)
        entries.append(
            {
                "name": name,
                "scope": e.scope,
                "kind": e.kind,
                "ranks": list(e.ranks),
                "files": files,
                "sharding": entry_sharding(root, s, m, name),
            }
        )
    return {
        "url": root.url,
        "step": s,
        "path": root.where(s),
        "format_version": m.format_version,
        "resumekit_version": m.resumekit_version,
        "writer_id": m.writer_id,
        "world_size": m.world_size,
        # Checkpoints written before meshes were recorded: each entry's metadata still says.
        "mesh": step_mesh(m)
        or (
            {e["name"]: e["sharding"]["mesh"] for e in entries if e["sharding"] and e["sharding"]["mesh"]}
            or None
        ),
        "shards": len(shard_files(m)),
        "created_unix": m.created_unix or None,
        "data_prefix": m.data_prefix,
        "files": len(m.files),
        "bytes": sum(r.size for r in m.files.values()),
        "entries": entries,
        "other_files": [
            {"path": rel, "size": rec.size, "crc32c": rec.crc32c}
            for rel, rec in sorted(m.files.items())
            if rel not in owned
        ],
        "environment": m.environment,
        "config": m.config,
    }


# -- verify -----------------------------------------------------------------------------------------


def _problem(root: Root, step: int, rel: str, kind: str, message: str) -> dict[str, Any]:
    return {"file": rel, "url": root.where(step, rel), "kind": kind, "message": message}


@dataclass
class _Sharded:
    """What verify learned of a step's sharded files, for the cross-check after every file's checksum."""

    metas: dict[str, ShardingMeta] = field(default_factory=dict)
    indexes: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    heads: dict[str, dict[str, TensorSpec]] = field(default_factory=dict)
    span_crcs: dict[str, list[int]] = field(default_factory=dict)


def _check(
    root: Root, s: int, m: Manifest, rel: str, rec: FileRecord, sharded: _Sharded
) -> tuple[tuple[str, str] | None, int]:
    """(kind, message) of what is wrong with one file (None: nothing) and the bytes read: present,
    its size (before reading it), its crc32c, then a JSON file's syntax or a tensor file's header.
    A sharded entry's metadata, chunk indexes and shard headers are kept in ``sharded``, and a shard
    file's chunks are checksummed as its index lists them (in the same pass)."""
    where = root.where(s, rel)
    index = sharded.indexes.get(m.data_prefix + index_file(rel.removeprefix(m.data_prefix)))
    spans = (
        [(v[0], v[1]) for v in index.values()] if index is not None and file_kind(rel) == "shard" else None
    )
    try:
        problem = file_problem(where, rec, root.actual_size(s, rel))
        if problem is not None:
            return (problem.kind, problem.message), 0
        check = root.check_file(s, rel, keep_content=not is_tensor_file(rel), spans=spans)
    except (ResumeKitError, OSError) as exc:
        return ("read", f"{where}: {exc}"), 0
    problem = file_problem(where, rec, check.size, check.crc32c)
    if problem is not None:
        return (problem.kind, problem.message), check.size
    try:
        if check.content is not None and file_kind(rel) == "sharding":
            entry = meta_entry(rel.removeprefix(m.data_prefix))
            sharded.metas[entry] = read_meta(check.content, where, m)
        elif check.content is not None and file_kind(rel) == "chunks":
            sharded.indexes[rel] = index_spans(check.content, where)
        elif check.content is not None:
            parse_strict(check.content, where, "skeleton")  # as strict as restore()
        else:
            head = parse_head(check.head, check.size, where)
            if spans is not None and check.span_crcs is not None:
                sharded.heads[rel] = head
                sharded.span_crcs[rel] = check.span_crcs
    except (ResumeKitError, ValueError) as exc:
        if check.content is not None:
            return ("json", str(exc)), check.size
        return ("header", f"unparsable safetensors header: {exc}"), check.size
    return None, check.size


def _verify_step(root: Root, s: int) -> dict[str, Any]:
    result: dict[str, Any] = {"step": s, "ok": True, "files": 0, "bytes": 0, "shards": 0, "problems": []}
    problems: list[dict[str, Any]] = result["problems"]
    try:
        m = root.manifest(s)
    except (ResumeKitError, OSError) as exc:
        problems.append(_problem(root, s, MANIFEST, "manifest", str(exc)))
        result["ok"] = False
        return result
    sharded = _Sharded()
    # Chunk indexes first: a shard file's chunks are then checksummed in the pass over its bytes.
    for rel, rec in sorted(m.files.items(), key=lambda kv: (file_kind(kv[0]) != "chunks", kv[0])):
        result["files"] += 1
        problem, nbytes = _check(root, s, m, rel, rec, sharded)
        result["bytes"] += nbytes
        if problem is not None:
            problems.append(_problem(root, s, rel, *problem))
    if sharded.metas:
        result["shards"] = len(shard_files(m))
        for rel, message in cross_check(m, sharded.metas, sharded.indexes, sharded.heads, sharded.span_crcs):
            problems.append(_problem(root, s, rel, "chunk-index", f"{root.where(s, rel)}: {message}"))
    result["ok"] = not problems
    return result


def verify(root: Root, step: int | None) -> dict[str, Any]:
    """Check the size and crc32c of every file of one step (or of every committed step)."""
    steps = [root.resolve(step)] if step is not None else root.committed()
    if not steps:
        raise CliError(f"'{root.url}' has no committed checkpoint to verify")
    results = [_verify_step(root, s) for s in steps]
    return {
        "url": root.url,
        "ok": all(r["ok"] for r in results),
        "steps": results,
        "bad_files": [p["url"] for r in results for p in r["problems"]],
    }


# -- drift ------------------------------------------------------------------------------------------


def _saved_facts(root: Root, s: int) -> tuple[int, dict[str, Any], dict[str, Any] | None, int]:
    """format version, environment, config and world size recorded at ``s``.

    A manifest from a newer format cannot be validated by this resumekit, but its environment and
    config are plain JSON data: they are read (never followed) so the format drift can be reported.
    """
    try:
        m = root.manifest(s)
        return m.format_version, m.environment, m.config, m.world_size
    except UnsupportedFormatError:
        raw = root.raw_manifest(s) or b""
        d = json.loads(raw)  # from_json parsed it already to find the format version
        fmt = d.get("format_version") if isinstance(d, dict) else None
        if type(fmt) is not int or fmt <= FORMAT_VERSION:
            raise
        env = d.get("environment")
        config = d.get("config")
        ws = d.get("world_size")
        return (
            fmt,
            env if isinstance(env, dict) else {},
            config if isinstance(config, dict) else None,
            ws if type(ws) is int else 1,
        )


def drift(
    root: Root,
    step: int | None,
    *,
    config: dict[str, Any] | None,
    world_size: int | None,
    amp_dtype: str | None,
    policy: DriftPolicy,
) -> dict[str, Any]:
    """The saved environment and config against this machine, under ``policy``.

    ``world_size`` and ``amp_dtype`` describe a run, not a machine: unless given they are taken from
    the checkpoint, so they never drift by default. ``config`` is compared only when given.
    """
    s = root.resolve(step)
    fmt, saved_env, saved_config, saved_ws = _saved_facts(root, s)
    saved_amp = saved_env.get("amp_dtype")
    current_env = collect_environment(
        world_size=world_size if world_size is not None else max(saved_ws, 1),
        amp_dtype=amp_dtype if amp_dtype is not None else (saved_amp if isinstance(saved_amp, str) else None),
    )
    report = compare(
        saved_env,
        saved_config,
        current_env,
        config,
        policy,
        saved_format=fmt,
        current_format=current_format(fmt),
    )
    return {
        "url": root.url,
        "step": s,
        "path": root.where(s),
        "format_version": fmt,
        "config_compared": config is not None and saved_config is not None,
        "saved_environment": saved_env,
        "current_environment": current_env,
        "saved_config": saved_config,
        "current_config": config,
        **report.to_dict(),
        "ok": not report.errors,
    }
