"""Two CPU processes over gloo: DDP (torchrun and `accelerate launch --multi_gpu`) and DeepSpeed ZeRO-2/3.

Every launch has a timeout, so a hang (a process left waiting in a collective) fails the test instead of blocking CI.
"""

import json
import os
import subprocess
import sys

import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "chord_multiprocess.py")
BIN = os.path.dirname(sys.executable)
LAUNCHERS = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"],
}


def launch(launcher, model_dir, output, *script_args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = LAUNCHERS[launcher] + [SCRIPT, "--model", model_dir, "--output", str(output), *script_args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_shards_disjoint_within_each_pass(ranks, num_examples):
    for rank in ranks:
        assert rank["num_processes"] == 2
    streams = [sum(rank["drawn"], []) for rank in ranks]
    # The first pass of each process is its first `shard_size` draws: disjoint, and together every example once
    first_pass = [set(stream[: rank["shard_size"]]) for stream, rank in zip(streams, ranks)]
    assert all(len(part) == rank["shard_size"] for part, rank in zip(first_pass, ranks))
    assert first_pass[0].isdisjoint(first_pass[1])
    assert first_pass[0] | first_pass[1] == set(range(num_examples))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_ranks_see_disjoint_experts_and_end_with_identical_weights(tiny_model_dir, tmp_path, launcher):
    ranks = launch(launcher, tiny_model_dir, tmp_path, "--num-expert-examples", "13", "--max-steps", "3")
    assert_shards_disjoint_within_each_pass(ranks, 13)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] is not None
    # Each rank drew one expert micro-batch per micro-step: 3 steps x 2 accumulation steps
    assert all(len(rank["drawn"]) == 6 for rank in ranks)
    # The logged SFT loss is reduced across processes, so both ranks log the same value
    assert ranks[0]["sft_loss"] == ranks[1]["sft_loss"] and None not in ranks[0]["sft_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_with_mu_crossing_to_zero(tiny_model_dir, tmp_path, zero_stage):
    ranks = launch(
        "torchrun",
        tiny_model_dir,
        tmp_path,
        "--zero-stage",
        str(zero_stage),
        "--max-steps",
        "4",
        "--mu-decay-steps",
        "2",
        "--num-expert-examples",
        "13",
    )
    assert ranks[0]["mu"] == ranks[1]["mu"] == [0.5, 0.25, 0.0, 0.0]
    # Expert micro-batches only while mu > 0: 2 steps x 2 accumulation steps, on both ranks alike
    assert all(len(rank["drawn"]) == 4 for rank in ranks)
    assert ranks[0]["sft_loss"][2:] == [None, None] and None not in ranks[0]["sft_loss"][:2]
    assert_shards_disjoint_within_each_pass(ranks, 13)
