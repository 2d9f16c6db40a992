"""Shop event contracts (version 1) and their strict, fast validation.

Three kinds of input event arrive on three topics, each keyed by ``user_id``:

* page view  -> :data:`KIND_VIEW`
* cart change -> :data:`KIND_CART_ADD` / :data:`KIND_CART_REMOVE` (``action`` add/remove)
* order      -> :data:`KIND_ORDER`

:func:`parse_event` turns the raw Kafka key and value bytes into an :class:`Event`, or raises
:class:`InvalidEvent` with a machine-readable ``reason`` (a short code used as a metric label
and dead-letter header) and a human ``detail`` that says what was wrong and what to do.

Pure Python: no Kafka, no Faust. The JSON Schemas in ``features/schemas/`` describe the same
contracts for other producers; tests check the two agree.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CONTRACT_VERSION = 1

TOPIC_KIND_VIEW = "page_view"
TOPIC_KIND_CART = "cart"
TOPIC_KIND_ORDER = "order"
TOPIC_KINDS = (TOPIC_KIND_VIEW, TOPIC_KIND_CART, TOPIC_KIND_ORDER)

KIND_VIEW = "view"
KIND_CART_ADD = "cart_add"
KIND_CART_REMOVE = "cart_remove"
KIND_ORDER = "order"
EVENT_KINDS = (KIND_VIEW, KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER)

# Reason codes: stable, low-cardinality, used as metric labels and dead-letter headers.
REASON_OVERSIZED = "oversized"
REASON_BAD_JSON = "bad_json"
REASON_NOT_OBJECT = "not_object"
REASON_MISSING_FIELD = "missing_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_BAD_VALUE = "bad_value"
REASON_NEGATIVE_PRICE = "negative_price"
REASON_TS_FUTURE = "ts_in_future"
REASON_TS_TOO_OLD = "ts_too_old"
REASON_WRONG_KEY = "wrong_key"
REASON_UNSUPPORTED_VERSION = "unsupported_version"
REASON_UNSAFE_ID = "unsafe_id"
REASONS = (
    REASON_OVERSIZED,
    REASON_BAD_JSON,
    REASON_NOT_OBJECT,
    REASON_MISSING_FIELD,
    REASON_WRONG_TYPE,
    REASON_BAD_VALUE,
    REASON_NEGATIVE_PRICE,
    REASON_TS_FUTURE,
    REASON_TS_TOO_OLD,
    REASON_WRONG_KEY,
    REASON_UNSUPPORTED_VERSION,
    REASON_UNSAFE_ID,
)

MAX_ID_CHARS = 128
#: First characters that make a spreadsheet read an exported CSV cell as a formula (OWASP's
#: CSV injection list; its tab and carriage return are not printable, so rejected anyway).
FORMULA_FIRST_CHARS = "=+-@"
MAX_PRICE = 10_000_000.0
MAX_QUANTITY = 10_000
MAX_ORDER_ITEMS = 500
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: anything older is a unit or clock bug


class InvalidEvent(ValueError):
    """An input message that breaks its contract.

    Attributes:
        reason: short code from :data:`REASONS` (metric label, dead-letter header).
        detail: what was wrong and what the producer should do about it.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class OrderLine:
    """One line of an order."""

    item_id: str
    quantity: int
    price: float


@dataclass(slots=True)
class Event:
    """A validated shop event, the only input the feature code accepts; read-only by convention.

    (Not a frozen dataclass: its ``__init__`` cost 2.3 µs per event against 0.3 µs, a fifth
    of the worker's whole validation time.)

    ``ts_ms`` is the event time in epoch milliseconds, as the shop recorded it.
    ``item_id``/``category``/``price``/``quantity`` are empty or zero where a kind has none
    (an order carries its items in ``order_lines`` and its value in ``total``).
    """

    kind: str
    event_id: str
    user_id: str
    ts_ms: int
    session_id: str = ""
    item_id: str = ""
    category: str = ""
    price: float = 0.0
    quantity: int = 0
    order_id: str = ""
    order_lines: tuple[OrderLine, ...] = ()
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    """Bounds that make a message invalid.

    Attributes:
        max_event_bytes: largest accepted message value, in bytes; larger is ``oversized``.
        max_future_skew_ms: how far ahead of the worker's clock an event time may be, in ms.
    """

    max_event_bytes: int = 64 * 1024
    max_future_skew_ms: int = 5 * 60 * 1000


DEFAULT_LIMITS = ValidationLimits()


def _fail(reason: str, detail: str) -> InvalidEvent:
    return InvalidEvent(reason, detail)


#: What may not start an id: a space (see _unsafe_id_problem) or a formula character.
_UNSAFE_FIRST_CHARS = " " + FORMULA_FIRST_CHARS
#: The Unicode categories ``str.isprintable`` refuses (U+0020 aside), in words for the detail.
_UNICODE_CATEGORY_NAMES = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cs": "a lone surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zs": "a space other than U+0020",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def _str(doc: Mapping[str, Any], name: str, where: str, required: bool = True) -> str:
    """An id field: 1 to MAX_ID_CHARS printable characters (or absent/empty where not ``required``)
    that a log line, CSV export, Kafka header or dashboard shows as sent (docs/events.md, "Ids")."""
    value = doc.get(name)
    if (
        type(value) is str
        and value
        and len(value) <= MAX_ID_CHARS
        and value.isprintable()
        and value[0] not in _UNSAFE_FIRST_CHARS
        and value[-1] != " "
    ):
        return value  # the common case, checked in one go; anything else gets the full checks
    if value is None:
        if not required:
            return ""
        raise _fail(REASON_MISSING_FIELD, f"{where}: field '{name}' is missing; send it as a non-empty string")
    if type(value) is not str:
        raise _fail(REASON_WRONG_TYPE, f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value:
        if required:
            raise _fail(REASON_BAD_VALUE, f"{where}: field '{name}' is empty; send a non-empty string")
        return value
    if len(value) > MAX_ID_CHARS:
        raise _fail(
            REASON_BAD_VALUE, f"{where}: field '{name}' is {len(value)} characters; the limit is {MAX_ID_CHARS}"
        )
    raise _fail(REASON_UNSAFE_ID, f"{where}: field '{name}' {_unsafe_id_problem(value)}")


def _unsafe_id_problem(value: str) -> str:
    """What makes a non-empty id of allowed length unsafe, and what to send instead.

    The detail travels in a dead-letter header and log lines, so it names characters by code
    point and never contains the offending ones.
    """
    for position, char in enumerate(value):
        if not char.isprintable():
            category = unicodedata.category(char)
            name = unicodedata.name(char, "")  # control characters and surrogates have none
            shown = f"U+{ord(char):04X}" + (f" {name}" if name else "")
            return (
                f"holds {_UNICODE_CATEGORY_NAMES[category]} ({shown}, category {category}) at position "
                f"{position}; ids are printable text: remove it (no control, format, separator, surrogate, "
                "private-use or unassigned characters; spaces only as U+0020 inside the id)"
            )
    if not value.strip(" "):
        return "is only spaces and would look empty; send the real id"
    if value[0] == " " or value[-1] == " ":
        return "starts or ends with a space, which logs and dashboards do not show; strip it before sending"
    return (
        f"starts with {value[0]!r}, which spreadsheets run as a formula when the id is exported to CSV; "
        f"ids may not start with any of {FORMULA_FIRST_CHARS!r}: give them a leading letter or digit "
        "(for example 'id-' before a signed number)"
    )


def _price(doc: Mapping[str, Any], name: str, where: str) -> float:
    value = doc.get(name)
    if type(value) is float and 0.0 <= value <= MAX_PRICE:
        return value  # the common case (NaN and infinities fail the comparison)
    if value is None:
        raise _fail(REASON_MISSING_FIELD, f"{where}: field '{name}' is missing; send the amount as a number")
    if type(value) not in (int, float):
        raise _fail(REASON_WRONG_TYPE, f"{where}: field '{name}' must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise _fail(
            REASON_BAD_VALUE,
            f"{where}: field '{name}' is an integer too large for a price; the limit is {MAX_PRICE:.0f}",
        ) from None
    if not math.isfinite(value):
        raise _fail(REASON_BAD_VALUE, f"{where}: field '{name}' is {value}; send a finite number")
    if value < 0:
        raise _fail(
            REASON_NEGATIVE_PRICE,
            f"{where}: field '{name}' is {value}; amounts must be >= 0 (send refunds as their own events, "
            "not negative prices)",
        )
    if value > MAX_PRICE:
        raise _fail(
            REASON_BAD_VALUE,
            f"{where}: field '{name}' is {value}; the limit is {MAX_PRICE:.0f} (check the currency unit)",
        )
    return value


def _quantity(doc: Mapping[str, Any], where: str) -> int:
    value = doc.get("quantity")
    if value is None:
        raise _fail(REASON_MISSING_FIELD, f"{where}: field 'quantity' is missing; send a whole number >= 1")
    if type(value) is not int:
        raise _fail(REASON_WRONG_TYPE, f"{where}: field 'quantity' must be a whole number, got {type(value).__name__}")
    if not 1 <= value <= MAX_QUANTITY:
        raise _fail(REASON_BAD_VALUE, f"{where}: field 'quantity' is {value}; it must be between 1 and {MAX_QUANTITY}")
    return value


def _ts(doc: Mapping[str, Any], now_ms: int, limits: ValidationLimits) -> int:
    value = doc.get("ts")
    if value is None:
        raise _fail(REASON_MISSING_FIELD, "field 'ts' is missing; send the event time as epoch milliseconds")
    if type(value) is not int:
        raise _fail(
            REASON_WRONG_TYPE, f"field 'ts' must be an integer of epoch milliseconds, got {type(value).__name__}"
        )
    if value < MIN_TS_MS:
        raise _fail(
            REASON_TS_TOO_OLD, f"field 'ts' is {value}, before 2000-01-01; send epoch milliseconds (not seconds)"
        )
    if value > now_ms + limits.max_future_skew_ms:
        raise _fail(
            REASON_TS_FUTURE,
            f"field 'ts' is {value - now_ms} ms ahead of this worker's clock (limit "
            f"{limits.max_future_skew_ms} ms); check the producer's clock and that ts is in milliseconds",
        )
    return value


def _order_lines(doc: Mapping[str, Any]) -> tuple[OrderLine, ...]:
    items = doc.get("items")
    if items is None:
        raise _fail(REASON_MISSING_FIELD, "field 'items' is missing; send a list of {item_id, quantity, price}")
    if type(items) is not list:
        raise _fail(REASON_WRONG_TYPE, f"field 'items' must be a list, got {type(items).__name__}")
    if not 1 <= len(items) <= MAX_ORDER_ITEMS:
        raise _fail(REASON_BAD_VALUE, f"field 'items' has {len(items)} lines; an order has 1 to {MAX_ORDER_ITEMS}")
    lines = []
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if type(item) is not dict:
            raise _fail(REASON_WRONG_TYPE, f"{where} must be an object, got {type(item).__name__}")
        lines.append(OrderLine(_str(item, "item_id", where), _quantity(item, where), _price(item, "price", where)))
    return tuple(lines)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity)")


def _object_without_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict, refusing a name that appears twice in it.

    Python keeps the last of repeated names, other parsers the first or an error: a forged or
    double-serialised event can show a schema check one ``user_id`` and the worker another.
    Called by the C scanner for every object, nested ones too (order lines, unknown fields).
    """
    doc = dict(pairs)
    if len(doc) == len(pairs):
        return doc
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            break
        seen.add(name)
    raise _fail(
        REASON_BAD_JSON,
        f"field {name[:40]!r} appears more than once in one object; send each field "
        "once (parsers disagree about which value counts)",
    )


def _order_line_names(doc: dict[str, Any]) -> int:
    """How many names the event's order lines hold (0 for other kinds)."""
    lines = doc.get("items")
    if type(lines) is not list:
        return 0
    return sum(len(line) for line in lines if type(line) is dict)


#: One decoder for every message (``json.loads`` with options builds a new one per call).
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: ``scan_once(text, index) -> (value, end)``, set by ``JSONDecoder.__init__``; typeshed's stub lacks it.
_SCAN_JSON: Callable[[str, int], tuple[Any, int]] = _JSON_DECODER.scan_once  # type: ignore[attr-defined]
#: The same, refusing repeated names. Its hook made parse_event 17% slower on the generator's
#: messages, so it only decides those a colon count cannot clear (see :func:`decode_json_object`).
_CHECKING_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_object_without_repeated_names)


def decode_json_object(value: bytes | None, limits: ValidationLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse a message value into a JSON object, enforcing the size limit first and refusing
    repeated names in any of its objects."""
    if value is None:
        raise _fail(REASON_BAD_JSON, "message has no value (a tombstone?); input topics carry JSON events only")
    if len(value) > limits.max_event_bytes:
        raise _fail(
            REASON_OVERSIZED,
            f"message is {len(value)} bytes; the limit is {limits.max_event_bytes} (SHOPPULSE_MAX_EVENT_BYTES)",
        )
    try:  # decoded here: json.loads(bytes) would also take UTF-16/32, a BOM and raw surrogates
        text = value.decode("utf-8")
        try:  # the C scanner alone: a compact document ends where the text ends
            doc, end = _SCAN_JSON(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):  # whitespace around it, trailing bytes or no JSON: the full decoder decides
            doc = _JSON_DECODER.decode(text)
        # No repeated names: every member of every object in the text has one colon outside
        # strings, and a parsed dict holds fewer names than its text when a name repeats. So
        # colons >= members in the text >= names in any of the parsed objects, and as many colons
        # as names in the event (and its order lines) leaves no room for a repeat anywhere.
        # Nested unknown objects, colons inside strings or a repeat make them differ: then the
        # checking decoder decides (it raises on a repeated name, or decodes the same).
        if type(doc) is not dict or (
            (colons := text.count(":")) != len(doc) and colons != len(doc) + _order_line_names(doc)
        ):
            doc = _CHECKING_DECODER.decode(text)
    except InvalidEvent:  # a repeated name: the hook's detail says which
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(
            REASON_BAD_JSON, f"value is not UTF-8 JSON ({str(exc)[:120]}); send one JSON object per message"
        ) from None
    if type(doc) is not dict:
        raise _fail(
            REASON_NOT_OBJECT, f"value is a JSON {type(doc).__name__}, not an object; send one JSON object per message"
        )
    return doc


def _check_version(doc: Mapping[str, Any]) -> None:
    version = doc.get("schema_version", CONTRACT_VERSION)
    if version != CONTRACT_VERSION or type(version) is not int:
        raise _fail(
            REASON_UNSUPPORTED_VERSION,
            f"schema_version {version!r} is not supported; this worker reads version {CONTRACT_VERSION}",
        )


def _check_key(key: bytes | None, user_id: str) -> None:
    """The message key must be the user id: it is what co-partitions a shopper's messages."""
    if key != user_id.encode():
        shown = key[:40] if key is not None else None
        raise _fail(
            REASON_WRONG_KEY,
            f"message key is {shown!r} but user_id is {user_id!r}; key every message by its user_id "
            "(UTF-8) so a shopper's events share a partition",
        )


def event_from_dict(
    topic_kind: str, doc: Mapping[str, Any], now_ms: int, limits: ValidationLimits = DEFAULT_LIMITS
) -> Event:
    """Validate an already-decoded event document of a topic kind (see :data:`TOPIC_KINDS`)."""
    _check_version(doc)
    event_id = _str(doc, "event_id", topic_kind)
    user_id = _str(doc, "user_id", topic_kind)
    ts_ms = _ts(doc, now_ms, limits)
    if topic_kind == TOPIC_KIND_VIEW:
        return Event(
            KIND_VIEW,
            event_id,
            user_id,
            ts_ms,
            session_id=_str(doc, "session_id", topic_kind),
            item_id=_str(doc, "item_id", topic_kind),
            category=_str(doc, "category", topic_kind),
            price=_price(doc, "price", topic_kind),
            quantity=1,
        )
    if topic_kind == TOPIC_KIND_CART:
        action = doc.get("action")
        if action == "add":
            kind = KIND_CART_ADD
        elif action == "remove":
            kind = KIND_CART_REMOVE
        elif action is None:
            raise _fail(REASON_MISSING_FIELD, 'cart: field \'action\' is missing; send "add" or "remove"')
        else:
            raise _fail(REASON_BAD_VALUE, f'cart: field \'action\' is {str(action)[:40]!r}; send "add" or "remove"')
        return Event(
            kind,
            event_id,
            user_id,
            ts_ms,
            session_id=_str(doc, "session_id", topic_kind),
            item_id=_str(doc, "item_id", topic_kind),
            category=_str(doc, "category", topic_kind, required=False),
            price=_price(doc, "price", topic_kind),
            quantity=_quantity(doc, topic_kind),
        )
    if topic_kind == TOPIC_KIND_ORDER:
        return Event(
            KIND_ORDER,
            event_id,
            user_id,
            ts_ms,
            session_id=_str(doc, "session_id", topic_kind, required=False),
            order_id=_str(doc, "order_id", topic_kind),
            order_lines=_order_lines(doc),
            total=_price(doc, "total", topic_kind),
        )
    raise ValueError(f"unknown topic kind {topic_kind!r}; expected one of {TOPIC_KINDS}")


def parse_event(
    topic_kind: str, key: bytes | None, value: bytes | None, now_ms: int, limits: ValidationLimits = DEFAULT_LIMITS
) -> Event:
    """Validate one Kafka message of a topic kind; the key must be the event's user_id."""
    event = event_from_dict(topic_kind, decode_json_object(value, limits), now_ms, limits)
    _check_key(key, event.user_id)
    return event


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    """A request to forget a shopper (``shoppulse forget``; docs/privacy.md).

    ``ts_ms`` is when it was requested, in epoch milliseconds: it places the request among the
    shopper's events by event time (events at or before it are erased, later ones start afresh).
    """

    request_id: str
    user_id: str
    ts_ms: int


def erasure_request_to_dict(request: ErasureRequest) -> dict[str, Any]:
    """The contract document of an erasure request (inverse of :func:`parse_erasure_request`)."""
    return {
        "schema_version": CONTRACT_VERSION,
        "request_id": request.request_id,
        "user_id": request.user_id,
        "ts": request.ts_ms,
    }


def parse_erasure_request(
    key: bytes | None, value: bytes | None, now_ms: int, limits: ValidationLimits = DEFAULT_LIMITS
) -> ErasureRequest:
    """Validate one message of the erasure-request topic with the events' rules (ids, ``ts``, key),
    so a bad request is dead-lettered with the same reason codes as a bad event."""
    doc = decode_json_object(value, limits)
    _check_version(doc)
    request = ErasureRequest(
        _str(doc, "request_id", "erasure"), _str(doc, "user_id", "erasure"), _ts(doc, now_ms, limits)
    )
    _check_key(key, request.user_id)
    return request


def event_to_dict(event: Event) -> dict[str, Any]:
    """The contract document for an event (inverse of :func:`event_from_dict`)."""
    doc: dict[str, Any] = {
        "schema_version": CONTRACT_VERSION,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "ts": event.ts_ms,
    }
    if event.kind == KIND_ORDER:
        doc["order_id"] = event.order_id
        if event.session_id:
            doc["session_id"] = event.session_id
        doc["items"] = [
            {"item_id": line.item_id, "quantity": line.quantity, "price": line.price} for line in event.order_lines
        ]
        doc["total"] = event.total
        return doc
    doc["session_id"] = event.session_id
    doc["item_id"] = event.item_id
    if event.category or event.kind == KIND_VIEW:
        doc["category"] = event.category
    doc["price"] = event.price
    if event.kind != KIND_VIEW:
        doc["action"] = "add" if event.kind == KIND_CART_ADD else "remove"
        doc["quantity"] = event.quantity
    return doc


def topic_kind_of(event: Event) -> str:
    """Which input topic kind carries an event of this kind."""
    if event.kind == KIND_VIEW:
        return TOPIC_KIND_VIEW
    if event.kind == KIND_ORDER:
        return TOPIC_KIND_ORDER
    return TOPIC_KIND_CART


def encode_event(event: Event) -> bytes:
    """Compact JSON bytes for an event, as producers put it on its topic."""
    return json.dumps(event_to_dict(event), separators=(",", ":")).encode()
