"""A one-step LUFFY run for the multi-process tests, launched with torchrun (2 CPU processes, DDP or DeepSpeed ZeRO).

One prompt's group of 4 per step, 2 rows on each process (1 per micro-step, 2 accumulation steps), plain SGD: the
group spans the processes and its expert completion sits on process 1. Each process writes `rank{N}.pt` into
`--output`: the rows its reward function scored (prompt, completion tokens, reward), the micro-batches its loss saw
(tokens, masks, advantages, expert rows) and a digest of its final weights; process 0 also writes the weights.
"""

import argparse
import hashlib
import os
import sys

import torch
from transformers import AutoTokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--zero-stage", type=int, default=None)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from helpers import PLAIN_SGD
    from luffy_oracle import expert_first_reward, luffy_prompts, recording

    from trl_chord import LuffyConfig, LuffyTrainer

    deepspeed = None
    if args.zero_stage is not None:
        deepspeed = {
            "zero_optimization": {"stage": args.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    config = LuffyConfig(
        output_dir=os.path.join(args.output, "run"),
        per_device_train_batch_size=1,
        num_generations=4,
        gradient_accumulation_steps=2,
        max_completion_length=16,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        bf16=False,
        save_strategy="no",
        deepspeed=deepspeed,
        # Without a GPU, accelerate only sets up the gloo process group when asked for the CPU explicitly
        use_cpu=not torch.cuda.is_available(),
        **PLAIN_SGD,
    )
    rollouts = []
    trainer = LuffyTrainer(
        model=args.model,
        reward_funcs=recording(expert_first_reward, rollouts),
        args=config,
        train_dataset=luffy_prompts(),
        processing_class=AutoTokenizer.from_pretrained(args.model),
    )
    micro_batches = []
    compute_loss = trainer._compute_loss

    def recording_loss(model, inputs):
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "luffy_off_policy")
        micro_batches.append({key: inputs[key].detach().cpu().clone() for key in keys})
        return compute_loss(model, inputs)

    trainer._compute_loss = recording_loss
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
    if rank == 0:
        torch.save(state_dict, os.path.join(args.output, "weights.pt"))
    logs = {key: value for entry in trainer.state.log_history for key, value in entry.items() if "luffy/" in key}
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "rollouts": [(rollout.prompt, rollout.completion_ids, rollout.reward) for rollout in rollouts],
        "micro_batches": micro_batches,
        "weights_sha256": digest,
        "logs": logs,
    }
    torch.save(result, os.path.join(args.output, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Every result is on disk: leave without the interpreter's teardown, where a ZeRO-3 rank can abort after a
    # complete run (tests/scripts/chord_multiprocess.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
