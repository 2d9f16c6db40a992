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

import sys
import zlib
from array import array

from features.state import CODE_KINDS, COARSE_BUCKET_MS, COARSE_STRIDE, COUNT_STRIDE, FINE_BUCKET_MS, \
    HOUR_BUCKET_MS, KIND_CODES, ShopperState

#: Version written by :func:`encode_state`.
STATE_FORMAT_VERSION = 1

_TYPECODE_OF_WIDTH = {1: "B", 2: "H", 4: "I", 8: "Q"}
_BIG_ENDIAN = sys.byteorder == "big"
assert all(array(code).itemsize == width for width, code in _TYPECODE_OF_WIDTH.items())
_CHECKSUM_BYTES = 4


class StateDecodeError(ValueError):
    """Stored state bytes that cannot be read: corrupt, truncated, or of an unknown version."""


# -- writing ------------------------------------------------------------------------------------

def _put_uvarint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


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


def _put_string(out: bytearray, text: str) -> None:
    data = text.encode()
    _put_uvarint(out, len(data))
    out += data


def _age(last_ms: int, ts_ms: int) -> int:
    """``ts_ms`` as a non-negative distance back from ``last_ms``, plus one; 0 stands for 0 (never)."""
    return last_ms - ts_ms + 1 if ts_ms else 0


def _put_tier(out: bytearray, keys: list[int], values: list[int], stride: int, head: int) -> None:
    _put_uvarint(out, len(keys))
    if keys:
        _put_column(out, [head - key for key in keys])
        for slot in range(stride):
            _put_column(out, values[slot::stride])


def encode_state(state: ShopperState) -> bytes:
    """The state as compact bytes, format :data:`STATE_FORMAT_VERSION` (layout in the module doc)."""
    last = state.last_event_ms
    out = bytearray((STATE_FORMAT_VERSION,))
    for value in (last, _age(last, state.first_event_ms), _age(last, state.last_view_ms),
                  _age(last, state.last_cart_add_ms), _age(last, state.last_order_ms),
                  state.events_lifetime, state.orders_lifetime, state.revenue_lifetime_cents,
                  _age(last, state.frozen_session_start_ms), _age(last, state.frozen_session_last_ms),
                  state.frozen_session_events, state.cart_compacted_adds, _age(last, state.affinity_anchor_ms)):
        _put_uvarint(out, value)
    _put_string(out, state.user_id)

    strings: dict[str, int] = {}
    for line in state.cart_lines:
        strings.setdefault(line[1], len(strings))
    for entry in state.history:
        strings.setdefault(entry[0], len(strings))
    for category in state.affinity_categories:
        strings.setdefault(category, len(strings))
    _put_uvarint(out, len(strings))
    for text in strings:
        _put_string(out, text)

    _put_tier(out, state.fine_keys, state.fine_counts, COUNT_STRIDE, last // FINE_BUCKET_MS)
    _put_tier(out, state.hour_keys, state.hour_counts, COUNT_STRIDE, last // HOUR_BUCKET_MS)
    _put_tier(out, state.coarse_keys, state.coarse_values, COARSE_STRIDE, last // COARSE_BUCKET_MS)

    _put_uvarint(out, len(state.recent_ts))
    if state.recent_ts:
        _put_column(out, [last - ts for ts in state.recent_ts])
        ids = array("Q", state.recent_ids)
        if _BIG_ENDIAN:
            ids.byteswap()
        out += ids.tobytes()
        _put_column(out, state.recent_item_hashes)
        out += bytes(state.recent_starts)

    _put_uvarint(out, len(state.frozen_session_items))
    if state.frozen_session_items:
        _put_column(out, state.frozen_session_items)

    lines = state.cart_lines
    _put_uvarint(out, len(lines))
    if lines:
        _put_column(out, [last - line[0] for line in lines])
        _put_column(out, [strings[line[1]] for line in lines])
        _put_column(out, [2 * line[2] if line[2] >= 0 else -2 * line[2] - 1 for line in lines])
        _put_column(out, [line[3] for line in lines])
        _put_column(out, [line[4] for line in lines])

    history = state.history
    _put_uvarint(out, len(history))
    if history:
        _put_column(out, [strings[entry[0]] for entry in history])
        out += bytes([KIND_CODES[entry[1]] for entry in history])
        _put_column(out, [last - entry[2] for entry in history])

    _put_uvarint(out, len(state.affinity_categories))
    if state.affinity_categories:
        _put_column(out, [strings[category] for category in state.affinity_categories])
        scores = array("d", state.affinity_scores)
        if _BIG_ENDIAN:
            scores.byteswap()
        out += scores.tobytes()

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

    def _take(self, size: int, what: str) -> bytes:
        pos = self.pos
        if size > self.end - pos:
            raise StateDecodeError(f"truncated state: {what} needs {size} bytes at offset {pos}, "
                                   f"only {self.end - pos} left")
        self.pos = pos + size
        return self.data[pos:pos + size]

    def uvarint(self, what: str) -> int:
        data, pos, end = self.data, self.pos, self.end
        value = shift = 0
        while True:
            if pos >= end:
                raise StateDecodeError(f"truncated state: {what} (varint) runs past the end at offset {pos}")
            if shift > 63:
                raise StateDecodeError(f"corrupt state: {what} (varint) is longer than 64 bits at offset {pos}")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return value
            shift += 7

    def count(self, what: str) -> int:
        """A section length; every element takes at least one byte, which bounds it."""
        n = self.uvarint(what)
        if n > self.end - self.pos:
            raise StateDecodeError(f"corrupt state: {what} count {n} exceeds the {self.end - self.pos} bytes left")
        return n

    def column(self, n: int, what: str) -> list[int]:
        width = self._take(1, f"{what} width")[0]
        typecode = _TYPECODE_OF_WIDTH.get(width)
        if typecode is None:
            raise StateDecodeError(f"corrupt state: {what} has column width {width}; expected 1, 2, 4 or 8")
        raw = self._take(n * width, what)
        if width == 1:
            return list(raw)
        return _unpack(typecode, raw)

    def raw(self, typecode: str, n: int, what: str) -> list:
        return _unpack(typecode, self._take(n * array(typecode).itemsize, what))

    def string(self, what: str) -> str:
        data = self._take(self.count(what), what)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise StateDecodeError(f"corrupt state: {what} is not UTF-8 ({exc.reason})") from None


def _unpack(typecode: str, raw: bytes) -> list:
    values = array(typecode)
    values.frombytes(raw)
    if _BIG_ENDIAN:
        values.byteswap()
    return values.tolist()


def _from_age(last_ms: int, age: int, what: str) -> int:
    if age > last_ms + 1:
        raise StateDecodeError(f"corrupt state: {what} age {age} lies before the epoch")
    return last_ms - age + 1 if age else 0


def _read_tier(reader: _Reader, stride: int, head: int, what: str) -> tuple[list[int], list[int]]:
    n = reader.count(what)
    if not n:
        return [], []
    keys = [head - offset for offset in reader.column(n, f"{what} buckets")]
    values = [0] * (n * stride)
    for slot in range(stride):
        values[slot::stride] = reader.column(n, f"{what} slot {slot}")
    return keys, values


_V1_SCALARS = ("first_event_ms", "last_view_ms", "last_cart_add_ms", "last_order_ms", "events_lifetime",
               "orders_lifetime", "revenue_lifetime_cents", "frozen session start", "frozen session last",
               "frozen session events", "cart_compacted_adds", "affinity anchor")


def _decode_v1(reader: _Reader) -> ShopperState:
    last = reader.uvarint("last_event_ms")
    (first_age, view_age, add_age, order_age, events, orders, revenue, frozen_start_age, frozen_last_age,
     frozen_events, compacted_adds, anchor_age) = (reader.uvarint(name) for name in _V1_SCALARS)
    state = ShopperState(reader.string("user_id"))
    state.last_event_ms = last
    state.first_event_ms = _from_age(last, first_age, "first_event_ms")
    state.last_view_ms = _from_age(last, view_age, "last_view_ms")
    state.last_cart_add_ms = _from_age(last, add_age, "last_cart_add_ms")
    state.last_order_ms = _from_age(last, order_age, "last_order_ms")
    state.events_lifetime, state.orders_lifetime, state.revenue_lifetime_cents = events, orders, revenue
    state.frozen_session_start_ms = _from_age(last, frozen_start_age, "frozen session start")
    state.frozen_session_last_ms = _from_age(last, frozen_last_age, "frozen session last")
    state.frozen_session_events = frozen_events
    state.cart_compacted_adds = compacted_adds
    state.affinity_anchor_ms = _from_age(last, anchor_age, "affinity anchor")

    strings = [reader.string("string table entry") for _ in range(reader.count("string table"))]

    def text(index: int) -> str:
        if index >= len(strings):
            raise StateDecodeError(f"corrupt state: string index {index} is outside the table of {len(strings)}")
        return strings[index]

    state.fine_keys, state.fine_counts = _read_tier(reader, COUNT_STRIDE, last // FINE_BUCKET_MS, "fine tier")
    state.hour_keys, state.hour_counts = _read_tier(reader, COUNT_STRIDE, last // HOUR_BUCKET_MS, "hour tier")
    state.coarse_keys, state.coarse_values = _read_tier(reader, COARSE_STRIDE, last // COARSE_BUCKET_MS, "coarse tier")

    n = reader.count("recent events")
    if n:
        state.recent_ts = [last - age for age in reader.column(n, "recent ages")]
        state.recent_ids = reader.raw("Q", n, "recent id hashes")
        state.recent_item_hashes = reader.column(n, "recent item hashes")
        state.recent_starts = list(reader._take(n, "recent session starts"))
        if max(state.recent_starts) > 1:
            raise StateDecodeError("corrupt state: a recent session-start flag is not 0 or 1")

    n = reader.count("frozen session items")
    if n:
        state.frozen_session_items = reader.column(n, "frozen session items")

    n = reader.count("cart lines")
    if n:
        ages = reader.column(n, "cart ages")
        items = [text(i) for i in reader.column(n, "cart items")]
        quantities = [z >> 1 if not z & 1 else -(z >> 1) - 1 for z in reader.column(n, "cart quantities")]
        prices = reader.column(n, "cart prices")
        adds = reader.column(n, "cart adds")
        state.cart_lines = [(last - age, item, quantity, price, add)
                            for age, item, quantity, price, add in zip(ages, items, quantities, prices, adds)]

    n = reader.count("history")
    if n:
        items = [text(i) for i in reader.column(n, "history items")]
        codes = reader._take(n, "history kinds")
        if max(codes) >= len(CODE_KINDS):
            raise StateDecodeError(f"corrupt state: history kind code {max(codes)} is unknown")
        ages = reader.column(n, "history ages")
        state.history = [(item, CODE_KINDS[code], last - age) for item, code, age in zip(items, codes, ages)]

    n = reader.count("affinity categories")
    if n:
        state.affinity_categories = [text(i) for i in reader.column(n, "affinity categories")]
        state.affinity_scores = reader.raw("d", n, "affinity scores")
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
