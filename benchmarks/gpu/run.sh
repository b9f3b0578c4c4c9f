#!/usr/bin/env bash
# The GPU check in one command, for a machine with one CUDA GPU and no network, in about 8 minutes at most (12 where
# the vLLM tests run):
#   1. installs what trl-chord needs and the machine lacks, from the wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh
#      fills it; nothing is installed when everything is there),
#   2. runs the GPU tests (pytest -m gpu tests/test_gpu.py),
#   3. runs the vLLM tests with TRL's own weight sync (pytest -m vllm tests/test_vllm.py, the weight-sync and LoRA
#      oracles, colocate and server mode), where CUDA and vLLM are both installed: CI runs them on vLLM's CPU build
#      with a CPU transport in place of TRL's; vLLM's wheel is too big to carry in .whl/, so the machine must have it,
#   4. runs the GPU benchmark (benchmarks/gpu/bench.py) in the time left,
# and writes run.log, gpu_tests.xml, vllm_tests.xml (when they ran), gpu_bench.json, gpu_bench.md and summary.md to one
# folder.
#
#   bash benchmarks/gpu/run.sh [OUTPUT_DIR]
#
# OUTPUT_DIR defaults to $OUT when it is set (the device tool's folder), else gpu-check-output/ (git-ignored).
# Without CUDA the tests are all skipped and the benchmark runs its tiny CPU shape: tests/test_gpu_entry_point.py
# runs it that way. Environment: PYTHON (default python3), TRL_CHORD_WHEELS (default .whl/),
# TRL_CHORD_GPU_BUDGET (seconds for the stages together, default 450).
set -uo pipefail
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repository"
output_dir=${1:-${OUT:-$repository/gpu-check-output}}
wheels=${TRL_CHORD_WHEELS:-$repository/.whl}
python=${PYTHON:-python3}
budget=${TRL_CHORD_GPU_BUDGET:-450}  # 8 minutes less half a minute of margin
install_budget=90
tests_budget=240
vllm_budget=240  # a vLLM server and two colocate engines start; added to the budget where the stage runs
mkdir -p "$output_dir"
exec > >(tee "$output_dir/run.log") 2>&1
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

stages=()
run_stage() {  # name, time limit in seconds, command...
    local name=$1 limit=$2 started=$SECONDS status
    shift 2
    echo "== [$SECONDS s] $name (at most $limit s): $*"
    # SIGINT first: pytest then still writes its report, and the benchmark has written its files after every case
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    status=$?
    case $status in
        0) stages+=("$name=ok:$((SECONDS - started))") ;;
        124 | 137) stages+=("$name=timed out:$((SECONDS - started))") ;;
        *) stages+=("$name=failed ($status):$((SECONDS - started))") ;;
    esac
    return $status
}

"$python" -c "import platform, torch; print('Python', platform.python_version(), 'torch', torch.__version__, 'CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

failed=0
if run_stage dependencies "$install_budget" "$python" benchmarks/gpu/install_deps.py "$wheels"; then
    run_stage gpu_tests "$tests_budget" "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -rs \
        --junitxml "$output_dir/gpu_tests.xml" || failed=1
    if "$python" -c "import torch, vllm; assert torch.cuda.is_available()" 2>/dev/null; then
        budget=$((budget + vllm_budget))
        run_stage vllm_tests "$vllm_budget" "$python" -m pytest -m vllm tests/test_vllm.py -p no:cacheprovider -q -rs \
            -k "weights_arrive or lora" --junitxml "$output_dir/vllm_tests.xml" || failed=1
    else
        echo "== [$SECONDS s] vllm_tests skipped: they need CUDA and an installed vLLM"
        stages+=("vllm_tests=skipped (no CUDA or no vLLM):0")
    fi
    # The benchmark gets what is left, less a margin for its own shutdown and the summary
    bench_limit=$((budget - SECONDS - 20))
    if [ "$bench_limit" -lt 30 ]; then bench_limit=30; fi
    run_stage benchmark $((bench_limit + 30)) "$python" benchmarks/gpu/bench.py --output-dir "$output_dir" \
        --time-limit "$bench_limit" || failed=1
else
    failed=1
fi
echo "== [$SECONDS s] summary"
"$python" benchmarks/gpu/summarize.py "$output_dir" "${stages[@]}" || failed=1
echo "== [$SECONDS s] done: $output_dir"
exit $failed
