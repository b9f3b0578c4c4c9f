"""
Peak memory of a CHORD micro-step against a GRPO-only micro-step under DeepSpeed ZeRO, two CPU processes over gloo.

    torchrun --nproc_per_node 2 benchmarks/zero_memory.py [--zero-stage 3] [--quick] [--output-dir DIR]

Under DeepSpeed (and FSDP) the two terms share one backward, so the expert forward's graph waits through the GRPO
forward and backward. The variants, run one after the other in the same processes on the same seed (so the same GRPO
batches and expert micro-batches):

- grpo:                ChordTrainer with mu = 0 and no expert data (GRPOTrainer's step, bit for bit);
- chord:               mu = 0.5, the expert head as ChordTrainer runs it under DeepSpeed: it keeps the hidden states
                       and recomputes the logits in the backward;
- chord_head_gradient: mu = 0.5 with the head's gradient computed in the forward and held through the GRPO pass, as
                       trl_chord did before (a full fp32 `(vocab, hidden)` tensor);
- sft:                 the expert forward and backward alone (`model(..., chord_expert_loss=True)` through the engine),
                       on the expert micro-batches the chord variant draws.

Peak memory is the peak of live tensor bytes during a micro-step above those alive at its start, from the PyTorch
profiler's allocation events (generation and reward scoring, done before, are not counted). Each rank measures its
own; the report takes the largest over ranks of each micro-step's median. Writes `zero_memory.json` and prints a
markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

import torch
import transformers
import trl
from chord_overhead import build_tokenizer, expert_dataset, seeded_random_reward
from datasets import Dataset

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.demo.memory import memory_profiler, peak_live_bytes
from trl_chord.demo.tiny import build_tiny_model


MIB = 2**20


class MicroStepMemory:
    """The peak live tensor bytes of each training micro-step, from after its inputs are prepared to its end."""

    def __init__(self, trainer: ChordTrainer):
        self.peaks: list[int] = []
        self._profiler = None
        prepare_inputs, training_step = trainer._prepare_inputs, trainer.training_step

        def prepare_then_start(inputs):
            prepared = prepare_inputs(inputs)
            self._profiler = memory_profiler().__enter__()
            return prepared

        def step_then_stop(*args, **kwargs):
            result = training_step(*args, **kwargs)
            self._profiler.__exit__(None, None, None)
            self.peaks.append(peak_live_bytes(self._profiler))
            return result

        trainer._prepare_inputs = prepare_then_start
        trainer.training_step = step_then_stop


def force_head_gradient_in_forward(trainer: ChordTrainer) -> None:
    """Make the expert head compute its gradient in the forward even though the backward is deferred (as before)."""
    model = trainer.model
    forward = model.forward

    def forward_with_head_gradient(*args, **kwargs):
        if kwargs.get("chord_expert_loss"):
            kwargs["chord_head_gradient_in_forward"] = True
        return forward(*args, **kwargs)

    model.forward = forward_with_head_gradient


def build_trainer(variant: str, sizes: dict, zero_stage: int, output_dir: str) -> ChordTrainer:
    tokenizer = build_tokenizer(sizes["vocab_size"])
    model = build_tiny_model(
        tokenizer,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=4,
        intermediate_size=4 * sizes["hidden_size"],
    )
    mu = 0.0 if variant == "grpo" else 0.5
    args = ChordConfig(
        output_dir=output_dir,
        per_device_train_batch_size=sizes["num_generations"],
        num_generations=sizes["num_generations"],
        max_completion_length=sizes["completion_length"],
        generation_kwargs={"min_new_tokens": sizes["completion_length"]},
        max_steps=sizes["steps"],
        optim="sgd",
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        bf16=False,
        seed=0,
        use_cpu=True,
        chord_mu_peak=mu,
        chord_mu_valley=mu,
        chord_sft_per_device_train_batch_size=sizes["expert_batch_size"],
        deepspeed={
            "zero_optimization": {"stage": zero_stage},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        },
    )
    experts = None
    if variant != "grpo":
        lengths = [sizes["expert_length"]] * 16
        experts = expert_dataset(tokenizer, lengths, seed=0)
    return ChordTrainer(
        model=model,
        reward_funcs=seeded_random_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [f"Task {index}: " for index in range(64)]}),
        processing_class=tokenizer,
        expert_dataset=experts,
    )


def run_variant(variant: str, sizes: dict, zero_stage: int, scratch: str) -> list[int]:
    trainer = build_trainer(variant, sizes, zero_stage, os.path.join(scratch, variant))
    if variant == "chord_head_gradient":
        force_head_gradient_in_forward(trainer)
    memory = MicroStepMemory(trainer)
    if variant == "sft":
        # The GRPO term is computed and dropped outside the measured region: only the expert term's forward and
        # backward run inside it (through the engine, so ZeRO gathers and reduces as in training)
        def expert_only_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            expert, _ = trainer._expert_loss(model)
            return expert.loss * trainer.chord_mu

        trainer.compute_loss = expert_only_loss
    trainer.train()
    assert trainer.backward_expert_term_first is False
    return memory.peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (the tests' smoke run)")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = dict(
        vocab_size=32768,
        hidden_size=64,
        num_hidden_layers=2,
        num_generations=4,
        completion_length=32,
        expert_batch_size=2,
        expert_length=128,
        steps=4,
    )
    if args.quick:
        sizes.update(vocab_size=8192, hidden_size=32, completion_length=16, expert_length=64, steps=3)
    variants = ["grpo", "chord", "chord_head_gradient", "sft"]
    with tempfile.TemporaryDirectory() as scratch:
        peaks = {variant: run_variant(variant, sizes, args.zero_stage, scratch) for variant in variants}
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, peaks)
    if rank == 0:
        # The first micro-step sets up the engine's buffers: medians of the others, the largest over ranks
        medians = {v: max(statistics.median(rank_peaks[v][1:]) for rank_peaks in gathered) for v in variants}
        head_gradient_bytes = 4 * sizes["vocab_size"] * sizes["hidden_size"]
        result = {
            "zero_stage": args.zero_stage,
            "processes": world_size,
            "sizes": sizes,
            "peaks_per_rank": gathered,
            "median_peak_bytes": medians,
            "head_gradient_bytes": head_gradient_bytes,
            "machine": {
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        output_dir = os.path.join(args.output_dir, "quick") if args.quick else args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "zero_memory.json"), "w") as file:
            json.dump(result, file, indent=1)
        print(markdown_report(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # The results are written: leave without the interpreter's teardown, where a DeepSpeed ZeRO-3 rank now and then
    # aborts after a complete run ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def markdown_report(result: dict) -> str:
    medians, grpo = result["median_peak_bytes"], result["median_peak_bytes"]["grpo"]
    lines = [
        f"ZeRO-{result['zero_stage']}, {result['processes']} CPU processes (gloo); vocabulary "
        f"{result['sizes']['vocab_size']}, hidden {result['sizes']['hidden_size']}: the head's fp32 gradient is "
        f"{result['head_gradient_bytes'] / MIB:.1f} MiB.",
        "",
        "| variant | micro-step peak (MiB) | minus grpo (MiB) |",
        "| --- | --- | --- |",
    ]
    for variant, peak in medians.items():
        lines.append(f"| {variant} | {peak / MIB:.2f} | {(peak - grpo) / MIB:+.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
