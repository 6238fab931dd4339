"""The child side of ``bench_restart.py``: one resumed run per process, from its first line to its first step.

``python benchmarks/restart_stacks.py STACK CKPT_DIR`` is what a preempted user's job runs again: import,
build the model, optimizer and data, restore, land on the next batch, train one step. It prints one JSON
line of ``time.monotonic()`` stamps (CLOCK_MONOTONIC is system-wide on Linux, so the parent's spawn stamp
compares with them), the indices of the first batch after the restore and a fingerprint of the state
after the first step. ``python benchmarks/restart_stacks.py prepare CKPT_DIR`` writes every stack's
checkpoint of one trained state at one mid-epoch position (not timed).

Only the standard library is imported at module level: the first stamp is taken before ``import torch``.
"""

from __future__ import annotations

import time

T0_MONO, T0_WALL, T0_CPU = time.monotonic(), time.time(), time.process_time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    import torch
    from torch import nn

# Sizes; the parent may pass smaller ones for a quick look (environment, so every child agrees).
N_SAMPLES = int(os.environ.get("BENCH_RESTART_SAMPLES", "200000"))
BATCH = 32
RESUME_BATCH = int(os.environ.get("BENCH_RESTART_BATCH", "3000"))  # batches consumed before the kill
WIDTH = 2048
# 21 x Linear(2048, 2048): 336 MiB of float32 parameters, ~1.0 GiB with AdamW's two moments.
LAYERS = int(os.environ.get("BENCH_RESTART_LAYERS", "21"))
LR = 1e-4
SEED = 0
STACKS = ("resumekit", "lightning", "accelerate", "dcp")
PHASES = (
    "startup",
    "import torch",
    "import stack",
    "build",
    "restore",
    "fast-forward",
    "first batch",
    "first step",
)
#: The phases whose work depends on the stack (the others are the interpreter, torch and the training step).
STACK_PART = ("import stack", "build", "restore", "fast-forward", "first batch")


class Stamps:
    """Stamps of one child, in order: ``(name, time.monotonic(), time.process_time())``; the first one is
    this module's first line (its CPU time is the interpreter's start-up)."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = [("start", T0_MONO, T0_CPU)]
        self.extra: dict[str, Any] = {"wall_start": T0_WALL}

    def mark(self, name: str) -> None:
        """Record that phase ``name`` ended now."""
        self.marks.append((name, time.monotonic(), time.process_time()))

    def sub(self, name: str) -> None:
        """Record a point inside the current phase (a breakdown; not a phase of its own)."""
        self.extra.setdefault("sub", {})[name] = time.monotonic()

    def emit(self) -> None:
        """Print the stamps and extras as the last stdout line."""
        print(json.dumps({"marks": self.marks, **self.extra}), flush=True)


# -- what every stack shares: data, model, loss ---------------------------------------------------------


def dataset() -> Any:
    """A map-style dataset of ``N_SAMPLES`` synthetic samples: ``(x, index)``, x a function of the index."""
    import torch
    from torch.utils.data import Dataset

    class Synthetic(Dataset[tuple[torch.Tensor, int]]):
        # 997 distinct rows computed once (no random numbers): a sample is a view, cheap to fetch.
        rows = (torch.arange(997 * WIDTH) % 1013).float().div_(1013).view(997, WIDTH)

        def __len__(self) -> int:
            return N_SAMPLES

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.rows[i % 997], i

    return Synthetic()


def model() -> nn.Sequential:
    """The stack of ``LAYERS`` square ``nn.Linear`` layers (default initialisation, as a user builds it)."""
    from torch import nn

    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW over ``params``."""
    import torch

    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def loss_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch."""
    return net(x).square().mean()


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One optimizer step on batch ``x``."""
    opt.zero_grad(set_to_none=True)
    loss_of(net, x).backward()
    opt.step()


def seeded(seed: int = SEED) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the shuffle of every stack's loader (epoch 0's order is then
    ``torch.randperm(N_SAMPLES, generator=seeded(0))`` for all four)."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return g


def fingerprint(net: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """float64 sums of the first and last layer's weights and moments (equal state -> equal numbers)."""
    import torch

    params = list(net.parameters())
    out = []
    for p in (params[0], params[-2]):  # the first and the last layer's weight
        out.append(float(torch.sum(p.detach(), dtype=torch.float64)))
        st = opt.state[p]
        out += [float(torch.sum(st[k], dtype=torch.float64)) for k in ("exp_avg", "exp_avg_sq")]
    return out


def indices(idx: Any) -> list[int]:
    """A batch's sample indices as ints."""
    return [int(i) for i in idx]


# -- JSON for torchdata's loader state (DCP would otherwise pickle it) ---------------------------------


class LoaderState:
    """A ``StatefulDataLoader`` as a DCP ``Stateful``: its state as one JSON string (no pickle)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        """The loader's state, JSON-encoded."""
        import bench_fast_forward as bff

        return {"json": json.dumps(bff._encode(self.loader.state_dict()))}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Give the loader its decoded state (applied when its next iterator is created)."""
        import bench_fast_forward as bff

        self.loader.load_state_dict(bff._decode(json.loads(sd["json"])))


class AppState:
    """Model and optimizer as one DCP ``Stateful``, as in the DCP recipe (``get_state_dict`` /
    ``set_state_dict``; the first ``get_state_dict`` of a fresh optimizer initialises its state)."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer) -> None:
        self.net, self.opt = net, opt

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state dicts."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.net, self.opt)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load both into the live objects."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.net, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def lightning_module(
    net: nn.Module, opt: torch.optim.Optimizer | None = None, count_only: bool = False
) -> Any:
    """``net`` as a LightningModule (keys ``net.*``). ``count_only`` (preparation): optimizer steps are
    counted by the Trainer but change nothing, so 3000 mid-epoch batches cost no training."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.given = opt

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            # None: Lightning skips backward and the update, and still counts the optimizer step.
            return None if count_only else loss_of(self.net, batch[0])

        def configure_optimizers(self) -> Any:
            return self.given if self.given is not None else optimizer(self.net.parameters())

    return Module()


def lightning_trainer(root: str, callbacks: list[Any]) -> Any:
    """A quiet CPU Trainer for one epoch."""
    import logging
    import warnings

    import lightning.pytorch as pl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
    )


def accelerate_loader() -> Any:
    """A plain ``DataLoader`` whose ``RandomSampler`` draws from the seeded generator (the Accelerate runs).

    The generator goes to the sampler, not to ``DataLoader(generator=...)``: there the iterator would
    draw its base seed from it first and shift the order away from the other stacks'.
    """
    from torch.utils.data import DataLoader, RandomSampler

    data = dataset()
    return DataLoader(data, batch_size=BATCH, sampler=RandomSampler(data, generator=seeded()))


def stateful_loader(data: Any) -> Any:
    """torchdata's ``StatefulDataLoader``, shuffled by the seeded generator (Lightning and DCP runs)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(data, batch_size=BATCH, shuffle=True, generator=seeded())


class Stop(Exception):
    """Raised in a Lightning hook to end ``fit`` (the preemption in preparation; the end of a timed run)."""


# -- preparation (not timed) ----------------------------------------------------------------------------


def prepare(root: str) -> dict[str, Any]:
    """Train the base state, then write each stack's checkpoint of it at batch ``RESUME_BATCH`` of epoch 0.

    The state (weights and AdamW moments after two real steps) is the same object for all four; each
    stack's own data position is produced the way that stack produces it (iterating its loader, or
    Lightning's fit loop counting steps), and the batch an uninterrupted run takes next is recorded.
    """
    import torch

    torch.manual_seed(SEED)
    net = model()
    opt = optimizer(net.parameters())
    for k in range(2):
        train_step(net, opt, torch.full((BATCH, WIDTH), 0.1 * (k + 1)))
    out: dict[str, Any] = {"fingerprint": fingerprint(net, opt), "next": {}, "seconds": {}}
    for stack in STACKS:
        t = time.monotonic()
        out["next"][stack] = PREPARE[stack](net, opt, os.path.join(root, stack))
        out["seconds"][stack] = time.monotonic() - t
    return out


def _prepare_resumekit(net: nn.Module, opt: torch.optim.Optimizer, path: str) -> list[int]:
    from torch.utils.data import DataLoader

    import resumekit as rk

    data = dataset()
    sampler = rk.ResumableSampler(data, shuffle=True, seed=SEED)
    loader = rk.ResumableLoader(DataLoader(data, batch_size=BATCH, sampler=sampler), seed_workers=False)
    it = iter(loader)
    for _ in range(RESUME_BATCH):
        next(it)
    state = {"model": net, "optimizer": opt, "sampler": sampler, "rng": rk.RNGState()}
    rk.Checkpointer(path).save(state, step=RESUME_BATCH)
    return indices(next(it)[1])  # what the uninterrupted run trains on next


def _prepare_dcp(net: nn.Module, opt: torch.optim.Optimizer, path: str) -> list[int]:
    import torch.distributed.checkpoint as dcp

    loader = stateful_loader(dataset())
    it = iter(loader)
    for _ in range(RESUME_BATCH):
        next(it)
    dcp.save({"app": AppState(net, opt), "dataloader": LoaderState(loader)}, checkpoint_id=path, no_dist=True)
    return indices(next(it)[1])


def _prepare_accelerate(net: nn.Module, opt: torch.optim.Optimizer, path: str) -> list[int]:
    # Accelerate keeps no data position: the loop names the folder after its step (as in accelerate's
    # examples) and the resumed run skips that many batches. Its loader draws the same seeded order.
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loader = accelerate_loader()
    m, o, dl = accelerator.prepare(net, opt, loader)
    if m is not net or getattr(o, "optimizer", None) is not opt:
        raise RuntimeError("accelerate: prepare() replaced the model or optimizer; the state would diverge")
    it = iter(dl)
    for _ in range(RESUME_BATCH):
        next(it)
    accelerator.save_state(os.path.join(path, f"step_{RESUME_BATCH}"))
    return indices(next(it)[1])


def _prepare_lightning(net: nn.Module, opt: torch.optim.Optimizer, path: str) -> list[int]:
    import lightning.pytorch as pl

    file = os.path.join(path, "last.ckpt")
    seen: list[list[int]] = []

    class Preempt(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == RESUME_BATCH:
                seen.append(indices(batch[1]))
                raise Stop

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if trainer.global_step == RESUME_BATCH:  # where ModelCheckpoint(every_n_train_steps) saves
                trainer.save_checkpoint(file)

    os.makedirs(path, exist_ok=True)
    trainer = lightning_trainer(path, [Preempt()])
    try:
        trainer.fit(lightning_module(net, opt, count_only=True), train_dataloaders=stateful_loader(dataset()))
    except Stop:
        pass
    if not seen or not os.path.exists(file):
        raise RuntimeError("lightning: the preparation run did not reach the checkpoint batch")
    return seen[0]


PREPARE = {
    "resumekit": _prepare_resumekit,
    "dcp": _prepare_dcp,
    "accelerate": _prepare_accelerate,
    "lightning": _prepare_lightning,
}


# -- the timed runs -------------------------------------------------------------------------------------


def run_resumekit(root: str, s: Stamps) -> None:
    """``Checkpointer.restore`` + ``ResumableSampler``, the loop of docs/exact-resume.md."""
    import torch  # noqa: F401  (a user's script starts with it)

    s.mark("import torch")
    from torch.utils.data import DataLoader

    import resumekit as rk

    s.mark("import stack")
    net = model()
    s.sub("model")
    opt = optimizer(net.parameters())
    s.sub("optimizer")
    data = dataset()
    sampler = rk.ResumableSampler(data, shuffle=True, seed=SEED)
    loader = rk.ResumableLoader(DataLoader(data, batch_size=BATCH, sampler=sampler), seed_workers=False)
    state = {"model": net, "optimizer": opt, "sampler": sampler, "rng": rk.RNGState()}
    ckpt = rk.Checkpointer(os.path.join(root, "resumekit"))
    s.mark("build")
    ckpt.restore(state)
    s.mark("restore")
    sampler.set_epoch(sampler.epoch)  # the restored epoch: position kept
    it = iter(loader)
    s.mark("fast-forward")
    x, idx = next(it)
    s.mark("first batch")
    train_step(net, opt, x)
    s.mark("first step")
    _finish(s, idx, net, opt)


def run_lightning(root: str, s: Stamps) -> None:
    """``Trainer.fit(module, loader, ckpt_path=...)`` with a ``StatefulDataLoader`` (mid-epoch resume)."""
    import torch  # noqa: F401  (a user's script starts with it)

    s.mark("import torch")
    import lightning.pytorch as pl

    s.mark("import stack")
    got: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            s.mark("fast-forward")  # setup_data loaded the loader's state and created its iterator

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            s.mark("first batch")
            got["idx"], got["batch_idx"] = batch[1], batch_idx

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            s.mark("first step")
            raise Stop

    net = model()
    s.sub("model")
    module = lightning_module(net)
    loader = stateful_loader(dataset())
    path = os.path.join(root, "lightning")
    trainer = lightning_trainer(path, [Probe()])
    connector = trainer._checkpoint_connector
    resume_end = connector.resume_end

    def stamped_resume_end() -> None:  # called right after model, optimizer and loops are restored
        s.mark("restore")
        resume_end()

    connector.resume_end = stamped_resume_end
    s.mark("build")
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=os.path.join(path, "last.ckpt"))
    except Stop:
        pass
    s.extra["batch_idx"] = got.get("batch_idx")
    _finish(s, got["idx"], net, trainer.optimizers[0])


def run_accelerate(root: str, s: Stamps) -> None:
    """``accelerator.load_state`` + ``accelerator.skip_first_batches`` (step from the folder name)."""
    import torch  # noqa: F401  (a user's script starts with it)

    s.mark("import torch")
    from accelerate import Accelerator

    s.mark("import stack")
    accelerator = Accelerator(cpu=True)
    s.sub("accelerator")
    net = model()
    s.sub("model")
    opt = optimizer(net.parameters())
    s.sub("optimizer")
    loader = accelerate_loader()
    net, opt, loader = accelerator.prepare(net, opt, loader)
    folder = os.path.join(root, "accelerate")
    last = max(os.listdir(folder), key=lambda n: int(n.split("_")[1]))
    s.mark("build")
    accelerator.load_state(os.path.join(folder, last))
    resume_step = int(last.split("_")[1])
    s.mark("restore")
    it = iter(accelerator.skip_first_batches(loader, resume_step))
    s.mark("fast-forward")
    x, idx = next(it)
    s.mark("first batch")
    train_step(net, opt, x)
    s.mark("first step")
    _finish(s, idx, net, opt)


def run_dcp(root: str, s: Stamps) -> None:
    """``torch.distributed.checkpoint.load`` (one process, no process group) + ``StatefulDataLoader``."""
    import torch  # a user's script starts with it

    s.mark("import torch")
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (get/set_state_dict, used by AppState)
    import torchdata.stateful_dataloader  # noqa: F401

    s.mark("import stack")
    net = model()
    s.sub("model")
    opt = optimizer(net.parameters())
    s.sub("optimizer")
    loader = stateful_loader(dataset())
    state = {"app": AppState(net, opt), "dataloader": LoaderState(loader)}
    s.mark("build")
    dcp.load(state, checkpoint_id=os.path.join(root, "dcp"), no_dist=True)
    s.mark("restore")
    it = iter(loader)  # StatefulDataLoader applies the loaded state here
    s.mark("fast-forward")
    x, idx = next(it)
    s.mark("first batch")
    train_step(net, opt, x)
    s.mark("first step")
    _finish(s, idx, net, opt)


def _finish(s: Stamps, idx: Any, net: nn.Module, opt: torch.optim.Optimizer) -> None:
    """After the clock: the first batch's indices and the state's fingerprint after the first step."""
    s.extra["next"] = indices(idx)
    s.extra["fingerprint"] = fingerprint(net, opt)


RUNS = {"resumekit": run_resumekit, "lightning": run_lightning, "accelerate": run_accelerate, "dcp": run_dcp}


def main(argv: list[str]) -> int:
    """``STACK CKPT_DIR`` (a timed run) or ``prepare CKPT_DIR``."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    what, root = argv
    if what == "prepare":
        print(json.dumps(prepare(root)), flush=True)
        return 0
    s = Stamps()
    RUNS[what](root, s)
    s.emit()
    sys.stdout.flush()
    os._exit(0)  # the run is over at its first step: skip interpreter teardown (freeing 1 GiB, threads)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
