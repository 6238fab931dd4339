"""DDP or FSDP2 on 2 processes with the gathered pairwise loss equals one process on the same global batch.

Two real gloo processes on 127.0.0.1 (this file, run as a script, is the worker). Each rank computes the
loss on its shard of a global batch and backpropagates through DistributedDataParallel; the test compares
the loss and the averaged parameter gradients with a single process on the whole batch. It also runs the
field-lesson bug (a per-rank loss without gathering) and shows that it differs materially. The same
comparison runs with the encoder sharded as ``--fsdp`` shards it (FSDP2 averages gradients like DDP).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from reference_trainer.data import TargetDistance

REPO = Path(__file__).resolve().parents[2]
NUM_FEATURES = 48
GLOBAL_BATCH = 24
# Shard boundaries of the global batch per configuration: even, and uneven (a smaller last shard).
SPLITS = {"even": 12, "uneven": 15}


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, TargetDistance]:
    from reference_trainer.data import SyntheticProfiles, target_distance
    from reference_trainer.model import ProfileEncoder

    data = SyntheticProfiles(GLOBAL_BATCH, NUM_FEATURES, seed=seed)
    torch.manual_seed(seed)
    # No dropout: the single-process reference and the ranks would draw different masks.
    model = ProfileEncoder(NUM_FEATURES, hidden_dims=(32, 32), embedding_dim=8, dropout=0.0)
    return model, data.profiles, target_distance("unifrac", tree=data.tree)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from reference_trainer.devices import Placement
    from reference_trainer.fsdp import shard_model
    from reference_trainer.loss import pairwise_loss

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for config, cut in SPLITS.items():
            model, profiles, target = _setup()
            local = profiles[:cut] if rank == 0 else profiles[cut:]
            ddp = DistributedDataParallel(model)
            results: dict[str, torch.Tensor] = {}
            for mode, gather in (("gathered", True), ("per_rank", False)):
                ddp.zero_grad(set_to_none=True)
                embeddings = ddp(local)
                out = pairwise_loss(embeddings, local, target, gather=gather)
                out.loss.backward()
                results[f"{mode}.loss"] = out.loss.detach().reshape(1)
                results[f"{mode}.pairs"] = torch.tensor([out.predicted.numel()])
                for name, grad in _grads(ddp.module).items():
                    results[f"{mode}.grad.{name}"] = grad
            # Why the custom gather exists: the stock collective hands back tensors without a graph.
            shards = [torch.empty_like(embeddings[: min(cut, GLOBAL_BATCH - cut)]) for _ in range(world_size)]
            dist.all_gather(shards, embeddings[: min(cut, GLOBAL_BATCH - cut)].contiguous())
            results["plain_all_gather_requires_grad"] = torch.tensor([any(s.requires_grad for s in shards)])
            sharded = shard_model(_setup()[0], Placement("fsdp", torch.device("cpu"), rank, world_size))
            out = pairwise_loss(sharded(local), local, target, gather=True)
            out.loss.backward()
            results["fsdp.loss"] = out.loss.detach().reshape(1)
            for name, p in sharded.named_parameters():
                results[f"fsdp.grad.{name}"] = p.grad.full_tensor()
            save_file(results, str(out_dir / f"{config}-rank{rank}.safetensors"))
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else None


def _reference(cut: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single process: the loss and gradients over all pairs of the batch, or of one shard if ``cut``."""
    from reference_trainer.loss import pairwise_loss

    model, profiles, target = _setup()
    batch = profiles if cut is None else profiles[:cut]
    out = pairwise_loss(model(batch), batch, target)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = torch.stack([(a[k] - b[k]).pow(2).sum() for k in a]).sum().sqrt()
    norm = torch.stack([b[k].pow(2).sum() for k in b]).sum().sqrt()
    return float(diff / norm)


@pytest.mark.distributed
def test_ddp_and_fsdp_gathered_pairwise_loss_equals_single_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    loopback = _loopback_interface()
    if loopback is not None:
        env["GLOO_SOCKET_IFNAME"] = loopback  # keep gloo's pair connections on loopback too
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--world-size",
                "2",
                "--port",
                str(port),
                "--out-dir",
                str(tmp_path),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank]}"

    ref_loss, ref_grads = _reference()
    total_pairs = GLOBAL_BATCH * (GLOBAL_BATCH - 1) // 2
    for config, cut in SPLITS.items():
        ranks = [load_file(str(tmp_path / f"{config}-rank{r}.safetensors")) for r in range(2)]
        for r, res in enumerate(ranks):
            assert not bool(res["plain_all_gather_requires_grad"])
            gathered = {
                k.removeprefix("gathered.grad."): v for k, v in res.items() if k.startswith("gathered.grad.")
            }
            per_rank = {
                k.removeprefix("per_rank.grad."): v for k, v in res.items() if k.startswith("per_rank.grad.")
            }
            # Every rank's loss covers every pair of the global batch and equals the one-process loss...
            assert int(res["gathered.pairs"]) == total_pairs
            torch.testing.assert_close(res["gathered.loss"][0], ref_loss, rtol=1e-5, atol=1e-7)
            # ...and DDP's averaged gradients equal the one-process gradients, parameter by parameter.
            assert gathered.keys() == ref_grads.keys()
            for name, grad in ref_grads.items():
                torch.testing.assert_close(gathered[name], grad, rtol=1e-4, atol=1e-6, msg=f"{config} {name}")
            assert _relative_difference(gathered, ref_grads) < 1e-5
            # FSDP2 (sharded as --fsdp does it) changes nothing: same loss, same full gradients.
            fsdp = {k.removeprefix("fsdp.grad."): v for k, v in res.items() if k.startswith("fsdp.grad.")}
            torch.testing.assert_close(res["fsdp.loss"][0], ref_loss, rtol=1e-5, atol=1e-7)
            assert fsdp.keys() == ref_grads.keys()
            for name, grad in ref_grads.items():
                torch.testing.assert_close(
                    fsdp[name], grad, rtol=1e-4, atol=1e-6, msg=f"fsdp {config} {name}"
                )
            # The per-rank loss sees only its shard's pairs: a different loss and materially different gradients.
            shard = cut if r == 0 else GLOBAL_BATCH - cut
            assert int(res["per_rank.pairs"]) == shard * (shard - 1) // 2 < total_pairs
            assert abs(float(res["per_rank.loss"][0]) - float(ref_loss)) > 1e-3 * float(ref_loss)
            assert _relative_difference(per_rank, ref_grads) > 0.05
        # Sanity of the comparison itself: rank 0's per-rank loss is exactly one process on its shard.
        shard_loss, _ = _reference(cut)
        torch.testing.assert_close(ranks[0]["per_rank.loss"][0], shard_loss, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of test_pairwise_ddp")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    _worker(args.rank, args.world_size, args.port, args.out_dir)
    # Skip the interpreter's teardown: after DDP, gloo's threads can abort it (see tests/_dist.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
