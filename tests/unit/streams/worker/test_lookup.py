"""The shopper lookup: which partition, which worker, what the answer holds, and forwarding over real HTTP."""

from __future__ import annotations

import ctypes
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest

from features.encoding import encode_state
from features.events import DEFAULT_LIMITS
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import RAW_FEATURE_NAMES, ShopperState, StateConfig
from models.scoring import BatchScorer
from streams.config import Settings
from streams.kafka.broker import free_port
from streams.sim.generator import GeneratorConfig, ShopSimulator
from streams.worker.alerts import AlertPolicy, AlertState
from streams.worker.envelope import Stored
from streams.worker.http_front import FrameReader
from streams.worker.lookup import (
    FED_PER_FRAME,
    FORWARDED_HEADER,
    REBALANCING_FRAME,
    KeptOutputs,
    LookupMirror,
    PartitionNotOpen,
    Reply,
    ShopperLookup,
    ShopperView,
    advertised_url,
    decode_fed,
    error_reply,
    fed_shoppers,
    forward,
    key_partition,
    ownership_frame,
    queued_frames,
)
from streams.worker.metrics import HealthState, MetricsServer, WorkerMetrics
from streams.worker.pipeline import BatchOutcome, BatchProcessor, InputMessage, ScoredShopper, StateWrite

PARTITIONS = 4
POLICY = AlertPolicy(0.7, 0.5, 1000)


def test_key_partition_is_the_java_clients_murmur2():
    # Kafka's own test vectors (clients UtilsTest.testMurmur2): the Java client, librdkafka's
    # murmur2_random and every ShopPulse producer partition by this hash.
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for key, signed in vectors.items():
        assert key_partition(key, 2**31 - 1) == (signed & 0x7FFFFFFF) % (2**31 - 1), key
        assert key_partition(key, 12) == (ctypes.c_uint32(signed).value & 0x7FFFFFFF) % 12


def states(n: int) -> dict[str, ShopperState]:
    """Real shopper states, from simulated events applied as the worker applies them."""
    built: dict[str, ShopperState] = {}
    config = StateConfig()
    for event in ShopSimulator(GeneratorConfig(seed=3, n_shoppers=n, n_items=50)).events(limit=40 * n):
        built.setdefault(event.user_id, ShopperState.new(event.user_id)).update(event, config)
    return built


def stored_value(state: ShopperState, alert: AlertState | None = None) -> bytes:
    return Stored(encode_state(state), alert.encode() if alert else None, {("t", 0): 7}).encode()


@pytest.fixture(scope="module")
def shoppers() -> dict[str, ShopperState]:
    return states(30)


def processor(tmp_path, pseudonym_key: bytes = b"") -> BatchProcessor:
    """The worker's own batch logic (its scorer serves the registry at ``tmp_path``)."""
    kinds = {"pv": "page_view", "cart": "cart", "orders": "order"}
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path)
    return BatchProcessor(
        kinds, StateConfig(), DEFAULT_FEATURE_SPEC, scorer, DEFAULT_LIMITS, WorkerMetrics(), pseudonym_key=pseudonym_key
    )


def view(tmp_path, pseudonym_key: bytes = b"", kept: KeptOutputs | None = None) -> ShopperView:
    return ShopperView(
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path),
        POLICY,
        processor(tmp_path, pseudonym_key).public_id,
        kept if kept is not None else KeptOutputs(0),
    )


def test_the_document_holds_features_scores_alert_state_and_last_event(tmp_path, shoppers):
    user, state = next(iter(shoppers.items()))
    alert = AlertState(False, state.last_event_ms - 5, 0.81)
    now_ms = state.last_event_ms + 3_600_000
    doc = view(tmp_path, b"k").document(user, stored_value(state, alert), None, now_ms=now_ms)

    independent = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path)
    (expected,) = independent.score((state,), DEFAULT_FEATURE_SPEC.matrix((state,), state.last_event_ms))
    assert doc["source"] == "computed"
    assert doc["scores"] == {name: round(value, 6) for name, value in expected.scores.items()}
    assert doc["model_versions"] == independent.model_versions
    raw = dict(zip(RAW_FEATURE_NAMES, state.raw_features(now_ms), strict=True))
    features = doc["features"]
    assert isinstance(features, dict) and list(features) == list(DEFAULT_FEATURE_SPEC.names)
    assert all(features[name] == (raw[name] if raw[name] != float("inf") else None) for name in features)
    assert doc["last_event_ts"] == state.last_event_ms and doc["as_of"] == now_ms
    assert doc["alert"] == {
        "armed": False,
        "last_alert_ts": state.last_event_ms - 5,
        "last_risk": 0.81,
        "high": POLICY.high,
        "low": POLICY.low,
    }
    assert doc["user_id"] == user and doc["public_id"] != user and len(str(doc["public_id"])) == 32
    json.dumps(doc, allow_nan=False)  # valid JSON: no infinities


def test_features_are_as_of_now_but_never_before_the_last_event(tmp_path, shoppers):
    user, state = next(iter(shoppers.items()))
    shopper_view = view(tmp_path)
    later = shopper_view.document(user, stored_value(state), None, now_ms=state.last_event_ms + 86_400_000)
    assert later["as_of"] == state.last_event_ms + 86_400_000
    assert later["alert"]["last_alert_ts"] is None  # type: ignore[index]  # never alerted
    earlier = shopper_view.document(user, stored_value(state), None, now_ms=state.last_event_ms - 1000)
    assert earlier["as_of"] == state.last_event_ms


def answer(shopper_view: ShopperView, user: str, value: bytes) -> dict[str, object]:
    """The document for a stored value, with the outputs kept for it (as the lookup reads them)."""
    return shopper_view.document(user, value, shopper_view.kept.get(user, value))


def batch(messages, first_offset: int = 0) -> list[InputMessage]:
    topics = {"page_view": "pv", "cart": "cart", "order": "orders"}
    return [
        InputMessage(topics[m.topic_kind], key_partition(m.key, PARTITIONS), first_offset + n, m.key, m.value)
        for n, m in enumerate(messages)
    ]


def test_scores_are_those_published_for_the_stored_state_kept_or_computed(tmp_path):
    simulated = list(ShopSimulator(GeneratorConfig(seed=8, n_shoppers=40, n_items=60)).messages(limit=400))
    valid = [m for m in simulated if m.malformed_reason is None]
    worker = processor(tmp_path)
    stored: dict[tuple[int, bytes], bytes] = {}
    first = worker.process(batch(valid[:200]), lambda p, k: stored.get((p, k)), now_ms=2**62)
    stored.update({(w.partition, w.key): w.value for w in first.writes if w.value is not None})
    second = worker.process(batch(valid[200:], 200), lambda p, k: stored.get((p, k)), now_ms=2**62)
    stored.update({(w.partition, w.key): w.value for w in second.writes if w.value is not None})
    published = {s.user_id: json.loads(s.result) for s in first.scored + second.scored}  # the last one wins

    kept = KeptOutputs(10_000)
    kept.remember(first)
    kept.remember(second)
    with_kept, computing = view(tmp_path, kept=kept), view(tmp_path)
    again = {s.user_id for s in second.scored}
    for (_, key), value in stored.items():
        user = key.decode()
        for shopper_view, source in ((with_kept, "published"), (computing, "computed")):
            doc = answer(shopper_view, user, value)
            assert doc["source"] == source
            assert doc["scores"] == published[user]["scores"], (user, source)
            assert doc["model_versions"] == published[user]["model_versions"]
        if user in again:  # kept: the message itself, not a recomputation
            assert answer(with_kept, user, value)["trigger_event_id"] == published[user]["trigger_event_id"]

    # While a batch's values are being stored, a lookup may read a shopper's value from before it:
    # it gets the outputs of that value, not the newer ones (nor a recomputation).
    rescored = sorted(again & {s.user_id for s in first.scored})
    assert rescored, "the test needs shoppers scored in both batches"
    first_values = {w.key.decode(): w.value for w in first.writes if w.value is not None}
    first_published = {s.user_id: json.loads(s.result) for s in first.scored}
    for user in rescored:
        doc = answer(with_kept, user, first_values[user])
        assert doc["source"] == "published" and doc["trigger_event_id"] == first_published[user]["trigger_event_id"]
    # Once the next batch is queued, the one before was stored: its previous versions are dropped,
    # and a value with no kept version (an older one here) is answered by computing.
    kept.remember(BatchOutcome())
    for user in rescored:
        assert answer(with_kept, user, first_values[user])["source"] == "computed"
        key = user.encode()
        assert answer(with_kept, user, stored[(key_partition(key, PARTITIONS), key)])["source"] == "published"


def test_kept_outputs_drop_the_least_recently_scored_first(tmp_path):
    simulated = ShopSimulator(GeneratorConfig(seed=9, n_shoppers=30)).messages(limit=300)
    outcome = processor(tmp_path).process(batch([m for m in simulated if m.malformed_reason is None]), lambda *_: None)
    kept = KeptOutputs(5)
    kept.remember(outcome)
    values = {w.key.decode(): w.value or b"" for w in outcome.writes}
    held = [s.user_id for s in outcome.scored if kept.get(s.user_id, values[s.user_id]) is not None]
    assert held == [s.user_id for s in outcome.scored][-5:] and len(kept) == 5
    assert KeptOutputs(0).get(held[0], values[held[0]]) is None

    # A shopper whose stored value is deleted (evicted, erased) is no longer kept.
    (gone,) = [write for write in outcome.writes if write.key.decode() == held[-1]]
    kept.remember(BatchOutcome(writes=[StateWrite(gone.partition, gone.key, None)]))
    assert kept.get(held[-1], values[held[-1]]) is None and len(kept) == 4


class Cluster:
    """Two lookups over real HTTP servers, one served by threads of this process and one by a process of
    its own (the worker's default); partitions split between them, stores are plain dicts."""

    def __init__(self, tmp_path, shoppers: dict[str, ShopperState]) -> None:
        ports = [free_port(), free_port()]
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.owners = {p: self.urls[p % 2] for p in range(PARTITIONS)}
        self.stores: list[dict[tuple[int, bytes], bytes]] = [{}, {}]
        for user, state in shoppers.items():
            partition = key_partition(user.encode(), PARTITIONS)
            self.stores[partition % 2][(partition, user.encode())] = stored_value(state)
        self.ready = [True, True]
        self.metrics = [WorkerMetrics(), WorkerMetrics()]
        self.servers = [
            MetricsServer(
                self.metrics[i], HealthState(), "127.0.0.1", ports[i], self._lookup(i, tmp_path), process=i == 1
            ).start()
            for i in range(2)
        ]

    def _lookup(self, i: int, tmp_path) -> ShopperLookup:
        def read(partition: int, key: bytes) -> bytes | None:
            if self.owners.get(partition) != self.urls[i]:
                raise PartitionNotOpen(partition)
            return self.stores[i].get((partition, key))

        return ShopperLookup(
            view(tmp_path),
            PARTITIONS,
            self.urls[i] + "/",  # a trailing slash, as a person may write it
            owners=lambda: self.owners,
            read=read,
            ready=lambda: self.ready[i],
            forwarder=lambda owner, target, via: forward(owner, target, via, 2.0),
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def cluster(tmp_path, shoppers) -> Iterator[Cluster]:
    running = Cluster(tmp_path, shoppers)
    yield running
    running.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def lookup_url(base: str, user: str) -> str:
    return f"{base}/shoppers/{urllib.parse.quote(user, safe='')}"


def test_each_worker_answers_for_shoppers_the_other_owns(cluster, shoppers):
    served_by: dict[str, set[str]] = {}
    for user, state in shoppers.items():
        for base in cluster.urls:
            status, doc, _ = get(lookup_url(base, user))
            assert status == 200, doc
            assert doc["user_id"] == user and doc["last_event_ts"] == state.last_event_ms
            assert doc["partition"] == key_partition(user.encode(), PARTITIONS)
            served_by.setdefault(user, set()).add(doc["served_by"])
    owners = {user: cluster.owners[key_partition(user.encode(), PARTITIONS)] for user in shoppers}
    assert served_by == {user: {owner} for user, owner in owners.items()}
    assert len(set(owners.values())) == 2, "the test shoppers must fall on both workers"
    for metrics in cluster.metrics:
        routes = {
            sample.labels["route"]
            for family in metrics.registry.collect()
            if family.name == "shoppulse_lookup_seconds"
            for sample in family.samples
        }
        assert routes == {"local", "forwarded"}


def test_an_unknown_shopper_is_404_with_a_body_that_says_so_from_either_worker(cluster):
    for base in cluster.urls:
        status, doc, _ = get(lookup_url(base, "nobody here/ü"))
        assert status == 404
        assert doc["error"] == "unknown_shopper" and doc["user_id"] == "nobody here/ü"
        assert "real user id" in doc["message"]


def test_requests_that_cannot_be_answered_say_why(cluster, shoppers):
    user = next(iter(shoppers))
    partition = key_partition(user.encode(), PARTITIONS)
    owner = cluster.urls[partition % 2]
    other = cluster.urls[1 - partition % 2]
    assert get(f"{owner}/shoppers/")[:2] == (400, get(f"{other}/shoppers/")[1])

    cluster.ready[partition % 2] = False
    status, doc, headers = get(lookup_url(other, user))  # forwarded, and the owner is recovering
    assert (status, doc["error"], headers["Retry-After"]) == (503, "not_ready", "1")
    cluster.ready[partition % 2] = True

    # A forwarded request reaching a worker that no longer owns the partition is not sent on.
    status, doc, _ = get(lookup_url(other, user), {FORWARDED_HEADER: owner})
    assert (status, doc["error"]) == (503, "owner_moved")

    del cluster.owners[partition]
    assert get(lookup_url(other, user))[1]["error"] == "owner_unknown"

    cluster.owners[partition] = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    status, doc, _ = get(lookup_url(other, user))
    assert (status, doc["error"]) == (502, "owner_unreachable")


def test_an_unreadable_stored_value_is_500_not_a_crash(cluster, shoppers):
    user = next(iter(shoppers))
    partition = key_partition(user.encode(), PARTITIONS)
    cluster.stores[partition % 2][(partition, user.encode())] = b"\xe5\x01\x09garbage"
    status, doc, _ = get(lookup_url(cluster.urls[partition % 2], user))
    assert (status, doc["error"]) == (500, "unreadable_state")


def test_the_advertised_url_defaults_to_the_bind_host_or_the_fqdn():
    assert advertised_url(Settings(metrics_host="10.1.2.3"), 9108) == "http://10.1.2.3:9108"
    assert advertised_url(Settings(metrics_host="0.0.0.0"), 9108).endswith(":9108")
    assert "0.0.0.0" not in advertised_url(Settings(metrics_host="0.0.0.0"), 9108)
    assert advertised_url(Settings(advertised_url="http://w-1.svc:9108/"), 1) == "http://w-1.svc:9108"


def test_a_value_stored_between_its_read_and_the_kept_lookup_is_read_again(tmp_path):
    simulated = ShopSimulator(GeneratorConfig(seed=12, n_shoppers=5)).messages(limit=60)
    messages = batch([m for m in simulated if m.malformed_reason is None])
    worker = processor(tmp_path)
    first = worker.process(messages[:30], lambda *_: None)
    older = {(w.partition, w.key): w.value for w in first.writes}
    second = worker.process(messages[30:], lambda p, k: older.get((p, k)))
    kept = KeptOutputs(100)
    kept.remember(second)
    kept.remember(BatchOutcome())  # second's values are stored: only their outputs are kept
    (write,) = [w for w in second.writes if (w.partition, w.key) in older][:1]
    reads = iter([older[(write.partition, write.key)], write.value])  # the batch stores in between
    lookup = ShopperLookup(
        view(tmp_path, kept=kept),
        PARTITIONS,
        "http://here:1",
        owners=lambda: dict.fromkeys(range(PARTITIONS), "http://here:1"),
        read=lambda partition, key: next(reads),
        ready=lambda: True,
        forwarder=lambda *_: Reply(500, b""),
    )
    reply = lookup.handle(f"/shoppers/{write.key.decode()}", None)
    assert reply.status == 200 and json.loads(reply.body)["source"] == "published"


def test_late_events_only_leave_the_kept_outputs_the_latest(tmp_path):
    simulated = [m for m in ShopSimulator(GeneratorConfig(seed=13, n_shoppers=20)).messages(limit=2000)]
    valid = [m for m in simulated if m.malformed_reason is None]
    ts = {id(m): json.loads(m.value)["ts"] for m in valid}
    by_user: dict[bytes, list] = {}
    for m in valid:
        by_user.setdefault(m.key, []).append(m)
    grace_ms = StateConfig().grace_ms
    user, mine = next((k, ms) for k, ms in by_user.items() if ts[id(ms[-1])] - ts[id(ms[0])] > 2 * grace_ms)
    worker = processor(tmp_path)
    newest = worker.process(batch([mine[-1]]), lambda *_: None)
    stored = {(w.partition, w.key): w.value for w in newest.writes}
    late = worker.process(batch([mine[0]], 1), lambda p, k: stored.get((p, k)))  # older than the grace period
    assert late.late == 1 and not late.scored and len(late.writes) == 1
    kept = KeptOutputs(10)
    kept.remember(newest)
    kept.remember(late)
    kept.remember(BatchOutcome())
    (after,) = late.writes
    assert after.value is not None and kept.get(user.decode(), after.value) == (
        newest.scored[0].result,
        newest.scored[0].recommendation,
    )


def lookup_counts(metrics: WorkerMetrics) -> dict[str, float]:
    """Answered lookups by route, all codes."""
    counts: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name == "shoppulse_lookup_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    counts[sample.labels["route"]] = counts.get(sample.labels["route"], 0.0) + sample.value
    return counts


def test_the_http_server_process_answers_from_what_the_worker_fed_it_as_the_worker_would(tmp_path):
    simulated = [m for m in ShopSimulator(GeneratorConfig(seed=8, n_shoppers=40, n_items=60)).messages(limit=400)]
    valid = [m for m in simulated if m.malformed_reason is None]
    worker = processor(tmp_path)
    stored: dict[tuple[int, bytes], bytes] = {}
    kept = KeptOutputs(10_000)
    url = f"http://127.0.0.1:{free_port()}"
    lookup = ShopperLookup(
        view(tmp_path, kept=kept),
        PARTITIONS,
        url,
        owners=lambda: dict.fromkeys(range(PARTITIONS), url),
        read=lambda partition, key: stored.get((partition, key)),
        ready=lambda: True,
        forwarder=lambda *_: error_reply(500, "unexpected", "nothing is forwarded here"),
    )
    metrics = WorkerMetrics()
    port = int(url.rsplit(":", 1)[1])
    server = MetricsServer(metrics, HealthState(), "127.0.0.1", port, lookup, process=True).start()
    try:
        assert server.mirrors_lookups

        def queue(outcome: BatchOutcome) -> None:  # as the worker does: feed and keep, then store
            server.feed(queued_frames(outcome))
            kept.remember(outcome)
            for write in outcome.writes:
                if write.value is None:
                    stored.pop((write.partition, write.key), None)
                else:
                    stored[(write.partition, write.key)] = write.value

        queue(worker.process(batch(valid[:200]), lambda p, k: stored.get((p, k)), now_ms=2**62))
        queue(worker.process(batch(valid[200:], 200), lambda p, k: stored.get((p, k)), now_ms=2**62))
        users = sorted({key.decode() for _, key in stored})

        def ask_both(user: str) -> tuple[dict, dict]:
            status, from_process, _ = get(lookup_url(url, user))
            assert status == 200, from_process
            here = json.loads(lookup.handle(f"/shoppers/{urllib.parse.quote(user, safe='')}", None).body)
            return from_process, here

        # Not yet told it owns anything: every lookup is relayed to the worker.
        for user in users[:3]:
            ask_both(user)
        assert lookup_counts(metrics) == {"local": 3.0}

        server.feed(ownership_frame(range(PARTITIONS), ready=True))
        time.sleep(0.3)  # the feed is applied by the process's own thread
        for user in users:
            from_process, here = ask_both(user)
            assert from_process.keys() == here.keys()
            for name in here.keys() - {"as_of", "features"}:  # the features are as of each answer's now
                assert from_process[name] == here[name], (user, name, from_process["source"], here["source"])
            assert from_process["source"] == "published"

        def mirrored() -> float:
            return lookup_counts(metrics).get("mirror", 0.0)

        deadline = time.monotonic() + 5
        while mirrored() < len(users):
            assert time.monotonic() < deadline, f"{lookup_counts(metrics)}: not all {len(users)} lookups mirrored"
            time.sleep(0.05)

        # A deleted shopper (evicted, erased) is gone from the process too; a rebalance empties it.
        gone = users[0]
        key = gone.encode()
        queue(BatchOutcome(writes=[StateWrite(key_partition(key, PARTITIONS), key, None)]))
        time.sleep(0.3)
        assert get(lookup_url(url, gone))[0] == 404
        server.feed(REBALANCING_FRAME)
        time.sleep(0.3)
        before = lookup_counts(metrics)
        ask_both(users[1])
        assert lookup_counts(metrics)["local"] == before["local"] + 1, "relayed to the worker during a rebalance"
    finally:
        server.stop()


def test_the_mirror_pairs_each_value_with_the_messages_published_for_it(tmp_path, shoppers):
    lookup = ShopperLookup(
        view(tmp_path, kept=KeptOutputs(2)),  # the mirror holds as many shoppers as the worker keeps outputs of
        PARTITIONS,
        "http://me:1",
        owners=dict,
        read=lambda *_: None,
        ready=lambda: True,
        forwarder=lambda *_: error_reply(500, "unexpected", "nothing is forwarded here"),
    )
    mirror = LookupMirror.from_greeting(lookup.mirror_greeting())
    first, second, third = sorted(shoppers)[:3]
    value = {user: stored_value(state) for user, state in shoppers.items()}
    # Late events move the offsets, not the state; another shopper's state here, to see which value is read.
    late = Stored(encode_state(shoppers[first]), None, {("t", 0): 8}).encode()

    def scores(user: str, n: int) -> bytes:
        return json.dumps({"user_id": user, "scores": {"churn": n / 10}, "trigger_event_id": f"{user}-{n}"}).encode()

    def write(user: str, stored: bytes | None) -> StateWrite:
        return StateWrite(key_partition(user.encode(), PARTITIONS), user.encode(), stored)

    def score(user: str, n: int) -> ScoredShopper:
        return ScoredShopper(user, user.encode(), scores(user, n))

    def trigger(user: str) -> object:
        reply = mirror.answer(f"/shoppers/{user}")
        return None if reply is None else json.loads(reply.body)["trigger_event_id"]

    def fed(writes: list[StateWrite], scored: list[ScoredShopper]) -> None:  # through the frames, as the process
        sending, receiving = socket.socketpair()
        with sending, receiving:
            sending.sendall(queued_frames(BatchOutcome(writes=writes, scored=scored)))
            sending.close()
            reader = FrameReader(receiving)
            while (frame := reader.read()) is not None:
                mirror.take(*frame)

    fed([write(first, value[first]), write(second, value[second])], [score(first, 1), score(second, 1)])
    assert trigger(first) is None, "nothing is answered before the worker says what it owns"
    mirror.own(range(PARTITIONS), ready=True)
    assert (trigger(first), trigger(second), trigger(third)) == (f"{first}-1", f"{second}-1", None)

    fed([], [score(first, 2)])  # a silent re-score: the value stays, the messages are the new ones
    fed([write(second, late)], [])  # late events only: the value moves on, the messages stay the latest
    fed([write(third, value[third])], [])  # stored, never scored here: nothing to answer with
    assert (trigger(first), trigger(second), trigger(third)) == (f"{first}-2", f"{second}-1", None)
    reply = mirror.answer(f"/shoppers/{second}")
    assert reply is not None and json.loads(reply.body)["last_event_ts"] == shoppers[first].last_event_ms

    fed([write(first, None)], [])  # erased
    assert trigger(first) is None and len(mirror) == 1
    fed([write(third, value[third])], [score(third, 1)])
    fed([write(first, value[first])], [score(first, 3)])  # beyond the capacity: the least recently scored goes
    assert (trigger(first), trigger(second), trigger(third)) == (f"{first}-3", None, f"{third}-1")
    fed([write(second, value[second])], [score(second, 2)])
    mirror.own([p for p in range(PARTITIONS) if p != key_partition(second.encode(), PARTITIONS)], ready=True)
    assert trigger(second) is None, "not for a partition the worker no longer owns"
    mirror.own(range(PARTITIONS), ready=False)
    assert trigger(second) is None, "not while the worker is not ready"
    mirror.own(range(PARTITIONS), ready=True)
    assert trigger(second) == f"{second}-2"
    mirror.take({"kind": "rebalancing"}, b"")
    mirror.own(range(PARTITIONS), ready=True)
    assert trigger(second) is None and len(mirror) == 0


def test_a_large_batch_is_fed_in_frames_of_a_few_shoppers_each(tmp_path):
    simulated = [m for m in ShopSimulator(GeneratorConfig(seed=5, n_shoppers=2000)).messages(limit=3000)]
    outcome = processor(tmp_path).process(batch([m for m in simulated if m.malformed_reason is None]), lambda *_: None)
    shoppers = fed_shoppers(outcome)
    assert len(shoppers) == len({w.key for w in outcome.writes} | {s.key for s in outcome.scored}) > 2 * FED_PER_FRAME
    sending, receiving = socket.socketpair()
    with sending, receiving:
        sender = threading.Thread(target=sending.sendall, args=(queued_frames(outcome),))
        sender.start()
        reader = FrameReader(receiving)
        received: list = []
        while len(received) < len(shoppers):
            frame = reader.read()
            assert frame is not None and frame[0] == {"kind": "queued"}
            chunk = decode_fed(frame[1])
            assert 0 < len(chunk) <= FED_PER_FRAME
            received += chunk
        sender.join()
    assert received == shoppers
    scored = {s.user_id: s for s in outcome.scored}
    for shopper in shoppers:
        assert shopper.result == scored[shopper.user_id].result and not shopper.deleted
