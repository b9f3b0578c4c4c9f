"""
`benchmarks/gpu/run.sh`, the GPU check's one command, run end to end on the CPU (CUDA hidden): its GPU tests all
skipped, its benchmark at the tiny shape, and every file it writes checked, so that it cannot rot before a GPU runs it.
Also the parts of it that decide what to install, and the benchmark's time limit.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from bounded_run import run_bounded
from packaging.requirements import Requirement


GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))
from install_deps import carried_wheels, package_requirements, unmet  # noqa: E402


VARIANTS = ("grpo", "chord", "chord_naive", "sft", "sft_head")
OUTPUT_FILES = ("run.log", "gpu_tests.xml", "gpu_bench.json", "gpu_bench.md", "summary.md")


def cpu_environment(**extra) -> dict:
    """The environment of a CPU run: CUDA hidden even on a machine that has it, no device-tool output folder."""
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "TRL_CHORD_GPU_TESTS_ON_CPU")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gpu-check")
    empty_wheels = tmp_path_factory.mktemp("no-wheels")  # everything is installed: no wheel may be needed
    completed = run_bounded(
        ["bash", str(GPU_DIR / "run.sh"), str(output_dir)],
        env=cpu_environment(PYTHON=sys.executable, TRL_CHORD_WHEELS=str(empty_wheels)),
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]
    return output_dir, completed.stdout


@pytest.mark.slow  # about a minute and a half: CI runs it, `-m "not slow"` leaves it out
def test_entry_point_runs_every_stage_on_the_cpu(cpu_run):
    output_dir, stdout = cpu_run
    for name in OUTPUT_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    log = (output_dir / "run.log").read_text()
    assert "nothing to install" in log
    for stage in ("dependencies", "gpu_tests", "benchmark"):
        assert f"| {stage} | ok |" in (output_dir / "summary.md").read_text()
    assert log.strip().endswith(f"done: {output_dir}") and "== [" in stdout


@pytest.mark.slow
def test_gpu_tests_are_all_skipped_and_none_errors_without_cuda(cpu_run):
    from summarize import test_counts

    output_dir, _ = cpu_run
    counts = test_counts(output_dir / "gpu_tests.xml")
    assert counts["tests"] >= 40  # every test of tests/test_gpu.py was collected
    assert counts["skipped"] == counts["tests"] and counts["failures"] == counts["errors"] == 0
    summary = (output_dir / "summary.md").read_text()
    assert f"{counts['tests']} skipped of {counts['tests']}" in summary and "no CUDA device" in summary


@pytest.mark.slow
def test_tiny_benchmark_measures_every_variant_of_every_case(cpu_run):
    output_dir, _ = cpu_run
    result = json.loads((output_dir / "gpu_bench.json").read_text())
    settings = result["settings"]
    assert result["mode"] == "tiny-cpu" and result["complete"] and not result["skipped"]
    assert result["machine"]["trl"] and result["machine"]["gpu"] is None
    assert 0 < result["duration_s"] <= result["time_limit_s"]
    cases = [(case["model"], case["expert_tokens"]) for case in result["cases"]]
    assert cases == [(shape["name"], length) for shape in settings["shapes"] for length in settings["expert_lengths"]]
    report = (output_dir / "gpu_bench.md").read_text()
    for case in result["cases"]:
        assert case["rounds"] >= settings["min_rounds"]
        assert 0 < case["expert_completion_tokens"] < case["expert_tokens"]
        assert case["grpo_tokens"] >= settings["num_generations"] * settings["completion_length"]
        assert case["expert_head_paths"] == {"chord": "chunked", "chord_naive": "full_logits"}
        for name in VARIANTS:
            assert len(case["time_samples_ms"][name]) == case["rounds"]
            stats = case["time_ms"][name]
            assert 0 < stats["q1"] <= stats["median"] <= stats["q3"] < 60e3, name
            assert 0 <= case["peak_memory_mib"][name] < 4096, name
        # The steps that build a graph through the whole model hold more than nothing
        assert case["peak_memory_mib"]["grpo"] > 0 and case["peak_memory_mib"]["sft"] > 0
        for name in ("efficiency_E", "efficiency_E_naive"):
            assert all(math.isfinite(case[name][key]) for key in ("median", "q1", "q3")), name
        assert all(math.isfinite(ratio) for ratio in case["memory_ratios"].values())
        assert f"| {case['model']} | {case['expert_tokens']} | {case['rounds']} |" in report
    assert report.strip() in (output_dir / "summary.md").read_text()


def test_benchmark_stops_at_its_time_limit_and_says_what_it_left_out(tmp_path):
    completed = run_bounded(
        [sys.executable, str(GPU_DIR / "bench.py"), "--tiny", "--time-limit", "1", "--output-dir", str(tmp_path)],
        env=cpu_environment(),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["cases"] == [] and not result["complete"]
    assert [skipped["reason"] for skipped in result["skipped"]] == ["time limit", "time limit"]
    assert "Not measured: tiny with 32 expert tokens (time limit)." in (tmp_path / "gpu_bench.md").read_text()


def test_requirements_met_by_installed_versions_only():
    requirements = [Requirement("torch>=2.6,<3"), Requirement("trl>=1.16,<2"), Requirement("datasets>=4.7,<6")]
    installed = {"torch": "2.11.0+cu130", "trl": None, "datasets": "3.6.0"}.get
    assert [str(requirement) for requirement in unmet(requirements, installed)] == ["trl<2,>=1.16", "datasets<6,>=4.7"]
    assert unmet(requirements, {"torch": "2.13.0", "trl": "1.16.0", "datasets": "5.2.0"}.get) == []


def test_carried_wheels_pin_versions_the_package_accepts():
    """benchmarks/gpu/wheels.txt must pin trl and datasets inside setup.cfg's ranges, or the GPU run installs nothing
    that it can use."""
    requirements = {requirement.name: requirement for requirement in package_requirements()}
    assert {"trl", "datasets"} <= set(requirements)
    pins = {}
    for line in (GPU_DIR / "wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (pins[pin.name],) = (specifier.version for specifier in pin.specifier)
    for name in ("trl", "datasets"):
        assert requirements[name].specifier.contains(pins[name]), (name, pins[name])


def test_the_newest_carried_wheel_of_each_project_is_chosen(tmp_path):
    for name in (
        "trl-1.16.0-py3-none-any.whl",
        "trl-1.9.0-py3-none-any.whl",
        "Multiprocess-0.70.19-py312-none-any.whl",
    ):
        (tmp_path / name).touch()
    wheels = carried_wheels(tmp_path)
    assert {name: path.name for name, path in wheels.items()} == {
        "trl": "trl-1.16.0-py3-none-any.whl",
        "multiprocess": "Multiprocess-0.70.19-py312-none-any.whl",
    }
