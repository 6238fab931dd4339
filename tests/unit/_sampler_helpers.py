"""Helpers shared by the sampler tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from resumekit.sampler import per_rank_count


class Unreadable:
    """A dataset that has a length and fails loudly if a sample is ever read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        raise AssertionError(f"sample {index} was read")


def take(samplers: list[Any], steps: int) -> list[list[int]]:
    """Every rank pulls ``steps`` samples in lockstep, as DDP ranks do."""
    iters = [iter(s) for s in samplers]
    return [[next(it) for _ in range(steps)] for it in iters]


def assert_exact_repartition(
    seen: list[int], after: list[Any], n: int, k: int, world: int, new_world: int, drop_last: bool
) -> None:
    """After ``k`` samples per rank on ``world`` ranks (``seen``), the restored ``new_world`` samplers
    (``after``) visit every unseen sample once, with DistributedSampler's padding and drop_last rules."""
    lengths = [len(s) for s in after]
    rest = [list(s) for s in after]
    assert lengths == [len(r) for r in rest]
    assert len({len(r) for r in rest}) == 1, "every rank gets the same count"
    unseen_count = max(0, n - k * world)
    per_rank = len(rest[0])
    assert per_rank == per_rank_count(unseen_count, new_world, drop_last)

    got = Counter(i for r in rest for i in r)
    seen_set = set(seen)
    if k * world <= n:
        assert len(seen_set) == len(seen), "no sample seen twice before the padding region"
    assert not seen_set & set(got), "nothing already seen is yielded again"
    unseen = set(range(n)) - seen_set
    if drop_last:
        assert all(c == 1 for c in got.values())
        assert set(got) <= unseen
        assert len(unseen) - len(got) == unseen_count % new_world  # only the uneven tail is dropped
    else:
        assert set(got) == unseen, "every unseen sample is visited"
        padding = sum(got.values()) - len(unseen)
        assert padding == per_rank * new_world - unseen_count
        assert 0 <= padding < new_world or unseen_count == 0
