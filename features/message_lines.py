"""ShopPulse's message JSONL, read in one place: the file ``shoppulse generate --out`` writes and
``shoppulse replay`` and ``shoppulse train --events`` read.

One JSON object a line: ``{"topic_kind", "key" | "key_b64", "value" | "value_b64"}`` with the
key and value as UTF-8 text, or standard base64 when the bytes are not UTF-8, plus
``malformed_reason`` when the message is invalid on purpose. Blank lines are skipped. The
replay stops at the first line that is not a message; training counts such lines and goes on,
so both get every line's verdict from :func:`read_message_lines`. Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPECTED = '{"topic_kind", "key" or "key_b64", "value" or "value_b64"}'


@dataclass(frozen=True, slots=True)
class MessageLine:
    """One message of the file, its bytes exactly as they were produced."""

    topic_kind: str
    key: bytes
    value: bytes
    malformed_reason: str | None


def _field_bytes(record: dict[str, Any], name: str) -> bytes:
    if name in record:
        text = record[name]
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a string")
        return text.encode("utf-8")
    return base64.b64decode(record[f"{name}_b64"], validate=True)


def decode_message_line(line: str | bytes) -> MessageLine:
    """The message of one line; ``ValueError`` saying why when the line is not one."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
        topic_kind = record["topic_kind"]
        if not isinstance(topic_kind, str):
            raise TypeError("topic_kind must be a string")
        reason = record.get("malformed_reason")
        return MessageLine(
            topic_kind,
            _field_bytes(record, "key"),
            _field_bytes(record, "value"),
            reason if isinstance(reason, str) else None,
        )
    except (KeyError, TypeError, ValueError, UnicodeError, binascii.Error) as exc:
        raise ValueError(f"not a message line ({exc!r}); expected {EXPECTED}") from None


def read_message_lines(path: str | Path) -> Iterator[tuple[int, MessageLine | ValueError]]:
    """``(line number, message or the ValueError saying why the line is not one)`` for every
    non-blank line; the caller decides whether a bad line stops it."""
    with open(path, "rb") as source:
        for line_number, raw in enumerate(source, start=1):
            if not raw.strip():
                continue
            try:
                yield line_number, decode_message_line(raw)
            except ValueError as exc:
                yield line_number, exc
