"""``shoppulse forget USER_ID...``: ask the workers to erase shoppers (docs/privacy.md).

Each id becomes one erasure request on ``SHOPPULSE_TOPIC_ERASURE_REQUESTS``, keyed by the user
id with the inputs' partitioner, so it reaches the worker that owns the shopper's partition
and is ordered and committed with the shopper's events. The ids are the shop's own user ids
(the ones the input events carry), also when outputs are pseudonymised. ``--wait`` reads the
confirmations on ``SHOPPULSE_TOPIC_ERASURES`` until every request is confirmed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from features.events import (
    ErasureRequest,
    InvalidEvent,
    ValidationLimits,
    erasure_request_to_dict,
    parse_erasure_request,
)
from features.message_lines import MessageLine
from streams.config import Settings

#: The request-topic kind :func:`streams.kafka.producer.produce` maps to the erasure-request topic.
ERASURE_KIND = "erasure"


def erasure_messages(user_ids: list[str], now_ms: int, settings: Settings) -> list[MessageLine]:
    """One request per user id, checked with the worker's own rules first: an id the worker would
    dead-letter is refused here, with the reason, before anything is sent."""
    limits = ValidationLimits(settings.max_event_bytes, settings.max_future_skew_ms)
    messages = []
    for user_id in user_ids:
        request = ErasureRequest(str(uuid.uuid4()), user_id, now_ms)
        key, value = user_id.encode(), json.dumps(erasure_request_to_dict(request)).encode()
        parse_erasure_request(key, value, now_ms, limits)  # raises InvalidEvent
        messages.append(MessageLine(ERASURE_KIND, key, value, malformed_reason=None))
    return messages


def wait_for_confirmations(settings: Settings, request_ids: set[str], timeout_s: float) -> dict[str, dict]:
    """The confirmations of ``request_ids`` read from the erasure topic, until all came or ``timeout_s``."""
    from streams.kafka.clients import consume_data
    from streams.tools.tail import output_consumer

    found: dict[str, dict] = {}
    consumer = output_consumer(settings, [settings.topic_erasures], from_beginning=True, name="forget")
    deadline = time.monotonic() + timeout_s
    try:
        while request_ids - found.keys() and time.monotonic() < deadline:
            for message in consume_data(consumer, 100, 0.5):
                confirmation = json.loads(message.value() or b"{}")
                if confirmation.get("request_id") in request_ids:
                    found.setdefault(confirmation["request_id"], confirmation)  # the first: a repeat deletes nothing
    finally:
        consumer.close()
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user_ids", nargs="+", metavar="USER_ID", help="the shop's user ids to erase")
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for the confirmations (0: do not)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Send the requests; exit 1 when one failed or (with ``--wait``) was not confirmed in time, 2 on a bad id."""
    from streams.kafka.clients import confluent_producer_config, ensure_topics
    from streams.kafka.producer import produce

    try:
        messages = erasure_messages(list(args.user_ids), int(time.time() * 1000), settings)
    except InvalidEvent as exc:
        print(f"shoppulse forget: nothing sent; {exc.reason}: {exc.detail}", file=sys.stderr)
        return 2
    ensure_topics(settings)
    report = produce(messages, {ERASURE_KIND: settings.topic_erasure_requests}, confluent_producer_config(settings))
    request_ids = {json.loads(m.value)["request_id"] for m in messages}
    print(f"sent {report.delivered} erasure requests to {settings.topic_erasure_requests}, failed {report.failed}")
    if report.failed:
        return 1
    if args.wait <= 0:
        return 0
    confirmed = wait_for_confirmations(settings, request_ids, args.wait)
    for confirmation in confirmed.values():
        print(json.dumps(confirmation, ensure_ascii=False))
    missing = len(request_ids) - len(confirmed)
    if missing:
        print(f"{missing} requests not confirmed within {args.wait:.0f} s; is a worker running?", file=sys.stderr)
        return 1
    return 0
