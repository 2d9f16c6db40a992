"""Faust's own per-event cost: an agent that takes micro-batches and does nothing with them.

Run by bench_worker.py against topics it has filled: prints the events/s of a Faust agent
iterating ``stream.take_events`` with no work at all — the ceiling for any per-event Faust
stream on this machine, whatever the agent does. With ``--batch-drain`` the agent takes its
micro-batches from :class:`streams.worker.batch_consumer.MicroBatcher` instead, as the worker does:
the ceiling for the worker's own consumer path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faust  # noqa: E402

from streams.kafka.clients import tansu_client_overrides  # noqa: E402
from streams.worker.batch_consumer import MicroBatcher  # noqa: E402
from streams.worker.faust_seam import BatchDrainConsumer, BatchingApp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True, help="comma-separated input topics")
    parser.add_argument("--events", type=int, required=True, help="stop after this many events")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=1000)
    parser.add_argument("--batch-drain", action="store_true", help="whole fetches through MicroBatcher")
    args = parser.parse_args()
    batcher = MicroBatcher(args.max_batch, 0.05, 2 * args.max_batch)
    app = BatchingApp(
        f"faust-floor-{time.time_ns()}",
        broker=f"kafka://{args.bootstrap}",
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix="shoppulse-faust-floor-"),
        topic_partitions=args.partitions,
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
        batch_topics=args.topics.split(",") if args.batch_drain else (),
        batcher=batcher,
        **dict[str, Any](tansu_client_overrides()),
    )
    topic = app.topic(*args.topics.split(","), key_serializer="raw", value_serializer="raw")
    seen = {"count": 0, "started": 0.0}

    def count(taken: int) -> None:
        if not seen["started"]:
            seen["started"] = time.perf_counter()
        seen["count"] += taken
        if seen["count"] >= args.events:
            elapsed = time.perf_counter() - seen["started"]
            print(f"{seen['count'] / elapsed:.0f}", flush=True)
            os._exit(0)  # a measurement, not a service: no graceful shutdown needed

    async def take_and_drop(stream: faust.StreamT) -> None:
        assert isinstance(stream, faust.Stream), "take_events is on Faust's Stream, not on StreamT"
        async for events in stream.take_events(args.max_batch, within=0.05):
            count(len(events))

    async def take_batches_and_drop(stream: faust.StreamT) -> None:
        consumer = app.consumer
        assert isinstance(consumer, BatchDrainConsumer), "BatchingApp consumes through BatchDrainConsumer"
        while True:
            messages = await consumer.take_batch()
            consumer.ack_batch(messages)
            count(len(messages))

    app.agent(topic, name="take_and_drop")(take_batches_and_drop if args.batch_drain else take_and_drop)
    logging.basicConfig(level=logging.WARNING)
    faust.Worker(app, loglevel="warn", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
