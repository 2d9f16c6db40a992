"""Hostile input messages and what docs/events.md says the worker must do with each.

Every case is one message for an input topic kind, with the reason it must be dead-lettered
with, or :data:`ACCEPTED` where the documented rules make it a valid event (unknown fields are
ignored, ids are any printable Unicode, a repeated ``event_id`` is applied once). Shared by
``tests/unit/features/test_poison_corpus.py`` (the validator gives exactly these answers) and
``tests/integration/test_reliability.py`` (the worker dead-letters them and keeps running).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from features.events import (
    REASON_BAD_JSON,
    REASON_BAD_VALUE,
    REASON_MISSING_FIELD,
    REASON_NEGATIVE_PRICE,
    REASON_NOT_OBJECT,
    REASON_OVERSIZED,
    REASON_TS_FUTURE,
    REASON_TS_TOO_OLD,
    REASON_UNSAFE_ID,
    REASON_UNSUPPORTED_VERSION,
    REASON_WRONG_KEY,
    REASON_WRONG_TYPE,
    TOPIC_KIND_CART,
    TOPIC_KIND_ORDER,
    TOPIC_KIND_VIEW,
)

ACCEPTED = "accepted"
USER = "poison-u1"
TS_2100_MS = 4_102_444_800_000


@dataclass(frozen=True)
class PoisonCase:
    """One message: its name, topic kind, key and value bytes, and the expected reason (or ACCEPTED)."""

    name: str
    topic_kind: str
    key: bytes | None
    value: bytes | None
    expected: str


def _json(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def poison_corpus(now_ms: int) -> list[PoisonCase]:
    """The corpus, with valid timestamps one second before ``now_ms``."""
    ts = now_ms - 1000
    view = {
        "event_id": "p-view",
        "user_id": USER,
        "ts": ts,
        "session_id": "s",
        "item_id": "i1",
        "category": "toys",
        "price": 9.5,
    }
    cart = {
        "event_id": "p-cart",
        "user_id": USER,
        "ts": ts,
        "session_id": "s",
        "item_id": "i1",
        "action": "add",
        "quantity": 1,
        "price": 9.5,
    }
    order = {
        "event_id": "p-order",
        "user_id": USER,
        "ts": ts,
        "order_id": "o1",
        "items": [{"item_id": "i1", "quantity": 1, "price": 9.5}],
        "total": 9.5,
    }
    key = USER.encode()

    def case(
        name: str,
        kind: str,
        doc: dict[str, Any],
        expected: str,
        raw: bytes | None = None,
        message_key: bytes | None = key,
    ) -> PoisonCase:
        return PoisonCase(name, kind, message_key, _json(doc) if raw is None else raw, expected)

    def v(name: str, expected: str, **changes: Any) -> PoisonCase:
        return case(name, TOPIC_KIND_VIEW, {**view, "event_id": f"p-{name}", **changes}, expected)

    def c(name: str, expected: str, **changes: Any) -> PoisonCase:
        return case(name, TOPIC_KIND_CART, {**cart, "event_id": f"p-{name}", **changes}, expected)

    def o(name: str, expected: str, **changes: Any) -> PoisonCase:
        return case(name, TOPIC_KIND_ORDER, {**order, "event_id": f"p-{name}", **changes}, expected)

    deep = _json(view)[:-1] + b', "nested": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    without_ts = {k: value for k, value in view.items() if k != "ts"}
    return [
        # broken JSON and encodings
        case("truncated", TOPIC_KIND_VIEW, view, REASON_BAD_JSON, raw=_json(view)[:37]),
        PoisonCase("tombstone", TOPIC_KIND_VIEW, key, None, REASON_BAD_JSON),
        case("empty", TOPIC_KIND_CART, view, REASON_BAD_JSON, raw=b""),
        case("not-utf8", TOPIC_KIND_VIEW, view, REASON_BAD_JSON, raw=b"\xff\xfe{}"),
        case("utf16", TOPIC_KIND_VIEW, view, REASON_BAD_JSON, raw=json.dumps(view).encode("utf-16")),
        case("bom", TOPIC_KIND_VIEW, view, REASON_BAD_JSON, raw=b"\xef\xbb\xbf" + _json(view)),
        case("deep-nesting", TOPIC_KIND_VIEW, view, REASON_BAD_JSON, raw=deep),
        # a repeated name hides a field: Python would take the last user_id, matching the key
        case(
            "repeated-user-id",
            TOPIC_KIND_VIEW,
            view,
            REASON_BAD_JSON,
            raw=b'{"user_id": "poison-u9", ' + _json({**view, "event_id": "p-repeated-user-id"})[1:],
        ),
        case(
            "repeated-line-price",
            TOPIC_KIND_ORDER,
            order,
            REASON_BAD_JSON,
            raw=_json({**order, "event_id": "p-repeated-line-price"}).replace(
                b'"price": 9.5', b'"price": 0.0, "price": 9.5', 1
            ),
        ),
        v("nan-price", REASON_BAD_JSON, price=float("nan")),
        o("infinite-total", REASON_BAD_JSON, total=float("inf")),
        case("array", TOPIC_KIND_ORDER, view, REASON_NOT_OBJECT, raw=_json([order])),
        case("oversized", TOPIC_KIND_VIEW, {**view, "event_id": "p-oversized", "note": "y" * 70_000}, REASON_OVERSIZED),
        # wrong types
        v("price-string", REASON_WRONG_TYPE, price="9.5"),
        v("ts-float", REASON_WRONG_TYPE, ts=float(ts)),
        c("quantity-float", REASON_WRONG_TYPE, quantity=2.0),
        c("quantity-bool", REASON_WRONG_TYPE, quantity=True),
        case(
            "user-int",
            TOPIC_KIND_VIEW,
            {**view, "event_id": "p-user-int", "user_id": 123},
            REASON_WRONG_TYPE,
            message_key=b"123",
        ),
        o("items-string", REASON_WRONG_TYPE, items="i1"),
        # huge strings
        v("huge-id", REASON_BAD_VALUE, item_id="x" * 10_000),
        v("huge-unknown-field", ACCEPTED, note="y" * 60_000),
        # unicode oddities: printable ids pass, anything a log line, CSV, header or dashboard
        # would show differently from what was sent is unsafe_id
        v("lone-surrogate", REASON_UNSAFE_ID, item_id="\ud800"),
        v("emoji-item", ACCEPTED, item_id="i-\U0001f6d2"),
        v("accented-category", ACCEPTED, category="chaussures d\u00e9cor\u00e9es"),
        v("cjk-category", ACCEPTED, category="\u9774"),
        v("inner-space", ACCEPTED, category="garden tools"),
        v("quote-and-comma", ACCEPTED, item_id='sku "1",2'),
        v("inner-dash-and-at", ACCEPTED, item_id="sku-1@shop=2"),
        case(
            "zero-width-user",
            TOPIC_KIND_VIEW,
            {**view, "event_id": "p-zw", "user_id": "poison-\u200bu2"},
            REASON_UNSAFE_ID,
            message_key="poison-\u200bu2".encode(),
        ),
        case(
            "zero-width-key-mismatch",
            TOPIC_KIND_VIEW,
            {**view, "event_id": "p-zwk", "user_id": "poison-\u200bu2"},
            REASON_UNSAFE_ID,
            message_key=b"poison-u2",
        ),
        case(
            "newline-user",
            TOPIC_KIND_VIEW,
            {**view, "event_id": "p-nl", "user_id": "poison-u1\nlevel=error"},
            REASON_UNSAFE_ID,
            message_key=b"poison-u1\nlevel=error",
        ),
        v("nul-item", REASON_UNSAFE_ID, item_id="i1\x00"),
        v("cr-session", REASON_UNSAFE_ID, session_id="s\r"),
        v("tab-item", REASON_UNSAFE_ID, item_id="i\t1"),
        v("escape-sequence", REASON_UNSAFE_ID, item_id="\x1b[31mi1"),
        v("del-item", REASON_UNSAFE_ID, item_id="i1\x7f"),
        v("c1-next-line", REASON_UNSAFE_ID, item_id="i1\x85"),
        v("rtl-override", REASON_UNSAFE_ID, category="\u202etoys\u202c"),
        v("bidi-isolate", REASON_UNSAFE_ID, category="\u2066toys\u2069"),
        v("bom-in-id", REASON_UNSAFE_ID, item_id="\ufeffi1"),
        v("soft-hyphen", REASON_UNSAFE_ID, item_id="i\u00ad1"),
        v("line-separator", REASON_UNSAFE_ID, category="toys\u2028"),
        v("paragraph-separator", REASON_UNSAFE_ID, category="toys\u2029"),
        v("no-break-space", REASON_UNSAFE_ID, item_id="i\u00a01"),
        v("ideographic-space", REASON_UNSAFE_ID, category="\u3000"),
        v("private-use", REASON_UNSAFE_ID, item_id="i\ue000"),
        v("unassigned", REASON_UNSAFE_ID, item_id="i\U000e0080"),
        v("noncharacter", REASON_UNSAFE_ID, item_id="i\uffff"),
        v("all-spaces", REASON_UNSAFE_ID, category="   "),
        v("leading-space", REASON_UNSAFE_ID, item_id=" i1"),
        v("trailing-space", REASON_UNSAFE_ID, session_id="s "),
        v("formula-equals", REASON_UNSAFE_ID, item_id='=HYPERLINK("http://x","i1")'),
        v("formula-plus", REASON_UNSAFE_ID, category="+toys"),
        v("formula-minus", REASON_UNSAFE_ID, session_id="-1"),
        v("formula-at", REASON_UNSAFE_ID, item_id="@SUM(1)"),
        o("formula-order-line", REASON_UNSAFE_ID, items=[{"item_id": "=1+1", "quantity": 1, "price": 9.5}]),
        o("control-order-id", REASON_UNSAFE_ID, order_id="o1\n"),
        c("control-optional-category", REASON_UNSAFE_ID, category="toys\x00"),
        # absurd numbers
        c("negative-quantity", REASON_BAD_VALUE, quantity=-3),
        c("absurd-quantity", REASON_BAD_VALUE, quantity=10**9),
        v("negative-price", REASON_NEGATIVE_PRICE, price=-0.01),
        v("absurd-price", REASON_BAD_VALUE, price=1e15),
        v("price-beyond-float", REASON_BAD_VALUE, price=10**400),
        o("negative-line-price", REASON_NEGATIVE_PRICE, items=[{"item_id": "i1", "quantity": 1, "price": -5}]),
        o("no-lines", REASON_BAD_VALUE, items=[]),
        # times
        v("ts-1970", REASON_TS_TOO_OLD, ts=0),
        v("ts-seconds", REASON_TS_TOO_OLD, ts=ts // 1000),
        v("ts-2100", REASON_TS_FUTURE, ts=TS_2100_MS),
        # missing things
        case("no-ts", TOPIC_KIND_VIEW, without_ts, REASON_MISSING_FIELD),
        v("null-item", REASON_MISSING_FIELD, item_id=None),
        case("empty-object", TOPIC_KIND_ORDER, {}, REASON_MISSING_FIELD),
        case("no-key", TOPIC_KIND_VIEW, {**view, "event_id": "p-no-key"}, REASON_WRONG_KEY, message_key=None),
        # unknown event types and versions
        c("unknown-action", REASON_BAD_VALUE, action="wishlist"),
        v("unknown-type-field", ACCEPTED, event_type="wishlist_add"),
        v("version-2", REASON_UNSUPPORTED_VERSION, schema_version=2),
        # duplicated event ids: applied once
        case("valid-view", TOPIC_KIND_VIEW, view, ACCEPTED),
        case("same-view-again", TOPIC_KIND_VIEW, view, ACCEPTED),
        case("same-id-other-content", TOPIC_KIND_CART, {**cart, "event_id": "p-view"}, ACCEPTED),
    ]
