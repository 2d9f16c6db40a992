"""Shopper lookup across two workers: each answers for the shoppers the other owns, with what the
owner stored and published; an unknown shopper is 404 from either."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from features.offline import final_states
from features.state import StateConfig
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator, at_most_per_shopper
from streams.worker.lookup import key_partition

from .kafka_helpers import WorkerProcess, key_of, read_topic, value_of
from .test_scale_out import owned_partitions, two_workers
from .test_worker import newest_ts, scored_until, valid_events

pytestmark = pytest.mark.integration


def lookup(base: str, user: str, timeout_s: float = 30.0) -> tuple[int, dict]:
    """GET /shoppers/USER, retrying while ownership is moving (503) for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/shoppers/{urllib.parse.quote(user, safe='')}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.loads(exc.read())
        if status != 503 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.5)


def mirrored_lookups(worker: WorkerProcess, at_least: int = 1, timeout_s: float = 5.0) -> int:
    """Lookups the worker's HTTP server process answered from its mirror, once there are ``at_least``
    (it reports them about once a second), or as many as there are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in worker.metrics_text().splitlines()
            if line.startswith("shoppulse_lookup_seconds_count{") and 'route="mirror"' in line
        )
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def test_each_worker_answers_for_the_shoppers_the_other_owns(broker, tmp_path):
    simulator = ShopSimulator(GeneratorConfig(seed=41, n_shoppers=120, n_items=300, clock="live"))
    base, other = two_workers(broker, tmp_path, simulator, model_seed=4)
    messages = list(at_most_per_shopper(simulator.messages(limit=1500), StateConfig().dedup_ids))
    events = valid_events(messages)
    users = sorted({e.user_id for e in events})

    a, b = WorkerProcess(base, tmp_path / "a.log"), WorkerProcess(other, tmp_path / "b.log")
    try:
        a.wait_ready(90)
        b.wait_ready(90)
        produce(messages, base.topic_by_kind, base.librdkafka_config())
        scores = scored_until(base, newest_ts(events))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (owned_partitions(a) and owned_partitions(b)):
            time.sleep(0.5)
        assert owned_partitions(a) and owned_partitions(b), "both workers must own partitions"

        answers = {(w.url, user): lookup(w.url, user) for w in (a, b) for user in users}
        unknown = [lookup(worker.url, "never-seen-shopper") for worker in (a, b)]
        # Each worker's HTTP server process answered its own shoppers from what the batch loop fed it.
        assert mirrored_lookups(a) and mirrored_lookups(b)
        recommendations = read_topic(
            base, base.topic_recommendations, until=lambda ms: set(users) <= {key_of(m).decode() for m in ms}
        )
        inputs = read_topic(base, list(base.input_topics), until=lambda ms: len(ms) >= len(messages))
    finally:
        a.stop()
        b.stop()

    # The lookup finds a shopper's partition exactly where the producers (librdkafka) put it.
    keyed = [m for m in inputs if m.key()]
    assert {key_of(m): m.partition() for m in keyed} == {key_of(m): key_partition(key_of(m), 4) for m in keyed}

    failed = {key: answer for key, answer in answers.items() if answer[0] != 200}
    assert not failed, f"{len(failed)} lookups failed, e.g. {list(failed.items())[:2]}"
    served = {(url, user): doc["served_by"] for (url, user), (_, doc) in answers.items()}
    for user in users:
        assert served[(a.url, user)] == served[(b.url, user)], f"{user} is served by two workers"
    forwarded = {url for (url, _), served_by in served.items() if served_by != url}
    assert forwarded == {a.url, b.url}, "each worker must have relayed shoppers the other owns"

    # What the owner answers is what it stored and what it last published (kept: it scored them all).
    offline = final_states(events)
    last_scores = {json.loads(value_of(m))["user_id"]: json.loads(value_of(m)) for m in scores}
    last_items = {json.loads(value_of(m))["user_id"]: json.loads(value_of(m))["items"] for m in recommendations}
    for user in users:
        _, doc = answers[(a.url, user)]
        assert doc["last_event_ts"] == offline[user].last_event_ms
        assert doc["source"] == "published" and doc["trigger_event_id"] == last_scores[user]["trigger_event_id"]
        assert doc["scores"] == last_scores[user]["scores"], user
        assert doc["model_versions"] == last_scores[user]["model_versions"]
        assert [item["item_id"] for item in doc["recommendations"]] == [item["item_id"] for item in last_items[user]]
        assert doc["alert"]["armed"] is False and doc["alert"]["last_alert_ts"] is not None  # every shopper alerted

    for status, doc in unknown:
        assert (status, doc["error"]) == (404, "unknown_shopper")
