"""The served models score the same on a CUDA GPU as on the CPU.

The GPU path (pinned host memory, non-blocking copies, one forward pass per batch) only runs
where torch sees a GPU: on a machine without one this test is skipped, and says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.spec import DEFAULT_FEATURE_SPEC
from features.state import ShopperState, StateConfig
from models.baselines import CooccurrenceRecommender
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from models.sequences import ItemVocab
from streams.sim.generator import GeneratorConfig, ShopSimulator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")


def shoppers_with_histories(count: int) -> tuple[list[ShopperState], list[str]]:
    simulator = ShopSimulator(GeneratorConfig(seed=5, n_shoppers=count, n_items=400))
    states: dict[str, ShopperState] = {}
    config = StateConfig()
    for event in simulator.events(limit=20 * count):
        states.setdefault(event.user_id, ShopperState.new(event.user_id)).update(event, config)
    items = sorted({item for state in states.values() for item, _, _ in state.recent_items()})
    return list(states.values()), items


def test_cuda_scores_and_recommendations_match_the_cpu(tmp_path):
    states, items = shoppers_with_histories(300)
    torch.manual_seed(3)
    registry = ModelRegistry(tmp_path)
    ShopperClassifier(
        MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim)), DEFAULT_FEATURE_SPEC.hash
    ).save(registry.version_dir(CLASSIFIER_MODEL, "v1"), "v1")
    NextItemRecommender(
        SASRec(NextItemConfig(num_items=len(items), max_len=50, dim=32, layers=2, heads=2)), ItemVocab(items)
    ).save(registry.version_dir(NEXTITEM_MODEL, "v1"), "v1")
    registry.promote(CLASSIFIER_MODEL, "v1")
    registry.promote(NEXTITEM_MODEL, "v1")
    features = DEFAULT_FEATURE_SPEC.matrix(states, np.array([s.last_event_ms for s in states], dtype=np.int64))

    on_cpu = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path, device="cpu").score(states, features)
    gpu = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path, device="cuda")
    assert isinstance(gpu.recommender, NextItemRecommender)
    assert gpu.device.type == "cuda" and gpu.recommender.model.item_emb.weight.is_cuda
    on_gpu = gpu.score(states, features)

    assert len(on_cpu) == len(on_gpu) == len(states)
    for cpu_row, gpu_row in zip(on_cpu, on_gpu, strict=False):
        assert cpu_row.scores.keys() == gpu_row.scores.keys()
        for name, value in cpu_row.scores.items():
            assert gpu_row.scores[name] == pytest.approx(value, abs=1e-4), name
        cpu_items = [item for item, _ in cpu_row.recommendations]
        gpu_items = [item for item, _ in gpu_row.recommendations]
        # Float sums differ in the last bits between devices: allow a swap of near-tied neighbours.
        assert len(set(cpu_items) & set(gpu_items)) >= len(cpu_items) - 1
        np.testing.assert_allclose(
            [s for _, s in gpu_row.recommendations], [s for _, s in cpu_row.recommendations], atol=1e-3
        )
    assert gpu.timings.nextitem_s > 0 and gpu.timings.classifier_s > 0


def test_cuda_cooccurrence_scores_match_the_cpu():
    """The co-occurrence recommender gathers C's rows on the model's device: the same scores there."""
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 201, (int(n),), generator=generator).tolist() for n in range(2, 120)]
    model = CooccurrenceRecommender(window=3, history_len=3).fit(sequences, num_items=200)
    histories = [[], [7], [1, 2, 3, 4], [200, 1, 200], *sequences[:50]]
    on_cpu = model.score(histories)
    on_gpu = model.to(torch.device("cuda")).score(histories)
    assert on_gpu.is_cuda
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5)
