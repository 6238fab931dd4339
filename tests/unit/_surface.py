"""What users program against, as plain JSON: public names, signatures, CLI options and --json shapes.

``test_public_surface.py`` compares it with the committed ``tests/fixtures/public_surface.json``.
Regenerate that file (after an intended, reviewed change) with:

    RESUMEKIT_UPDATE_SURFACE=1 .venv/bin/python -m pytest tests/unit/test_public_surface.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
from pathlib import Path
from typing import Any

# Modules users import from, and the names each promises (its __all__).
MODULES = (
    "resumekit",
    "resumekit.errors",
    "resumekit.drift",
    "resumekit.testing",
    "resumekit_lightning",
    "resumekit_accelerate",
)


def _params(obj: Any) -> list[dict[str, Any]] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        out.append({"name": p.name, "kind": p.kind.name, "default": default, "required": default is None})
    return out


def _member(cls: type, name: str) -> dict[str, Any]:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, property):
        return {"kind": "property"}
    if isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
        return {"kind": "method", "params": _params(getattr(cls, name))}
    return {"kind": "attribute"}


def _describe(obj: Any) -> dict[str, Any]:
    if inspect.isclass(obj):
        own = {n for c in obj.__mro__ if c.__module__.split(".")[0].startswith("resumekit") for n in vars(c)}
        public = sorted(n for n in own if not n.startswith("_"))
        fields = getattr(obj, "__dataclass_fields__", None)
        return {
            "kind": "class",
            "bases": [c.__name__ for c in obj.__mro__[1:] if c is not object],
            "init": _params(obj),
            "members": {n: _member(obj, n) for n in public},
            "fields": sorted(fields) if fields else None,
        }
    if callable(obj):
        return {"kind": "function", "params": _params(obj)}
    return {"kind": type(obj).__name__}


def api_surface() -> dict[str, Any]:
    """Every public name of every user-facing module, with its signature."""
    out: dict[str, Any] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or sorted(
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", "") == name
        )
        out[name] = {n: _describe(getattr(module, n)) for n in names}
    return out


def cli_options() -> dict[str, Any]:
    """Each ``resumekit`` subcommand's options: flags, destination, whether required, nargs."""
    from resumekit.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, Any] = {}
    for command, p in sorted(sub.choices.items()):
        out[command] = {
            a.dest: {"flags": sorted(a.option_strings), "required": bool(a.required), "nargs": a.nargs}
            for a in p._actions
            if a.dest != "help"
        }
    return out


def shape(value: Any) -> Any:
    """The structure of a JSON value: dicts keep keys, lists keep their first element's shape."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "null" if value is None else type(value).__name__


def cli_json_shapes(root: Path) -> dict[str, Any]:
    """The ``--json`` output shape of every subcommand, run on the checkpoint root ``root``."""
    from resumekit.cli import main

    commands = {
        "ls": ["ls", str(root)],
        "inspect": ["inspect", str(root)],
        "verify": ["verify", str(root)],
        "drift": ["drift", str(root)],
        "diff": ["diff", str(root), str(root)],
    }
    out: dict[str, Any] = {}
    for name, argv in commands.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = main([*argv, "--json"])
        out[name] = {"status": status, "shape": shape(json.loads(buf.getvalue()))}
    return out


def incompatibilities(pinned: Any, now: Any, where: str = "") -> list[str]:
    """What users relied on (``pinned``) that ``now`` breaks; additions are compatible."""
    if isinstance(pinned, dict) and isinstance(now, dict):
        problems = []
        for key, value in pinned.items():
            if key not in now:
                problems.append(f"{where}/{key}: removed")
            else:
                problems += incompatibilities(value, now[key], f"{where}/{key}")
        return problems
    if isinstance(pinned, list) and isinstance(now, list) and pinned and isinstance(pinned[0], dict):
        if set(pinned[0]) == {"name", "kind", "default", "required"}:  # a parameter list
            return _params_problems(pinned, now, where)
        return incompatibilities(pinned[0], now[0], f"{where}[0]") if now else [f"{where}: now empty"]
    if pinned != now and pinned != "null" and pinned != []:
        return [f"{where}: was {pinned!r}, now {now!r}"]
    return []


def _params_problems(pinned: list[dict[str, Any]], now: list[dict[str, Any]], where: str) -> list[str]:
    """A call that worked against ``pinned`` must work against ``now``."""
    problems = []
    by_name = {p["name"]: p for p in now}
    positional = [p["name"] for p in pinned if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    positional_now = [p["name"] for p in now if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    if positional_now[: len(positional)] != positional:
        problems.append(f"{where}: positional parameters were {positional}, now {positional_now}")
    for p in pinned:
        q = by_name.get(p["name"])
        if q is None:
            problems.append(f"{where}: parameter '{p['name']}' removed")
        elif q["default"] != p["default"]:
            problems.append(f"{where}: default of '{p['name']}' was {p['default']}, now {q['default']}")
    for q in now:
        if q["name"] not in {p["name"] for p in pinned} and q["required"] and not q["kind"].startswith("VAR"):
            problems.append(f"{where}: new required parameter '{q['name']}'")
    return problems
