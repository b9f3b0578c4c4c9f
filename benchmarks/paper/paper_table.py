"""
CHORD's claims tested at small scale, on a CPU: SFT, GRPO, SFT-then-GRPO, CHORD-mu, CHORD-phi and ablations, each at
its best of three learning rates, on a target task the starting model partly solves, with a second skill to keep.

    HF_HUB_OFFLINE=1 python benchmarks/paper/paper_table.py [--quick] [--preconditions_only] [--output_dir DIR]

1. For each seed, a tiny random model is pre-trained with plain SFT (TRL's SFTTrainer) on two task families in a
   SHORT answer style: two- and three-digit sums (the target task T) and word reversal (the general skill G), plus
   two-digit + one-digit sums in the worked style. It stops while it is still learning T: that is the starting
   ("instruct") model. The preconditions (P1-P4) are measured on it
   and printed; a full run stops there if one fails.
2. Every method trains it for the same number of optimizer steps, on the same RL prompts (two-digit sums only) and the
   same expert demonstrations (other two-digit sums in a LONGER worked style), through `ChordTrainer`, with a reward
   for the correct answer in either style and no format term.
3. Each method takes the best of three learning rates on a validation split of two-digit sums (on the selection seeds:
   seed 0), then runs the remaining seeds at that rate. Scores: two-digit test sums (in-distribution), three-digit
   test sums (out of distribution) and test words to reverse (retention of G), by greedy decoding, over steps.

It writes `paper_table.json` and `paper_table.png` to the output directory and prints the tables.
"""

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import datasets
import torch
import transformers
import trl
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.demo.addition import (
    completion_dataset,
    correctness_reward,
    is_correct,
    operand_pairs,
    prompt_dataset,
    reversal_completion_dataset,
    reversal_prompt_dataset,
    reversal_words,
    short_answer,
    worked_answer,
)
from trl_chord.demo.heldout import HeldOutEvaluationCallback, completion_nll, evaluate, sampled_pass_rates
from trl_chord.demo.tiny import build_tiny_model, build_tiny_tokenizer


MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
# Every run shares these; use_cpu etc. keep a CPU run fast and quiet
COMMON_ARGS = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    save_strategy="no",
    gradient_checkpointing=False,
    disable_tqdm=True,
    lr_scheduler_type="constant",
)
# Generation budgets in tokens: the longest worked answer of each split, plus the end token
TRAIN_COMPLETION_TOKENS = 40  # "9+9=18 carry 1; 9+9+1=19; answer 198" is 36 characters
EVAL_TOKENS = {"validation": 40, "test": 40, "ood_test": 56, "general_test": 8}
CURVE_SPLITS = ("test", "ood_test", "general_test")


@dataclass
class Scale:
    """How big the experiment is: the full run and `--quick` differ only here."""

    seeds: list[int]
    selection_seeds: list[int]  # the seeds that run every learning rate; the others run each method's best
    learning_rates: list[float]
    steps: int
    eval_every: int
    prompts_per_step: int
    num_generations: int
    expert_batch_size: int
    eval_size: int  # prompts in each validation and test split
    precondition_size: int | None  # RL prompts and expert examples the preconditions read (None: all)
    pretrain_max_steps: int
    pretrain_min_steps: int
    pretrain_check_every: int
    check_preconditions: bool  # stop before any comparison when a precondition fails


FULL = Scale(
    seeds=[0, 1, 2],
    selection_seeds=[0],
    learning_rates=[1e-4, 3e-4, 1e-3],
    steps=200,
    eval_every=25,
    prompts_per_step=8,
    num_generations=8,
    expert_batch_size=32,
    eval_size=300,
    precondition_size=None,
    pretrain_max_steps=4000,
    pretrain_min_steps=500,
    pretrain_check_every=50,
    check_preconditions=True,
)
QUICK = Scale(
    seeds=[0],
    selection_seeds=[0],
    learning_rates=[3e-4, 1e-3],
    steps=2,
    eval_every=1,
    prompts_per_step=2,
    num_generations=4,
    expert_batch_size=4,
    eval_size=12,
    precondition_size=24,
    pretrain_max_steps=20,
    pretrain_min_steps=10,
    pretrain_check_every=10,
    check_preconditions=False,
)

# The preconditions' thresholds (issue 13)
GENERAL_SKILL_MIN = 0.8  # P1: greedy accuracy on G's test words
PASS_AT_1_RANGE = (0.15, 0.5)  # P2: sampled pass@1 on the RL prompts
PASS_AT_K_MIN = 0.5  # P2: pass@8 on the RL prompts, and on those that need a carry
PASS_AT_K = 8
# P3: the experts are nearly always right, the starting model (almost) never answers in their style on its own, and
# their answers are much less likely under it than answers in its own style
EXPERT_CORRECT_MIN = 0.99
OWN_WORKED_STYLE_MAX = 0.01
EXPERT_NLL_RATIO_MIN = 5.0
# The pre-training stops at its first check with at least this sampled pass@1 on T and this greedy accuracy on G
PRETRAIN_TARGET_PASS_AT_1 = 0.3
PRETRAIN_TARGET_GENERAL = 0.9


@functools.cache
def task_splits(eval_size: int) -> dict[str, Dataset]:
    """
    Every split, fixed (seed 0) and disjoint. T in distribution is `a + b` with two-digit `a` and `b` (8,100 sums): the
    validation and test splits, the RL prompts, the expert demonstrations (worked style), and the rest for
    pre-training (short style). T out of distribution is three-digit `a` plus two-digit `b`: a test split, and 2,000
    other such sums in the pre-training (so the starting model has seen such sums, but no method trains on them). G is
    reversing a word of three to five letters: a test split and 8,000 words for pre-training.
    """
    rng = random.Random(0)
    in_distribution = operand_pairs(2, 2)
    out_of_distribution = operand_pairs(3, 2)
    words = reversal_words()
    for items in (in_distribution, out_of_distribution, words):
        rng.shuffle(items)
    validation, test = in_distribution[:eval_size], in_distribution[eval_size : 2 * eval_size]
    rl, expert = in_distribution[600:2100], in_distribution[2100:3600]
    pretrain_sums = in_distribution[3600:] + out_of_distribution[eval_size : eval_size + 2000]
    return {
        "pretrain": concatenate_datasets(
            [
                completion_dataset(pretrain_sums, short_answer),
                completion_dataset(operand_pairs(2, 1), worked_answer),
                reversal_completion_dataset(words[eval_size:8300]),
            ]
        ),
        # The pre-training's stop rule reads these: sums and words it trains on, none of the splits below
        "pretrain_check_sums": prompt_dataset(in_distribution[3600:3700]),
        "pretrain_check_words": reversal_prompt_dataset(words[eval_size : eval_size + 100]),
        "rl": prompt_dataset(rl),
        "expert": completion_dataset(expert, worked_answer),
        "expert_prompts": prompt_dataset(expert),
        "expert_in_own_style": completion_dataset(expert, short_answer),
        "validation": prompt_dataset(validation),
        "test": prompt_dataset(test),
        "ood_test": prompt_dataset(out_of_distribution[:eval_size]),
        "general_test": reversal_prompt_dataset(words[:eval_size]),
    }


@dataclass
class Method:
    """One row of the table: `chord` are the ChordConfig options; `then_grpo` splits the budget SFT -> GRPO."""

    name: str
    description: str
    chord: dict = field(default_factory=dict)
    then_grpo: bool = False


def methods(steps: int) -> list[Method]:
    uniform = dict(chord_token_weighting="uniform")
    sft = dict(chord_mu_peak=1.0, chord_mu_valley=1.0, **uniform)
    fixed_mu = dict(chord_mu_peak=0.1, chord_mu_valley=0.1)
    return [
        Method("sft", "SFT only (mu = 1, uniform)", sft),
        Method("grpo", "GRPO only (mu = 0)", dict(chord_mu_peak=0.0, chord_mu_valley=0.0)),
        Method("sft_then_grpo", f"SFT {steps // 2} steps, then GRPO {steps - steps // 2} steps", sft, then_grpo=True),
        Method(
            "chord_mu",
            f"CHORD-mu: cosine 0.9 -> 0.05 over {steps // 2} steps, uniform",
            dict(chord_mu_peak=0.9, chord_mu_valley=0.05, chord_mu_decay_steps=steps // 2, **uniform),
        ),
        Method("chord_phi", "CHORD-phi: mu = 0.1, phi", dict(fixed_mu, chord_token_weighting="phi")),
        Method("mu0.1_uniform", "mu = 0.1, uniform", dict(fixed_mu, **uniform)),
        Method("mu0.1_is", "mu = 0.1, IS weights p", dict(fixed_mu, chord_token_weighting="is")),
        Method("mu0.1_entropy", "mu = 0.1, entropy weights", dict(fixed_mu, chord_token_weighting="entropy")),
        Method("mu0.1_focal", "mu = 0.1, focal (1-p)^2", dict(fixed_mu, chord_token_weighting="focal")),
        Method(
            "adaptive",
            "adaptive mu = max(0, 0.5 - reward), uniform",
            dict(chord_mu_schedule="adaptive", chord_adaptive_mu_tau=0.5, **uniform),
        ),
    ]


def quiet_worker() -> None:
    """One CPU thread per run (two runs share the two cores), and no per-step log lines or progress bars."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


class StopWhenPartlySkilled(TrainerCallback):
    """
    Stops the pre-training at the first check (every `every` steps from `min_steps`) where the model solves a
    sampled `PRETRAIN_TARGET_PASS_AT_1` of the check sums and reverses `PRETRAIN_TARGET_GENERAL` of the check words.
    """

    def __init__(self, model, tokenizer, splits: dict[str, Dataset], min_steps: int, every: int):
        self.model, self.tokenizer, self.splits = model, tokenizer, splits
        self.min_steps, self.every = min_steps, every
        self.checks: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < self.min_steps or state.global_step % self.every:
            return
        sums = sampled_pass_rates(self.model, self.tokenizer, self.splits["pretrain_check_sums"], 4, 8)
        words = evaluate(self.model, self.tokenizer, self.splits["pretrain_check_words"], EVAL_TOKENS["general_test"])
        self.checks.append({"step": state.global_step, "pass_at_1": sums.pass_at_1, "general": words.accuracy})
        if sums.pass_at_1 >= PRETRAIN_TARGET_PASS_AT_1 and words.accuracy >= PRETRAIN_TARGET_GENERAL:
            control.should_training_stop = True


def pretrain_starting_model(seed: int, scale: Scale, splits: dict[str, Dataset], path: str) -> dict:
    """The starting model: a random tiny model after plain SFT on short-style sums and reversals, stopped early."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **MODEL_SHAPE)
    args = SFTConfig(
        output_dir=os.path.join(path, "sft-trainer"),
        seed=seed,
        max_steps=scale.pretrain_max_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        logging_steps=scale.pretrain_max_steps,
        **COMMON_ARGS,
    )
    stop_rule = StopWhenPartlySkilled(model, tokenizer, splits, scale.pretrain_min_steps, scale.pretrain_check_every)
    trainer = SFTTrainer(model=model, args=args, train_dataset=splits["pretrain"], processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(stop_rule)
    trainer.train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"steps": trainer.state.global_step, "checks": stop_rule.checks}


def measure_preconditions(model, tokenizer, splits: dict[str, Dataset], size: int | None) -> dict:
    """P1-P4 on the starting model, each with the numbers it rests on and whether it holds."""

    def first(split: str) -> Dataset:
        return splits[split] if size is None else splits[split].select(range(size))

    general = evaluate(model, tokenizer, splits["general_test"], EVAL_TOKENS["general_test"])
    rl = sampled_pass_rates(model, tokenizer, first("rl"), PASS_AT_K, TRAIN_COMPLETION_TOKENS)
    expert_texts = [example["completion"][0]["content"] for example in first("expert")]
    expert_nll = completion_nll(model, tokenizer, first("expert"))
    own_style_nll = completion_nll(model, tokenizer, first("expert_in_own_style"))
    test = evaluate(model, tokenizer, splits["test"], EVAL_TOKENS["test"])
    ood = evaluate(model, tokenizer, splits["ood_test"], EVAL_TOKENS["ood_test"])
    ood_sampled = sampled_pass_rates(model, tokenizer, splits["ood_test"], PASS_AT_K, EVAL_TOKENS["ood_test"])
    expert_correct = statistics.fmean(map(is_correct, expert_texts, first("expert_prompts")["answer"]))
    return {
        "P1": {
            "general_accuracy": general.accuracy,
            "holds": general.accuracy >= GENERAL_SKILL_MIN,
        },
        "P2": {
            **asdict(rl),
            "holds": PASS_AT_1_RANGE[0] <= rl.pass_at_1 <= PASS_AT_1_RANGE[1]
            and rl.pass_at_k >= PASS_AT_K_MIN
            and rl.carry_pass_at_k >= PASS_AT_K_MIN,
        },
        "P3": {
            "expert_nll": expert_nll,
            "own_style_nll": own_style_nll,
            "expert_correct": expert_correct,
            "expert_mean_characters": statistics.fmean(map(len, expert_texts)),
            "own_style_mean_characters": statistics.fmean(
                len(example["completion"][0]["content"]) for example in first("expert_in_own_style")
            ),
            "samples_in_worked_style": rl.worked_style,
            "holds": expert_correct >= EXPERT_CORRECT_MIN
            and rl.worked_style <= OWN_WORKED_STYLE_MAX
            and expert_nll >= EXPERT_NLL_RATIO_MIN * own_style_nll,
        },
        "P4": {
            "test_accuracy": test.accuracy,
            "ood_test_accuracy": ood.accuracy,
            "ood_pass_at_1": ood_sampled.pass_at_1,
            "ood_pass_at_k": ood_sampled.pass_at_k,
            "holds": ood.accuracy < test.accuracy,
        },
    }


def prepare_seed(seed: int, scale: Scale, work_dir: str) -> dict:
    """Pre-trains the seed's starting model and measures the preconditions and step 0 of every curve on it."""
    quiet_worker()
    torch.manual_seed(seed)  # the samples of the precondition checks
    started = time.time()
    splits = task_splits(scale.eval_size)
    path = os.path.join(work_dir, f"start-seed{seed}")
    pretraining = pretrain_starting_model(seed, scale, splits, path)
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path)
    evaluations = {
        split: asdict(evaluate(model, tokenizer, splits[split], EVAL_TOKENS[split])) for split in CURVE_SPLITS
    }
    return {
        "seed": seed,
        "path": path,
        "pretraining": pretraining,
        "preconditions": measure_preconditions(model, tokenizer, splits, scale.precondition_size),
        "evaluations": evaluations,
        "seconds": time.time() - started,
    }


LOGGED_KEYS = (
    "reward",
    "chord/mu",
    "chord/expert_nll",
    "chord/grpo_skipped",
    "entropy",
    "completions/mean_length",
    "frac_reward_zero_std",
)


def train_phase(model_path, scale, seed, learning_rate, steps, output_dir, chord, step_offset=0):
    """
    One ChordTrainer run from `model_path`; returns the trainer, its evaluations over steps, its log and the seconds it
    spent training (without the evaluations).
    """
    splits = task_splits(scale.eval_size)
    args = ChordConfig(
        output_dir=output_dir,
        seed=seed,
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=scale.prompts_per_step * scale.num_generations,
        num_generations=scale.num_generations,
        max_completion_length=TRAIN_COMPLETION_TOKENS,
        temperature=1.0,
        beta=0.0,
        logging_steps=scale.eval_every,
        chord_sft_per_device_train_batch_size=scale.expert_batch_size,
        **COMMON_ARGS,
        **chord,
    )
    uses_expert = args.chord_mu_schedule == "adaptive" or max(args.chord_mu_peak, args.chord_mu_valley) > 0
    trainer = ChordTrainer(
        model=model_path,
        reward_funcs=correctness_reward,
        args=args,
        train_dataset=splits["rl"],
        expert_dataset=splits["expert"] if uses_expert else None,
    )
    trainer.remove_callback(PrinterCallback)
    callbacks = {
        split: HeldOutEvaluationCallback(
            trainer, splits[split], scale.eval_every, EVAL_TOKENS[split], step_offset, name=split
        )
        for split in CURVE_SPLITS
    }
    for callback in callbacks.values():
        trainer.add_callback(callback)
    started = time.perf_counter()
    trainer.train()
    evaluation_seconds = sum(callback.seconds for callback in callbacks.values())
    curves = {split: callback.history for split, callback in callbacks.items()}
    log = [
        {"step": step_offset + entry["step"], **{key: entry[key] for key in LOGGED_KEYS if key in entry}}
        for entry in trainer.state.log_history
    ]
    return trainer, curves, log, time.perf_counter() - started - evaluation_seconds


def run_method(method: Method, seed: int, learning_rate: float, scale: Scale, start_path: str, work_dir: str) -> dict:
    """Trains one method for one seed at one learning rate; returns its evaluations over steps and its log."""
    quiet_worker()
    started = time.time()
    output_dir = os.path.join(work_dir, f"{method.name}-seed{seed}-lr{learning_rate:g}")
    first_steps = scale.steps // 2 if method.then_grpo else scale.steps
    trainer, curves, log, training_seconds = train_phase(
        start_path, scale, seed, learning_rate, first_steps, output_dir, method.chord
    )
    if method.then_grpo:
        # The GRPO phase starts from the SFT phase's weights with a fresh optimizer, as a second training job would
        trainer.save_model(os.path.join(output_dir, "after-sft"))
        trainer, more_curves, more_log, more_seconds = train_phase(
            os.path.join(output_dir, "after-sft"),
            scale,
            seed,
            learning_rate,
            scale.steps - first_steps,
            output_dir,
            dict(chord_mu_peak=0.0, chord_mu_valley=0.0),
            first_steps,
        )
        curves = {split: curves[split] + more_curves[split] for split in CURVE_SPLITS}
        log += more_log
        training_seconds += more_seconds
    splits = task_splits(scale.eval_size)
    validation = evaluate(trainer.model, trainer.processing_class, splits["validation"], EVAL_TOKENS["validation"])
    return {
        "method": method.name,
        "seed": seed,
        "learning_rate": learning_rate,
        "validation_accuracy": validation.accuracy,
        "curves": curves,
        "log": log,
        "training_seconds": training_seconds,
        "seconds": time.time() - started,
    }


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


FINAL_METRICS = ("accuracy", "carry_accuracy", "worked_style", "mean_length", "mean_entropy")


def with_start(run: dict, start: dict) -> dict:
    """The run's curves with the starting model's evaluation as step 0."""
    return {split: [start["evaluations"][split]] + run["curves"][split] for split in CURVE_SPLITS}


def method_summary(method: Method, runs: list[dict], starts: dict[int, dict]) -> dict:
    """Final-step statistics over seeds, the mean curves, and the lowest point of the mean in-distribution curve."""
    curves = [with_start(run, starts[run["seed"]]) for run in runs]
    steps = [entry["step"] for entry in curves[0]["test"]]
    mean_curves = {
        split: [statistics.fmean(curve[split][index]["accuracy"] for curve in curves) for index in range(len(steps))]
        for split in CURVE_SPLITS
    }
    final = {
        split: {
            metric: summarize([curve[split][-1][metric] for curve in curves])
            for metric in FINAL_METRICS
            if curves[0][split][-1][metric] is not None
        }
        for split in CURVE_SPLITS
    }
    return {
        "description": method.description,
        "learning_rate": runs[0]["learning_rate"],
        "final": final,
        "curve": {"steps": steps, **mean_curves},
        "dip": min(mean_curves["test"]),
        "seconds": summarize([run["seconds"] for run in runs]),
        "training_seconds": summarize([run["training_seconds"] for run in runs]),
        "runs": runs,
    }


def best_learning_rates(sweep: list[dict]) -> dict[str, float]:
    """Each method's learning rate with the best mean validation accuracy on the selection seeds (ties: the lowest)."""
    scores: dict[str, dict[float, list[float]]] = {}
    for run in sweep:
        scores.setdefault(run["method"], {}).setdefault(run["learning_rate"], []).append(run["validation_accuracy"])
    return {
        name: max(sorted(by_rate), key=lambda rate: statistics.fmean(by_rate[rate]))
        for name, by_rate in scores.items()
    }


class PreconditionFailed(RuntimeError):
    pass


def check(prepared: dict, scale: Scale, elapsed: float) -> None:
    print(f"[{elapsed:6.0f}s] starting model, seed {prepared['seed']}: {format_preconditions(prepared)}", flush=True)
    failed = [name for name, result in prepared["preconditions"].items() if not result["holds"]]
    if failed and scale.check_preconditions:
        raise PreconditionFailed(
            f"seed {prepared['seed']}: {', '.join(failed)} fail; change the task, not the methods"
        )


def format_preconditions(prepared: dict) -> str:
    p = prepared["preconditions"]
    holds = {name: "holds" if result["holds"] else "FAILS" for name, result in p.items()}
    return (
        f"pre-trained {prepared['pretraining']['steps']} steps | "
        f"P1 {holds['P1']}: G accuracy {p['P1']['general_accuracy']:.2f} | "
        f"P2 {holds['P2']}: pass@1 {p['P2']['pass_at_1']:.2f}, pass@{p['P2']['k']} {p['P2']['pass_at_k']:.2f} "
        f"(carry sums {p['P2']['carry_pass_at_1']:.2f}, {p['P2']['carry_pass_at_k']:.2f}) | "
        f"P3 {holds['P3']}: expert NLL {p['P3']['expert_nll']:.2f} nats/token vs {p['P3']['own_style_nll']:.2f} in "
        f"its own style, experts correct {p['P3']['expert_correct']:.2f}, own samples worked-style "
        f"{p['P3']['samples_in_worked_style']:.2f} | P4 {holds['P4']}: test {p['P4']['test_accuracy']:.2f}, "
        f"OOD {p['P4']['ood_test_accuracy']:.2f} (pass@1 {p['P4']['ood_pass_at_1']:.2f})"
    )


def prepare_all(scale: Scale, work_dir: str, workers: int) -> dict[int, dict]:
    """Only the starting models and their preconditions, `workers` seeds at a time (`--preconditions_only`)."""
    started = time.time()
    prepared = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for result in pool.map(prepare_seed, scale.seeds, [scale] * len(scale.seeds), [work_dir] * len(scale.seeds)):
            print(f"[{time.time() - started:6.0f}s] seed {result['seed']}: {format_preconditions(result)}", flush=True)
            prepared[result["seed"]] = result
    return prepared


def run_all(scale: Scale, work_dir: str, workers: int) -> dict:
    """
    Every run, `workers` at a time: the starting models; as soon as a selection seed's is ready, each method at every
    learning rate on it (the costliest methods first); once those are all done, each method at its best rate on the
    other seeds.
    """
    started = time.time()
    all_methods = {method.name: method for method in methods(scale.steps)}
    # GRPO-heavy runs first, the SFT run (no generation) last, so that both workers finish the sweep together
    run_order = [name for name in all_methods if name != "sft"] + ["sft"]
    sweep_size = len(all_methods) * len(scale.learning_rates) * len(scale.selection_seeds)
    prepared, runs, best = {}, [], None
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:

        def submit(seed: int, rates: dict[str, list[float]]) -> set:
            path = prepared[seed]["path"]
            return {
                pool.submit(run_method, all_methods[name], seed, rate, scale, path, work_dir)
                for name in run_order
                for rate in rates[name]
            }

        pending = {pool.submit(prepare_seed, seed, scale, work_dir) for seed in scale.seeds}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result, elapsed = future.result(), time.time() - started
                if "method" not in result:  # a starting model
                    prepared[result["seed"]] = result
                    try:
                        check(result, scale, elapsed)
                    except PreconditionFailed:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    if result["seed"] in scale.selection_seeds:
                        pending |= submit(result["seed"], {name: scale.learning_rates for name in all_methods})
                    elif best is not None:
                        pending |= submit(result["seed"], {name: [best[name]] for name in all_methods})
                    continue
                runs.append(result)
                print(
                    f"[{elapsed:6.0f}s] {result['method']:>14} seed {result['seed']} lr {result['learning_rate']:g}: "
                    f"validation {result['validation_accuracy']:.2f}, "
                    + ", ".join(f"{split} {result['curves'][split][-1]['accuracy']:.2f}" for split in CURVE_SPLITS)
                    + f" in {result['seconds']:.0f}s",
                    flush=True,
                )
                sweep = [run for run in runs if run["seed"] in scale.selection_seeds]
                if best is None and len(sweep) == sweep_size:
                    best = best_learning_rates(sweep)
                    print(f"[{elapsed:6.0f}s] best learning rates on validation: {best}", flush=True)
                    for seed in prepared:
                        if seed not in scale.selection_seeds:
                            pending |= submit(seed, {name: [best[name]] for name in all_methods})
    starts = {seed: prepared[seed] for seed in scale.seeds}
    chosen = {
        name: sorted(
            (run for run in runs if run["method"] == name and run["learning_rate"] == best[name]),
            key=lambda run: run["seed"],
        )
        for name in all_methods
    }
    start_row = {
        "description": "the starting model, no training",
        "final": {
            split: {
                metric: summarize([starts[seed]["evaluations"][split][metric] for seed in scale.seeds])
                for metric in FINAL_METRICS
                if starts[scale.seeds[0]]["evaluations"][split][metric] is not None
            }
            for split in CURVE_SPLITS
        },
    }
    summaries = {name: method_summary(all_methods[name], chosen[name], starts) for name in all_methods}
    sft_seconds, grpo_seconds = (summaries[name]["training_seconds"]["mean"] for name in ("sft", "grpo"))
    return {
        "starts": starts,
        "best_learning_rates": best,
        # SFT (mu = 1) skips generation and the GRPO forward: its cost against GRPO's, at each one's chosen rate
        "sft_to_grpo_time": {"sft": sft_seconds, "grpo": grpo_seconds, "ratio": sft_seconds / grpo_seconds},
        "sweep": learning_rate_sweep(runs, scale),
        "methods": {"start": start_row, **summaries},
    }


def learning_rate_sweep(runs: list[dict], scale: Scale) -> dict[str, dict[str, dict]]:
    """Every method at every learning rate on the selection seeds: validation and final test accuracies (means)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        if run["seed"] in scale.selection_seeds:
            groups.setdefault((run["method"], run["learning_rate"]), []).append(run)
    sweep: dict[str, dict[str, dict]] = {}
    for (name, rate), group in groups.items():
        sweep.setdefault(name, {})[f"{rate:g}"] = {
            "validation": statistics.fmean(run["validation_accuracy"] for run in group),
            **{
                split: statistics.fmean(run["curves"][split][-1]["accuracy"] for run in group)
                for split in CURVE_SPLITS
            },
        }
    return sweep


def cell(summary: dict, digits: int = 3) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{summary['min']:.2f}, {summary['max']:.2f}]"


def results_table(results: dict) -> str:
    """The final step of each method at its chosen learning rate, over the seeds."""
    lines = [
        "| method | lr | T in-dist test | T OOD test | G retention | lowest point of the T in-dist mean curve "
        "| worked style | length (tokens) | entropy (nats/token) | training seconds per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results["methods"].items():
        final = result["final"]
        test = final["test"]
        lines.append(
            f"| {name}: {result['description']} | {result.get('learning_rate', '-')} | {cell(test['accuracy'])} "
            f"| {cell(final['ood_test']['accuracy'])} | {cell(final['general_test']['accuracy'])} "
            f"| {result['dip']:.3f} | {test['worked_style']['mean']:.2f} | {test['mean_length']['mean']:.1f} "
            f"| {test['mean_entropy']['mean']:.3f} | {result['training_seconds']['mean']:.0f} |"
            if name != "start"
            else f"| {name}: {result['description']} | - | {cell(test['accuracy'])} "
            f"| {cell(final['ood_test']['accuracy'])} | {cell(final['general_test']['accuracy'])} | - "
            f"| {test['worked_style']['mean']:.2f} | {test['mean_length']['mean']:.1f} "
            f"| {test['mean_entropy']['mean']:.3f} | - |"
        )
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Every learning rate of every method on the selection seeds; the chosen one in bold."""
    lines = [
        "| method | lr | validation (selects) | T in-dist test | T OOD test | G retention |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_rate in results["sweep"].items():
        for rate, scores in sorted(by_rate.items(), key=lambda item: float(item[0])):
            chosen = float(rate) == results["best_learning_rates"][name]
            mark = "**" if chosen else ""
            lines.append(
                f"| {name} | {mark}{rate}{mark} | {mark}{scores['validation']:.3f}{mark} | {scores['test']:.3f} "
                f"| {scores['ood_test']:.3f} | {scores['general_test']:.3f} |"
            )
    return "\n".join(lines)


MAIN_METHODS = ("sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi")
CURVE_TITLES = {
    "test": "T in distribution (two-digit test sums)",
    "ood_test": "T out of distribution (three-digit sums)",
    "general_test": "G retention (reversing test words)",
}


def plot_curves(results: dict, path: str) -> None:
    """Mean accuracy over seeds against the optimizer step, one panel per test split; the start as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVE_SPLITS), figsize=(16, 5), sharex=True)
    for axis, split in zip(axes, CURVE_SPLITS):
        axis.axhline(results["methods"]["start"]["final"][split]["accuracy"]["mean"], color="gray", linestyle=":")
        for name, result in results["methods"].items():
            if name == "start":
                continue
            main = name in MAIN_METHODS
            axis.plot(
                result["curve"]["steps"],
                result["curve"][split],
                "-" if main else "--",
                label=name,
                linewidth=2 if main else 1,
            )
        axis.set_title(CURVE_TITLES[split], fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("greedy accuracy, mean over seeds (dotted: start)")
    axes[-1].legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def provenance() -> dict:
    """The commit the run started from, whether the tree had changes, the machine and its load."""

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain").splitlines(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def machine_load() -> dict:
    """The 1/5/15-minute load averages and the CPU seconds this machine spent so far, all processes together."""
    with open("/proc/loadavg") as file:
        load = [float(value) for value in file.read().split()[:3]]
    with open("/proc/stat") as file:
        ticks = [int(value) for value in file.readline().split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # everything but idle and iowait
    return {"load_average": load, "busy_cpu_seconds": busy / os.sysconf("SC_CLK_TCK")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a much smaller smoke version (about a minute)")
    parser.add_argument("--output_dir", default="docs/results", help="where the JSON and the PNG go")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one CPU thread each")
    parser.add_argument(
        "--preconditions_only",
        action="store_true",
        help="pre-train the starting models, measure P1-P4 and stop (writes paper_table_preconditions.json)",
    )
    options = parser.parse_args()
    scale = QUICK if options.quick else FULL
    started, load_before = time.time(), machine_load()
    own_cpu_before = resource_seconds()
    info = provenance()
    if options.preconditions_only:
        with tempfile.TemporaryDirectory(prefix="chord-paper-") as work_dir:
            starts = prepare_all(scale, work_dir, options.workers)
        for start in starts.values():
            del start["path"]  # a temporary folder, gone now
        report = {"scale": asdict(scale), "wall_seconds": time.time() - started, "provenance": info, "starts": starts}
        os.makedirs(options.output_dir, exist_ok=True)
        with open(os.path.join(options.output_dir, "paper_table_preconditions.json"), "w") as file:
            json.dump(report, file, indent=1)
        return
    with tempfile.TemporaryDirectory(prefix="chord-paper-") as work_dir:
        try:
            results = run_all(scale, work_dir, options.workers)
        except PreconditionFailed as error:
            sys.exit(f"Precondition failed: {error}")
    wall_seconds, load_after = time.time() - started, machine_load()
    own_cpu_seconds = resource_seconds() - own_cpu_before
    all_cpu_seconds = load_after["busy_cpu_seconds"] - load_before["busy_cpu_seconds"]
    info["load"] = {
        "before": load_before["load_average"],
        "after": load_after["load_average"],
        "cpu_seconds_this_run": own_cpu_seconds,
        "cpu_seconds_all_processes": all_cpu_seconds,
        "share_of_cpu_used_by_others": max(0.0, 1 - own_cpu_seconds / all_cpu_seconds) if all_cpu_seconds else 0.0,
    }
    os.makedirs(options.output_dir, exist_ok=True)
    name = "paper_table_quick" if options.quick else "paper_table"
    plot_curves(results, os.path.join(options.output_dir, f"{name}.png"))
    report = {"scale": asdict(scale), "wall_seconds": wall_seconds, "provenance": info, **results}
    with open(os.path.join(options.output_dir, f"{name}.json"), "w") as file:
        json.dump(report, file, indent=1)
    print("\nPreconditions (starting models):")
    for seed, prepared in results["starts"].items():
        print(f"seed {seed}: {format_preconditions(prepared)}")
    print("\nLearning rates (selection seeds):\n" + sweep_table(results))
    print("\nResults (final step, chosen learning rate, all seeds):\n" + results_table(results))
    print(
        f"\nTraining time per run, without evaluations: SFT {results['sft_to_grpo_time']['sft']:.0f} s, GRPO "
        f"{results['sft_to_grpo_time']['grpo']:.0f} s (ratio {results['sft_to_grpo_time']['ratio']:.2f})"
    )
    print(
        f"Wall time {wall_seconds / 60:.1f} min; CPU share used by other processes "
        f"{info['load']['share_of_cpu_used_by_others']:.0%}; commit {info['commit']}; "
        f"results in {options.output_dir}/{name}.*"
    )


def resource_seconds() -> float:
    """CPU seconds used by this process and its finished children (the workers, once the pool has closed)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
