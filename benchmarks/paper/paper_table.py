"""
CHORD's claims tested at small scale, on a CPU: SFT, GRPO, SFT-best -> GRPO (two budgets), CHORD-mu, CHORD-phi (as
the paper runs it and with its weights rescaled to mean 1), and uniform and IS weights at matched strength, each at
its own learning rates chosen on validation, on 5 reported seeds, with a part of the target task only the experts can
teach, a second skill to keep and an out-of-distribution split.

    HF_HUB_OFFLINE=1 python benchmarks/paper/paper_table.py [--quick] [--preconditions_only] [--output_dir DIR]
    python benchmarks/paper/paper_table.py --report_only docs/results/paper_table.json  # no training: the tables

1. For each seed (a selection seed, then the reported seeds), a tiny random model is pre-trained with plain SFT
   (TRL's SFTTrainer) on two task families in a SHORT answer style: two- and three-digit + two-digit sums (the target
   task T and its out-of-distribution split) and word reversal (the general skill G), plus two-digit + one-digit sums
   in the worked style. It stops while it is still learning T: that is the starting ("instruct") model. The
   preconditions P1-P5 are measured on every starting model and printed before any method runs; a full run stops
   there if one fails.
2. Every method trains it through `ChordTrainer` on the same RL prompts (two-digit sums, and a HARD family of
   three-digit + three-digit sums the starting model almost never gets right: P5) and the same expert demonstrations
   (other sums of both families, in a longer WORKED style), with a reward for the correct answer in either style and
   no format term.
3. On the selection seed (never reported), every method runs every setting of its grid: each learning rate of a
   common grid (which grows by one rate past an edge where the method's best rate sits, so that the grid brackets
   it), CHORD-mu's decay length too, and for SFT-best -> GRPO a learning rate per phase (SFT's chosen on the best
   validation score of any of its checkpoints, the GRPO phase's on the final validation score from that
   checkpoint). The setting with the best validation score (the mean accuracy of the two families' validation
   splits) runs on the reported seeds.
4. Scores over steps, by greedy decoding: two-digit test sums (in distribution), hard test sums, three-digit +
   two-digit sums (out of distribution, never trained on) and test words to reverse (retention of G). The report has
   each method's final scores over the reported seeds, paired differences against GRPO and against SFT-best -> GRPO
   with bootstrap intervals, the trade-off each method reaches over its sweep (target accuracy against retention and
   OOD, with its frontier), and the diagnostics of the expert term from every run's log.

It writes `paper_table.json`, `paper_table.png` (curves) and `paper_table_tradeoff.png` to the output directory and
prints the tables.
"""

import argparse
import functools
import json
import math
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
from trl_chord.recipes.sft_best import HeldOutRewardCallback, best_evaluation, rl_start_model


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
TRAIN_COMPLETION_TOKENS = 56  # "9+9=18 carry 1; 9+9+1=19 carry 1; 9+9+1=19; answer 1998" is 55 characters
EVAL_TOKENS = {
    "validation": 40,  # "9+9=18 carry 1; 9+9+1=19; answer 198" is 36
    "hard_validation": 56,
    "test": 40,
    "hard_test": 56,
    "ood_test": 56,
    "general_test": 8,
}
VALIDATION_SPLITS = ("validation", "hard_validation")  # the selection reads these only
COLUMNS = ("test", "hard_test", "ood_test", "general_test")  # the reported scores
CURVE_SPLITS = VALIDATION_SPLITS + COLUMNS
COLUMN_TITLES = {
    "test": "T in distribution (two-digit sums)",
    "hard_test": "T hard family (three-digit + three-digit sums)",
    "ood_test": "T out of distribution (three-digit + two-digit sums)",
    "general_test": "G retention (reversing words)",
}
COLUMN_NAMES = {"test": "T in-dist", "hard_test": "T hard", "ood_test": "T OOD", "general_test": "G retention"}


@dataclass
class Scale:
    """How big the experiment is: the full run and `--quick` differ only here."""

    selection_seed: int  # runs every setting of every grid; never reported
    seeds: list[int]  # the reported seeds: each method at its chosen setting
    learning_rates: list[float]  # every arm's grid to begin with, on the ladder 1, 3, 10, 30, ... x 10^k
    max_grid_extensions: int  # rates an arm's grid may gain past each edge where its best rate sits
    chord_mu_decay_fractions: list[float]  # CHORD-mu's decay lengths, as fractions of `steps`
    steps: int
    eval_every: int
    prompts_per_step: int
    num_generations: int
    expert_batch_size: int
    eval_size: int  # prompts in each validation and test split
    precondition_size: int | None  # RL prompts and expert examples of each family the preconditions read (None: all)
    pretrain_max_steps: int
    pretrain_min_steps: int
    pretrain_check_every: int
    bootstrap_samples: int
    check_preconditions: bool  # stop before any comparison when a precondition fails


FULL = Scale(
    selection_seed=0,
    seeds=[1, 2, 3, 4, 5],
    learning_rates=[3e-5, 1e-4, 3e-4, 1e-3],
    max_grid_extensions=2,
    chord_mu_decay_fractions=[0.25, 0.5, 1.0],
    steps=150,
    eval_every=25,
    prompts_per_step=8,
    num_generations=8,
    expert_batch_size=32,
    eval_size=300,
    precondition_size=None,
    pretrain_max_steps=4000,
    pretrain_min_steps=500,
    pretrain_check_every=50,
    bootstrap_samples=10000,
    check_preconditions=True,
)
QUICK = Scale(
    selection_seed=0,
    seeds=[1],
    learning_rates=[1e-3],
    max_grid_extensions=1,  # so that every grid grows both ways, and the growth is exercised
    chord_mu_decay_fractions=[0.5],
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
    bootstrap_samples=200,
    check_preconditions=False,
)

# The preconditions' thresholds (issues 13 and 21)
GENERAL_SKILL_MIN = 0.8  # P1: greedy accuracy on G's test words
PASS_AT_1_RANGE = (0.15, 0.5)  # P2: sampled pass@1 on the two-digit RL prompts
PASS_AT_K_MIN = 0.5  # P2: pass@8 on the two-digit RL prompts, and on those that need a carry
PASS_AT_K = 8
# P3: the experts are nearly always right, the starting model (almost) never answers in their style on its own, and
# their answers are much less likely under it than answers in its own style
EXPERT_CORRECT_MIN = 0.99
OWN_WORKED_STYLE_MAX = 0.01
EXPERT_NLL_RATIO_MIN = 5.0
# P5: the hard family is one only the experts can teach: RL alone (almost) never samples a right answer, the experts
# are always right
HARD_PASS_AT_K_MAX = 0.05
HARD_EXPERT_CORRECT = 1.0
# The pre-training stops at its first check with at least this sampled pass@1 on T and this greedy accuracy on G
PRETRAIN_TARGET_PASS_AT_1 = 0.3
PRETRAIN_TARGET_GENERAL = 0.9
# The hard family's RL prompts and expert demonstrations (each); a quarter of the RL prompts and of the experts
HARD_TRAIN_SIZE = 500


@functools.cache
def task_splits(eval_size: int) -> dict[str, Dataset]:
    """
    Every split, fixed and disjoint. T in distribution is `a + b` with two-digit `a` and `b` (8,100 sums): the
    validation and test splits, the RL prompts, the expert demonstrations (worked style), and the rest for
    pre-training (short style). T's hard family is three-digit `a` plus three-digit `b` (810,000 sums, none in the
    pre-training): validation and test splits, 500 RL prompts and 500 expert demonstrations. T out of distribution is
    three-digit `a` plus two-digit `b`: a test split, and 2,000 other such sums in the pre-training (so the starting
    model has seen such sums, but no method trains on them). G is reversing a word of three to five letters: a test
    split and 8,000 words for pre-training. The hard family is drawn with its own generator, so the other splits are
    those of the previous rounds.
    """
    rng = random.Random(0)
    in_distribution = operand_pairs(2, 2)
    out_of_distribution = operand_pairs(3, 2)
    words = reversal_words()
    for items in (in_distribution, out_of_distribution, words):
        rng.shuffle(items)
    hard = random.Random(1).sample(operand_pairs(3, 3), 2 * eval_size + 2 * HARD_TRAIN_SIZE)
    hard_validation, hard_test = hard[:eval_size], hard[eval_size : 2 * eval_size]
    hard_rl = hard[2 * eval_size : 2 * eval_size + HARD_TRAIN_SIZE]
    hard_expert = hard[2 * eval_size + HARD_TRAIN_SIZE :]
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
        "rl": prompt_dataset(rl + hard_rl),
        "expert": completion_dataset(expert + hard_expert, worked_answer),
        # Each family's part, for the preconditions
        "rl_two_digit": prompt_dataset(rl),
        "rl_hard": prompt_dataset(hard_rl),
        "expert_two_digit": completion_dataset(expert, worked_answer),
        "expert_two_digit_prompts": prompt_dataset(expert),
        "expert_two_digit_in_own_style": completion_dataset(expert, short_answer),
        "expert_hard": completion_dataset(hard_expert, worked_answer),
        "expert_hard_prompts": prompt_dataset(hard_expert),
        "validation": prompt_dataset(validation),
        "hard_validation": prompt_dataset(hard_validation),
        "test": prompt_dataset(test),
        "hard_test": prompt_dataset(hard_test),
        "ood_test": prompt_dataset(out_of_distribution[:eval_size]),
        "general_test": reversal_prompt_dataset(words[:eval_size]),
    }


@dataclass
class Arm:
    """
    One method. `chord` are its ChordConfig options; `grid` names what its selection sweeps besides the learning rate
    (`"decay"`: CHORD-mu's decay length); `sft_budget` marks the two-phase SFT-best -> GRPO arms: `"paper"` (the best
    SFT checkpoint of the whole SFT run, then GRPO for every step) or `"equal"` (the best SFT checkpoint of the first
    half, then GRPO for the rest, so both phases add up to the other methods' steps).
    """

    name: str
    description: str
    chord: dict = field(default_factory=dict)
    grid: tuple[str, ...] = ()
    sft_budget: str | None = None


UNIFORM = dict(chord_token_weighting="uniform")
SFT_OPTIONS = dict(chord_mu_peak=1.0, chord_mu_valley=1.0, **UNIFORM)
GRPO_OPTIONS = dict(chord_mu_peak=0.0, chord_mu_valley=0.0)
FIXED_MU = dict(chord_mu_peak=0.1, chord_mu_valley=0.1)
MATCHED = dict(FIXED_MU, chord_token_weight_normalization="mean")
ARMS = [
    Arm("sft", "SFT only (mu = 1, uniform)", SFT_OPTIONS),
    Arm("grpo", "GRPO only (mu = 0)", GRPO_OPTIONS),
    Arm(
        "sft_best_grpo",
        "SFT-best -> GRPO, the paper's protocol: best-validation SFT checkpoint, then GRPO for every step",
        GRPO_OPTIONS,
        sft_budget="paper",
    ),
    Arm(
        "sft_best_grpo_equal",
        "SFT-best -> GRPO, equal steps: best SFT checkpoint of the first half, then GRPO for the rest",
        GRPO_OPTIONS,
        sft_budget="equal",
    ),
    Arm(
        "chord_mu",
        "CHORD-mu: cosine 0.9 -> 0.05, uniform",
        dict(chord_mu_peak=0.9, chord_mu_valley=0.05, **UNIFORM),
        ("decay",),
    ),
    Arm("chord_phi", "CHORD-phi: mu = 0.1, phi (the paper's)", dict(FIXED_MU, chord_token_weighting="phi")),
    Arm(
        "chord_phi_mean", "CHORD-phi, weights rescaled to mean 1: mu = 0.1", dict(MATCHED, chord_token_weighting="phi")
    ),
    Arm("uniform", "mu = 0.1, uniform weights (mean 1)", dict(MATCHED, **UNIFORM)),
    Arm("is_mean", "mu = 0.1, IS weights p rescaled to mean 1", dict(MATCHED, chord_token_weighting="is")),
]
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
# The reference arms of the paired differences
REFERENCES = ("grpo", "sft_best_grpo")


def settings(arm: Arm, scale: Scale, rates: list[float]) -> list[dict]:
    """
    Every setting of the arm's selection grid at these learning rates, in the order ties are broken (lowest rate,
    shortest decay first).
    """
    rates = sorted(rates)
    if "decay" in arm.grid:
        decays = [max(1, round(fraction * scale.steps)) for fraction in scale.chord_mu_decay_fractions]
        return [{"learning_rate": rate, "decay_steps": decay} for rate in rates for decay in decays]
    return [{"learning_rate": rate} for rate in rates]


def next_rate(rate: float, direction: int) -> float:
    """The neighbour of `rate` on the ladder 1, 3, 10, 30, ... x 10^k: above it (`direction` 1) or below it (-1)."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = round(rate / 10**exponent)
    if mantissa not in (1, 3):
        raise ValueError(f"learning rate {rate:g} is not on the ladder 1, 3, 10, 30, ... x 10^k")
    if direction > 0:
        value = 3 * 10**exponent if mantissa == 1 else 10 ** (exponent + 1)
    else:
        value = 3 * 10 ** (exponent - 1) if mantissa == 1 else 10**exponent
    return float(f"{value:.0e}")


def setting_label(setting: dict) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in setting.items())


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


def expert_accuracy(examples: Dataset, prompts: Dataset) -> float:
    """The fraction of expert answers whose final number is right."""
    texts = [example["completion"][0]["content"] for example in examples]
    return statistics.fmean(map(is_correct, texts, prompts["answer"]))


def measure_preconditions(model, tokenizer, splits: dict[str, Dataset], size: int | None) -> dict:
    """P1-P5 on the starting model, each with the numbers it rests on and whether it holds."""

    def first(split: str) -> Dataset:
        return splits[split] if size is None else splits[split].select(range(min(size, len(splits[split]))))

    general = evaluate(model, tokenizer, splits["general_test"], EVAL_TOKENS["general_test"])
    rl = sampled_pass_rates(model, tokenizer, first("rl_two_digit"), PASS_AT_K, TRAIN_COMPLETION_TOKENS)
    hard = sampled_pass_rates(model, tokenizer, first("rl_hard"), PASS_AT_K, TRAIN_COMPLETION_TOKENS)
    expert_texts = [example["completion"][0]["content"] for example in first("expert_two_digit")]
    expert_nll = completion_nll(model, tokenizer, first("expert_two_digit"))
    own_style_nll = completion_nll(model, tokenizer, first("expert_two_digit_in_own_style"))
    test = evaluate(model, tokenizer, splits["test"], EVAL_TOKENS["test"])
    ood = evaluate(model, tokenizer, splits["ood_test"], EVAL_TOKENS["ood_test"])
    ood_sampled = sampled_pass_rates(model, tokenizer, splits["ood_test"], PASS_AT_K, EVAL_TOKENS["ood_test"])
    expert_correct = expert_accuracy(first("expert_two_digit"), first("expert_two_digit_prompts"))
    hard_expert_correct = expert_accuracy(first("expert_hard"), first("expert_hard_prompts"))
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
                len(example["completion"][0]["content"]) for example in first("expert_two_digit_in_own_style")
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
        "P5": {
            **asdict(hard),
            "expert_nll": completion_nll(model, tokenizer, first("expert_hard")),
            "expert_correct": hard_expert_correct,
            "holds": hard.pass_at_k < HARD_PASS_AT_K_MAX and hard_expert_correct >= HARD_EXPERT_CORRECT,
        },
    }


def prepare_seed(seed: int, scale: Scale, work_dir: str) -> dict:
    """Pre-trains the seed's starting model and measures the preconditions and step 0 of every curve on it."""
    quiet_worker()
    torch.manual_seed(seed)  # the samples of the precondition checks
    started, cpu_started = time.time(), time.process_time()
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
        "cpu_seconds": time.process_time() - cpu_started,
    }


# The trainer's metrics every run keeps in its log (averaged over each logging period): the reward, the schedule, and
# the expert term's diagnostics (issue 19): its mean token weight, the policy's probability of the expert tokens, its
# effective mu, and each term's gradient norm
EXPERT_TERM_KEYS = (
    "chord/mu",
    "chord/effective_mu",
    "chord/token_weight_mean",
    "chord/expert_token_prob",
    "chord/expert_prob_below_0.1",
    "chord/expert_prob_above_0.9",
    "chord/expert_nll",
    "chord/expert_grad_norm",
    "chord/grpo_grad_norm",
)
LOGGED_KEYS = (
    "reward",
    "frac_reward_zero_std",
    "entropy",
    "completions/mean_length",
    *EXPERT_TERM_KEYS,
    "chord/grpo_skipped",
)


def train_phase(
    model_path, scale, seed, learning_rate, steps, output_dir, chord, step_offset=0, keep_checkpoints=False
):
    """
    One ChordTrainer run from `model_path`: its evaluations over steps, its log, the seconds it spent training
    (without the evaluations), and, with `keep_checkpoints` (SFT, the first phase of SFT-best -> GRPO), the package's
    SFT-best selection: the validation score at every evaluation (`selection`) and each new best saved as a
    checkpoint (`checkpoints`: step -> path, `None` for the starting model), so that the best of any first part of the
    run is among them.
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
        chord_log_term_grad_norms=True,  # the log keeps each term's gradient norm (every eval_every steps)
        **COMMON_ARGS,
        **chord,
        save_only_model=keep_checkpoints,  # the SFT-best checkpoints: weights only
    )
    uses_expert = max(args.chord_mu_peak, args.chord_mu_valley) > 0
    trainer = ChordTrainer(
        model=model_path,
        reward_funcs=correctness_reward,
        args=args,
        train_dataset=splits["rl"],
        expert_dataset=splits["expert"] if uses_expert else None,
    )
    trainer.remove_callback(PrinterCallback)
    # The validation splits only select: SFT's at every evaluation (its best checkpoint), the others' at the last step
    every = {
        split: scale.eval_every if keep_checkpoints or split not in VALIDATION_SPLITS else steps
        for split in CURVE_SPLITS
    }
    callbacks = {
        split: HeldOutEvaluationCallback(
            trainer, splits[split], every[split], EVAL_TOKENS[split], step_offset, name=split
        )
        for split in CURVE_SPLITS
    }
    for callback in callbacks.values():
        trainer.add_callback(callback)
    selection = None
    if keep_checkpoints:
        # The validation score that selects: the mean accuracy (the reward) over both families' validation splits,
        # each answered in one greedy batch with its own token budget, as their curves are
        selection = HeldOutRewardCallback(
            trainer,
            {split: splits[split] for split in VALIDATION_SPLITS},
            scale.eval_every,
            max_new_tokens={split: EVAL_TOKENS[split] for split in VALIDATION_SPLITS},
            batch_size=scale.eval_size,
        )
        trainer.add_callback(selection)
    started = time.perf_counter()
    trainer.train()
    evaluation_seconds = sum(callback.seconds for callback in [*callbacks.values(), selection] if callback is not None)
    curves = {split: callback.history for split, callback in callbacks.items()}
    log = [
        {"step": step_offset + entry["step"], **{key: entry[key] for key in LOGGED_KEYS if key in entry}}
        for entry in trainer.state.log_history
        if "chord/mu" in entry  # the periodic logs, not the summary at the end
    ]
    return {
        "curves": curves,
        "log": log,
        "training_seconds": time.perf_counter() - started - evaluation_seconds,
        "selection": [] if selection is None else selection.history,
        "checkpoints": {} if selection is None else selection.checkpoints,
    }


def run_arm(arm: Arm, seed: int, setting: dict, scale: Scale, start: dict, work_dir: str, phase_one=None) -> dict:
    """
    Trains one arm for one seed at one setting from the seed's starting model; for the two-phase arms, the GRPO phase
    from `phase_one`'s checkpoint (`path`, `steps`, `learning_rate` and its `curves` up to that step). Returns the
    evaluations over steps (step 0 included) and the log.
    """
    quiet_worker()
    started, cpu_started = time.time(), time.process_time()
    output_dir = os.path.join(
        work_dir, f"{arm.name}-seed{seed}-" + setting_label(setting).replace(", ", "-").replace(" ", "")
    )
    chord = dict(arm.chord)
    if "decay_steps" in setting:
        chord["chord_mu_decay_steps"] = setting["decay_steps"]
    curves = {split: [start["evaluations"][split]] for split in CURVE_SPLITS}
    first_step, model_path, steps = 0, start["path"], scale.steps
    if arm.sft_budget is not None:
        first_step, model_path = phase_one["steps"], phase_one["path"]
        curves = {
            split: [point for point in phase_one["curves"][split] if point["step"] <= first_step]
            for split in CURVE_SPLITS
        }
        if arm.sft_budget == "equal":
            steps = scale.steps - first_step
    phase = train_phase(
        model_path,
        scale,
        seed,
        setting["learning_rate"],
        steps,
        output_dir,
        chord,
        step_offset=first_step,
        keep_checkpoints=arm.name == "sft",
    )
    result = {
        "arm": arm.name,
        "seed": seed,
        "setting": setting,
        "curves": {split: curves[split] + phase["curves"][split] for split in CURVE_SPLITS},
        "log": phase["log"],
        "training_seconds": phase["training_seconds"],
        "seconds": time.time() - started,
        # The CPU time of the worker (its one thread), which other jobs on the machine do not stretch
        "cpu_seconds": time.process_time() - cpu_started,
    }
    if arm.sft_budget is not None:
        result["sft_phase"] = {"learning_rate": phase_one["learning_rate"], "steps": first_step}
    if arm.name == "sft":
        result["selection"], result["checkpoints"] = phase["selection"], phase["checkpoints"]
    return result


def validation_score(curves: dict, index: int) -> float:
    """The selection score at the `index`-th evaluation: the mean accuracy of the two families' validation splits."""
    return statistics.fmean(curves[split][index]["accuracy"] for split in VALIDATION_SPLITS)


def final_validation(run: dict) -> float:
    return validation_score(run["curves"], -1)


def best_checkpoint(sft_run: dict, budget: str, scale: Scale) -> tuple[int, float]:
    """
    The step of the SFT run's best-validation checkpoint and its score, by the package's SFT-best rule (step 0, the
    starting model, included; ties: the earliest). `"paper"` looks at every checkpoint, `"equal"` at those of the
    first half of the steps.
    """
    best = best_evaluation(sft_run["selection"], last_step=scale.steps if budget == "paper" else scale.steps // 2)
    return best["step"], best["eval_reward"]


def choose_setting(runs: list[dict]) -> dict:
    """
    The setting with the best final validation score on the selection seed, of `runs` in the grid's order (ties: the
    first).
    """
    return max(runs, key=final_validation)["setting"]


def choose_sft_phase(sft_runs: list[dict], budget: str, scale: Scale) -> float:
    """
    SFT's learning rate for a two-phase arm: the one whose best checkpoint (within the budget) validates best, of
    `sft_runs` in the grid's order (ties: the first).
    """
    return max(sft_runs, key=lambda run: best_checkpoint(run, budget, scale)[1])["setting"]["learning_rate"]


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
        f"{p['P3']['samples_in_worked_style']:.3f} | P4 {holds['P4']}: test {p['P4']['test_accuracy']:.2f}, "
        f"OOD {p['P4']['ood_test_accuracy']:.2f} (pass@1 {p['P4']['ood_pass_at_1']:.2f}) | "
        f"P5 {holds['P5']}: hard pass@{p['P5']['k']} {p['P5']['pass_at_k']:.3f} (pass@1 {p['P5']['pass_at_1']:.4f}), "
        f"experts correct {p['P5']['expert_correct']:.2f}"
    )


@dataclass(frozen=True)
class Job:
    """A unit of work for the pool: a starting model (`arm` None) or one arm, seed and setting."""

    seed: int
    arm: str | None = None
    setting: tuple = ()  # the setting's items, so that a job can key a dict

    @property
    def setting_dict(self) -> dict:
        return dict(self.setting)


def job(arm: str, seed: int, setting: dict) -> Job:
    return Job(seed, arm, tuple(setting.items()))


# A rough cost of each arm's run, to start the long ones first: rollouts of long worked answers and the expert term
# both cost, SFT alone (no rollouts) least
RELATIVE_COST = {"sft": 1, "grpo": 2, "sft_best_grpo": 3, "sft_best_grpo_equal": 2}


class Experiment:
    """
    Every run of the experiment, `workers` at a time, each as soon as what it needs is known: the starting models
    first (their preconditions are printed before any method runs); on the selection seed every setting of every
    grid (SFT's first, as the two-phase arms' sweeps need its checkpoints), the grid growing by one rate past an edge
    where the arm's best rate sits; on the reported seeds each arm at its chosen setting, once its grid is final.
    """

    def __init__(self, scale: Scale, work_dir: str, workers: int):
        self.scale, self.work_dir, self.workers = scale, work_dir, workers
        self.starts: dict[int, dict] = {}
        self.runs: dict[Job, dict] = {}
        self.submitted: set[Job] = set()
        self.rates = {arm.name: sorted(scale.learning_rates) for arm in ARMS}
        self.added_rates: dict[str, dict[int, list[float]]] = {arm.name: {-1: [], 1: []} for arm in ARMS}
        self.started = time.time()

    def settings(self, arm: Arm) -> list[dict]:
        return settings(arm, self.scale, self.rates[arm.name])

    # What is chosen once the selection seed's sweep is in. `extend_grids` runs after every result, so a complete
    # sweep is a final one.
    def sweep_runs(self, arm: Arm) -> list[dict] | None:
        """The arm's runs on the selection seed in the grid's order, once every setting of its grid has one."""
        seed = self.scale.selection_seed
        found = [self.runs.get(job(arm.name, seed, setting)) for setting in self.settings(arm)]
        return None if any(run is None for run in found) else found

    def sft_phase_rate(self, budget: str) -> float | None:
        sft_runs = self.sweep_runs(ARMS_BY_NAME["sft"])
        return None if sft_runs is None else choose_sft_phase(sft_runs, budget, self.scale)

    def chosen(self, arm: Arm) -> dict | None:
        runs = self.sweep_runs(arm)
        return None if runs is None else choose_setting(runs)

    def chosen_rates(self, arm: Arm) -> list[float]:
        """The rates the arm's complete sweep picks: its own, and for SFT also those of the two-phase arms' phase."""
        rates = [self.chosen(arm)["learning_rate"]]
        if arm.name == "sft":
            rates += [self.sft_phase_rate(budget) for budget in ("paper", "equal")]
        return rates

    def edges_reached(self, arm: Arm) -> list[int]:
        """The edges of the arm's grid (-1 low, 1 high) where a chosen rate sits."""
        rates, chosen = self.rates[arm.name], self.chosen_rates(arm)
        return [direction for direction, edge in ((-1, rates[0]), (1, rates[-1])) if edge in chosen]

    def extend_grids(self) -> None:
        """Adds the next rate past each edge of a complete sweep where a chosen rate sits, up to the cap per edge."""
        for arm in ARMS:
            if self.sweep_runs(arm) is None:
                continue
            for direction in self.edges_reached(arm):
                added = self.added_rates[arm.name][direction]
                if len(added) < self.scale.max_grid_extensions:
                    edge = self.rates[arm.name][0 if direction < 0 else -1]
                    added.append(next_rate(edge, direction))
                    self.rates[arm.name] = sorted(self.rates[arm.name] + added[-1:])
                    print(f"{arm.name}: best rate at the edge {edge:g} of its grid, adding {added[-1]:g}", flush=True)

    def phase_one(self, arm: Arm, seed: int) -> dict | None:
        """The SFT phase a two-phase arm starts from on `seed`, once that seed's SFT run at the chosen rate is done."""
        rate = self.sft_phase_rate(arm.sft_budget)
        sft_run = None if rate is None else self.runs.get(job("sft", seed, {"learning_rate": rate}))
        if sft_run is None:
            return None
        step, score = best_checkpoint(sft_run, arm.sft_budget, self.scale)
        # The package's hand-over: the kept checkpoint's folder (the starting model's for step 0)
        best = {"step": step, "eval_reward": score, "checkpoint": sft_run["checkpoints"][step]}
        path = rl_start_model(best, self.starts[seed]["path"], merged_dir="")  # full weights: nothing to merge
        return {"learning_rate": rate, "steps": step, "path": path, "curves": sft_run["curves"]}

    def wanted(self) -> list[tuple[Job, dict | None]]:
        """Every run that can start now, with the SFT phase it starts from (two-phase arms), most urgent first."""
        scale, seed = self.scale, self.scale.selection_seed
        prepare = [(Job(s), None) for s in [seed, *scale.seeds]]
        if seed not in self.starts or any(item not in self.submitted for item, _ in prepare):
            return prepare
        wanted = []
        for arm in ARMS:  # the sweep, SFT's first
            for setting in self.settings(arm):
                if arm.sft_budget is None:
                    wanted.append((job(arm.name, seed, setting), None))
                elif (phase_one := self.phase_one(arm, seed)) is not None:
                    wanted.append((job(arm.name, seed, setting), phase_one))
        reported = []
        for arm in ARMS:
            if arm.sft_budget is not None and (rate := self.sft_phase_rate(arm.sft_budget)) is not None:
                # The SFT phases, cheap, first: the two-phase arms wait for them
                wanted += [(job("sft", s, {"learning_rate": rate}), None) for s in scale.seeds if s in self.starts]
            if (setting := self.chosen(arm)) is None:
                continue
            for s in scale.seeds:
                phase_one = None if arm.sft_budget is None else self.phase_one(arm, s)
                if s in self.starts and (arm.sft_budget is None or phase_one is not None):
                    reported.append((job(arm.name, s, setting), phase_one))
        reported.sort(key=lambda item: -RELATIVE_COST.get(item[0].arm, 4))  # stable: the costliest arms first
        return wanted + reported

    def submit(self, pool, pending: set) -> None:
        for item, phase_one in self.wanted():
            if len(pending) >= self.workers:
                return
            if item in self.submitted:
                continue
            self.submitted.add(item)
            if item.arm is None:
                future = pool.submit(prepare_seed, item.seed, self.scale, self.work_dir)
            else:
                start = self.starts[item.seed]
                arm = ARMS_BY_NAME[item.arm]
                future = pool.submit(
                    run_arm, arm, item.seed, item.setting_dict, self.scale, start, self.work_dir, phase_one
                )
            future.job = item
            pending.add(future)

    def run(self) -> None:
        pending: set = set()
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
            self.submit(pool, pending)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        self.record(future.job, future.result())
                    except BaseException:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                self.submit(pool, pending)

    def record(self, item: Job, result: dict) -> None:
        elapsed = time.time() - self.started
        if item.arm is None:
            self.starts[item.seed] = result
            check(result, self.scale, elapsed)
            return
        self.runs[item] = result
        if item.seed == self.scale.selection_seed:
            self.extend_grids()
        phase = ""
        if "sft_phase" in result:
            phase = f" (SFT {result['sft_phase']['steps']} steps at {result['sft_phase']['learning_rate']:g})"
        print(
            f"[{elapsed:6.0f}s] {item.arm:>19} seed {item.seed} {setting_label(item.setting_dict)}{phase}: validation "
            f"{final_validation(result):.2f}, "
            + ", ".join(f"{COLUMN_NAMES[split]} {result['curves'][split][-1]['accuracy']:.2f}" for split in COLUMNS)
            + f" in {result['seconds']:.0f}s",
            flush=True,
        )

    def prepare_only(self) -> None:
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn")) as pool:
            seeds = [self.scale.selection_seed, *self.scale.seeds]
            for result in pool.map(prepare_seed, seeds, [self.scale] * len(seeds), [self.work_dir] * len(seeds)):
                self.record(Job(result["seed"]), result)


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


FINAL_METRICS = ("accuracy", "carry_accuracy", "worked_style", "mean_length", "mean_entropy")


def final_summary(points: list[dict]) -> dict:
    """Each metric of a split's evaluations (one per seed), summarized over seeds."""
    return {
        metric: summarize([point[metric] for point in points])
        for metric in FINAL_METRICS
        if points[0][metric] is not None
    }


def mean_curves(runs: list[dict]) -> dict:
    """The mean over seeds of each split's accuracy at every step all seeds evaluated (the two-phase arms' seeds have
    their own step grids: the SFT phase's length differs)."""
    common = sorted(set.intersection(*({point["step"] for point in run["curves"]["test"]} for run in runs)))
    curves = {"steps": common}
    for split in COLUMNS:
        at = [{point["step"]: point["accuracy"] for point in run["curves"][split]} for run in runs]
        curves[split] = [statistics.fmean(by_step[step] for by_step in at) for step in common]
    return curves


def log_diagnostics(runs: list[dict]) -> dict:
    """The expert term's diagnostics over seeds: the mean of each logged value over each run's first and last logging
    period, and over the whole run."""
    diagnostics = {}
    for key in (*EXPERT_TERM_KEYS, "reward", "frac_reward_zero_std"):
        series = [[entry[key] for entry in run["log"] if key in entry] for run in runs]
        if all(series):
            diagnostics[key] = {
                "first": statistics.fmean(values[0] for values in series),
                "last": statistics.fmean(values[-1] for values in series),
                "run_mean": statistics.fmean(statistics.fmean(values) for values in series),
            }
    return diagnostics


def arm_summary(description: str, runs: list[dict], setting: dict | None) -> dict:
    """Final-step statistics over the reported seeds, the mean curves, the lowest point of the mean in-distribution
    curve, the diagnostics and the runs themselves."""
    runs = sorted(runs, key=lambda run: run["seed"])
    curves = mean_curves(runs)
    summary = {
        "description": description,
        "setting": setting,
        "seeds": [run["seed"] for run in runs],
        "final": {split: final_summary([run["curves"][split][-1] for run in runs]) for split in CURVE_SPLITS},
        "curve": curves,
        "dip": min(curves["test"]),
        "diagnostics": log_diagnostics(runs),
        "seconds": summarize([run["seconds"] for run in runs]),
        "cpu_seconds": summarize([run["cpu_seconds"] for run in runs]),
        "training_seconds": summarize([run["training_seconds"] for run in runs]),
    }
    if "sft_phase" in runs[0]:
        summary["sft_phase"] = {
            "learning_rate": runs[0]["sft_phase"]["learning_rate"],
            "steps": [run["sft_phase"]["steps"] for run in runs],
        }
    return summary


def sft_best_summary(sft_runs: list[dict], rate: float, scale: Scale) -> dict:
    """The paper's "SFT-best" row: each reported seed's SFT run (at the SFT phase's rate), at its best-validation
    checkpoint, the one SFT-best -> GRPO starts from."""
    points, steps = {split: [] for split in CURVE_SPLITS}, []
    for run in sorted(sft_runs, key=lambda run: run["seed"]):
        step, _ = best_checkpoint(run, "paper", scale)
        steps.append(step)
        for split in CURVE_SPLITS:
            points[split].append(next(point for point in run["curves"][split] if point["step"] == step))
    return {
        "description": "SFT-best: the best-validation SFT checkpoint (where SFT-best -> GRPO starts)",
        "setting": {"learning_rate": rate},
        "seeds": [run["seed"] for run in sft_runs],
        "checkpoint_steps": steps,
        "final": {split: final_summary(points[split]) for split in CURVE_SPLITS},
    }


def paired_differences(summaries: dict, reference: str, samples: int) -> dict:
    """
    For every other arm and column: the per-seed differences (arm - reference, the same starting model), their mean,
    a 95% percentile bootstrap interval of the mean (seeds resampled with replacement), and the seeds where the arm
    is ahead.
    """
    rng = random.Random(0)
    reference_summary = summaries[reference]
    result = {}
    for name, summary in summaries.items():
        if name in (reference, "start") or summary["seeds"] != reference_summary["seeds"]:
            continue
        result[name] = {}
        for column in COLUMNS:
            values = summary["final"][column]["accuracy"]["values"]
            reference_values = reference_summary["final"][column]["accuracy"]["values"]
            differences = [a - b for a, b in zip(values, reference_values, strict=True)]
            means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(samples))
            result[name][column] = {
                "mean": statistics.fmean(differences),
                "low": means[int(0.025 * samples)],
                "high": means[min(samples - 1, int(0.975 * samples))],
                "values": differences,
                "seeds_ahead": sum(difference > 0 for difference in differences),
                "seeds_behind": sum(difference < 0 for difference in differences),
            }
    return result


TRADEOFF_PANELS = (
    ("test", "general_test"),
    ("hard_test", "general_test"),
    ("test", "ood_test"),
    ("hard_test", "ood_test"),
)


def pareto_frontier(points: list[dict], x: str, y: str) -> list[dict]:
    """The points no other point beats on both `x` and `y` (higher is better), by increasing `x`."""
    frontier = []
    for point in sorted(points, key=lambda point: (-point[x], -point[y])):
        if not frontier or point[y] > frontier[-1][y]:
            frontier.append(point)
    return frontier[::-1]


def tradeoff(runs: list[dict]) -> dict:
    """
    Every model an arm's sweep reached on the selection seed (each setting, each evaluation after step 0; for the
    two-phase arms, those of the GRPO phase) with its four test scores, and the arm's frontier for each pair of a
    target column and a retention column.
    """
    points = []
    for run in runs:
        first_step = run.get("sft_phase", {}).get("steps", 0)
        for index, point in enumerate(run["curves"]["test"]):
            if point["step"] > first_step:
                points.append(
                    {
                        "setting": run["setting"],
                        "step": point["step"],
                        **{split: run["curves"][split][index]["accuracy"] for split in COLUMNS},
                    }
                )
    return {
        "points": points,
        "frontiers": {f"{x} vs {y}": pareto_frontier(points, x, y) for x, y in TRADEOFF_PANELS},
    }


def sweep_rows(experiment: Experiment) -> dict:
    """Every setting of every arm on the selection seed: the score the selection read (`selection_score`: the mean
    final accuracy of both validation splits; a name no split has, so that the splits' own accuracies beside it
    cannot overwrite it) and each split's final accuracy (and, for SFT, its best checkpoint in each budget; for the
    two-phase arms, the SFT phase they started from)."""
    seed, scale = experiment.scale.selection_seed, experiment.scale
    rows = {}
    for arm in ARMS:
        rows[arm.name] = []
        for run in experiment.sweep_runs(arm):
            row = {
                "setting": run["setting"],
                "selection_score": final_validation(run),
                **{split: run["curves"][split][-1]["accuracy"] for split in CURVE_SPLITS},
            }
            if arm.name == "sft":
                for budget in ("paper", "equal"):
                    step, score = best_checkpoint(run, budget, scale)
                    row[f"best_checkpoint_{budget}"] = {"step": step, "selection_score": score}
            if "sft_phase" in run:
                row["sft_phase"] = run["sft_phase"]
            rows[arm.name].append(row)
    return {"seed": seed, "rows": rows}


def add_sft_phase_seconds(summaries: dict, experiment: Experiment) -> None:
    """
    The two-phase arms' SFT phase in their training seconds: each reported seed's SFT run at the phase's rate, for
    the steps the GRPO phase started after (prorated: an SFT step costs about the same throughout, no generation).
    """
    scale = experiment.scale
    for arm in ARMS:
        if arm.sft_budget is None:
            continue
        phase = summaries[arm.name]["sft_phase"]
        seconds = [
            experiment.runs[job("sft", seed, {"learning_rate": phase["learning_rate"]})]["training_seconds"]
            * steps
            / scale.steps
            for seed, steps in zip(summaries[arm.name]["seeds"], phase["steps"], strict=True)
        ]
        phase["training_seconds"] = summarize(seconds)


def results(experiment: Experiment) -> dict:
    scale = experiment.scale
    starts = {seed: experiment.starts[seed] for seed in [scale.selection_seed, *scale.seeds]}
    chosen = {arm.name: experiment.chosen(arm) for arm in ARMS}
    reported = {
        arm.name: [experiment.runs[job(arm.name, seed, chosen[arm.name])] for seed in scale.seeds] for arm in ARMS
    }
    start_row = {
        "description": "the starting model, no training",
        "seeds": scale.seeds,
        "final": {
            split: final_summary([starts[seed]["evaluations"][split] for seed in scale.seeds])
            for split in CURVE_SPLITS
        },
    }
    sft_rate = experiment.sft_phase_rate("paper")
    sft_phase_runs = [experiment.runs[job("sft", seed, {"learning_rate": sft_rate})] for seed in scale.seeds]
    summaries = {
        "start": start_row,
        **{arm.name: arm_summary(arm.description, reported[arm.name], chosen[arm.name]) for arm in ARMS},
        "sft_best": sft_best_summary(sft_phase_runs, sft_rate, scale),
    }
    add_sft_phase_seconds(summaries, experiment)
    all_runs = [
        {key: value for key, value in run.items() if key != "checkpoints"}
        for _, run in sorted(experiment.runs.items(), key=lambda item: (item[0].arm, item[0].seed, item[0].setting))
    ]
    return {
        "starts": {
            seed: {key: value for key, value in start.items() if key != "path"} for seed, start in starts.items()
        },
        "chosen_settings": chosen,
        # Each arm's grid as the sweep left it: the rates added past an edge, and the edges a chosen rate still sits on
        # (only where the cap stopped the growth)
        "learning_rate_grids": {
            arm.name: {
                "rates": experiment.rates[arm.name],
                "added_below": experiment.added_rates[arm.name][-1],
                "added_above": experiment.added_rates[arm.name][1],
                "chosen_at_edge": experiment.edges_reached(arm),
            }
            for arm in ARMS
        },
        "sft_phase_learning_rates": {budget: experiment.sft_phase_rate(budget) for budget in ("paper", "equal")},
        "sweep": sweep_rows(experiment),
        "methods": summaries,
        "paired_differences": {
            reference: paired_differences(summaries, reference, scale.bootstrap_samples) for reference in REFERENCES
        },
        "tradeoff": {arm.name: tradeoff(experiment.sweep_runs(arm)) for arm in ARMS},
        "runs": all_runs,
    }


def cell(summary: dict, digits: int = 3) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{summary['min']:.2f}, {summary['max']:.2f}]"


def describe_setting(result: dict) -> str:
    setting = result.get("setting")
    if setting is None:
        return "-"
    text = setting_label(setting).replace("learning_rate ", "lr ").replace("decay_steps ", "decay ")
    if "sft_phase" in result:
        steps = "/".join(map(str, result["sft_phase"]["steps"]))
        text = f"SFT lr {result['sft_phase']['learning_rate']:g} ({steps} steps), GRPO {text}"
    if "checkpoint_steps" in result:
        text += f", steps {'/'.join(map(str, result['checkpoint_steps']))}"
    return text


def results_table(report: dict) -> str:
    """Each arm's final scores over the reported seeds at its chosen setting."""
    lines = [
        "| method | chosen on validation | "
        + " | ".join(COLUMN_NAMES[split] for split in COLUMNS)
        + " | lowest point of the mean T in-dist curve | worked style (T in-dist) | training s per run |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- | --- | --- |",
    ]
    for name, result in report["methods"].items():
        final = result["final"]
        dip = f"{result['dip']:.3f}" if "dip" in result else "-"
        seconds = f"{result['training_seconds']['mean']:.0f}" if "training_seconds" in result else "-"
        if "training_seconds" in result.get("sft_phase", {}):
            sft, rl = result["sft_phase"]["training_seconds"]["mean"], result["training_seconds"]["mean"]
            seconds = f"{sft + rl:.0f} (SFT {sft:.0f} + GRPO {rl:.0f})"
        lines.append(
            f"| {name}: {result['description']} | {describe_setting(result)} | "
            + " | ".join(cell(final[split]["accuracy"]) for split in COLUMNS)
            + f" | {dip} | {final['test']['worked_style']['mean']:.2f} | {seconds} |"
        )
    return "\n".join(lines)


def differences_table(report: dict, reference: str) -> str:
    lines = [
        f"| method - {reference} | " + " | ".join(COLUMN_NAMES[split] for split in COLUMNS) + " |",
        "| --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for name, columns in report["paired_differences"][reference].items():
        cells = [
            f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] ({c['seeds_ahead']}/{len(c['values'])} ahead)"
            for c in (columns[split] for split in COLUMNS)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    """Every setting of every arm on the selection seed; the chosen one in bold."""
    lines = [
        "| method | setting | selection score (mean of both validation splits) | "
        + " | ".join(COLUMN_NAMES[split] for split in COLUMNS)
        + " | note |",
        "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    for name, rows in report["sweep"]["rows"].items():
        for row in rows:
            mark = "**" if row["setting"] == report["chosen_settings"][name] else ""
            note = ""
            if "best_checkpoint_paper" in row:
                paper, equal = row["best_checkpoint_paper"], row["best_checkpoint_equal"]
                note = (
                    f"best checkpoint: step {paper['step']} ({paper['selection_score']:.3f}); in the first half: step "
                    f"{equal['step']} ({equal['selection_score']:.3f})"
                )
            if "sft_phase" in row:
                note = f"from SFT at {row['sft_phase']['learning_rate']:g}, step {row['sft_phase']['steps']}"
            label = setting_label(row["setting"]).replace("learning_rate ", "lr ").replace("decay_steps ", "decay ")
            lines.append(
                f"| {name} | {mark}{label}{mark} | {mark}{row['selection_score']:.3f}{mark} | "
                + " | ".join(f"{row[split]:.3f}" for split in COLUMNS)
                + f" | {note} |"
            )
    return "\n".join(lines)


def diagnostics_table(report: dict) -> str:
    """The expert term's diagnostics, mean over the reported seeds: first and last logging period."""
    keys = ("chord/mu", "chord/effective_mu", "chord/token_weight_mean", "chord/expert_token_prob", "chord/expert_nll")
    lines = [
        "| method | " + " | ".join(f"{key.removeprefix('chord/')} (first -> last)" for key in keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for name, result in report["methods"].items():
        diagnostics = result.get("diagnostics")
        if not diagnostics or "chord/effective_mu" not in diagnostics:
            continue
        cells = [
            f"{diagnostics[key]['first']:.3g} -> {diagnostics[key]['last']:.3g}" if key in diagnostics else "-"
            for key in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preconditions_table(report: dict) -> str:
    lines = [
        "| seed | pre-training steps | P1 G | P2 pass@1 / pass@8 (carry) | P3 expert / own NLL, experts right, own "
        "worked | P4 T test / OOD | P5 hard pass@8 (pass@1), experts right | all hold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, start in report["starts"].items():
        p = start["preconditions"]
        lines.append(
            f"| {seed} | {start['pretraining']['steps']} | {p['P1']['general_accuracy']:.3f} | "
            f"{p['P2']['pass_at_1']:.3f} / {p['P2']['pass_at_k']:.3f} ({p['P2']['carry_pass_at_1']:.3f} / "
            f"{p['P2']['carry_pass_at_k']:.3f}) | {p['P3']['expert_nll']:.2f} / {p['P3']['own_style_nll']:.2f}, "
            f"{p['P3']['expert_correct']:.2f}, {p['P3']['samples_in_worked_style']:.3f} | "
            f"{p['P4']['test_accuracy']:.3f} / {p['P4']['ood_test_accuracy']:.3f} | {p['P5']['pass_at_k']:.3f} "
            f"({p['P5']['pass_at_1']:.4f}), {p['P5']['expert_correct']:.2f} | "
            f"{'yes' if all(result['holds'] for result in p.values()) else 'NO'} |"
        )
    return "\n".join(lines)


MAIN_ARMS = ("sft", "grpo", "sft_best_grpo", "sft_best_grpo_equal", "chord_mu", "chord_phi", "chord_phi_mean")


def plot_curves(report: dict, path: str) -> None:
    """Mean accuracy over the reported seeds against the optimizer step, one panel per column; the start dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(COLUMNS), figsize=(20, 5), sharex=True)
    for axis, split in zip(axes, COLUMNS):
        axis.axhline(report["methods"]["start"]["final"][split]["accuracy"]["mean"], color="gray", linestyle=":")
        for name, result in report["methods"].items():
            if "curve" not in result:
                continue
            main = name in MAIN_ARMS
            axis.plot(
                result["curve"]["steps"],
                result["curve"][split],
                "-" if main else "--",
                label=name,
                linewidth=2 if main else 1,
            )
        axis.set_title(COLUMN_TITLES[split], fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"greedy accuracy, mean over seeds {report['methods']['start']['seeds']} (dotted: start)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_tradeoff(report: dict, path: str) -> None:
    """Every model each arm's sweep reached (selection seed), a target column against a retention column, with the
    arm's frontier; the starting model as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 11))
    colors = plt.get_cmap("tab10")
    start = report["starts"][report["sweep"]["seed"]]["evaluations"]
    for axis, (x, y) in zip(axes.flat, TRADEOFF_PANELS):
        for index, (name, result) in enumerate(report["tradeoff"].items()):
            points = result["points"]
            axis.scatter([p[x] for p in points], [p[y] for p in points], s=8, alpha=0.35, color=colors(index))
            frontier = result["frontiers"][f"{x} vs {y}"]
            axis.plot(
                [p[x] for p in frontier], [p[y] for p in frontier], "-o", markersize=3, color=colors(index), label=name
            )
        axis.scatter([start[x]["accuracy"]], [start[y]["accuracy"]], marker="*", s=200, color="black", zorder=5)
        axis.set_xlabel(COLUMN_TITLES[x])
        axis.set_ylabel(COLUMN_TITLES[y])
        axis.set_xlim(-0.02, 1.02)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Every evaluated model of every sweep run (seed {report['sweep']['seed']}), each arm's frontier")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def provenance() -> dict:
    """The commit the run started from, whether the tree had changes, the machine."""

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


def resource_seconds() -> float:
    """CPU seconds used by this process and its finished children (the workers, once the pool has closed)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def print_tables(report: dict) -> None:
    scale = report["scale"]
    print("\nPreconditions (starting models):\n" + preconditions_table(report))
    print(f"\nSettings (selection seed {scale['selection_seed']}, not reported):\n" + sweep_table(report))
    print(f"\nResults (final step, chosen settings, seeds {scale['seeds']}):\n" + results_table(report))
    for reference in REFERENCES:
        print(
            f"\nPaired differences against {reference} (95% bootstrap intervals over seeds):\n"
            + differences_table(report, reference)
        )
    print("\nThe expert term's diagnostics (chosen settings, mean over seeds):\n" + diagnostics_table(report))


def report_only(path: str, output_dir: str) -> None:
    """
    Rebuilds from a written report's `runs`, without training, what is derived from them in this script's present
    code (the settings table's rows and the two-phase arms' SFT-phase seconds), writes the report to `output_dir` and
    prints its tables. Reports written before the SFT runs kept their selection history have the same score in their
    curves: the mean accuracy of both validation splits at each evaluation (the smoke test checks that they agree).
    """
    with open(path) as file:
        report = json.load(file)
    scale = Scale(**report["scale"])
    experiment = Experiment(scale, work_dir="", workers=0)
    experiment.rates = {name: grid["rates"] for name, grid in report["learning_rate_grids"].items()}
    for run in report["runs"]:
        if run["arm"] == "sft" and "selection" not in run:
            curves = run["curves"]
            scores = [validation_score(curves, index) for index in range(len(curves["validation"]))]
            steps = [point["step"] for point in curves["validation"]]
            run = {**run, "selection": [{"step": s, "eval_reward": v} for s, v in zip(steps, scores, strict=True)]}
        experiment.runs[job(run["arm"], run["seed"], run["setting"])] = run
    for arm in ARMS:  # the bold rows and the reported runs must still be what this code chooses
        if (chosen := experiment.chosen(arm)) != report["chosen_settings"][arm.name]:
            sys.exit(
                f"{arm.name}: this code chooses {chosen}, the report {report['chosen_settings'][arm.name]}: rerun the "
                "experiment"
            )
    report["sweep"] = sweep_rows(experiment)
    add_sft_phase_seconds(report["methods"], experiment)
    name = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(output_dir, f"{name}.json"), "w") as file:
        json.dump(report, file, indent=1)
    print_tables(report)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a much smaller smoke version (about a minute)")
    parser.add_argument("--output_dir", default="docs/results", help="where the JSON and the PNGs go")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one CPU thread each")
    parser.add_argument(
        "--preconditions_only",
        action="store_true",
        help="pre-train the starting models, measure P1-P5 and stop (writes paper_table_preconditions.json)",
    )
    parser.add_argument(
        "--report_only",
        metavar="JSON",
        help="train nothing: rebuild the settings table's rows and the two-phase arms' SFT-phase seconds from this "
        "report's runs, write it to --output_dir under its own name and print its tables",
    )
    options = parser.parse_args()
    if options.report_only:
        os.makedirs(options.output_dir, exist_ok=True)
        report_only(options.report_only, options.output_dir)
        return
    scale = QUICK if options.quick else FULL
    started, load_before = time.time(), machine_load()
    own_cpu_before = resource_seconds()
    info = provenance()
    os.makedirs(options.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chord-paper-") as work_dir:
        experiment = Experiment(scale, work_dir, options.workers)
        try:
            experiment.prepare_only() if options.preconditions_only else experiment.run()
        except PreconditionFailed as error:
            sys.exit(f"Precondition failed: {error}")
        report = {"starts": experiment.starts} if options.preconditions_only else results(experiment)
    if options.preconditions_only:
        report = {
            "scale": asdict(scale),
            "wall_seconds": time.time() - started,
            "provenance": info,
            "starts": {
                seed: {k: v for k, v in start.items() if k != "path"} for seed, start in report["starts"].items()
            },
        }
        with open(os.path.join(options.output_dir, "paper_table_preconditions.json"), "w") as file:
            json.dump(report, file, indent=1)
        print("\nPreconditions (starting models):\n" + preconditions_table(report))
        return
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
    report = {
        "scale": asdict(scale),
        "arms": {arm.name: asdict(arm) for arm in ARMS},
        "wall_seconds": wall_seconds,
        "provenance": info,
        **report,
    }
    name = "paper_table_quick" if options.quick else "paper_table"
    plot_curves(report, os.path.join(options.output_dir, f"{name}.png"))
    plot_tradeoff(report, os.path.join(options.output_dir, f"{name}_tradeoff.png"))
    with open(os.path.join(options.output_dir, f"{name}.json"), "w") as file:
        json.dump(report, file, indent=1)
    print_tables(report)
    print(
        f"\nWall time {wall_seconds / 60:.1f} min; CPU share used by other processes "
        f"{info['load']['share_of_cpu_used_by_others']:.0%}; commit {info['commit']}; "
        f"results in {options.output_dir}/{name}.*"
    )


if __name__ == "__main__":
    main()
