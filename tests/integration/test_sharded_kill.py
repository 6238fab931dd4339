"""SIGKILL of one rank at each phase of a sharded save (FSDP2 on gloo, world 2).

Each case is a world of two processes: both ranks save step 1 through a :class:`KillingStorage` (which
records the files each rank writes), train a step, then save step 2 with one rank armed to die by a
real ``SIGKILL`` at one phase: while capturing the sharded state; when the stage opens (agreement
done, no file written); half-way through its optimizer shard file; once all its files are durable,
before the outcome gather; and (rank 0) after the gather: before the manifest, half-way through it,
before the rename that publishes it. Two cases do the same through ``save_async``. The survivor must
end by itself, with an error, within the short process-group timeout: no rank hangs. What the dead
save left in its staging folder is checked against the phase, so each kill is known to have landed
where it claims.

Then, from fresh processes (one world-2 job after every kill), ``steps()`` shows step 1 alone,
restore returns step 1 bit for bit equal to the state gathered when it was saved, and saving step 2
again succeeds (its clean-up removes the dead save's staging folder); finally this process, with no
process group, restores both steps into a plain model and optimizer, bit for bit.

The worlds are forked from one parent (:func:`fork_worlds`), four at a time: a case costs its own
work, not two torch imports. About 60 s on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _kill_storage import KillingStorage, die
from _sharded_helpers import (
    bitwise_diff,
    fork_worlds,
    fsdp,
    gathered,
    load_gathered,
    make_model,
    read_results,
    save_gathered,
    train,
    write_result,
)

import resumekit as rk
from resumekit.format.layout import MANIFEST, parse_tmp_dir, step_dir
from resumekit.storage import open_storage

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: (kill point, the rank that dies, how step 2 is saved). ``capture`` is a state-dict hook of the
#: sharded model; the others are KillingStorage's points. ``async``: save_async, whose background
#: thread writes and commits over its own process group, then wait().
CASES = (
    ("capture", 0, "sync"),
    ("stage", 1, "sync"),
    ("mid-file", 0, "sync"),
    ("mid-file", 1, "sync"),
    ("durable", 0, "sync"),
    ("durable", 1, "sync"),
    ("commit", 0, "sync"),
    ("manifest", 0, "sync"),
    ("rename", 0, "sync"),
    ("after-gather", 1, "sync"),
    ("mid-file", 1, "async"),
    ("rename", 0, "async"),
)
PG_TIMEOUT = 20.0  # seconds: bounds any collective a survivor could be left waiting in


def _new() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = fsdp(make_model())
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _killed_save(rank: int, world: int, root: Path, point: str, victim: int, mode: str) -> None:
    url = root / "ckpt"
    storage = KillingStorage(open_storage(str(url)))
    ckpt = rk.Checkpointer(url, storage=storage)
    model, opt = _new()
    train(model, opt, 1, rank)
    ckpt.save({"model": model, "optimizer": opt}, step=1)
    g = gathered(model, opt)
    if rank == 0:
        save_gathered(g, root / "step1")
    train(model, opt, 2, rank)
    g = gathered(model, opt)
    if rank == 0:
        save_gathered(g, root / "step2")
    (root / f"pid-{rank}").write_text(str(os.getpid()))
    dist.barrier()
    if point == "after-gather":
        if rank == 0:  # kills the victim (waiting for the commit's outcome), then commits
            storage.arm("peer", pid=int((root / f"pid-{victim}").read_text()))
    elif rank == victim:
        if point == "capture":  # the first state_dict() of the save: capturing the sharded model
            model.register_state_dict_pre_hook(lambda *args: die())
        else:
            # Where this rank's kill points lie, from the files it wrote for step 1.
            shard = f"rank-{rank:05d}/optimizer.shard.safetensors"
            storage.arm(point, path=shard, nbytes=storage.written[shard] // 2, nfiles=len(storage.written))
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if mode == "async":
                ckpt.save_async({"model": model, "optimizer": opt}, step=2)
                ckpt.wait()
            else:
                ckpt.save({"model": model, "optimizer": opt}, step=2)
            raised = None
        except Exception as exc:
            raised = f"{type(exc).__name__}: {exc}"
    warned = " ".join(str(w.message) for w in caught if "resumekit:" in str(w.message))
    write_result(
        root, "survivor", rank, {"raised": raised, "warned": warned, "seconds": time.monotonic() - t0}
    )


def _check_and_resave(rank: int, world: int, roots: list[Path]) -> None:
    out: dict[str, Any] = {}
    for root in roots:
        url = root / "ckpt"
        entries = _entries(url)  # before this save changes anything
        r: dict[str, Any] = {"entries": entries, "staged": _staged(entries, url)}
        dist.barrier()
        ckpt = rk.Checkpointer(url, orphan_grace_seconds=0)
        r.update(steps=ckpt.steps(), latest=ckpt.latest_step())
        model, opt = _new()
        res = ckpt.restore({"model": model, "optimizer": opt})
        r["restored"] = None if res is None else res.step
        r["diff"] = bitwise_diff(gathered(model, opt), load_gathered(root / f"step{res.step if res else 0}"))
        # The step the dead save was writing (the next one where that save committed after all).
        step = r["latest"] + 1
        train(model, opt, step, rank)
        ckpt.save({"model": model, "optimizer": opt}, step=step)
        g = gathered(model, opt)
        if rank == 0:
            save_gathered(g, root / f"step{step}")
        model2, opt2 = _new()
        res = ckpt.restore({"model": model2, "optimizer": opt2})
        r["resaved"] = None if res is None or res.step != step else res.step
        r["resaved_diff"] = bitwise_diff(gathered(model2, opt2), g)
        r["steps_after"] = ckpt.steps()
        out[root.name] = r
    write_result(roots[0].parent, "check", rank, out)


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _staged(entries: list[str], url: Path) -> dict[str, int]:
    """The dead save's staging folder: file (relative) -> size; empty when there is none."""
    tmp = [e for e in entries if parse_tmp_dir(e) == 2]
    if not tmp:
        return {}
    (folder,) = tmp
    base = url / folder
    return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if p.is_file()}


def _check_staged(point: str, victim: int, staged: dict[str, int], url: Path) -> None:
    """The dead save's staging folder holds what was written up to the kill point, and no more."""
    files = json.loads((url / step_dir(1) / MANIFEST).read_text())["files"]

    def owned(rank: int) -> set[str]:
        return {p for p in files if p.startswith(f"rank-{rank:05d}/") or (rank == 0 and "/" not in p)}

    data = {p for p in staged if p != MANIFEST}
    if point in ("capture", "after-gather"):  # no stage opened; or the stage was committed
        assert staged == {}, (point, staged)
    elif point == "stage":  # the survivor wrote all its files, the victim none
        assert data == owned(1 - victim), (point, staged)
    elif point == "mid-file":  # the victim stopped half-way through its optimizer shard
        shard = f"rank-{victim:05d}/optimizer.shard.safetensors"
        assert staged[shard] == files[shard]["size"] // 2, (point, victim, staged)
        assert owned(1 - victim) <= data < owned(0) | owned(1), (point, victim, staged)
    else:  # every data file complete; the manifest half-written, written, or not at all
        assert data == owned(0) | owned(1), (point, victim, staged)
        assert (MANIFEST in staged) == (point in ("manifest", "rename")), (point, staged)


@pytest.mark.timeout(360)
def test_sigkill_of_one_rank_at_each_phase_leaves_the_previous_step(tmp_path: Path) -> None:
    roots = [tmp_path / f"{point}-r{victim}-{mode}" for point, victim, mode in CASES]
    for root in roots:
        root.mkdir()
    kills = [(_killed_save, 2, (root, *case)) for case, root in zip(CASES, roots)]
    batches = [kills[i : i + 4] for i in range(0, len(kills), 4)]
    codes = fork_worlds([*batches, [(_check_and_resave, 2, (roots,))]], deadline=60, pg_timeout=PG_TIMEOUT)

    for (point, victim, _), root, job in zip(CASES, roots, codes):
        survivor = 1 - victim
        assert job[victim] == -9, (point, victim, job)  # died by its SIGKILL, so the armed point was reached
        assert job[survivor] == 0, (point, victim, job)  # ended by itself: no hang
        res = json.loads((root / f"survivor-{survivor}.json").read_text())
        # A save that lost a rank before the gather never succeeds. After it, rank 0 commits the
        # complete step, and its save says so (warning that the others could not be told).
        if point == "after-gather":
            assert res["raised"] is None and "is committed" in res["warned"], (point, res)
        else:
            assert res["raised"] is not None, (point, victim)
        assert res["seconds"] < PG_TIMEOUT + 10, (point, victim, res)
    assert codes[-1] == [0, 0]

    checks = read_results(tmp_path, "check", 2)
    for (point, victim, _), root in zip(CASES, roots):
        url = root / "ckpt"
        # Only a death after every rank reported its files durable lets step 2 commit, complete.
        before = [1, 2] if point == "after-gather" else [1]
        after = [*before, before[-1] + 1]
        for rank, check in enumerate(checks):
            r = check[root.name]
            # Nothing else is visible: the committed steps and (at most) the dead save's staging folder.
            visible = [e for e in r["entries"] if parse_tmp_dir(e) != 2]
            assert visible == [step_dir(s) for s in before], (point, victim, r["entries"])
            _check_staged(point, victim, r["staged"], url)
            assert r["steps"] == before and r["latest"] == before[-1], (point, victim, rank, r)
            assert r["restored"] == before[-1] and r["diff"] == [], (point, victim, rank, r)
            # Saving the next step succeeds (the same step the dead save was writing, where it did not
            # commit), and its clean-up removed the dead save's folder.
            assert r["resaved"] == after[-1] and r["resaved_diff"] == [], (point, victim, rank, r)
            assert r["steps_after"] == after, (point, victim, rank, r)
        assert _entries(url) == [step_dir(s) for s in after], (point, victim)
        # With no process group: a plain model and optimizer get each step, bit for bit.
        ckpt = rk.Checkpointer(url)
        for step in after:
            model = make_model()
            opt = torch.optim.AdamW(model.parameters(), lr=0.01)
            res = ckpt.restore({"model": model, "optimizer": opt}, step=step)
            assert res is not None and res.step == step, (point, victim)
            diff = bitwise_diff(gathered(model, opt), load_gathered(root / f"step{step}"))
            assert diff == [], (point, victim, step, diff)
