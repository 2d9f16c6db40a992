"""What the worker stores per shopper: its state, its churn alert state, its live evaluation memory
and the input offsets already applied to them, as one value.

Why one value: the state, the alert state and "which input events are in them" must change
together, or a crash splits them. A RocksDB ``put`` of one key is atomic, and so is one
changelog record (a record is never half delivered, even when a crash delivers only a prefix of
a flush's records). Keeping the offsets inside the shopper's own value is therefore the only
layout in which no crash can leave new states with old offsets or the reverse
(:mod:`streams.worker.checkpoint` explains the alternatives and why they fail).

Layout (little-endian):

==================  ==========================================================================
part                content
==================  ==========================================================================
``u8``              :data:`ENVELOPE_MAGIC` (never a state format version: those count from 1)
``u8``              envelope version (:data:`ENVELOPE_VERSION`)
``u8``              number of offsets, then per offset: ``u8`` topic name length, the UTF-8
                    topic name, ``u32`` partition, ``i64`` the highest offset applied from
                    that input partition
``u8``              alert state length (0: none), then the alert state (:mod:`streams.worker.alerts`)
``u16``             (version 2) live memory length (0: none), then the memory (:mod:`models.outcomes`)
rest                the state, exactly as :func:`features.encoding.encode_state` wrote it
==================  ==========================================================================

Topic names and partitions, not positions, key the offsets: after a topic rename or a change
of partition count the new partitions' offsets start again at 0, and a producer with the wrong
partitioner can put one shopper's events of one topic in two partitions; an offset recorded for
another partition must not skip any of them. (Co-partitioned inputs give a shopper one
partition, so a value holds at most three offsets.) A value written before envelopes existed
(a bare state) still reads: no offsets, no alert state; a version 1 value (before the live
evaluation) reads with no memory, and is written back as version 2.

The memory is in the same value for the reason the alert state is: a memory restored without the
events that resolved it (or the reverse) would count an outcome twice or never. Topic names stay
per offset: an index into the worker's input topics would need the index-to-name mapping in the
value to survive a rename, which is the names again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

#: First byte of an enveloped value; bare states start with their format version (1, 2, ...).
ENVELOPE_MAGIC = 0xE5
ENVELOPE_VERSION = 2
#: Envelope versions this release reads (1: no live memory).
READABLE_VERSIONS = (1, 2)
_HEAD = struct.Struct("<BBB")
_MEMORY_LENGTH = struct.Struct("<H")
_OFFSET = struct.Struct("<Iq")  # partition, offset


class EnvelopeDecodeError(ValueError):
    """Stored bytes that are not an envelope this release can read."""


@dataclass(slots=True)
class Stored:
    """One shopper's stored value.

    Attributes:
        state: the encoded :class:`features.state.ShopperState` (None: no state yet).
        alert: the encoded :class:`streams.worker.alerts.AlertState` (None: never scored for churn).
        memory: the encoded :class:`models.outcomes.LiveMemory` (None: never scored).
        offsets: ``(input topic, partition)`` -> highest offset of that partition whose event
            is applied to ``state``.
    """

    state: bytes | None = None
    alert: bytes | None = None
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    memory: bytes | None = None

    def applied(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the event at ``offset`` of ``topic[partition]`` is already in this state (the skip rule)."""
        return offset <= self.offsets.get((topic, partition), -1)

    def encode(self) -> bytes:
        if self.state is None:
            raise ValueError("an envelope needs a state")
        alert = self.alert or b""
        out = bytearray(_HEAD.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, len(self.offsets)))
        for (topic, partition), offset in sorted(self.offsets.items()):  # sorted: equal contents, equal bytes
            name = topic.encode()
            out.append(len(name))
            out += name
            out += _OFFSET.pack(partition, offset)
        out.append(len(alert))
        out += alert
        memory = self.memory or b""
        out += _MEMORY_LENGTH.pack(len(memory))  # struct.error past 64 KiB: the memory is bounded far below
        out += memory
        out += self.state
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | None) -> Stored:
        """The stored value; a bare (pre-envelope) state has no offsets and no alert state.

        Raises :class:`EnvelopeDecodeError` on bytes that are neither; the state and alert
        bytes inside are checked by their own decoders.
        """
        if data is None:
            return cls()
        if not data or data[0] != ENVELOPE_MAGIC:
            return cls(state=bytes(data))
        try:
            _, version, n_offsets = _HEAD.unpack_from(data, 0)
            if version not in READABLE_VERSIONS:
                raise EnvelopeDecodeError(f"envelope version {version}; this release reads {READABLE_VERSIONS}")
            at = _HEAD.size
            offsets: dict[tuple[str, int], int] = {}
            for _ in range(n_offsets):
                length = data[at]
                topic = bytes(data[at + 1 : at + 1 + length]).decode()
                at += 1 + length
                partition, offset = _OFFSET.unpack_from(data, at)
                offsets[(topic, partition)] = offset
                at += _OFFSET.size
            length = data[at]
            alert = bytes(data[at + 1 : at + 1 + length]) or None
            at += 1 + length
            memory, memory_length = None, 0
            if version >= 2:
                (memory_length,) = _MEMORY_LENGTH.unpack_from(data, at)
                at += _MEMORY_LENGTH.size
                memory = bytes(data[at : at + memory_length]) or None
                at += memory_length
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            raise EnvelopeDecodeError(f"truncated or corrupt envelope of {len(data)} bytes: {exc}") from None
        if at > len(data) or (alert is not None and len(alert) != length):
            raise EnvelopeDecodeError(f"truncated envelope: {len(data)} bytes")
        return cls(state=bytes(data[at:]), alert=alert, memory=memory, offsets=offsets)


def offsets_section(data: bytes) -> bytes:
    """The applied-offsets part of a stored value, as stored (empty for a bare state).

    It changes with every event applied to the state, so it tells two versions of one shopper's
    state apart without decoding either (:class:`streams.worker.lookup.KeptOutputs`).
    """
    if not data or data[0] != ENVELOPE_MAGIC or len(data) < _HEAD.size:
        return b""
    at = _HEAD.size
    for _ in range(data[2]):
        if at >= len(data):
            break
        at += 1 + data[at] + _OFFSET.size
    return bytes(data[_HEAD.size : at])
