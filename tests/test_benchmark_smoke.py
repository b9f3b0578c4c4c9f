"""The CHORD overhead benchmark runs end to end in its quick mode and writes every field, so it cannot rot."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from bounded_run import run_bounded


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "chord_overhead.py"
SIDE_BY_SIDE_VARIANTS = ("grpo", "chord", "chord_grad_norms", "chord0", "sft")
# A subprocess of about half a minute: CI runs it, `-m "not slow"` leaves it out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("chord-overhead")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = run_bounded(
        [sys.executable, str(BENCHMARK), "--quick", "--output-dir", str(output_dir)],
        env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((output_dir / "chord_overhead.json").read_text())
    return result, (output_dir / "chord_overhead.md").read_text(), completed.stdout


def assert_positive_time(stats: dict) -> None:
    assert stats["n"] >= 1
    assert 0 < stats["q1"] <= stats["median"] <= stats["q3"] < 60


def assert_sane_memory(size: float) -> None:
    # A tiny step can fit in memory the allocator already holds, so zero is sane; negative or huge is not
    assert 0 <= size < 2**32


def test_machine_is_stated(quick_run):
    result, report, stdout = quick_run
    machine = result["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch_threads"] >= 1
    assert machine["torch"] and machine["transformers"] and machine["trl"]
    assert result["timer"] in ("cpu", "wall")
    assert result["duration_s"] > 0
    assert report.startswith("Machine: ") and machine["cpu_model"] in report
    assert report.strip() in stdout


def test_side_by_side_has_every_variant_and_finite_ratios(quick_run):
    result, report, _ = quick_run
    main = result["side_by_side"]
    for name in SIDE_BY_SIDE_VARIANTS:
        assert_positive_time(main["time_s"][name])
        assert len(main["time_samples_s"][name]) == result["sizes"]["timed_rounds"]
        assert_sane_memory(main["peak_memory_bytes"][name]["median"])
        assert f"| {name} |" in report
    for ratio in ("efficiency_E", "efficiency_E_grad_norms", "grad_norms_cost_over_sft", "chord0_over_grpo"):
        assert all(math.isfinite(main[ratio][key]) for key in ("median", "q1", "q3"))
    # Every chord_grad_norms step (warm-up, timed, memory) measured the term gradient norms, and no chord step did
    sizes = result["sizes"]
    assert main["term_grad_norms_logged"] == sizes["warmup_rounds"] + sizes["timed_rounds"] + sizes["memory_rounds"]
    assert main["chord0_over_grpo"]["median"] > 0
    for ratio in ("memory_overhead_over_sft", "stretch_chord_memory_over_max_grpo_sft"):
        assert math.isfinite(main[ratio])
    assert main["expert_tokens_per_step"]["median"] > 0
    assert set(result["bars"]) == {"efficiency_E", "chord0_over_grpo", "memory_overhead", "stretch_memory"}
    assert all(isinstance(passed, bool) for passed in result["bars"].values())


def test_scaling_covers_both_sweeps_with_fits(quick_run):
    result, _, _ = quick_run
    sizes, scaling = result["sizes"], result["scaling"]
    shapes = {(point["batch_size"], point["length"]) for point in scaling["points"]}
    assert {(size, sizes["scaling_batch_length"]) for size in sizes["scaling_batch_sizes"]} <= shapes
    assert {(1, length) for length in sizes["scaling_lengths"]} <= shapes
    for point in scaling["points"]:
        assert point["expert_tokens"] == point["batch_size"] * point["length"]
        assert math.isfinite(point["extra_time_s"]) and point["sft_time_s"] > 0
        assert math.isfinite(point["extra_memory_bytes"])
        assert_sane_memory(point["sft_memory_bytes"])
    assert set(scaling["fits"]) == {"batch_size", "length", "all"}
    for fits in scaling["fits"].values():
        for fit in fits.values():
            assert all(math.isfinite(fit[key]) for key in ("slope", "intercept", "r2", "max_relative_deviation"))


def test_the_expert_heads_are_measured(quick_run):
    result, _, _ = quick_run
    assert len(result["expert_heads"]) == len(result["sizes"]["head_batches"])
    for case in result["expert_heads"]:
        for name in ("chord_head", "trl_fused", "unfused"):
            assert_positive_time(case["time_s"][name])
            assert_sane_memory(case["peak_memory_bytes"][name])
