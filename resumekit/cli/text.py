"""Plain-text tables for people, rendered from the same dicts ``--json`` prints."""

from __future__ import annotations

import datetime
import json
from typing import Any

from resumekit.engine.drift_rules import _mesh_summary, _one_mesh
from resumekit.format.layout import is_tensor_file

__all__ = ["render"]


def table(headers: list[str], rows: list[list[Any]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; ``None`` shows as ``-``."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:.6g}"
    return json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def human_age(seconds: float | None) -> str:
    """``5400`` -> ``1h30m``."""
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _when(unix: float | None) -> str:
    if not unix:
        return "-"
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _mapping(d: dict[str, Any] | None, indent: str = "  ") -> str:
    if not d:
        return f"{indent}(none)"
    return table(["KEY", "VALUE"], [[k, v] for k, v in d.items()], indent)


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "incomplete":
        return f"incomplete ({row['detail']})"
    return str(row["detail"])


def render_ls(d: dict[str, Any]) -> str:
    """The ``ls`` table: one row a step folder, status last."""
    rows = [
        [
            r["step"],
            r["files"],
            human_bytes(r["bytes"]),
            human_age(r["age_seconds"]),
            r["world_size"],
            ", ".join(r["entries"]) if r["entries"] is not None else None,
            _status(r),  # last: a reason can be long without pushing other columns apart
        ]
        for r in d["steps"]
    ]
    ok = sum(r["status"] == "ok" for r in d["steps"])
    head = f"{d['url']}: {ok} committed, {len(d['steps']) - ok} other"
    headers = ["STEP", "FILES", "SIZE", "AGE", "WORLD", "ENTRIES", "STATUS"]
    if any(r.get("shards") for r in d["steps"]):  # sharded steps: their mesh and shard files too
        headers[5:5] = ["MESH", "SHARDS"]
        for row, r in zip(rows, d["steps"]):
            mesh = _mesh_summary(r["mesh"]) if r.get("mesh") else None
            row[5:5] = [mesh, r.get("shards") or None]
    return head + "\n" + table(headers, rows)


def render_inspect(d: dict[str, Any]) -> str:
    """The ``inspect`` report: manifest facts, entries, tensors per file, environment, config."""
    out = [
        table(
            ["CHECKPOINT", d["path"]],
            [
                ["step", d["step"]],
                ["format", f"{d['format_version']} (written by resumekit {d['resumekit_version'] or '?'})"],
                ["writer", d["writer_id"]],
                ["world size", d["world_size"]],
                *(
                    [
                        ["mesh", _mesh_summary(d["mesh"]) if d.get("mesh") else "-"],
                        ["shard files", d["shards"]],
                    ]
                    if d.get("shards")
                    else []
                ),
                ["created", _when(d["created_unix"])],
                ["files", f"{d['files']} ({human_bytes(d['bytes'])})"],
            ],
        ),
        "",
        table(
            ["ENTRY", "SCOPE", "KIND", "RANKS", "FILES"],
            [
                [
                    e["name"],
                    e["scope"],
                    e["kind"],
                    ",".join(map(str, e["ranks"])),
                    ", ".join(f["path"] for f in e["files"]),
                ]
                for e in d["entries"]
            ],
        ),
    ]
    sharded = [e for e in d["entries"] if e.get("sharding")]
    if sharded:
        out += [
            "",
            table(
                ["SHARDED ENTRY", "SAVED AT WORLD", "MESH", "SHARDS", "TENSORS"],
                [_sharding_row(e) for e in sharded],
            ),
        ]
    for e in d["entries"]:
        for f in e["files"]:
            if not is_tensor_file(f["path"]):
                continue
            out += ["", f"{e['name']}: {f['path']} ({human_bytes(f['size'])})"]
            if f["error"]:
                out.append(f"  header unreadable: {f['error']}")
            elif not f["tensors"]:
                out.append("  (no tensors)")
            else:
                rows = [
                    [t["name"], t["dtype"], _shape(t["shape"]), human_bytes(t["bytes"])] for t in f["tensors"]
                ]
                out.append(table(["TENSOR", "DTYPE", "SHAPE", "SIZE"], rows, "  "))
    if d["other_files"]:
        out += ["", "files of no entry:"]
        out.append(
            table(["PATH", "SIZE"], [[f["path"], human_bytes(f["size"])] for f in d["other_files"]], "  ")
        )
    out += ["", "environment:", _mapping(d["environment"]), "", "config:"]
    out.append("  (not recorded)" if d["config"] is None else _mapping(d["config"]))
    return "\n".join(out)


def _sharding_row(e: dict[str, Any]) -> list[Any]:
    sh = e["sharding"]
    if sh["error"]:
        return [e["name"], "-", f"metadata unreadable: {sh['error']}", sh["shards"], "-"]
    return [e["name"], sh["world_size"], _one_mesh(sh["mesh"]), sh["shards"], sh["tensors"]]


def _shape(shape: list[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def render_verify(d: dict[str, Any]) -> str:
    """The ``verify`` report: one line a good step, a table of problems for a bad one."""
    out = []
    for s in d["steps"]:
        if s["ok"]:
            shards = f", {s['shards']} shard files checked chunk by chunk" if s.get("shards") else ""
            out.append(f"step {s['step']}: ok ({s['files']} files, {human_bytes(s['bytes'])}{shards})")
            continue
        out.append(
            f"step {s['step']}: FAILED ({len(s['problems'])} problem(s), {s['files']} file(s) checked)"
        )
        out.append(
            table(
                ["PROBLEM", "FILE", "DETAIL"],
                [[p["kind"], p["file"], p["message"]] for p in s["problems"]],
                "  ",
            )
        )
    bad = [s for s in d["steps"] if not s["ok"]]
    if bad:
        out.append(f"{len(bad)} of {len(d['steps'])} step(s) failed verification; bad files:")
        out += [f"  {u}" for u in d["bad_files"]]
    else:
        out.append(f"all {len(d['steps'])} step(s) verified")
    return "\n".join(out)


def _side(s: dict[str, Any]) -> str:
    return f"{s['url']}@{s['step']}"


def _spec(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{s['dtype']}{_shape(s['shape'])}"


def _entry_label(c: dict[str, Any]) -> str:
    # Per-rank entries hold one file per rank: name the rank, or rows would look duplicated.
    folder = c["file"].rsplit("/", 1)[0] if "/" in c["file"] else ""
    return f"{c['entry']} ({folder})" if folder else str(c["entry"])


def render_diff(d: dict[str, Any]) -> str:
    """The ``diff`` report: entries, changed tensors, values, config, environment."""
    e = d["entries"]
    out = [f"A  {_side(d['a'])}", f"B  {_side(d['b'])}", ""]
    if e["added"] or e["removed"]:
        out.append(f"entries: added {e['added'] or '-'}, removed {e['removed'] or '-'}")
    else:
        out.append(f"entries: same ({len(e['common'])})")
    for kind in ("added", "removed"):
        if d["files"][kind]:
            out.append(f"files {kind}: {', '.join(d['files'][kind])}")
    t = d["tensors"]
    out.append(f"tensors: {t['compared']} compared, {t['identical']} identical, {len(t['changes'])} differ")
    if t["changes"]:
        rows = [
            [_entry_label(c), c["name"], c["change"], _spec(c["a"]), _spec(c["b"]), c["max_abs_diff"]]
            for c in t["changes"]
        ]
        out.append(table(["ENTRY", "TENSOR", "CHANGE", "A", "B", "MAX ABS DIFF"], rows, "  "))
    for title, key, first in (
        ("values", "values", "PATH"),
        ("config", "config", "KEY"),
        ("environment", "environment", "KEY"),
    ):
        items = d[key]
        if not items:
            out.append(f"{title}: same")
            continue
        out.append(
            f"{title}: {len(items)} differ"
            + (" (list truncated)" if key == "values" and d["values_truncated"] else "")
        )
        if key == "values":
            rows = [[f"{_entry_label(c)}: {c['key']}", c["a"], c["b"]] for c in items]
        else:
            rows = [[c["key"], c["a"], c["b"]] for c in items]
        out.append(table([first, "A", "B"], rows, "  "))
    out += ["", "identical" if d["identical"] else "different"]
    return "\n".join(out)


def render_drift(d: dict[str, Any]) -> str:
    """The ``drift`` report: a table of items, then every message."""
    out = [f"checkpoint {d['path']} against this machine"]
    if not d["config_compared"]:
        out.append("config not compared (pass --config FILE.json with the config you would resume with)")
    if not d["items"]:
        out.append("no drift")
        return "\n".join(out)
    rows = [[i["severity"], i["key"], i["saved"], i["current"]] for i in d["items"]]
    out += ["", table(["SEVERITY", "KEY", "SAVED", "CURRENT"], rows), ""]
    out += [f"- {i['message']}" for i in d["items"]]
    ignored = len(d["items"]) - d["errors"] - d["warnings"]
    out += ["", f"{d['errors']} error(s), {d['warnings']} warning(s), {ignored} ignored"]
    return "\n".join(out)


_RENDERERS = {
    "ls": render_ls,
    "inspect": render_inspect,
    "verify": render_verify,
    "diff": render_diff,
    "drift": render_drift,
}


def render(command: str, data: dict[str, Any]) -> str:
    """The table for ``command``'s result."""
    return _RENDERERS[command](data)
