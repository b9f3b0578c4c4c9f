"""The expert term under FSDP2 (torch's `fully_shard`), two CPU processes over gloo, launched with torchrun.

accelerate does not turn FSDP on for CPU processes (see docs/reliability.md), so this runs `fully_shard` directly, as
accelerate's FSDP2 plugin would wrap the model: each decoder layer, then the root (and, with `--shard-lm-head`, the LM
head on its own, which makes its weight a sharded DTensor outside its own forward). Each rank takes its own expert
micro-batch and a second loss standing in for the GRPO term, and backpropagates either the expert term first and the
other after (`--backward-first`, the head computing its gradient in the forward) or their sum at once (the head
recomputing in the backward). Rank 0 writes every parameter's gradient, gathered, to `--output`.
"""

import argparse
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from trl_chord.expert_head.forward import add_expert_loss_head


def batch(seed: int, vocab_size: int):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 10), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = -100
    return input_ids, labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--backward-first", action="store_true")
    parser.add_argument("--shard-lm-head", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model = AutoModelForCausalLM.from_pretrained(args.model)
    add_expert_loss_head(model, weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False)
    for layer in model.model.layers:
        fully_shard(layer)
    if args.shard_lm_head:
        fully_shard(model.lm_head)
    fully_shard(model)

    mu = 0.5
    expert_ids, expert_labels = batch(100 + rank, model.config.vocab_size)
    other_ids, other_labels = batch(200 + rank, model.config.vocab_size)
    expert_kwargs = dict(
        input_ids=expert_ids,
        attention_mask=torch.ones_like(expert_ids),
        labels=expert_labels,
        chord_expert_loss=True,
        chord_head_gradient_in_forward=args.backward_first,
    )
    if args.backward_first:
        (mu * model(**expert_kwargs).loss).backward()
        ((1 - mu) * model(input_ids=other_ids, labels=other_labels).loss).backward()
    else:
        expert = model(**expert_kwargs).loss
        ((1 - mu) * model(input_ids=other_ids, labels=other_labels).loss + mu * expert).backward()
    probe = model.chord_expert_head.choice.path
    gradients = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    if rank == 0:
        torch.save({"gradients": gradients, "probe": probe}, args.output)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
