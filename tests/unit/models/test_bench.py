"""bench-nextitem end to end on a tiny synthetic file (CPU, 1 thread, 2 epochs)."""

from __future__ import annotations

import json
import random

import torch

from models.bench_nextitem import SECTION, main

torch.set_num_threads(1)


def test_bench_writes_json_and_appends_rows(tmp_path):
    rng = random.Random(0)
    lines = []
    for u in range(60):
        start = rng.randrange(15)
        lines.append(" ".join([str(u)] + [str((start + i) % 15 + 1) for i in range(6)]))
    seq = tmp_path / "seqs.txt"
    seq.write_text("\n".join(lines) + "\n")
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\n## Something else\n\nrow\n")
    out = tmp_path / "r.json"
    args = [
        "--sequences",
        str(seq),
        "--json",
        str(out),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--dim",
        "8",
        "--layers",
        "1",
        "--max-len",
        "5",
        "--no-progress",
        "--benchmarks",
        str(bench),
        "--save-artifact",
        str(tmp_path / "art"),
    ]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"SASRec-CE (ours)", "popularity", "co-occurrence"}
    assert rep["dataset"]["users"] == 60 and rep["model_config"]["max_len"] == 5
    assert rep["published"]["ICLRec"]["HR@10"] == 0.0834 and rep["train"]["epochs_run"] == 2
    assert (tmp_path / "art" / "metadata.json").exists()
    assert main(args[:-2] + ["--no-baselines"]) == 0
    text = bench.read_text()
    assert text.startswith("# Benchmarks\n\n## Something else\n\nrow\n")  # append-only
    assert text.count(SECTION) == 1 and text.count("| SASRec-CE (ours) |") == 2
    assert "--sequences" in text


def test_bench_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["--sequences", str(tmp_path / "nope.txt"), "--no-append"]) == 2
    assert "not found" in capsys.readouterr().err
