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
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from aiokafka.partitioner import murmur2

from features.encoding import StateDecodeError, decode_state
from features.spec import FeatureSpec
from features.state import RAW_FEATURE_NAMES, ShopperState
from models.scoring import BatchScorer
from streams.config import Settings
from streams.worker.alerts import NEVER, AlertPolicy, AlertState
from streams.worker.envelope import EnvelopeDecodeError, Stored, offsets_section

if TYPE_CHECKING:  # pipeline imports metrics, which imports this module
    from streams.worker.pipeline import BatchOutcome

log = logging.getLogger(__name__)

#: Path prefix of the lookup; the user id follows, percent-encoded.
LOOKUP_PATH = "/shoppers/"
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


class KeptOutputs:
    """The last scores and recommendations messages queued for each shopper, up to ``capacity`` shoppers.

    Why keep them: the answer's scores and recommendations are then exactly what the output
    topics carry for the shopper's current state, and cost no model call. (The next-item model
    alone took 15-20 ms for a single shopper here, measured: a co-occurrence model's sparse
    product costs as much for one shopper as for hundreds.) Each entry is tagged with the
    applied-offsets part of the stored value it was scored from
    (:func:`streams.worker.envelope.offsets_section`), which changes with every applied event: an
    entry whose tag differs from the stored value the lookup reads (a newer event, a partition
    that moved away and back) is not used, and the view computes the answer instead. The least
    recently scored shoppers are dropped first.

    Written by the batch loop (:meth:`remember`, through :class:`streams.worker.checkpoint.Checkpoint`),
    read by lookup threads (:meth:`get`): one dict whose single operations the GIL keeps atomic,
    and entries that are immutable tuples of the published bytes (no copies).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[str, tuple[bytes, bytes, bytes | None]] = {}

    def remember(self, outcome: BatchOutcome) -> None:
        """Keep the outputs of ``outcome`` (called when they are queued for publication)."""
        if not self.capacity:
            return
        written = {write.key: write.value for write in outcome.writes}
        entries = self._entries
        for key, value in written.items():
            if value is None:  # deleted (evicted, erased): nothing of theirs is kept
                entries.pop(key.decode(errors="replace"), None)
        for scored in outcome.scored:
            value = written.get(scored.key)
            if value is not None:
                tag = offsets_section(value)
            elif scored.key in written:
                continue
            else:  # a silent re-score that left the stored value as it was: same state, newer outputs
                kept = entries.get(scored.user_id)
                if kept is None:
                    continue
                tag = kept[0]
            entries.pop(scored.user_id, None)  # re-inserted last: the dict's order is the eviction order
            entries[scored.user_id] = (tag, scored.result, scored.recommendation)
        while len(entries) > self.capacity:
            del entries[next(iter(entries))]

    def get(self, user_id: str, stored_value: bytes) -> tuple[bytes, bytes | None] | None:
        """The kept (scores, recommendations) messages scored from ``stored_value``, or None."""
        kept = self._entries.get(user_id)
        if kept is None or kept[0] != offsets_section(stored_value):
            return None
        return kept[1], kept[2]

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
        scorer: a scorer used by lookups only (see the module docstring for why not the batch loop's).
        alert_policy: thresholds reported next to the alert state.
        public_id: the id the output topics carry for a user id (the pseudonym when one is configured).
        kept: the outputs the batch loop kept.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        scorer: BatchScorer,
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

    def document(self, user_id: str, raw: bytes, now_ms: int | None = None) -> dict[str, object]:
        """The shopper as JSON-ready data, features as of ``now_ms`` (default: the wall clock).

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
        kept = self.kept.get(user_id, raw)
        latest = self._published(*kept) if kept is not None else self._computed(state, wall_ms)
        return {
            "user_id": user_id,
            "public_id": self.public_id(user_id),
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
    def _published(result: bytes, recommendation: bytes | None) -> dict[str, object]:
        """The answer's score part from the messages published for this state."""
        scores = json.loads(result)
        items = json.loads(recommendation)["items"] if recommendation is not None else []
        return {
            "source": "published",
            **{name: scores[name] for name in _SCORE_FIELDS if name in scores},
            "recommendations": items,
        }

    def _computed(self, state: ShopperState, wall_ms: int) -> dict[str, object]:
        """The answer's score part computed now, as the batch loop scores an event: as of the last event."""
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
            raw = self.read(partition, key)
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
            document = self.view.document(user_id, raw)
        except (EnvelopeDecodeError, StateDecodeError, ValueError) as exc:
            log.error("the stored value of shopper %r could not be read for a lookup: %s", user_id, exc)
            return error_reply(
                500,
                "unreadable_state",
                f"the stored value of this shopper could not be read ({exc}); its next event resets it",
            )
        return Reply(200, _to_json({**document, "partition": partition, "served_by": self.self_url}).encode())


def same_url(url: str) -> str:
    """A URL as compared between workers: no trailing slash (yarl and people add or drop one)."""
    return str(url).rstrip("/")
