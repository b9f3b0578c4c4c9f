"""A short one-process CHORD run that can kill itself (SIGKILL) between steps or in the middle of a checkpoint save.

Every expert micro-batch it draws is appended to `--draws` as it is drawn, so what a killed run trained on survives
it. At the end, `--result` gets the logged mu and SFT loss per step and a digest of the final weights.
"""

import argparse
import hashlib
import json
import os
import signal
import sys

import torch
from transformers import AutoTokenizer, TrainerCallback


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import make_expert_dataset, make_rl_prompts, odd_char_reward  # noqa: E402

from trl_chord import ChordConfig, ChordTrainer  # noqa: E402


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            kill_self()  # after the optimizer step, before that step's checkpoint is saved


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--draws", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--kill_after_step", type=int)
    parser.add_argument("--kill_during_save_at_step", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    config = ChordConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        bf16=False,
        learning_rate=1e-2,
        chord_mu_peak=0.9,
        chord_mu_valley=0.1,
        chord_mu_decay_steps=4,
        chord_sft_per_device_train_batch_size=3,
    )
    trainer = ChordTrainer(
        model=args.model,
        reward_funcs=odd_char_reward,
        args=config,
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_dataset(7),
        processing_class=AutoTokenizer.from_pretrained(args.model),
    )
    next_batch = trainer.expert_sampler.next_batch

    def recorded_next_batch():
        indices = next_batch()
        with open(args.draws, "a") as file:
            file.write(json.dumps({"step": trainer.state.global_step + 1, "indices": indices}) + "\n")
        return indices

    trainer.expert_sampler.next_batch = recorded_next_batch
    if args.kill_after_step is not None:
        trainer.add_callback(KillAfterStep(args.kill_after_step))
    if args.kill_during_save_at_step is not None:
        save_rng_state = trainer._save_rng_state

        def save_rng_state_then_die(output_dir):
            save_rng_state(output_dir)
            if trainer.state.global_step == args.kill_during_save_at_step:
                kill_self()  # trainer_state.json, written last, never lands: an incomplete checkpoint

        trainer._save_rng_state = save_rng_state_then_die

    trainer.train(resume_from_checkpoint=True if args.resume else None)
    digest = hashlib.sha256()
    for name, param in sorted(trainer.model.named_parameters()):
        digest.update(name.encode() + param.detach().to(torch.float32).numpy().tobytes())
    history = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    with open(args.result, "w") as file:
        json.dump(
            {
                "mu": [entry["chord/mu"] for entry in history],
                "sft_loss": [entry["chord/sft_loss"] for entry in history],
                "steps": [entry["step"] for entry in history],
                "weights_sha256": digest.hexdigest(),
            },
            file,
        )


if __name__ == "__main__":
    main()
