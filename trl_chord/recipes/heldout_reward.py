"""SFT-best -> RL's held-out reward ([`score_heldout`]): the policy's answers scored by the trainer's rewards."""

import inspect
import math
import random
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from trl.data_utils import is_conversational


# The metric the selection reads, and the prefix of the others (transformers' evaluation metrics start with `eval_`)
SELECTION_METRIC = "eval_reward"


def heldout_sets(heldout: Dataset | dict[str, Dataset]) -> dict[str, Dataset]:
    """
    The held-out prompts as named sets (one unnamed dataset is the set `""`), each checked: at least one row, and a
    `prompt` column. Raises a `ValueError` that names the set otherwise.
    """
    sets = {"": heldout} if isinstance(heldout, Dataset) else dict(heldout)
    if not sets:
        raise ValueError("The held-out prompts are an empty dict: give at least one named dataset of prompts.")
    for name, dataset in sets.items():
        label = f"The held-out set {name!r}" if name else "The held-out dataset"
        if not isinstance(dataset, Dataset):
            raise TypeError(f"{label} must be a `datasets.Dataset`, got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise ValueError(f"{label} has no rows: the evaluation needs at least one held-out prompt.")
        if "prompt" not in dataset.column_names:
            raise ValueError(f"{label} has no `prompt` column (its columns: {dataset.column_names}).")
    return sets


def check_reward_funcs(reward_funcs) -> None:
    """The held-out evaluation calls plain (synchronous) reward functions; reward models and async ones are refused."""
    if not reward_funcs:
        raise ValueError("The held-out evaluation scores answers with the trainer's reward functions: it has none.")
    for func in reward_funcs:
        if isinstance(func, nn.Module) or not callable(func):
            raise ValueError(
                f"The held-out evaluation scores with reward functions (callables); {type(func).__name__} is a reward "
                "model, which it does not run: give reward functions."
            )
        if inspect.iscoroutinefunction(func):
            raise ValueError(f"The held-out evaluation runs synchronous reward functions; {func.__name__} is async.")


@contextmanager
def preserved_rng(device: torch.device):
    """Runs the block and puts back the Python, NumPy and torch generators (CPU and `device`) as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [] if device.type in ("cpu", "meta") else [device]
    device_type = device.type if devices else "cuda"
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def tokenized_prompts(processing_class, prompts: list, chat_template_kwargs: dict) -> dict[str, torch.Tensor]:
    """
    The prompts left-padded into one batch, as GRPOTrainer renders them: through the chat template with the
    generation prompt when conversational, as plain text otherwise.
    """
    padding_side, processing_class.padding_side = processing_class.padding_side, "left"
    try:
        if is_conversational({"prompt": prompts[0]}):
            return processing_class.apply_chat_template(
                prompts,
                add_generation_prompt=True,
                tokenize=True,
                padding=True,
                return_dict=True,
                return_tensors="pt",
                **chat_template_kwargs,
            )
        return processing_class(text=prompts, padding=True, return_tensors="pt")
    finally:
        processing_class.padding_side = padding_side


def end_token_ids(model, processing_class) -> list[int]:
    """The tokens that end an answer: the model's generation config's and the tokenizer's end token (GRPOTrainer's)."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if processing_class.eos_token_id is not None and processing_class.eos_token_id not in eos:
        eos.insert(0, processing_class.eos_token_id)
    return eos


def answer_ids(generated: torch.Tensor, end_ids: list[int]) -> list[list[int]]:
    """Each row's generated tokens up to and including its first end token (what GRPOTrainer keeps of a rollout)."""
    is_end = torch.isin(generated, torch.tensor(end_ids, device=generated.device))
    ends_before = is_end.cumsum(dim=1) - is_end.long()
    return [row[keep].tolist() for row, keep in zip(generated, ends_before == 0, strict=True)]


class RewardHooks:
    """
    What GRPOTrainer passes reward functions as `log_extra` and `log_metric`: bound methods of an object whose
    `max_completion_length` is the length limit of the answers (a reward may read it through them, as
    `math_accuracy_reward` does to tell an answer cut off at the limit); here they log nothing.
    """

    def __init__(self, max_completion_length: int):
        self.max_completion_length = max_completion_length

    def log_extra(self, column: str, values: list) -> None:
        pass

    def log_metric(self, name: str, value: float) -> None:
        pass


def reward_rows(
    reward_funcs: list[Callable],
    batch: Dataset,
    prompts: list,
    completions: list,
    ids: list,
    trainer_state,
    max_new_tokens: int,
) -> torch.Tensor:
    """
    A `(rows, functions)` tensor of each reward function's score for each answer (NaN where a function returns None),
    called as GRPOTrainer calls them: prompts, completions, completion ids, every other column of the rows, the
    trainer state, and the `log_extra` / `log_metric` hooks ([`RewardHooks`]).
    """
    columns = {name: batch[name] for name in batch.column_names if name not in ("prompt", "completion")}
    hooks = RewardHooks(max_new_tokens)
    scores = torch.full((len(prompts), len(reward_funcs)), math.nan, dtype=torch.float64)
    for index, func in enumerate(reward_funcs):
        values = func(
            prompts=prompts,
            completions=completions,
            completion_ids=ids,
            trainer_state=trainer_state,
            log_extra=hooks.log_extra,
            log_metric=hooks.log_metric,
            **columns,
        )
        if len(values) != len(prompts):
            name = getattr(func, "__name__", type(func).__name__)
            raise ValueError(f"The reward function {name!r} gave {len(values)} rewards for {len(prompts)} answers.")
        scores[:, index] = torch.tensor(
            [math.nan if value is None else value for value in values], dtype=torch.float64
        )
    return scores


@torch.no_grad()
def score_heldout(
    model,
    processing_class,
    heldout: Dataset | dict[str, Dataset],
    reward_funcs: list[Callable],
    accelerator,
    max_new_tokens: int | dict[str, int],
    reward_weights: list[float] | None = None,
    reward_func_names: list[str] | None = None,
    batch_size: int = 8,
    generation_kwargs: dict | None = None,
    chat_template_kwargs: dict | None = None,
    trainer_state=None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, float]:
    """
    Generates an answer to every held-out prompt with `model` and scores it with `reward_funcs`.

    Each process answers its share of each set, `batch_size` prompts at a time, greedily unless `generation_kwargs`
    says otherwise (e.g. `{"do_sample": True, "temperature": 0.6}`: then the sampling is seeded with `seed`, the same
    at every evaluation). The model is put in eval mode (no dropout) and back, and the random generators are left as
    they were found, so an evaluation changes nothing in the training that follows. `max_new_tokens` may differ per
    set (a dict by set name).

    Returns the metrics, reduced over processes: `eval_reward` (the mean over every prompt of every set of the reward
    functions' weighted sum, as GRPOTrainer sums them), `eval_rewards/<function>/mean` (each function's mean over the
    answers it scored), `eval_completions/mean_length` (tokens, the end token included), and with several named sets
    `eval_<set>_reward` for each.
    """
    sets = heldout_sets(heldout)
    check_reward_funcs(reward_funcs)
    weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float64)
    names = reward_func_names or [getattr(func, "__name__", f"reward_{i}") for i, func in enumerate(reward_funcs)]
    generation = {"do_sample": False, **(generation_kwargs or {})}
    if processing_class.pad_token_id is not None:
        generation.setdefault("pad_token_id", processing_class.pad_token_id)
    batches = process_batches(sets, batch_size, accelerator.num_processes, accelerator.process_index)
    sums = torch.zeros(len(sets), 3 + 2 * len(reward_funcs), dtype=torch.float64)  # rows: [`add_batch_sums`]
    progress = tqdm(total=len(batches), desc="held-out evaluation", leave=False, disable=not show_progress)
    was_training = model.training
    model.eval()
    try:
        with preserved_rng(accelerator.device):
            if generation.get("do_sample"):
                torch.manual_seed(seed)
            for set_index, set_name, batch in batches:
                budget = max_new_tokens[set_name] if isinstance(max_new_tokens, dict) else max_new_tokens
                prompts = list(batch["prompt"])
                ids, completions = generated_answers(
                    model, processing_class, prompts, budget, generation, chat_template_kwargs, accelerator.device
                )
                scores = reward_rows(reward_funcs, batch, prompts, completions, ids, trainer_state, budget)
                add_batch_sums(sums[set_index], scores, weights, ids)
                progress.update(1)
    finally:
        model.train(was_training)
        progress.close()
    return heldout_metrics(accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu(), names, list(sets))


def process_batches(sets: dict[str, Dataset], batch_size: int, num_processes: int, process_index: int) -> list[tuple]:
    """`(set index, set name, batch)` for each batch of `batch_size` prompts of this process's share of each set."""
    batches = []
    for set_index, (set_name, data) in enumerate(sets.items()):
        indices = process_share(len(data), num_processes, process_index)
        for start in range(0, len(indices), batch_size):
            batches.append((set_index, set_name, data.select(indices[start : start + batch_size])))
    return batches


def generated_answers(
    model, processing_class, prompts: list, max_new_tokens: int, generation: dict, chat_template_kwargs, device
) -> tuple[list[list[int]], list]:
    """The model's answers to `prompts`: their tokens up to the first end token ([`answer_ids`]), and their texts as
    GRPOTrainer gives completions to reward functions (an assistant message each, for conversational prompts)."""
    inputs = tokenized_prompts(processing_class, prompts, chat_template_kwargs or {})
    inputs = {key: value.to(device) for key, value in inputs.items()}
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **generation)
    ids = answer_ids(generated[:, inputs["input_ids"].shape[1] :], end_token_ids(model, processing_class))
    texts = processing_class.batch_decode(ids, skip_special_tokens=True)
    if is_conversational({"prompt": prompts[0]}):
        return ids, [[{"role": "assistant", "content": text}] for text in texts]
    return ids, texts


def add_batch_sums(set_sums: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor, ids: list[list[int]]) -> None:
    """Adds a batch's `(answers, functions)` `scores` to its set's row of sums: the weighted rewards' sum, the answers,
    their tokens, then per function its score sum and its count of scored answers."""
    num_funcs = scores.shape[1]
    set_sums[0] += (scores * weights).nansum(dim=1).sum()
    set_sums[1] += len(ids)
    set_sums[2] += sum(map(len, ids))
    set_sums[3 : 3 + num_funcs] += scores.nan_to_num(0.0).sum(dim=0)
    set_sums[3 + num_funcs :] += (~scores.isnan()).sum(dim=0)


def heldout_metrics(sums: torch.Tensor, names: list[str], set_names: list[str]) -> dict[str, float]:
    """[`score_heldout`]'s metrics from every process's sums (a row per set, as [`add_batch_sums`] adds them)."""
    total, num_funcs = sums.sum(dim=0), (sums.shape[1] - 3) // 2
    metrics = {SELECTION_METRIC: (total[0] / total[1]).item()}
    for index, name in enumerate(names):
        scored = total[3 + num_funcs + index].item()
        metrics[f"eval_rewards/{name}/mean"] = total[3 + index].item() / scored if scored else math.nan
    metrics["eval_completions/mean_length"] = (total[2] / total[1]).item()
    if len(set_names) > 1:
        for set_index, set_name in enumerate(set_names):
            metrics[f"eval_{set_name}_reward"] = (sums[set_index, 0] / sums[set_index, 1]).item()
    return metrics


def process_share(count: int, num_processes: int, process_index: int) -> list[int]:
    """The rows `0..count-1` a process answers: contiguous shares, the first `count % num_processes` one row longer."""
    size, extra = divmod(count, num_processes)
    start = process_index * size + min(process_index, extra)
    return list(range(start, start + size + (process_index < extra)))
