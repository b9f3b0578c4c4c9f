"""Two CPU processes over gloo: DDP (torchrun and `accelerate launch --multi_gpu`) and DeepSpeed ZeRO-2/3, with
ChordTrainer and, where marked, ChordRLOOTrainer (`--trainer rloo`) and ChordAsyncGRPOTrainer (`--trainer async_grpo`).

Every launch has a timeout, so a hang (a process left waiting in a collective) fails the test instead of blocking CI.
"""

import json
import os
import sys

import pytest
import torch
from bounded_run import run_bounded
from helpers import async_grpo_unavailable, held_out_oracle, held_out_sources
from transformers import AutoModelForCausalLM


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "chord_multiprocess.py")
BIN = os.path.dirname(sys.executable)
LAUNCHERS = {
    "torchrun": [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2"],
    "accelerate": [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"],
}


def launch(launcher, model_dir, output, *script_args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = LAUNCHERS[launcher] + [SCRIPT, "--model", model_dir, "--output", str(output), *script_args]
    completed = run_bounded(command, env=env, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_shards_disjoint_within_each_pass(ranks, num_examples):
    for rank in ranks:
        assert rank["num_processes"] == 2
    streams = [sum(rank["drawn"], []) for rank in ranks]
    # Pass e of a process is its draws e * shard_size to (e + 1) * shard_size: in every pass both processes completed,
    # their examples are disjoint, and together every example once
    num_passes = min(len(stream) // rank["shard_size"] for stream, rank in zip(streams, ranks))
    assert num_passes >= 1
    for epoch in range(num_passes):
        parts = [stream[epoch * r["shard_size"] : (epoch + 1) * r["shard_size"]] for stream, r in zip(streams, ranks)]
        assert all(len(set(part)) == len(part) for part in parts)
        assert set(parts[0]).isdisjoint(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(range(num_examples))


@pytest.mark.slow
@pytest.mark.parametrize("launcher, trainer", [("torchrun", "grpo"), ("accelerate", "grpo"), ("torchrun", "rloo")])
def test_ddp_ranks_see_disjoint_experts_and_end_with_identical_weights(tiny_model_dir, tmp_path, launcher, trainer):
    ranks = launch(
        launcher, tiny_model_dir, tmp_path, "--num-expert-examples", "13", "--max-steps", "3", "--trainer", trainer
    )
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


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 3], ids=["ddp", "zero3"])
def test_expert_set_smaller_than_one_global_expert_batch_repeats(tiny_model_dir, tmp_path, zero_stage):
    # 3 examples for 2 processes x 2 per micro-batch: each process's micro-batches wrap around its shard (documented)
    extra = [] if zero_stage is None else ["--zero-stage", str(zero_stage)]
    ranks = launch("torchrun", tiny_model_dir, tmp_path, "--num-expert-examples", "3", "--max-steps", "2", *extra)
    assert [rank["shard_size"] for rank in ranks] == [2, 1]
    assert all(len(rank["drawn"]) == 4 for rank in ranks)  # 2 steps x 2 accumulation steps, on both ranks
    # Rank 1 has one example per pass, so each of its micro-batches spans two passes (reshuffled each pass)
    assert len(sum(ranks[1]["drawn"], [])) == 8
    assert_shards_disjoint_within_each_pass(ranks, 3)


@pytest.mark.slow
def test_ddp_and_deepspeed_updates_match_one_joint_backward(tiny_model_dir, tmp_path):
    # Plain SGD, so every run's update is its summed gradient: DDP with the expert term backpropagated first, and
    # DeepSpeed ZeRO-2/3 (one backward, with the expert head gathering the ZeRO-3 LM head), against DDP with one
    # backward through (1 - mu) * grpo + mu * sft
    runs = {
        "ddp_joint": ["--joint-backward"],
        "ddp": [],
        "zero2": ["--zero-stage", "2"],
        "zero3": ["--zero-stage", "3"],
    }
    weights, backward_first = {}, {}
    for name, extra in runs.items():
        output = tmp_path / name
        output.mkdir()
        ranks = launch("torchrun", tiny_model_dir, output, "--sgd", "--max-steps", "2", *extra)
        backward_first[name] = ranks[0]["backward_expert_term_first"]
        weights[name] = torch.load(output / "weights.pt")
    assert backward_first == {"ddp_joint": False, "ddp": True, "zero2": False, "zero3": False}

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    oracle = weights.pop("ddp_joint")
    largest_update = max((oracle[key] - initial[key]).abs().max().item() for key in oracle)
    assert largest_update > 1e-3
    for name, run in weights.items():
        assert set(run) == set(oracle), name
        for key in oracle:
            # Weights of order 1 are spaced 1.2e-7 apart, and the processes sum in different orders
            torch.testing.assert_close(
                run[key] - initial[key], oracle[key] - initial[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}"
            )


@pytest.mark.slow
def test_rloo_on_two_processes_mixes_rloos_update_and_the_expert_terms(tiny_model_dir, tmp_path):
    # One plain SGD step of 2 accumulated micro-steps on each of 2 processes. The oracle: TRL's own RLOOTrainer (DDP)
    # for the RLOO part, and the mu = 1 run (no RLOO term: the expert term alone, checked against an independent
    # gradient on 2 processes by the aggregation test above) for the SFT part. mu = 0 must be RLOOTrainer bit for bit;
    # mu = 0.5 must be (1 - mu) * RLOO + mu * SFT under DDP (expert backward first) and under ZeRO-3 (one backward).
    runs = {
        "rloo": ["--plain"],
        "mu0": ["--mu-peak", "0"],
        "mu1": ["--mu-peak", "1"],
        "ddp": ["--mu-peak", "0.5"],
        "zero3": ["--mu-peak", "0.5", "--zero-stage", "3"],
    }
    weights, ranks = {}, {}
    for name, extra in runs.items():
        output = tmp_path / name
        output.mkdir()
        script_args = ["--trainer", "rloo", "--sgd", "--max-steps", "1", *extra]
        ranks[name] = launch("torchrun", tiny_model_dir, output, *script_args)
        weights[name] = torch.load(output / "weights.pt")
    assert ranks["rloo"][0]["weights_sha256"] == ranks["mu0"][0]["weights_sha256"] is not None
    assert ranks["rloo"][0]["losses"] == ranks["mu0"][0]["losses"]
    assert ranks["mu1"][0]["on_policy_skipped"] == [1.0]
    assert [rank["backward_expert_term_first"] for rank in ranks["ddp"] + ranks["zero3"]] == [True] * 2 + [False] * 2
    # The same expert micro-batches in the mu = 1 run and the mixed ones
    assert ranks["mu1"][0]["drawn"] == ranks["ddp"][0]["drawn"] == ranks["zero3"][0]["drawn"]

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    rloo_update = {key: weights["rloo"][key] - initial[key] for key in weights["rloo"]}
    sft_update = {key: weights["mu1"][key] - initial[key] for key in weights["mu1"]}
    assert max(update.abs().max().item() for update in rloo_update.values()) > 1e-3
    assert max(update.abs().max().item() for update in sft_update.values()) > 1e-3
    for name in ("ddp", "zero3"):
        for key, update in rloo_update.items():
            torch.testing.assert_close(
                weights[name][key] - initial[key],
                0.5 * update + 0.5 * sft_update[key],
                rtol=1e-4,
                atol=1e-6,
                msg=f"{name} {key}",
            )


@pytest.mark.slow
@pytest.mark.skipif(async_grpo_unavailable() is not None, reason="TRL's AsyncGRPOTrainer needs transformers 5")
def test_async_grpo_on_two_processes(tiny_model_dir, tmp_path):
    # ChordAsyncGRPOTrainer under DDP, rollouts from the in-process worker of tests/async_grpo_cpu.py on the main
    # process. mu = 0 is AsyncGRPOTrainer bit for bit. With mu crossing from 1 to 0 (1, 0.5, 0), both processes run
    # the expert forward at the same micro-steps (a process waiting in a collective would hang the run: the launch
    # has a timeout), skip the same GRPO forward, draw disjoint expert examples, and end with the same weights.
    runs = {"plain": ["--plain"], "mu0": ["--mu-peak", "0"], "crossing": ["--mu-peak", "1", "--mu-decay-steps", "2"]}
    ranks = {}
    for name, extra in runs.items():
        output = tmp_path / name
        output.mkdir()
        ranks[name] = launch("torchrun", tiny_model_dir, output, "--trainer", "async_grpo", "--max-steps", "3", *extra)
    assert ranks["plain"][0]["weights_sha256"] == ranks["mu0"][0]["weights_sha256"] is not None
    assert ranks["plain"][0]["losses"] == ranks["mu0"][0]["losses"]
    crossing = ranks["crossing"]
    for rank in crossing:
        assert rank["mu"] == [1.0, 0.5, 0.0]
        assert rank["on_policy_skipped"] == [1.0, 0.0, 0.0]
        assert len(rank["drawn"]) == 4  # 2 steps with mu > 0 x 2 micro-steps
    assert crossing[0]["sft_loss"] == crossing[1]["sft_loss"] and crossing[0]["sft_loss"][2] is None
    assert crossing[0]["weights_sha256"] == crossing[1]["weights_sha256"] is not None
    assert_shards_disjoint_within_each_pass(crossing, 13)


@pytest.fixture(scope="module")
def untied_tiny_model_dir(tmp_path_factory):
    """The tiny model with its own LM head (FSDP2 shards tied weights only through accelerate's plugin)."""
    from trl_chord.demo.tiny import build_tiny_model, build_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("untied-tiny"))
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fsdp2_oracle_gradients(model_dir):
    """What FSDP2 must produce: the mean over the two ranks of each rank's gradient, on one process, full logits."""
    from trl_chord.losses import expert_sft_loss, token_weights

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from fsdp2_expert_head import batch

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mu, total = 0.5, 0.0
    for rank in range(2):
        expert_ids, expert_labels = batch(100 + rank, model.config.vocab_size)
        other_ids, other_labels = batch(200 + rank, model.config.vocab_size)
        logits = model(input_ids=expert_ids).logits[:, :-1]
        targets = expert_labels[:, 1:]
        mask = targets != -100
        log_probs = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        expert = expert_sft_loss(log_probs, mask, token_weights("phi", log_probs, mask)).loss
        total = total + ((1 - mu) * model(input_ids=other_ids, labels=other_labels).loss + mu * expert) / 2
    total.backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("shard_lm_head", [False, True], ids=["head-in-root", "head-sharded"])
@pytest.mark.parametrize("backward_first", [True, False], ids=["backward-first", "joint-backward"])
def test_fsdp2_expert_head_gradients_equal_the_mean_of_each_ranks(
    untied_tiny_model_dir, tmp_path, backward_first, shard_lm_head
):
    output = tmp_path / "gradients.pt"
    command = [
        os.path.join(BIN, "torchrun"),
        "--nproc_per_node",
        "2",
        os.path.join(os.path.dirname(__file__), "scripts", "fsdp2_expert_head.py"),
        "--model",
        untied_tiny_model_dir,
        "--output",
        str(output),
    ]
    command += ["--backward-first"] if backward_first else []
    command += ["--shard-lm-head"] if shard_lm_head else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = run_bounded(command, env=env, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    result = torch.load(output)
    assert result["probe"] == "chunked"
    expected = fsdp2_oracle_gradients(untied_tiny_model_dir)
    assert set(result["gradients"]) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(result["gradients"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_zero3_chord_micro_step_holds_no_head_gradient_through_the_grpo_pass(tmp_path):
    # The ZeRO-3 memory benchmark's quick run: grpo, chord, chord with the head's gradient held (as before), and the
    # expert term alone, each a micro-step's peak of live tensor bytes on 2 CPU processes
    command = [
        os.path.join(BIN, "torchrun"),
        "--nproc_per_node",
        "2",
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "zero_memory.py"),
        "--quick",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = run_bounded(command, env=env, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    result = json.loads((tmp_path / "quick" / "zero_memory.json").read_text())
    peaks, head_gradient = result["median_peak_bytes"], result["head_gradient_bytes"]
    # Holding the head's fp32 gradient through the GRPO pass costs at least that gradient; the chord step does not
    assert peaks["chord_head_gradient"] - peaks["chord"] >= 0.9 * head_gradient
    assert peaks["chord"] - peaks["grpo"] < 0.5 * head_gradient
    # The bound docs/performance.md states: at most the GRPO micro-step plus the expert term's own step
    assert peaks["chord"] <= peaks["grpo"] + peaks["sft"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "aggregation, normalization, trainer",
    [
        ("token-mean", "none", "grpo"),
        ("seq-mean-token-mean", "none", "grpo"),
        ("seq-mean-token-sum", "none", "grpo"),
        ("seq-mean-token-sum-norm", "none", "grpo"),
        ("token-mean", "mean", "grpo"),
        ("seq-mean-token-mean", "mean", "grpo"),
        ("seq-mean-token-mean", "none", "rloo"),
    ],
)
def test_each_sft_loss_aggregation_on_two_processes_averages_the_micro_batch_aggregates(
    tiny_model_dir, tmp_path, aggregation, normalization, trainer
):
    # mu = 1 (no GRPO or RLOO term), plain SGD, 2 processes x 2 accumulation steps x 2 expert examples of different
    # lengths: each process aggregates its own micro-batch (its phi weights rescaled to mean 1 over it, with
    # normalization="mean"), and the update is -lr times the mean over the 4 micro-batches of their aggregates'
    # gradients (DDP averages over processes, accumulation over micro-steps)
    from helpers import (
        PLAIN_SGD,
        completion_logits,
        expert_nll_gradient,
        make_expert_dataset_of_lengths,
        oracle_weights,
    )
    from test_trainer import _token_scales
    from transformers import AutoTokenizer

    lengths = [1, 9, 3, 14, 2, 11, 6, 4]
    ranks = launch(
        "torchrun",
        tiny_model_dir,
        tmp_path,
        "--sgd",
        "--max-steps",
        "1",
        "--mu-peak",
        "1.0",
        "--aggregation",
        aggregation,
        "--normalization",
        normalization,
        "--expert-lengths",
        *map(str, lengths),
        "--trainer",
        trainer,
    )
    assert all(rank["on_policy_skipped"] == [1.0] and rank["generations"] == [] for rank in ranks)
    expert = make_expert_dataset_of_lengths(lengths)
    micro_batches = ranks[0]["drawn"] + ranks[1]["drawn"]
    assert len(micro_batches) == 4 and sorted(sum(micro_batches, [])) == list(range(8))
    oracle = [
        expert_nll_gradient(tiny_model_dir, expert.select(indices), "phi", aggregation, 64, normalization)
        for indices in micro_batches
    ]
    # The logged effective mu: at each micro-step, sum(c * w) / sum(c) over both processes' micro-batches, averaged
    # over the step's two micro-steps
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def scaled_sums(indices):
        token_weights, token_lengths = [], []
        with torch.no_grad():
            for example in expert.select(indices):
                logits, targets = completion_logits(model, tokenizer, example)
                logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
                token_weights.append(oracle_weights("phi", logits, logps))
                token_lengths.append(len(targets))
        token_weights = torch.cat(token_weights)
        if normalization == "mean":
            token_weights = token_weights / token_weights.mean()
        scales = _token_scales(token_lengths, aggregation, norm_length=64)
        return (scales * token_weights).sum().item(), scales.sum().item()

    per_micro_step = []
    for step in range(2):
        sums = [scaled_sums(rank["drawn"][step]) for rank in ranks]
        per_micro_step.append(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    assert ranks[0]["effective_mu"] == ranks[1]["effective_mu"]
    assert ranks[0]["effective_mu"][0] == pytest.approx(sum(per_micro_step) / 2, rel=1e-4)
    if normalization == "mean" and aggregation == "token-mean":
        assert ranks[0]["effective_mu"][0] == pytest.approx(1.0, rel=1e-5)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    final = torch.load(tmp_path / "weights.pt")
    for name in oracle[0]:  # the parameters (the tied LM head is the embedding)
        expected = -PLAIN_SGD["learning_rate"] * sum(grads[name] for grads in oracle) / len(oracle)
        torch.testing.assert_close(final[name] - initial[name], expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
@pytest.mark.parametrize("zero_stage", [None, 3], ids=["ddp", "zero3"])
def test_mu_one_steps_skip_generation_on_every_process_alike(tiny_model_dir, tmp_path, zero_stage, trainer):
    # mu = 1 at step 1, then decaying: both processes skip the same step's rollouts and on-policy (GRPO or RLOO)
    # forward, and none waits
    extra = ["--trainer", trainer] + ([] if zero_stage is None else ["--zero-stage", str(zero_stage)])
    ranks = launch(
        "torchrun",
        tiny_model_dir,
        tmp_path,
        "--max-steps",
        "3",
        "--mu-peak",
        "1.0",
        "--mu-valley",
        "0.2",
        "--mu-decay-steps",
        "2",
        *extra,
    )
    for rank in ranks:
        assert rank["mu"] == pytest.approx([1.0, 0.6, 0.2])
        assert rank["on_policy_skipped"] == [1.0, 0.0, 0.0]
        assert rank["generations"] == [2, 4]  # one generation per later step (2 micro-steps each)
        assert len(rank["drawn"]) == 6  # the expert term runs on every micro-step
    if zero_stage is None:  # (ZeRO-3 gathers the full weights on rank 0 only)
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("requested", ["auto", "chunked"])
def test_processes_whose_probes_disagree_take_the_same_head(tiny_model_dir, tmp_path, requested):
    command = [
        os.path.join(BIN, "torchrun"),
        "--nproc_per_node",
        "2",
        os.path.join(os.path.dirname(__file__), "scripts", "head_agreement.py"),
        "--model",
        tiny_model_dir,
        "--output",
        str(tmp_path),
        "--requested",
        requested,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = run_bounded(command, env=env, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    if requested == "auto":
        assert ranks[0]["path"] == ranks[1]["path"] == "trl_fused"
    else:
        assert all("chord_expert_head='chunked' would not compute" in rank["error"] for rank in ranks), ranks
        assert "rank 1's borderline case" in ranks[1]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 3], ids=["ddp", "zero3"])
def test_held_out_expert_metrics_on_two_processes_are_the_oracles(tiny_model_dir, tmp_path, zero_stage):
    # 5 held-out rows, 2 per micro-batch: rank 0 evaluates 3 rows in 2 forwards, rank 1 2 rows and an uncounted forward
    # (under ZeRO-3 every forward gathers the weights on both processes together)
    extra = [] if zero_stage is None else ["--zero-stage", str(zero_stage)]
    ranks = launch("torchrun", tiny_model_dir, tmp_path, "--held-out", "--max-steps", "2", *extra)
    # Evaluated after each step, alike on both processes; the last evaluation saw the final weights
    assert len(ranks[0]["held_out"]) == 2 and ranks[0]["held_out"] == ranks[1]["held_out"]
    final_weights = torch.load(tmp_path / "weights.pt")
    oracle = held_out_oracle(tiny_model_dir, held_out_sources(), mu=0.5, state_dict=final_weights)
    del oracle["eval_chord/effective_mu"]  # the oracle's is one micro-batch's (tests/test_expert_eval.py)
    last = ranks[0]["held_out"][-1]
    assert {name: last[name] for name in oracle} == pytest.approx(oracle, rel=1e-5, abs=1e-7)
