"""Two CPU processes over gloo (torchrun) whose probes disagree: every process must take the same expert head.

Rank 1's probe is made to find the chunked head inexact (as a borderline case could on one rank only); rank 0's
finds it exact. With `--requested auto`, both must take TRL's fused head; with `--requested chunked`, both must refuse
(an error on one rank only would leave the other waiting in the next collective). Each rank writes what it chose, or
the error it raised, to `<output>/rank<r>.json`.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import trl_chord.expert_head.choice as head_choice
from trl_chord.expert_head.forward import add_expert_loss_head


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--requested", default="auto")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    probe = head_choice.probe_lm_head

    def probe_that_rank_1_doubts(*probe_args, **kwargs):
        problems = probe(*probe_args, **kwargs)
        if rank == 1 and "chunked" in problems:
            problems["chunked"] = "rank 1's borderline case"
        return problems

    head_choice.probe_lm_head = probe_that_rank_1_doubts
    model = AutoModelForCausalLM.from_pretrained(args.model)
    add_expert_loss_head(model, weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False, head=args.requested)
    input_ids = torch.arange(3, 23).reshape(2, 10)
    labels = input_ids.clone()
    labels[:, :4] = -100
    try:
        mask = torch.ones_like(input_ids)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, chord_expert_loss=True)
        result = {"path": model.chord_expert_head.choice.path, "loss": out.loss.item()}
    except ValueError as error:
        result = {"error": str(error)}
    dist.barrier()  # a rank left behind by the other would hang here until the test's timeout
    with open(os.path.join(args.output, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
