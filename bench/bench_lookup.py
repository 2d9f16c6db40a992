"""Shopper lookup latency while the worker scores at a share of its saturation rate.

On the embedded broker, in one run:

1. pre-produce simulated events and let one worker (``shoppulse worker``, a child process) consume
   them all: its saturation rate, measured as ``bench/bench_worker.py`` measures it, and a table
   full of shoppers;
2. produce live-clock events at ``--load`` (default 0.5) of that rate for ``--seconds``, and, at the
   same time, ask the worker for ``--lookups-per-s`` random known shoppers (``GET /shoppers/ID``;
   with one worker every key is local): the latency of each, from this process sending the request
   to reading the whole answer, a new TCP connection each time (as the server closes them);
3. report p50 / p99 / max of those latencies next to the worker's ``shoppulse_lookup_seconds``
   (server side) and the events/s the worker actually consumed during phase 2.

Prints the figures and appends them, with this exact command, to BENCHMARKS.md. The client, the
producer, the worker and the broker share this machine's cores: the figure is an upper bound of
what the lookup itself costs.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_worker import percentile, run_workers, simulated_messages  # noqa: E402
from bench.record import append_row, this_command, utc_now  # noqa: E402
from models.training import models_ready  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka.clients import confluent_producer_config, ensure_topics  # noqa: E402
from streams.kafka.producer import produce  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator  # noqa: E402
from streams.tools.process import WorkerProcess, histogram_quantile  # noqa: E402

SECTION = "## Shopper lookup latency under load (embedded broker, this machine)"
HEADER = (
    "| date (UTC) | shoppers in table | saturation ev/s | load ev/s (share) | consumed ev/s meanwhile "
    "| lookups | p50 ms | p99 ms | max ms | server p99 bucket ms | non-200 | models | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
#: Goal for a local key's p99 (issue #18).
GOAL_P99_MS = 10.0


def server_p99_bound_ms(worker: WorkerProcess) -> float:
    """The upper bound of the bucket holding the p99 of ``shoppulse_lookup_seconds``, all routes and codes."""
    counts: dict[float, float] = {}
    for line in worker.metrics_text().splitlines():
        if line.startswith("shoppulse_lookup_seconds_bucket{"):
            le = float(line.split('le="', 1)[1].split('"', 1)[0])
            counts[le] = counts.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return histogram_quantile(sorted(counts.items()), 0.99) * 1000


def timed_lookup(host: str, port: int, user: str) -> tuple[float, int]:
    """(ms from connect to the last byte of the answer, HTTP status) of one lookup."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", f"/shoppers/{urllib.parse.quote(user, safe='')}")
        answer = connection.getresponse()
        answer.read()
        return (time.perf_counter() - started) * 1000, answer.status
    finally:
        connection.close()


def produce_live(config: GeneratorConfig, total: int, settings: Settings, rate_per_s: float) -> None:
    """Produce ``total`` live-clock events at ``rate_per_s`` (the load; runs in a child process)."""
    messages = ShopSimulator(config).messages(limit=total)
    produce(messages, settings.topic_by_kind, confluent_producer_config(settings), rate_per_s)


def lookups_while_loaded(
    worker: WorkerProcess, users: list[str], rate_per_s: float, seconds: float, load: multiprocessing.Process, seed: int
) -> tuple[list[float], int]:
    """Lookups of random ``users`` at ``rate_per_s`` for ``seconds`` while ``load`` runs: latencies (ms), non-200s."""
    chooser = random.Random(seed)
    host, port = worker.settings.metrics_host, worker.settings.metrics_port
    latencies: list[float] = []
    failed = 0
    load.start()
    started = time.perf_counter()
    n = 0
    while time.perf_counter() - started < seconds:
        due = started + n / rate_per_s
        time.sleep(max(0.0, due - time.perf_counter()))
        elapsed_ms, status = timed_lookup(host, port, chooser.choice(users))
        latencies.append(elapsed_ms)
        failed += status != 200
        n += 1
    load.join()
    return latencies, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60_000, help="pre-produced events (the table's shoppers)")
    parser.add_argument("--shoppers", type=int, default=5_000)
    parser.add_argument("--days", type=float, default=28.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--models", default="artifacts/models", help="model registry the worker serves")
    parser.add_argument("--load", type=float, default=0.5, help="event rate as a share of the saturation rate")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the loaded phase")
    parser.add_argument("--lookups-per-s", type=float, default=40.0)
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="shoppulse-bench-lookup-"))
    try:
        measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path) -> None:
    models = "trained" if models_ready(args.models) else "heuristic"
    messages = simulated_messages(args.events, args.shoppers, args.days, args.seed)
    users = sorted({m.key.decode() for m in messages if m.key and m.malformed_reason is None})
    with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
        settings = Settings.from_env(
            {},
            bootstrap_servers=broker.bootstrap_servers,
            partitions=args.partitions,
            data_dir=workdir / "worker",
            metrics_port=free_port(),
            log_level="WARNING",
            models_dir=Path(args.models).resolve(),
        )
        ensure_topics(settings)
        produce(messages, settings.topic_by_kind, confluent_producer_config(settings))
        saturation, _, _, workers = run_workers(settings, len(messages), workdir, 1)
        (worker,) = workers
        try:
            rate = args.load * saturation
            print(f"saturation {saturation:,.0f} events/s; loaded phase at {rate:,.0f} events/s", flush=True)
            # The same shoppers again, live clock: the table's shoppers keep changing while they are looked up.
            live = GeneratorConfig(seed=args.seed + 1, n_shoppers=args.shoppers, clock="live")
            total = int(rate * args.seconds)
            # A process of its own: generating events is Python work that, in a thread here, would
            # hold this process's GIL while the client waits to read an answer.
            load = multiprocessing.Process(target=produce_live, args=(live, total, settings, rate))
            consumed_before, loaded_at = worker.metric("shoppulse_events_consumed_total"), time.perf_counter()
            latencies, failed = lookups_while_loaded(worker, users, args.lookups_per_s, args.seconds, load, args.seed)
            consumed = (worker.metric("shoppulse_events_consumed_total") - consumed_before) / (
                time.perf_counter() - loaded_at
            )
            server_p99_ms = server_p99_bound_ms(worker)
        finally:
            worker.stop()
    p50, p99, worst = percentile(latencies, 50), percentile(latencies, 99), max(latencies)
    print(
        f"{len(latencies):,} lookups of {len(users):,} shoppers while the worker consumed {consumed:,.0f} events/s: "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.2f} ms, {failed} not 200 "
        f"(goal p99 <= {GOAL_P99_MS:.0f} ms: {'met' if p99 <= GOAL_P99_MS else 'NOT met'}); "
        f"server side (the worker's shoppulse_lookup_seconds) p99 <= {server_p99_ms:g} ms",
        flush=True,
    )
    if not args.no_record:
        append_row(
            SECTION,
            HEADER,
            f"| {utc_now()} | {len(users):,} | {saturation:,.0f} | {rate:,.0f} ({args.load:.2f}) | {consumed:,.0f} | "
            f"{len(latencies):,} | {p50:.2f} | {p99:.2f} | {worst:.2f} | <= {server_p99_ms:g} | {failed} | {models} "
            f"| `{this_command()}` |",
        )


if __name__ == "__main__":
    main()
