"""Issue #14 §5: a champion trained on the simulated shop's traffic against a deliberately worse
challenger, judged live. A real worker on the embedded broker serves both (split: half of the
shoppers each; shadow: every shopper, the challenger's lists remembered, never published); once
enough recommendation lists have resolved, ``shoppulse models compare`` must rank the trained
model first with a significant difference, whichever role it holds, and ``promote-challenger
--require-significant`` must refuse the worse challenger and promote the better one.

The worse model is a real artifact of the same kind, loaded by the same BatchScorer: an untrained
SASRec over the trained model's vocabulary, i.e. a recommender whose lists carry no information
about what shoppers do next. Next-item lists resolve at the shopper's next interaction, so no
horizon has to pass. The roles are swapped in the same worker through the registry pointers (hot
reload): the counters are per version and variant, so the second comparison counts only lists
served after the swap."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from models.live_compare import DEFAULT_ALPHA, DEFAULT_MIN_OUTCOMES, OPPORTUNITIES
from models.names import NEXTITEM_MODEL
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.recommenders import load_recommender
from models.registry import SHADOW, SPLIT, ModelRegistry
from models.train_cli import main as train
from models.train_cli import models_main
from models.variants import CHALLENGER, CHAMPION
from streams.kafka.clients import ensure_topics
from streams.sim.generator import GeneratorConfig, ShopSimulator
from streams.tools.process import WorkerProcess

from .kafka_helpers import isolated_settings
from .test_live_eval import live_series, traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The simulated shop (its catalogue and what shoppers do next follow from seed and size). The champion
#: is trained on three weeks of 150 of its shoppers; the live traffic is the same shop with 1,000
#: shoppers, the first 150 among them: mostly shoppers and sessions the model never saw.
SEED, ITEMS = 20261203, 200
TRAINING_SHOPPERS, TRAINING_DAYS, LIVE_SHOPPERS = 150, 21, 1000
GOOD, WORSE = "trained", "untrained"
#: Resolved lists each variant needs before the comparison is read: above compare's minimum, with room.
ENOUGH_LISTS = 2 * DEFAULT_MIN_OUTCOMES
RATE_PER_S = 250.0


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose champion of both kinds (version GOOD) was trained by `shoppulse train --quick` on the shop."""
    root = tmp_path_factory.mktemp("trained")
    argv = [
        "--simulate", str(TRAINING_SHOPPERS), "--days", str(TRAINING_DAYS), "--items", str(ITEMS),
        "--seed", str(SEED), "--version", GOOD, "--registry", str(root / "registry"),
        "--report", str(root / "report"), "--quick", "--device", "cpu", "--threads", "1", "--no-progress",
        "--no-plots", "--epochs", "2", "--nextitem-epochs", "3",
    ]  # fmt: skip
    assert train(argv) == 0
    return root / "registry"


def add_untrained_recommender(registry: ModelRegistry) -> None:
    """Register WORSE: a SASRec with random weights over GOOD's vocabulary (same kind, same items)."""
    vocab = load_recommender(registry.version_dir(NEXTITEM_MODEL, GOOD)).vocab
    torch.manual_seed(SEED)
    model = SASRec(NextItemConfig(num_items=len(vocab), max_len=20, dim=16, layers=1, heads=1))
    NextItemRecommender(model, vocab).save(registry.version_dir(NEXTITEM_MODEL, WORSE), WORSE)


def resolved_lists(worker: WorkerProcess, version: str, variant: str) -> float:
    """The worker's resolved recommendation lists of ``version`` served as ``variant``."""
    labels = (("model", NEXTITEM_MODEL), ("variant", variant), ("version", version))
    return live_series(worker.metrics_text()).get((OPPORTUNITIES, labels), 0.0)


def wait_for_lists(worker: WorkerProcess, arms: dict[str, str], timeout_s: float = 90.0) -> None:
    """Until every (variant -> version) arm has ENOUGH_LISTS resolved lists."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {variant: resolved_lists(worker, version, variant) for variant, version in arms.items()}
        if min(counts.values()) >= ENOUGH_LISTS:
            return
        assert time.monotonic() < deadline, f"resolved lists after {timeout_s} s: {counts}\n{worker.log_tail()}"
        time.sleep(1.0)


def models_cli(
    registry: ModelRegistry, worker: WorkerProcess, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    """The real `shoppulse models ARGV` on this registry, reading the worker's /metrics: exit status, stdout."""
    status = models_main(["--registry", str(registry.root), *argv, "--metrics-url", f"{worker.url}/metrics"])
    return status, capsys.readouterr().out


def assert_ranked_first(comparison: dict, winner: str, versions: dict[str, str]) -> None:
    """``winner`` (a variant; verdicts are named after the winning variant) wins the verdict and hit@10,
    significantly, on enough resolved lists of exactly the registry's versions; no metric favours the other."""
    assert comparison["verdict"] == winner, comparison
    assert comparison["champion_versions"] == [versions[CHAMPION]]
    assert comparison["challenger_versions"] == [versions[CHALLENGER]]
    by_metric = {m["metric"]: m for m in comparison["metrics"]}
    hit10 = by_metric["hit@10"]
    assert hit10["significant"] and hit10["better"] == winner and hit10["enough"], hit10
    for variant in (CHAMPION, CHALLENGER):
        assert hit10[variant]["n"] >= DEFAULT_MIN_OUTCOMES, hit10
    loser = CHALLENGER if winner == CHAMPION else CHAMPION
    assert hit10[winner]["low"] > hit10[loser]["high"], hit10  # the intervals do not even overlap
    assert (hit10["difference"] > 0) == (winner == CHALLENGER) and hit10["p_value"] < DEFAULT_ALPHA, hit10
    assert all(m["better"] != loser for m in by_metric.values()), by_metric


def judged(
    registry: ModelRegistry,
    worker: WorkerProcess,
    capsys: pytest.CaptureFixture[str],
    arms: dict[str, str],
    winner: str,
) -> int:
    """Once each arm (variant -> version) has enough resolved lists: `compare` must rank ``winner`` (a
    variant) first, exiting 0 only for a challenger win; returns the exit status of
    `promote-challenger --require-significant` right after, on the same counters."""
    wait_for_lists(worker, arms)
    status, out = models_cli(registry, worker, capsys, "compare", "--model", NEXTITEM_MODEL, "--json")
    (comparison,) = json.loads(out)["models"]
    assert status == (0 if winner == CHALLENGER else 1), comparison["verdict"]
    assert_ranked_first(comparison, winner, arms)
    return models_cli(registry, worker, capsys, "promote-challenger", NEXTITEM_MODEL, "--require-significant")[0]


@pytest.mark.parametrize("mode", [SPLIT, SHADOW])
def test_compare_ranks_the_trained_model_first_in_either_role(broker, tmp_path, trained_registry, mode, capsys):
    shutil.copytree(trained_registry, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    add_untrained_recommender(registry)
    share = 0.5 if mode == SPLIT else 1.0
    registry.set_challenger(NEXTITEM_MODEL, WORSE, mode, share, salt=f"{mode}-trial")

    # A list is decided one grace period after the interaction that resolves it (models.outcomes):
    # a 4 s grace lets lists resolve within the test (the worker's default is hours).
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", models_dir=registry.root, grace_ms=4000)
    ensure_topics(settings)
    simulator = ShopSimulator(GeneratorConfig(seed=SEED, n_shoppers=LIVE_SHOPPERS, n_items=ITEMS, clock="live"))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    producer = None
    try:
        worker.wait_ready(90)
        producer = traffic(settings, simulator, RATE_PER_S).start()

        # The trained model is the champion: compare ranks it first, the gate refuses the challenger.
        assert judged(registry, worker, capsys, {CHAMPION: GOOD, CHALLENGER: WORSE}, CHAMPION) == 1
        trial = registry.challenger(NEXTITEM_MODEL)
        assert registry.current(NEXTITEM_MODEL) == GOOD and trial is not None and trial.version == WORSE

        # Roles swapped through the registry pointers, the worker reloads both between batches.
        registry.promote(NEXTITEM_MODEL, WORSE)
        registry.set_challenger(NEXTITEM_MODEL, GOOD, mode, share, salt=f"{mode}-trial-swapped")
        assert judged(registry, worker, capsys, {CHAMPION: WORSE, CHALLENGER: GOOD}, CHALLENGER) == 0
        assert registry.current(NEXTITEM_MODEL) == GOOD and registry.challenger(NEXTITEM_MODEL) is None
    finally:
        if producer is not None:
            report = producer.stop()
            assert report.failed == 0, report.errors
        assert worker.stop() == 0, worker.log_tail()
