"""bench/bench_pipeline.py runs both arms of a comparison and prints figures it measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_a_small_comparison_prints_one_figure_per_run():
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "bench_pipeline.py"),
            "--events",
            "2000",
            "--shoppers",
            "300",
            "--batch",
            "200",
            "--models",
            "",
            "--compare-with",
            str(REPO),
            "--repeat",
            "1",
            "--no-record",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = re.findall(
        r"([\d.]+) µs of CPU per event in process\(\), the models ([\d.]+); ([\d.]+) shoppers", done.stdout
    )
    assert len(figures) == 2, done.stdout
    for cpu_us, models_us, scored in figures:
        assert float(cpu_us) > float(models_us) > 0
        assert 0 < float(scored) <= 1
