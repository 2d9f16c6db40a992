"""Ids are non-empty printable text (docs/events.md, "Ids"): every id field of every kind accepts
exactly the ids an independent oracle (built on ``unicodedata.category``, not on
``str.isprintable``) calls safe, and rejects the rest as ``unsafe_id`` with a printable detail,
never with an exception of another kind."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from features import events
from features.events import FORMULA_FIRST_CHARS, MAX_ID_CHARS, InvalidEvent, event_from_dict, parse_event

ROOT = Path(__file__).resolve().parents[3]
NOW_MS = 1_760_000_000_000
TS_MS = NOW_MS - 1000
#: The categories docs/events.md rejects; a Zs character is rejected unless it is U+0020.
REJECTED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
DOCS = {
    events.TOPIC_KIND_VIEW: {
        "event_id": "e1",
        "user_id": "u1",
        "ts": TS_MS,
        "session_id": "s1",
        "item_id": "i1",
        "category": "toys",
        "price": 9.5,
    },
    events.TOPIC_KIND_CART: {
        "event_id": "e1",
        "user_id": "u1",
        "ts": TS_MS,
        "session_id": "s1",
        "item_id": "i1",
        "category": "toys",
        "action": "add",
        "quantity": 1,
        "price": 9.5,
    },
    events.TOPIC_KIND_ORDER: {
        "event_id": "e1",
        "user_id": "u1",
        "ts": TS_MS,
        "session_id": "s1",
        "order_id": "o1",
        "items": [{"item_id": "i1", "quantity": 1, "price": 9.5}],
        "total": 9.5,
    },
}
#: Every id field as (kind, field); "items.item_id" is the order line's.
ID_FIELDS = [
    (kind, field)
    for kind, doc in DOCS.items()
    for field, value in doc.items()
    if type(value) is str and field != "action"
] + [(events.TOPIC_KIND_ORDER, "items.item_id")]


def _char_is_safe(char: str) -> bool:
    return char == " " or unicodedata.category(char) not in REJECTED_CATEGORIES


def oracle_accepts(value: str) -> bool:
    """docs/events.md's rule, written out independently of the validator."""
    return (
        0 < len(value) <= MAX_ID_CHARS
        and all(_char_is_safe(char) for char in value)
        and value.strip(" ") == value
        and value[0] not in "=+-@"
    )


def _with_id(kind: str, field: str, value: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(DOCS[kind]))
    if field == "items.item_id":
        doc["items"][0]["item_id"] = value
    else:
        doc[field] = value
    return doc


def _message(kind: str, field: str, value: str) -> tuple[bytes, bytes]:
    """Key and value bytes as a producer sends them (JSON escapes a lone surrogate as \\udxxx)."""
    doc = _with_id(kind, field, value)
    return doc["user_id"].encode("utf-8", "surrogatepass"), json.dumps(doc).encode()


def _outcome(kind: str, field: str, value: str) -> str:
    key, raw = _message(kind, field, value)
    try:
        event = parse_event(kind, key, raw, NOW_MS)
    except InvalidEvent as exc:
        assert exc.detail.isprintable(), exc.detail  # it goes into a header and log lines
        return exc.reason
    sent = event.order_lines[0].item_id if field == "items.item_id" else getattr(event, field)
    assert sent == value
    return "accepted"


interesting = st.sampled_from(
    [
        " ",
        "=",
        "+",
        "-",
        "@",
        "a",
        "7",
        "\u00e9",
        "\u3000",
        "\u00a0",
        "\n",
        "\t",
        "\x7f",
        "\x85",
        "\u200b",
        "\u200d",
        "\u202e",
        "\u2066",
        "\ufeff",
        "\u2028",
        "\ud800",
        "\ue000",
        "\uffff",
        "\U0001f6d2",
    ]
)
ids = st.text(alphabet=st.characters(exclude_categories=()) | interesting, max_size=MAX_ID_CHARS + 2)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(ID_FIELDS), value=ids)
@example(field=(events.TOPIC_KIND_VIEW, "user_id"), value="   ")
@example(field=(events.TOPIC_KIND_CART, "category"), value="-")
@example(field=(events.TOPIC_KIND_ORDER, "items.item_id"), value="i\u2029")
def test_an_id_is_accepted_safe_or_rejected_as_unsafe_id(field: tuple[str, str], value: str) -> None:
    kind, name = field
    got = _outcome(kind, name, value)
    if oracle_accepts(value):
        assert got == "accepted"
    elif not value or len(value) > MAX_ID_CHARS:
        optional_empty = not value and (kind, name) in {
            (events.TOPIC_KIND_CART, "category"),
            (events.TOPIC_KIND_ORDER, "session_id"),
        }
        assert got == ("accepted" if optional_empty else events.REASON_BAD_VALUE)
    else:
        assert got == events.REASON_UNSAFE_ID


def test_every_code_point_of_the_first_two_planes_follows_the_rule() -> None:
    """All 131072 code points of the BMP and plane 1, as a one-character item id."""
    doc = dict(DOCS[events.TOPIC_KIND_VIEW])
    wrong = []
    for code_point in range(0x20000):
        doc["item_id"] = char = chr(code_point)
        try:
            event_from_dict(events.TOPIC_KIND_VIEW, doc, NOW_MS)
            accepted = True
        except InvalidEvent as exc:
            assert exc.reason == events.REASON_UNSAFE_ID
            accepted = False
        if accepted != oracle_accepts(char):
            wrong.append(f"U+{code_point:04X}")
    assert not wrong, f"{len(wrong)} code points break the rule, e.g. {wrong[:10]}"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("u1\n", ["U+000A", "control character", "position 2"]),
        ("u\u202e1", ["U+202E RIGHT-TO-LEFT OVERRIDE", "format character", "category Cf", "position 1"]),
        ("u\ud8001", ["U+D800", "lone surrogate"]),
        ("u\u00a01", ["U+00A0 NO-BREAK SPACE", "space other than U+0020"]),
        ("  ", ["only spaces"]),
        ("u1 ", ["starts or ends with a space", "strip"]),
        ("=1+1", ["'='", "formula", "CSV", "leading letter or digit"]),
    ],
)
def test_the_detail_says_what_is_wrong_and_what_to_send(value: str, words: list[str]) -> None:
    with pytest.raises(InvalidEvent) as caught:
        event_from_dict(events.TOPIC_KIND_VIEW, {**DOCS[events.TOPIC_KIND_VIEW], "user_id": value}, NOW_MS)
    assert caught.value.reason == events.REASON_UNSAFE_ID
    assert caught.value.detail.startswith("page_view: field 'user_id' ")
    for word in words:
        assert word in caught.value.detail


def test_the_key_check_still_compares_the_user_ids_utf8_bytes() -> None:
    composed, decomposed = "u-\u00e9", "u-e\u0301"  # printable both, different code points
    for user in (composed, decomposed, "u-\U0001f6d2", "u 1"):
        key, raw = _message(events.TOPIC_KIND_VIEW, "user_id", user)
        assert parse_event(events.TOPIC_KIND_VIEW, key, raw, NOW_MS).user_id == user
    key, raw = _message(events.TOPIC_KIND_VIEW, "user_id", composed)
    with pytest.raises(InvalidEvent) as caught:
        parse_event(events.TOPIC_KIND_VIEW, decomposed.encode(), raw, NOW_MS)
    assert caught.value.reason == events.REASON_WRONG_KEY


def test_the_docs_name_the_rule_the_validator_applies() -> None:
    text = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    section = text.split("\n## Ids\n", 1)[1].split("\n## ", 1)[0]
    for category in REJECTED_CATEGORIES:
        assert f"`{category}`" in section, category
    first_chars = re.search(r"first character is ((?:`.`(?:, | or )?)+)", section)
    assert first_chars, "the formula rule is not in the Ids section"
    assert sorted(re.findall(r"`(.)`", first_chars.group(1))) == sorted(FORMULA_FIRST_CHARS)
    assert f"more than {MAX_ID_CHARS} characters" in section
    assert f"({unicodedata.unidata_version[:4]} for" in section
