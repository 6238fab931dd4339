"""The ``resumekit`` command line: look into checkpoints without writing a line of Python.

Subcommands (``resumekit COMMAND --help`` for each):

* ``ls URL``: steps, sizes, ages and status, newest last (reads manifests only);
* ``inspect URL [--step N]``: manifest, entries, tensor names/dtypes/shapes, environment, config;
* ``verify URL [--step N]``: size and crc32c of every file; exit 1 naming every bad file;
* ``diff A B``: entries, tensors (with the largest absolute difference), values, config, environment;
* ``drift URL [--step N]``: the saved environment and config against this machine; exit 1 on errors.

Every subcommand takes ``--json`` (stable keys, see docs/cli.md) and ``--storage-option KEY=VALUE``.
A checkpoint is addressed as ``URL`` (its newest committed step), ``URL@STEP``, or a step folder's own
URL. Exit status: 0 success, 1 the check failed (``verify``, ``drift``, ``diff --exit-code``),
2 a usage error or an unreadable checkpoint (one line on stderr, no traceback).

Nothing is written, and nothing is unpickled: manifests are validated before any path they name is
opened, tensors come from safetensors headers and data, everything else from JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from resumekit.cli.access import CliError, Root, jsonable, parse_storage_options, split_target
from resumekit.drift import DriftPolicy
from resumekit.errors import ResumeKitError
from resumekit.format.layout import MANIFEST, parse_step_dir

__all__ = ["main"]

_EPILOG = """\
A checkpoint is URL (its newest committed step), URL@STEP (e.g. /ckpt/run-7@1200), or the URL of a
step folder (/ckpt/run-7/step-000000001200). URL is a local folder or any fsspec URL (s3://, gs://,
memory://, ...). Exit status: 0 ok, 1 check failed, 2 usage error or unreadable checkpoint.
"""


def _parser() -> argparse.ArgumentParser:
    from resumekit import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    common.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it can be, else a string",
    )
    common.add_argument("--debug", action="store_true", help="show a traceback on errors")

    p = argparse.ArgumentParser(
        prog="resumekit",
        description="Inspect, verify and compare resumekit checkpoints (read-only).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"resumekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    ls = add("ls", "list the steps of a checkpoint root: size, age, status (newest last)")
    ls.add_argument("url", metavar="URL")

    inspect = add("inspect", "show one checkpoint: manifest, entries, tensors, environment, config")
    inspect.add_argument("url", metavar="URL")
    inspect.add_argument("--step", type=int, help="the step to show (default: the newest committed)")

    verify = add("verify", "check the size and crc32c of every file; exit 1 naming every bad file")
    verify.add_argument("url", metavar="URL")
    verify.add_argument("--step", type=int, help="verify only this step (default: every committed step)")

    diff = add("diff", "compare two checkpoints: entries, tensors, values, config, environment")
    diff.add_argument("a", metavar="A", help="URL or URL@STEP")
    diff.add_argument("b", metavar="B", help="URL or URL@STEP")
    diff.add_argument("--exit-code", action="store_true", help="exit 1 when the checkpoints differ")

    drift = add("drift", "compare the saved environment and config with this machine; exit 1 on errors")
    drift.add_argument("url", metavar="URL")
    drift.add_argument("--step", type=int, help="the step to check (default: the newest committed)")
    drift.add_argument(
        "--config", metavar="FILE.json", help="the config you would resume with (a JSON object)"
    )
    drift.add_argument(
        "--world-size", type=int, help="the world size you would resume with (default: the saved one)"
    )
    drift.add_argument("--amp-dtype", help="the AMP dtype you would resume with (default: the saved one)")
    drift.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="KEY=SEVERITY",
        help="override the drift policy for a key or glob (error, warn, ignore), e.g. env.torch=error",
    )
    return p


def _open(target: str, step: int | None, options: dict[str, Any]) -> tuple[Root, int | None]:
    """The root and step a command-line checkpoint address denotes."""
    url, at_step = split_target(target)
    if at_step is not None and step is not None and at_step != step:
        raise CliError(f"'{target}' names step {at_step} but --step says {step}; give one of them")
    step = at_step if at_step is not None else step
    base = url.rstrip("/")
    folder_step = parse_step_dir(base.rsplit("/", 1)[-1]) if base else None
    if folder_step is not None and "/" in base and _is_step_folder(base):
        if step is not None and step != folder_step:
            raise CliError(f"'{target}' is the folder of step {folder_step} but step {step} was asked for")
        return Root(base.rsplit("/", 1)[0], options), folder_step
    return Root(url, options), step


def _is_step_folder(path: str) -> bool:
    if "://" in path and not path.startswith("file://"):
        return True
    local = path.removeprefix("file://")
    return os.path.exists(os.path.join(local, MANIFEST)) or not any(
        parse_step_dir(n) is not None for n in (os.listdir(local) if os.path.isdir(local) else [])
    )


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from resumekit.cli import commands as cmd

    options = parse_storage_options(args.storage_option)
    if args.command == "diff":
        from resumekit.cli.diff import diff

        a_root, a_step = _open(args.a, None, options)
        b_root, b_step = _open(args.b, None, options)
        data = diff(a_root, a_step, b_root, b_step)
        return data, int(args.exit_code and not data["identical"])
    root, step = _open(args.url, getattr(args, "step", None), options)
    if args.command == "ls":
        return cmd.ls(root, step), 0
    if args.command == "inspect":
        return cmd.inspect(root, step), 0
    if args.command == "verify":
        data = cmd.verify(root, step)
        return data, int(not data["ok"])
    data = cmd.drift(
        root,
        step,
        config=_read_config(args.config),
        world_size=args.world_size,
        amp_dtype=args.amp_dtype,
        policy=_policy(args.policy),
    )
    return data, int(not data["ok"])


def _read_config(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise CliError(f"--config {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CliError(f"--config {path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CliError(
            f"--config {path} must hold a JSON object (the mapping passed as Checkpointer(config=...))"
        )
    return config


def _policy(pairs: list[str]) -> DriftPolicy:
    overrides = {}
    for pair in pairs:
        key, sep, severity = pair.partition("=")
        if not sep:
            raise CliError(f"--policy {pair!r} is not KEY=SEVERITY (e.g. --policy env.torch=error)")
        overrides[key] = severity
    try:
        return DriftPolicy(overrides)  # type: ignore[arg-type]  # checked by DriftPolicy
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from exc


def _one_line(msg: str) -> str:
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``resumekit`` command line.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 the check failed, 2 a usage error or unreadable checkpoint.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        data, status = _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        expected = isinstance(exc, (ResumeKitError, OSError, ValueError, ImportError))
        msg = _one_line(str(exc)) or type(exc).__name__
        if not expected:
            msg = f"{type(exc).__name__}: {msg} (rerun with --debug for a traceback)"
        print(f"resumekit: error: {msg}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(jsonable(data), indent=2, allow_nan=False))
        else:
            from resumekit.cli.text import render

            print(render(args.command, data))
        sys.stdout.flush()
    except BrokenPipeError:  # `resumekit ls URL | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
