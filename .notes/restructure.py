"""Move resumekit's flat private modules into subpackages and rewrite every reference.

python .notes/restructure.py move      # git mv + rewrite (run once, on main)
python .notes/restructure.py rewrite   # rewrite references only (a merged branch's new files)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MOVES = {
    "_apply": "engine.apply",
    "_async": "staging.background",
    "_cli_commands": "cli.commands",
    "_cli_diff": "cli.diff",
    "_cli_io": "cli.access",
    "_cli_text": "cli.text",
    "_cloud": "storage.objectstore",
    "_codec": "format.codec",
    "_cuda": "staging.cuda",
    "_dist": "engine.collectives",
    "_drift_rules": "engine.drift_rules",
    "_entries": "engine.entries",
    "_env": "engine.environment",
    "_epoch_order": "data.epoch_order",
    "_guards": "staging.guards",
    "_json": "format.strict_json",
    "_keys": "engine.keys",
    "_live": "engine.live",
    "_loaderwatch": "data.loaderwatch",
    "_manifest": "format.manifest",
    "_partial": "engine.partial",
    "_permutation": "data.permutation",
    "_plan": "engine.plan",
    "_readback": "engine.readback",
    "_reader": "engine.reader",
    "_reshard": "sharding.reshard",
    "_restore": "engine.restore",
    "_retention": "storage.retention",
    "_safe_open": "storage.safe_open",
    "_sampler_record": "data.sampler_record",
    "_save": "engine.save",
    "_shapes": "engine.shapes",
    "_shardmeta": "sharding.metadata",
    "_shards": "sharding.shards",
    "_staging": "staging.buffers",
    "_storage": "storage.local",
    "_tensorfile": "format.tensorfile",
    "_transfer": "storage.transfer",
    "_verify": "storage.verify",
}
# Modules that stay at the top of the package (public, or shared by every floor).
TOP = {
    "checkpointer",
    "cli",
    "drift",
    "errors",
    "grads",
    "loader",
    "rng",
    "sampler",
    "testing",
    "_protocol",
    "_messages",
    "__init__",
    "__main__",
}
ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".toml", ".cfg", ".txt", ".sh", ".json", ".yml", ".yaml")
SKIP = {".venv", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "node_modules"}


def _files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        if any(part in SKIP for part in p.relative_to(ROOT).parts) or not p.is_file():
            continue
        if p.suffix in TEXT or p.name in {"run"}:
            out.append(p)
    return out


def _module_of(path: Path) -> list[str] | None:
    """The dotted package of a file under resumekit/ (for resolving its relative imports)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] != "resumekit" or path.suffix != ".py":
        return None
    pkg = list(rel.parts[:-1])
    return pkg


def _abs_relative(text: str, pkg: list[str]) -> str:
    """Turn ``from .x import y`` / ``from . import y`` / ``from ..x import y`` into absolute imports."""

    def sub(m: re.Match[str]) -> str:
        dots, rest = m.group(2), m.group(3)
        base = pkg[: len(pkg) - (len(dots) - 1)]
        target = ".".join(base + ([rest] if rest else []))
        return f"{m.group(1)}from {target} import"

    return re.sub(r"(^[ \t]*)from (\.+)([A-Za-z_][\w.]*)? import", sub, text, flags=re.M)


def rewrite_text(text: str, pkg: list[str] | None) -> str:
    if pkg is not None:
        text = _abs_relative(text, pkg)

    # `from resumekit import _x` -> `from resumekit.pkg import x` (keeping the local name `_x`).
    def sub_from_import(m: re.Match[str]) -> str:
        indent, name, alias = m.group(1), m.group(2), m.group(3)
        if name not in MOVES:
            return m.group(0)
        pkg_, mod = MOVES[name].rsplit(".", 1)
        return f"{indent}from resumekit.{pkg_} import {mod} as {alias or name}"

    text = re.sub(r"(^[ \t]*)from resumekit import (_\w+)(?: as (\w+))?$", sub_from_import, text, flags=re.M)
    # Every dotted reference: imports, monkeypatch strings, docs.
    names = sorted(MOVES, key=len, reverse=True)
    pat = re.compile(r"\bresumekit\.(" + "|".join(re.escape(n) for n in names) + r")\b")
    text = pat.sub(lambda m: "resumekit." + MOVES[m.group(1)], text)
    # Paths in docs and notes: resumekit/_x.py
    pat2 = re.compile(r"\bresumekit/(" + "|".join(re.escape(n) for n in names) + r")\.py\b")
    text = pat2.sub(lambda m: "resumekit/" + MOVES[m.group(1)].replace(".", "/") + ".py", text)
    return text


# Names that left a module after the move (storage split, retry split): module -> {name: new module}.
SPLITS = {
    "resumekit.storage.local": {
        "Storage": "resumekit.storage.base",
        "Stage": "resumekit.storage.base",
        "Buffer": "resumekit.storage.base",
        "new_buffer": "resumekit.storage.base",
        "open_storage": "resumekit.storage",
        "FsspecStorage": "resumekit.storage.remote",
    },
    "resumekit.storage.objectstore": {
        n: "resumekit.storage.retry"
        for n in (
            "RetryPolicy",
            "is_body_fault",
            "is_transient",
            "retry_call",
            "storage_boundary",
            "to_storage_error",
            "retry_async",
            "DEFAULT_POLICY",
            "COMMIT_POLICY",
            "status_and_code",
        )
    },
}


def _split_imports(text: str) -> str:
    for mod, moved in SPLITS.items():

        def sub(m: re.Match[str], mod: str = mod, moved: dict[str, str] = moved) -> str:
            indent, body = m.group(1), m.group(2)
            names = [n.strip() for n in body.strip("()").replace("\n", " ").split(",") if n.strip()]
            groups: dict[str, list[str]] = {}
            for n in names:
                groups.setdefault(moved.get(n.split(" as ")[0], mod), []).append(n)
            return "\n".join(f"{indent}from {t} import {', '.join(ns)}" for t, ns in groups.items())

        text = re.sub(rf"^([ \t]*)from {re.escape(mod)} import (\([^)]*\)|[^\n]+)$", sub, text, flags=re.M)
    return text


def rewrite() -> None:
    for p in _files():
        if p.resolve() == Path(__file__).resolve():
            continue
        try:
            old = p.read_text()
        except UnicodeDecodeError:
            continue
        new = rewrite_text(old, _module_of(p))
        if p.suffix == ".py" and p.name not in {"local.py", "objectstore.py"}:
            new = _split_imports(new)
        if new != old:
            p.write_text(new)


def move() -> None:
    # Rewrite first: relative imports resolve against where each file lies now.
    rewrite()
    pkgs = {v.split(".")[0] for v in MOVES.values()}
    for pkg in sorted(pkgs):
        (ROOT / "resumekit" / pkg).mkdir(exist_ok=True)
    subprocess.run(["git", "mv", "resumekit/cli.py", "resumekit/cli/__init__.py"], cwd=ROOT, check=True)
    for old, new in MOVES.items():
        dst = "resumekit/" + new.replace(".", "/") + ".py"
        subprocess.run(["git", "mv", f"resumekit/{old}.py", dst], cwd=ROOT, check=True)
    for pkg in sorted(pkgs - {"cli"}):
        init = ROOT / "resumekit" / pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""(internal)"""\n')


if __name__ == "__main__":
    {"move": move, "rewrite": rewrite}[sys.argv[1]]()
