"""Issue #16 §5 end to end: the demo's kind of traffic goes to the topics, ``shoppulse archive``
archives it, ``shoppulse retrain`` trains on the archive and registers a candidate that beats the
champion as the challenger, and the worker's scorer loads it next to the champion.

The live comparison of the two (the worker's ``shoppulse_live_*`` metrics, ``shoppulse models
compare``) is built on other branches; see the report of branch ``archive`` for what to connect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from features.archive import part_files
from features.spec import DEFAULT_FEATURE_SPEC
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from models.train_cli import main as train
from streams.kafka.clients import confluent_producer_config, ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator
from streams.tools import retrain
from streams.tools.cli import parse_args

from .kafka_helpers import WorkerProcess, isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--epochs", "4", "--nextitem-epochs", "1"]


def test_archived_traffic_retrained_becomes_the_challenger_the_worker_loads(broker, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    registry_root = tmp_path / "models"
    settings = isolated_settings(
        broker.bootstrap_servers, tmp_path / "worker", archive_dir=archive, models_dir=registry_root
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
