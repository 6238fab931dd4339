"""The reference pretrainer's synthetic workload: microbiome-like profiles, a feature tree, pairwise targets.

Everything here is a pure function of a seed; nothing is downloaded. A sample is a compositional
abundance profile over ``F`` features (relative abundances: non-negative, summing to one, mostly zeros),
drawn from one of a few latent "community types" that favour whole clades of a generated feature tree.
The training target of a pair of samples is a distance between their profiles: weighted UniFrac on that
tree (default) or Bray-Curtis. Targets are computed on the fly from the profiles of whatever batch the
loop holds, so any global batch composition (any world size, any sampler order) has exact targets.

Random streams are separated by purpose (tree, community types, one stream per sample, split), so the
tree does not depend on ``num_samples`` and a smaller dataset is a prefix of a larger one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "FeatureTree",
    "SyntheticProfiles",
    "TargetDistance",
    "bray_curtis",
    "random_feature_tree",
    "target_distance",
    "train_val_split",
    "weighted_unifrac",
]

# Stream tags: each purpose draws from its own SeedSequence so that changing one size never shifts
# another purpose's random numbers.
_TREE_STREAM = 0
_COMMUNITY_STREAM = 1
_SAMPLE_STREAM = 2
_SPLIT_STREAM = 3

TargetDistance = Callable[[torch.Tensor], torch.Tensor]
"""Maps profiles ``(N, F)`` to their pairwise target distances ``(N, N)``."""


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}; pass e.g. --seed 0.")
    return np.random.default_rng([seed, stream, *extra])


@dataclass(frozen=True, eq=False)
class FeatureTree:
    """A rooted binary tree whose leaves are the features.

    Nodes ``0 .. F-1`` are the leaves (feature ``f`` is leaf ``f``), nodes ``F .. 2F-2`` are internal,
    and node ``2F-2`` is the root. Every non-root node ``b`` owns the branch to its parent, so branches
    are numbered ``0 .. 2F-3`` like the nodes below them.

    Attributes:
        parent: ``(2F-1,)`` int64 array, the parent of each node; ``-1`` for the root.
        branch_lengths: ``(2F-2,)`` float32 tensor, the length of each branch (positive).
        membership: ``(2F-2, F)`` float32 tensor; ``membership[b, f] == 1`` iff leaf ``f`` lies below
            branch ``b``. ``profiles @ membership.T`` is the abundance below every branch.
        leaf_depths: ``(F,)`` float32 tensor, the root-to-leaf distance of each feature.
    """

    parent: np.ndarray
    branch_lengths: torch.Tensor
    membership: torch.Tensor
    leaf_depths: torch.Tensor

    @property
    def num_features(self) -> int:
        """The number of leaves (features)."""
        return int(self.membership.shape[1])

    @property
    def num_branches(self) -> int:
        """The number of branches, ``2F - 2``."""
        return int(self.membership.shape[0])

    def clade(self, node: int) -> list[int]:
        """Return the features below ``node`` (a node id, leaf or internal), ascending.

        Raises:
            ValueError: ``node`` is not a node of this tree.
        """
        num_nodes = len(self.parent)
        if not 0 <= node < num_nodes:
            raise ValueError(f"node {node} is not in the tree (valid ids: 0..{num_nodes - 1}).")
        if node == num_nodes - 1:
            return list(range(self.num_features))
        return [int(f) for f in torch.nonzero(self.membership[node]).flatten().tolist()]


def random_feature_tree(num_features: int, *, seed: int, mean_branch_length: float = 0.1) -> FeatureTree:
    """Generate a random rooted binary tree over ``num_features`` leaves.

    Topology: repeatedly join two uniformly chosen roots of the current forest (the coalescent's
    topology), so expected depth grows like ``log F``. Branch lengths are exponential with the given mean.

    Args:
        num_features: Number of leaves, at least 2.
        seed: Non-negative seed; the same seed gives the same tree.
        mean_branch_length: Mean of the exponential branch-length distribution, positive.

    Returns:
        The tree with its dense branch-by-feature membership matrix.

    Raises:
        ValueError: ``num_features < 2``, a negative seed or a non-positive branch length.
    """
    if num_features < 2:
        raise ValueError(f"a feature tree needs at least 2 features, got num_features={num_features}.")
    if not mean_branch_length > 0:
        raise ValueError(f"mean_branch_length must be positive, got {mean_branch_length}.")
    rng = _rng(seed, _TREE_STREAM)
    num_nodes = 2 * num_features - 1
    parent = np.full(num_nodes, -1, dtype=np.int64)
    forest = list(range(num_features))
    for new_node in range(num_features, num_nodes):
        for _ in range(2):
            pick = int(rng.integers(len(forest)))
            # Swap-remove keeps each join O(1); the order of `forest` carries no meaning.
            forest[pick], forest[-1] = forest[-1], forest[pick]
            parent[forest.pop()] = new_node
        forest.append(new_node)
    root = num_nodes - 1
    lengths = rng.exponential(mean_branch_length, size=num_nodes - 1)
    # A zero-length branch would make two features indistinguishable to UniFrac; keep them apart.
    lengths = np.maximum(lengths, 1e-6 * mean_branch_length)
    membership = np.zeros((num_nodes - 1, num_features), dtype=np.float32)
    for leaf in range(num_features):
        node = leaf
        while node != root:
            membership[node, leaf] = 1.0
            node = int(parent[node])
    branch_lengths = torch.from_numpy(lengths.astype(np.float32))
    membership_t = torch.from_numpy(membership)
    return FeatureTree(
        parent=parent,
        branch_lengths=branch_lengths,
        membership=membership_t,
        leaf_depths=membership_t.T @ branch_lengths,
    )


def _as_relative(profiles: torch.Tensor, name: str) -> torch.Tensor:
    if profiles.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D (samples, features) tensor, got shape {tuple(profiles.shape)}."
        )
    totals = profiles.sum(dim=1, keepdim=True)
    # An all-zero profile stays all zero instead of becoming NaN.
    return profiles / torch.where(totals > 0, totals, torch.ones_like(totals))


def weighted_unifrac(
    a: torch.Tensor, b: torch.Tensor | None = None, *, tree: FeatureTree, normalized: bool = True
) -> torch.Tensor:
    """Pairwise weighted UniFrac distances between the rows of ``a`` and of ``b``.

    ``u(A, B) = sum_branches length * |share of A below the branch - share of B below it|``, computed for
    all pairs at once as a weighted L1 distance between the cumulative abundances ``profiles @ M.T``.
    Normalised, it is divided by ``sum_f depth_f * (A_f + B_f)`` and lies in ``[0, 1]``.
    Rows are rescaled to relative abundances first. Differentiable; deterministic on CPU.

    Args:
        a: ``(N, F)`` non-negative abundances.
        b: ``(M, F)`` non-negative abundances; ``None`` means ``a`` (then the result is exactly symmetric
            with a zero diagonal).
        tree: The feature tree; ``F`` must equal ``tree.num_features``.
        normalized: Divide by the sum of the two samples' mean root-to-leaf depths.

    Returns:
        ``(N, M)`` float tensor of distances.

    Raises:
        ValueError: The inputs are not 2-D or their feature count does not match the tree.
    """
    pa = _as_relative(a, "a")
    pb = pa if b is None else _as_relative(b, "b")
    for name, p in (("a", pa), ("b", pb)):
        if p.shape[1] != tree.num_features:
            raise ValueError(
                f"{name} has {p.shape[1]} features but the tree has {tree.num_features}; build the tree "
                "from the same num_features as the profiles."
            )
    membership = tree.membership.to(device=pa.device, dtype=pa.dtype)
    lengths = tree.branch_lengths.to(device=pa.device, dtype=pa.dtype)
    # length * |x - y| == |length*x - length*y| because lengths are positive, so a plain L1 cdist works.
    ca = (pa @ membership.T) * lengths
    cb = ca if b is None else (pb @ membership.T) * lengths
    dist = _l1_cdist(ca, cb)
    if not normalized:
        return dist
    depths = tree.leaf_depths.to(device=pa.device, dtype=pa.dtype)
    da = pa @ depths
    db = da if b is None else pb @ depths
    denom = da[:, None] + db[None, :]
    return dist / torch.where(denom > 0, denom, torch.ones_like(denom))


def bray_curtis(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise Bray-Curtis dissimilarities ``sum|a - b| / sum(a + b)`` between rows of ``a`` and ``b``.

    Computed on the abundances as given (relative abundances in this workload); a pair of all-zero rows
    has dissimilarity 0.

    Args:
        a: ``(N, F)`` non-negative abundances.
        b: ``(M, F)`` non-negative abundances; ``None`` means ``a``.

    Returns:
        ``(N, M)`` float tensor with values in ``[0, 1]``.

    Raises:
        ValueError: The inputs are not 2-D or their feature counts differ.
    """
    if a.dim() != 2 or (b is not None and b.dim() != 2):
        raise ValueError("bray_curtis expects 2-D (samples, features) tensors.")
    other = a if b is None else b
    if other.shape[1] != a.shape[1]:
        raise ValueError(f"a has {a.shape[1]} features and b has {other.shape[1]}; they must match.")
    num = _l1_cdist(a, other)
    denom = a.sum(dim=1)[:, None] + other.sum(dim=1)[None, :]
    return num / torch.where(denom > 0, denom, torch.ones_like(denom))


def _l1_cdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # p=1 never takes cdist's matrix-multiplication shortcut, so (i, j) and (j, i) are summed in the same
    # order: the result is exactly symmetric with an exact zero diagonal when x is y.
    return torch.cdist(x.unsqueeze(0), y.unsqueeze(0), p=1.0).squeeze(0)


def target_distance(
    metric: Literal["unifrac", "braycurtis"] = "unifrac", *, tree: FeatureTree | None = None
) -> TargetDistance:
    """Return the function computing pairwise target distances for a batch of profiles.

    Args:
        metric: ``"unifrac"`` (normalised weighted UniFrac, needs ``tree``) or ``"braycurtis"``.
        tree: The feature tree, required for UniFrac.

    Returns:
        A function mapping profiles ``(N, F)`` to an ``(N, N)`` distance matrix.

    Raises:
        ValueError: An unknown metric, or UniFrac without a tree.
    """
    if metric == "unifrac":
        if tree is None:
            raise ValueError("metric 'unifrac' needs the feature tree; pass tree=dataset.tree.")
        return partial(weighted_unifrac, tree=tree, normalized=True)
    if metric == "braycurtis":
        return bray_curtis
    raise ValueError(f"unknown target metric {metric!r}; choose 'unifrac' or 'braycurtis'.")


class SyntheticProfiles(Dataset[tuple[torch.Tensor, int]]):
    """A deterministic microbiome-like dataset: ``dataset[i] == (profile_i, i)``.

    Generation, all from ``seed``:

    1. a random feature tree (:func:`random_feature_tree`);
    2. ``num_communities`` community types, each favouring two or three random clades of the tree
       (higher log-abundance and presence probability there) over a sparse background;
    3. per sample: a main community mixed with up to 30 % of a second one, log-normal abundances on the
       features present, then a multinomial draw of ``sequencing_depth`` reads, normalised to relative
       abundances (so rare features drop out like in real sequencing).

    Args:
        num_samples: Number of samples, at least 1.
        num_features: Number of features (tree leaves), at least 2.
        seed: Non-negative seed. Same arguments, same tensors, bit for bit.
        num_communities: Number of latent community types, at least 1.
        sequencing_depth: Reads drawn per sample, at least 1.

    Attributes:
        profiles: ``(num_samples, num_features)`` float32 relative abundances (rows sum to 1).
        communities: ``(num_samples,)`` int64 main community type of each sample (for diagnostics).
        tree: The generated :class:`FeatureTree`.

    Raises:
        ValueError: A size or the seed is out of range.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        num_features: int = 256,
        *,
        seed: int = 0,
        num_communities: int = 8,
        sequencing_depth: int = 2000,
    ) -> None:
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("num_communities", num_communities, 1),
            ("sequencing_depth", sequencing_depth, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}.")
        self.seed = seed
        self.tree = random_feature_tree(num_features, seed=seed)
        log_means, presence = _community_types(self.tree, num_communities, seed)
        profiles = np.empty((num_samples, num_features), dtype=np.float64)
        communities = np.empty(num_samples, dtype=np.int64)
        for i in range(num_samples):
            communities[i], profiles[i] = _draw_sample(
                _rng(seed, _SAMPLE_STREAM, i), log_means, presence, sequencing_depth
            )
        self.profiles = torch.from_numpy(profiles.astype(np.float32))
        self.communities = torch.from_numpy(communities)

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.profiles.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(profile, index)``: a float32 ``(F,)`` tensor and the sample's index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} is out of range for a dataset of {len(self)} samples.")
        return self.profiles[index], int(index) % len(self)


def _community_types(tree: FeatureTree, num_communities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per community: log-mean abundances and presence probabilities, ``(K, F)`` each."""
    rng = _rng(seed, _COMMUNITY_STREAM)
    num_features = tree.num_features
    # Clades of a moderate size make UniFrac differ from Bray-Curtis: related features co-occur.
    sizes = tree.membership.sum(dim=1).numpy()
    target = max(2.0, num_features / 16)
    candidates = np.flatnonzero((sizes >= 2) & (sizes <= 4 * target))
    if candidates.size == 0:
        candidates = np.arange(tree.num_branches)
    log_means = rng.normal(0.0, 1.0, size=(num_communities, num_features))
    presence = np.full((num_communities, num_features), 0.08)
    for k in range(num_communities):
        for node in rng.choice(candidates, size=min(3, candidates.size), replace=False):
            clade = tree.clade(int(node))
            log_means[k, clade] += rng.normal(3.0, 0.5)
            presence[k, clade] = 0.85
    return log_means, presence


def _draw_sample(
    rng: np.random.Generator, log_means: np.ndarray, presence: np.ndarray, depth: int
) -> tuple[int, np.ndarray]:
    num_communities, num_features = log_means.shape
    main = int(rng.integers(num_communities))
    other = int(rng.integers(num_communities))
    mix = rng.uniform(0.0, 0.3)
    mean = (1 - mix) * log_means[main] + mix * log_means[other]
    present = rng.uniform(size=num_features) < (1 - mix) * presence[main] + mix * presence[other]
    if not present.any():
        present[int(np.argmax(mean))] = True
    weights = np.exp(mean + rng.normal(0.0, 1.0, size=num_features)) * present
    counts = rng.multinomial(depth, weights / weights.sum())
    return main, counts / depth


def train_val_split(
    num_samples: int, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Split ``range(num_samples)`` into train and validation indices, as a pure function of the seed.

    Field lesson: an unseeded split differs between runs, so a resumed run would validate on samples it
    has trained on. The same arguments always give the same split, on every rank and every resume.

    Args:
        num_samples: Dataset length, at least 2.
        val_fraction: Share of samples held out, in ``(0, 1)``; rounded, at least one sample each side.
        seed: Non-negative seed (its own stream: the data seed can be reused).

    Returns:
        ``(train_indices, val_indices)``, each ascending, disjoint, together covering every index.

    Raises:
        ValueError: Fewer than 2 samples, or ``val_fraction`` outside ``(0, 1)``.
    """
    if num_samples < 2:
        raise ValueError(f"a train/validation split needs at least 2 samples, got {num_samples}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}.")
    num_val = min(max(1, round(num_samples * val_fraction)), num_samples - 1)
    order = _rng(seed, _SPLIT_STREAM, num_samples).permutation(num_samples)
    val = sorted(int(i) for i in order[:num_val])
    train = sorted(int(i) for i in order[num_val:])
    return train, val
