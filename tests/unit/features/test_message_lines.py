"""The message JSONL is read in one place: replay and training give every line the same verdict."""

from __future__ import annotations

import base64
import json

import pytest

from features.message_lines import MessageLine, decode_message_line, read_message_lines
from models.train_cli import read_events_jsonl
from streams.sim.replay import read_jsonl

GOOD = [
    {"topic_kind": "page_view", "key": "u1", "value": "{}"},
    {
        "topic_kind": "cart",
        "key_b64": base64.b64encode(b"\xff\xfe").decode(),
        "value": "x",
        "malformed_reason": "bad_key",
    },
]
BAD = [
    {"topic_kind": "page_view", "key": 5, "value": "{}"},  # not text
    {"topic_kind": "page_view", "key": "u1", "value_b64": "not base64!"},
    {"key": "u1", "value": "{}"},
    ["a", "list"],
]


def test_decode_keeps_bytes_and_names_what_is_wrong():
    assert decode_message_line(json.dumps(GOOD[1])) == MessageLine("cart", b"\xff\xfe", b"x", "bad_key")
    for record in BAD:
        with pytest.raises(ValueError, match="not a message line"):
            decode_message_line(json.dumps(record))


@pytest.mark.parametrize("bad", BAD)
def test_replay_stops_and_training_counts_at_the_same_lines(tmp_path, bad):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*GOOD, bad]) + "\n\n")
    verdicts = [(n, isinstance(m, ValueError)) for n, m in read_message_lines(path)]
    assert verdicts == [(1, False), (2, False), (3, True)]
    with pytest.raises(ValueError, match=f"{path}:3: not a message line"):
        list(read_jsonl(path))
    _, stats = read_events_jsonl(path)
    assert stats["lines"] == 3 and stats["invalid"]["not_a_message_line"] == 1
