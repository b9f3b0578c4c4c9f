"""
SFT-best -> RL, the CHORD paper's baseline, in parts any TRL script can use (`trl-chord sft-best-rl` runs them all):

- [`score_heldout`]: the policy's answers to held-out prompts (greedy unless told otherwise), scored by the trainer's
  own reward functions, as the RL stage scores its rollouts; reduced over processes.
- [`HeldOutRewardCallback`]: that score every N optimizer steps (and before training: the starting model is a
  candidate too), logged as `eval_reward`; each new best is saved as a checkpoint (`checkpoint-N`), and
  `trainer_state.json`'s `best_metric`, `best_global_step` and `best_model_checkpoint` name it.
- [`best_evaluation`]: the selection rule, the highest `eval_reward`, the earliest on ties.
- [`rl_start_model`]: the hand-over, the model the RL stage loads: the kept checkpoint (a LoRA adapter merged into its
  base first), or the starting model when it won.
"""

import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import transformers
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import ProcessorMixin, TrainerCallback
from transformers.utils import logging
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation


logger = logging.get_logger(__name__)

# The metric the selection reads, and the prefix of the others (transformers' evaluation metrics start with `eval_`)
SELECTION_METRIC = "eval_reward"
SFT_BEST_FILE = "sft_best.json"


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
    end_ids = end_token_ids(model, processing_class)
    generation = {"do_sample": False, **(generation_kwargs or {})}
    if processing_class.pad_token_id is not None:
        generation.setdefault("pad_token_id", processing_class.pad_token_id)
    # Per set: the sum of the weighted rewards, the answers, their tokens; per function, its score sum and count
    sums = torch.zeros(len(sets), 3 + 2 * len(reward_funcs), dtype=torch.float64)
    shares = {
        name: process_share(len(data), accelerator.num_processes, accelerator.process_index)
        for name, data in sets.items()
    }
    total_batches = sum(math.ceil(len(indices) / batch_size) for indices in shares.values())
    progress = tqdm(total=total_batches, desc="held-out evaluation", leave=False, disable=not show_progress)
    was_training = model.training
    model.eval()
    try:
        with preserved_rng(accelerator.device):
            if generation.get("do_sample"):
                torch.manual_seed(seed)
            for set_index, (set_name, data) in enumerate(sets.items()):
                budget = max_new_tokens[set_name] if isinstance(max_new_tokens, dict) else max_new_tokens
                indices = shares[set_name]
                for start in range(0, len(indices), batch_size):
                    batch = data.select(indices[start : start + batch_size])
                    prompts = list(batch["prompt"])
                    inputs = tokenized_prompts(processing_class, prompts, chat_template_kwargs or {})
                    inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
                    generated = model.generate(**inputs, max_new_tokens=budget, **generation)
                    ids = answer_ids(generated[:, inputs["input_ids"].shape[1] :], end_ids)
                    texts = processing_class.batch_decode(ids, skip_special_tokens=True)
                    if is_conversational({"prompt": prompts[0]}):
                        completions = [[{"role": "assistant", "content": text}] for text in texts]
                    else:
                        completions = texts
                    scores = reward_rows(reward_funcs, batch, prompts, completions, ids, trainer_state, budget)
                    scored = ~scores.isnan()
                    sums[set_index, 0] += (scores * weights).nansum(dim=1).sum()
                    sums[set_index, 1] += len(ids)
                    sums[set_index, 2] += sum(map(len, ids))
                    sums[set_index, 3 : 3 + len(reward_funcs)] += scores.nan_to_num(0.0).sum(dim=0)
                    sums[set_index, 3 + len(reward_funcs) :] += scored.sum(dim=0)
                    progress.update(1)
    finally:
        model.train(was_training)
        progress.close()
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    total = sums.sum(dim=0)
    metrics = {SELECTION_METRIC: (total[0] / total[1]).item()}
    for index, name in enumerate(names):
        scored = total[3 + len(reward_funcs) + index].item()
        metrics[f"eval_rewards/{name}/mean"] = total[3 + index].item() / scored if scored else math.nan
    metrics["eval_completions/mean_length"] = (total[2] / total[1]).item()
    if len(sets) > 1:
        for set_index, set_name in enumerate(sets):
            metrics[f"eval_{set_name}_reward"] = (sums[set_index, 0] / sums[set_index, 1]).item()
    return metrics


def process_share(count: int, num_processes: int, process_index: int) -> list[int]:
    """The rows `0..count-1` a process answers: contiguous shares, the first `count % num_processes` one row longer."""
    size, extra = divmod(count, num_processes)
    start = process_index * size + min(process_index, extra)
    return list(range(start, start + size + (process_index < extra)))


def best_evaluation(history: list[dict], last_step: int | None = None, metric: str = SELECTION_METRIC) -> dict:
    """
    The evaluation with the highest `metric` of `history` (in step order), the earliest on ties; `last_step` leaves
    out the later ones (the best checkpoint of a shorter SFT budget).
    """
    candidates = [entry for entry in history if last_step is None or entry["step"] <= last_step]
    if not candidates:
        raise ValueError(f"No evaluation at or before step {last_step} to choose from.")
    return max(candidates, key=lambda entry: entry[metric])  # `max` returns the first of equal ones


class HeldOutRewardCallback(TrainerCallback):
    """
    Scores the policy on held-out prompts with the trainer's reward functions ([`score_heldout`]) every `eval_steps`
    optimizer steps and at the last step, and before training with `eval_on_start`; logs the metrics as their own log
    entry (`eval_reward`, ...), as `Trainer.evaluate` logs its own. With `keep_best`, each evaluation that beats every
    earlier one (strictly: the earliest wins a tie) is saved as the checkpoint `checkpoint-N` of `output_dir`, and
    `trainer.state.best_metric`, `best_global_step` and `best_model_checkpoint` name it; the step-0 evaluation, when
    best, stands for the starting model, which is not saved again (`best_model_checkpoint` stays unset). With
    `save_total_limit`, transformers keeps the best checkpoint when it deletes older ones.

    `history` holds every evaluation (`step` and the metrics), `best` the kept one (`step`, `eval_reward`,
    `checkpoint`: its folder, or `None` for the starting model), `seconds` the time spent evaluating.

    Args:
        trainer: a TRL GRPOTrainer or RLOOTrainer (a CHORD one included); its reward functions, weights, processing
            class and accelerator are used.
        heldout ([`~datasets.Dataset`] or `dict[str, Dataset]`): held-out prompts (`prompt` and the columns the reward
            functions read), or several named sets (each also logged as `eval_<name>_reward`).
        eval_steps (`int` or `None`): evaluation period in optimizer steps; `None`: at the last step only.
        max_new_tokens (`int` or `dict[str, int]`): generation budget per answer (per set, for a dict).
        batch_size (`int`): prompts per `generate` call on each process.
        generation_kwargs (`dict`, *optional*): passed to `generate` (greedy by default).
        eval_on_start (`bool`): also evaluate the starting model, a candidate for the best.
        keep_best (`bool`): save each new best as a checkpoint.
    """

    def __init__(
        self,
        trainer,
        heldout: Dataset | dict[str, Dataset],
        eval_steps: int | None,
        max_new_tokens: int | dict[str, int],
        batch_size: int = 8,
        generation_kwargs: dict | None = None,
        eval_on_start: bool = True,
        keep_best: bool = True,
    ):
        self.heldout = heldout_sets(heldout)
        check_reward_funcs(trainer.reward_funcs)
        if isinstance(trainer.processing_class, ProcessorMixin):
            raise ValueError(
                "The held-out reward evaluation generates from text prompts with a tokenizer; this trainer has a "
                f"processor ({type(trainer.processing_class).__name__}), for a vision-language policy, which it does "
                "not support yet."
            )
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"`eval_steps` must be a number of optimizer steps >= 1, got {eval_steps}.")
        if isinstance(max_new_tokens, dict) and set(max_new_tokens) != set(self.heldout):
            raise ValueError(
                f"`max_new_tokens` names the sets {sorted(max_new_tokens)}, the held-out prompts "
                f"{sorted(self.heldout)}."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1 prompt, got {batch_size}.")
        self.trainer = trainer
        self.eval_steps = eval_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generation_kwargs = generation_kwargs
        self.eval_on_start = eval_on_start
        self.keep_best = keep_best
        self.history: list[dict] = []
        self.checkpoints: dict[int, str | None] = {}
        self.seconds = 0.0

    @property
    def best(self) -> dict | None:
        """The kept evaluation: `step`, `eval_reward` and `checkpoint` (`None`: the starting model)."""
        if not self.history:
            return None
        best = best_evaluation(self.history)
        step = best["step"]
        return {"step": step, SELECTION_METRIC: best[SELECTION_METRIC], "checkpoint": self.checkpoints.get(step)}

    def _evaluate(self, state) -> dict:
        started = time.perf_counter()
        trainer = self.trainer
        args = trainer.args
        # ZeRO-3's weights are gathered whatever `ds3_gather_for_generation` says: the processes' shares of the prompts
        # may differ in size, so their forwards could not run in step
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            metrics = score_heldout(
                model,
                trainer.processing_class,
                self.heldout,
                trainer.reward_funcs,
                trainer.accelerator,
                self.max_new_tokens,
                reward_weights=trainer.reward_weights.tolist(),
                reward_func_names=trainer.reward_func_names,
                batch_size=self.batch_size,
                generation_kwargs=self.generation_kwargs,
                chat_template_kwargs=getattr(args, "chat_template_kwargs", None) or {},
                trainer_state=state,
                seed=args.seed,
                show_progress=trainer.accelerator.is_local_main_process and not args.disable_tqdm,
            )
        self.history.append({"step": state.global_step, **metrics})
        # Its own log entry, as `Trainer.evaluate` logs: transformers' `log`, not GRPOTrainer's, which would also flush
        # the training metrics gathered since the last logged step into it. Logging clears the control's `should_log`,
        # which is set back, so that the step's own training log still follows
        should_log = trainer.control.should_log
        transformers.Trainer.log(trainer, dict(metrics))
        trainer.control.should_log = should_log
        self.seconds += time.perf_counter() - started
        return metrics

    def _is_new_best(self, step: int) -> bool:
        return best_evaluation(self.history)["step"] == step

    def on_train_begin(self, args, state, control, **kwargs):
        if self.eval_steps is not None and state.max_steps > 0 and self.eval_steps > state.max_steps:
            raise ValueError(
                f"The held-out evaluation runs every {self.eval_steps} optimizer steps, but this run has "
                f"{state.max_steps}: only its last step would be evaluated. Lower the evaluation period."
            )
        # (Not on a resumed run: the selection does not carry across a resume, and the resumed weights are no
        # starting model)
        if self.eval_on_start and not self.history and state.global_step == 0:
            metrics = self._evaluate(state)
            if self.keep_best:
                self.checkpoints[state.global_step] = None  # the starting model, as it was given
                state.best_metric, state.best_global_step = metrics[SELECTION_METRIC], state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        periodic = self.eval_steps is not None and step % self.eval_steps == 0
        if not periodic and step != state.max_steps:
            return
        metrics = self._evaluate(state)
        if self.keep_best and self._is_new_best(step):
            # Saved by the Trainer right after this step's log, as any checkpoint (`save_only_model` and
            # `save_total_limit` apply; the limit spares the best one)
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
            self.checkpoints[step] = checkpoint
            state.best_metric, state.best_global_step = metrics[SELECTION_METRIC], step
            state.best_model_checkpoint = checkpoint
            control.should_save = True

    def on_train_end(self, args, state, control, **kwargs):
        best = self.best
        if self.keep_best and best is not None and state.is_world_process_zero:
            kept = best["checkpoint"] or "the starting model"
            os.makedirs(args.output_dir, exist_ok=True)
            logger.info(
                f"Best held-out {SELECTION_METRIC}: {best[SELECTION_METRIC]:.4f} at step {best['step']} of "
                f"{state.global_step} ({kept})."
            )
            with open(os.path.join(args.output_dir, SFT_BEST_FILE), "w") as file:
                json.dump({"best": best, "history": self.history}, file, indent=1)


def rl_start_model(best: dict, start_model: str, merged_dir: str, accelerator=None) -> str:
    """
    The model the RL stage loads, from the kept evaluation `best` ([`HeldOutRewardCallback.best`]): `start_model` when
    the starting model won (step 0), else the kept checkpoint's folder. A checkpoint that holds a LoRA adapter (an SFT
    stage with `peft_config`) is merged into its base model first, saved with its tokenizer to `merged_dir`, and that
    folder is returned: the RL stage then trains the merged weights (with a fresh adapter of its own, if it has a
    `peft_config`). With several processes, the main one merges while the others wait (`accelerator`).
    """
    checkpoint = best["checkpoint"]
    if checkpoint is None:
        return start_model
    if not os.path.exists(os.path.join(checkpoint, "adapter_config.json")):
        return checkpoint
    if accelerator is None or accelerator.is_main_process:
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        merged = AutoPeftModelForCausalLM.from_pretrained(checkpoint).merge_and_unload()
        merged.save_pretrained(merged_dir)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(merged_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return merged_dir
