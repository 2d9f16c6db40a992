"""Soak: live traffic for minutes while faults hit the worker, then every event accounted for.

On its own embedded broker, a worker scores live simulated traffic (a small share malformed,
at most ``dedup_ids`` events per shopper: see RELIABILITY.md) while, every ``--fault-every``
seconds (seeded jitter), one fault from a seeded rotation strikes:

* ``kill9``: kill -9 the worker and start it again, RocksDB kept;
* ``kill9+data-dir``: the same, and its data directory deleted first (restored from the changelog);
* ``join-leave``: a second worker joins the group, scores for a while, then leaves;
* ``flood``: ``--flood-events`` messages at full speed on top of the steady traffic.

Afterwards the accounting checker (tests/support/accounting.py) reads the output topics: every event
scored or dead-lettered with its reason, repeated scores counted, churn alerts never repeated
within the cooldown (the thresholds make every scored shopper alert once). Prints a table and
appends the run, with this exact command, to RELIABILITY.md; exits 1 when anything is unaccounted.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from bench.record import append_row, this_command, utc_now  # noqa: E402
from features.state import StateConfig  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka.clients import confluent_producer_config, ensure_topics  # noqa: E402
from streams.kafka.producer import BackgroundProducer  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator, at_most_per_shopper  # noqa: E402
from streams.tools.demo import ensure_models  # noqa: E402
from streams.tools.process import WorkerProcess  # noqa: E402
from tests.support.accounting import AccountingReport, OutputReader, await_accounted, produced_from  # noqa: E402

RELIABILITY = REPO / "RELIABILITY.md"
RUNS_SECTION = "## Soak runs"
RUNS_HEADER = (
    "| date (UTC) | duration (s) | rate (ev/s) | events in | faults | unaccounted | repeated scores "
    "| extra dead letters | churn alerts (repeated) | peak RSS (MiB) | ready after kill, median (max) s "
    "| command |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)
FAULTS_SECTION = "## Recovery after each fault (soak runs)"
FAULTS_HEADER = "| date (UTC) | fault | at (s) | ready (s) | scoring again (s) | notes |\n|---|---|---|---|---|---|"
FAULT_KINDS = ("kill9", "kill9+data-dir", "join-leave", "flood")
PUBLISHED = "shoppulse_results_published_total"


@dataclass
class Fault:
    """One injected fault and how long recovery took, in seconds from the fault.

    ``ready_s``: the restarted (or joining) worker ready; ``scoring_s``: results flowing again
    from the worker that carries on (lag back to one second of traffic, for a flood).
    """

    kind: str
    at_s: float
    ready_s: float | None = None
    scoring_s: float | None = None
    notes: str = ""


def wait_until(condition, timeout_s: float, step_s: float = 0.2) -> float | None:
    """Seconds until ``condition()`` holds, or None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(step_s)
    return None


class Soak:
    """The broker, the workers, the traffic and the faults of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path, broker: EmbeddedBroker) -> None:
        self.args, self.workdir = args, workdir
        self.rng = random.Random(args.seed)
        self.settings = Settings.from_env(
            {},
            bootstrap_servers=broker.bootstrap_servers,
            partitions=args.partitions,
            data_dir=workdir / "worker-a",
            metrics_port=free_port(),
            models_dir=Path(args.models),
            churn_alert_high=args.alert_high,
            churn_alert_low=args.alert_high / 2,
        )
        self.second = dataclasses.replace(self.settings, data_dir=workdir / "worker-b", metrics_port=free_port())
        self.started = time.monotonic()  # reset when the traffic starts
        self.starts = 0
        self.faults: list[Fault] = []
        self.peak_rss = 0
        ensure_topics(self.settings)
        self.worker = self._start(self.settings)
        self.worker.wait_ready(300)
        simulator = ShopSimulator(
            GeneratorConfig(seed=args.seed, n_shoppers=args.shoppers, clock="live", malformed_fraction=args.malformed)
        )
        self.traffic = BackgroundProducer(
            at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids),
            self.settings.topic_by_kind,
            confluent_producer_config(self.settings),
            args.rate,
        )

    def _start(self, settings: Settings) -> WorkerProcess:
        self.starts += 1
        return WorkerProcess(settings, self.workdir / f"worker-{self.starts}.log")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sample(self, *workers: WorkerProcess) -> None:
        """Track the highest peak RSS (VmHWM) of any worker process."""
        for worker in workers or (self.worker,):
            if worker.process.poll() is None:
                self.peak_rss = max(self.peak_rss, worker.memory_bytes("VmHWM"))

    def run(self, progress: tqdm) -> None:
        self.started = time.monotonic()
        self.traffic.start()
        kinds = list(self.args.faults)
        self.rng.shuffle(kinds)
        deadline = self.started + self.args.duration
        next_fault = time.monotonic() + self.args.fault_every * self.rng.uniform(0.5, 1.0)
        while time.monotonic() < deadline:
            if time.monotonic() >= next_fault:
                kind = kinds[len(self.faults) % len(kinds)]
                progress.set_postfix_str(f"{kind} …")
                self.faults.append(self.inject(kind))
                next_fault = time.monotonic() + self.args.fault_every * self.rng.uniform(0.75, 1.25)
            self.sample()
            progress.update(min(int(self.elapsed()), self.args.duration) - progress.n)
            progress.set_postfix_str(f"sent {len(self.traffic.sent):,}, faults {len(self.faults)}")
            time.sleep(1.0)
        report = self.traffic.stop()
        if report.failed:
            raise RuntimeError(f"producing failed: {report.errors}")

    def inject(self, kind: str) -> Fault:
        fault = Fault(kind, self.elapsed())
        if kind.startswith("kill9"):
            self.sample()
            killed_at = time.monotonic()
            self.worker.kill()
            if kind == "kill9+data-dir":
                shutil.rmtree(self.settings.data_dir)
            self.worker = self._start(self.settings)
            self.worker.wait_ready(600)
            fault.ready_s = time.monotonic() - killed_at
            scoring = wait_until(lambda: self.worker.metric(PUBLISHED) > 0, 300)
            fault.scoring_s = None if scoring is None else time.monotonic() - killed_at
        elif kind == "join-leave":
            joined_at = time.monotonic()
            other = self._start(self.second)
            other.wait_ready(300)
            fault.ready_s = time.monotonic() - joined_at
            time.sleep(self.args.fault_every / 3)
            self.sample(self.worker, other)
            fault.notes = f"second worker scored {other.metric(PUBLISHED):,.0f} results"
            left_at = time.monotonic()
            if other.stop() != 0:
                raise RuntimeError(f"the second worker did not stop cleanly:\n{other.log_tail()}")
            before = self.worker.metric(PUBLISHED)
            scoring = wait_until(
                lambda: self.worker.readiness()[0] == 200 and self.worker.metric(PUBLISHED) > before, 300
            )
            fault.scoring_s = None if scoring is None else time.monotonic() - left_at
        else:
            flooded_at = time.monotonic()
            self.traffic.burst(self.args.flood_events)
            time.sleep(2.0)
            peak = max(self.worker.metric("shoppulse_consumer_lag"), 0)
            scoring = wait_until(lambda: self.worker.metric("shoppulse_consumer_lag") <= self.args.rate, 600, 0.5)
            fault.scoring_s = None if scoring is None else time.monotonic() - flooded_at
            fault.notes = f"{self.args.flood_events:,} extra events; lag {peak:,.0f} two seconds in"
        return fault

    def account(self) -> AccountingReport:
        with OutputReader(self.settings) as reader:
            expected = reader.expect(produced_from(self.traffic.sent, self.settings.topic_by_kind))
            return await_accounted(reader, expected, timeout_s=300, settle_s=5)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summarize(soak: Soak, report: AccountingReport, args: argparse.Namespace) -> None:
    """Print the final table and, unless --no-record, append the run to RELIABILITY.md."""
    counts = {kind: sum(f.kind == kind for f in soak.faults) for kind in FAULT_KINDS}
    faults = ", ".join(f"{kind} x{n}" for kind, n in counts.items() if n)
    kill_ready = [f.ready_s for f in soak.faults if f.kind.startswith("kill9") and f.ready_s is not None]
    ready = f"{statistics.median(kill_ready):.1f} ({max(kill_ready):.1f})" if kill_ready else "-"
    rows = [
        ("events produced", f"{report.events_in:,} ({report.valid_events:,} valid, {report.invalid_events:,} invalid)"),
        ("events processed", f"{report.scored:,} scored, {report.dead_lettered:,} dead-lettered with their reason"),
        ("faults injected", f"{len(soak.faults)}: {faults or 'none'}"),
        ("events unaccounted", f"{len(report.unaccounted):,}"),
        (
            "duplicate outputs",
            f"{report.repeated_score_messages:,} repeated scores, {report.extra_dead_letters:,} "
            f"extra dead letters, {len(report.duplicate_alerts)} repeated churn alerts "
            f"(of {report.alerts:,})",
        ),
        ("peak RSS", f"{soak.peak_rss / 2**20:.0f} MiB"),
        ("ready after kill -9", f"median (max) {ready} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    print(f"\n{'fault':<15} {'at (s)':>7} {'ready (s)':>10} {'scoring again (s)':>18}  notes")
    for f in soak.faults:
        print(f"{f.kind:<15} {f.at_s:>7.0f} {seconds(f.ready_s):>10} {seconds(f.scoring_s):>18}  {f.notes}")
    if not report.ok:
        print("\n" + report.summary())
    if args.no_record:
        return
    date = utc_now()
    append_row(
        RUNS_SECTION,
        RUNS_HEADER,
        f"| {date} | {args.duration} | {args.rate:g} | {report.events_in:,} | {faults} | "
        f"{len(report.unaccounted)} | {report.repeated_score_messages:,} | {report.extra_dead_letters:,} | "
        f"{report.alerts:,} ({len(report.duplicate_alerts)}) | {soak.peak_rss / 2**20:.0f} | {ready} | "
        f"`{this_command()}` |",
        path=RELIABILITY,
    )
    for f in soak.faults:
        append_row(
            FAULTS_SECTION,
            FAULTS_HEADER,
            f"| {date} | {f.kind} | {f.at_s:.0f} | {seconds(f.ready_s)} | {seconds(f.scoring_s)} | {f.notes} |",
            path=RELIABILITY,
        )


def fault_kinds(text: str) -> tuple[str, ...]:
    """``--faults``: a comma-separated subset of :data:`FAULT_KINDS`."""
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault kinds {unknown or [text]}; choose from {', '.join(FAULT_KINDS)}"
        )
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=300, help="seconds of traffic and faults")
    parser.add_argument("--fault-every", type=float, default=40.0, help="mean seconds between faults")
    parser.add_argument("--rate", type=float, default=300.0, help="steady input events per second")
    parser.add_argument("--flood-events", type=int, default=30_000, help="extra events in a flood burst")
    parser.add_argument(
        "--faults",
        type=fault_kinds,
        default=FAULT_KINDS,
        help=f"comma-separated fault kinds to inject in turn (default: all of {', '.join(FAULT_KINDS)})",
    )
    parser.add_argument("--shoppers", type=int, default=50_000, help="simulated shop population")
    parser.add_argument("--malformed", type=float, default=0.01, help="share of malformed messages")
    parser.add_argument(
        "--alert-high",
        type=float,
        default=0.01,
        help="churn alert threshold (low: every scored shopper alerts, so repeats show)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--models", default="artifacts/models", help="model registry (small models trained if empty)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch RELIABILITY.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="shoppulse-soak-"))
    ok = False
    try:
        with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
            ensure_models(Settings.from_env({}, models_dir=Path(args.models)))
            soak = Soak(args, workdir, broker)
            try:
                with tqdm(total=args.duration, unit="s", desc="soak") as progress:
                    soak.run(progress)
                print("accounting for every event …", flush=True)
                report = soak.account()
            finally:
                soak.worker.stop()
            summarize(soak, report, args)
            ok = report.ok
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"worker and broker logs kept in {workdir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
