"""Table restore after losing the data directory, at a shop's scale: bulk restore against Faust's own.

For each run, on the embedded Tansu broker:

1. writes the shopper table's changelog directly (fast), as a worker would have left it: one
   record per shopper (a compacted changelog), keyed like the worker's keys and partitioned with
   the inputs' partitioner, whose values are real stored values (envelopes of states of
   simulated shoppers, reused round-robin), each changelog partition ended by the worker's seal
   (:mod:`streams.worker.table_writer`);
2. starts ``shoppulse worker`` on an empty data directory and times it from process start to
   ready (``/readyz``), i.e. including start-up and the group join, reads from its log how long
   the restore itself took, and its peak RSS at ready;
3. stops it and checks the restored RocksDB: every shopper's value present and equal to what was
   written, and the persisted offset of every partition at the changelog's end.

Runs: ``--shoppers`` with bulk restore (the default), and ``--baseline-shoppers`` with bulk
restore off (``SHOPPULSE_BULK_RESTORE_MIN_RECORDS=0``: Faust's per-record recovery), plus bulk
restore at the baseline's size for a like-for-like row. Prints the figures and appends them,
with this exact command and the machine's load average, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Producer  # noqa: E402

from bench.record import append_row, this_command, utc_now  # noqa: E402
from features.encoding import encode_state  # noqa: E402
from features.offline import final_states  # noqa: E402
from models.training import models_ready  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka.clients import PARTITIONER, TopicSpec, confluent_producer_config, ensure_topics  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator  # noqa: E402
from streams.tools.process import WorkerProcess  # noqa: E402
from streams.worker.app import STATE_TABLE, state_table_store  # noqa: E402
from streams.worker.envelope import Stored  # noqa: E402
from streams.worker.faust_seam import TP  # noqa: E402
from streams.worker.table_writer import SEAL_KEY  # noqa: E402

SECTION = "## Table restore after losing the data directory (embedded broker, one worker)"
HEADER = (
    "| date (UTC) | shoppers (changelog records) | recovery | restore (s) | records/s | start to ready (s) "
    "| worker peak RSS at ready | checked | load avg (1 min) at start | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
#: Distinct real values written round-robin (building a real state per shopper would dominate the run).
VALUE_POOL = 5_000


def real_values(seed: int) -> list[bytes]:
    """Stored values (envelope + encoded state) of simulated shoppers, as the worker writes them."""
    simulator = ShopSimulator(GeneratorConfig(seed=seed, n_shoppers=VALUE_POOL, duration_days=0.5))
    states = final_states(list(simulator.events(limit=VALUE_POOL * 4)))
    offsets = {("shop.page_views", 0): 1_234_567, ("shop.cart", 0): 234_567}
    return [Stored(state=encode_state(state), offsets=offsets).encode() for state in states.values()]


def shopper_key(n: int) -> bytes:
    return f"shopper-{n:08d}".encode()


def write_changelog(settings: Settings, topic: str, shoppers: int, values: list[bytes]) -> dict[int, int]:
    """One record per shopper, then a seal per partition alone in its record batch; returns each
    partition's last offset (the seal's)."""
    producer = Producer(
        {
            **confluent_producer_config(settings),
            "partitioner": PARTITIONER,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "none",
        }
    )
    errors: list[str] = []

    def failed(error: object, _message: object) -> None:
        if error is not None:
            errors.append(str(error))

    for n in range(shoppers):
        while True:
            try:
                producer.produce(topic, key=shopper_key(n), value=values[n % len(values)], on_delivery=failed)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 10_000 == 0:
            producer.poll(0)
    if producer.flush(300) or errors:
        raise RuntimeError(f"writing the changelog failed: {errors[:3]}")
    last: dict[int, int] = {}

    def sealed(error: object, message: object) -> None:
        if error is not None:
            errors.append(str(error))
        else:
            last[message.partition()] = message.offset()  # type: ignore[attr-defined]

    for partition in range(settings.partitions):
        producer.produce(topic, key=SEAL_KEY, value=None, partition=partition, on_delivery=sealed)
    if producer.flush(60) or errors:
        raise RuntimeError(f"sealing the changelog failed: {errors[:3]}")
    return last


def check_restored(settings: Settings, shoppers: int, values: list[bytes], last: dict[int, int]) -> None:
    """The stopped worker's RocksDB holds every shopper with the value written, and the persisted
    offset Faust resumes from is each partition's last offset."""
    store = state_table_store(settings)
    partitions = set(range(settings.partitions))
    for partition in partitions:
        store.db(partition)
    found = 0
    for _, key, value in store.items(partitions):
        n = int(key.removeprefix(b"shopper-"))
        if value != values[n % len(values)]:
            raise AssertionError(f"{key!r} restored with a different value")
        found += 1
    if found != shoppers:
        raise AssertionError(f"{found:,} of {shoppers:,} shoppers restored")
    persisted = {p: store.table.data.persisted_offset(TP(store.changelog_topic, p)) for p in partitions}
    if persisted != last:
        raise AssertionError(f"persisted offsets {persisted}, changelog ends {last}")


def restore_seconds(log_text: str, bulk: bool) -> float:
    """How long the restore took, from the worker's log: the bulk restore's own line, or Faust's
    'Restoring state' to 'Done reading' (its per-record recovery)."""
    if bulk:
        found = re.findall(r"bulk restore of \S+ done: \d+ records, [\d.]+ MB of values in ([\d.]+) s", log_text)
        if not found:
            raise AssertionError("the worker did not bulk-restore")
        return sum(float(s) for s in found)
    stamps = [
        time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
        for marker in ("Restoring state from changelog topics", "Done reading from changelog topics")
        if (match := re.search(rf"(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{{3}}) .*{marker}", log_text))
    ]
    if len(stamps) != 2:
        raise AssertionError("the worker's log has no per-record recovery span")
    return stamps[1] - stamps[0]


def run(
    args: argparse.Namespace, base: Settings, workdir: Path, shoppers: int, bulk: bool, values: list[bytes]
) -> None:
    """One run: write the changelog, time a worker on an empty data directory, check what it restored."""
    label = "bulk" if bulk else "faust-per-record"
    settings = dataclasses.replace(
        base,
        app_id=f"restore-bench-{label}-{shoppers}",
        data_dir=workdir / f"{label}-{shoppers}",
        bulk_restore_min_records=base.bulk_restore_min_records if bulk else 0,
        metrics_port=free_port(),
    )
    changelog = f"{settings.app_id}-{STATE_TABLE}-changelog"
    ensure_topics(settings)
    ensure_topics(settings, [TopicSpec(changelog, settings.partitions, {"cleanup.policy": "compact"})])
    started = time.perf_counter()
    last = write_changelog(settings, changelog, shoppers, values)
    records = sum(offset + 1 for offset in last.values())
    print(f"[{label}] wrote {records:,} changelog records in {time.perf_counter() - started:.1f} s", flush=True)
    load = os.getloadavg()[0]
    worker = WorkerProcess(settings, workdir / f"{label}-{shoppers}.log")
    try:
        ready_s = worker.wait_ready(args.timeout_s)
        peak_rss_mib = worker.memory_bytes("VmHWM") / 2**20
    finally:
        worker.stop()
    log_text = worker.log_path.read_text()
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(worker.log_path, args.keep_logs / worker.log_path.name)
    restore_s = restore_seconds(log_text, bulk)
    check_restored(settings, shoppers, values, last)
    rate = records / max(restore_s, 1e-9)
    print(
        f"[{label}] {shoppers:,} shoppers: restored in {restore_s:.1f} s ({rate:,.0f} records/s), "
        f"ready {ready_s:.1f} s after start, peak RSS {peak_rss_mib:.0f} MiB; every value and offset checked "
        f"(load {load:.2f})",
        flush=True,
    )
    if not args.no_record:
        append_row(
            SECTION,
            HEADER,
            f"| {utc_now()} | {shoppers:,} ({records:,}) | {label} | {restore_s:.1f} | {rate:,.0f} | {ready_s:.1f} "
            f"| {peak_rss_mib:.0f} MiB | every value and persisted offset | {load:.2f} | `{this_command()}` |",
        )
    shutil.rmtree(settings.data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shoppers", type=int, default=1_000_000, help="shoppers restored in bulk")
    parser.add_argument(
        "--baseline-shoppers",
        type=int,
        default=115_000,
        help="shoppers restored by Faust's per-record recovery, and in bulk for comparison (0: skip)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--models", default="artifacts/models", help="model registry the worker serves")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="longest wait for a worker to be ready")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the workers' logs into this folder")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="shoppulse-restore-"))
    try:
        values = real_values(args.seed)
        print(
            f"{len(values):,} real stored values, {sum(map(len, values)) / len(values):.0f} bytes on average; "
            f"models: {'trained' if models_ready(args.models) else 'heuristic'}",
            flush=True,
        )
        with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
            base = Settings.from_env(
                {},
                bootstrap_servers=broker.bootstrap_servers,
                partitions=args.partitions,
                models_dir=Path(args.models).resolve(),
                log_level="INFO",
            )
            if args.baseline_shoppers:
                run(args, base, workdir, args.baseline_shoppers, False, values)
                run(args, base, workdir, args.baseline_shoppers, True, values)
            run(args, base, workdir, args.shoppers, True, values)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
