"""The paper experiment runs end to end in its quick mode and reports every method with numbers, so it cannot rot."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from bounded_run import run_bounded


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper" / "paper_table.py"
ARMS = {
    "sft",
    "grpo",
    "sft_best_grpo",
    "sft_best_grpo_equal",
    "chord_mu",
    "chord_phi",
    "chord_phi_mean",
    "uniform",
    "is_mean",
}
ROWS = ARMS | {"start", "sft_best"}
COLUMNS = ("test", "hard_test", "ood_test", "general_test")
FINAL_METRICS = ("accuracy", "worked_style", "mean_length", "mean_entropy")
PRECONDITIONS = ("P1", "P2", "P3", "P4", "P5")
# The expert term's diagnostics every run with mu > 0 must log (issue 19's metrics)
DIAGNOSTICS = ("chord/token_weight_mean", "chord/expert_token_prob", "chord/effective_mu")


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
    assert (tmp_path / "paper_table_quick_tradeoff.png").stat().st_size > 0
    scale = report["scale"]
    assert str(scale["selection_seed"]) in report["starts"] and scale["selection_seed"] not in scale["seeds"]
    for seed, start in report["starts"].items():
        assert set(start["preconditions"]) == set(PRECONDITIONS), seed
        assert all(isinstance(result["holds"], bool) for result in start["preconditions"].values())
        assert math.isfinite(start["preconditions"]["P3"]["expert_nll"])
        assert start["preconditions"]["P5"]["expert_correct"] == 1.0  # the hard family's experts are right
    assert set(report["methods"]) == ROWS
    assert set(report["chosen_settings"]) == ARMS
    for name, result in report["methods"].items():
        assert result["seeds"] == scale["seeds"], name  # the selection seed is never reported
        for split in COLUMNS:
            for metric in FINAL_METRICS:
                summary = result["final"][split][metric]
                assert all(math.isfinite(summary[key]) for key in ("mean", "std", "min", "max")), (name, split, metric)
                assert summary["min"] <= summary["mean"] <= summary["max"]
            assert 0.0 <= result["final"][split]["accuracy"]["mean"] <= 1.0
            if "curve" in result:
                assert len(result["curve"]["steps"]) == len(result["curve"][split]) >= 2  # step 0 and later
    # Every run is kept with its curves and its log: the sweep on the selection seed and each arm on each seed
    runs = report["runs"]
    sweep_sizes = {name: len(rows) for name, rows in report["sweep"]["rows"].items()}
    assert set(sweep_sizes) == ARMS and min(sweep_sizes.values()) >= len(scale["learning_rates"])
    for name in ARMS:
        assert sum(run["arm"] == name and run["seed"] == scale["selection_seed"] for run in runs) == sweep_sizes[name]
        assert {run["seed"] for run in runs if run["arm"] == name} >= set(scale["seeds"])
    for run in runs:
        assert all(len(run["curves"][split]) >= 2 for split in COLUMNS), run["arm"]
        assert run["log"], run["arm"]
        if run["arm"] not in ("grpo", "sft_best_grpo", "sft_best_grpo_equal"):
            assert all(key in entry for entry in run["log"] for key in DIAGNOSTICS), run["arm"]
    # SFT-best runs through the package (trl_chord.recipes.sft_best): the SFT runs' selection score at each evaluation
    # is the mean accuracy of the two validation splits their curves measure, and the two-phase arms start at its best
    for run in runs:
        if run["arm"] == "sft":
            curves = run["curves"]
            assert [entry["step"] for entry in run["selection"]] == [point["step"] for point in curves["validation"]]
            for entry, valid, hard in zip(run["selection"], curves["validation"], curves["hard_validation"]):
                assert entry["eval_reward"] == pytest.approx((valid["accuracy"] + hard["accuracy"]) / 2)
    sft_rate = report["sft_phase_learning_rates"]["paper"]
    for run in runs:
        if run["arm"] == "sft_best_grpo":
            (sft_run,) = [
                r
                for r in runs
                if r["arm"] == "sft" and r["seed"] == run["seed"] and r["setting"]["learning_rate"] == sft_rate
            ]
            best = max(sft_run["selection"], key=lambda entry: entry["eval_reward"])  # the first of equal ones
            assert run["sft_phase"]["steps"] == best["step"]
    # Paired differences against both references, per column, with an interval around the mean
    for reference in ("grpo", "sft_best_grpo"):
        differences = report["paired_differences"][reference]
        assert set(differences) == ROWS - {"start", reference}
        for columns in differences.values():
            for column in COLUMNS:
                assert columns[column]["low"] <= columns[column]["mean"] <= columns[column]["high"]
    # The quick grid is one rate: it is an edge on both sides, so every arm's grid grows one rate each way
    for name, grid in report["learning_rate_grids"].items():
        assert len(grid["added_below"]) == len(grid["added_above"]) == scale["max_grid_extensions"], name
        assert grid["rates"] == sorted(scale["learning_rates"] + grid["added_below"] + grid["added_above"]), name
    for name in ARMS:
        tradeoff = report["tradeoff"][name]
        assert tradeoff["points"] and all(tradeoff["frontiers"].values()), name
    assert "Preconditions" in completed.stdout and "Paired differences against sft_best_grpo" in completed.stdout
    # The preconditions are printed before any run's result
    assert completed.stdout.index("starting model, seed") < completed.stdout.index(" sft seed ")
