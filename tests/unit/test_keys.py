"""Canonical keys across plain, DataParallel, DDP and compiled models; shape checks before loading."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from resumekit.engine.environment import collect_environment
from resumekit.engine.keys import (
    canonical_key_map,
    canonical_state_dict,
    load_canonical,
    to_model_keys,
    unwrap_model,
)
from resumekit.engine.shapes import (
    PartialLoad,
    ShapeMismatch,
    check_keys,
    check_shapes,
    find_shape_mismatches,
    load_matching,
)
from resumekit.errors import StateMismatchError
from tests._dist import launch

PLAIN_KEYS = [
    "embed.weight",
    "body.0.weight",
    "body.0.bias",
    "body.1.weight",
    "body.1.bias",
    "body.1.running_mean",
    "body.1.running_var",
    "body.1.num_batches_tracked",
    "head.weight",
    "head.bias",
]


class Net(nn.Module):
    def __init__(self, vocab: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, classes)


def make(seed: int, **kwargs: int) -> Net:
    """A model whose every tensor, buffers included, depends on ``seed``."""
    torch.manual_seed(seed)
    net = Net(**kwargs)
    with torch.no_grad():
        net.body[1].running_mean.uniform_()
        net.body[1].running_var.uniform_(1, 2)
        net.body[1].num_batches_tracked.fill_(seed)
    return net


def compiled(model: nn.Module) -> nn.Module:
    # The eager backend wraps without generating code: keys are what matters here, not kernels.
    return torch.compile(model, backend="eager")  # type: ignore[return-value]


LOCAL_WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "dataparallel": nn.DataParallel,
    "compiled": compiled,
    "compiled_dataparallel": lambda m: compiled(nn.DataParallel(m)),
    "dataparallel_compiled": lambda m: nn.DataParallel(compiled(m)),
}


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    got, want = unwrap_model(actual).state_dict(), unwrap_model(expected).state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def roundtrip(
    source_kind: str, target_kind: str, wrappers: dict[str, Callable[[nn.Module], nn.Module]]
) -> None:
    source = wrappers[source_kind](make(1))
    saved = canonical_state_dict(source.state_dict(), source)
    assert list(saved) == PLAIN_KEYS, source_kind
    target = wrappers[target_kind](make(2))
    load_canonical(target, saved)  # strict: every key must land
    assert_same_state(target, source)


# ------------------------------------------------------------------------------------ local wrappers


@pytest.mark.parametrize("source_kind", list(LOCAL_WRAPPERS))
@pytest.mark.parametrize("target_kind", list(LOCAL_WRAPPERS))
def test_save_under_one_wrapper_load_into_another(source_kind: str, target_kind: str) -> None:
    roundtrip(source_kind, target_kind, LOCAL_WRAPPERS)


@pytest.mark.parametrize("kind", list(LOCAL_WRAPPERS))
def test_unwrap_model_returns_the_inner_model(kind: str) -> None:
    inner = make(0)
    assert unwrap_model(LOCAL_WRAPPERS[kind](inner)) is inner


@pytest.mark.parametrize("kind", list(LOCAL_WRAPPERS))
def test_heuristic_matches_model_aware_canonicalisation(kind: str) -> None:
    model = LOCAL_WRAPPERS[kind](make(0))
    state = model.state_dict()
    assert list(canonical_state_dict(state)) == list(canonical_state_dict(state, model)) == PLAIN_KEYS
    assert list(canonical_key_map(model).values()) == PLAIN_KEYS


def test_wrapped_keys_really_differ() -> None:
    # Guards the tests above against a torch where wrappers stop prefixing keys.
    assert next(iter(compiled(nn.DataParallel(make(0))).state_dict())) == "_orig_mod.module.embed.weight"


def test_values_are_not_copied() -> None:
    model = nn.DataParallel(make(0))
    state = model.state_dict()
    assert canonical_state_dict(state, model)["head.weight"] is state["module.head.weight"]


def test_foreign_prefixed_state_dict_loads_into_any_wrapper() -> None:
    # A plain torch.save(ddp_model.state_dict()) from elsewhere still carries "module.".
    foreign = {f"module.{k}": v for k, v in make(1).state_dict().items()}
    for kind, wrap in LOCAL_WRAPPERS.items():
        target = wrap(make(2))
        target.load_state_dict(to_model_keys(foreign, target))
        assert_same_state(target, make(1)), kind


class Holder(nn.Module):
    """A user model whose only child is genuinely called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)


def test_genuine_submodule_named_module_keeps_its_name() -> None:
    plain, wrapped = Holder(), nn.DataParallel(Holder())
    assert list(canonical_state_dict(plain.state_dict(), plain)) == ["module.weight", "module.bias"]
    saved = canonical_state_dict(wrapped.state_dict(), wrapped)
    assert list(saved) == ["module.weight", "module.bias"]
    load_canonical(plain, saved)
    assert torch.equal(plain.module.weight, wrapped.module.module.weight)
    load_canonical(compiled(Holder()), saved)  # and into a compiled copy
    # Without the model, a lone top-level "module." cannot be told from a wrapper: that is why the
    # Checkpointer always passes the model.
    assert list(canonical_state_dict(plain.state_dict())) == ["weight", "bias"]


class Outer(nn.Module):
    def __init__(self, compile_encoder: bool) -> None:
        super().__init__()
        encoder = nn.Linear(3, 3)
        self.encoder = compiled(encoder) if compile_encoder else encoder
        self.decoder = nn.Linear(3, 1)


def test_compiled_submodule_deep_inside_the_model() -> None:
    torch.manual_seed(1)
    source = Outer(compile_encoder=True)
    assert "encoder._orig_mod.weight" in source.state_dict()
    saved = canonical_state_dict(source.state_dict(), source)
    assert list(saved) == ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    for target in (Outer(compile_encoder=False), nn.DataParallel(Outer(compile_encoder=True))):
        load_canonical(target, saved)
        assert torch.equal(unwrap_model(target).encoder.weight, saved["encoder.weight"])


def test_keys_collapsing_onto_one_name_are_refused() -> None:
    with pytest.raises(StateMismatchError, match="same canonical name 'a'"):
        canonical_state_dict({"_orig_mod.a": torch.zeros(1), "a": torch.zeros(1)})


def test_unknown_keys_pass_through_for_load_state_dict_to_report() -> None:
    model = nn.DataParallel(nn.Linear(2, 2))
    mapped = to_model_keys({"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}, model)
    assert list(mapped) == ["module.weight", "extra"]
    with pytest.raises(RuntimeError, match="extra"):
        model.load_state_dict(mapped)


# --------------------------------------------------------------------------------------------- DDP


DDP_WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda m: m,
    "dataparallel": nn.DataParallel,
    "compiled": compiled,
    "ddp": nn.parallel.DistributedDataParallel,
    "compiled_ddp": lambda m: compiled(nn.parallel.DistributedDataParallel(m)),
}


def _ddp_worker(rank: int, world_size: int) -> None:
    if collect_environment()["world_size"] != world_size:
        raise AssertionError("collect_environment did not read the process group's world size")
    for source_kind in DDP_WRAPPERS:
        for target_kind in DDP_WRAPPERS:
            if "ddp" in source_kind or "ddp" in target_kind:
                roundtrip(source_kind, target_kind, DDP_WRAPPERS)


@pytest.mark.distributed
def test_ddp_every_pair_two_processes() -> None:
    launch(_ddp_worker, 2, deadline=180)


# ------------------------------------------------------------------------------------------ shapes


def test_shape_mismatch_names_every_parameter_both_shapes_and_the_fix() -> None:
    saved = make(1).state_dict()
    target = nn.DataParallel(make(2, vocab=12, classes=5))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateMismatchError) as info:
        check_shapes(saved, target)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "Cannot restore 'model': 3 saved tensors do not fit the model's shapes:\n"
        "  - embed.weight: checkpoint [10, 4], model [12, 4]\n"
        "  - head.weight: checkpoint [3, 4], model [5, 4]\n"
        "  - head.bias: checkpoint [3], model [5]\n"
        "Likely cause: the model changed since the checkpoint was saved (a grown vocabulary, a new head). "
        "To load every tensor that fits and keep the model's own values for the rest, use "
        "restore(..., allow_shape_mismatch=True). Nothing was loaded."
    )
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_shape_check_accepts_shapes_without_tensor_data() -> None:
    header = {k: list(v.shape) for k, v in make(1).state_dict().items()}  # as a safetensors header gives
    header["_extra_state"] = "not a tensor"
    mismatches = find_shape_mismatches(header, compiled(make(2, vocab=11)))
    assert mismatches == [ShapeMismatch("embed.weight", (10, 4), (11, 4))]
    with pytest.raises(
        StateMismatchError, match=r"(?s)'encoder': 1 saved tensor does not fit.*use load_matching\(\)"
    ):
        check_shapes(header, make(2, vocab=11), entry="encoder", fix="load_matching()")


def test_matching_shapes_pass() -> None:
    check_shapes(make(1).state_dict(), compiled(make(2)))
    assert find_shape_mismatches(make(1).state_dict(), make(2)) == []


def test_load_matching_loads_what_fits_and_reports_the_rest() -> None:
    source = make(1)
    saved = canonical_state_dict(source.state_dict(), source)
    saved["old_head.weight"] = torch.ones(1)
    del saved["body.0.bias"]
    target = nn.DataParallel(make(2, vocab=12))
    kept_embed = target.module.embed.weight.detach().clone()
    kept_bias = target.module.body[0].bias.detach().clone()

    result = load_matching(target, saved)

    assert result == PartialLoad(
        loaded=tuple(k for k in PLAIN_KEYS if k not in ("embed.weight", "body.0.bias")),
        mismatches=(ShapeMismatch("embed.weight", (10, 4), (12, 4)),),
        missing=("body.0.bias",),
        unexpected=("old_head.weight",),
    )
    assert result.skipped == ("embed.weight",)
    inner = target.module
    assert torch.equal(inner.embed.weight, kept_embed)
    assert torch.equal(inner.body[0].bias, kept_bias)
    for key in result.loaded:
        assert torch.equal(inner.state_dict()[key], source.state_dict()[key]), key


def test_key_check_names_missing_and_unexpected_keys() -> None:
    saved = dict(nn.Linear(3, 2).state_dict())
    saved["extra.weight"] = saved.pop("bias")
    with pytest.raises(
        StateMismatchError, match=r"(?s)'head'.*\['bias'\].*\['extra.weight'\].*Nothing was loaded"
    ):
        check_keys(saved, nn.Linear(3, 2), entry="head")
    check_keys(nn.Linear(3, 2).state_dict(), compiled(nn.Linear(3, 2)))  # wrapper names map back


def test_key_check_leaves_models_that_rename_keys_to_load_state_dict() -> None:
    model = nn.Linear(3, 2)

    def rename(state: dict, prefix: str, *args: object) -> None:
        if prefix + "old_weight" in state:
            state[prefix + "weight"] = state.pop(prefix + "old_weight")

    model._register_load_state_dict_pre_hook(rename)
    saved = dict(nn.Linear(3, 2).state_dict())
    saved["old_weight"] = saved.pop("weight")
    check_keys(saved, model)  # the hook makes it loadable, so only load_state_dict may judge
    model.load_state_dict(saved)
    assert torch.equal(model.weight, saved["old_weight"])
