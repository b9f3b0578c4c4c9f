"""The CHORD recipe: `(1 - mu) * GRPO + mu * SFT on expert answers`, from one CPU to many nodes.

    # The built-in demo: a tiny model learns single-digit addition on a CPU, nothing downloaded
    trl-chord --config demo

    # A real run: any hub id or local path for the model and both datasets
    accelerate launch --config_file "$(trl-chord configs accelerate/zero3)" -m trl_chord.cli --config math_chord_phi

`trl-chord` (`trl_chord.cli`) and `recipes/chord.py` run this file's `main`. Every ChordConfig / GRPOConfig option,
TRL ModelConfig option (`--use_peft`, `--lora_r`, ...) and the script options below is a command-line flag, and can
come from `--config`: a YAML file, or the name of a config shipped in `trl_chord/recipes/configs/`. With no
`--model_name_or_path` and no `--dataset_name`, the run is the built-in demo. `--trainer rloo` (or `async_grpo`) puts
RLOO (or TRL's asynchronous GRPO) in GRPO's place; the options are then those of its config (RLOOConfig, ...).
"""

import importlib
import os
import sys
from dataclasses import dataclass, field, fields, make_dataclass

import yaml
from transformers import AutoProcessor
from transformers.utils import is_torch_bf16_gpu_available
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .. import (
    ChordConfig,
    ChordLuffyConfig,
    ChordLuffyTrainer,
    ChordRLOOConfig,
    ChordRLOOTrainer,
    ChordTrainer,
    LuffyConfig,
    LuffyTrainer,
)
from ..chord_config import ChordOptions
from ..demo.addition import addition_reward, demo_datasets
from ..demo.heldout import HeldOutEvaluationCallback
from ..demo.reporting import JsonLinesLoggerCallback, plot_metrics
from ..demo.tiny import save_tiny_model
from ..rewards import math_accuracy_reward, tool_call_reward
from . import CommandLineError, config_path
from .data_files import load_dataset_file_or_hub


TRAINERS = ("grpo", "rloo", "async_grpo", "luffy", "chord_luffy")


def trainer_classes(trainer: str) -> tuple[type, type]:
    """The config and trainer of `--trainer` (AsyncGRPOTrainer, TRL's experimental API, is imported on use)."""
    if trainer == "grpo":
        return ChordConfig, ChordTrainer
    if trainer == "luffy":
        return LuffyConfig, LuffyTrainer
    if trainer == "chord_luffy":
        return ChordLuffyConfig, ChordLuffyTrainer
    if trainer == "rloo":
        return ChordRLOOConfig, ChordRLOOTrainer
    if trainer == "async_grpo":
        from ..chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer

        return ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer
    raise ValueError(f"--trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}.")


# TRL's ModelConfig without `dtype`, for async_grpo: AsyncGRPOConfig has the same option (the dtype to load the model
# under), and one command line cannot take an option twice
ModelConfigWithoutDtype = make_dataclass(
    "ModelConfigWithoutDtype",
    [
        (
            spec.name,
            spec.type,
            field(default=spec.default, default_factory=spec.default_factory, metadata=spec.metadata),
        )
        for spec in fields(ModelConfig)
        if spec.name != "dtype"
    ],
    namespace={"__post_init__": ModelConfig.__post_init__},
)


REWARD_FUNCS = {
    "addition_reward": addition_reward,
    "math_accuracy_reward": math_accuracy_reward,
    "tool_call_reward": tool_call_reward,
}


@dataclass
class ChordScriptArguments:
    """
    Script options of the CHORD recipe.

    Parameters:
        dataset_name (`str`, *optional*):
            RL prompts: a hub dataset id, or a local `.json`, `.jsonl` or `.parquet` file. Unset: the built-in task.
        dataset_config (`str`, *optional*):
            Hub dataset configuration name of the RL prompts.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split of the RL prompts.
        dataset_prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column of the RL prompts holding the prompt; renamed to `prompt`. Other columns reach the rewards.
        chord_sft_dataset (`list[str]`, *optional*):
            Expert demonstrations (`prompt`/`completion` or `messages`, optional `tools`): hub dataset ids or local
            `.json`, `.jsonl` or `.parquet` files or folders of them, the name ms-swift uses. Several sources mix as
            `chord_sft_dataset_proportions` says (by default by size); each is named `name=path_or_id`, or by its file
            stem or the last part of its hub id.
        chord_sft_dataset_config (`str`, *optional*):
            Hub dataset configuration name of the expert demonstrations (every source).
        chord_sft_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the expert demonstrations (every source).
        chord_eval_sft_dataset (`list[str]`, *optional*):
            Held-out expert demonstrations, given as `--chord_sft_dataset` is (one or several named sources, the same
            `--chord_sft_dataset_config`): the trainer's `eval_expert_dataset`, whose `eval_chord/*` metrics each
            evaluation reports (`--eval_strategy steps --eval_steps N`) and the plot draws beside the training curve.
        chord_eval_sft_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the held-out expert demonstrations (a local file's only split is `"train"`).
        reward_funcs (`list[str]`, *optional*):
            Reward functions by name (see `REWARD_FUNCS`) or dotted import path (`my_module.my_reward`).
        heldout_eval_steps (`int`, *optional*, defaults to `25`):
            Built-in task only: held-out accuracy is measured every this many optimizer steps.
        trainer (`str`, *optional*, defaults to `"grpo"`):
            The trainer of the on-policy term: `"grpo"` ([`ChordTrainer`]), `"rloo"` ([`ChordRLOOTrainer`]),
            `"async_grpo"` ([`ChordAsyncGRPOTrainer`]: rollouts from a vLLM server, `--vllm_server_base_url`, in TRL's
            asynchronous GRPO), `"luffy"` ([`LuffyTrainer`]: LUFFY alone, the expert completions in a column of the
            RL prompts, no `--chord_sft_dataset`) or `"chord_luffy"` ([`ChordLuffyTrainer`]: LUFFY with CHORD's SFT
            term). It decides which config's options the run takes.
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "RL prompts: hub id or local json/jsonl/parquet file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub configuration name of the RL prompts."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the RL prompts."})
    dataset_prompt_column: str = field(
        default="prompt", metadata={"help": "Column of the RL prompts with the prompt."}
    )
    chord_sft_dataset: list[str] | None = field(
        default=None,
        metadata={
            "help": "Expert demonstrations: hub ids or local json/jsonl/parquet files, each optionally named as "
            "name=path_or_id; several sources mix as chord_sft_dataset_proportions says."
        },
    )
    chord_sft_dataset_config: str | None = field(
        default=None, metadata={"help": "Hub configuration of the expert data."}
    )
    chord_sft_dataset_split: str = field(default="train", metadata={"help": "Split of the expert demonstrations."})
    chord_eval_sft_dataset: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out expert demonstrations, as --chord_sft_dataset: their eval_chord/* metrics are reported "
            "at each evaluation (--eval_strategy steps --eval_steps N)."
        },
    )
    chord_eval_sft_dataset_split: str = field(
        default="train", metadata={"help": "Split of the held-out expert demonstrations."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": f"Reward functions: names among {sorted(REWARD_FUNCS)} or dotted import paths."},
    )
    heldout_eval_steps: int = field(default=25, metadata={"help": "Built-in task: held-out accuracy period in steps."})
    trainer: str = field(
        default="grpo",
        metadata={
            "help": "Trainer of the on-policy term: grpo (ChordTrainer), rloo (ChordRLOOTrainer), async_grpo "
            "(ChordAsyncGRPOTrainer, rollouts from a vLLM server), luffy (LuffyTrainer: LUFFY alone, no expert "
            "dataset) or chord_luffy (ChordLuffyTrainer: LUFFY with CHORD's SFT term). The run takes that trainer's "
            "config options.",
            "choices": list(TRAINERS),
        },
    )


def resolve_reward_funcs(names: list[str] | str) -> list:
    rewards = []
    for name in [names] if isinstance(names, str) else names:  # a YAML config may give one string
        if name in REWARD_FUNCS:
            rewards.append(REWARD_FUNCS[name])
        elif "." in name:
            module_name, function_name = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            rewards.append(getattr(importlib.import_module(module_name), function_name))
        else:
            raise ValueError(f"Unknown reward function {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted path.")
    return rewards


def expert_source_name(path_or_id: str) -> str:
    """A source's name from its file stem or the last part of its hub id: `data/math.jsonl` and `org/math` -> math."""
    return os.path.splitext(os.path.basename(path_or_id.rstrip("/")))[0]


def split_source_name(entry: str) -> tuple[str | None, str]:
    """
    `(name, path_or_id)` of a `--chord_sft_dataset` entry: `name=path_or_id`, or `(None, entry)` for an unnamed one.
    An entry that exists as a local path is unnamed, `=` or not (Hive-style folders: `data/split=train`), and so is
    one whose part before `=` could not be a name (it has a `/` or `.`).
    """
    name, separator, path_or_id = entry.partition("=")
    if not separator or os.path.exists(entry) or "/" in name or "." in name or not name:
        return None, entry
    return name, path_or_id


def load_expert_sources(entries: list[str] | str | None, config: str | None, split: str):
    """
    The expert dataset(s) of `--chord_sft_dataset`: `None`, one `Dataset` for one unnamed entry, or a dict of named
    datasets for several (or named) entries, `name=path_or_id`.
    """
    if entries is None:
        return None
    entries = [entries] if isinstance(entries, str) else list(entries)  # a YAML config may give one string
    if len(entries) == 1 and split_source_name(entries[0])[0] is None:
        return load_dataset_file_or_hub(entries[0], config, split)
    sources = {}
    for entry in entries:
        name, path_or_id = split_source_name(entry)
        name = name or expert_source_name(path_or_id)
        if name in sources:
            raise ValueError(
                f"Two expert sources are named {name!r} in --chord_sft_dataset {entries}: name them, as name=path."
            )
        sources[name] = load_dataset_file_or_hub(path_or_id, config, split)
    return sources


def check_trainer_options(script_args: ChordScriptArguments, model_args: ModelConfig) -> None:
    """Refuse, before anything is loaded, what `--trainer async_grpo` cannot take."""
    if script_args.dataset_name is None and script_args.trainer == "async_grpo":
        raise ValueError(
            "The built-in demo runs with GRPO or RLOO (--trainer grpo or rloo): --trainer async_grpo needs a vLLM "
            "server for its rollouts, and the demo's held-out evaluation generates with the policy, which "
            "AsyncGRPOTrainer loads with its packed attention. Give --model_name_or_path and --dataset_name."
        )
    if script_args.dataset_name is None and script_args.trainer in ("luffy", "chord_luffy"):
        raise ValueError(
            "The built-in demo is CHORD's: LUFFY needs RL prompts that carry their expert completions (a column, "
            "`--luffy_expert_column`). Give --dataset_name and --model_name_or_path (`trl-chord --config math_luffy`)."
        )
    if script_args.trainer == "luffy" and script_args.chord_eval_sft_dataset is not None:
        raise ValueError(
            "--trainer luffy has no expert SFT term to evaluate: --chord_eval_sft_dataset is for the CHORD trainers "
            "(--trainer chord_luffy for LUFFY with CHORD's term)."
        )
    if script_args.trainer == "async_grpo":
        # AsyncGRPOTrainer loads the model itself: with its packed attention, in its config's own `dtype`
        if model_args.load_in_4bit or model_args.load_in_8bit:  # (TRL's quantization config would read `dtype`)
            raise ValueError(
                "--trainer async_grpo takes no quantized model (AsyncGRPOTrainer has no `quantization_config`): leave "
                "out --load_in_4bit and --load_in_8bit."
            )
        if model_args.attn_implementation is not None:
            raise ValueError(
                f"--trainer async_grpo runs the model with AsyncGRPOTrainer's own packed attention, not "
                f"--attn_implementation {model_args.attn_implementation}: leave the option out."
            )


def task_data(script_args: ChordScriptArguments, training_args: ChordOptions) -> tuple:
    """The RL prompts, the expert data, the held-out set (the built-in demo's only) and the reward functions."""
    if script_args.dataset_name is None:
        train_dataset, expert_dataset, heldout = demo_datasets(seed=training_args.seed)
        return (
            train_dataset,
            expert_dataset,
            heldout,
            resolve_reward_funcs(script_args.reward_funcs or ["addition_reward"]),
        )
    if not script_args.reward_funcs:
        raise ValueError("Give at least one reward function with --reward_funcs.")
    train_dataset = load_dataset_file_or_hub(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
    )
    if script_args.dataset_prompt_column != "prompt":
        train_dataset = train_dataset.rename_column(script_args.dataset_prompt_column, "prompt")
    expert_dataset = load_expert_sources(
        script_args.chord_sft_dataset, script_args.chord_sft_dataset_config, script_args.chord_sft_dataset_split
    )
    return train_dataset, expert_dataset, None, resolve_reward_funcs(script_args.reward_funcs)


def demo_model_path(training_args: ChordOptions, builtin_task: bool) -> str:
    """The built-in demo's tiny random model, saved so that GRPOTrainer can reload it (e.g. as the reference model when
    beta > 0)."""
    if not builtin_task:
        raise ValueError("Give --model_name_or_path (a hub id or a local folder).")
    model_path = os.path.join(training_args.output_dir, "initial-model")
    if training_args.distributed_state.is_main_process:
        save_tiny_model(model_path, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    training_args.distributed_state.wait_for_everyone()
    return model_path


def set_model_loading(script_args: ChordScriptArguments, training_args: ChordOptions, model_args: ModelConfig) -> dict:
    """
    Puts the model options (revision, attention, dtype) into `training_args.model_init_kwargs`, with which the trainer
    loads the model, and returns the trainer's quantization argument (none for async_grpo).
    """
    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code)
    if script_args.trainer != "async_grpo":
        model_init_kwargs.update(attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if script_args.trainer == "async_grpo":
        return {}
    return {"quantization_config": get_quantization_config(model_args)}


def load_processing_class(model_path: str, model_args: ModelConfig, training_args: ChordOptions):
    """A vision-language model's processor, any other model's tokenizer, as GRPOTrainer loads it when given none."""
    return AutoProcessor.from_pretrained(
        model_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )


def print_run_outputs(output_dir: str, metrics_path: str, heldout_callback) -> None:
    """Where the metrics, their plot and the model are; the demo's held-out accuracy before and after."""
    history = heldout_callback.history if heldout_callback else None
    plot_path = plot_metrics(metrics_path, os.path.join(output_dir, "metrics.png"), history)
    print(f"Metrics: {metrics_path}\nPlot: {plot_path}\nModel: {output_dir}")
    if history:
        print(
            f"Held-out accuracy: {history[0]['accuracy']:.0%} before training, "
            f"{history[-1]['accuracy']:.0%} after {history[-1]['step']} steps."
        )


def main(script_args: ChordScriptArguments, training_args: ChordOptions, model_args: ModelConfig):
    builtin_task = script_args.dataset_name is None
    trainer_class = trainer_classes(script_args.trainer)[1]
    check_trainer_options(script_args, model_args)
    train_dataset, expert_dataset, heldout, reward_funcs = task_data(script_args, training_args)

    model_path = model_args.model_name_or_path
    if model_path is None:
        model_path = demo_model_path(training_args, builtin_task)
    quantization = set_model_loading(script_args, training_args, model_args)
    processing_class = load_processing_class(model_path, model_args, training_args)
    eval_expert_dataset = load_expert_sources(
        script_args.chord_eval_sft_dataset,
        script_args.chord_sft_dataset_config,
        script_args.chord_eval_sft_dataset_split,
    )
    trainer = trainer_class(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        expert_dataset=expert_dataset,
        **({} if eval_expert_dataset is None else {"eval_expert_dataset": eval_expert_dataset}),
        processing_class=processing_class,
        peft_config=get_peft_config(model_args),
        **quantization,
    )
    os.makedirs(training_args.output_dir, exist_ok=True)
    metrics_path = os.path.join(training_args.output_dir, "metrics.jsonl")
    # Only the main process writes the file (JsonLinesLoggerCallback), so only it may clear an old run's
    if trainer.accelerator.is_main_process and training_args.resume_from_checkpoint is None:
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    trainer.add_callback(JsonLinesLoggerCallback(metrics_path))
    heldout_callback = None
    if heldout is not None:
        heldout_callback = HeldOutEvaluationCallback(
            trainer,
            heldout,
            every_n_steps=script_args.heldout_eval_steps,
            max_new_tokens=training_args.max_completion_length,
            evaluate_before_training=True,
        )
        trainer.add_callback(heldout_callback)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    if trainer.accelerator.is_main_process:
        print_run_outputs(training_args.output_dir, metrics_path, heldout_callback)
    trainer.accelerator.wait_for_everyone()


USAGE = """trl-chord [--config NAME_OR_FILE] [--OPTION VALUE ...]    train (the options are below)
       trl-chord configs [NAME]                                 list the shipped configs, or print one's path
       trl-chord prepare [NAME [--help | OPTIONS]]              make the data of a paper config
       trl-chord sft-best-rl [--help | OPTIONS]                 SFT, its best held-out checkpoint, then RL from it"""

DESCRIPTION = """\
Train with CHORD: (1 - mu) * GRPO + mu * SFT on expert demonstrations (--trainer rloo or async_grpo: RLOO or TRL's
asynchronous GRPO in GRPO's place, with its config's options), or with LUFFY (--trainer luffy: expert completions
inside GRPO's groups; chord_luffy: both). Every option below is a flag, and any of them
can come from --config: a YAML file, or the name of a shipped config (`trl-chord configs` lists them: demo,
math_chord_phi, ...); flags on the command line win over the file. `trl-chord --config demo` runs the built-in demo.
Without a GPU, add --use_cpu true --bf16 false (the demo config sets them)."""


def make_parser(
    trainer: str = "grpo", script_options: tuple[type, ...] = (ChordScriptArguments,), **kwargs
) -> TrlParser:
    """The parser of the script's options (`script_options`), the trainer's config and TRL's `ModelConfig`."""
    model_options = ModelConfigWithoutDtype if trainer == "async_grpo" else ModelConfig
    options = (*script_options, trainer_classes(trainer)[0], model_options)
    return TrlParser(options, **{"usage": USAGE, "description": DESCRIPTION, **kwargs})


def resolve_config_argument(args: list[str]) -> list[str]:
    """`args` with `--config NAME` or `--config=NAME` as `--config PATH`, the form TrlParser reads."""
    args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" in args and args.index("--config") + 1 < len(args):
        index = args.index("--config") + 1
        args[index] = config_path(args[index])
    return args


def requested_trainer(args: list[str]) -> str:
    """`--trainer` of `args` (a command line whose `--config` is a path): on the command line, else in the YAML
    config, else `"grpo"`; the command line wins, as it does for every option."""
    for index, arg in enumerate(args):
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
        if arg == "--trainer" and index + 1 < len(args):
            return args[index + 1]
    if "--config" in args and args.index("--config") + 1 < len(args):
        with open(args[args.index("--config") + 1]) as file:
            return (yaml.safe_load(file) or {}).get("trainer", "grpo")
    return "grpo"


def parse_args(args: list[str], parser: TrlParser | None = None) -> tuple:
    """
    The recipe's options from `args` (`ChordScriptArguments`, the trainer's config, `ModelConfig`), or those of
    `parser`; `--config` takes a YAML file or the name of a shipped config (`demo`).
    """
    args = resolve_config_argument(args)
    try:
        return (parser or make_parser(requested_trainer(args))).parse_args_and_config(args)
    except ValueError as error:
        # transformers refuses bf16 (TRL's default, and the paper configs') without a GPU, and names only use_cpu
        if "bf16" not in str(error) or is_torch_bf16_gpu_available():
            raise
        raise CommandLineError(
            "this machine has no GPU with bf16, which this run asks for (bf16 is TRL's default). To run on the CPU "
            "(slow: for trying a config on a small model), add --use_cpu true --bf16 false, and --use_vllm false if "
            "the config uses vLLM (it needs a GPU)."
        ) from error
