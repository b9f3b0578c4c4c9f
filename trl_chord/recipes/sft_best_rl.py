"""`trl-chord sft-best-rl`: the CHORD paper's SFT-best -> RL baseline, in one command.

    # The built-in task: a tiny model, single-digit addition, nothing downloaded
    trl-chord sft-best-rl --config demo_sft_best_rl

    # The paper's math data (`trl-chord prepare openr1_math` makes it)
    accelerate launch --config_file "$(trl-chord configs accelerate/zero3)" -m trl_chord.cli sft-best-rl \\
        --config math_sft_best_grpo

The SFT stage (the run's CHORD trainer at mu = 1, with the `sft_*` options) keeps its checkpoint best on the held-out
reward (`eval_reward`); the RL stage (GRPO or RLOO, mu = 0) starts from it at the run's own options. docs/recipes.md
says each step.
"""

import gc
import json
import os
from dataclasses import dataclass, field, fields

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from transformers.utils import logging
from trl import get_peft_config

from ..chord_config import ChordOptions
from ..demo.reporting import JsonLinesLoggerCallback
from ..losses import TOKEN_WEIGHTINGS
from . import CommandLineError
from .chord import (
    ChordScriptArguments,
    demo_model_path,
    load_expert_sources,
    load_processing_class,
    make_parser,
    parse_args,
    requested_trainer,
    resolve_config_argument,
    set_model_loading,
    task_data,
    trainer_classes,
)
from .sft_best import SELECTION_METRIC, HeldOutRewardCallback, rl_start_model


logger = logging.get_logger(__name__)


@dataclass
class SftBestArguments:
    """
    The SFT stage and the held-out evaluation of `trl-chord sft-best-rl`. Every other option is shared by both stages
    (precision, optimizer, seed, logging, the expert batch `chord_sft_per_device_train_batch_size`, ...), but the
    learning rate, steps, scheduler and output folder, which are the RL stage's.

    Parameters:
        sft_learning_rate (`float`):
            Learning rate of the SFT stage.
        sft_max_steps (`int`):
            Optimizer steps of the SFT stage (each trains on `chord_sft_per_device_train_batch_size` expert examples
            per process and accumulation step).
        sft_lr_scheduler_type (`str`, *optional*):
            Learning-rate schedule of the SFT stage. Unset: the run's `lr_scheduler_type`.
        sft_token_weighting (`str`, *optional*, defaults to `"uniform"`):
            The SFT stage's token weighting (as `chord_token_weighting`): `"uniform"` is plain SFT, the paper's.
        sft_eval_steps (`int`):
            The held-out evaluation's period in SFT optimizer steps (it also runs at the last step).
        sft_eval_on_start (`bool`, *optional*, defaults to `True`):
            Also evaluate the starting model, which is then a candidate: RL starts from it when no SFT step beats it.
        sft_eval_max_new_tokens (`int`, *optional*):
            Generation budget of each held-out answer. Unset: `max_completion_length`.
        sft_eval_generation_kwargs (`dict` or `str`, *optional*):
            Options for `generate` in the evaluation, as a dict or a JSON string, e.g. `'{"do_sample": true,
            "temperature": 0.6}'` (sampling is seeded with `seed`, the same at every evaluation). Unset: greedy.
        sft_output_dir (`str`, *optional*):
            The SFT stage's folder: its log, its best checkpoint and `sft_best.json`. Unset: `<output_dir>/sft`.
        heldout_dataset (`list[str]`, *optional*):
            Held-out prompts: a hub dataset id or local `.json`, `.jsonl` or `.parquet` file, with a `prompt` column
            and the columns the reward functions read; several named ones as `name=path` (each logs
            `eval_<name>_reward`; `eval_reward` is over all). The built-in task has its own.
        heldout_dataset_config (`str`, *optional*):
            Hub configuration name of the held-out prompts.
        heldout_dataset_split (`str`, *optional*, defaults to `"validation"`):
            Split of the held-out prompts on the hub (a local file is read whole).
        heldout_size (`int`, *optional*):
            Instead of `heldout_dataset`: hold out this many of the RL prompts (drawn with `seed`), which neither stage
            trains on.
    """

    sft_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the SFT stage."})
    sft_max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of the SFT stage."})
    sft_lr_scheduler_type: str | None = field(
        default=None, metadata={"help": "Learning-rate schedule of the SFT stage (unset: lr_scheduler_type)."}
    )
    sft_token_weighting: str = field(
        default="uniform",
        metadata={"help": "Token weighting of the SFT stage (uniform: plain SFT).", "choices": list(TOKEN_WEIGHTINGS)},
    )
    sft_eval_steps: int | None = field(
        default=None, metadata={"help": "Held-out evaluation period in SFT steps (and at the last step)."}
    )
    sft_eval_on_start: bool = field(
        default=True, metadata={"help": "Also evaluate the starting model, a candidate for the best."}
    )
    sft_eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens per held-out answer (unset: max_completion_length)."}
    )
    sft_eval_generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "generate() options for the evaluation, as JSON (unset: greedy)."}
    )
    sft_output_dir: str | None = field(default=None, metadata={"help": "The SFT stage's folder (unset: OUTPUT/sft)."})
    heldout_dataset: list[str] | None = field(
        default=None,
        metadata={"help": "Held-out prompts: hub id or local json/jsonl/parquet file; several as name=path."},
    )
    heldout_dataset_config: str | None = field(default=None, metadata={"help": "Hub configuration of the held-out."})
    heldout_dataset_split: str = field(default="validation", metadata={"help": "Hub split of the held-out prompts."})
    heldout_size: int | None = field(
        default=None, metadata={"help": "Hold out this many RL prompts instead of --heldout_dataset."}
    )


USAGE = "trl-chord sft-best-rl [--config NAME_OR_FILE] [--OPTION VALUE ...]"
DESCRIPTION = """\
SFT-best -> RL (the CHORD paper's baseline): SFT on the expert data at mu = 1 with the sft_* options, the policy's
answers to held-out prompts scored by the reward functions every --sft_eval_steps steps, the best checkpoint kept;
then GRPO or RLOO (--trainer) from it at the run's own options (learning rate, steps, output folder, ...). Every
option is a flag and can come from --config (a YAML file or a shipped config's name, e.g. demo_sft_best_rl)."""

# The schedule options of a CHORD run: sft-best-rl sets mu itself (1 for the SFT stage, 0 for the RL stage)
SCHEDULE_OPTIONS = (
    "chord_mu_peak",
    "chord_mu_valley",
    "chord_mu_warmup_steps",
    "chord_mu_decay_steps",
    "chord_mu_schedule",
    "chord_adaptive_mu_tau",
)


def option_flags(options: dict) -> list[str]:
    return [part for name, value in options.items() for part in (f"--{name}", str(value))]


def check_options(script_args: ChordScriptArguments, sft: SftBestArguments, args: ChordOptions) -> None:
    """Refuses, before anything is loaded, what the command cannot run, each with the option to change."""
    if sft.sft_max_steps is None or sft.sft_max_steps < 1:
        raise CommandLineError(
            f"give --sft_max_steps, the SFT stage's optimizer steps (>= 1), got {sft.sft_max_steps}."
        )
    if sft.sft_learning_rate is None or not sft.sft_learning_rate > 0:
        raise CommandLineError(
            f"give --sft_learning_rate, the SFT stage's learning rate (> 0), got {sft.sft_learning_rate}."
        )
    if sft.sft_eval_steps is None or sft.sft_eval_steps < 1:
        raise CommandLineError(
            f"give --sft_eval_steps, the held-out evaluation's period in SFT steps (>= 1), got {sft.sft_eval_steps}."
        )
    if sft.sft_eval_steps > sft.sft_max_steps:
        raise CommandLineError(
            f"--sft_eval_steps {sft.sft_eval_steps} is more than the SFT stage's --sft_max_steps {sft.sft_max_steps}: "
            "only its last step would be evaluated. Give an evaluation period of at most the SFT steps."
        )
    builtin_task = script_args.dataset_name is None
    if not builtin_task and not script_args.reward_funcs:
        raise CommandLineError(
            "give the reward functions with --reward_funcs: they score the held-out answers and the RL rollouts."
        )
    if not builtin_task and script_args.chord_sft_dataset is None:
        raise CommandLineError("give the expert data for the SFT stage with --chord_sft_dataset.")
    if sft.heldout_dataset is not None and sft.heldout_size is not None:
        raise CommandLineError("give either --heldout_dataset or --heldout_size, not both.")
    if not builtin_task and sft.heldout_dataset is None and sft.heldout_size is None:
        raise CommandLineError(
            "give held-out prompts for choosing the best SFT checkpoint: --heldout_dataset FILE_OR_HUB_ID, or "
            "--heldout_size N to hold out N of the RL prompts."
        )
    if sft.heldout_size is not None and sft.heldout_size < 1:
        raise CommandLineError(f"--heldout_size must be at least 1 prompt, got {sft.heldout_size}.")
    if args.resume_from_checkpoint:
        raise CommandLineError(
            "sft-best-rl does not resume. To resume the RL stage alone: trl-chord --config ... --model_name_or_path "
            "SFT_OUTPUT/checkpoint-N (the kept checkpoint, named in SFT_OUTPUT/sft_best.json) --chord_mu_peak 0 "
            "--chord_mu_valley 0 --resume_from_checkpoint true."
        )
    if isinstance(sft.sft_eval_generation_kwargs, str):
        try:
            sft.sft_eval_generation_kwargs = json.loads(sft.sft_eval_generation_kwargs)
        except json.JSONDecodeError as error:
            raise CommandLineError(f"--sft_eval_generation_kwargs is not JSON: {error}.") from error
    if sft.sft_eval_generation_kwargs is not None and not isinstance(sft.sft_eval_generation_kwargs, dict):
        raise CommandLineError(
            f"--sft_eval_generation_kwargs must be a JSON object, e.g. '{{\"do_sample\": true}}', got "
            f"{sft.sft_eval_generation_kwargs!r}."
        )


def ignored_schedule_options(args: ChordOptions) -> list[str]:
    """The schedule and weighting options `args` sets away from their defaults, which sft-best-rl does not read."""
    defaults = {spec.name: spec.default for spec in fields(ChordOptions) if spec.name in SCHEDULE_OPTIONS}
    ignored = [f"--{name} {getattr(args, name)}" for name, value in defaults.items() if getattr(args, name) != value]
    if args.chord_token_weighting != "phi":  # phi is the default's resolution
        ignored.append(f"--chord_token_weighting {args.chord_token_weighting}")
    return ignored


def parse_sft_best_rl_args(args: list[str]) -> tuple:
    """
    `(script_args, sft_options, sft_stage_args, rl_stage_args, model_args)` from the command line: the two stages'
    configs are the run's options, each with what its stage sets (the SFT stage's `sft_*` options, mu = 1; mu = 0).
    """
    args = resolve_config_argument(args)
    trainer = requested_trainer(args)
    if trainer not in ("grpo", "rloo"):
        why = (
            "its held-out evaluation generates with the policy in the training processes, which AsyncGRPOTrainer "
            "leaves to a vLLM server"
            if trainer == "async_grpo"
            else "the paper's SFT-best + RL trains on the rollouts alone after SFT, with no expert completions"
        )
        raise CommandLineError(f"sft-best-rl runs --trainer grpo or rloo, not {trainer}: {why}.")
    parser = make_parser(trainer, (ChordScriptArguments, SftBestArguments), usage=USAGE, description=DESCRIPTION)
    script_args, sft, rl_args, model_args = parse_args(args, parser)
    check_options(script_args, sft, rl_args)
    ignored = ignored_schedule_options(rl_args)
    if ignored:
        logger.warning(
            f"sft-best-rl runs its SFT stage at mu = 1 with --sft_token_weighting {sft.sft_token_weighting} and its "
            f"RL stage at mu = 0, so these options are not read: {', '.join(ignored)}."
        )
    sft_options = {
        "output_dir": sft.sft_output_dir or os.path.join(rl_args.output_dir, "sft"),
        "learning_rate": sft.sft_learning_rate,
        "max_steps": sft.sft_max_steps,
        "lr_scheduler_type": sft.sft_lr_scheduler_type or rl_args.lr_scheduler_type.value,
        "chord_mu_peak": 1.0,
        "chord_mu_valley": 1.0,
        "chord_token_weighting": sft.sft_token_weighting,
        # No rollouts are generated at mu = 1: no vLLM engine, no reference model
        "use_vllm": False,
        "beta": 0.0,
        # Checkpoints: the held-out evaluation's bests only, weights without optimizer state, the best one kept
        "save_strategy": "no",
        "save_only_model": True,
        "save_total_limit": 1,
        "eval_strategy": "no",
        "push_to_hub": False,
    }
    schedule = {"chord_mu_warmup_steps": 0, "chord_mu_decay_steps": 0, "chord_mu_schedule": "cosine"}
    sft_args = parse_args(args + option_flags({**sft_options, **schedule}), parser)[2]
    rl_args = parse_args(args + option_flags({"chord_mu_peak": 0.0, "chord_mu_valley": 0.0, **schedule}), parser)[2]
    rl_args.chord_sft_dataset_proportions = None  # the RL stage has no expert data
    return script_args, sft, sft_args, rl_args, model_args


def heldout_prompts(script_args, sft: SftBestArguments, train_dataset, builtin_heldout, seed: int):
    """`(RL prompts, held-out prompts)`: `--heldout_dataset`, or `--heldout_size` RL prompts set apart, or the built-in
    task's held-out sums."""
    if sft.heldout_size is not None:
        if sft.heldout_size >= len(train_dataset):
            raise CommandLineError(
                f"--heldout_size {sft.heldout_size} leaves no RL prompt: the RL dataset has {len(train_dataset)}."
            )
        split = train_dataset.train_test_split(test_size=sft.heldout_size, seed=seed)
        return split["train"], split["test"]
    if sft.heldout_dataset is None:
        return train_dataset, builtin_heldout
    heldout = load_expert_sources(sft.heldout_dataset, sft.heldout_dataset_config, sft.heldout_dataset_split)
    column = script_args.dataset_prompt_column
    if column != "prompt":  # named as the RL prompts' column is
        if isinstance(heldout, dict):
            return train_dataset, {name: data.rename_column(column, "prompt") for name, data in heldout.items()}
        heldout = heldout.rename_column(column, "prompt")
    return train_dataset, heldout


def new_metrics_log(trainer, output_dir: str) -> None:
    """The stage's `metrics.jsonl` in `output_dir`, started afresh (by the main process, which alone writes it)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if trainer.accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(path):
            os.remove(path)
    trainer.add_callback(JsonLinesLoggerCallback(path))


def stage_trainer(
    trainer_class, model: str, args, script_args, model_args, reward_funcs, train_dataset, expert_dataset=None
):
    """A stage's trainer of `model` at the stage's `args`, the model and tokenizer loaded as the run's options say."""
    return trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_dataset,
        expert_dataset=expert_dataset,
        processing_class=load_processing_class(model, model_args, args),
        peft_config=get_peft_config(model_args),
        **set_model_loading(script_args, args, model_args),
    )


def train_with_evaluation(trainer, evaluation: HeldOutRewardCallback) -> None:
    """Trains a stage, `evaluation` scoring it on the held-out prompts, its `metrics.jsonl` started afresh."""
    trainer.add_callback(evaluation)
    new_metrics_log(trainer, trainer.args.output_dir)
    trainer.train()


def next_stage_processes() -> PartialState:
    """The processes after the SFT stage, its memory collected and accelerate's state wiped (not the process group),
    which holds the SFT stage's DeepSpeed values and refuses a second Accelerator (docs/trl-internals.md)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    AcceleratorState._reset_state()
    return PartialState()


def main(script_args, sft: SftBestArguments, sft_args, rl_args, model_args) -> dict:
    trainer_class = trainer_classes(script_args.trainer)[1]
    train_dataset, expert_dataset, builtin_heldout, reward_funcs = task_data(script_args, rl_args)
    train_dataset, heldout = heldout_prompts(script_args, sft, train_dataset, builtin_heldout, rl_args.seed)
    model_path = model_args.model_name_or_path or demo_model_path(rl_args, script_args.dataset_name is None)
    evaluation = dict(
        max_new_tokens=sft.sft_eval_max_new_tokens or rl_args.max_completion_length,
        batch_size=rl_args.per_device_eval_batch_size,
        generation_kwargs=sft.sft_eval_generation_kwargs,
    )

    # The SFT stage: mu = 1, its best held-out checkpoint kept
    sft_trainer = stage_trainer(
        trainer_class, model_path, sft_args, script_args, model_args, reward_funcs, train_dataset, expert_dataset
    )
    selection = HeldOutRewardCallback(
        sft_trainer, heldout, sft.sft_eval_steps, eval_on_start=sft.sft_eval_on_start, **evaluation
    )
    train_with_evaluation(sft_trainer, selection)
    best, sft_history = selection.best, selection.history
    sft_trainer.accelerator.free_memory()  # the model and optimizer, freed before the RL stage loads its model
    del sft_trainer, selection
    processes = next_stage_processes()
    start = rl_start_model(best, model_path, os.path.join(sft_args.output_dir, "best-merged"), processes)
    kept = f"step {best['step']} of {sft_args.max_steps}" + (" (the starting model)" if best["step"] == 0 else "")
    if processes.is_main_process:
        print(
            f"SFT stage: best held-out {SELECTION_METRIC} {best[SELECTION_METRIC]:.4f} at {kept}; the RL stage starts "
            f"from {start}."
        )

    # The RL stage: mu = 0, from the kept weights, at the run's own options
    rl_trainer = stage_trainer(trainer_class, start, rl_args, script_args, model_args, reward_funcs, train_dataset)
    rl_evaluation = HeldOutRewardCallback(rl_trainer, heldout, None, keep_best=False, **evaluation)
    train_with_evaluation(rl_trainer, rl_evaluation)
    rl_trainer.save_model(rl_args.output_dir)

    summary = {
        "sft": {"kept": best, "steps": sft_args.max_steps, "history": sft_history},
        "rl": {"start": start, "trainer": script_args.trainer, "history": rl_evaluation.history},
    }
    if rl_trainer.accelerator.is_main_process:
        with open(os.path.join(rl_args.output_dir, "sft_best_rl.json"), "w") as file:
            json.dump(summary, file, indent=1)
        first, last = rl_evaluation.history[0], rl_evaluation.history[-1]
        print(
            f"Held-out {SELECTION_METRIC}: {best[SELECTION_METRIC]:.4f} at the kept SFT {kept}, "
            f"{first[SELECTION_METRIC]:.4f} at the RL stage's start, {last[SELECTION_METRIC]:.4f} after "
            f"{last['step']} RL steps.\nSFT stage: {sft_args.output_dir}\nModel: {rl_args.output_dir}"
        )
    rl_trainer.accelerator.wait_for_everyone()
    return summary
