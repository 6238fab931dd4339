"""Drift comparison: every key and severity, policy overrides, exact messages."""

from __future__ import annotations

import copy
import inspect
import json
import logging
from typing import Any

import pytest

from resumekit.drift import (
    MISSING,
    DriftItem,
    DriftPolicy,
    DriftReport,
    DriftWarning,
    compare,
)
from resumekit.engine.environment import collect_environment
from resumekit.errors import DriftError, ResumeKitError

BASE_ENV: dict[str, Any] = {
    "python": "3.11.7",
    "torch": "2.13.0+cpu",
    "cuda": None,
    "cudnn": None,
    "numpy": "2.4.6",
    "resumekit": "0.1.0",
    "platform": "Linux-x86_64",
    "device_type": "cpu",
    "device_count": 1,
    "device_names": ["cpu"],
    "world_size": 2,
    "amp_dtype": None,
}
BASE_CONFIG: dict[str, Any] = {"batch_size": 32, "grad_accumulation": 4, "lr": 0.001}


def env(**changes: Any) -> dict[str, Any]:
    return {**BASE_ENV, **changes}


def only(report: DriftReport) -> DriftItem:
    assert len(report.items) == 1, report.items
    return report.items[0]


# ------------------------------------------------------------------------------------------ no drift


def test_identical_runs_have_no_drift() -> None:
    report = compare(BASE_ENV, BASE_CONFIG, env(), dict(BASE_CONFIG))
    assert report.items == ()
    assert not report
    report.raise_for_errors()


def test_real_environment_matches_itself() -> None:
    current = collect_environment()
    saved = json.loads(json.dumps(current))  # what the manifest round trip gives back
    assert compare(saved, {"t": (1, 2)}, current, {"t": (1, 2)}).items == ()


def test_compare_does_not_mutate_inputs() -> None:
    saved_env, current_env = env(), env(torch="2.14.0", world_size=4)
    saved_cfg, current_cfg = {"opt": {"betas": (0.9, 0.99)}, "batch_size": 8}, {"batch_size": 16}
    before = copy.deepcopy((saved_env, current_env, saved_cfg, current_cfg))
    compare(saved_env, saved_cfg, current_env, current_cfg)
    assert (saved_env, current_env, saved_cfg, current_cfg) == before


# ------------------------------------------------------------------------------------------ versions


@pytest.mark.parametrize(
    ("key", "saved", "current", "severity", "detail"),
    [
        ("torch", "2.13.0+cpu", "2.13.1", "ignore", "patch version change"),
        ("torch", "2.13.0", "2.14.0", "warn", "minor version change"),
        ("torch", "2.14", "2.13.0+cpu", "warn", "minor version change"),
        ("torch", "2.13.0", "3.0.0", "warn", "major version change"),
        ("torch", "2.13.0+cpu", "2.13.0+cu121", "ignore", "same release, different build"),
        ("python", "3.11.7", "3.12.0", "warn", "minor version change"),
        ("python", "3.11.7", "3.11.9", "ignore", "patch version change"),
        ("numpy", "2.4.6", "1.26.4", "warn", "major version change"),
        ("cuda", "12.1", "12.4", "warn", "minor version change"),
        ("cudnn", "9.1.0", "9.1.1", "ignore", "patch version change"),
        ("resumekit", "0.1.0", "0.1.1", "ignore", "patch version change"),
        ("resumekit", "0.1.0", "0.2.0", "warn", "minor version change"),
    ],
)
def test_version_changes_by_level(key: str, saved: str, current: str, severity: str, detail: str) -> None:
    item = only(compare(env(**{key: saved}), None, env(**{key: current}), None))
    assert (item.key, item.saved, item.current, item.severity) == (f"env.{key}", saved, current, severity)
    assert f"({detail})" in item.message


def test_torch_minor_message_exact() -> None:
    item = only(compare(env(torch="2.13.0+cpu"), None, env(torch="2.14.0"), None))
    assert item.message == (
        "env.torch changed: 2.13.0+cpu at save, 2.14.0 now (minor version change). Results may differ "
        "slightly from an uninterrupted run; pin the saved version to reproduce it exactly, or set "
        "DriftPolicy({'env.torch': 'ignore'})."
    )


def test_unparseable_version_is_a_plain_change() -> None:
    item = only(compare(env(cuda=None), None, env(cuda="12.1"), None))
    assert item.severity == "warn"
    assert item.message.startswith("env.cuda changed: None at save, 12.1 now. Results")


# ---------------------------------------------------------------------------------- effective batch


def test_batch_size_message_exact() -> None:
    item = only(compare(env(), BASE_CONFIG, env(), {**BASE_CONFIG, "batch_size": 64}))
    assert (item.key, item.saved, item.current, item.severity) == ("config.batch_size", 32, 64, "warn")
    assert item.message == (
        "config.batch_size changed: 32 at save, 64 now; effective global batch 32x4x2=256 -> 64x4x2=512. "
        "Check that the learning rate and schedule still fit, or set "
        "DriftPolicy({'config.batch_size': 'ignore'})."
    )


def test_world_size_message_exact() -> None:
    item = only(compare(env(world_size=2), BASE_CONFIG, env(world_size=4), BASE_CONFIG))
    assert item.message == (
        "env.world_size changed: 2 at save, 4 now; effective global batch 32x4x2=256 -> 32x4x4=512. "
        "Check that the learning rate and schedule still fit, or set "
        "DriftPolicy({'env.world_size': 'ignore'})."
    )


def test_compensated_change_says_unchanged_but_still_warns() -> None:
    report = compare(
        env(world_size=2), BASE_CONFIG, env(world_size=4), {**BASE_CONFIG, "grad_accumulation": 2}
    )
    assert [i.key for i in report.items] == ["env.world_size", "config.grad_accumulation"]
    assert all(i.severity == "warn" for i in report.items)
    assert all("32x4x2=256 -> 32x2x4=256 (unchanged)." in i.message for i in report.items)


@pytest.mark.parametrize(
    "batch_key", ["batch_size", "per_device_batch_size", "per_device_train_batch_size", "micro_batch_size"]
)
@pytest.mark.parametrize(
    "accum_key", ["grad_accumulation", "gradient_accumulation_steps", "accumulate_grad_batches"]
)
def test_recognised_batch_and_accumulation_names(batch_key: str, accum_key: str) -> None:
    report = compare(env(), {batch_key: 8, accum_key: 2}, env(), {batch_key: 8, accum_key: 3})
    item = only(report)
    assert item.key == f"config.{accum_key}"
    assert "effective global batch 8x2x2=32 -> 8x3x2=48." in item.message


def test_missing_accumulation_counts_as_one() -> None:
    item = only(compare(env(world_size=1), {"batch_size": 8}, env(world_size=1), {"batch_size": 6}))
    assert "effective global batch 8x1x1=8 -> 6x1x1=6." in item.message


def test_nested_batch_size_is_recognised() -> None:
    saved = {"train": {"batch_size": 16, "gradient_accumulation_steps": 2}, "eval": {"batch_size": 64}}
    current = copy.deepcopy(saved)
    item = only(compare(env(world_size=1), saved, env(world_size=3), current))
    assert item.key == "env.world_size"
    assert "effective global batch 16x2x1=32 -> 16x2x3=96." in item.message
    # A batch size elsewhere in the config is an ordinary key.
    item = only(compare(env(), saved, env(), {**current, "eval": {"batch_size": 1}}))
    assert item.key == "config.eval.batch_size"
    assert "effective" not in item.message


def test_world_size_without_batch_key_explains_what_is_missing() -> None:
    item = only(compare(env(world_size=1), {"lr": 1.0}, env(world_size=2), {"lr": 1.0}))
    assert item.message == (
        "env.world_size changed: 1 at save, 2 now; effective global batch unknown (the config needs a "
        "positive integer per-device batch size under one of batch_size, per_device_batch_size, "
        "per_device_train_batch_size, micro_batch_size). Check that the learning rate and schedule still "
        "fit, or set DriftPolicy({'env.world_size': 'ignore'})."
    )


def test_accumulation_added_uses_the_batch_message() -> None:
    item = only(compare(env(), {"batch_size": 8}, env(), {"batch_size": 8, "grad_accumulation": 4}))
    assert item.current == 4 and item.saved is MISSING
    assert item.message.startswith(
        "config.grad_accumulation changed: absent at save, 4 now; effective global batch 8x1x2=16 -> 8x4x2=64."
    )


# --------------------------------------------------------------------------------------- config keys


def test_config_change_added_removed_messages() -> None:
    report = compare(env(), {"lr": 0.001, "dropout": 0.1}, env(), {"lr": 0.0003, "warmup": 100})
    assert [(i.key, i.saved, i.current) for i in report.items] == [
        ("config.lr", 0.001, 0.0003),
        ("config.dropout", 0.1, MISSING),
        ("config.warmup", MISSING, 100),
    ]
    assert [i.message for i in report.items] == [
        "config.lr changed: 0.001 at save, 0.0003 now. Check that this is intended, or set "
        "DriftPolicy({'config.lr': 'ignore'}).",
        "config.dropout removed: 0.1 at save, absent now. Check that this is intended, or set "
        "DriftPolicy({'config.dropout': 'ignore'}).",
        "config.warmup added: absent at save, 100 now. Check that this is intended, or set "
        "DriftPolicy({'config.warmup': 'ignore'}).",
    ]
    assert all(i.severity == "warn" for i in report.items)


def test_string_values_are_quoted_so_types_show() -> None:
    item = only(compare(env(), {"n": 32}, env(), {"n": "32"}))
    assert item.message.startswith("config.n changed: 32 at save, '32' now.")


@pytest.mark.parametrize(
    ("saved", "current", "drifts"),
    [
        ((1, 2), [1, 2], False),  # the manifest stores JSON: tuples come back as lists
        ({"a": {"b": 1}}, {"a": {"b": 1}}, False),
        (float("nan"), float("nan"), False),
        (True, 1, True),  # a flag is not a count
        (1, 1.0, False),
        ([1, True], [1, 1], True),
        ("x", "y", True),
    ],
)
def test_value_equality(saved: Any, current: Any, drifts: bool) -> None:
    report = compare(env(), {"v": saved}, env(), {"v": current})
    assert bool(report.items) is drifts


def test_integer_config_keys_compare_with_their_json_form() -> None:
    assert compare(env(), {"w": {"1": 0.5}}, env(), {"w": {1: 0.5}}).items == ()


def test_config_not_recorded_is_not_compared() -> None:
    assert compare(env(), None, env(), {"lr": 1.0}).items == ()
    assert compare(env(), {"lr": 1.0}, env(), None).items == ()
    # An empty config is recorded: a key added since is drift.
    assert only(compare(env(), {}, env(), {"lr": 1.0})).key == "config.lr"


def test_env_key_missing_on_one_side_is_not_compared() -> None:
    older = {k: v for k, v in BASE_ENV.items() if k not in ("amp_dtype", "device_type")}
    assert compare(older, None, env(amp_dtype="bfloat16", device_type="cuda"), None).items == ()
    assert compare(None, None, env(), None).items == ()


# ---------------------------------------------------------------------------- device, amp, platform


def test_cuda_to_cpu_is_a_warning_with_exact_message() -> None:
    gpu = env(device_type="cuda", device_count=2, device_names=["NVIDIA A100-SXM4-80GB"] * 2, cuda="12.1")
    report = compare(gpu, None, env(), None)
    assert [i.key for i in report.items] == ["env.cuda", "env.device"]
    item = report.items[1]
    assert (item.saved, item.current, item.severity) == ("2x NVIDIA A100-SXM4-80GB", "cpu", "warn")
    assert item.message == (
        "env.device changed: 2x NVIDIA A100-SXM4-80GB at save, cpu now. Tensors load onto the devices "
        "your objects live on, and results may differ slightly from an uninterrupted run; resume on the "
        "saved hardware to reproduce it exactly, or set DriftPolicy({'env.device': 'ignore'})."
    )
    assert not report.errors


def test_device_names_unknown_compare_type_and_count_only() -> None:
    named = env(device_type="cuda", device_count=2, device_names=["A100", "A100"])
    unnamed = env(device_type="cuda", device_count=2, device_names=None)
    assert compare(named, None, unnamed, None).items == ()
    item = only(compare(named, None, env(device_type="cuda", device_count=1, device_names=None), None))
    assert (item.saved, item.current) == ("2x A100", "1x cuda")
    item = only(
        compare(named, None, env(device_type="cuda", device_count=2, device_names=["A100", "H100"]), None)
    )
    assert item.current == "A100, H100"


def test_amp_dtype_change_message_exact() -> None:
    item = only(compare(env(amp_dtype="bfloat16"), None, env(amp_dtype="float16"), None))
    assert (item.key, item.severity) == ("env.amp_dtype", "warn")
    assert item.message == (
        "env.amp_dtype changed: bfloat16 at save, float16 now. Mixed-precision numerics differ between "
        "dtypes, and float16 needs a GradScaler while bfloat16 does not; train with the saved dtype to "
        "reproduce the run exactly, or set DriftPolicy({'env.amp_dtype': 'ignore'})."
    )


def test_platform_change_is_a_warning() -> None:
    item = only(compare(env(), None, env(platform="Darwin-arm64"), None))
    assert (item.key, item.severity) == ("env.platform", "warn")
    assert item.message.startswith("env.platform changed: Linux-x86_64 at save, Darwin-arm64 now. ")


# ------------------------------------------------------------------------------------------- format


def test_newer_format_is_an_error_naming_the_version_needed() -> None:
    item = only(compare(env(), None, env(), None, saved_format=3, current_format=2))
    assert (item.key, item.saved, item.current, item.severity) == ("format", 3, 2, "error")
    assert item.message == (
        "format changed: 3 at save, 2 now; this checkpoint was written by a newer resumekit and needs one "
        "that reads format 3 (this one reads up to 2). Upgrade resumekit: pip install -U resumekit."
    )


def test_older_format_is_ignored_and_equal_or_unknown_is_silent() -> None:
    assert only(compare(env(), None, env(), None, saved_format=1, current_format=2)).severity == "ignore"
    assert compare(env(), None, env(), None, saved_format=2, current_format=2).items == ()
    assert compare(env(), None, env(), None, saved_format=9).items == ()


def test_default_does_not_lower_the_format_error() -> None:
    policy = DriftPolicy(default="ignore")
    report = compare(env(), None, env(torch="3.0"), None, policy, saved_format=3, current_format=2)
    assert [(i.key, i.severity) for i in report.items] == [("format", "error"), ("env.torch", "ignore")]


# ------------------------------------------------------------------------------------------- policy


def test_overrides_default_and_patch() -> None:
    policy = DriftPolicy({"env.torch": "error", "config.lr": "ignore"}, default="error", patch="warn")
    report = compare(
        env(python="3.11.7", numpy="2.4.6"),
        {"lr": 1, "wd": 0},
        env(python="3.11.8", numpy="2.5.0"),
        {"lr": 2, "wd": 1},
        policy,
    )
    assert [(i.key, i.severity) for i in report.items] == [
        ("env.python", "warn"),  # patch level -> policy.patch
        ("env.numpy", "error"),  # minor -> policy.default
        ("config.lr", "ignore"),
        ("config.wd", "error"),
    ]


def test_override_applies_to_patch_changes_of_its_key() -> None:
    item = only(compare(env(), None, env(torch="2.13.1"), None, DriftPolicy({"env.torch": "error"})))
    assert item.severity == "error"


def test_patterns_exact_wins_then_longest_pattern() -> None:
    policy = DriftPolicy({"config.*": "ignore", "config.optim.*": "error", "config.optim.lr": "warn"})
    assert policy.severity("config.optim.lr") == "warn"
    assert policy.severity("config.optim.wd") == "error"
    assert policy.severity("config.seed") == "ignore"
    assert policy.severity("env.torch") == "warn"
    assert DriftPolicy({"*": "error"}).severity("env.python", patch_level=True) == "error"


def test_policy_equality_and_hash() -> None:
    a = DriftPolicy({"config.lr": "ignore"}, default="error")
    b = DriftPolicy({"config.lr": "ignore"}, default="error")
    assert a == b and hash(a) == hash(b)
    assert a != DriftPolicy({"config.lr": "warn"}, default="error")


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("torch", "did you mean 'env.torch'?"),
        ("lr", "did you mean 'config.lr'?"),
        ("env.device_names", "did you mean 'env.device'?"),
        ("env.gpu", "environment keys are env.python, env.torch"),
        ("config.", "a config key needs a name after 'config.'"),
    ],
)
def test_unknown_policy_key_suggests_a_fix(key: str, hint: str) -> None:
    with pytest.raises(ValueError, match="unknown drift key") as info:
        DriftPolicy({key: "error"})
    assert hint in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [{"default": "fatal"}, {"patch": "info"}, {"overrides": {"format": "off"}}]
)
def test_invalid_severity_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be one of 'error', 'warn', 'ignore'"):
        DriftPolicy(**kwargs)


# ------------------------------------------------------------------------------------------- report


def _mixed_report() -> DriftReport:
    policy = DriftPolicy({"env.torch": "error", "config.lr": "error"})
    return compare(
        env(),
        {"lr": 1, "batch_size": 4},
        env(torch="2.14.0", python="3.11.8"),
        {"lr": 2, "batch_size": 8},
        policy,
    )


def test_report_partitions_by_severity() -> None:
    report = _mixed_report()
    assert [i.key for i in report.errors] == ["env.torch", "config.lr"]
    assert [i.key for i in report.warnings] == ["config.batch_size"]
    assert [i.key for i in report.ignored] == ["env.python"]
    assert report
    assert not DriftReport(report.ignored)


def test_raise_for_errors_lists_every_error() -> None:
    report = _mixed_report()
    with pytest.raises(DriftError) as info:
        report.raise_for_errors()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ResumeKitError)
    assert str(info.value) == (
        "The checkpoint was saved in a different environment or config: 2 changes the drift policy treats "
        f"as errors:\n  - {report.errors[0].message}\n  - {report.errors[1].message}\n"
        "Restore in the saved environment, or relax these keys in the DriftPolicy."
    )
    DriftReport(report.warnings + report.ignored).raise_for_errors()  # no errors: no exception


def test_emit_warns_and_logs_by_severity(caplog: pytest.LogCaptureFixture) -> None:
    report = _mixed_report()
    logger = logging.getLogger("test.drift.emit")
    with caplog.at_level(logging.INFO, logger="test.drift.emit"), pytest.warns(DriftWarning) as caught:
        report.emit(logger)
    assert [str(w.message) for w in caught] == [report.warnings[0].message]
    assert caught[0].filename == __file__  # points at the caller, not at resumekit
    level = {"error": "ERROR", "warn": "WARNING", "ignore": "INFO"}
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (level[i.severity], i.message) for i in report.items
    ]
    assert [r.levelname for r in caplog.records] == ["INFO", "ERROR", "ERROR", "WARNING"]


def test_to_dict_is_json_ready() -> None:
    report = compare(env(), {"a": 1}, env(), {"b": (1, 2)})
    data = json.loads(json.dumps(report.to_dict()))
    assert data["warnings"] == 2 and data["errors"] == 0
    assert [(i["key"], i["saved"], i["current"]) for i in data["items"]] == [
        ("config.a", 1, None),
        ("config.b", None, [1, 2]),
    ]


def test_emit_stacklevel_points_past_a_wrapper() -> None:
    report = compare(env(), {"a": 1}, env(), {"a": 2})

    def restore_like() -> None:
        report.emit(logging.getLogger("test.drift.wrapper"), stacklevel=2)

    frame = inspect.currentframe()
    assert frame is not None
    with pytest.warns(DriftWarning) as caught:
        call_line = frame.f_lineno + 1
        restore_like()
    assert (caught[0].filename, caught[0].lineno) == (__file__, call_line)


def test_error_level_drift_through_the_checkpointer_leaves_objects_untouched(tmp_path: Any) -> None:
    import torch

    import resumekit as rk

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    rk.Checkpointer(str(tmp_path), config={"batch_size": 8}).save({"model": model}, step=1)
    fresh = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    strict = rk.Checkpointer(
        str(tmp_path), config={"batch_size": 16}, drift_policy=DriftPolicy({"config.batch_size": "error"})
    )
    with pytest.raises(DriftError, match=r"config\.batch_size changed: 8 at save, 16 now"):
        strict.restore({"model": fresh})
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
