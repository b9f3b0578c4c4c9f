"""Held-out evaluation of the addition task by greedy decoding, on its own or as a training callback."""

from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.models.utils import unwrap_model_for_generation

from .addition import WORKED_ANSWER, text_reward


@dataclass
class Evaluation:
    step: int
    accuracy: float
    carry_accuracy: float  # on the held-out sums that need a carry
    worked_style: float  # fraction of answers in the worked style
    mean_length: float  # completion tokens up to and including the end token
    mean_entropy: float  # nats, of the untempered next-token distribution at each greedy answer token


@torch.no_grad()
def evaluate(model, tokenizer, heldout: Dataset, max_new_tokens: int, step: int = 0) -> Evaluation:
    """
    Greedy-decodes every prompt of `heldout` (`prompt`, `answer` and `carry` columns) in one batch; entropies come
    from the logits of that same generation pass.
    """
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    inputs = tokenizer.apply_chat_template(
        list(heldout["prompt"]), add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
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
    correct = [text_reward(text, answer) == 1.0 for text, answer in zip(texts, heldout["answer"], strict=True)]
    carry_correct = [is_correct for is_correct, carry in zip(correct, heldout["carry"], strict=True) if carry]
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
    """
    Evaluates the held-out prompts every `every_n_steps` optimizer steps and at the end (and before training with
    `evaluate_before_training`), and logs the accuracy as `heldout/accuracy` through the trainer's own metrics, so it
    reaches the progress bar, TensorBoard, W&B and the JSON lines file. `history` keeps every [`Evaluation`] as a
    dict.

    Args:
        trainer: the [`ChordTrainer`] (or any GRPOTrainer) being trained.
        heldout ([`~datasets.Dataset`]): held-out prompts with `answer` and `carry` columns.
        every_n_steps (`int`): evaluation period in optimizer steps.
        max_new_tokens (`int`): generation budget per prompt.
        step_offset (`int`): added to the recorded steps, so that a second training phase continues the first's curve.
        evaluate_before_training (`bool`): also evaluate when training starts (step 0 of the curve).
    """

    def __init__(
        self,
        trainer,
        heldout: Dataset,
        every_n_steps: int,
        max_new_tokens: int,
        step_offset: int = 0,
        evaluate_before_training: bool = False,
    ):
        self.trainer = trainer
        self.heldout = heldout
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.step_offset = step_offset
        self.evaluate_before_training = evaluate_before_training
        self.history: list[dict] = []

    def _record(self, step: int) -> Evaluation:
        trainer = self.trainer
        # Gathers the weights that ZeRO-3 shards across processes for the generation
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            evaluation = evaluate(
                model, trainer.processing_class, self.heldout, self.max_new_tokens, self.step_offset + step
            )
        self.history.append(asdict(evaluation))
        return evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluate_before_training and not self.history:
            self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self.trainer._metrics["train"]["heldout/accuracy"].append(self._record(state.global_step).accuracy)
