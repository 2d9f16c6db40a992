"""Compact binary encoding of :class:`~features.state.ShopperState` (the table value).

Layout, version 2 (little-endian; ``docs/features.md`` has the full table):

====================  ==========================================================================
part                  content
====================  ==========================================================================
``u8``                format version (:data:`STATE_FORMAT_VERSION`)
``u64``               ``last_event_ms`` (the watermark); every other time is an *age*
                      ``last_event_ms - t`` (``+ 1`` for scalars, where 0 means never)
column *times*        ages of first event, last view, last cart add, last order, frozen session
                      start and last, affinity anchor; ``revenue_lifetime_cents``
column *counts*       events, orders, frozen session events, compacted cart adds, then the
                      length of every section below
column *narrow*       string lengths (characters); fine / hour tier (bucket offsets back from
                      the watermark's bucket, then 4 counts each); coarse tier (offsets, then 6
                      slots each with revenue zeroed); recent ``item index * 4 + kind code``;
                      frozen session item indexes; history ``item index * 4 + kind code``; cart
                      item index, zigzag quantity, adds; affinity category index; recent
                      category index (the empty string where an event has no affinity weight)
UTF-8                 the string table: user id, then every item id and category mentioned
column *wide*         coarse revenue cents; recent ``age * 2 + session start``; history ages;
                      cart ages; cart prices (cents)
``u64[n_recent]``     event id hashes (dedup)
``f64[n_categories]`` affinity scores
``u32``               CRC-32 of everything before it
====================  ==========================================================================

A *column* is one byte giving the width of its values (1, 2, 4 or 8 bytes: the smallest that
fits its largest value) followed by the packed unsigned values. Grouping values into four
columns by expected magnitude keeps most values at one byte (narrow) or four (wide) while the
decoder stays a handful of C-level unpacks. Every list is stored in the state's canonical
order, so equal states (however their events arrived) encode to equal bytes.

Version 1 (until the order-independence change) differs only in the narrow column: recent
events stored a bare item index (no kind code) and no category. A version-1 blob still
decodes: its recent events get no category (their affinity is already in the stored
accumulator, so features read exactly as before) and, where they have a cart line, their cart
kind back (other kinds read as 0); ties are put in canonical order. Once those events fall
behind the grace period the state is exactly what version 2 would hold.

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
    COARSE_BUCKET_MS,
    COARSE_STRIDE,
    COUNT_STRIDE,
    FINE_BUCKET_MS,
    HOUR_BUCKET_MS,
    SLOT_CART_ADD,
    SLOT_CART_REMOVE,
    SLOT_REVENUE_CENTS,
    ShopperState,
)

#: Version written by :func:`encode_state`.
STATE_FORMAT_VERSION = 2

_TYPECODE_OF_WIDTH = {1: "B", 2: "H", 4: "I", 8: "Q"}
_BIG_ENDIAN = sys.byteorder == "big"
assert all(array(code).itemsize == width for width, code in _TYPECODE_OF_WIDTH.items())
_CHECKSUM_BYTES = 4
_LAST_EVENT = struct.Struct("<Q")
_N_TIMES = 8
_N_COUNTS = 14


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


def encode_state(state: ShopperState) -> bytes:
    """The state as compact bytes, format :data:`STATE_FORMAT_VERSION` (layout in the module doc)."""
    last = state.last_event_ms
    lines, history_ts, categories = state.cart_lines, state.history_ts, state.affinity_categories
    recent_ts, recent_items, frozen_items = state.recent_ts, state.recent_item_ids, state.frozen_session_items
    coarse_keys = state.coarse_keys
    names = list(
        dict.fromkeys(
            [
                state.user_id,
                *state.history_items,
                *recent_items,
                *frozen_items,
                *[line[1] for line in lines],
                *categories,
                *state.recent_categories,
            ]
        )
    )
    index = dict(zip(names, range(len(names)), strict=True))
    encoded = "".join(names).encode()

    out = bytearray((STATE_FORMAT_VERSION,))
    out += _LAST_EVENT.pack(last)
    _put_column(
        out,
        [
            last - t + 1 if t else 0
            for t in (
                state.first_event_ms,
                state.last_view_ms,
                state.last_cart_add_ms,
                state.last_order_ms,
                state.frozen_session_start_ms,
                state.frozen_session_last_ms,
                state.affinity_anchor_ms,
            )
        ]
        + [state.revenue_lifetime_cents],
    )
    _put_column(
        out,
        [
            state.events_lifetime,
            state.orders_lifetime,
            state.frozen_session_events,
            state.cart_compacted_adds,
            len(names),
            len(encoded),
            len(state.fine_keys),
            len(state.hour_keys),
            len(coarse_keys),
            len(recent_ts),
            len(frozen_items),
            len(lines),
            len(history_ts),
            len(categories),
        ],
    )

    head = last // FINE_BUCKET_MS
    narrow = [len(name) for name in names]
    narrow += [head - key for key in state.fine_keys]
    narrow += state.fine_counts
    head = last // HOUR_BUCKET_MS
    narrow += [head - key for key in state.hour_keys]
    narrow += state.hour_counts
    head = last // COARSE_BUCKET_MS
    narrow += [head - key for key in coarse_keys]
    coarse = state.coarse_values[:]
    revenue = coarse[SLOT_REVENUE_CENTS::COARSE_STRIDE]
    coarse[SLOT_REVENUE_CENTS::COARSE_STRIDE] = [0] * len(coarse_keys)
    narrow += coarse
    narrow += [i * 4 + code for i, code in zip(map(index.__getitem__, recent_items), state.recent_codes, strict=True)]
    narrow += map(index.__getitem__, frozen_items)
    narrow += [
        i * 4 + code for i, code in zip(map(index.__getitem__, state.history_items), state.history_codes, strict=True)
    ]
    narrow += [index[line[1]] for line in lines]
    narrow += [2 * line[2] if line[2] >= 0 else -2 * line[2] - 1 for line in lines]
    narrow += [line[4] for line in lines]
    narrow += map(index.__getitem__, categories)
    narrow += map(index.__getitem__, state.recent_categories)
    _put_column(out, narrow)
    out += encoded

    wide = revenue
    wide += [(last - ts) * 2 + starts for ts, starts in zip(recent_ts, state.recent_starts, strict=True)]
    wide += [last - ts for ts in history_ts]
    wide += [last - line[0] for line in lines]
    wide += [line[3] for line in lines]
    if wide:
        _put_column(out, wide)
    if recent_ts:
        _put_raw(out, "Q", state.recent_ids)
    if categories:
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
            raise StateDecodeError(
                f"truncated state: {what} needs {size} bytes at offset {pos}, only {self.end - pos} left"
            )
        self.pos = pos + size
        return self.data[pos : pos + size]

    def column(self, n: int, what: str) -> list[int]:
        pos = self.pos
        if pos >= self.end:
            raise StateDecodeError(f"truncated state: the {what} column is missing at offset {pos}")
        width = self.data[pos]
        typecode = _TYPECODE_OF_WIDTH.get(width)
        if typecode is None:
            raise StateDecodeError(
                f"corrupt state: the {what} column has width {width} at offset {pos}; expected 1, 2, 4 or 8"
            )
        self.pos = pos + 1
        raw = self.take(n * width, f"the {what} column")
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
    return _canonical_from_v1(_decode(reader, 1))


def _decode_v2(reader: _Reader) -> ShopperState:
    return _decode(reader, 2)


def _decode(reader: _Reader, version: int) -> ShopperState:
    last = _LAST_EVENT.unpack(reader.take(_LAST_EVENT.size, "last_event_ms"))[0]
    times = reader.column(_N_TIMES, "times")
    if max(times[:-1]) > last + 1:
        raise StateDecodeError(f"corrupt state: a time lies {max(times[:-1]) - 1} ms before last_event_ms {last}")
    first, view, add, order, frozen_start, frozen_last, anchor = [last - age + 1 if age else 0 for age in times[:-1]]
    (
        events,
        orders,
        frozen_events,
        compacted_adds,
        n_strings,
        n_string_bytes,
        n_fine,
        n_hour,
        n_coarse,
        n_recent,
        n_frozen,
        n_cart,
        n_history,
        n_categories,
    ) = reader.column(_N_COUNTS, "counts")
    if n_strings < 1 or n_string_bytes > reader.end - reader.pos:
        raise StateDecodeError(f"corrupt state: string table of {n_strings} strings in {n_string_bytes} bytes")
    n_narrow = (
        n_strings
        + (n_fine + n_hour) * (1 + COUNT_STRIDE)
        + n_coarse * (1 + COARSE_STRIDE)
        + n_recent
        + n_frozen
        + n_history
        + 3 * n_cart
        + n_categories
        + (n_recent if version >= 2 else 0)
    )
    n_wide = n_coarse + n_recent + n_history + 2 * n_cart
    if n_narrow + n_wide > reader.end - reader.pos:
        raise StateDecodeError(f"corrupt state: section counts need more than the {reader.end - reader.pos} bytes left")
    narrow = reader.column(n_narrow, "narrow")
    text = reader.take(n_string_bytes, "the string table").decode()
    wide = reader.column(n_wide, "wide") if n_wide else []
    ids = reader.raw("Q", n_recent, "event id hashes") if n_recent else []
    scores = reader.raw("d", n_categories, "affinity scores") if n_categories else []
    if reader.pos != reader.end:
        raise StateDecodeError(f"corrupt state: {reader.end - reader.pos} unexpected bytes after the last section")

    lengths = narrow[:n_strings]
    if sum(lengths) != len(text):
        raise StateDecodeError(f"corrupt state: string lengths add up to {sum(lengths)}, not {len(text)}")
    strings = []
    pos = 0
    for length in lengths:
        strings.append(text[pos : pos + length])
        pos += length
    at = n_strings

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return narrow[at - n : at]

    def text_of(indexes: list[int], what: str) -> list[str]:
        if indexes and max(indexes) >= n_strings:
            raise StateDecodeError(f"corrupt state: a {what} index ({max(indexes)}) is outside the string table")
        return [strings[i] for i in indexes]

    state = ShopperState(strings[0])
    state.last_event_ms = last
    state.first_event_ms, state.last_view_ms, state.last_cart_add_ms, state.last_order_ms = first, view, add, order
    state.frozen_session_start_ms, state.frozen_session_last_ms = frozen_start, frozen_last
    state.affinity_anchor_ms = anchor
    state.revenue_lifetime_cents = times[-1]
    state.events_lifetime, state.orders_lifetime = events, orders
    state.frozen_session_events, state.cart_compacted_adds = frozen_events, compacted_adds

    head = last // FINE_BUCKET_MS
    state.fine_keys = [head - offset for offset in take(n_fine)]
    state.fine_counts = take(n_fine * COUNT_STRIDE)
    head = last // HOUR_BUCKET_MS
    state.hour_keys = [head - offset for offset in take(n_hour)]
    state.hour_counts = take(n_hour * COUNT_STRIDE)
    head = last // COARSE_BUCKET_MS
    state.coarse_keys = [head - offset for offset in take(n_coarse)]
    coarse = take(n_coarse * COARSE_STRIDE)
    coarse[SLOT_REVENUE_CENTS::COARSE_STRIDE] = wide[:n_coarse]
    state.coarse_values = coarse
    recent = take(n_recent)
    if version >= 2:
        state.recent_item_ids = text_of([value >> 2 for value in recent], "session item")
        state.recent_codes = [value & 3 for value in recent]
    else:
        state.recent_item_ids = text_of(recent, "session item")
        state.recent_codes = [0] * n_recent
    state.frozen_session_items = text_of(take(n_frozen), "session item")
    history = take(n_history)
    state.history_items = text_of([value >> 2 for value in history], "history item")
    state.history_codes = [value & 3 for value in history]
    cart_items = text_of(take(n_cart), "cart item")
    quantities = [z >> 1 if not z & 1 else -(z >> 1) - 1 for z in take(n_cart)]
    cart_adds = take(n_cart)
    state.affinity_categories = text_of(take(n_categories), "category")
    state.recent_categories = text_of(take(n_recent), "category") if version >= 2 else [""] * n_recent

    at = n_coarse
    recent = wide[at : at + n_recent]
    state.recent_ts = [last - (value >> 1) for value in recent]
    state.recent_starts = [value & 1 for value in recent]
    at += n_recent
    state.history_ts = [last - age for age in wide[at : at + n_history]]
    at += n_history
    cart_ts = [last - age for age in wide[at : at + n_cart]]
    cart_prices = wide[at + n_cart : at + 2 * n_cart]
    state.cart_lines = list(zip(cart_ts, cart_items, quantities, cart_prices, cart_adds, strict=True))
    state.recent_ids = ids
    state.affinity_scores = scores
    return state


def _canonical_from_v1(state: ShopperState) -> ShopperState:
    """A version-1 state in today's canonical order: v1 kept events with equal times in arrival
    order (recent events, history) and cart lines in arrival order. Recent events get no
    category (v1 already folded them into the affinity accumulator); a recent event with a cart
    line gets its cart kind back (so its line is merged when it freezes), any other kind 0."""
    if state.recent_ts:
        rows = sorted(zip(state.recent_ts, state.recent_ids, state.recent_item_ids, state.recent_starts, strict=True))
        columns = (list(column) for column in zip(*rows, strict=True))
        recent_ts, state.recent_ids, state.recent_item_ids, starts = columns
        for i in range(len(recent_ts) - 1, 0, -1):  # a session start belongs to the first of equal times
            if recent_ts[i] == recent_ts[i - 1]:
                starts[i - 1] |= starts[i]
                starts[i] = 0
        state.recent_ts, state.recent_starts = recent_ts, starts
        cart_codes = {line[:2]: SLOT_CART_ADD if line[4] else SLOT_CART_REMOVE for line in state.cart_lines}
        state.recent_codes = [cart_codes.get(key, 0) for key in zip(recent_ts, state.recent_item_ids, strict=True)]
        state.recent_categories = [""] * len(recent_ts)
    if state.history_ts:
        history_rows = sorted(zip(state.history_ts, state.history_codes, state.history_items, strict=True))
        columns = (list(column) for column in zip(*history_rows, strict=True))
        state.history_ts, state.history_codes, state.history_items = columns
    state.cart_lines.sort()
    return state


#: Decoder of every format version this release reads; keep old ones when adding a version.
_DECODERS = {1: _decode_v1, 2: _decode_v2}


def _checked_version(data: bytes) -> int:
    """The format version of intact state bytes; StateDecodeError for anything else."""
    if len(data) < 1 + _CHECKSUM_BYTES:
        raise StateDecodeError(
            f"truncated state: {len(data)} bytes, fewer than the {1 + _CHECKSUM_BYTES} of version byte and checksum"
        )
    version = data[0]
    if version not in _DECODERS:
        raise StateDecodeError(
            f"unknown state format version {version}; this release reads versions "
            f"{sorted(_DECODERS)} (was it written by a newer release?)"
        )
    end = len(data) - _CHECKSUM_BYTES
    stored = int.from_bytes(data[end:], "little")
    if zlib.crc32(data[:end]) & 0xFFFF_FFFF != stored:
        raise StateDecodeError(f"corrupt state: checksum mismatch over {len(data)} bytes (truncated or altered)")
    return version


def last_event_ms_of(data: bytes) -> int:
    """A stored state's latest event time (epoch ms) without decoding the rest: every format
    version starts with it after the version byte. Raises StateDecodeError like :func:`decode_state`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateDecodeError(f"state must be bytes, got {type(data).__name__}")
    _checked_version(bytes(data))
    if len(data) < 1 + _LAST_EVENT.size + _CHECKSUM_BYTES:
        raise StateDecodeError(f"truncated state: {len(data)} bytes, too short for its latest event time")
    return _LAST_EVENT.unpack_from(data, 1)[0]


def decode_state(data: bytes) -> ShopperState:
    """Read bytes written by :func:`encode_state` of this or an older release.

    Raises:
        StateDecodeError: the bytes are truncated, corrupt (checksum or structure), or of a
            format version this release does not know. No other exception escapes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateDecodeError(f"state must be bytes, got {type(data).__name__}")
    data = bytes(data)
    decoder = _DECODERS[_checked_version(data)]
    try:
        return decoder(_Reader(data, 1, len(data) - _CHECKSUM_BYTES))
    except StateDecodeError:
        raise
    except Exception as exc:  # a structural bug must surface as a decode error, never crash the worker
        raise StateDecodeError(f"corrupt state: {type(exc).__name__}: {exc}") from exc
