"""The few torch.distributed collectives the Checkpointer needs, without pickle.

``broadcast_object_list`` and friends pickle their payload; these helpers move UTF-8 JSON as uint8
tensors instead. On a process group without torch.distributed initialised they degrade to the
single-process answer, so the Checkpointer has one code path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Outcomes", "RankFailure", "World", "current_world", "describe"]


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, world size, and the group used for checkpoint collectives."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.size > 1

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _capacity(self) -> int:
        """Payload bytes a rank sends in the first round of an exchange. Most payloads fit, so most
        exchanges are one collective; bounded so that world size x capacity stays small at scale."""
        return max(1 << 10, min(64 << 10, (4 << 20) // self.size))

    def broadcast_json(self, value: Any, src: int = 0) -> Any:
        """Every rank returns rank ``src``'s ``value``."""
        if not self.distributed:
            return value
        dev, cap = self._device(), self._capacity()
        raw = json.dumps(value).encode("utf-8") if self.rank == src else b""
        # torch.distributed.broadcast takes the global rank of the source.
        gsrc = src if self.group is None else dist.get_global_rank(self.group, src)
        head = _framed(raw, cap, dev)
        dist.broadcast(head, src=gsrc, group=self.group)
        n, first = _unframe(head)
        if n <= cap:
            return json.loads(first[:n])
        rest = torch.zeros(n - cap, dtype=torch.uint8, device=dev)
        if self.rank == src:
            rest.copy_(torch.frombuffer(bytearray(raw[cap:]), dtype=torch.uint8))
        dist.broadcast(rest, src=gsrc, group=self.group)
        return json.loads(first + bytes(rest.cpu().numpy()))

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank returns the list of every rank's ``value``, in rank order."""
        if not self.distributed:
            return [value]
        dev, cap = self._device(), self._capacity()
        raw = json.dumps(value).encode("utf-8")
        head = _framed(raw, cap, dev)
        heads = [torch.empty_like(head) for _ in range(self.size)]
        dist.all_gather(heads, head, group=self.group)
        got = [_unframe(h) for h in heads]
        longest = max(n for n, _ in got)
        if longest <= cap:  # one round: every payload fit
            return [json.loads(first[:n]) for n, first in got]
        # A second round carries what did not fit, padded to the longest remainder.
        rest = torch.zeros(longest - cap, dtype=torch.uint8, device=dev)
        if len(raw) > cap:
            rest[: len(raw) - cap] = torch.frombuffer(bytearray(raw[cap:]), dtype=torch.uint8).to(dev)
        rests = [torch.empty_like(rest) for _ in range(self.size)]
        dist.all_gather(rests, rest, group=self.group)
        return [
            json.loads(first[:n] + (bytes(r[: n - cap].cpu().numpy()) if n > cap else b""))
            for (n, first), r in zip(got, rests)
        ]

    def gather_outcomes(
        self, error: BaseException | None, kind: str = "error", payload: Any = None
    ) -> Outcomes:
        """Every rank learns every rank's outcome: its failure (``kind`` and message) or its ``payload``.

        This is the one way ranks agree before they go on: a collective must never be left waiting
        for a rank that raised, and no rank may carry on with a step another rank refused. Pair it
        with :meth:`Outcomes.raise_failures`.
        """
        reports = self.all_gather_json(
            {"kind": kind if error is not None else "", "error": describe(error), "payload": payload}
        )
        return Outcomes(
            tuple(RankFailure(rank, r["kind"], r["error"]) for rank, r in enumerate(reports) if r["error"]),
            tuple(r["payload"] for r in reports),
            self.distributed,
        )


@dataclass(frozen=True)
class RankFailure:
    """One rank's failure, as every rank learned it."""

    rank: int
    kind: str
    message: str


@dataclass(frozen=True)
class Outcomes:
    """What every rank reported to :meth:`World.gather_outcomes` (payloads in rank order)."""

    failures: tuple[RankFailure, ...]
    payloads: tuple[Any, ...]
    distributed: bool

    def of(self, *kinds: str) -> tuple[RankFailure, ...]:
        """The failures of these kinds (every kind when none is given)."""
        return tuple(f for f in self.failures if not kinds or f.kind in kinds)

    def summary(self, *kinds: str) -> str:
        """The failed ranks and the first one's message (just the message in a single process)."""
        failed = self.of(*kinds)
        if not self.distributed:
            return "; ".join(f.message for f in failed)
        return f"rank(s) {', '.join(str(f.rank) for f in failed)}: {failed[0].message}" if failed else ""

    def raise_failures(
        self, local: BaseException | None, elsewhere: Callable[[str], BaseException], *kinds: str
    ) -> None:
        """Raise together when any rank failed (with one of ``kinds``; any failure when none is given):
        ``local`` on a rank that failed so, ``elsewhere(summary)`` on the others."""
        if not self.of(*kinds):
            return
        if local is not None:
            raise local
        raise elsewhere(self.summary(*kinds))


def _framed(raw: bytes, cap: int, dev: torch.device) -> torch.Tensor:
    """``raw``'s length (8 bytes, little-endian) and its first ``cap`` bytes, zero-padded, as uint8."""
    buf = bytearray(8 + cap)
    buf[:8] = len(raw).to_bytes(8, "little")
    first = raw[:cap]
    buf[8 : 8 + len(first)] = first
    return torch.frombuffer(buf, dtype=torch.uint8).to(dev)


def _unframe(head: torch.Tensor) -> tuple[int, bytes]:
    """The length a :func:`_framed` buffer declares, and the payload bytes it carries."""
    data = bytes(head.cpu().numpy())
    return int.from_bytes(data[:8], "little"), data[8:]


def describe(exc: BaseException | None) -> str | None:
    """``"Type: message"`` of an exception, for collectives and messages; None for None."""
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}"


def current_world(group: Any = None) -> World:
    """The world of the default (or given) process group; a single process when not initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(group), size=dist.get_world_size(group), group=group)
    return World()
