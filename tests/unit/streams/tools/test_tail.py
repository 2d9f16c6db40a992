"""``shoppulse tail``'s formatting of one consumed message (real confluent-kafka Message objects)."""

from __future__ import annotations

from confluent_kafka import Message

from streams.tools.tail import format_message


def _message(value: bytes | None, headers: list[tuple[str, str | bytes | None]] | None = None) -> Message:
    return Message(topic="shoppulse.dead_letter", partition=2, offset=7, key=b"u1", value=value, headers=headers)


def test_a_json_value_is_pretty_printed_under_its_position_and_headers() -> None:
    text = format_message(_message(b'{"user_id": "u1"}', [("shoppulse.dlq.reason", b"bad_json"), ("empty", None)]))
    assert text.splitlines() == [
        "shoppulse.dead_letter[2]@7 key=u1",
        "  shoppulse.dlq.reason: bad_json",
        "  empty: ",
        "{",
        '  "user_id": "u1"',
        "}",
    ]


def test_bytes_that_are_not_json_are_shown_raw() -> None:
    assert format_message(_message(b"\xff{broken")).splitlines()[-1] == "  (not JSON) b'\\xff{broken'"


def test_a_tombstone_is_shown_as_no_value() -> None:
    assert format_message(_message(None)).splitlines() == ["shoppulse.dead_letter[2]@7 key=u1", "  (no value)"]
