"""``shoppulse train`` and ``shoppulse models list|show|promote|rollback|clear-challenger|migrate``.

``--simulate`` trains on the shop simulator (:mod:`streams.sim.generator`: pure, no Kafka, the one
part of ``streams/`` that ``models/`` may import). The event file reader here reads our message
JSONL (``shoppulse generate --out``) with :mod:`features.message_lines`, the reader ``shoppulse
replay`` uses, parses each message with :func:`features.events.parse_event` and skips invalid
ones, counting them by reason.

Examples::

    shoppulse train --simulate 3000 --days 28 --quick --threads 1
    shoppulse train --events var/traffic.jsonl --registry artifacts/models --report var/reports/latest
    shoppulse models list
    shoppulse models promote shopper-classifier 20240101T120000Z
    shoppulse models promote nextitem 20240102T120000Z --as challenger --mode split --share 0.1
    shoppulse models clear-challenger nextitem
    shoppulse models rollback nextitem
    shoppulse models migrate --dry-run
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from features.events import Event, InvalidEvent, parse_event
from features.message_lines import read_message_lines
from features.offline import split_late

if TYPE_CHECKING:
    from .registry import ModelInfo, ModelRegistry
    from .training import TrainingResult

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


# ------------------------------------------------------------------------------ event sources
def parse_messages(
    messages: Iterable[tuple[str, bytes, bytes] | ValueError], now_ms: int | None = None
) -> tuple[list[Event], Counter[str]]:
    """Validate ``(topic_kind, key, value)`` messages with the worker's validator: the valid events
    and the invalid ones counted by ``InvalidEvent.reason`` (a ``ValueError`` item, a record that
    is not a message, counts as ``not_a_message_line``). Every training source goes through here.

    ``now_ms`` (default: the wall clock) is the "now" of the contract's future-timestamp check.
    """
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    events: list[Event] = []
    invalid: Counter[str] = Counter()
    for message in messages:
        if isinstance(message, ValueError):
            invalid["not_a_message_line"] += 1
            continue
        try:
            events.append(parse_event(*message, now))
        except InvalidEvent as exc:
            invalid[exc.reason] += 1
        except ValueError:  # unknown topic kind
            invalid["unknown_topic_kind"] += 1
    return events, invalid


def read_events_jsonl(path: str | Path, now_ms: int | None = None) -> tuple[list[Event], dict[str, Any]]:
    """Valid events of a message JSONL file and what was skipped.

    Returns ``(events, stats)``; ``stats`` has ``lines``, ``valid``, ``invalid`` (count per
    ``InvalidEvent.reason``, plus ``not_a_message_line`` for lines that are not message
    records) and the file's ``sha256``.
    """
    from .artifacts import sha256_file

    lines = [0]

    def messages() -> Iterator[tuple[str, bytes, bytes] | ValueError]:
        for _, message in read_message_lines(path):
            lines[0] += 1
            yield message if isinstance(message, ValueError) else (message.topic_kind, message.key, message.value)

    events, invalid = parse_messages(messages(), now_ms)
    return events, {
        "lines": lines[0],
        "valid": len(events),
        "invalid": dict(sorted(invalid.items())),
        "sha256": sha256_file(path),
    }


def read_events_archive(
    root: str | Path,
    since_ms: int | None = None,
    now_ms: int | None = None,
    newer: Sequence[tuple[str, bytes, bytes]] = (),
) -> tuple[list[Event], dict[str, Any]]:
    """Valid events of the Parquet archive (``shoppulse archive``) from event time ``since_ms`` on, in
    each shopper's arrival order (training applies the worker's late-event rule to it); then those of
    ``newer``, messages that arrived after the archived ones (``--with-topics``), from ``since_ms`` on.

    The archived message bytes are validated again, like any other source (:func:`parse_messages`).
    ``stats`` has ``dir``, ``parts``, ``rows``, ``valid``, ``invalid`` and ``overlapping_parts``
    (parts skipped because their offsets were read already; the archiver never writes any).
    """
    from features.archive import ArchiveMessages, archive_messages

    read = ArchiveMessages()
    events, invalid = parse_messages(itertools.chain(archive_messages(Path(root), since_ms, read), newer), now_ms)
    if since_ms is not None and newer:
        events = [e for e in events if e.ts_ms >= since_ms]  # the archive's reader cut its own already
    return events, {
        "dir": str(root),
        "since_ms": since_ms,
        "parts": read.parts,
        "rows": read.rows,
        "valid": len(events),
        "invalid": dict(sorted(invalid.items())),
        "overlapping_parts": read.overlapping_parts,
    }


@dataclass(frozen=True)
class TopicMessages:
    """The input topics' messages for ``--from-kafka``: ``(topic_kind, key, value)`` in each shopper's
    arrival order, the event-time range wanted, and a summary of what was read (topics, offsets)."""

    messages: Sequence[tuple[str, bytes, bytes]]
    since_ms: int | None
    until_ms: int | None
    summary: dict[str, Any]


# ------------------------------------------------------------------------------ train
def build_parser(prog: str = "shoppulse train", description: str | None = None) -> argparse.ArgumentParser:
    """The training options; ``shoppulse retrain`` (another ``prog``) takes them too but reads only
    the archive, so it gets ``--archive`` alone as its source."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description
        or "Train churn/purchase and next-item models on an event log, "
        "evaluate them against baselines on a time split, write a report and register "
        "versioned artifacts.",
    )
    archive_help = "the Parquet event archive `shoppulse archive` writes"
    if prog == "shoppulse train":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--events", metavar="PATH", help="message JSONL (shoppulse generate --out)")
        src.add_argument(
            "--simulate", metavar="N_SHOPPERS", type=int, help="train on the simulated shop with this many shoppers"
        )
        src.add_argument("--archive", metavar="DIR", help=archive_help)
        src.add_argument(
            "--from-kafka",
            action="store_true",
            help="the input topics (KAFKA_BOOTSTRAP_SERVERS), each shopper's events in arrival order; with "
            "--since/--until",
        )
        p.add_argument(
            "--since", default=None, help="--from-kafka: events from this event time (epoch ms or ISO 8601, UTC)"
        )
        p.add_argument("--until", default=None, help="--from-kafka: events before this event time")
        p.add_argument(
            "--with-topics",
            action="store_true",
            help="--archive: then the input topics' messages after what the archive holds (its newest part)",
        )
    else:
        p.add_argument("--archive", metavar="DIR", required=True, help=archive_help)
        p.set_defaults(events=None, simulate=None)
    p.add_argument(
        "--days",
        type=float,
        default=None,
        help="--simulate: simulated days (default: 28 with --quick, else 56: a 14-day churn horizon needs > 28 "
        "days); --archive: the last N days up to now (default: everything archived)",
    )
    p.add_argument("--seed", type=int, default=7, help="simulator and training seed (default 7)")
    p.add_argument(
        "--items", type=int, default=None, help="simulated catalogue size (default: the simulator's, 5,000 items)"
    )
    p.add_argument(
        "--registry", default=None, help="registry root (default: $SHOPPULSE_MODELS_DIR or artifacts/models)"
    )
    p.add_argument("--report", default=None, help="report directory (default: var/reports/train-<version>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="demo size: small models, few epochs, 7-day churn horizon (seconds on one CPU thread)",
    )
    p.add_argument("--epochs", type=int, default=None, help="max epochs of the churn/purchase MLP")
    p.add_argument("--nextitem-epochs", type=int, default=None, help="max epochs of the next-item model")
    p.add_argument(
        "--churn-horizon-days",
        type=float,
        default=None,
        help="churn = no event in this many days (default 14, 7 with --quick)",
    )
    p.add_argument(
        "--purchase-horizon-hours",
        type=float,
        default=None,
        help="purchase = an order within this many hours (default 24)",
    )
    p.add_argument(
        "--eval-fraction", type=float, default=None, help="share of the usable time that is evaluated (default 0.25)"
    )
    p.add_argument(
        "--warmup-days",
        type=float,
        default=None,
        help="no training moments in the log's first days (default 7, 3 with --quick)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--version", default=None, help="artifact version (default: UTC timestamp)")
    p.add_argument("--no-promote", action="store_true", help="register the new versions without making them current")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    """The :class:`models.training.TrainingConfig` the options ask for."""
    from dataclasses import replace

    from .training import TrainingConfig

    cfg = TrainingConfig.quick() if args.quick else TrainingConfig()
    labels = cfg.labels
    if args.churn_horizon_days is not None:
        labels = replace(labels, churn_horizon_ms=int(args.churn_horizon_days * DAY_MS))
    if args.purchase_horizon_hours is not None:
        labels = replace(labels, purchase_horizon_ms=int(args.purchase_horizon_hours * HOUR_MS))
    changes: dict[str, Any] = {
        "labels": labels,
        "seed": args.seed,
        "device": args.device,
        "progress": not args.no_progress,
        "version": args.version,
        "promote": not args.no_promote,
        "source": source,
    }
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.nextitem_epochs is not None:
        changes["nextitem_epochs"] = args.nextitem_epochs
    if args.eval_fraction is not None:
        changes["eval_fraction"] = args.eval_fraction
    if args.warmup_days is not None:
        changes["warmup_ms"] = int(args.warmup_days * DAY_MS)
    return replace(cfg, **changes)


def main(argv: Sequence[str] | None = None, topics: TopicMessages | None = None) -> int:
    """``shoppulse train``; returns the exit status (0 ok, 1 training failed, 2 usage).

    ``topics``: what ``--from-kafka`` trains on, read by the ``shoppulse train`` command (models/
    never talks to Kafka).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.with_topics and args.archive is None:
        print("error: --with-topics reads the topics after an archive: give --archive DIR", file=sys.stderr)
        return 2
    if args.from_kafka or (args.with_topics and Path(args.archive).is_dir()):
        if topics is None:
            print("error: --from-kafka and --with-topics are read by the `shoppulse train` command", file=sys.stderr)
            return 2
        args.topics = topics
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    loaded = load_events(args)
    if isinstance(loaded, int):
        return loaded
    events, source = loaded
    if not events:
        print("error: no valid events to train on", file=sys.stderr)
        return 1
    read_s = time.perf_counter() - t0
    result = train_and_report(events, args, source, read_s)
    if result is None:
        return 1
    if not result.beats_baselines:
        print(
            "warning: the churn/purchase MLP does not beat every baseline on every metric of the evaluation "
            "period; see the report",
            file=sys.stderr,
        )
    return 0


def load_events(args: argparse.Namespace) -> tuple[list[Event], dict[str, Any]] | int:
    """The events ``--events``, ``--archive`` or ``--simulate`` names and a summary of where they came
    from (it goes into the artifacts), or the exit status when they cannot be read."""
    if getattr(args, "from_kafka", False):
        events, invalid = parse_messages(args.topics.messages)
        since_ms, until_ms = args.topics.since_ms, args.topics.until_ms
        # Cutting off older events first changes no late verdict of a kept one; the newer ones must
        # stay until the late rule has run (they raise the watermark the worker judges by).
        newer = [e for e in events if since_ms is None or e.ts_ms >= since_ms]
        in_range = [e for e in split_late(newer)[0] if until_ms is None or e.ts_ms < until_ms]
        skipped = sum(invalid.values())
        print(
            f"read {len(in_range):,} valid events in the time range from the input topics "
            f"({len(events) - len(in_range):,} outside it, {skipped:,} invalid skipped"
            f"{': ' + json.dumps(dict(sorted(invalid.items()))) if skipped else ''})",
            file=sys.stderr,
        )
        return in_range, {
            "kind": "kafka",
            **args.topics.summary,
            "since_ms": since_ms,
            "until_ms": until_ms,
            "valid": len(in_range),
            "invalid": dict(sorted(invalid.items())),
        }
    if args.archive is not None:
        if not Path(args.archive).is_dir():
            print(f"error: no archive at {args.archive} (`shoppulse archive` writes one)", file=sys.stderr)
            return 2
        since_ms = None if args.days is None else int(time.time() * 1000 - args.days * DAY_MS)
        topics: TopicMessages | None = args.topics if getattr(args, "with_topics", False) else None
        events, stats = read_events_archive(args.archive, since_ms, newer=topics.messages if topics else ())
        skipped = sum(stats["invalid"].values())
        print(
            f"read {stats['valid']:,} valid events from {stats['parts']:,} part files of {args.archive}"
            f"{'' if args.days is None else f' (the last {args.days:g} days)'}"
            f"{f', {skipped:,} invalid skipped: ' + json.dumps(stats['invalid']) if skipped else ''}",
            file=sys.stderr,
        )
        if stats["overlapping_parts"]:
            print(
                f"warning: skipped {len(stats['overlapping_parts'])} part files whose offsets were read already: "
                + ", ".join(stats["overlapping_parts"][:5]),
                file=sys.stderr,
            )
        if topics is not None:
            read = sum(topics.summary["messages_per_topic"].values())
            print(f"(with {read:,} messages of the input topics after the archive)", file=sys.stderr)
            return events, {"kind": "archive+kafka", **stats, "topics": topics.summary}
        return events, {"kind": "archive", **stats}
    if args.days is None:
        args.days = 28.0 if args.quick else 56.0
    if args.simulate is not None:
        if args.simulate < 1 or args.days <= 0:
            print("error: --simulate needs N >= 1 shoppers and --days > 0", file=sys.stderr)
            return 2
        from streams.sim.generator import GeneratorConfig, ShopSimulator

        catalogue = {} if args.items is None else {"n_items": args.items}
        events = list(
            ShopSimulator(
                GeneratorConfig(seed=args.seed, n_shoppers=args.simulate, duration_days=args.days, **catalogue)
            ).events()
        )
        source: dict[str, Any] = {"kind": "simulated", "shoppers": args.simulate, "days": args.days, "seed": args.seed}
    else:
        try:
            events, stats = read_events_jsonl(args.events)
        except OSError as exc:
            print(f"error: cannot read {args.events}: {exc}", file=sys.stderr)
            return 2
        skipped = sum(stats["invalid"].values())
        print(
            f"read {stats['valid']:,} valid events from {args.events} ({stats['lines']:,} lines, {skipped:,} "
            f"invalid skipped{': ' + json.dumps(stats['invalid']) if skipped else ''})",
            file=sys.stderr,
        )
        source = {"kind": "events_file", "path": str(args.events), **stats}
    return events, source


def train_and_report(
    events: list[Event], args: argparse.Namespace, source: dict[str, Any], read_s: float, registry: str | None = None
) -> TrainingResult | None:
    """Train on ``events`` as the options say, write and print the report; None (said why) when
    training failed. ``registry`` overrides ``--registry`` (``retrain`` trains into a staging one)."""
    from .registry import RegistryError
    from .report import write_report
    from .training import train_all

    cfg = config_from_args(args, source)
    try:
        result = train_all(events, registry or args.registry, cfg)
    except (ValueError, RegistryError) as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return None
    timings = result.report["timings"]
    result.report["timings"] = {"read_events": read_s, **timings, "total": read_s + timings["total"]}
    report_dir = Path(args.report) if args.report else Path("var") / "reports" / f"train-{result.version}"
    result.report_paths = write_report(result.report, report_dir, plots=not args.no_plots)
    print((report_dir / "report.txt").read_text(encoding="utf-8"))
    print(f"report: {', '.join(str(p) for p in result.report_paths.values())}")
    print(
        "served (chosen on validation): " + ", ".join(f"{m} = {c}" for m, c in result.served.items()), file=sys.stderr
    )
    return result


# ------------------------------------------------------------------------------ models
def _headline(meta: dict[str, Any]) -> str:
    m = meta.get("metrics") or {}
    served = (meta.get("extra") or {}).get("served")
    try:
        if "churn" in m:
            s = served or "mlp"
            return f"{s}: churn AUC {m['churn'][s]['roc_auc']:.3f}, purchase AUC {m['purchase'][s]['roc_auc']:.3f}"
        if "next" in m:
            s = served or "sasrec"
            return f"{s}: HR@10 {m['next'][s]['HR@10']:.3f}, new-item HR@10 {m['next_new'][s]['HR@10']:.3f}"
    except (KeyError, TypeError):
        pass
    return ""


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _migrate(reg: ModelRegistry, dry_run: bool) -> int:
    """Print one line per version and a summary; exit status 1 when a version could not be converted."""
    from .migrate import FAILED, migrate_registry

    before = {info.name: info.current for info in reg.list_models()}
    results = migrate_registry(reg, dry_run)
    for r in results:
        print(f"{r.model}/{r.version}: {r.outcome}: {r.detail}")
    counts = Counter(r.outcome for r in results)
    after = {info.name: info.current for info in reg.list_models()}
    print(
        f"registry {reg.root}: {', '.join(f'{n} {o}' for o, n in sorted(counts.items())) or 'no versions'}"
        f"{' (dry run: nothing written)' if dry_run else ''}; current pointers "
        f"{'unchanged' if before == after else 'CHANGED'}: "
        f"{', '.join(f'{m}={v}' for m, v in sorted(after.items())) or 'none'}"
    )
    return 1 if counts[FAILED] or before != after else 0


def _role(version: str, info: ModelInfo) -> str:
    """``champion``, ``challenger (split 10%)`` / ``challenger (shadow)``, or empty."""
    from .registry import SPLIT

    if version == info.current:
        return "champion"
    ch = info.challenger
    if ch is not None and version == ch.version:
        return f"challenger ({ch.mode}{f' {ch.share:.0%}' if ch.mode == SPLIT else ''})"
    return ""


def _share(text: str) -> float:
    """argparse type for ``--share``: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def _add_source_options(p: argparse.ArgumentParser, default_metrics_url: str | None) -> None:
    """Where the live counters come from: the options of ``compare`` and ``promote-challenger``."""
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        metavar="URL",
        help="a worker's /metrics (repeat for every worker; their counts are summed); default "
        f"{default_metrics_url or 'http://127.0.0.1:9108/metrics'} (the local worker's port)",
    )
    source.add_argument(
        "--prometheus",
        metavar="URL",
        help="a Prometheus server scraping the workers (instead of the workers: that would count twice)",
    )
    p.add_argument("--window", help="with --prometheus: only outcomes of this last range (30m, 24h, 7d)")
    p.add_argument("--alpha", type=float, default=None, help="two-sided significance level per metric (0.05)")
    p.add_argument(
        "--min-outcomes",
        type=int,
        default=None,
        help="resolved outcomes each variant needs before a difference may count as significant (100)",
    )
    p.add_argument(
        "--all-versions",
        action="store_true",
        help="count every version of each variant, not only the registry's champion and challenger",
    )
    p.add_argument("--timeout-s", type=float, default=10.0, help="HTTP timeout per request, in seconds (10)")


def trial_versions(reg: ModelRegistry, models: Sequence[str]) -> dict[tuple[str, str], str]:
    """(model, variant) -> the registry's champion and challenger versions of each model on trial: the
    versions a comparison counts (counters of earlier versions would blur the trial)."""
    from .variants import CHALLENGER, CHAMPION

    versions: dict[tuple[str, str], str] = {}
    for model in models:
        champion, challenger = reg.current(model), reg.challenger(model)
        if champion is not None and challenger is not None:
            versions[(model, CHAMPION)] = champion
            versions[(model, CHALLENGER)] = challenger.version
    return versions


def _compare(
    args: argparse.Namespace, reg: ModelRegistry, models: Sequence[str], default_metrics_url: str | None
) -> tuple[list[Any], str]:
    """Read the live counters and compare champion against challenger for each of ``models`` (all
    model kinds seen when empty); returns the comparisons and a description of the source."""
    from .live_compare import DEFAULT_ALPHA, DEFAULT_MIN_OUTCOMES, collect, compare_kind
    from .live_sources import query_prometheus, read_worker
    from .names import CLASSIFIER_MODEL, NEXTITEM_MODEL

    if args.prometheus:
        samples = query_prometheus(args.prometheus, args.window, args.timeout_s)
        source = f"Prometheus {args.prometheus}" + (f" (last {args.window})" if args.window else "")
    else:
        if args.window:
            raise ValueError("--window needs --prometheus: a worker's counters cover its whole lifetime")
        urls = args.metrics_url or [default_metrics_url or "http://127.0.0.1:9108/metrics"]
        samples = [s for url in urls for s in read_worker(url, args.timeout_s)]
        source = ", ".join(urls)
    kinds = list(models) or sorted({CLASSIFIER_MODEL, NEXTITEM_MODEL} | {s[1].get("model", "") for s in samples} - {""})
    arms = collect(samples, {} if args.all_versions else trial_versions(reg, kinds))
    alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
    min_outcomes = DEFAULT_MIN_OUTCOMES if args.min_outcomes is None else args.min_outcomes
    return [compare_kind(model, arms.get(model, {}), alpha, min_outcomes) for model in kinds], source


def models_main(argv: Sequence[str] | None = None, default_metrics_url: str | None = None) -> int:
    """``shoppulse models list|show|promote|rollback|clear-challenger|compare|promote-challenger|migrate``;
    returns the exit status. ``default_metrics_url``: the local worker's /metrics (from its settings)."""
    from .artifacts import ArtifactError, is_legacy
    from .live_sources import SourceError
    from .registry import CHALLENGER_ALIAS, CHAMPION_ALIAS, MODES, SHADOW, SPLIT, ModelRegistry, RegistryError

    parser = argparse.ArgumentParser(
        prog="shoppulse models",
        description="List, inspect, promote (as champion or challenger), roll back and migrate model "
        "versions in the registry.",
    )
    parser.add_argument(
        "--registry", default=None, help="registry root (default: $SHOPPULSE_MODELS_DIR or artifacts/models)"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="models, their versions and which ones are champion and challenger")
    p = sub.add_parser("show", help="metadata of one version (default: the current one)")
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    p = sub.add_parser(
        "promote",
        help="make VERSION the champion (current) version of MODEL, or put it on trial as the challenger "
        "(verifies it first)",
    )
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument(
        "--as",
        dest="role",
        choices=(CHAMPION_ALIAS, CHALLENGER_ALIAS),
        default=CHAMPION_ALIAS,
        help="champion (default: served and published) or challenger (on trial against the champion)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="challenger only: shadow (default; scored for every shopper, never published) or split "
        "(published for --share of shoppers)",
    )
    p.add_argument(
        "--share",
        type=_share,
        default=None,
        help="challenger in split mode: the fraction of shoppers, in (0, 1], who get its results",
    )
    p.add_argument(
        "--salt",
        default=None,
        help="challenger only: the shopper-hash salt of the split (default: a fresh random one, a new experiment)",
    )
    p = sub.add_parser("rollback", help="return MODEL to the version current before the last promotion")
    p.add_argument("model")
    p = sub.add_parser("clear-challenger", help="end MODEL's trial: remove its challenger (the champion stays)")
    p.add_argument("model")
    p = sub.add_parser(
        "compare",
        help="champion against challenger on the workers' live outcomes, with 95%% intervals and tests; "
        "exit 0 only when the challenger wins significantly (see docs/models.md)",
    )
    p.add_argument("--model", action="append", default=[], help="only this model kind (repeatable; default all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_source_options(p, default_metrics_url)
    p = sub.add_parser(
        "promote-challenger",
        help="make MODEL's challenger its champion (the old champion is kept for rollback) and end the trial",
    )
    p.add_argument("model")
    p.add_argument(
        "--require-significant",
        action="store_true",
        help="only when `compare` says the challenger wins significantly on the live outcomes",
    )
    _add_source_options(p, default_metrics_url)
    p = sub.add_parser(
        "migrate",
        help="convert versions saved with torch.save to safetensors, in place (keeps the "
        "versions and the current pointers)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be converted")
    args = parser.parse_args(argv)
    reg = ModelRegistry(args.registry)
    try:
        if args.action == "list":
            models = reg.list_models()
            if not models:
                print(f"no models under {reg.root} (train some with `shoppulse train`)")
                return 0
            rows = []
            for info in models:
                for version in info.versions:
                    try:
                        meta = reg.describe(info.name, version)
                    except ArtifactError as exc:
                        rows.append([info.name, version, "", "", "", f"unreadable: {exc}"[:60]])
                        continue
                    rows.append(
                        [
                            info.name,
                            version,
                            _role(version, info),
                            str(meta.get("created", ""))[:19],
                            str(meta.get("feature_spec_hash") or "-"),
                            "old torch.save format: run `shoppulse models migrate`"
                            if is_legacy(meta)
                            else _headline(meta),
                        ]
                    )
                if not info.versions:
                    rows.append([info.name, "(none)", "", "", "", ""])
            print(f"registry {reg.root}  (champion = current, published; challenger = on trial)")
            _print_table(rows, ["model", "version", "role", "created (UTC)", "feature spec", "metrics"])
            return 0
        if args.action == "show":
            shown: str | None = args.version or reg.current(args.model)
            if shown is None:
                raise RegistryError(f"model {args.model!r} has no current version; name one")
            meta = reg.describe(args.model, shown)
            print(
                json.dumps(
                    {
                        k: meta.get(k)
                        for k in (
                            "kind",
                            "version",
                            "created",
                            "feature_spec_hash",
                            "vocab",
                            "training_data",
                            "metrics",
                            "config",
                        )
                    },
                    indent=2,
                )
            )
            return 0
        if args.action == "promote":
            if args.role == CHALLENGER_ALIAS:
                if (args.mode == SPLIT) != (args.share is not None):
                    parser.error("--share is required with --mode split, and only then")
                ch = reg.set_challenger(args.model, args.version, args.mode or SHADOW, args.share or 1.0, args.salt)
                scope = f"{ch.share:.0%} of shoppers get its results" if ch.mode == SPLIT else "never published"
                print(
                    f"{ch.model}: challenger = {ch.version} ({ch.mode}, {scope}; salt {ch.salt}); "
                    f"champion = {reg.current(ch.model)}"
                )
                return 0
            if args.mode is not None or args.share is not None or args.salt is not None:
                parser.error("--mode, --share and --salt only apply with --as challenger")
            info = reg.promote(args.model, args.version)
            print(f"{info.name}: current = {info.current} (previous: {', '.join(info.previous) or 'none'})")
            return 0
        if args.action == "clear-challenger":
            cleared = reg.clear_challenger(args.model)
            what = f"challenger {cleared.version} cleared" if cleared else "no challenger"
            print(f"{args.model}: {what}; champion = {reg.current(args.model)}")
            return 0
        if args.action == "compare":
            from .live_compare import CHALLENGER_WINS, render_text

            comparisons, source = _compare(args, reg, args.model, default_metrics_url)
            if args.json:
                print(json.dumps({"source": source, "models": [c.to_json() for c in comparisons]}, indent=2))
            else:
                print(render_text(comparisons, source))
            judged = [c for c in comparisons if c.challenger_versions]
            return 0 if judged and all(c.verdict == CHALLENGER_WINS for c in judged) else 1
        if args.action == "promote-challenger":
            from .live_compare import CHALLENGER_WINS

            if args.require_significant:
                (comparison,), source = _compare(args, reg, [args.model], default_metrics_url)
                if comparison.verdict != CHALLENGER_WINS:
                    print(
                        f"error: not promoted: on the live outcomes from {source} the verdict for {args.model} is "
                        f"{comparison.verdict!r}, not a significant challenger win (`shoppulse models compare "
                        f"--model {args.model}` shows why)",
                        file=sys.stderr,
                    )
                    return 1
            info = reg.promote_challenger(args.model)
            print(f"{info.name}: challenger promoted, champion = {info.current} (rollback to: {info.previous[-1]})")
            return 0
        if args.action == "migrate":
            return _migrate(reg, args.dry_run)
        info = reg.rollback(args.model)
        print(f"{info.name}: rolled back, current = {info.current}")
        return 0
    except (RegistryError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (SourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ("main", "models_main", "read_events_jsonl", "build_parser", "config_from_args")
