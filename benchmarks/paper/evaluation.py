"""Held-out evaluation by greedy decoding: accuracy, mean answer length and the policy's mean per-token entropy."""

from dataclasses import asdict, dataclass

import torch
from task import WORKED_ANSWER, text_reward
from transformers import TrainerCallback


@dataclass
class Evaluation:
    step: int
    accuracy: float
    carry_accuracy: float  # on the held-out sums that need a carry, which the starting model never saw
    worked_style: float  # fraction of answers in the expert's worked style
    mean_length: float  # completion tokens up to and including the end token
    mean_entropy: float  # nats, of the untempered next-token distribution at each greedy answer token


@torch.no_grad()
def evaluate(model, tokenizer, prompts, answers, carries, max_new_tokens: int, step: int = 0) -> Evaluation:
    """Greedy-decodes every prompt in one batch; entropies come from the logits of that same generation pass."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    inputs = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    tokenizer.padding_side = padding_side
    was_training = model.training
    model.eval()
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    model.train(was_training)
    completion_ids = output.sequences[:, inputs["input_ids"].shape[1] :]
    mask = answer_token_mask(completion_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    logits = torch.stack(output.logits, dim=1).float()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    correct = [text_reward(text, answer) == 1.0 for text, answer in zip(texts, answers, strict=True)]
    carry_correct = [is_correct for is_correct, carry in zip(correct, carries, strict=True) if carry]
    return Evaluation(
        step=step,
        accuracy=sum(correct) / len(texts),
        carry_accuracy=sum(carry_correct) / max(len(carry_correct), 1),
        worked_style=sum(WORKED_ANSWER.fullmatch(text) is not None for text in texts) / len(texts),
        mean_length=mask.sum().item() / len(texts),
        mean_entropy=(entropy * mask).sum().item() / max(mask.sum().item(), 1),
    )


def answer_token_mask(completion_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """1 for each generated token up to and including the first end token, 0 for the padding after it."""
    is_end = (completion_ids == eos_token_id) | (completion_ids == pad_token_id)
    ends_before = is_end.cumsum(dim=1) - is_end.long()
    return (ends_before == 0).float()


class HeldOutEvaluationCallback(TrainerCallback):
    """Evaluates the held-out prompts every `every_n_steps` optimizer steps and at the end; `history` keeps them."""

    def __init__(self, trainer, heldout, every_n_steps: int, max_new_tokens: int, step_offset: int = 0):
        self.trainer = trainer
        self.heldout = heldout
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        # A second phase (SFT then GRPO) continues the first phase's step count on the curve
        self.step_offset = step_offset
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            evaluation = evaluate(
                model,
                self.trainer.processing_class,
                *heldout_columns(self.heldout),
                self.max_new_tokens,
                step=self.step_offset + state.global_step,
            )
            self.history.append(asdict(evaluation))


def heldout_columns(heldout) -> tuple[list, list, list]:
    """Prompts, expected answers and carry flags of the held-out dataset, in the order `evaluate` takes them."""
    return list(heldout["prompt"]), list(heldout["answer"]), list(heldout["carry"])
