"""Shopper lookup: ``GET /shoppers/{user_id}`` on every worker, answered by the worker that owns the shopper.

A shopper's state lives in one partition of the ``shopper_state`` table, and only the worker that
owns that partition (its active, not a standby) has it open and current. Every worker answers
the lookup:

* **Which partition.** :func:`key_partition` hashes the user id exactly as every producer of the
  input topics does (murmur2, the Java client's and librdkafka's ``murmur2_random``; the inputs
  are co-partitioned with the table, so the shopper's events and state share the number).
* **Which worker.** Faust's partition assignor already publishes each member's URL (its
  ``canonical_url``, set from ``SHOPPULSE_ADVERTISED_URL``) in the consumer group's assignment
  metadata, and hands every member the table's partition -> URL map after each rebalance; no extra
  topic or registry is needed (:meth:`streams.worker.faust_seam.BatchingApp.partition_owners`).
* **Forward, not redirect.** A worker that does not own the partition forwards the request to
  the owner and relays its answer. A client then needs one address (the Service, a load balancer,
  any worker) and one round trip; a 307 would make every client follow redirects and reach every
  pod's address itself, which a client outside the cluster cannot. A forwarded request carries
  :data:`FORWARDED_HEADER`; one that arrives at a worker that is not the owner either (ownership
  moved in a rebalance) gets 503 with ``Retry-After`` instead of travelling on.

The answer is built from the stored value (state, alert state: always current) plus the scores and
recommendations last published for that very state, which the worker keeps in memory for its
most recently scored shoppers (:class:`KeptOutputs`): a lookup then reads RocksDB and runs no
model. For a shopper not kept (after a restart or a rebalance, or beyond
``SHOPPULSE_LOOKUP_KEEP_SHOPPERS``), :class:`ShopperView` computes them with its own
:class:`models.scoring.BatchScorer`, as of the shopper's last event as the batch loop does. Only
lookup threads use that scorer, under one lock: the batch loop's scorer is never touched from
another thread, and a hot reload (which replaces a scorer's models between two of its calls)
happens in the lookup's scorer only between two lookups. It loads the same registry, so both
serve the same versions within ``reload_interval_s`` of a promotion; the answer names them.
Nothing here is a second store: the kept outputs are a cache of published messages, checked
against the stored state on every read, and gone with the process.

**In the HTTP server process.** With ``SHOPPULSE_HTTP_PROCESS`` (the default) the worker's HTTP
server is a child process (:mod:`streams.worker.http_front`), and a local lookup answered by the
worker's threads would wait for the batch loop's GIL. So the batch loop also feeds that process
each queued batch's stored values and kept outputs, and its ownership (the frames at the end of
this module); the process answers what it holds (:class:`LookupMirror`: the same
:class:`ShopperView`, over its own copy) and relays the rest to :class:`ShopperLookup` here.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol
from urllib.parse import quote, unquote, urlsplit

from aiokafka.partitioner import murmur2

from features.encoding import StateDecodeError, decode_state
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import RAW_FEATURE_NAMES, ShopperState
from streams.config import Settings
from streams.worker.alerts import NEVER, AlertPolicy, AlertState
from streams.worker.envelope import EnvelopeDecodeError, Stored, offsets_section
from streams.worker.http_front import MIRRORED_PATH, encode_frame

if TYPE_CHECKING:  # torch stays out of the HTTP server process, which imports this module
    from models.scoring import BatchScorer

log = logging.getLogger(__name__)

#: Path prefix of the lookup; the user id follows, percent-encoded.
LOOKUP_PATH = MIRRORED_PATH
#: Set on a forwarded request to the URL of the worker that forwarded it (the loop guard).
FORWARDED_HEADER = "X-ShopPulse-Forwarded-By"
#: Fields of a published scores message the answer passes on (``variant`` once the challenger split lands).
_SCORE_FIELDS = ("scores", "model_versions", "scored_at", "trigger_event_id", "variant", "score_seq")
JSON_TYPE = "application/json"

#: How long a worker waits for the owner's answer to a forwarded lookup.
FORWARD_TIMEOUT_S = 2.0
#: Bind addresses that name no host another worker could reach.
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")

_to_json = json.JSONEncoder(separators=(",", ":")).encode


def advertised_url(settings: Settings, port: int) -> str:
    """The URL other workers reach this one's lookup at: ``SHOPPULSE_ADVERTISED_URL``, else
    ``http://SHOPPULSE_METRICS_HOST:port``, with the host's FQDN for a wildcard bind (in a
    Kubernetes StatefulSet with a headless Service, the pod's stable DNS name)."""
    if settings.advertised_url:
        return same_url(settings.advertised_url)
    host = socket.getfqdn() if settings.metrics_host in _WILDCARD_HOSTS else settings.metrics_host
    return f"http://{host}:{port}"


def key_partition(key: bytes, partitions: int) -> int:
    """The partition a producer puts ``key`` in: murmur2 of the key, positive, modulo the count.

    The formula of Kafka's Java client, librdkafka's ``murmur2_random`` (what every ShopPulse
    producer is configured with, :data:`streams.kafka.clients.PARTITIONER`) and aiokafka's default.
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, JSON body bytes, extra headers; ``served_here`` False when relayed from the owner."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON_TYPE
    served_here: bool = True


def error_reply(status: int, error: str, message: str, retry_after_s: int | None = None, **fields: object) -> Reply:
    """A JSON error body: a stable ``error`` code for programs, a ``message`` for people."""
    headers = (("Retry-After", str(retry_after_s)),) if retry_after_s is not None else ()
    return Reply(status, _to_json({"error": error, "message": message, **fields}).encode(), headers)


class PartitionNotOpen(LookupError):
    """The partition's store is not open on this worker (revoked, or not assigned yet)."""


class QueuedWrite(Protocol):
    """A value queued for the shopper table (:class:`streams.worker.pipeline.StateWrite`); None: deleted."""

    @property
    def partition(self) -> int: ...
    @property
    def key(self) -> bytes: ...
    @property
    def value(self) -> bytes | None: ...


class QueuedScore(Protocol):
    """A scored shopper's messages (:class:`streams.worker.pipeline.ScoredShopper`)."""

    @property
    def user_id(self) -> str: ...
    @property
    def key(self) -> bytes: ...
    @property
    def result(self) -> bytes: ...
    @property
    def recommendation(self) -> bytes | None: ...


class QueuedOutcome(Protocol):
    """What a queued batch wrote and scored (:class:`streams.worker.pipeline.BatchOutcome`)."""

    @property
    def writes(self) -> Sequence[QueuedWrite]: ...
    @property
    def scored(self) -> Sequence[QueuedScore]: ...


#: One kept version of a shopper's outputs: (tag of the stored value, scores message, recommendations message).
_Kept = tuple[bytes, bytes, bytes | None]


class KeptOutputs:
    """The last scores and recommendations messages queued for each shopper, up to ``capacity`` shoppers.

    Why keep them: the answer's scores and recommendations are then exactly what the output
    topics carry for the shopper's current state, and cost no model call. (The next-item model
    alone took 15-20 ms for a single shopper here, measured: a co-occurrence model's sparse
    product costs as much for one shopper as for hundreds.) Each entry is tagged with the
    applied-offsets part of the stored value it was scored from
    (:func:`streams.worker.envelope.offsets_section`), which changes with every applied event: an
    entry whose tag differs from the stored value the lookup reads (a partition that moved away and
    back) is not used, and the view computes the answer instead. A value stored without a score
    (late events only: the offsets advance, the state does not) re-tags the entry. The least
    recently scored shoppers are dropped first.

    Written by the batch loop (:meth:`remember`, through :class:`streams.worker.checkpoint.Checkpoint`,
    just before the batch's values are stored), read by lookup threads (:meth:`get`): one dict whose
    single operations the GIL keeps atomic, and entries that are immutable tuples of the published
    bytes (no copies). Until the values of a batch are stored, a lookup may still read a shopper's
    previous value, so each entry of the latest batch also holds the version before it; the next
    call drops those (its batch was stored by then: ``Checkpoint.queue`` stores synchronously).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[str, tuple[_Kept, _Kept | None]] = {}
        self._with_previous: list[str] = []  # shoppers whose entry still holds its previous version

    def remember(self, outcome: QueuedOutcome) -> None:
        """Keep the outputs of ``outcome``; call before its values are stored."""
        if not self.capacity:
            return
        entries = self._entries
        for user_id in self._with_previous:
            entry = entries.get(user_id)
            if entry is not None and entry[1] is not None:
                entries[user_id] = (entry[0], None)
        self._with_previous = []
        written = {write.key: write.value for write in outcome.writes}
        for key, value in written.items():
            if value is None:  # deleted (evicted, erased): nothing of theirs is kept
                entries.pop(key.decode(errors="replace"), None)
        for scored in outcome.scored:
            value = written.get(scored.key)
            before = entries.pop(scored.user_id, None)  # re-inserted last: the dict's order is the eviction order
            if value is not None:
                tag = offsets_section(value)
            elif scored.key in written or before is None:
                continue
            else:  # a silent re-score that left the stored value as it was: same state, newer outputs
                tag = before[0][0]
            previous = before[0] if before is not None and before[0][0] != tag else None
            entries[scored.user_id] = ((tag, scored.result, scored.recommendation), previous)
            if previous is not None:
                self._with_previous.append(scored.user_id)
            written.pop(scored.key, None)
        # What is left was stored without a score: a batch of late events only, which advance the
        # applied offsets but leave the state, so the outputs kept for it stay the shopper's latest.
        for key, value in written.items():
            user_id = key.decode(errors="replace")
            before = entries.get(user_id)
            if value is not None and before is not None:
                entries[user_id] = ((offsets_section(value), *before[0][1:]), before[0])
                self._with_previous.append(user_id)
        while len(entries) > self.capacity:
            del entries[next(iter(entries))]

    def clear(self) -> None:
        """Forget everything: at a rebalance, since a partition that moves away and back holds values
        another worker wrote meanwhile, and a batch of late events only would re-tag outputs kept from
        before as theirs."""
        self._entries.clear()
        self._with_previous = []

    def get(self, user_id: str, stored_value: bytes) -> tuple[bytes, bytes | None] | None:
        """The kept (scores, recommendations) messages scored from ``stored_value``, or None."""
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        tag = offsets_section(stored_value)
        for kept in entry:
            if kept is not None and kept[0] == tag:
                return kept[1], kept[2]
        return None

    def __len__(self) -> int:
        return len(self._entries)


class ShopperView:
    """Turns one stored value into the lookup's JSON document.

    Features are as of now. Scores and recommendations are the last ones published for the
    shopper's current state when :class:`KeptOutputs` has them (``"source": "published"``), else
    computed on request as the worker computes them for an event: as of the shopper's last event
    (``"source": "computed"``; equal to what the last event's outputs said, unless a model was
    promoted since or a silent-shopper re-score published later ones).

    Args:
        spec: the feature vector (names and order) the models read.
        scorer: a scorer used by lookups only (see the module docstring for why not the batch loop's);
            None where only kept outputs are answered (:class:`LookupMirror`).
        alert_policy: thresholds reported next to the alert state.
        public_id: the id the output topics carry for a user id (the pseudonym when one is configured),
            for computed answers; a published answer takes the one its scores message carries.
        kept: the outputs the batch loop kept.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        scorer: BatchScorer | None,
        alert_policy: AlertPolicy,
        public_id: Callable[[str], str],
        kept: KeptOutputs,
    ) -> None:
        self.spec = spec
        self.scorer = scorer
        self.alert_policy = alert_policy
        self.public_id = public_id
        self.kept = kept
        self._raw_columns = [(name, RAW_FEATURE_NAMES.index(name)) for name in spec.names]
        self._lock = threading.Lock()

    def document(
        self, user_id: str, raw: bytes, kept: tuple[bytes, bytes | None] | None, now_ms: int | None = None
    ) -> dict[str, object]:
        """The shopper as JSON-ready data, features as of ``now_ms`` (default: the wall clock);
        ``kept`` is what :attr:`kept` holds for ``raw`` (read right after it), None to compute.

        Raises :class:`EnvelopeDecodeError`, :class:`StateDecodeError` or ValueError on a stored
        value this release cannot read.
        """
        stored = Stored.decode(raw)
        if stored.state is None:
            raise StateDecodeError("the stored value holds no state")
        state = decode_state(stored.state)
        alert = AlertState.decode(stored.alert)
        wall_ms = int(time.time() * 1000) if now_ms is None else now_ms
        # Never before the last event: an event up to SHOPPULSE_MAX_FUTURE_SKEW_MS ahead of the
        # clock is accepted, and features of a time before it would count it as not yet happened.
        as_of_ms = max(wall_ms, state.last_event_ms)
        raw_values = state.raw_features(as_of_ms)
        if kept is not None:
            public_id, latest = self._published(*kept)
        else:
            public_id, latest = self.public_id(user_id), self._computed(state, wall_ms)
        return {
            "user_id": user_id,
            "public_id": public_id,
            "as_of": as_of_ms,
            "last_event_ts": state.last_event_ms,
            "features": {name: _finite(raw_values[column]) for name, column in self._raw_columns},
            "feature_spec": self.spec.hash,
            **latest,
            "alert": {
                "armed": alert.armed,
                "last_alert_ts": None if alert.last_alert_ms == NEVER else alert.last_alert_ms,
                "last_risk": round(alert.last_risk, 6),
                "high": self.alert_policy.high,
                "low": self.alert_policy.low,
            },
        }

    @staticmethod
    def _published(result: bytes, recommendation: bytes | None) -> tuple[str, dict[str, object]]:
        """The public id and the answer's score part from the messages published for this state."""
        scores = json.loads(result)
        items = json.loads(recommendation)["items"] if recommendation is not None else []
        return scores["user_id"], {
            "source": "published",
            **{name: scores[name] for name in _SCORE_FIELDS if name in scores},
            "recommendations": items,
        }

    def _computed(self, state: ShopperState, wall_ms: int) -> dict[str, object]:
        """The answer's score part computed now, as the batch loop scores an event: as of the last event."""
        if self.scorer is None:
            raise LookupError("this view answers kept outputs only")
        features = self.spec.matrix((state,), state.last_event_ms)
        with self._lock:
            self.scorer.refresh()
            (scored,) = self.scorer.score((state,), features)
            versions = self.scorer.model_versions
        return {
            "source": "computed",
            "scores": {name: round(value, 6) for name, value in scored.scores.items()},
            "model_versions": versions,
            "scored_at": wall_ms,
            "trigger_event_id": None,
            "recommendations": [{"item_id": item, "score": round(score, 6)} for item, score in scored.recommendations],
        }


def _finite(value: float) -> float | None:
    """JSON has no infinity: a duration to something that never happened (``inf``) becomes null."""
    return value if math.isfinite(value) else None


def forward(owner_url: str, target: str, via: str, timeout_s: float) -> Reply:
    """Send the lookup ``target`` (path and query) to ``owner_url`` and relay its answer."""
    parts = urlsplit(owner_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout_s)
    try:
        connection.request("GET", target, headers={FORWARDED_HEADER: via, "Accept": JSON_TYPE})
        answer = connection.getresponse()
        body = answer.read()
        kept = tuple((name, value) for name, value in answer.getheaders() if name.lower() == "retry-after")
        return Reply(answer.status, body, kept, answer.getheader("Content-Type", JSON_TYPE), served_here=False)
    except (OSError, http.client.HTTPException) as exc:
        log.warning("forwarding a shopper lookup to %s failed: %s", owner_url, exc)
        unreachable = error_reply(
            502,
            "owner_unreachable",
            f"the worker that owns this shopper ({owner_url}) did not answer ({exc}); "
            "if it is restarting, its partitions move to another worker within a rebalance",
            retry_after_s=1,
            owner=owner_url,
        )
        return dataclasses.replace(unreachable, served_here=False)
    finally:
        connection.close()


class ShopperLookup:
    """Answers ``GET /shoppers/{user_id}`` locally or through the owning worker.

    Args:
        view: builds the document from a stored value.
        partitions: the table's partition count (that of the input topics).
        self_url: this worker's advertised URL, as the assignor publishes it.
        owners: partition -> URL of the worker that owns it now (empty while unknown).
        read: ``(partition, key)`` -> the stored value or None; raises :class:`PartitionNotOpen`.
        ready: whether the tables are recovered and no rebalance is under way.
        forwarder: sends a request on to another worker (:func:`forward` in the worker).
    """

    def __init__(
        self,
        view: ShopperView,
        partitions: int,
        self_url: str,
        owners: Callable[[], Mapping[int, str]],
        read: Callable[[int, bytes], bytes | None],
        ready: Callable[[], bool],
        forwarder: Callable[[str, str, str], Reply],
    ) -> None:
        self.view = view
        self.partitions = partitions
        self.self_url = same_url(self_url)
        self.owners = owners
        self.read = read
        self.ready = ready
        self.forwarder = forwarder

    def mirror_greeting(self) -> dict[str, object]:
        """What the HTTP server process needs to answer lookups itself (:class:`LookupMirror`)."""
        policy = self.view.alert_policy
        return {
            "spec_hash": self.view.spec.hash,
            "alert_high": float(policy.high),
            "alert_low": float(policy.low),
            "alert_cooldown_ms": int(policy.cooldown_ms),
            "capacity": self.view.kept.capacity,
            "self_url": self.self_url,
        }

    def owned_partitions(self) -> set[int]:
        """The partitions this worker owns, by the same map :meth:`handle` routes by."""
        return {partition for partition, url in self.owners().items() if same_url(url) == self.self_url}

    def handle(self, target: str, forwarded_by: str | None) -> Reply:
        """Answer the request for ``target`` (path and query); ``forwarded_by`` is :data:`FORWARDED_HEADER`."""
        user_id = unquote(urlsplit(target).path[len(LOOKUP_PATH) :])
        if not user_id:
            return error_reply(400, "missing_user_id", f"ask for GET {LOOKUP_PATH}USER_ID (percent-encoded)")
        key = user_id.encode()
        partition = key_partition(key, self.partitions)
        owner = self.owners().get(partition)
        if owner is not None and same_url(owner) == self.self_url:
            return self._local(user_id, key, partition)
        if owner is None:
            return error_reply(
                503,
                "owner_unknown",
                f"no worker owns partition {partition} right now (the group is starting or rebalancing); retry",
                retry_after_s=1,
                partition=partition,
            )
        if forwarded_by is not None:
            return error_reply(
                503,
                "owner_moved",
                f"{forwarded_by} forwarded this lookup here, but partition {partition} belongs to {owner} "
                "(a rebalance is moving it); retry",
                retry_after_s=1,
                partition=partition,
            )
        return self.forwarder(owner, f"{LOOKUP_PATH}{quote(user_id, safe='')}", self.self_url)

    def _local(self, user_id: str, key: bytes, partition: int) -> Reply:
        if not self.ready():
            return error_reply(
                503, "not_ready", "this worker is recovering its tables or rebalancing; retry", retry_after_s=1
            )
        try:
            raw, kept = self._read(user_id, key, partition)
        except PartitionNotOpen:
            return error_reply(
                503, "owner_moved", f"partition {partition} is being handed over; retry", retry_after_s=1
            )
        if raw is None:
            return error_reply(
                404,
                "unknown_shopper",
                f"no shopper {user_id!r}: no event of theirs was accepted, or they were idle past "
                "SHOPPULSE_RETENTION_MS and evicted. The lookup takes the real user id, not the pseudonym",
                user_id=user_id,
            )
        try:
            document = self.view.document(user_id, raw, kept)
        except (EnvelopeDecodeError, StateDecodeError, ValueError) as exc:
            log.error("the stored value of shopper %r could not be read for a lookup: %s", user_id, exc)
            return error_reply(
                500,
                "unreadable_state",
                f"the stored value of this shopper could not be read ({exc}); its next event resets it",
            )
        return found_reply(document, partition, self.self_url)

    def _read(self, user_id: str, key: bytes, partition: int) -> tuple[bytes | None, tuple[bytes, bytes | None] | None]:
        """The stored value and the outputs kept for it, read back to back, and once more when none
        are kept: the batch loop may have queued and stored a newer value between the two reads."""
        raw = kept = None
        for _ in range(2):
            raw = self.read(partition, key)
            if raw is None:
                return None, None
            kept = self.view.kept.get(user_id, raw)
            if kept is not None:
                break
        return raw, kept


def found_reply(document: dict[str, object], partition: int, served_by: str) -> Reply:
    """The 200 answer: the shopper's document, the partition and the worker that answered."""
    return Reply(200, _to_json({**document, "partition": partition, "served_by": served_by}).encode())


def same_url(url: str) -> str:
    """A URL as compared between workers: no trailing slash (yarl and people add or drop one)."""
    return str(url).rstrip("/")


# --- Answering from the HTTP server process (streams.worker.http_front) -------------------------
#
# The worker feeds its HTTP server process, over a socket pair, what each queued batch wrote and
# scored (:func:`queued_frames`) and which partitions it owns (:func:`ownership_frame`); the process
# keeps the latest stored value of its most recently scored shoppers and their kept outputs
# (:class:`LookupMirror`) and answers a local lookup it finds there without the worker's GIL. What it
# does not find (a shopper not scored since the process started, another worker's, a rebalance under
# way) it relays to the worker, which answers as above.

#: A fed shopper: partition (-1: unchanged), key length, value length, scores length, recommendations
#: length; each -1 when absent (value -2: deleted).
_FED = struct.Struct(">iiiii")
_ABSENT, _DELETED = -1, -2
#: Shoppers per feed frame: the process's feed thread holds its GIL while it takes in one frame,
#: and between two frames (in ``recv``) lets the request threads have it.
FED_PER_FRAME = 64


class FedShopper(NamedTuple):
    """What one queued batch did to one shopper: a new stored value (or ``deleted``), and the scores
    and recommendations messages when it was scored."""

    partition: int
    user_id: str
    value: bytes | None = None
    deleted: bool = False
    result: bytes | None = None
    recommendation: bytes | None = None


def fed_shoppers(outcome: QueuedOutcome) -> list[FedShopper]:
    """The shoppers a queued batch stored, deleted or scored, each once."""
    fed: dict[bytes, FedShopper] = {}
    for write in outcome.writes:
        user_id = write.key.decode(errors="replace")
        fed[write.key] = FedShopper(write.partition, user_id, write.value, deleted=write.value is None)
    for scored in outcome.scored:
        written = fed.get(scored.key)
        if written is not None:
            fed[scored.key] = written._replace(result=scored.result, recommendation=scored.recommendation)
        else:  # a silent re-score that left the stored value (and the partition the mirror holds) as it was
            fed[scored.key] = FedShopper(-1, scored.user_id, result=scored.result, recommendation=scored.recommendation)
    return list(fed.values())


def encode_fed(shoppers: Sequence[FedShopper]) -> bytes:
    """One feed frame's body."""
    parts = []
    for shopper in shoppers:
        key = shopper.user_id.encode()
        value, result, recommendation = shopper.value, shopper.result, shopper.recommendation
        value_size = _DELETED if shopper.deleted else _ABSENT if value is None else len(value)
        result_size = _ABSENT if result is None else len(result)
        recommendation_size = _ABSENT if recommendation is None else len(recommendation)
        parts.append(_FED.pack(shopper.partition, len(key), value_size, result_size, recommendation_size))
        parts.append(key)
        parts += [part for part in (value, result, recommendation) if part is not None]
    return b"".join(parts)


def decode_fed(body: bytes) -> list[FedShopper]:
    """The inverse of :func:`encode_fed`."""
    view = memoryview(body)
    shoppers: list[FedShopper] = []
    at = 0
    while at < len(body):
        partition, key_size, value_size, result_size, recommendation_size = _FED.unpack_from(view, at)
        at += _FED.size
        user_id = str(view[at : at + key_size], "utf-8", "replace")
        at += key_size
        fields: list[bytes | None] = []
        for size in (value_size, result_size, recommendation_size):
            if size < 0:
                fields.append(None)
            else:
                fields.append(bytes(view[at : at + size]))
                at += size
        value, result, recommendation = fields
        shoppers.append(FedShopper(partition, user_id, value, value_size == _DELETED, result, recommendation))
    return shoppers


class LookupMirror:
    """The HTTP server process's copy of what a local lookup needs, and the answers it gives from it.

    Holds, for the ``capacity`` shoppers most recently scored, the stored value, its partition and
    the scores and recommendations messages published for it. Value and messages arrive in the
    same fed record, so an entry is replaced whole and needs no tag check (the worker's
    :class:`KeptOutputs` does, because it reads values from RocksDB); a shopper stored but not
    scored since the process started has no entry. An answer is given only for a partition this
    worker owns while it is ready; everything is dropped at a rebalance (a partition that moved away
    and back holds values another worker wrote meanwhile).

    Written by one thread (the feed), read by the server's threads: single dict operations on
    immutable entries. Kept light per fed shopper: while the feed thread holds this process's GIL,
    a request waits.
    """

    def __init__(self, view: ShopperView, self_url: str, capacity: int) -> None:
        self.view = view
        self.self_url = self_url
        self.capacity = capacity
        # user id -> (partition, stored value, scores message, recommendations message)
        self._entries: dict[str, tuple[int, bytes, bytes, bytes | None]] = {}
        self._owned: frozenset[int] = frozenset()
        self._ready = False

    def apply(self, shoppers: Iterable[FedShopper]) -> None:
        """Take in what a queued batch did to some shoppers (before the worker stores it): deleted,
        stored and scored (the value and its messages), scored only (a silent re-score: the value
        stays), or stored only (late events: the offsets moved, the state and so the messages stay)."""
        entries = self._entries
        for shopper in shoppers:
            before = entries.pop(shopper.user_id, None)  # re-inserted last: the dict's order is the eviction order
            if shopper.deleted:
                continue
            if shopper.value is not None:
                if shopper.result is not None:
                    entries[shopper.user_id] = (
                        shopper.partition,
                        shopper.value,
                        shopper.result,
                        shopper.recommendation,
                    )
                elif before is not None:
                    entries[shopper.user_id] = (shopper.partition, shopper.value, before[2], before[3])
            elif before is not None and shopper.result is not None:
                entries[shopper.user_id] = (before[0], before[1], shopper.result, shopper.recommendation)
        while len(entries) > self.capacity:
            del entries[next(iter(entries))]

    def own(self, partitions: Iterable[int], ready: bool) -> None:
        """The partitions this worker owns now and whether it is ready (tables recovered, no rebalance)."""
        self._owned = frozenset(partitions)
        self._ready = ready

    def rebalancing(self) -> None:
        """A rebalance began: answer nothing from here, and forget everything."""
        self._ready = False
        self._owned = frozenset()
        self._entries.clear()

    def take(self, head: Mapping[str, object], body: bytes) -> None:
        """Apply one frame the worker fed: :func:`queued_frames`, :func:`ownership_frame`, :data:`REBALANCING_FRAME`."""
        kind = head["kind"]
        if kind == "queued":
            self.apply(decode_fed(body))
        elif kind == "ownership":
            partitions, ready = head["partitions"], head["ready"]
            assert isinstance(partitions, list)
            self.own(partitions, bool(ready))
        elif kind == "rebalancing":
            self.rebalancing()
        else:
            raise ValueError(f"unknown frame kind {kind!r}")

    @classmethod
    def from_greeting(cls, head: Mapping[str, object]) -> LookupMirror:
        """The mirror the worker's greeting (:meth:`ShopperLookup.mirror_greeting`) describes; ValueError
        when this process's feature spec is not the worker's (then every lookup is relayed)."""
        if head["spec_hash"] != DEFAULT_FEATURE_SPEC.hash:
            raise ValueError(f"feature spec {head['spec_hash']} is not this release's {DEFAULT_FEATURE_SPEC.hash}")
        high, low, cooldown_ms, capacity, self_url = (
            head["alert_high"],
            head["alert_low"],
            head["alert_cooldown_ms"],
            head["capacity"],
            head["self_url"],
        )
        assert isinstance(high, float) and isinstance(low, float) and isinstance(cooldown_ms, int)
        assert isinstance(capacity, int) and isinstance(self_url, str)
        policy = AlertPolicy(high, low, cooldown_ms)
        view = ShopperView(
            DEFAULT_FEATURE_SPEC, None, policy, _no_public_id, KeptOutputs(0)
        )  # the mirror keeps its own
        return cls(view, self_url, capacity)

    def answer(self, target: str) -> Reply | None:
        """The answer to ``GET target`` when it can be given here, else None (relay it to the worker)."""
        if not self._ready:
            return None
        user_id = unquote(urlsplit(target).path[len(LOOKUP_PATH) :])
        entry = self._entries.get(user_id)
        if entry is None or entry[0] not in self._owned:
            return None
        partition, raw, result, recommendation = entry
        try:
            document = self.view.document(user_id, raw, (result, recommendation))
        except (EnvelopeDecodeError, StateDecodeError, ValueError, KeyError):
            return None  # the worker answers it, and logs why
        return found_reply(document, partition, self.self_url)

    def __len__(self) -> int:
        return len(self._entries)


def _no_public_id(user_id: str) -> str:
    raise LookupError("the HTTP server process answers published outputs only, which carry the public id")


def queued_frames(outcome: QueuedOutcome) -> bytes:
    """The frames that feed a queued batch to the HTTP server process, :data:`FED_PER_FRAME` shoppers each."""
    shoppers = fed_shoppers(outcome)
    return b"".join(
        encode_frame({"kind": "queued"}, encode_fed(shoppers[start : start + FED_PER_FRAME]))
        for start in range(0, len(shoppers), FED_PER_FRAME)
    )


def ownership_frame(partitions: Iterable[int], ready: bool) -> bytes:
    """The frame that tells the HTTP server process which partitions the worker owns and whether it is ready."""
    return encode_frame({"kind": "ownership", "partitions": sorted(partitions), "ready": ready})


#: The frame that tells the HTTP server process a rebalance began.
REBALANCING_FRAME = encode_frame({"kind": "rebalancing"})
