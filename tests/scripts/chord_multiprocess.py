"""A short CHORD run for the multi-process tests, launched with torchrun or `accelerate launch`.

Each process writes `rank{N}.json` into `--output`: the expert example indices it drew, the mu and loss it logged, and
a digest of its final weights (the full weights, gathered, under DeepSpeed ZeRO-3). `--trainer rloo` runs
ChordRLOOTrainer instead of ChordTrainer, `--trainer async_grpo` ChordAsyncGRPOTrainer (rollouts from the in-process
worker of tests/async_grpo_cpu.py, on the main process); `--plain` runs TRL's own trainer (GRPOTrainer, RLOOTrainer,
AsyncGRPOTrainer) on the same settings, for the tests' oracles.
"""

import argparse
import hashlib
import json
import os
import sys

import torch
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_chord import ChordConfig, ChordRLOOConfig, ChordRLOOTrainer, ChordTrainer


PER_DEVICE_BATCH_SIZE, ACCUMULATION_STEPS = 2, 2


def trainer_classes(name: str) -> tuple:
    """For `--trainer`: the CHORD config and trainer, TRL's own ones (`--plain`), and the options it needs here."""
    if name == "grpo":
        return ChordConfig, ChordTrainer, GRPOConfig, GRPOTrainer, {}
    if name == "rloo":
        # RLOOConfig's beta defaults to 0.05, which would load a reference model; GRPOConfig's is 0
        return ChordRLOOConfig, ChordRLOOTrainer, RLOOConfig, RLOOTrainer, {"beta": 0.0}
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from trl_chord.chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer

    # Fixed-count batching (no vLLM server to size a token budget), and no gradient checkpointing (its default)
    options = {"token_budget": 0, "gradient_checkpointing": False}
    return ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer, AsyncGRPOConfig, AsyncGRPOTrainer, options


def rollout_source(trainer_name: str, model: str, num_processes: int) -> dict:
    """AsyncGRPOTrainer's rollout worker and weight sync on a CPU (tests/async_grpo_cpu.py); nothing for the others,
    which generate their own rollouts."""
    if trainer_name != "async_grpo":
        return {}
    import pytest
    from async_grpo_cpu import HFRolloutWorker, InProcessWeightTransfer, cpu_seams
    from helpers import make_rl_prompts, odd_char_reward

    cpu_seams(pytest.MonkeyPatch())
    # Only the main process's worker is used (AsyncGRPOTrainer dispatches each micro-batch's rows from there)
    worker = HFRolloutWorker(
        model,
        make_rl_prompts(),
        [odd_char_reward],
        AutoTokenizer.from_pretrained(model),
        step_samples=PER_DEVICE_BATCH_SIZE * ACCUMULATION_STEPS * num_processes,
        num_generations=4,
        max_completion_length=6,
    )
    return {"rollout_worker": worker, "weight_transfer": InProcessWeightTransfer(worker)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--zero-stage", type=int, default=None)
    parser.add_argument("--num-expert-examples", type=int, default=13)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--mu-peak", type=float, default=0.5)
    parser.add_argument("--mu-valley", type=float, default=None, help="defaults to 0 with decay steps, else the peak")
    parser.add_argument("--mu-decay-steps", type=int, default=0)
    parser.add_argument("--aggregation", default="token-mean")
    parser.add_argument("--normalization", default="none", help="chord_token_weight_normalization")
    parser.add_argument("--expert-lengths", type=int, nargs="*", help="completion lengths (characters) of the experts")
    parser.add_argument("--sgd", action="store_true", help="plain SGD, so that runs can be compared weight by weight")
    parser.add_argument("--joint-backward", action="store_true", help="one backward through both terms")
    parser.add_argument("--trainer", choices=["async_grpo", "grpo", "rloo"], default="grpo", help="on-policy trainer")
    parser.add_argument("--plain", action="store_true", help="TRL's own trainer, without CHORD (no chord_* options)")
    parser.add_argument(
        "--held-out", action="store_true", help="helpers.held_out_sources as eval_expert_dataset, evaluated every step"
    )
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import (
        PLAIN_SGD,
        make_expert_dataset,
        make_expert_dataset_of_lengths,
        held_out_sources,
        make_rl_prompts,
        odd_char_reward,
    )

    deepspeed = None
    if args.zero_stage is not None:
        deepspeed = {
            "zero_optimization": {"stage": args.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
        if not args.sgd:
            deepspeed["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
    optimizer_args = PLAIN_SGD if args.sgd else {"learning_rate": 1e-2}
    classes = trainer_classes(args.trainer)
    chord_config_class, chord_trainer_class, plain_config_class, plain_trainer_class, trainer_options = classes
    chord_options = dict(
        chord_mu_peak=args.mu_peak,
        chord_mu_valley=args.mu_valley
        if args.mu_valley is not None
        else (0.0 if args.mu_decay_steps else args.mu_peak),
        chord_mu_decay_steps=args.mu_decay_steps,
        chord_sft_loss_agg_mode=args.aggregation,
        chord_token_weight_normalization=args.normalization,
        chord_sft_max_length=64,
        chord_sft_per_device_train_batch_size=2,
    )
    config_class = plain_config_class if args.plain else chord_config_class
    config = config_class(
        output_dir=os.path.join(args.output, "run"),
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        num_generations=4,
        gradient_accumulation_steps=ACCUMULATION_STEPS,
        max_completion_length=6,
        max_steps=args.max_steps,
        logging_steps=1,
        report_to="none",
        bf16=False,
        save_strategy="no",
        **(dict(eval_strategy="steps", eval_steps=1) if args.held_out else {}),
        deepspeed=deepspeed,
        # Without a GPU, accelerate only sets up the gloo process group when asked for the CPU explicitly
        use_cpu=not torch.cuda.is_available(),
        **optimizer_args,
        **trainer_options,
        **({} if args.plain else chord_options),
    )
    expert_options = {}
    if not args.plain:
        expert_options["expert_dataset"] = (
            make_expert_dataset_of_lengths(args.expert_lengths)
            if args.expert_lengths
            else make_expert_dataset(args.num_expert_examples)
        )
    if args.held_out:
        expert_options["eval_expert_dataset"] = held_out_sources()
    trainer = (plain_trainer_class if args.plain else chord_trainer_class)(
        model=args.model,
        reward_funcs=odd_char_reward,
        args=config,
        train_dataset=make_rl_prompts(),
        processing_class=AutoTokenizer.from_pretrained(args.model),
        **expert_options,
        **rollout_source(args.trainer, args.model, int(os.environ["WORLD_SIZE"])),
    )
    if args.joint_backward:
        trainer.backward_expert_term_first = False
    drawn, generations = [], []
    # No expert sampler in TRL's own trainer, nor where mu is 0 at every step (the expert data is dropped)
    expert_sampler = getattr(trainer, "expert_sampler", None)
    if expert_sampler is not None:
        next_batch = trainer.expert_sampler.next_batch
        trainer.expert_sampler.next_batch = lambda: drawn.append(next_batch()) or drawn[-1]
    if args.trainer != "async_grpo":  # (AsyncGRPOTrainer's rollouts come from its worker)
        generate = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda inputs: generations.append(trainer._step) or generate(inputs)
    trainer.train()

    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    digest = None
    if state_dict is not None:
        digest = hashlib.sha256()
        for name in sorted(state_dict):
            digest.update(name.encode())
            digest.update(state_dict[name].detach().to(torch.float32).contiguous().numpy().tobytes())
        digest = digest.hexdigest()
    rank = trainer.accelerator.process_index
    logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    if rank == 0:
        torch.save(state_dict, os.path.join(args.output, "weights.pt"))
    result = {
        "rank": rank,
        "num_processes": trainer.accelerator.num_processes,
        "drawn": drawn,
        "shard_size": None if expert_sampler is None else expert_sampler.shard_size,
        "mu": [entry["chord/mu"] for entry in logs],
        "sft_loss": [entry.get("chord/sft_loss") for entry in logs],
        "effective_mu": [entry.get("chord/effective_mu") for entry in logs],
        # `chord/grpo_skipped` (ChordTrainer, ChordAsyncGRPOTrainer) or `chord/rloo_skipped`
        "on_policy_skipped": [entry.get(f"chord/{args.trainer.removeprefix('async_')}_skipped") for entry in logs],
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "generations": generations,
        "weights_sha256": digest,
        "backward_expert_term_first": None if args.plain else trainer.backward_expert_term_first,
        "held_out": [entry for entry in trainer.state.log_history if "eval_chord/expert_nll" in entry],
    }
    with open(os.path.join(args.output, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    # Leave together and tear the process group down explicitly: a rank exiting while the other still saves, and
    # left to the interpreter's teardown, aborted once under ZeRO-3 ("terminate called without an active exception")
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Every result is on disk: leave without the interpreter's teardown, where a DeepSpeed ZeRO-3 rank still aborted
    # now and then ("terminate called without an active exception") after a complete run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
