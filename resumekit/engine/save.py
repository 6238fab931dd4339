"""The save path: capture the state (snapshot), write its files on every rank, commit from rank 0."""

from __future__ import annotations

import functools
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO, Any, Callable

import torch

from resumekit.engine.collectives import World, describe
from resumekit.engine.entries import Item, check_step, items_of
from resumekit.engine.environment import collect_environment, resumekit_version
from resumekit.engine.partial import module_state
from resumekit.errors import StepExistsError, StorageError
from resumekit.format.codec import TensorTable, encode_entry
from resumekit.format.manifest import (
    FORMAT_VERSION,
    SCOPE_RANK,
    SCOPE_REPLICATED,
    SCOPE_SHARDED,
    UNSHARDED_FORMAT_VERSION,
    Entry,
    FileRecord,
    Manifest,
    entry_files,
)
from resumekit.format.tensorfile import write_bytes, write_tensors
from resumekit.sharding.mesh import MESH_KEY, entry_meshes
from resumekit.sharding.shards import LocalShards, agree, capture, forget_unowned, write_jobs
from resumekit.staging.buffers import OverlapStager
from resumekit.storage.base import Stage, Storage, files_at_once
from resumekit.storage.verify import crc_hex

__all__ = ["FileWrite", "Snapshot", "WritePlan", "build_manifest", "plan_writes", "take_snapshot", "write"]


@dataclass
class Snapshot:
    """One save's state, captured: encoded skeletons and the tensors to write."""

    step: int
    writer: str
    world: World
    items: list[Item]
    t0: float
    encoded: list[tuple[Item, bytes, dict[str, torch.Tensor]]] = field(default_factory=list)
    stager: OverlapStager | None = None  # async: where the writer gets each tensor's staged copy
    sharded: list[LocalShards] = field(default_factory=list)  # FSDP2/TP entries: this rank's chunks


def take_snapshot(
    storage: Storage,
    url: str,
    state: Mapping[str, Any],
    step: int,
    world: World,
    stager: OverlapStager | None,
    per_rank: frozenset[str],
) -> Snapshot:
    """Capture ``state`` for checkpoint ``step``: validate, agree on a writer id, encode every entry.

    With ``stager`` (the async path), every non-tensor value is encoded now and every tensor is either
    copied now or registered with the stager, which copies it before anything can change it: the
    snapshot holds the values of this moment. Without, tensors are referenced in place and streamed by
    :func:`write`.
    Every rank raises together if any rank failed.
    """
    t0 = time.perf_counter()
    step = check_step(step)
    items = items_of(state, per_rank)
    # Rank 0's answers (does the step exist? the writer id) travel with the outcomes below: one
    # exchange between the ranks per snapshot, not two.
    lead: dict[str, Any] = (
        {"exists": storage.read_manifest(step) is not None, "writer": uuid.uuid4().hex[:16]}
        if world.rank == 0
        else {}
    )
    snap = Snapshot(step, "", world, items, t0, stager=stager)
    error: Exception | None = None
    try:
        # Items are ordered RNG first: its state is captured before any other state_dict() runs.
        for it in items:
            if it.scope == SCOPE_SHARDED:
                snap.sharded.append(capture(it, items, stager))
                continue
            if it.scope == SCOPE_REPLICATED and world.rank != 0:
                continue
            if isinstance(it.obj, torch.nn.Module):
                raw_state: Any = module_state(it.obj)  # canonical keys: loads wrapped or not
            elif it.kind == "state":
                raw_state = it.obj.state_dict()
            else:
                raw_state = dict(it.obj)
            table = TensorTable()
            skeleton = encode_entry(raw_state, table, it.name)  # refuses what could not restore
            tensors = stager.add(it.name, it.obj, table.tensors) if stager is not None else table.tensors
            snap.encoded.append((it, skeleton, tensors))
    except Exception as exc:
        error = exc
    # Every rank learns whether every snapshot succeeded, so all raise together (no rank waits
    # forever in a collective of _write). The sharded entries' plans travel with the outcomes.
    payload = {"plans": [s.plan for s in snap.sharded], **lead}
    outcomes = world.gather_outcomes(error, payload=payload if error is None else None)
    outcomes.raise_failures(
        error,
        lambda failed: StorageError(
            f"saving step {step} failed on {failed}. Nothing was written; earlier checkpoints are intact."
        ),
    )
    lead = outcomes.payloads[0]
    if lead["exists"]:
        raise StepExistsError(
            f"step {step} already exists in '{url}'; checkpoints are never overwritten. Save under a "
            "new step (a resumed run continues from restore(...).step + 1), or delete the old one first."
        )
    snap.writer = lead["writer"]
    if any(it.scope == SCOPE_SHARDED for it in items):
        agree(snap.sharded, world, [p["plans"] for p in outcomes.payloads])  # raises on every rank together
        if stager is not None:
            forget_unowned(snap.sharded, stager)
    return snap


def write(
    storage: Storage, snap: Snapshot, make_manifest: Callable[[str, dict[str, FileRecord]], Manifest]
) -> int:
    """Write a snapshot's files on every rank, then commit the manifest from rank 0.

    Returns:
        The bytes written across all ranks.

    Raises:
        The local failure on the rank where it happened; StorageError naming the failing ranks elsewhere.
        Nothing is visible after a failure. Once rank 0 has committed, its save succeeds even if the
        other ranks cannot be told (they died after reporting their files durable): it warns instead.
    """
    world, step = snap.world, snap.step
    stage: Stage | None = None
    files: dict[str, FileRecord] = {}
    local_exc: BaseException | None = None
    try:
        stage = storage.stage(step, snap.writer)
        files = _write_files(stage, snap, world)
    except Exception as exc:
        local_exc = exc
    outcomes = world.gather_outcomes(local_exc, payload={p: [r.size, r.crc32c] for p, r in files.items()})
    if outcomes.failures and stage is not None:
        stage.abort()
    outcomes.raise_failures(
        local_exc,
        lambda failed: StorageError(
            f"saving step {step} failed on {failed}. Nothing was committed; earlier checkpoints are intact."
        ),
    )
    reports = outcomes.payloads
    nbytes = sum(size for r in reports for size, _ in r.values())
    commit_error = None
    if world.rank == 0 and stage is not None:
        all_files = {p: FileRecord(size, crc) for r in reports for p, (size, crc) in r.items()}
        manifest = make_manifest(stage.data_prefix, all_files)
        try:
            stage.commit(manifest.to_json())
        except Exception as exc:
            stage.abort()
            local_exc = exc
            commit_error = describe(exc)
    try:
        # An all-gather of rank 0's outcome, not a broadcast: a send to a dead rank can complete into
        # its socket buffer, a receive from it cannot, so rank 0 learns whether every rank was there.
        commit_error = world.all_gather_json(commit_error if world.rank == 0 else None)[0]
    except Exception as exc:
        if world.rank != 0:
            raise
        if local_exc is not None:
            raise local_exc from exc
        # Rank 0 committed after every rank reported its files durable: the step is complete and
        # visible whatever became of the others since, so this save must not report a failure.
        warnings.warn(
            f"resumekit: step {step} is committed, but the other ranks could not be told ({describe(exc)}); "
            "one of them probably died after its files were durable. The process group is broken: "
            "the next collective will fail. Restart the job; it resumes from this step.",
            stacklevel=4,  # the caller of Checkpointer.save
        )
        return nbytes
    if commit_error:
        if local_exc is not None:
            raise local_exc
        raise StorageError(f"rank 0 could not commit step {step}: {commit_error}")
    return nbytes


Fill = Callable[[IO[bytes]], "tuple[int, int]"]


@dataclass(frozen=True)
class FileWrite:
    """One file a rank writes for a save.

    Attributes:
        relpath: its path inside the step (with the writer's folder on object stores).
        nbytes: how many bytes it will hold (schedules big files first; small ones share a thread).
        entry: the state entry it belongs to.
        fill: writes the file's bytes to an open file and returns ``(size, crc32c)``.
        last: written after every other file of the plan has been written (its bytes derive from
            theirs: a shard file's chunk index); skipped when any of them failed.
    """

    relpath: str
    nbytes: int
    entry: str
    fill: Fill = field(compare=False, repr=False)
    last: bool = False


@dataclass(frozen=True)
class WritePlan:
    """Every file one rank writes for a save, and how many at once; built without I/O."""

    files: tuple[FileWrite, ...]
    workers: int


def plan_writes(snap: Snapshot, rank: int, data_prefix: str, parallel_files: int) -> WritePlan:
    """The files rank ``rank`` writes for ``snap``: each entry's skeleton and tensor file (replicated
    entries on rank 0, per-rank ones in the rank's folder), and its own shards of sharded entries.

    Pure: no storage, no change to any object; the fills only run when the plan is executed.
    """
    files: list[FileWrite] = []
    for it, skeleton, tensors in snap.encoded:
        json_name, st_name = entry_files(it.name, it.scope, rank, bool(tensors))
        files.append(
            FileWrite(
                data_prefix + json_name, len(skeleton), it.name, functools.partial(write_bytes, skeleton)
            )
        )
        if st_name is not None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            source = functools.partial(snap.stager.source, it.name) if snap.stager is not None else None
            tensor_fill = functools.partial(write_tensors, tensors=tensors, source=source)
            files.append(FileWrite(data_prefix + st_name, nbytes, it.name, tensor_fill))
    for entry, n, rel, shard_fill, last in write_jobs(snap.sharded, rank, snap.stager):
        files.append(FileWrite(data_prefix + rel, n, entry, shard_fill, last))
    big = sum(1 for f in files if f.nbytes >= _PARALLEL_MIN_BYTES)
    workers = max(1, min(parallel_files, big))  # small files never get a thread of their own
    return WritePlan(tuple(files), workers)


def _write_files(stage: Stage, snap: Snapshot, world: World) -> dict[str, FileRecord]:
    """Execute this rank's :func:`plan_writes`, up to ``stage.parallel_files`` files at once; return
    their records.

    Every file is finished (durable, or failed) before this returns or raises, so an abort that
    follows a failure never races a write still in progress.
    """
    plan = plan_writes(snap, world.rank, stage.data_prefix, files_at_once(stage))

    def run(job: FileWrite) -> tuple[str, FileRecord]:
        with stage.open_write(job.relpath) as f:
            size, crc = job.fill(f)
        return job.relpath, FileRecord(size, crc_hex(crc))

    first = [job for job in plan.files if not job.last]
    if plan.workers <= 1:
        records = dict(run(job) for job in first)
    else:
        records = _run_parallel(run, first, plan.workers)
    records.update(run(job) for job in plan.files if job.last)  # small, after all they derive from
    if snap.stager is not None:
        snap.stager.raise_error()  # a copy that cannot be proven to hold the call's values: no commit
    return records


def _run_parallel(
    run: Callable[[FileWrite], tuple[str, FileRecord]], jobs: list[FileWrite], workers: int
) -> dict[str, FileRecord]:
    jobs.sort(key=lambda job: -job.nbytes)  # big files first: small ones fill the gaps, not the tail
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resumekit-write") as pool:
        futures = [pool.submit(run, job) for job in jobs]
        wait(futures)
    return dict(f.result() for f in futures)  # raises the first failure, after every file finished


#: Files smaller than this are not worth a thread of their own.
_PARALLEL_MIN_BYTES = 8 << 20


def build_manifest(
    snap: Snapshot,
    data_prefix: str,
    files: dict[str, FileRecord],
    *,
    config: dict[str, Any] | None,
    amp_dtype: str | torch.dtype | None,
) -> Manifest:
    """The manifest of ``snap``'s step once every rank's ``files`` are durable: its entries (per-rank
    and sharded ones list every rank), the environment fingerprint (with the device mesh of sharded
    entries) and the user's config."""
    world, items = snap.world, snap.items
    entries = {
        it.name: Entry(
            scope=it.scope,
            kind=it.kind,
            ranks=tuple(range(world.size)) if it.scope in (SCOPE_RANK, SCOPE_SHARDED) else (0,),
        )
        for it in items
    }
    environment = collect_environment(world_size=world.size, amp_dtype=amp_dtype)
    meshes = entry_meshes(items)
    if meshes:  # only sharded checkpoints record a mesh: others keep the manifest they always had
        environment[MESH_KEY] = meshes
    sharded = any(it.scope == SCOPE_SHARDED for it in items)
    return Manifest(
        step=snap.step,
        writer_id=snap.writer,
        world_size=world.size,
        entries=entries,
        files=files,
        environment=environment,
        config=config,
        created_unix=time.time(),
        resumekit_version=resumekit_version(),
        data_prefix=data_prefix,
        # Sharded entries need format 2; without them format 1 keeps earlier resumekits reading it.
        format_version=FORMAT_VERSION if sharded else UNSHARDED_FORMAT_VERSION,
    )
