"""Serving never imports training: a fresh interpreter that loads the worker's model code
holds none of the training modules (replay, labels, baselines, the training package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: Modules only training, evaluation and reports need.
TRAINING_ONLY = (
    "models.training",
    "models.labels",
    "models.baselines",
    "models.report",
    "models.train_cli",
    "models.bench_nextitem",
    "features.offline",
    "sklearn",
)


def modules_after_importing(*names: str) -> set[str]:
    """``sys.modules`` of a new interpreter after importing ``names`` (this process has imported everything)."""
    code = (
        f"import importlib, json, sys\nfor n in {list(names)!r}: importlib.import_module(n)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("serving", ["models.scoring", "streams.worker.app"])
def test_serving_loads_no_training_module(serving):
    loaded = modules_after_importing(serving)
    assert serving in loaded and "models.names" in loaded
    leaked = sorted(m for m in loaded if any(m == t or m.startswith(t + ".") for t in TRAINING_ONLY))
    assert not leaked, f"importing {serving} loaded training code: {leaked}"


def test_the_check_sees_training_when_it_is_imported():
    loaded = modules_after_importing("models.scoring", "models.training")
    assert {"models.training", "models.training.pipeline", "models.labels", "features.offline"} <= loaded
