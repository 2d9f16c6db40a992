"""``shoppulse retrain`` on a Parquet archive: a candidate that beats the champion becomes the
challenger, one that does not is left out (the comparison says why), too little data is said so."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from features.archive import PartBuffer, utc_date, write_part
from features.events import InvalidEvent, parse_event
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.registry import ModelRegistry
from models.retrain import EXIT_TOO_LITTLE_DATA
from models.retrain import main as retrain
from models.train_cli import main as train
from streams.sim.generator import GeneratorConfig, ShopSimulator

ITEMS = 400
#: --days that reach back to the simulator's fixed start (2024-01-01).
EVERYTHING_DAYS = 36_500
FAST = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--epochs", "4", "--nextitem-epochs", "1"]


def archive_of_the_simulated_shop(root: Path, shoppers: int, days: float, ending_now: bool, seed: int = 21) -> int:
    """The simulator's traffic as one archive part, its ``days`` ending now or at the simulator's fixed
    time (then every run trains on the same events: ``--days`` must reach back to it); returns the valid events."""
    now_ms = int(time.time() * 1000)
    config = GeneratorConfig(seed=seed, n_shoppers=shoppers, duration_days=days, n_items=ITEMS)
    if ending_now:
        config = dataclasses.replace(config, start_ms=now_ms - config.span_ms)
    buffer = PartBuffer("shop.page_views", 0, utc_date(now_ms), 0)
    for offset, m in enumerate(ShopSimulator(config).messages()):
        try:
            event = parse_event(m.topic_kind, m.key, m.value, now_ms)
        except InvalidEvent:
            event = None
        buffer.add(offset, now_ms, m.topic_kind, m.key, m.value, event)
    write_part(root, buffer)
    return len(buffer)


def test_too_little_data_is_said_and_nothing_is_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive_of_the_simulated_shop(tmp_path / "archive", 50, 6.0, ending_now=True)
    registry = tmp_path / "registry"
    status = retrain(["--archive", str(tmp_path / "archive"), "--registry", str(registry), *FAST])
    assert status == EXIT_TOO_LITTLE_DATA
    err = capsys.readouterr().err
    assert "too little data" in err and "needs more than" in err and "Nothing was registered" in err
    assert ModelRegistry(registry).list_models() == []


@pytest.mark.slow
def test_a_winner_becomes_the_challenger_and_an_equal_candidate_is_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive, registry_root = tmp_path / "archive", tmp_path / "registry"
    archive_of_the_simulated_shop(archive, 600, 21.0, ending_now=False)
    # A weak champion: one epoch on a small, different simulated shop.
    weak = ["--simulate", "60", "--days", "21", "--items", str(ITEMS), "--seed", "3", "--no-plots", "--version", "v0"]
    assert train([*weak, "--registry", str(registry_root), "--report", str(tmp_path / "r0"), *FAST]) == 0
    registry = ModelRegistry(registry_root)

    report = tmp_path / "r1"
    # The fixed simulated time (the same events every run, so the same models on one CPU thread).
    argv = ["--archive", str(archive), "--days", str(EVERYTHING_DAYS), "--registry", str(registry_root), *FAST]
    assert retrain([*argv, "--report", str(report), "--version", "v1"]) == 0
    comparison = json.loads((report / "comparison.json").read_text())
    classifier = comparison["decisions"][CLASSIFIER_MODEL]
    assert classifier["wins"] and classifier["ci95"][1] < 0, classifier["reason"]
    challenger = registry.challenger(CLASSIFIER_MODEL)
    assert challenger is not None and (challenger.version, challenger.mode) == ("v1", "shadow")
    assert registry.current(CLASSIFIER_MODEL) == "v0", "the champion stays until the live comparison promotes"
    nextitem = comparison["decisions"][NEXTITEM_MODEL]
    assert (registry.challenger(NEXTITEM_MODEL) is not None) == nextitem["wins"]
    for name in ("comparison.txt", "report.txt", "compare_roc_churn.png", "compare_reliability_purchase.png"):
        assert (report / name).is_file()
    assert "WINS" in capsys.readouterr().out
    assert not [p for p in registry_root.iterdir() if p.name.startswith(".retrain-")], "staging removed"

    # The challenger becomes champion; the same data and seed train the same candidate: no better, left out.
    registry.promote_challenger(CLASSIFIER_MODEL)
    report = tmp_path / "r2"
    assert retrain([*argv, "--report", str(report), "--version", "v2"]) == 0
    classifier = json.loads((report / "comparison.json").read_text())["decisions"][CLASSIFIER_MODEL]
    assert not classifier["wins"] and classifier["mean_log_loss_delta"] == 0.0
    assert "not registered" in classifier["action"]
    assert "v2" not in registry.versions(CLASSIFIER_MODEL) and registry.challenger(CLASSIFIER_MODEL) is None
    assert "LOSES" in (report / "comparison.txt").read_text()
