"""Sharded steps on the command line: world size, mesh and shard counts, and ``verify``'s cross-check
of every shard file against its chunk index and the entry's sharding metadata.

Read-only, like the rest of the CLI; the metadata and chunk indexes are parsed as strictly as a
restore parses them, and nothing a manifest names is opened before the manifest validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resumekit.cli.access import Root
from resumekit.errors import ResumeKitError
from resumekit.format.manifest import SCOPE_SHARDED, Manifest
from resumekit.format.strict_json import parse_strict
from resumekit.format.tensorfile import ST_TO_DTYPE, TensorSpec
from resumekit.sharding.mesh import MESH_KEY
from resumekit.sharding.metadata import ShardingMeta, index_file, meta_file, shard_file
from resumekit.sharding.reshard import read_meta
from resumekit.storage.verify import crc_hex

__all__ = ["cross_check", "entry_sharding", "index_spans", "shard_files", "step_mesh"]


def shard_files(m: Manifest) -> list[str]:
    """Every shard file of every sharded entry the manifest lists (paths relative to the step)."""
    return [
        m.data_prefix + shard_file(name, r)
        for name, e in sorted(m.entries.items())
        if e.scope == SCOPE_SHARDED
        for r in e.ranks
        if m.data_prefix + shard_file(name, r) in m.files
    ]


def step_mesh(m: Manifest) -> Any:
    """The sharded entries' meshes as the environment recorded them (None: unsharded, or written
    before resumekit recorded meshes)."""
    return m.environment.get(MESH_KEY)


def entry_sharding(root: Root, s: int, m: Manifest, name: str) -> dict[str, Any] | None:
    """``{"world_size", "mesh", "shards", "tensors", "error"}`` of a sharded entry, from its verified
    sharding metadata; None for an entry that is not sharded."""
    if m.entries[name].scope != SCOPE_SHARDED:
        return None
    shards = sum(1 for r in m.entries[name].ranks if m.data_prefix + shard_file(name, r) in m.files)
    out: dict[str, Any] = {"world_size": None, "mesh": None, "shards": shards, "tensors": None, "error": None}
    rel = m.data_prefix + meta_file(name)
    try:
        if rel not in m.files:
            raise ResumeKitError(f"the manifest does not list '{rel}'")
        meta = read_meta(bytes(root.read_verified(s, rel, m.files[rel])), root.where(s, rel), m)
    except (ResumeKitError, OSError) as exc:
        out["error"] = str(exc)
        return out
    out.update(world_size=meta.world_size, mesh=meta.mesh, tensors=len(meta.tensors))
    return out


def index_spans(raw: bytes, where: str) -> dict[str, list[Any]]:
    """A chunk index's spans, header first: name -> ``[begin, end, crc32c]`` (``""`` for the header).

    Raises:
        ResumeKitError: the index is not strict JSON or not a chunk index.
    """
    index = parse_strict(raw, where, "chunk index")
    if not isinstance(index, dict) or index.get("format") != "resumekit.chunks":
        raise ResumeKitError(f"{where} is not a resumekit chunk index")
    spans = {"": index.get("header"), **(index.get("chunks") or {})}
    for name, span in spans.items():
        if not (
            isinstance(span, list)
            and len(span) == 3
            and all(type(v) is int and v >= 0 for v in span[:2])
            and span[0] <= span[1]
            and isinstance(span[2], str)
        ):
            raise ResumeKitError(f"{where}: malformed span of chunk '{name or '(header)'}': {span!r}")
    return spans


def cross_check(
    m: Manifest,
    metas: Mapping[str, ShardingMeta],
    indexes: Mapping[str, dict[str, list[Any]]],
    heads: Mapping[str, dict[str, TensorSpec]],
    span_crcs: Mapping[str, list[int]],
) -> list[tuple[str, str]]:
    """``(file, message)`` for every disagreement between a sharded entry's metadata, its shard files'
    chunk indexes, their safetensors headers and their bytes. Pure.

    Args:
        metas: entry -> its parsed sharding metadata.
        indexes: index file -> its spans (:func:`index_spans`).
        heads: shard file -> the tensors its header declares.
        span_crcs: shard file -> the crc32c of each span of its index, in the index's order.
    """
    problems: list[tuple[str, str]] = []
    for name, meta in metas.items():
        wanted: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for t in meta.tensors.values():
            for c in t.chunks:
                wanted.setdefault(m.data_prefix + c.file, {})[c.name] = (t.dtype, c.sizes)
        for rel, chunks in sorted(wanted.items()):
            idx_rel = m.data_prefix + index_file(rel.removeprefix(m.data_prefix))
            spans = indexes.get(idx_rel)
            if spans is None:
                continue  # unreadable or failed its checksum: reported as such already
            listed = {k for k in spans if k}
            for chunk in sorted(set(chunks) - listed):
                problems.append(
                    (idx_rel, f"chunk '{chunk}' of entry '{name}' is in its metadata, not in its index")
                )
            for chunk in sorted(listed - set(chunks)):
                problems.append(
                    (idx_rel, f"chunk '{chunk}' is in the index, not in entry '{name}''s metadata")
                )
            for chunk in sorted(set(chunks) & listed):
                dtype, sizes = chunks[chunk]
                numel = 1
                for n in sizes:
                    numel *= n
                st = ST_TO_DTYPE.get(dtype)
                need = numel * st.itemsize if st is not None else None
                got = spans[chunk][1] - spans[chunk][0]
                if need is not None and got != need:
                    problems.append(
                        (idx_rel, f"chunk '{chunk}' spans {got} bytes; {list(sizes)} of {dtype} needs {need}")
                    )
            head = heads.get(rel)
            if head is not None:
                header_end = spans[""][1]
                declared = {k: [header_end + v.begin, header_end + v.end] for k, v in head.items()}
                indexed = {k: v[:2] for k, v in spans.items() if k}
                if declared != indexed:
                    problems.append(
                        (rel, f"its header's tensors and byte ranges differ from its index '{idx_rel}'")
                    )
            crcs = span_crcs.get(rel)
            if crcs is not None:
                for (chunk, span), crc in zip(spans.items(), crcs):
                    if crc_hex(crc) != span[2]:
                        what = f"chunk '{chunk}'" if chunk else "the header"
                        problems.append(
                            (
                                rel,
                                f"{what} (bytes [{span[0]}, {span[1]})) has crc32c {crc_hex(crc)}, its index says {span[2]}",
                            )
                        )
    return problems
