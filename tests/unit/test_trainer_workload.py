"""The reference pretrainer's workload: deterministic data and split, target distances, encoder, loss."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_trainer.data import (
    FeatureTree,
    SyntheticProfiles,
    bray_curtis,
    random_feature_tree,
    target_distance,
    train_val_split,
    weighted_unifrac,
)
from reference_trainer.loss import (
    PairwiseOutput,
    PairwiseStats,
    embedding_distances,
    gather_with_grad,
    pairwise_loss,
    upper_triangle,
)
from reference_trainer.model import ProfileEncoder

DOCS = Path(__file__).resolve().parents[2] / "docs" / "pairwise-loss.md"


def _random_profiles(n: int, f: int, seed: int, *, sparsity: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, f, generator=gen) * (torch.rand(n, f, generator=gen) > sparsity)
    x[:, 0] += 1e-3  # no all-zero rows
    return x / x.sum(dim=1, keepdim=True)


# --- data and split determinism -------------------------------------------------------------------


def test_dataset_is_a_pure_function_of_its_seed() -> None:
    a = SyntheticProfiles(256, 64, seed=3)
    b = SyntheticProfiles(256, 64, seed=3)
    c = SyntheticProfiles(256, 64, seed=4)
    assert torch.equal(a.profiles, b.profiles)
    assert torch.equal(a.tree.membership, b.tree.membership)
    assert torch.equal(a.tree.branch_lengths, b.tree.branch_lengths)
    assert not torch.equal(a.profiles, c.profiles)
    assert not torch.equal(a.tree.membership, c.tree.membership)


def test_smaller_dataset_is_a_prefix_and_tree_ignores_num_samples() -> None:
    small = SyntheticProfiles(50, 64, seed=1)
    large = SyntheticProfiles(120, 64, seed=1)
    assert torch.equal(small.profiles, large.profiles[:50])
    assert torch.equal(small.tree.membership, large.tree.membership)


def test_dataset_samples_are_compositional_float32_and_sparse() -> None:
    ds = SyntheticProfiles(300, 128, seed=0)
    assert len(ds) == 300
    profile, index = ds[17]
    assert profile.dtype == torch.float32 and profile.shape == (128,)
    assert index == 17 and torch.equal(profile, ds.profiles[17])
    assert (ds.profiles >= 0).all()
    torch.testing.assert_close(ds.profiles.sum(dim=1), torch.ones(300), rtol=0, atol=1e-5)
    zero_share = (ds.profiles == 0).float().mean().item()
    assert 0.5 < zero_share < 0.99
    with pytest.raises(IndexError, match="out of range"):
        ds[300]


def test_dataset_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticProfiles(0, 16)
    with pytest.raises(ValueError, match="at least 2 features"):
        SyntheticProfiles(4, 1)
    with pytest.raises(ValueError, match="seed"):
        SyntheticProfiles(4, 8, seed=-1)


def test_same_community_samples_are_closer_under_unifrac() -> None:
    ds = SyntheticProfiles(400, 128, seed=5)
    d = weighted_unifrac(ds.profiles, tree=ds.tree)
    same = ds.communities[:, None] == ds.communities[None, :]
    off_diag = ~torch.eye(len(ds), dtype=torch.bool)
    assert d[same & off_diag].mean() < 0.8 * d[~same].mean()


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = train_val_split(1000, val_fraction=0.2, seed=11)
    again = train_val_split(1000, val_fraction=0.2, seed=11)
    other = train_val_split(1000, val_fraction=0.2, seed=12)
    assert (train, val) == again
    assert (train, val) != other
    assert len(val) == 200 and len(train) == 800
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == list(range(1000))
    assert train == sorted(train) and val == sorted(val)
    # Not a contiguous slice: validation is spread over the whole index range.
    assert min(val) < 100 and max(val) > 900


def test_split_keeps_one_sample_each_side_and_rejects_bad_input() -> None:
    train, val = train_val_split(2, val_fraction=0.01, seed=0)
    assert len(train) == 1 and len(val) == 1
    train, val = train_val_split(3, val_fraction=0.99, seed=0)
    assert len(train) == 1 and len(val) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(10, val_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        train_val_split(1)


# --- the feature tree ---------------------------------------------------------------------------------


def test_tree_is_a_rooted_binary_tree() -> None:
    tree = random_feature_tree(40, seed=2)
    f = 40
    assert tree.parent.shape == (2 * f - 1,)
    assert tree.parent[-1] == -1 and (tree.parent[:-1] >= f).all()
    children = np.bincount(tree.parent[:-1], minlength=2 * f - 1)
    assert (children[:f] == 0).all() and (children[f:] == 2).all()
    assert (tree.branch_lengths > 0).all()
    # A leaf's own branch holds only that leaf; the root's two children split all leaves between them.
    torch.testing.assert_close(tree.membership[:f], torch.eye(f))
    top = np.flatnonzero(tree.parent == 2 * f - 2)
    assert sorted(tree.clade(int(top[0])) + tree.clade(int(top[1]))) == list(range(f))
    torch.testing.assert_close(tree.leaf_depths, tree.membership.T @ tree.branch_lengths)


# --- target distances ---------------------------------------------------------------------------------


def _slow_weighted_unifrac(a: list[float], b: list[float], tree: FeatureTree, *, normalized: bool) -> float:
    """Textbook weighted UniFrac: walk every branch, sum the leaves below it by recursion."""
    parent = [int(p) for p in tree.parent]
    lengths = [float(x) for x in tree.branch_lengths]
    f = len(a)
    children: dict[int, list[int]] = {}
    for node, p in enumerate(parent):
        children.setdefault(p, []).append(node)

    def below(node: int, p: list[float]) -> float:
        return p[node] if node < f else sum(below(c, p) for c in children[node])

    ta, tb = sum(a), sum(b)
    ra, rb = [x / ta for x in a], [x / tb for x in b]
    u = sum(lengths[node] * abs(below(node, ra) - below(node, rb)) for node in range(len(parent) - 1))
    if not normalized:
        return u

    def depth(leaf: int) -> float:
        total, node = 0.0, leaf
        while parent[node] != -1:
            total, node = total + lengths[node], parent[node]
        return total

    return u / sum(depth(i) * (ra[i] + rb[i]) for i in range(f))


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unifrac_matches_slow_reference_on_tiny_trees(seed: int, normalized: bool) -> None:
    tree = random_feature_tree(7, seed=seed)
    x = _random_profiles(5, 7, seed=seed + 100)
    fast = weighted_unifrac(x, tree=tree, normalized=normalized)
    for i, j in itertools.product(range(5), repeat=2):
        slow = _slow_weighted_unifrac(x[i].tolist(), x[j].tolist(), tree, normalized=normalized)
        assert fast[i, j].item() == pytest.approx(slow, rel=1e-5, abs=1e-6)


def test_unifrac_hand_computed_example() -> None:
    # Tree ((0:1, 1:2):3, 2:4) built by hand: nodes 0,1,2 leaves; 3 joins 0 and 1; 4 is the root.
    membership = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    lengths = torch.tensor([1.0, 2.0, 4.0, 3.0])
    tree = FeatureTree(
        parent=np.array([3, 3, 4, 4, -1]),
        branch_lengths=lengths,
        membership=membership,
        leaf_depths=membership.T @ lengths,
    )
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0]])
    # A and B differ on branches 0 and 1 only (both sit below branch 3): 1*1 + 2*1 = 3.
    assert weighted_unifrac(a, b, tree=tree, normalized=False).item() == pytest.approx(3.0)
    # Depths: leaf 0 is 1+3 = 4, leaf 1 is 2+3 = 5, so the normaliser is 4 + 5.
    assert weighted_unifrac(a, b, tree=tree).item() == pytest.approx(3.0 / 9.0)


def test_unifrac_is_zero_on_identical_symmetric_nonnegative_and_a_metric() -> None:
    ds = SyntheticProfiles(40, 32, seed=8)
    x = ds.profiles
    d = weighted_unifrac(x, tree=ds.tree)
    assert torch.equal(d, d.T)
    assert torch.equal(d.diagonal(), torch.zeros(40))
    assert (d >= 0).all() and (d <= 1 + 1e-6).all()
    assert (d + torch.eye(40)).min() > 0  # distinct samples are apart
    # Scaling a profile does not change its relative abundances, hence its distances.
    torch.testing.assert_close(weighted_unifrac(x * 7.0, x, tree=ds.tree), d)
    raw = weighted_unifrac(x, tree=ds.tree, normalized=False)
    # Raw weighted UniFrac is an L1 distance between cumulative abundances: the triangle inequality holds.
    assert (raw[:, None, :] <= raw[:, :, None] + raw[None, :, :] + 1e-5).all()


def test_unifrac_rejects_mismatched_features() -> None:
    tree = random_feature_tree(8, seed=0)
    with pytest.raises(ValueError, match="features but the tree has 8"):
        weighted_unifrac(torch.ones(2, 9), tree=tree)


def test_bray_curtis_matches_direct_formula() -> None:
    x = _random_profiles(6, 10, seed=4) * torch.arange(1, 7).float()[:, None]  # unequal totals
    y = _random_profiles(4, 10, seed=5)
    fast = bray_curtis(x, y)
    for i, j in itertools.product(range(6), range(4)):
        a, b = x[i].tolist(), y[j].tolist()
        direct = sum(abs(p - q) for p, q in zip(a, b)) / sum(p + q for p, q in zip(a, b))
        assert fast[i, j].item() == pytest.approx(direct, rel=1e-5)
    square = bray_curtis(x)
    assert torch.equal(square, square.T) and torch.equal(square.diagonal(), torch.zeros(6))
    disjoint = bray_curtis(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert disjoint.item() == 1.0


def test_target_distance_selects_metric_and_validates() -> None:
    ds = SyntheticProfiles(10, 16, seed=0)
    torch.testing.assert_close(target_distance("braycurtis")(ds.profiles), bray_curtis(ds.profiles))
    torch.testing.assert_close(
        target_distance("unifrac", tree=ds.tree)(ds.profiles), weighted_unifrac(ds.profiles, tree=ds.tree)
    )
    with pytest.raises(ValueError, match="needs the feature tree"):
        target_distance("unifrac")
    with pytest.raises(ValueError, match="unknown target metric"):
        target_distance("jaccard")  # type: ignore[arg-type]


# --- encoder and loss (single process) ---------------------------------------------------------------


def test_encoder_shapes_and_per_sample_independence() -> None:
    torch.manual_seed(0)
    model = ProfileEncoder(32, hidden_dims=(16,), embedding_dim=8, dropout=0.0).eval()
    x = SyntheticProfiles(12, 32, seed=0).profiles
    out = model(x)
    assert out.shape == (12, 8) and out.dtype == torch.float32
    # LayerNorm, not BatchNorm: a sample's embedding does not depend on its batch-mates.
    torch.testing.assert_close(model(x[:5]), out[:5])
    with pytest.raises(ValueError, match=r"shape \(batch, 32\)"):
        model(torch.ones(3, 31))


def test_embedding_distances_match_cdist_and_have_finite_gradients() -> None:
    e = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(embedding_distances(e), upper_triangle(torch.cdist(e, e)))
    torch.testing.assert_close(embedding_distances(e, "sqeuclidean"), upper_triangle(torch.cdist(e, e) ** 2))
    cos = 1 - torch.nn.functional.cosine_similarity(e[:, None, :], e[None, :, :], dim=2)
    torch.testing.assert_close(embedding_distances(e, "cosine"), upper_triangle(cos))
    dup = torch.cat([e[:1], e[:1]]).requires_grad_()
    embedding_distances(dup).sum().backward()
    assert dup.grad is not None and torch.isfinite(dup.grad).all()


def test_pairwise_loss_is_mse_over_all_pairs_and_gather_is_identity_single_process() -> None:
    ds = SyntheticProfiles(16, 32, seed=1)
    target = target_distance("unifrac", tree=ds.tree)
    e = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert gather_with_grad(e) is e
    out = pairwise_loss(e, ds.profiles, target)
    assert out.predicted.shape == (16 * 15 // 2,) and out.num_samples == 16
    expected = (upper_triangle(torch.cdist(e, e)) - upper_triangle(target(ds.profiles))).pow(2).mean()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    single = pairwise_loss(e[:1], ds.profiles[:1], target)
    assert single.loss.item() == 0.0
    with pytest.raises(ValueError, match="rows but profiles has"):
        pairwise_loss(e, ds.profiles[:3], target)


def test_stats_expose_a_collapsed_model() -> None:
    ds = SyntheticProfiles(64, 32, seed=2)
    target = target_distance("unifrac", tree=ds.tree)
    collapsed, good = PairwiseStats(), PairwiseStats()
    assert np.isnan(collapsed.compute()["loss"])
    for part in (slice(0, 32), slice(32, 64)):
        truth = upper_triangle(target(ds.profiles[part]))
        # A collapsed encoder predicts one distance for every pair; a good one tracks the targets.
        flat = torch.full_like(truth, 0.5)
        collapsed.update(
            PairwiseOutput(loss=(flat - truth).pow(2).mean(), predicted=flat, target=truth, num_samples=32)
        )
        good.update(
            PairwiseOutput(
                loss=(0.1 * truth).pow(2).mean(), predicted=1.1 * truth, target=truth, num_samples=32
            )
        )
    bad, fine = collapsed.compute(), good.compute()
    assert bad["predicted_std"] < 1e-6 and bad["target_std"] > 0.05 and bad["spread_ratio"] < 1e-4
    assert fine["spread_ratio"] == pytest.approx(1.1, rel=1e-5)
    assert fine["pearson"] == pytest.approx(1.0, rel=1e-5)
    assert collapsed.num_pairs == 2 * (32 * 31 // 2)
    all_targets = torch.cat([upper_triangle(target(ds.profiles[p])) for p in (slice(0, 32), slice(32, 64))])
    assert bad["loss"] == pytest.approx((all_targets.double() - 0.5).pow(2).mean().item(), rel=1e-6)


def test_training_on_the_workload_reduces_validation_loss_deterministically() -> None:
    def run() -> tuple[float, float, torch.Tensor]:
        torch.manual_seed(0)
        ds = SyntheticProfiles(256, 64, seed=0)
        train, val = train_val_split(len(ds), val_fraction=0.25, seed=0)
        target = target_distance("unifrac", tree=ds.tree)
        model = ProfileEncoder(64, hidden_dims=(64,), embedding_dim=16, dropout=0.1)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def validate() -> float:
            model.eval()
            stats = PairwiseStats()
            with torch.no_grad():
                x = ds.profiles[val]
                stats.update(pairwise_loss(model(x), x, target))
            model.train()
            return stats.compute()["loss"]

        before = validate()
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            for batch in torch.randperm(len(train), generator=gen).split(32):
                x = ds.profiles[[train[i] for i in batch.tolist()]]
                loss = pairwise_loss(model(x), x, target).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        return before, validate(), torch.cat([p.detach().flatten() for p in model.parameters()])

    before, after, weights = run()
    assert after < 0.5 * before
    assert torch.equal(run()[2], weights)


def test_docs_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, f"{DOCS} has no python code block"
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)


@pytest.mark.parametrize("metric", ["unifrac", "braycurtis"])
def test_loss_runs_under_deterministic_algorithms_bit_for_bit(metric: str) -> None:
    ds = SyntheticProfiles(48, 32, seed=0)
    target = target_distance(metric, tree=ds.tree)  # type: ignore[arg-type]

    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = ProfileEncoder(32, hidden_dims=(16,), embedding_dim=4)
        pairwise_loss(model(ds.profiles), ds.profiles, target).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # raises inside any op without a deterministic kernel
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(first) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, second))
