"""
The one-page summary of a `benchmarks/gpu/run.sh` run: each stage's status and time, the GPU tests' counts and
failures (from their JUnit XML) and the benchmark's tables.

    python benchmarks/gpu/summarize.py OUTPUT_DIR STAGE=STATUS:SECONDS ...

Writes OUTPUT_DIR/summary.md and prints it.
"""

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def test_counts(junit_xml: Path) -> dict:
    """Counts of the JUnit report (pytest's `--junitxml`), and the ids of the tests that failed or errored."""
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def summary(output_dir: Path, stages: dict[str, tuple[str, float]]) -> str:
    lines = ["# GPU check", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {status} | {seconds:.0f} |" for stage, (status, seconds) in stages.items()]
    junit = output_dir / "gpu_tests.xml"
    if junit.exists():
        counts = test_counts(junit)
        lines += [
            "",
            f"GPU tests (`pytest -m gpu tests/test_gpu.py`): {counts['passed']} passed, {counts['failures']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped of {counts['tests']}.",
        ]
        if counts["skipped"] == counts["tests"]:
            lines.append("Every GPU test was skipped: no CUDA device.")
        lines += [f"- failed: `{test}`" for test in counts["failed_tests"]]
    vllm_junit = output_dir / "vllm_tests.xml"
    if vllm_junit.exists():
        counts = test_counts(vllm_junit)
        lines += [
            "",
            f"vLLM tests with TRL's own weight sync (`pytest -m vllm tests/test_vllm.py`): {counts['passed']} "
            f"passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped of "
            f"{counts['tests']}.",
        ]
        lines += [f"- failed: `{test}`" for test in counts["failed_tests"]]
    bench = output_dir / "gpu_bench.json"
    if bench.exists():
        result = json.loads(bench.read_text())
        state = "complete" if result["complete"] else "incomplete (see the skipped or failed cases)"
        lines += ["", f"## Benchmark ({result['mode']}, {state})", "", (output_dir / "gpu_bench.md").read_text()]
    return "\n".join(lines) + "\n"


def main() -> None:
    output_dir = Path(sys.argv[1])
    stages = {}
    for argument in sys.argv[2:]:
        stage, outcome = argument.split("=", 1)
        status, seconds = outcome.rsplit(":", 1)
        stages[stage] = (status, float(seconds))
    text = summary(output_dir, stages)
    (output_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
