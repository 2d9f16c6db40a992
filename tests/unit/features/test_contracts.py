"""The JSON Schemas, the hand-written validator and docs/events.md agree on the event contracts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from features import events
from features.contracts import SCHEMA_DIALECT, load_schema
from features.events import (
    InvalidEvent,
    ValidationLimits,
    event_from_dict,
    event_to_dict,
    parse_event,
)

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "events.md"
KINDS = events.TOPIC_KINDS
VALIDATORS = {kind: Draft202012Validator(load_schema(kind)) for kind in KINDS}
NOW_MS = 1_732_291_800_000  # a worker clock a few minutes after the doc's examples


def _doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def _doc_examples() -> dict[str, dict[str, Any]]:
    """The ```json blocks of docs/events.md, each under a `<!-- contract-example: KIND -->` marker."""
    text = _doc_text()
    blocks = re.findall(r"^```json[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    marked = re.findall(r"^<!-- contract-example: (\w+) -->\n```json\n(.*?)^```", text, flags=re.M | re.S)
    assert len(marked) == len(blocks), "every ```json block in docs/events.md must be a marked contract example"
    examples: dict[str, dict[str, Any]] = {}
    for kind, body in marked:
        assert kind in KINDS and kind not in examples, kind
        examples[kind] = json.loads(body)
    assert sorted(examples) == sorted(KINDS)
    return examples


EXAMPLES = _doc_examples()


def _schema_ok(kind: str, doc: Any) -> bool:
    return VALIDATORS[kind].is_valid(doc)


def _reason(kind: str, doc: Any) -> str | None:
    """The validator's reason code for a document, or None when it accepts it."""
    try:
        event_from_dict(kind, doc, NOW_MS)
    except InvalidEvent as exc:
        return exc.reason
    return None


def _with(kind: str, **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLES[kind])
    doc.update(changes)
    return doc


def _without(kind: str, field: str) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLES[kind])
    del doc[field]
    return doc


def _line(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLES["order"])
    doc["items"][0].update(changes)
    return doc


def _line_without(field: str) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLES["order"])
    del doc["items"][1][field]
    return doc


# --------------------------------------------------------------------------- schemas and loader


@pytest.mark.parametrize("kind", KINDS)
def test_schema_files_are_valid_draft_2020_12(kind: str) -> None:
    schema = load_schema(kind)
    assert schema["$schema"] == SCHEMA_DIALECT
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is True
    assert "forward compatibility" in schema["description"]


def test_load_schema_returns_fresh_dicts_and_rejects_unknown_kinds() -> None:
    first = load_schema("cart")
    first["required"].clear()
    assert load_schema("cart")["required"]
    with pytest.raises(ValueError):
        load_schema("refund")


# --------------------------------------------------------------------------- valid documents


@pytest.mark.parametrize("kind", KINDS)
def test_doc_examples_are_valid_under_schema_and_validator(kind: str) -> None:
    doc = EXAMPLES[kind]
    VALIDATORS[kind].validate(doc)
    event = event_from_dict(kind, doc, NOW_MS)
    assert events.topic_kind_of(event) == kind


VALID_VARIANTS = [
    ("page_view", _without("page_view", "schema_version")),
    ("page_view", _with("page_view", price=0, extra={"nested": [1, 2]}, referrer="search")),
    ("cart", _with("cart", action="remove", quantity=1)),
    ("cart", _without("cart", "category")),
    ("cart", _with("cart", category=None)),
    ("cart", _with("cart", category="")),
    ("order", _without("order", "session_id")),
    ("order", _with("order", session_id=None, coupon="WINTER")),
    ("order", _line(gift_wrap=True)),
]


@pytest.mark.parametrize(("kind", "doc"), VALID_VARIANTS)
def test_valid_variants_pass_both_and_round_trip(kind: str, doc: dict[str, Any]) -> None:
    assert _schema_ok(kind, doc)
    event = event_from_dict(kind, doc, NOW_MS)
    again = event_to_dict(event)
    VALIDATORS[kind].validate(again)
    assert event_from_dict(kind, again, NOW_MS) == event


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_examples_validates_under_schema(kind: str) -> None:
    event = event_from_dict(kind, EXAMPLES[kind], NOW_MS)
    doc = event_to_dict(event)
    VALIDATORS[kind].validate(doc)
    assert json.loads(events.encode_event(event)) == doc
    assert event_from_dict(kind, doc, NOW_MS) == event


# --------------------------------------------------------------------------- boundaries


def _boundary_cases() -> list[tuple[str, dict[str, Any], str | None]]:
    long_id = "x" * events.MAX_ID_CHARS
    line = EXAMPLES["order"]["items"][0]
    return [
        ("page_view", _with("page_view", item_id=long_id), None),
        ("page_view", _with("page_view", item_id=long_id + "x"), events.REASON_BAD_VALUE),
        ("cart", _with("cart", category=long_id), None),
        ("cart", _with("cart", category=long_id + "x"), events.REASON_BAD_VALUE),
        ("order", _with("order", session_id=long_id + "x"), events.REASON_BAD_VALUE),
        ("page_view", _with("page_view", price=events.MAX_PRICE), None),
        ("page_view", _with("page_view", price=int(events.MAX_PRICE)), None),
        ("page_view", _with("page_view", price=events.MAX_PRICE + 0.01), events.REASON_BAD_VALUE),
        ("cart", _with("cart", quantity=events.MAX_QUANTITY), None),
        ("cart", _with("cart", quantity=events.MAX_QUANTITY + 1), events.REASON_BAD_VALUE),
        ("order", _with("order", items=[line] * events.MAX_ORDER_ITEMS), None),
        ("order", _with("order", items=[line] * (events.MAX_ORDER_ITEMS + 1)), events.REASON_BAD_VALUE),
        ("page_view", _with("page_view", ts=events.MIN_TS_MS), None),
        ("page_view", _with("page_view", ts=events.MIN_TS_MS - 1), events.REASON_TS_TOO_OLD),
    ]


@pytest.mark.parametrize(("kind", "doc", "reason"), _boundary_cases())
def test_limits_match_at_the_boundaries(kind: str, doc: dict[str, Any], reason: str | None) -> None:
    assert _schema_ok(kind, doc) is (reason is None)
    assert _reason(kind, doc) == reason


# --------------------------------------------------------------------------- invalid corpus


def _required(kind: str) -> list[str]:
    return list(load_schema(kind)["required"])


def _invalid_corpus() -> list[tuple[str, str, Any, str]]:
    """(kind, label, document, the validator's reason) for documents both must reject."""
    corpus: list[tuple[str, str, Any, str]] = []
    for kind in KINDS:
        for field in _required(kind):
            corpus.append((kind, f"missing {field}", _without(kind, field), events.REASON_MISSING_FIELD))
            corpus.append((kind, f"null {field}", _with(kind, **{field: None}), events.REASON_MISSING_FIELD))
        corpus += [
            (kind, "user_id number", _with(kind, user_id=1842), events.REASON_WRONG_TYPE),
            (kind, "event_id list", _with(kind, event_id=["e"]), events.REASON_WRONG_TYPE),
            (kind, "empty event_id", _with(kind, event_id=""), events.REASON_BAD_VALUE),
            (kind, "ts string", _with(kind, ts="1732291200000"), events.REASON_WRONG_TYPE),
            (kind, "ts fractional", _with(kind, ts=1732291200000.5), events.REASON_WRONG_TYPE),
            (kind, "ts bool", _with(kind, ts=True), events.REASON_WRONG_TYPE),
            (kind, "ts in seconds", _with(kind, ts=1732291200), events.REASON_TS_TOO_OLD),
            (kind, "ts negative", _with(kind, ts=-1), events.REASON_TS_TOO_OLD),
            (kind, "schema_version 2", _with(kind, schema_version=2), events.REASON_UNSUPPORTED_VERSION),
            (kind, "schema_version string", _with(kind, schema_version="1"), events.REASON_UNSUPPORTED_VERSION),
            (kind, "schema_version null", _with(kind, schema_version=None), events.REASON_UNSUPPORTED_VERSION),
            (kind, "schema_version true", _with(kind, schema_version=True), events.REASON_UNSUPPORTED_VERSION),
        ]
    for kind in ("page_view", "cart"):
        corpus += [
            (kind, "price string", _with(kind, price="89.90"), events.REASON_WRONG_TYPE),
            (kind, "price bool", _with(kind, price=True), events.REASON_WRONG_TYPE),
            (kind, "negative price", _with(kind, price=-0.01), events.REASON_NEGATIVE_PRICE),
            (kind, "empty session_id", _with(kind, session_id=""), events.REASON_BAD_VALUE),
        ]
    corpus += [
        ("page_view", "empty category", _with("page_view", category=""), events.REASON_BAD_VALUE),
        ("cart", "category number", _with("cart", category=7), events.REASON_WRONG_TYPE),
        ("cart", "bad action", _with("cart", action="delete"), events.REASON_BAD_VALUE),
        ("cart", "action upper case", _with("cart", action="ADD"), events.REASON_BAD_VALUE),
        ("cart", "action number", _with("cart", action=1), events.REASON_BAD_VALUE),
        ("cart", "quantity 0", _with("cart", quantity=0), events.REASON_BAD_VALUE),
        ("cart", "quantity negative", _with("cart", quantity=-2), events.REASON_BAD_VALUE),
        ("cart", "quantity string", _with("cart", quantity="2"), events.REASON_WRONG_TYPE),
        ("cart", "quantity fractional", _with("cart", quantity=1.5), events.REASON_WRONG_TYPE),
        ("order", "empty items", _with("order", items=[]), events.REASON_BAD_VALUE),
        ("order", "items object", _with("order", items={"item_id": "sku-1"}), events.REASON_WRONG_TYPE),
        ("order", "line not object", _with("order", items=["sku-10442"]), events.REASON_WRONG_TYPE),
        ("order", "negative total", _with("order", total=-192.3), events.REASON_NEGATIVE_PRICE),
        ("order", "total string", _with("order", total="192.30"), events.REASON_WRONG_TYPE),
        ("order", "session_id number", _with("order", session_id=5), events.REASON_WRONG_TYPE),
        ("order", "line quantity 0", _line(quantity=0), events.REASON_BAD_VALUE),
        ("order", "line negative price", _line(price=-5), events.REASON_NEGATIVE_PRICE),
        ("order", "line price over limit", _line(price=2e7), events.REASON_BAD_VALUE),
        ("order", "line empty item_id", _line(item_id=""), events.REASON_BAD_VALUE),
    ]
    for field in ("item_id", "quantity", "price"):
        corpus.append(("order", f"line missing {field}", _line_without(field), events.REASON_MISSING_FIELD))
    return corpus


INVALID = _invalid_corpus()


@pytest.mark.parametrize(("kind", "label", "doc", "reason"), INVALID, ids=[f"{k}-{lbl}" for k, lbl, _, _ in INVALID])
def test_invalid_corpus_is_rejected_by_schema_and_validator(kind: str, label: str, doc: Any, reason: str) -> None:
    assert not _schema_ok(kind, doc), f"schema accepted: {label}"
    assert _reason(kind, doc) == reason


def test_known_divergence_integral_floats() -> None:
    """JSON Schema's "integer" accepts 2.0; the worker rejects it. docs/events.md documents this.

    If the validator is changed to accept integral floats, drop this test and the doc's note.
    """
    cases = [
        ("page_view", _with("page_view", ts=1732291200000.0), events.REASON_WRONG_TYPE),
        ("cart", _with("cart", quantity=2.0), events.REASON_WRONG_TYPE),
        ("cart", _with("cart", schema_version=1.0), events.REASON_UNSUPPORTED_VERSION),
    ]
    for kind, doc, reason in cases:
        assert _schema_ok(kind, doc)
        assert _reason(kind, doc) == reason


def test_known_divergence_id_characters() -> None:
    """The schemas check an id's length only; the worker also rejects unprintable characters, edge
    spaces and a leading formula character (docs/events.md, "Ids"; tests/unit/features/test_ids.py)."""
    for kind, doc in [
        ("page_view", _with("page_view", user_id="u-1842\n")),
        ("cart", _with("cart", item_id="\u202esku-1")),
        ("order", _with("order", order_id="=o-1")),
        ("page_view", _with("page_view", category=" shoes")),
    ]:
        assert _schema_ok(kind, doc)
        assert _reason(kind, doc) == events.REASON_UNSAFE_ID


# --------------------------------------------------------------------------- parse_event


def _bytes(kind: str, **changes: Any) -> bytes:
    return json.dumps(_with(kind, **changes)).encode()


USER_KEY = EXAMPLES["page_view"]["user_id"].encode()


@pytest.mark.parametrize("kind", KINDS)
def test_parse_event_accepts_examples_keyed_by_user_id(kind: str) -> None:
    event = parse_event(kind, USER_KEY, _bytes(kind), NOW_MS)
    assert event == event_from_dict(kind, EXAMPLES[kind], NOW_MS)


PARSE_FAILURES = [
    ("oversized", _bytes("page_view", padding="x" * 70_000), USER_KEY, ValidationLimits(), events.REASON_OVERSIZED),
    (
        "oversized small limit",
        _bytes("page_view"),
        USER_KEY,
        ValidationLimits(max_event_bytes=64),
        events.REASON_OVERSIZED,
    ),
    ("bad json", b'{"event_id": ', USER_KEY, ValidationLimits(), events.REASON_BAD_JSON),
    ("not utf-8", b'{"event_id": "\xff"}', USER_KEY, ValidationLimits(), events.REASON_BAD_JSON),
    ("tombstone", None, USER_KEY, ValidationLimits(), events.REASON_BAD_JSON),
    ("array", b"[" + _bytes("page_view") + b"]", USER_KEY, ValidationLimits(), events.REASON_NOT_OBJECT),
    ("string", b'"view"', USER_KEY, ValidationLimits(), events.REASON_NOT_OBJECT),
    ("null", b"null", USER_KEY, ValidationLimits(), events.REASON_NOT_OBJECT),
    ("other key", _bytes("page_view"), b"u-9999", ValidationLimits(), events.REASON_WRONG_KEY),
    ("json-quoted key", _bytes("page_view"), b'"u-1842"', ValidationLimits(), events.REASON_WRONG_KEY),
    ("no key", _bytes("page_view"), None, ValidationLimits(), events.REASON_WRONG_KEY),
    (
        "ts in future",
        _bytes("page_view", ts=NOW_MS + 5 * 60 * 1000 + 1),
        USER_KEY,
        ValidationLimits(),
        events.REASON_TS_FUTURE,
    ),
    (
        "ts in microseconds",
        _bytes("page_view", ts=NOW_MS * 1000),
        USER_KEY,
        ValidationLimits(),
        events.REASON_TS_FUTURE,
    ),
    (
        "schema_version 2",
        _bytes("cart", schema_version=2),
        USER_KEY,
        ValidationLimits(),
        events.REASON_UNSUPPORTED_VERSION,
    ),
]


@pytest.mark.parametrize(
    ("label", "value", "key", "limits", "reason"), PARSE_FAILURES, ids=[case[0] for case in PARSE_FAILURES]
)
def test_parse_event_reason_codes(
    label: str, value: bytes | None, key: bytes | None, limits: ValidationLimits, reason: str
) -> None:
    kind = "cart" if label == "schema_version 2" else "page_view"
    with pytest.raises(InvalidEvent) as caught:
        parse_event(kind, key, value, NOW_MS, limits)
    assert caught.value.reason == reason
    assert caught.value.detail


def _repeating(kind: str, member: str, before: str) -> bytes:
    """The kind's example with ``before`` inserted just ahead of its JSON text ``member``."""
    text = json.dumps(EXAMPLES[kind])
    assert text.count(member) == 1, member
    return text.replace(member, before + member).encode()


REPEATED_NAMES = [  # (label, kind, value); Python's parser keeps the last value, others the first
    ("user_id", "page_view", _repeating("page_view", '"user_id": "u-1842"', '"user_id": "u-0001", ')),
    ("user_id escaped", "page_view", _repeating("page_view", '"user_id": "u-1842"', '"user\\u005fid": "u-0001", ')),
    ("same value twice", "page_view", _repeating("page_view", '"price": 89.9', '"price": 89.9, ')),
    ("in an order line", "order", _repeating("order", '"quantity": 1', '"quantity": 10, ')),
    ("in an unknown field", "cart", _repeating("cart", '"quantity": 2', '"extra": {"a": 1, "a": 2}, ')),
    ("spaces around", "page_view", b" " + _repeating("page_view", '"ts"', '"ts": 1, ') + b"\n"),
]


@pytest.mark.parametrize(("label", "kind", "value"), REPEATED_NAMES, ids=[case[0] for case in REPEATED_NAMES])
def test_parse_event_rejects_repeated_names_at_any_depth(label: str, kind: str, value: bytes) -> None:
    # Each one is a valid event, keyed right, for a parser that lets the last value win.
    assert event_from_dict(kind, json.loads(value), NOW_MS) == event_from_dict(kind, EXAMPLES[kind], NOW_MS)
    with pytest.raises(InvalidEvent) as caught:
        parse_event(kind, USER_KEY, value, NOW_MS)
    assert caught.value.reason == events.REASON_BAD_JSON
    assert "appears more than once" in caught.value.detail


def test_repeated_names_detail_names_the_field() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event("page_view", USER_KEY, REPEATED_NAMES[0][2], NOW_MS)
    assert caught.value.detail.startswith("field 'user_id' appears more than once")


def test_a_name_may_repeat_in_different_objects() -> None:
    order = EXAMPLES["order"]
    assert [line["item_id"] for line in order["items"]] and "item_id" not in order
    doc = {**order, "item_id": "sku-1", "extra": {"item_id": "sku-2", "items": []}}
    event = parse_event("order", USER_KEY, json.dumps(doc).encode(), NOW_MS)
    assert event == event_from_dict("order", order, NOW_MS)


def test_parse_event_allows_the_skew_limit_exactly() -> None:
    value = _bytes("page_view", ts=NOW_MS + 5 * 60 * 1000)
    assert parse_event("page_view", USER_KEY, value, NOW_MS).ts_ms == NOW_MS + 5 * 60 * 1000


# --------------------------------------------------------------------------- the doc itself


def test_doc_reason_table_lists_exactly_the_validator_codes() -> None:
    section = _doc_text().split("## Rejection reasons", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| `([a-z_]+)` +\|", section, flags=re.M)
    assert len(codes) == len(set(codes))
    assert set(codes) == set(events.REASONS)


def test_doc_kcat_example_is_a_valid_keyed_page_view() -> None:
    match = re.search(
        r"^echo '([^|']+)\|(\{.*?\})' \\\n +\| kcat -P .*-t shop\.page_views .*"
        r"-K '\|' -X partitioner=murmur2_random",
        _doc_text(),
        flags=re.M,
    )
    assert match, "kcat produce example not found in docs/events.md"
    key, value = match.group(1).encode(), match.group(2).encode()
    event = parse_event("page_view", key, value, NOW_MS)
    assert _schema_ok("page_view", json.loads(value))
    assert event == event_from_dict("page_view", EXAMPLES["page_view"], NOW_MS)


def test_doc_names_topics_env_vars_and_dead_letter_headers() -> None:
    text = _doc_text()
    for needle in (
        "shop.page_views",
        "shop.cart",
        "shop.orders",
        "SHOPPULSE_TOPIC_PAGE_VIEWS",
        "SHOPPULSE_TOPIC_CART",
        "SHOPPULSE_TOPIC_ORDERS",
        "shoppulse.dead_letter",
        "shoppulse_dead_letter_total{reason}",
        "partitioner=murmur2_random",
        "-f '%k %h %s\\n'",
    ):
        assert needle in text, needle
    for header in (
        "reason",
        "detail",
        "source_topic",
        "source_partition",
        "source_offset",
        "failed_at_ms",
        "value_truncated_from",
    ):
        assert f"`shoppulse.dlq.{header}`" in text, header
