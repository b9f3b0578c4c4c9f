"""The paper experiment runs end to end in its quick mode and reports every method with numbers, so it cannot rot."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from bounded_run import run_bounded


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper" / "paper_table.py"
METHODS = {
    "start",
    "sft",
    "grpo",
    "sft_then_grpo",
    "chord_mu",
    "chord_phi",
    "mu0.1_uniform",
    "mu0.1_is",
    "mu0.1_entropy",
    "mu0.1_focal",
    "adaptive",
}
FINAL_METRICS = ("accuracy", "worked_style", "mean_length", "mean_entropy")
SPLITS = ("test", "ood_test", "general_test")
PRECONDITIONS = ("P1", "P2", "P3", "P4")


@pytest.mark.slow  # a subprocess of about a minute: CI runs it, `-m "not slow"` leaves it out
def test_quick_paper_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = run_bounded(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(tmp_path)],
        env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "paper_table_quick.json").read_text())
    assert (tmp_path / "paper_table_quick.png").stat().st_size > 0
    assert set(report["methods"]) == METHODS
    for seed, start in report["starts"].items():
        assert set(start["preconditions"]) == set(PRECONDITIONS), seed
        assert all(isinstance(result["holds"], bool) for result in start["preconditions"].values())
        assert math.isfinite(start["preconditions"]["P3"]["expert_nll"])
    assert set(report["best_learning_rates"]) == METHODS - {"start"}
    for name, result in report["methods"].items():
        for split in SPLITS:
            for metric in FINAL_METRICS:
                summary = result["final"][split][metric]
                assert all(math.isfinite(summary[key]) for key in ("mean", "std", "min", "max")), (name, split, metric)
                assert summary["min"] <= summary["mean"] <= summary["max"]
            assert 0.0 <= result["final"][split]["accuracy"]["mean"] <= 1.0
            if name != "start":
                assert len(result["curve"]["steps"]) == len(result["curve"][split]) >= 2  # step 0 and later
    assert "| sft_then_grpo" in completed.stdout
    assert "Preconditions" in completed.stdout
