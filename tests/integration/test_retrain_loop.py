"""Issue #16 §5 end to end: the demo's kind of traffic goes to the topics, ``shoppulse archive``
archives it, ``shoppulse retrain`` trains on the archive and registers a candidate that beats the
champion as the challenger (shadow), and a worker serving the registry measures both on live
traffic: ``shoppulse models compare`` reads its ``/metrics`` and compares exactly those versions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from features.archive import part_files
from features.spec import DEFAULT_FEATURE_SPEC
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from models.train_cli import main as train
from models.train_cli import models_main
from streams.kafka.clients import confluent_producer_config, ensure_topics
from streams.kafka.producer import BackgroundProducer, produce
from streams.sim.generator import GeneratorConfig, ShopSimulator
from streams.tools import retrain
from streams.tools.cli import parse_args

from .kafka_helpers import WorkerProcess, isolated_settings
from .test_live_eval import COMPRESSED, live_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--epochs", "4", "--nextitem-epochs", "1"]


#: Resolved churn scores each variant needs before the comparison is read.
ENOUGH_SCORES = 50


def test_archived_traffic_retrained_becomes_the_challenger_the_worker_compares_live(
    broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "archive"
    registry_root = tmp_path / "models"
    settings = isolated_settings(  # live outcomes resolve in seconds (the last part)
        broker.bootstrap_servers, tmp_path / "worker", archive_dir=archive, models_dir=registry_root, **COMPRESSED
    )
    ensure_topics(settings)
    # The champion: what `make demo` trains on its first run, only smaller and weaker.
    weak = ["--simulate", "60", "--days", "21", "--items", "400", "--seed", "3", "--no-plots", "--version", "v0"]
    assert train([*weak, "--registry", str(registry_root), "--report", str(tmp_path / "r0"), *FAST]) == 0

    # The demo's traffic (`shoppulse demo --clock simulated` in small): three weeks of the simulated
    # shop, at its fixed simulated time so that every run trains the same models (`--days` reaches it).
    shop = ShopSimulator(GeneratorConfig(seed=21, n_shoppers=600, duration_days=21.0, n_items=400))
    report = produce(shop.messages(), settings.topic_by_kind, confluent_producer_config(settings), progress=False)
    assert report.failed == 0 and report.delivered > 10_000

    command = (
        "import sys; from streams.tools.cli import main; "
        "sys.exit(main(['archive', '--flush-events', '5000', '--stop-at-end']))"
    )
    archiver = WorkerProcess(settings, tmp_path / "archive.log", script=command)
    assert archiver.process.wait(timeout=180) == 0, archiver.log_tail()
    assert part_files(archive), archiver.log_tail()

    report_dir = tmp_path / "retrain-report"
    argv = ["retrain", *FAST, "--days", "36500", "--registry", str(registry_root), "--report", str(report_dir)]
    argv += ["--version", "v1"]
    assert retrain.run(parse_args(argv), settings) == 0

    registry = ModelRegistry(registry_root)
    challenger = registry.challenger(CLASSIFIER_MODEL)
    decision = json.loads((report_dir / "comparison.json").read_text())["decisions"][CLASSIFIER_MODEL]
    assert decision["wins"], decision["reason"]
    assert challenger is not None and (challenger.version, challenger.mode) == ("v1", "shadow")
    assert registry.current(CLASSIFIER_MODEL) == "v0"
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry_root, device="cpu")
    assert scorer.champion_versions[CLASSIFIER_MODEL] == "v0"
    assert scorer.challengers[CLASSIFIER_MODEL].version == "v1"

    # Live: the worker serves v0 and measures v1 in shadow on the same shoppers; compare reads it.
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    live = ShopSimulator(GeneratorConfig(seed=22, n_shoppers=300, n_items=400, clock="live"))
    producer = BackgroundProducer(live.messages(), settings.topic_by_kind, confluent_producer_config(settings), 300)
    try:
        worker.wait_ready(90)
        producer.start()
        deadline = time.monotonic() + 90
        while min(resolved_churn_scores(worker, variant) for variant in ("champion", "challenger")) < ENOUGH_SCORES:
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(1.0)
        capsys.readouterr()
        argv = ["--registry", str(registry_root), "compare", "--model", CLASSIFIER_MODEL, "--json"]
        models_main([*argv, "--metrics-url", f"{worker.url}/metrics"])
        (comparison,) = json.loads(capsys.readouterr().out)["models"]
    finally:
        producer.stop()
        assert worker.stop() == 0, worker.log_tail()
    assert (comparison["champion_versions"], comparison["challenger_versions"]) == (["v0"], ["v1"]), comparison
    (brier,) = [m for m in comparison["metrics"] if m["metric"] == "churn_risk brier"]
    assert min(brier["champion"]["n"], brier["challenger"]["n"]) >= ENOUGH_SCORES, brier


def resolved_churn_scores(worker: WorkerProcess, variant: str) -> float:
    """Churn scores of ``variant`` the worker has resolved (either outcome)."""
    return sum(
        value
        for (name, labels), value in live_series(worker.metrics_text()).items()
        if name == "shoppulse_live_score_outcomes_total"
        and ("variant", variant) in labels
        and ("score", "churn_risk") in labels
    )
