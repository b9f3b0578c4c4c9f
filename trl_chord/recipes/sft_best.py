"""
SFT-best -> RL, the CHORD paper's baseline, in parts any TRL script can use (`trl-chord sft-best-rl` runs them all):
[`score_heldout`] (the held-out reward, in `heldout_reward.py`), [`HeldOutRewardCallback`] (that score during training,
each new best kept as a checkpoint), [`best_evaluation`] (the selection rule) and [`rl_start_model`] (the hand-over).
"""

import json
import os
import time

import transformers
from datasets import Dataset
from transformers import ProcessorMixin, TrainerCallback
from transformers.utils import logging
from trl.models.utils import unwrap_model_for_generation

from .heldout_reward import SELECTION_METRIC, check_reward_funcs, heldout_sets, score_heldout


logger = logging.get_logger(__name__)

SFT_BEST_FILE = "sft_best.json"


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
