"""Contracts of streams/worker/faust_seam.py with the installed Faust, mode and aiokafka.

Every private member the seam uses must exist with the kind and signature it expects, and every
upstream method whose logic it copies must still have the source it was copied from. An upgrade
that breaks either fails here, not in a running worker. Real objects throughout: a Faust app,
its consumer and a table store are built (no broker is needed until they start).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiokafka
import faust
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection
from aiokafka.consumer.fetcher import Fetcher
from faust.stores.rocksdb import Store
from faust.tables.recovery import RebalanceAgain, Recovery
from faust.transport.consumer import Consumer
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from streams.config import Settings
from streams.worker import faust_seam
from streams.worker.batch_consumer import MicroBatcher
from streams.worker.bulk_restore import BulkRestorer
from streams.worker.faust_seam import (
    UPSTREAM_SOURCE_SHA256,
    BatchDrainConsumer,
    BatchingApp,
    BulkRecovery,
    BulkTableManager,
    TableStore,
)
from streams.worker.health import Health
from streams.worker.lookup import PartitionNotOpen
from streams.worker.metrics import HealthState, WorkerMetrics

ROOT = Path(__file__).resolve().parents[4]


def upstream(qualified: str) -> Any:
    module, name = qualified.split(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, property):
        return obj.fget
    return getattr(obj, "fun", obj)  # a mode ServiceTask wraps its method in ``fun``


@pytest.mark.parametrize("qualified", sorted(UPSTREAM_SOURCE_SHA256))
def test_copied_upstream_logic_is_unchanged(qualified):
    source = inspect.getsource(upstream(qualified))
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_SOURCE_SHA256[qualified], (
        f"{qualified} changed upstream: re-read it, carry the change over to streams/worker/faust_seam.py, "
        "then record its new hash in UPSTREAM_SOURCE_SHA256"
    )


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


#: (class, member, coroutine function?, parameter names) of every upstream method the seam calls or overrides.
METHODS = [
    (Consumer, "_drain_messages", True, ["self", "fetcher"]),
    (Consumer, "_wait_next_records", True, ["self", "timeout"]),
    (Consumer, "_add_gap", True, ["self", "tp", "offset_from", "offset_to"]),
    (Consumer, "commit", True, ["self", "topics", "start_new_transaction"]),
    (Consumer, "perform_seek", True, ["self"]),
    (Consumer, "seek", True, ["self", "partition", "offset"]),
    (Consumer, "assignment", False, ["self"]),
    (Consumer, "highwater", False, ["self", "tp"]),
    (Consumer, "stop_flow", False, ["self"]),
    (Consumer, "wait_first", True, ["self", "coros", "timeout"]),
    (Consumer, "sleep", True, ["self", "n"]),
    (faust_seam.AIOKafkaConsumer, "_to_message", False, ["self", "tp", "record"]),
    (faust.App, "_new_consumer", False, ["self"]),
    (Store, "_db_for_partition", False, ["self", "partition"]),
    (Store, "_visible_items", False, ["self", "db"]),
    (Store, "set_persisted_offset", False, ["self", "tp", "offset"]),
    (AIOKafkaConnection, "connected", False, ["self"]),
    (Store, "persisted_offset", False, ["self", "tp"]),
    (Recovery, "_build_offsets", True, ["self", "consumer", "tps", "destination", "title"]),
    (Recovery, "on_partitions_revoked", False, ["self", "revoked"]),
    (Recovery, "on_stop", True, ["self"]),
    (Recovery, "__init__", False, ["self", "app", "tables"]),
]


@pytest.mark.parametrize(
    "owner,name,is_coroutine,expected", METHODS, ids=[f"{owner.__name__}.{name}" for owner, name, _, _ in METHODS]
)
def test_upstream_methods_the_seam_uses_keep_their_kind_and_signature(owner, name, is_coroutine, expected):
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__qualname__}.{name} is gone"
    assert inspect.iscoroutinefunction(method) == is_coroutine
    assert parameters(method)[: len(expected)] == expected


@pytest.fixture
def app(tmp_path) -> Iterator[BatchingApp]:
    """A real app (the worker's class) with its consumer and a table; nothing connects until start."""
    yield BatchingApp(
        "seam-contract",
        batch_topics=["inputs"],
        batcher=MicroBatcher(10, 0.01, 20),
        broker="kafka://127.0.0.1:1",
        store="rocksdb://",
        datadir=str(tmp_path),
        autodiscover=False,
        web_enabled=False,
    )


def test_the_consumer_has_the_state_the_seam_reads_and_writes(app):
    consumer = app.consumer
    assert isinstance(consumer, BatchDrainConsumer) and consumer.batch_topics == {"inputs"}
    for name in ("_read_offset", "_committed_offset", "_acked", "_acked_index"):
        assert hasattr(getattr(consumer, name), "__getitem__"), name
    tp = faust_seam.TP("t", 0)
    assert isinstance(consumer._acked_index[tp], set) and isinstance(consumer._acked[tp], list)
    assert isinstance(consumer._buffered_partitions, set)
    assert hasattr(consumer._unacked_messages, "discard") and hasattr(consumer._unacked_messages, "difference_update")
    assert isinstance(consumer._n_acked, int) and consumer._commit_every == app.conf.broker_commit_every
    assert hasattr(consumer, "_waiting_for_ack")
    assert callable(consumer._stopped.is_set) and callable(consumer.suspend_flow.wait)
    assert callable(consumer.callback)
    assert isinstance(consumer.flow_active, bool) and isinstance(consumer.should_stop, bool)
    assert hasattr(consumer._thread, "_consumer")


def test_the_app_has_what_the_seam_and_readiness_read(app):
    assert isinstance(app.consumer_generation_id, int) and isinstance(app.rebalancing, bool)
    assert callable(app.assignor.assigned_actives) and app.owned_partitions("changelog") == set()
    assert isinstance(app.monitor.stream_inbound_time, dict) and callable(app.monitor.track_tp_end_offset)
    assert callable(app.topics.acks_enabled_for)
    assert callable(app.tables.recovery.completed.is_set)
    assert hasattr(app.transport, "Consumer")


def test_the_table_store_writes_reads_and_lists_a_partition(app):
    table = app.Table("states", key_type=bytes, value_type=bytes, partitions=3)
    store = TableStore(table)
    assert isinstance(table.data, Store) and isinstance(table.data._dbs, dict)
    store.put(1, b"k", b"v")
    assert store.get(1, b"k") == b"v" and store.get(0, b"k") is None
    assert table.data._key_index[b"k"] == 1
    assert store.set_persisted_offset(1, 41)
    assert table.data.persisted_offset(faust_seam.TP(store.changelog_topic, 1)) == 41
    # A partition not open (revoked, or closed by a stop while a sweep's flush waited): nothing is
    # recorded and nothing is opened, so the flush cannot race Faust's close.
    assert not store.set_persisted_offset(2, 7) and 2 not in table.data._dbs
    assert list(store.items({1})) == [(1, b"k", b"v")] and list(store.items({0})) == []
    store.put(1, b"k", None)
    assert store.get(1, b"k") is None and b"k" not in table.data._key_index


def test_the_lookup_reads_only_open_partitions_and_the_assignors_owner_map(app):
    table = app.Table("states", key_type=bytes, value_type=bytes, partitions=4)
    store = TableStore(table)
    with pytest.raises(PartitionNotOpen):
        store.get_if_open(2, b"k")  # never opens a partition itself
    assert 2 not in table.data._dbs
    store.put(2, b"k", b"v")
    assert store.get_if_open(2, b"k") == b"v" and store.get_if_open(2, b"other") is None

    topic = store.changelog_topic
    assert app.partition_owners(topic) == {}  # before any assignment
    # What on_assignment sets on every member from the leader's assignment (url -> topic -> partitions).
    app.assignor.changelog_distribution = {
        "http://a:1": {topic: [0, 2], "another-changelog": [1]},
        "http://b:2": {topic: [1, 3]},
    }
    assert app.partition_owners(topic) == {0: "http://a:1", 2: "http://a:1", 1: "http://b:2", 3: "http://b:2"}
    assert app.conf.canonical_url.host  # the URL the assignor publishes for this member


def test_the_tables_recover_through_bulk_recovery_with_the_state_it_reads(app):
    table = app.Table("states", key_type=bytes, value_type=bytes, partitions=2)
    tables = app.tables
    assert isinstance(tables, BulkTableManager) and tables._recovery is None  # built on first use
    recovery = tables.recovery
    assert isinstance(recovery, BulkRecovery) and recovery.restorer is app.bulk_restorer is None
    for name in ("active_offsets", "active_highwaters", "tp_to_table"):
        assert hasattr(getattr(recovery, name), "__getitem__"), name
    assert isinstance(recovery.active_tps, set) and isinstance(recovery._generation_id, int)
    assert callable(recovery.signal_recovery_start.set) and issubclass(RebalanceAgain, Exception)
    store = TableStore(table)
    assert isinstance(store.offset_key, bytes) and store.changelog_topic.endswith("-changelog")


def test_a_bulk_restore_that_fails_hands_back_to_faust_once_per_generation(tmp_path):
    """No broker: the restore stalls and fails. Faust's pass was left (RebalanceAgain), a new pass is
    signalled, the offsets stay Faust's, and the same generation does not try the partition again."""
    app = BatchingApp(
        "bulk-contract",
        batch_topics=["inputs"],
        batcher=MicroBatcher(10, 0.01, 20),
        bulk_restorer=BulkRestorer({"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}, min_records=10, stall_s=0.3),
        broker="kafka://127.0.0.1:1",
        store="rocksdb://",
        datadir=str(tmp_path),
        autodiscover=False,
        web_enabled=False,
    )
    table = app.Table("states", key_type=bytes, value_type=bytes, partitions=2)
    tables = app.tables
    assert isinstance(tables, BulkTableManager)
    recovery = tables.recovery
    assert isinstance(recovery, BulkRecovery)
    topic = TableStore(table).changelog_topic
    behind, close = faust_seam.TP(topic, 0), faust_seam.TP(topic, 1)
    for tp, offset, highwater in ((behind, -1, 99), (close, 95, 99)):
        recovery.tp_to_table[tp] = table
        recovery.active_tps.add(tp)
        recovery.active_offsets[tp] = offset
        recovery.active_highwaters[tp] = highwater

    async def run() -> None:
        with pytest.raises(RebalanceAgain):
            recovery._maybe_start_bulk_restore({behind, close})
        assert recovery._bulk_task is not None
        await recovery._bulk_task
        assert recovery.signal_recovery_start.is_set()
        recovery._maybe_start_bulk_restore({behind, close})  # tried in this generation: Faust's per-record path

    asyncio.run(run())
    assert recovery.active_offsets[behind] == -1 and recovery.active_offsets[close] == 95


def test_ack_lock_and_notify_behave_as_the_ack_path_needs():
    with ack_lock:
        with ack_lock:  # reentrant: Faust's own ack path acquires it twice
            pass

    async def woken() -> bool:
        future = asyncio.get_running_loop().create_future()
        notify(future)
        notify(None)  # no waiter: a no-op
        return future.done()

    assert asyncio.run(woken())


def test_aiokafka_keeps_the_connections_and_fetch_wait_readiness_and_tansu_read():
    async def client_conns() -> Any:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
        return consumer._client

    client = asyncio.run(client_conns())
    assert isinstance(client, AIOKafkaClient) and isinstance(client._conns, dict)
    assert "self._fetch_max_wait_ms = fetch_max_wait_ms" in inspect.getsource(Fetcher.__init__)
    assert "self._fetcher = Fetcher(" in inspect.getsource(aiokafka.AIOKafkaConsumer.start)


def test_readiness_fails_loudly_when_the_internals_it_reads_are_gone(app, caplog):
    """An upgrade that renames aiokafka's consumer inside Faust's thread must not read as a broker outage."""
    health = Health(app, Settings(), WorkerMetrics(), HealthState())
    assert faust_seam.broker_connected(app) is False  # not started: no aiokafka consumer yet
    app.consumer._thread = object()  # what a Faust without AIOKafkaConsumerThread._consumer would give
    with pytest.raises(faust_seam.SeamBroken, match="_thread._consumer"):
        faust_seam.broker_connected(app)
    with caplog.at_level(logging.ERROR, logger="shoppulse.worker"):
        for _ in range(3):
            asyncio.run(health.refresh())
    assert not health.state.ready and health.state.reason.startswith("faust internals missing (")
    assert health.metrics.registry.get_sample_value("shoppulse_ready") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "readiness cannot tell whether the brokers are reachable" in errors[0]


#: Private members of Faust, mode and aiokafka the seam uses; no other module may name them.
PRIVATE_NAMES = (
    "_drain_messages",
    "_wait_next_records",
    "_read_offset",
    "_buffered_partitions",
    "_add_gap",
    "_to_message",
    "_unacked_messages",
    "_acked_index",
    "_committed_offset",
    "_n_acked",
    "_waiting_for_ack",
    "_commit_every",
    "_new_consumer",
    "_db_for_partition",
    "_key_index",
    "_dbs",
    "_visible_items",
    "_conns",
    "_fetch_max_wait_ms",
    "ack_lock",
    "_build_offsets",
    "_generation_id",
    "_recovery",
    "RebalanceAgain",
)


def test_only_the_seam_names_faust_internals():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {name}"
        for folder in ("streams", "bench", "models", "features")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "faust_seam.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for name in PRIVATE_NAMES
        if re.search(rf"\b{name}\b", line)
    ]
    assert not offenders, offenders


class FetchedRecord:
    """What the drain loop reads of an aiokafka record."""

    def __init__(self, offset: int) -> None:
        self.offset, self.key, self.value, self.headers = offset, b"u1", b"{}", ()


class PositionsProbe:
    """Stands in for the consumer thread: what a fetch returns, the committed offsets a seek finds,
    and every seek made."""

    def __init__(self, consumer: BatchDrainConsumer, tp: Any, committed: int | None) -> None:
        self.consumer, self.tp, self.committed = consumer, tp, committed
        self.seeks: list[tuple[str, int | None]] = []
        self.seek_during_fetch = False
        self.broker_away = False

    async def wait_next_records(self, timeout: float) -> tuple[dict[Any, list[FetchedRecord]], set[Any]]:
        if self.seek_during_fetch:  # the end of a recovery overtakes the fetch
            await self.consumer.perform_seek()
        return {self.tp: [FetchedRecord(7), FetchedRecord(8)]}, {self.tp}

    async def seek_to_committed(self) -> dict[Any, int | None]:
        if self.broker_away:
            raise ConnectionError("broker away")
        self.seeks.append(("committed", self.committed))
        return {self.tp: self.committed}

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append(("to", offset))


def probed(app: BatchingApp, monkeypatch: pytest.MonkeyPatch, committed: int | None) -> PositionsProbe:
    """The app's consumer with its thread replaced by a :class:`PositionsProbe` on partition ``inputs[0]``."""
    consumer = app.batch_consumer
    tp = faust_seam.TP("inputs", 0)
    probe = PositionsProbe(consumer, tp, committed)
    monkeypatch.setattr(consumer, "_wait_next_records", probe.wait_next_records)
    monkeypatch.setattr(consumer, "seek_to_committed", probe.seek_to_committed)
    monkeypatch.setattr(consumer, "_seek", probe.seek)
    monkeypatch.setattr(consumer, "highwater", lambda tp: 9)
    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    return probe


def fetched_offsets(consumer: BatchDrainConsumer) -> list[int]:
    fetched, _ = asyncio.run(consumer._read_fetch())
    return [message.offset for message in fetched]


@pytest.mark.parametrize("committed", [5, None])
def test_input_records_reach_the_batcher_only_from_positions_reset_since_the_assignment(app, monkeypatch, committed):
    probe = probed(app, monkeypatch, committed)
    consumer, tp = probe.consumer, probe.tp

    def fetch() -> list[int]:
        return fetched_offsets(consumer)

    # After an assignment, before Faust's recovery sought the inputs to their committed offsets:
    # nothing is handed over, and the partition is sought back (to its first record, with no commit)
    assert fetch() == []
    assert probe.seeks == [("committed", committed)] + ([("to", 7)] if committed is None else [])
    assert consumer._read_offset[tp] == (committed or 7)

    # Once sought in this generation, a fetch is handed over
    probe.seeks.clear()
    assert fetch() == [7, 8]
    assert probe.seeks == [] and consumer._read_offset[tp] == 8

    # A seek that overtakes a fetch (the next recovery's) voids what the fetch returned
    probe.seek_during_fetch = True
    consumer._read_offset[tp] = 6
    assert fetch() == []
    assert ("committed", committed) in probe.seeks

    # A new assignment voids the positions until its own seek
    probe.seek_during_fetch = False
    asyncio.run(consumer.perform_seek())
    app.consumer_generation_id += 1
    assert fetch() == []
    assert fetch() == [7, 8]


def test_while_no_seek_back_works_no_input_record_is_handed_over(app, monkeypatch):
    probe = probed(app, monkeypatch, committed=5)
    probe.broker_away = True
    assert fetched_offsets(probe.consumer) == []  # dropped; the seek back fails and is logged
    assert fetched_offsets(probe.consumer) == []
    probe.broker_away = False
    assert fetched_offsets(probe.consumer) == []  # dropped once more, now sought back
    assert fetched_offsets(probe.consumer) == [7, 8]
