"""Strict JSON parsing of bytes read from storage (manifests, skeletons, safetensors headers).

Pure logic. Every byte read from storage is untrusted until checked, so this parser accepts exactly the
JSON resumekit (and any standard safetensors writer) produces and turns everything else into
:class:`~resumekit.errors.CheckpointCorruptError`, the error the restore fallback skips:

- UTF-8 only, without a byte-order mark (``json.loads`` on bytes would silently accept UTF-16/32 and a
  BOM, so two different byte strings could parse to the same value and pass a checksum of the parsed
  form);
- no duplicate keys in an object (``{"a": 1, "a": 2}`` would otherwise keep the last one silently);
- no ``NaN``/``Infinity`` constants and no float literal that overflows to infinity (resumekit writes
  with ``allow_nan=False``);
- integers of at most :data:`MAX_INT_DIGITS` digits, checked on the literal *before* conversion
  (conversion of a long decimal literal is quadratic, and Python's own limit raises a bare
  ``ValueError``, or is switched off by ``sys.set_int_max_str_digits(0)``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from resumekit.errors import CheckpointCorruptError

__all__ = ["MAX_INT_DIGITS", "expect_dict", "expect_list", "expect_str", "parse_strict"]

#: Longest integer literal accepted (sign included): Python's default int/str conversion limit, so any
#: integer ``json.dumps`` writes under default settings reads back.
MAX_INT_DIGITS = 4300


class _Refused(ValueError):
    """A literal or object the strict parser refuses (raised inside ``json.loads`` hooks)."""


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_INT_DIGITS:
        raise _Refused(f"an integer literal of {len(literal)} characters (limit {MAX_INT_DIGITS})")
    return int(literal)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the float literal {literal[:40]!r} overflows to {value}")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"the non-standard constant {name} (resumekit never writes NaN or Infinity)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"the duplicate key {key[:80]!r} in one object")
            seen.add(key)
    return out


def parse_strict(raw: bytes | bytearray | memoryview, where: str, what: str) -> Any:
    """Parse ``raw`` as strict UTF-8 JSON.

    Args:
        raw: the bytes as read from storage.
        where: the file, for the message.
        what: what the file is ("manifest", "skeleton", "header"), for the message.

    Returns:
        The parsed value (dicts, lists, str, int, finite float, bool, None).

    Raises:
        CheckpointCorruptError: anything that is not strict JSON as described in the module docstring.
    """
    data = bytes(raw)
    if data.startswith(b"\xef\xbb\xbf"):
        raise CheckpointCorruptError(
            f"{where}: {what} starts with a UTF-8 byte-order mark; resumekit writes plain UTF-8 JSON, so "
            "the file was rewritten by another tool or forged."
        )
    try:
        text = data.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except UnicodeDecodeError as exc:
        raise CheckpointCorruptError(
            f"{where}: {what} is not valid JSON (not UTF-8: {exc}); the file is corrupt or was re-encoded."
        ) from exc
    except _Refused as exc:
        raise CheckpointCorruptError(
            f"{where}: {what} is not valid JSON as resumekit writes it: it holds {exc}. The file is corrupt "
            "or forged."
        ) from exc
    except (ValueError, RecursionError, OverflowError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointCorruptError(f"{where}: {what} is not valid JSON ({exc})") from exc


# Typed field access on parsed JSON: a wrong type raises TypeError, which each caller reports with the
# file and the field that held it.


def expect_dict(v: Any) -> dict[str, Any]:
    """``v`` if it is a JSON object, else TypeError naming what it is."""
    if not isinstance(v, dict):
        raise TypeError(f"expected an object, got {type(v).__name__}")
    return v


def expect_list(v: Any) -> list[Any]:
    """``v`` if it is a JSON array, else TypeError naming what it is."""
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def expect_str(v: Any) -> str:
    """``v`` if it is a JSON string, else TypeError naming what it is."""
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v
