"""Real and recorded events in our contracts: REES46 CSV, OTTO JSONL, and our own message JSONL.

Pure parsing and pacing, no Kafka. ``docs/replay.md`` gives the field mappings. Recorded event
times are years old while the worker's windows and silence sweep run relative to now (and it
rejects ts more than 5 min ahead of its clock), so shift them with :func:`rebase_times` before
producing; :func:`paced` replays at the recorded speed or a multiple of it.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine
from features.message_lines import read_message_lines
from streams.sim.generator import GeneratedMessage, message_of

#: Category of events whose source has none (OTTO; REES46 rows without code and id).
UNKNOWN_CATEGORY = "unknown"
#: Prefix of OTTO user and session ids, so they never collide with other sources' numeric ids.
OTTO_ID_PREFIX = "otto-"

_T = TypeVar("_T")


def _rees46_ms(event_time: str) -> int:
    """``2019-10-01 00:00:00 UTC`` -> epoch ms."""
    text, _, zone = event_time.rpartition(" ")
    if zone != "UTC":
        raise ValueError(f"event_time {event_time!r} is not in UTC ('YYYY-MM-DD HH:MM:SS UTC')")
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1000


def read_rees46_csv(path: str | Path) -> Iterator[Event]:
    """Events of a REES46 "eCommerce behavior data" CSV, in file order.

    view -> view, cart -> cart add of 1, remove_from_cart -> cart remove of 1, purchase -> an
    order of one line (quantity 1). ``event_id`` (and ``order_id``) is ``rees46-`` plus a hash of
    the row's fields, so a re-read gives the same ids and a duplicated row the same id.
    Raises ValueError naming the line for an unknown event type or unparsable time or price.
    """
    with open(path, newline="", encoding="utf-8") as source:
        reader = csv.reader(source)
        header = next(reader, None)
        expected = [
            "event_time",
            "event_type",
            "product_id",
            "category_id",
            "category_code",
            "brand",
            "price",
            "user_id",
            "user_session",
        ]
        if header != expected:
            raise ValueError(f"{path}: header {header} is not the REES46 header {expected}")
        for row in reader:
            line = reader.line_num
            try:
                (
                    event_time,
                    event_type,
                    product_id,
                    category_id,
                    category_code,
                    _brand,
                    price_text,
                    user_id,
                    user_session,
                ) = row
                ts_ms = _rees46_ms(event_time)
                price = float(price_text) if price_text else 0.0
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
            event_id = "rees46-" + hashlib.blake2b(",".join(row).encode(), digest_size=10).hexdigest()
            category = category_code or category_id or UNKNOWN_CATEGORY
            session_id = user_session or f"{user_id}-{event_time[:10]}"
            if event_type == "view":
                yield Event(
                    KIND_VIEW,
                    event_id,
                    user_id,
                    ts_ms,
                    session_id=session_id,
                    item_id=product_id,
                    category=category,
                    price=price,
                    quantity=1,
                )
            elif event_type in ("cart", "remove_from_cart"):
                kind = KIND_CART_ADD if event_type == "cart" else KIND_CART_REMOVE
                yield Event(
                    kind,
                    event_id,
                    user_id,
                    ts_ms,
                    session_id=session_id,
                    item_id=product_id,
                    category=category,
                    price=price,
                    quantity=1,
                )
            elif event_type == "purchase":
                yield Event(
                    KIND_ORDER,
                    event_id,
                    user_id,
                    ts_ms,
                    session_id=session_id,
                    order_id=event_id,
                    order_lines=(OrderLine(product_id, 1, price),),
                    total=price,
                )
            else:
                raise ValueError(
                    f"{path}:{line}: event_type {event_type!r} is not view, cart, remove_from_cart or purchase"
                )


def read_otto_jsonl(path: str | Path) -> Iterator[Event]:
    """Events of an OTTO ``train.jsonl``, session by session, each session in time order.

    A session becomes one shopper: user_id = session_id = ``otto-<session>``. clicks -> view,
    carts -> cart add of 1, orders with the same ts -> one order whose lines are their aids
    (repeats summed into the quantity). OTTO has no prices or categories: price and total are
    0.0, category ``unknown``. ``event_id`` is ``otto-<session>-<index of the source event>``,
    ``order_id`` ``otto-<session>-<ts>``. Sessions are not merged by time across the file.
    """
    for line_number, line in _lines(path):
        try:
            record = json.loads(line)
            session = record["session"]
            source_events = record["events"]
            user_id = f"{OTTO_ID_PREFIX}{session}"
            orders_by_ts: dict[int, dict[str, int]] = {}
            for source_event in source_events:
                if source_event["type"] == "orders":
                    lines = orders_by_ts.setdefault(source_event["ts"], {})
                    aid = str(source_event["aid"])
                    lines[aid] = lines.get(aid, 0) + 1
            events = []
            for index, source_event in enumerate(source_events):
                event_type, ts_ms, aid = source_event["type"], source_event["ts"], str(source_event["aid"])
                event_id = f"{user_id}-{index}"
                if event_type == "clicks":
                    events.append(
                        Event(
                            KIND_VIEW,
                            event_id,
                            user_id,
                            ts_ms,
                            session_id=user_id,
                            item_id=aid,
                            category=UNKNOWN_CATEGORY,
                            price=0.0,
                            quantity=1,
                        )
                    )
                elif event_type == "carts":
                    events.append(
                        Event(
                            KIND_CART_ADD,
                            event_id,
                            user_id,
                            ts_ms,
                            session_id=user_id,
                            item_id=aid,
                            category=UNKNOWN_CATEGORY,
                            price=0.0,
                            quantity=1,
                        )
                    )
                elif event_type == "orders":
                    quantities = orders_by_ts.pop(ts_ms, None)
                    if quantities is not None:  # the first order row of this ts carries them all
                        events.append(
                            Event(
                                KIND_ORDER,
                                event_id,
                                user_id,
                                ts_ms,
                                session_id=user_id,
                                order_id=f"{user_id}-{ts_ms}",
                                total=0.0,
                                order_lines=tuple(
                                    OrderLine(item, quantity, 0.0) for item, quantity in quantities.items()
                                ),
                            )
                        )
                else:
                    raise ValueError(f"event type {event_type!r} is not clicks, carts or orders")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line_number}: not an OTTO session record ({exc!r})") from None
        yield from events


def events_to_messages(events: Iterable[Event]) -> Iterator[GeneratedMessage]:
    """The valid Kafka message of each event (lazily, so pacing upstream is kept)."""
    for event in events:
        yield message_of(event)


# -- our own message JSONL ---------------------------------------------------------------------


def write_jsonl(messages: Iterable[GeneratedMessage], path: str | Path) -> int:
    """Write messages one JSON object a line; returns how many.

    Line format: ``{"topic_kind", "key", "value"}`` with key and value as UTF-8 strings (the
    value is the exact message text), ``key_b64``/``value_b64`` (standard base64) instead when
    the bytes are not UTF-8, and ``malformed_reason`` when the message is invalid on purpose.
    """
    count = 0
    with open(path, "w", encoding="utf-8") as sink:
        for message in messages:
            record: dict[str, str] = {"topic_kind": message.topic_kind}
            for name, data in (("key", message.key), ("value", message.value)):
                try:
                    record[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    record[f"{name}_b64"] = base64.b64encode(data).decode("ascii")
            if message.malformed_reason is not None:
                record["malformed_reason"] = message.malformed_reason
            sink.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            sink.write("\n")
            count += 1
    return count


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of every non-blank line of a UTF-8 text file."""
    with open(path, encoding="utf-8") as source:
        for line_number, line in enumerate(source, start=1):
            if line.strip():
                yield line_number, line


def read_jsonl(path: str | Path) -> Iterator[GeneratedMessage]:
    """Messages written by :func:`write_jsonl`, byte for byte; ``ValueError`` at the first line
    that is not a message."""
    for line_number, message in read_message_lines(path):
        if isinstance(message, ValueError):
            raise ValueError(f"{path}:{line_number}: {message}") from None
        yield GeneratedMessage(message.topic_kind, message.key, message.value, message.malformed_reason)


# -- time ---------------------------------------------------------------------------------------


def rebase_times(events: Iterable[Event], start_ms: int, origin_ms: int | None = None) -> Iterator[Event]:
    """Shift every event (and nothing else) by ``start_ms - origin_ms``, keeping the gaps.

    ``origin_ms`` defaults to the first event's ts; pass the earliest ts when the input is not
    in time order. To end a replay at now: ``start_ms = now_ms - (last_ts - first_ts)``.
    """
    offset: int | None = None if origin_ms is None else start_ms - origin_ms
    for event in events:
        if offset is None:
            offset = start_ms - event.ts_ms
        yield dataclasses.replace(event, ts_ms=event.ts_ms + offset)


def paced(items: Iterable[_T], ts_of: Callable[[_T], int], speed: float | None) -> Iterator[_T]:
    """Yield items when their recorded time comes: the gap from the first item's ``ts_of`` (ms)
    divided by ``speed`` (2.0 = twice as fast) is waited out on the wall clock; items whose time
    has passed (or that go back in time) come at once. ``speed=None``: no waiting.
    """
    if speed is None:
        yield from items
        return
    if speed <= 0:
        raise ValueError(f"speed must be positive (or None for as fast as possible), got {speed}")
    first_ts: int | None = None
    wall_start = 0.0
    for item in items:
        ts_ms = ts_of(item)
        if first_ts is None:
            first_ts, wall_start = ts_ms, time.monotonic()
        else:
            delay = wall_start + (ts_ms - first_ts) / 1000.0 / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield item
