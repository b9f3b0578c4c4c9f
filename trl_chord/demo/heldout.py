"""
Held-out evaluation of the built-in tasks: by greedy decoding, on its own or as a training callback, and by sampling
(pass@1 and pass@k).
"""

import time
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.models.utils import unwrap_model_for_generation

from ..expert_data import collate_expert_batch, tokenize_expert_example
from .addition import WORKED_ANSWER, is_correct


@dataclass
class Evaluation:
    step: int
    accuracy: float
    carry_accuracy: float | None  # on the held-out sums that need a carry (None without a `carry` column)
    worked_style: float  # fraction of answers in the worked style
    mean_length: float  # completion tokens up to and including the end token
    mean_entropy: float  # nats, of the untempered next-token distribution at each greedy answer token


@torch.no_grad()
def evaluate(model, tokenizer, heldout: Dataset, max_new_tokens: int, step: int = 0) -> Evaluation:
    """
    Greedy-decodes every prompt of `heldout` (`prompt` and `answer` columns, optionally `carry`) in one batch;
    entropies come from the logits of that same generation pass.
    """
    was_training = model.training
    model.eval()
    inputs = tokenized_prompts(tokenizer, heldout, model.device)
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
    correct = [is_correct(text, answer) for text, answer in zip(texts, heldout["answer"], strict=True)]
    return Evaluation(
        step=step,
        accuracy=sum(correct) / len(texts),
        carry_accuracy=carry_mean(correct, heldout),
        worked_style=sum(WORKED_ANSWER.fullmatch(text) is not None for text in texts) / len(texts),
        mean_length=mask.sum().item() / len(texts),
        mean_entropy=(entropy * mask).sum().item() / max(mask.sum().item(), 1),
    )


@dataclass
class SampledEvaluation:
    k: int
    pass_at_1: float  # the mean fraction of correct samples per prompt (an unbiased estimate of pass@1)
    pass_at_k: float  # the fraction of prompts with at least one correct sample out of k
    carry_pass_at_1: float | None  # the same two on the sums that need a carry (None without a `carry` column)
    carry_pass_at_k: float | None
    worked_style: float  # the fraction of all samples in the worked style


@torch.no_grad()
def sampled_pass_rates(
    model, tokenizer, prompts: Dataset, k: int, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 128
) -> SampledEvaluation:
    """
    Samples `k` completions of every prompt of `prompts` (`prompt` and `answer` columns, optionally `carry`) as GRPO
    does (plain sampling at `temperature`, no top-k or top-p), `batch_size` prompts at a time, and scores them.
    """
    was_training = model.training
    model.eval()
    correct_counts, worked_count = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts.select(range(start, min(start + batch_size, len(prompts))))
        inputs = tokenized_prompts(tokenizer, batch, model.device)
        sequences = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            num_return_sequences=k,
        )
        texts = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct_counts += [
            sum(is_correct(text, answer) for text in texts[index * k : (index + 1) * k])
            for index, answer in enumerate(batch["answer"])
        ]
        worked_count += sum(WORKED_ANSWER.fullmatch(text) is not None for text in texts)
    model.train(was_training)
    pass_at_1 = [count / k for count in correct_counts]
    pass_at_k = [count > 0 for count in correct_counts]
    return SampledEvaluation(
        k=k,
        pass_at_1=sum(pass_at_1) / len(pass_at_1),
        pass_at_k=sum(pass_at_k) / len(pass_at_k),
        carry_pass_at_1=carry_mean(pass_at_1, prompts),
        carry_pass_at_k=carry_mean(pass_at_k, prompts),
        worked_style=worked_count / (k * len(prompts)),
    )


@torch.no_grad()
def completion_nll(model, tokenizer, examples: Dataset, batch_size: int = 256) -> float:
    """
    The mean negative log-likelihood per completion token (nats) of `examples` (`prompt` and `completion`) under
    `model`, over the tokens the CHORD SFT term trains on (the same tokenization).
    """
    was_training = model.training
    model.eval()
    tokenized = [tokenize_expert_example(example, index, tokenizer, 10**6) for index, example in enumerate(examples)]
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        batch = collate_expert_batch(tokenized[start : start + batch_size], tokenizer.pad_token_id)
        batch = {key: tensor.to(model.device) for key, tensor in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
        )
        mask = batch["completion_mask"][:, 1:].float()
        total += (token_nll * mask).sum().item()
        count += mask.sum().item()
    model.train(was_training)
    return total / count


def tokenized_prompts(tokenizer, prompts: Dataset, device) -> dict[str, torch.Tensor]:
    """The chat prompts of `prompts`, left-padded into one batch (generation continues every row at its end)."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    inputs = tokenizer.apply_chat_template(
        list(prompts["prompt"]), add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    tokenizer.padding_side = padding_side
    return inputs.to(device)


def carry_mean(values: list[float], dataset: Dataset) -> float | None:
    """The mean of `values` over the rows that need a carry (None without a `carry` column or such rows)."""
    if "carry" not in dataset.column_names:
        return None
    carry_values = [value for value, carry in zip(values, dataset["carry"], strict=True) if carry]
    return sum(carry_values) / len(carry_values) if carry_values else None


def answer_token_mask(completion_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """1 for each generated token up to and including the first end token, 0 for the padding after it."""
    is_end = (completion_ids == eos_token_id) | (completion_ids == pad_token_id)
    ends_before = is_end.cumsum(dim=1) - is_end.long()
    return (ends_before == 0).float()


class HeldOutEvaluationCallback(TrainerCallback):
    """
    Evaluates the held-out prompts every `every_n_steps` optimizer steps and at the end (and before training with
    `evaluate_before_training`), and logs the accuracy as `<name>/accuracy` through the trainer's own metrics, so it
    reaches the progress bar, TensorBoard, W&B and the JSON lines file. `history` keeps every [`Evaluation`] as a
    dict, and `seconds` the time spent evaluating.

    Args:
        trainer: the [`ChordTrainer`] (or any GRPOTrainer) being trained.
        heldout ([`~datasets.Dataset`]): held-out prompts with an `answer` column, optionally `carry`.
        every_n_steps (`int`): evaluation period in optimizer steps.
        max_new_tokens (`int`): generation budget per prompt.
        step_offset (`int`): added to the recorded steps, so that a second training phase continues the first's curve.
        evaluate_before_training (`bool`): also evaluate when training starts (step 0 of the curve).
        name (`str`): the metric's prefix, so that several held-out sets can be followed side by side.
    """

    def __init__(
        self,
        trainer,
        heldout: Dataset,
        every_n_steps: int,
        max_new_tokens: int,
        step_offset: int = 0,
        evaluate_before_training: bool = False,
        name: str = "heldout",
    ):
        self.trainer = trainer
        self.heldout = heldout
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.step_offset = step_offset
        self.evaluate_before_training = evaluate_before_training
        self.name = name
        self.history: list[dict] = []
        self.seconds = 0.0

    def _record(self, step: int) -> Evaluation:
        started = time.perf_counter()
        trainer = self.trainer
        # Gathers the weights that ZeRO-3 shards across processes for the generation
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            evaluation = evaluate(
                model, trainer.processing_class, self.heldout, self.max_new_tokens, self.step_offset + step
            )
        self.history.append(asdict(evaluation))
        self.seconds += time.perf_counter() - started
        return evaluation

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluate_before_training and not self.history:
            self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self.trainer._metrics["train"][f"{self.name}/accuracy"].append(self._record(state.global_step).accuracy)
