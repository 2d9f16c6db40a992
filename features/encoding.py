"""Compact binary encoding of :class:`~features.state.ShopperState` (the table value).

Layout, version 1 (all integers little-endian; see ``docs/features.md``):

* ``u8`` format version (:data:`STATE_FORMAT_VERSION`);
* varint scalars: ``last_event_ms``, then ``first_event_ms``, ``last_view_ms``,
  ``last_cart_add_ms``, ``last_order_ms`` as *age* (``last_event_ms - t + 1``, 0 = never),
  ``events_lifetime``, ``orders_lifetime``, ``revenue_lifetime_cents``, the frozen session's
  start and last (ages) and event count, ``cart_compacted_adds``, the affinity anchor (age);
* strings: ``user_id``, then a table of every item id and category the state mentions,
  referred to by index below (varint length + UTF-8 each);
* sections, each a varint count ``n`` then (when ``n > 0``) its columns: the three bucket
  tiers (bucket offsets back from the watermark's bucket, then one column per slot), the
  recent events (ages, 64-bit id hashes, 32-bit item hashes, session-start flags), frozen
  session item hashes, cart lines (ages, item index, zigzag quantity, price cents, adds),
  history (item index, kind code, ages) and category affinity (category index, float64 score);
* ``u32`` CRC-32 of everything before it.

A column of unsigned integers is one byte giving its width (1, 2, 4 or 8; the smallest that
fits the column's largest value) followed by the packed values, so most columns cost one
byte per value.

Version rule: the first byte never changes meaning. A release that changes the layout bumps
:data:`STATE_FORMAT_VERSION`, adds a decoder for it to ``_DECODERS`` and keeps every older
decoder, so states written by an older release still load; encoding always writes the newest.
"""
from __future__ import annotations

import struct
import sys
import zlib
from array import array

from features.state import (
    CODE_KINDS, COARSE_BUCKET_MS, COARSE_STRIDE, COUNT_STRIDE, FINE_BUCKET_MS, HOUR_BUCKET_MS, KIND_CODES,
    SLOT_REVENUE_CENTS, ShopperState,
)

#: Version written by :func:`encode_state`.
STATE_FORMAT_VERSION = 1

_TYPECODE_OF_WIDTH = {1: "B", 2: "H", 4: "I", 8: "Q"}
_BIG_ENDIAN = sys.byteorder == "big"
assert all(array(code).itemsize == width for width, code in _TYPECODE_OF_WIDTH.items())
_CHECKSUM_BYTES = 4
_LAST_EVENT = struct.Struct("<Q")


class StateDecodeError(ValueError):
    """Stored state bytes that cannot be read: corrupt, truncated, or of an unknown version."""


# -- writing ------------------------------------------------------------------------------------

def _put_column(out: bytearray, values: list[int]) -> None:
    """Unsigned ints as one width byte plus packed values (``values`` must be non-empty)."""
    top = max(values)
    if top < 0x100:
        out.append(1)
        out += bytes(values)
        return
    column = array("H" if top < 0x1_0000 else "I" if top < 0x1_0000_0000 else "Q", values)
    if _BIG_ENDIAN:
        column.byteswap()
    out.append(column.itemsize)
    out += column.tobytes()


def _put_raw(out: bytearray, typecode: str, values: list) -> None:
    column = array(typecode, values)
    if _BIG_ENDIAN:
        column.byteswap()
    out += column.tobytes()


def _age(last_ms: int, ts_ms: int) -> int:
    """``ts_ms`` as its distance back from ``last_ms`` plus one; 0 stands for 0 (never)."""
    return last_ms - ts_ms + 1 if ts_ms else 0


def encode_state(state: ShopperState) -> bytes:
    """The state as compact bytes, format :data:`STATE_FORMAT_VERSION` (layout in the module doc)."""
    last = state.last_event_ms
    strings: dict[str, int] = {state.user_id: 0}
    for line in state.cart_lines:
        strings.setdefault(line[1], len(strings))
    for entry in state.history:
        strings.setdefault(entry[0], len(strings))
    for category in state.affinity_categories:
        strings.setdefault(category, len(strings))
    recent_ts, lines, history, categories = state.recent_ts, state.cart_lines, state.history, state.affinity_categories

    encoded = "".join(strings).encode()
    out = bytearray((STATE_FORMAT_VERSION,))
    out += _LAST_EVENT.pack(last)
    _put_column(out, [_age(last, state.first_event_ms), _age(last, state.last_view_ms),
                      _age(last, state.last_cart_add_ms), _age(last, state.last_order_ms),
                      _age(last, state.frozen_session_start_ms), _age(last, state.frozen_session_last_ms),
                      _age(last, state.affinity_anchor_ms), state.revenue_lifetime_cents])
    _put_column(out, [state.events_lifetime, state.orders_lifetime, state.frozen_session_events,
                      state.cart_compacted_adds, len(strings), len(encoded), len(state.fine_keys),
                      len(state.hour_keys), len(state.coarse_keys), len(recent_ts), len(state.frozen_session_items),
                      len(lines), len(history), len(categories)])
    _put_column(out, [len(text) for text in strings])
    out += encoded

    if state.fine_keys:
        head = last // FINE_BUCKET_MS
        _put_column(out, [head - key for key in state.fine_keys])
        _put_column(out, state.fine_counts)
    if state.hour_keys:
        head = last // HOUR_BUCKET_MS
        _put_column(out, [head - key for key in state.hour_keys])
        _put_column(out, state.hour_counts)
    if state.coarse_keys:
        head = last // COARSE_BUCKET_MS
        _put_column(out, [head - key for key in state.coarse_keys])
        values = state.coarse_values
        counts = values[:]
        counts[SLOT_REVENUE_CENTS::COARSE_STRIDE] = [0] * len(state.coarse_keys)
        _put_column(out, counts)
        _put_column(out, values[SLOT_REVENUE_CENTS::COARSE_STRIDE])
    if recent_ts:
        _put_column(out, [last - ts for ts in recent_ts])
        _put_raw(out, "Q", state.recent_ids)
        _put_column(out, state.recent_item_hashes)
        out += bytes(state.recent_starts)
    if state.frozen_session_items:
        _put_column(out, state.frozen_session_items)
    if lines:
        _put_column(out, [last - line[0] for line in lines])
        _put_column(out, [strings[line[1]] for line in lines])
        _put_column(out, [2 * line[2] if line[2] >= 0 else -2 * line[2] - 1 for line in lines])
        _put_column(out, [line[3] for line in lines])
        _put_column(out, [line[4] for line in lines])
    if history:
        _put_column(out, [strings[item_id] * 4 + KIND_CODES[kind] for item_id, kind, _ in history])
        _put_column(out, [last - entry[2] for entry in history])
    if categories:
        _put_column(out, [strings[category] for category in categories])
        _put_raw(out, "d", state.affinity_scores)

    out += (zlib.crc32(out) & 0xFFFF_FFFF).to_bytes(_CHECKSUM_BYTES, "little")
    return bytes(out)


# -- reading ------------------------------------------------------------------------------------

class _Reader:
    """Bounds-checked cursor over the payload (everything before the checksum)."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data = data
        self.pos = start
        self.end = end

    def take(self, size: int, what: str) -> bytes:
        pos = self.pos
        if size > self.end - pos:
            raise StateDecodeError(f"truncated state: {what} needs {size} bytes at offset {pos}, "
                                   f"only {self.end - pos} left")
        self.pos = pos + size
        return self.data[pos:pos + size]

    def column(self, n: int, what: str) -> list[int]:
        pos = self.pos
        if pos >= self.end:
            raise StateDecodeError(f"truncated state: {what} column is missing at offset {pos}")
        width = self.data[pos]
        typecode = _TYPECODE_OF_WIDTH.get(width)
        if typecode is None:
            raise StateDecodeError(f"corrupt state: {what} has column width {width} at offset {pos}; "
                                   "expected 1, 2, 4 or 8")
        self.pos = pos + 1
        raw = self.take(n * width, what)
        return list(raw) if width == 1 else _unpack(typecode, raw)

    def raw(self, typecode: str, n: int, what: str) -> list:
        return _unpack(typecode, self.take(n * array(typecode).itemsize, what))


def _unpack(typecode: str, raw: bytes) -> list:
    values = array(typecode)
    values.frombytes(raw)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


def _decode_v1(reader: _Reader) -> ShopperState:
    last = _LAST_EVENT.unpack(reader.take(_LAST_EVENT.size, "last_event_ms"))[0]
    (first_age, view_age, add_age, order_age, frozen_start_age, frozen_last_age, anchor_age,
     revenue) = reader.column(8, "times")
    for age in (first_age, view_age, add_age, order_age, frozen_start_age, frozen_last_age, anchor_age):
        if age > last + 1:
            raise StateDecodeError(f"corrupt state: a time lies {age - 1} ms before last_event_ms {last}")
    (events, orders, frozen_events, compacted_adds, n_strings, n_string_bytes, n_fine, n_hour, n_coarse, n_recent,
     n_frozen, n_cart, n_history, n_categories) = reader.column(14, "counts")
    limit = reader.end - reader.pos  # every element below takes at least one byte
    if max(n_strings, n_fine, n_hour, n_coarse, n_recent, n_frozen, n_cart, n_history, n_categories) > limit \
            or n_strings < 1:
        raise StateDecodeError(f"corrupt state: section counts do not fit in the {limit} bytes left")

    lengths = reader.column(n_strings, "string lengths")
    text = reader.take(n_string_bytes, "strings").decode()
    if sum(lengths) != len(text):
        raise StateDecodeError(f"corrupt state: string lengths add up to {sum(lengths)}, not {len(text)}")
    strings = []
    pos = 0
    for length in lengths:
        strings.append(text[pos:pos + length])
        pos += length

    state = ShopperState(strings[0])
    state.last_event_ms = last
    state.first_event_ms = last - first_age + 1 if first_age else 0
    state.last_view_ms = last - view_age + 1 if view_age else 0
    state.last_cart_add_ms = last - add_age + 1 if add_age else 0
    state.last_order_ms = last - order_age + 1 if order_age else 0
    state.events_lifetime, state.orders_lifetime, state.revenue_lifetime_cents = events, orders, revenue
    state.frozen_session_start_ms = last - frozen_start_age + 1 if frozen_start_age else 0
    state.frozen_session_last_ms = last - frozen_last_age + 1 if frozen_last_age else 0
    state.frozen_session_events = frozen_events
    state.cart_compacted_adds = compacted_adds
    state.affinity_anchor_ms = last - anchor_age + 1 if anchor_age else 0

    if n_fine:
        head = last // FINE_BUCKET_MS
        state.fine_keys = [head - offset for offset in reader.column(n_fine, "fine buckets")]
        state.fine_counts = reader.column(n_fine * COUNT_STRIDE, "fine counts")
    if n_hour:
        head = last // HOUR_BUCKET_MS
        state.hour_keys = [head - offset for offset in reader.column(n_hour, "hour buckets")]
        state.hour_counts = reader.column(n_hour * COUNT_STRIDE, "hour counts")
    if n_coarse:
        head = last // COARSE_BUCKET_MS
        state.coarse_keys = [head - offset for offset in reader.column(n_coarse, "coarse buckets")]
        values = reader.column(n_coarse * COARSE_STRIDE, "coarse counts")
        values[SLOT_REVENUE_CENTS::COARSE_STRIDE] = reader.column(n_coarse, "coarse revenue")
        state.coarse_values = values
    if n_recent:
        state.recent_ts = [last - age for age in reader.column(n_recent, "recent ages")]
        state.recent_ids = reader.raw("Q", n_recent, "recent id hashes")
        state.recent_item_hashes = reader.column(n_recent, "recent item hashes")
        state.recent_starts = list(reader.take(n_recent, "recent session starts"))
        if max(state.recent_starts) > 1:
            raise StateDecodeError("corrupt state: a recent session-start flag is not 0 or 1")
    if n_frozen:
        state.frozen_session_items = reader.column(n_frozen, "frozen session items")
    if n_cart:
        ages = reader.column(n_cart, "cart ages")
        items = reader.column(n_cart, "cart items")
        if max(items) >= n_strings:
            raise StateDecodeError(f"corrupt state: cart item index {max(items)} is outside the string table")
        quantities = [z >> 1 if not z & 1 else -(z >> 1) - 1 for z in reader.column(n_cart, "cart quantities")]
        state.cart_lines = list(zip([last - age for age in ages], [strings[i] for i in items], quantities,
                                    reader.column(n_cart, "cart prices"), reader.column(n_cart, "cart adds")))
    if n_history:
        codes = reader.column(n_history, "history items")
        if max(codes) >> 2 >= n_strings:
            raise StateDecodeError(f"corrupt state: history item index {max(codes) >> 2} is outside the string table")
        ages = reader.column(n_history, "history ages")
        state.history = [(strings[code >> 2], CODE_KINDS[code & 3], last - age) for code, age in zip(codes, ages)]
    if n_categories:
        indexes = reader.column(n_categories, "affinity categories")
        if max(indexes) >= n_strings:
            raise StateDecodeError(f"corrupt state: category index {max(indexes)} is outside the string table")
        state.affinity_categories = [strings[i] for i in indexes]
        state.affinity_scores = reader.raw("d", n_categories, "affinity scores")
    if reader.pos != reader.end:
        raise StateDecodeError(f"corrupt state: {reader.end - reader.pos} unexpected bytes after the last section")
    return state


#: Decoder of every format version this release reads; keep old ones when adding a version.
_DECODERS = {1: _decode_v1}


def decode_state(data: bytes) -> ShopperState:
    """Read bytes written by :func:`encode_state` of this or an older release.

    Raises:
        StateDecodeError: the bytes are truncated, corrupt (checksum or structure), or of a
            format version this release does not know. No other exception escapes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateDecodeError(f"state must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 1 + _CHECKSUM_BYTES:
        raise StateDecodeError(f"truncated state: {len(data)} bytes, fewer than the {1 + _CHECKSUM_BYTES} "
                               "of version byte and checksum")
    version = data[0]
    decoder = _DECODERS.get(version)
    if decoder is None:
        raise StateDecodeError(f"unknown state format version {version}; this release reads versions "
                               f"{sorted(_DECODERS)} (was it written by a newer release?)")
    end = len(data) - _CHECKSUM_BYTES
    stored = int.from_bytes(data[end:], "little")
    if zlib.crc32(data[:end]) & 0xFFFF_FFFF != stored:
        raise StateDecodeError(f"corrupt state: checksum mismatch over {len(data)} bytes (truncated or altered)")
    try:
        return decoder(_Reader(data, 1, end))
    except StateDecodeError:
        raise
    except Exception as exc:  # a structural bug must surface as a decode error, never crash the worker
        raise StateDecodeError(f"corrupt state: {type(exc).__name__}: {exc}") from exc
