"""
What the CHORD expert term costs on top of a GRPO micro-step, measured side by side.

    HF_HUB_OFFLINE=1 python benchmarks/chord_overhead.py [--quick] [--output-dir DIR] [--threads N]

A CHORD micro-step is one GRPO micro-step plus one expert SFT micro-batch, so its floor is the GRPO step plus a plain
SFT forward/backward on that expert micro-batch, in time and in memory. Five variants run in one process, one step of
each per round, in balanced orders, so that the drift of a shared machine hits them all alike:

- grpo:   TRL's `GRPOTrainer.training_step` on one fixed GRPO batch, generated once before any timing;
- chord:  `ChordTrainer.training_step` on that batch with mu > 0, on a logged step (`logging_steps=1`, as every
          shipped config logs): the GRPO loss plus one expert micro-batch, which the trainer draws itself at the start
          of the round (`chord_draw`, timed apart and added to chord's time);
- chord_grad_norms: the same trainer's step, on the same expert micro-batch, with `chord_log_term_grad_norms` on:
          each term's gradient norm measured (`chord/expert_grad_norm`, `chord/grpo_grad_norm`);
- chord0: `ChordTrainer` with mu = 0 and no expert dataset;
- sft:    a separate copy of the model, its plain forward (its own cross entropy) and backward on the expert
          micro-batch chord drew in the same round.

Only the steps are measured: gradients are zeroed in place and garbage is collected outside, and no optimizer step
runs, so every variant sees the same weights at every step. Peak memory is that of live tensors above what was
allocated before the step (the profiler's allocation events on CPU, `max_memory_allocated` on CUDA).

It reports medians, IQRs and confidence intervals, the overhead efficiency `E = (T_chord - T_grpo) / T_sft`
(bar: <= 1.05), the same E with the term gradient norms and what they add to it, `(T_chord_grad_norms - T_chord) /
T_sft` (no bar: they are off by default), and `T_chord0 / T_grpo` (bar: <= 1.01), how extra time and memory scale
with the expert micro-batch (batch size and length), and the expert term alone through trl_chord's LM head, TRL's
fused one and full logits.
It writes `chord_overhead.json` and `chord_overhead.md` to the output directory and prints the table.
"""

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.demo.memory import PeakMemory, Variant, prepare
from trl_chord.demo.tiny import build_tiny_model, build_tiny_tokenizer
from trl_chord.expert_data import collate_expert_batch, prepare_expert_dataset


E_BAR = 1.05
CHORD0_BAR = 1.01
STRETCH_MEMORY_MARGIN = 1.05
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Model, batches and repetitions of one run."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_generations: int  # the GRPO micro-batch is one prompt's group of completions
    completion_length: int
    expert_batch_size: int
    expert_lengths: tuple[int, int]  # shortest and longest expert example of the main comparison, in tokens
    num_expert_examples: int
    warmup_rounds: int
    timed_rounds: int
    memory_rounds: int
    scaling_batch_sizes: tuple[int, ...]  # swept at scaling_batch_length tokens
    scaling_batch_length: int
    scaling_lengths: tuple[int, ...]  # swept at batch size 1
    scaling_rounds: int
    head_batches: tuple[tuple[int, int], ...]  # (batch size, length) of the expert-head comparison
    head_rounds: int


FULL = Sizes(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    vocab_size=8192,
    num_generations=8,
    completion_length=64,
    expert_batch_size=2,
    expert_lengths=(128, 256),
    num_expert_examples=64,
    warmup_rounds=2,
    timed_rounds=80,
    memory_rounds=2,
    scaling_batch_sizes=(1, 2, 4, 8),
    scaling_batch_length=256,
    scaling_lengths=(64, 128, 256, 512, 1024),
    scaling_rounds=6,
    head_batches=((2, 256), (4, 512)),
    head_rounds=6,
)

QUICK = Sizes(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=512,
    num_generations=2,
    completion_length=8,
    expert_batch_size=1,
    expert_lengths=(16, 24),
    num_expert_examples=8,
    warmup_rounds=1,
    timed_rounds=3,
    memory_rounds=1,
    scaling_batch_sizes=(1, 2),
    scaling_batch_length=16,
    scaling_lengths=(16, 32),
    scaling_rounds=2,
    head_batches=((1, 32),),
    head_rounds=2,
)


# ---------------------------------------------------------------------------------------------------------------------
# Model, data and trainers, all built offline and seeded


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """
    trl_chord's char-level tokenizer, filled up to `vocab_size` with tokens `<f0>`, `<f1>`, ...

    With a token for every id, whatever the model generates decodes (GRPO's rewards see text), and expert completions
    drawn from the filler tokens are labels spread over the whole LM head, which is what makes the head cost real.
    """
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([f"<f{index}>" for index in range(vocab_size - len(tokenizer))])
    return tokenizer


def seeded_random_reward(completions: list[str], **kwargs) -> list[float]:
    """A reward in [0, 1) that differs between completions but is fixed for each, so advantages are non-zero."""
    return [random.Random(completion).random() for completion in completions]


def expert_dataset(tokenizer: PreTrainedTokenizerFast, lengths: list[int], seed: int) -> Dataset:
    """Plain-text expert examples of exactly `lengths` tokens each (prompt, completion of filler tokens, EOS)."""
    rng = random.Random(seed)
    fillers = [token for token in tokenizer.get_added_vocab() if token.startswith("<f")]
    prompts = [f"Task {index}: " for index in range(len(lengths))]
    completions = []
    for prompt, length in zip(prompts, lengths):
        # trl_chord appends EOS to a plain-text completion
        num_completion_tokens = length - len(tokenizer(prompt)["input_ids"]) - 1
        completions.append("".join(rng.choices(fillers, k=num_completion_tokens)))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def trainer_options(output_dir: str, num_generations: int, completion_length: int, **options) -> dict:
    """The options of every trainer the benchmarks build (here and in gpu/bench.py): a micro-batch of one prompt's
    `num_generations` completions, each exactly `completion_length` tokens long, so that its shape is fixed."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=num_generations,
        num_generations=num_generations,
        max_completion_length=completion_length,
        generation_kwargs={"min_new_tokens": completion_length},
        report_to="none",
        save_strategy="no",
        seed=0,
        **options,
    )


def ready(trainer: GRPOTrainer) -> GRPOTrainer:
    """A trainer whose `training_step` can be called directly (it normally runs inside `train()`, which sets this)."""
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer


def collated_expert_batch(tokenizer, batch_size: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One expert micro-batch of `batch_size` examples of `length` tokens, tokenized and collated as trl_chord does."""
    examples = prepare_expert_dataset(expert_dataset(tokenizer, [length] * batch_size, seed=1), tokenizer, length)
    batch = collate_expert_batch(list(examples), pad_token_id=tokenizer.pad_token_id)
    return {name: tensor.to(device) for name, tensor in batch.items()}


class Workbench:
    """Builds identical models and the trainers of every variant, all on one tokenizer, prompt set and seed."""

    def __init__(self, sizes: Sizes, output_dir: str):
        self.sizes = sizes
        self.output_dir = output_dir
        self.tokenizer = build_tokenizer(sizes.vocab_size)
        self.prompts = Dataset.from_dict({"prompt": [f"Task {index}: " for index in range(16)]})

    def model(self) -> transformers.PreTrainedModel:
        sizes = self.sizes
        return build_tiny_model(
            self.tokenizer,
            hidden_size=sizes.hidden_size,
            num_hidden_layers=sizes.num_hidden_layers,
            num_attention_heads=sizes.num_attention_heads,
            intermediate_size=sizes.intermediate_size,
        )

    def _config_kwargs(self) -> dict:
        sizes = self.sizes
        return trainer_options(self.output_dir, sizes.num_generations, sizes.completion_length, bf16=False)

    def grpo_trainer(self) -> GRPOTrainer:
        args = GRPOConfig(**self._config_kwargs())
        return ready(
            GRPOTrainer(
                model=self.model(),
                reward_funcs=seeded_random_reward,
                args=args,
                train_dataset=self.prompts,
                processing_class=self.tokenizer,
            )
        )

    def chord_trainer(self, expert_batch_size: int = 1, expert_lengths: list[int] | None = None) -> ChordTrainer:
        """A CHORD trainer with the default constant mu = 0.1 and phi on; mu = 0 and no experts without lengths."""
        chord_options = {"chord_sft_per_device_train_batch_size": expert_batch_size}
        if expert_lengths is None:
            chord_options.update(chord_mu_peak=0.0, chord_mu_valley=0.0)
        args = ChordConfig(**self._config_kwargs(), **chord_options)
        experts = None if expert_lengths is None else expert_dataset(self.tokenizer, expert_lengths, seed=0)
        return ready(
            ChordTrainer(
                model=self.model(),
                reward_funcs=seeded_random_reward,
                args=args,
                train_dataset=self.prompts,
                processing_class=self.tokenizer,
                expert_dataset=experts,
            )
        )


def generate_grpo_batch(trainer: GRPOTrainer) -> dict:
    """Generate and score one GRPO micro-batch, the dict `_prepare_inputs` hands to `compute_loss`."""
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def skip_generation(trainer: GRPOTrainer) -> None:
    """Make `training_step` use the prepared batch it is given as is, instead of generating a new one."""
    trainer._prepare_inputs = lambda inputs: inputs


class ExpertDraw:
    """
    Draws a chord trainer's next expert micro-batch with its own `_next_expert_batch`, ahead of the steps that use it.

    The trainer's step then takes that micro-batch, so the sft step can run on the very same one in any order. Called
    first in each round and timed on its own, the draw's time is added to the chord step's.
    """

    def __init__(self, trainer: ChordTrainer):
        self._draw = trainer._next_expert_batch
        trainer._next_expert_batch = lambda: self.batch
        self.batch = None
        self.tokens = []  # padded tokens of each micro-batch drawn

    def __call__(self) -> None:
        self.batch = self._draw()
        self.tokens.append(self.batch["input_ids"].numel())


def expert_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT labels of an expert micro-batch: its completion tokens, -100 elsewhere (as ChordTrainer builds them)."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """A plain SFT forward and backward: the model's own cross entropy over the expert completion tokens."""
    model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=expert_labels(batch)
    ).loss.backward()


def head_flag_step(model, batch, **head_flag) -> None:
    """
    The expert term through a head the model's forward switches to with a flag, forward and backward:
    `chord_expert_loss=True` is trl_chord's head as `ChordTrainer` runs it (its token weighting included),
    `fused_lm_head=True` TRL's fused LM head (`add_fused_lm_head`), the head trl_chord used before its own.
    """
    model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=expert_labels(batch),
        **head_flag,
    ).loss.backward()


def unfused_head_step(model, batch) -> None:
    """The expert NLL from the full `(batch, length, vocab)` logits: fp32 `log_softmax`, then `gather`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = expert_labels(batch)[:, 1:]
    log_probs = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels != -100
    (-(log_probs * mask).sum() / mask.sum()).backward()


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


class StepClock:
    """
    Times one step of a variant.

    On a single CPU thread the step's process CPU time is used: on an idle machine it equals the wall time, and on a
    shared one it leaves out the time the step spent descheduled by other processes (not their effect on the caches
    and cores it shares with them). Otherwise, wall time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, variant: Variant) -> float:
        prepare(variant)
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        variant.step()
        self._sync()
        return time.perf_counter() - wall if self.kind == "wall" else time.process_time() - cpu


def balanced_orders(num_variants: int) -> list[list[int]]:
    """
    A Williams design: over these orders each variant runs in each position, and right after each other variant,
    equally often. A step's cost depends on what ran just before it (its page faults depend on what the previous
    step freed), so a fixed order A B C D would bias each variant the same way every round.
    """
    first, low, high = [0], 1, num_variants - 1
    for position in range(1, num_variants):
        if position % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    orders = [[(index + shift) % num_variants for index in first] for shift in range(num_variants)]
    return orders + [order[::-1] for order in orders] if num_variants % 2 else orders


def run_rounds(
    variants: list[Variant], rounds: int, measure: Callable[[Variant], float], draw: Variant | None = None
) -> dict:
    """
    `rounds` rounds of one step of each variant, in balanced orders; each variant's measurements in round order.
    `draw`, a variant too, runs first in every round: it fetches the expert micro-batch the round's steps share.
    """
    results = {variant.name: [] for variant in ([draw] if draw else []) + variants}
    orders = balanced_orders(len(variants))
    for round_index in range(rounds):
        if draw:
            results[draw.name].append(measure(draw))
        for index in orders[round_index % len(orders)]:
            results[variants[index].name].append(measure(variants[index]))
    return results


def summary(samples: list[float]) -> dict:
    """Median, quartiles and a distribution-free 95% confidence interval of the median (order statistics)."""
    ordered = sorted(samples)
    count = len(ordered)
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if count > 1 else ordered * 3
    rank = max(int((count - 1.96 * math.sqrt(count)) / 2), 0)
    return {
        "median": median,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "ci95": [ordered[rank], ordered[count - 1 - rank]],
        "n": count,
    }


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares line through (x, y), its R^2, and the largest distance of a point from it, relative to max |y|."""
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)
    intercept = mean_y - slope * mean_x
    predicted = [intercept + slope * a for a in x]
    residual = sum((b - p) ** 2 for b, p in zip(y, predicted))
    total = sum((b - mean_y) ** 2 for b in y)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1.0 - residual / total if total > 0 else 1.0,
        "max_relative_deviation": max(abs(b - p) for b, p in zip(y, predicted)) / max(max(map(abs, y)), 1e-30),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The three experiments: side by side, scaling, the expert term's LM heads


@dataclass
class Experiment:
    """Variants measured side by side, and the expert draw that runs first in each round when chord is one of them."""

    variants: list[Variant]
    expert_draw: ExpertDraw | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, list[int]] = field(default_factory=dict)

    def _run(self, rounds: int, measure: Callable[[Variant], float]) -> dict:
        draw = Variant("chord_draw", None, self.expert_draw) if self.expert_draw else None
        return run_rounds(self.variants, rounds, measure, draw)

    def time(self, clock: StepClock, rounds: int, warmup_rounds: int) -> None:
        self._run(warmup_rounds, clock.measure)
        self.times = self._run(rounds, clock.measure)
        if self.expert_draw:
            # Drawing the expert micro-batch is part of a CHORD step; chord_draw stays on its own for the report
            for name in ("chord", "chord_grad_norms"):
                if name in self.times:
                    self.times[name] = [step + draw for step, draw in zip(self.times[name], self.times["chord_draw"])]

    def measure_memory(self, peak_memory: PeakMemory, rounds: int) -> None:
        self.memory = self._run(rounds, peak_memory.measure)

    def peaks(self) -> dict[str, float]:
        return {name: statistics.median(samples) for name, samples in self.memory.items()}


def trainer_variant(name: str, trainer: GRPOTrainer, grpo_batch: dict, term_grad_norms: bool | None = None) -> Variant:
    """`trainer.training_step` on `grpo_batch`, the first optimizer step of a run with `logging_steps=1` (what
    `train()` sets in the trainer's state); a CHORD trainer's `chord_log_term_grad_norms` set to `term_grad_norms`."""

    def step():
        trainer.state.logging_steps = 1
        if term_grad_norms is not None:
            trainer.args.chord_log_term_grad_norms = term_grad_norms
        trainer.training_step(trainer.model, grpo_batch, None)

    return Variant(name, trainer.model, step)


def chord_experiment(grpo, chord, grpo_batch, sft_model, chord0=None) -> Experiment:
    """grpo, chord (with chord0: chord_grad_norms and chord0 too), and sft on the expert micro-batch chord draws in the
    same round."""
    expert_draw = ExpertDraw(chord)
    variants = [trainer_variant("grpo", grpo, grpo_batch), trainer_variant("chord", chord, grpo_batch, False)]
    if chord0 is not None:
        variants.append(trainer_variant("chord_grad_norms", chord, grpo_batch, True))
        variants.append(trainer_variant("chord0", chord0, grpo_batch))
    variants.append(Variant("sft", sft_model, lambda: sft_step(sft_model, expert_draw.batch)))
    return Experiment(variants, expert_draw)


HEADS = ("chord_head", "trl_fused", "unfused")


def head_experiment(chord_model, trl_fused_model, batch) -> Experiment:
    """The expert term alone through each head; `trl_fused_model` is a copy of the model with TRL's fused head."""
    return Experiment(
        [
            Variant("chord_head", chord_model, lambda: head_flag_step(chord_model, batch, chord_expert_loss=True)),
            Variant("trl_fused", trl_fused_model, lambda: head_flag_step(trl_fused_model, batch, fused_lm_head=True)),
            Variant("unfused", chord_model, lambda: unfused_head_step(chord_model, batch)),
        ]
    )


def scaling_cases(sizes: Sizes) -> dict[tuple[int, int], list[str]]:
    """(batch size, length) of every scaling point, and the sweeps it belongs to."""
    cases = {}
    for batch_size in sizes.scaling_batch_sizes:
        cases.setdefault((batch_size, sizes.scaling_batch_length), []).append("batch_size")
    for length in sizes.scaling_lengths:
        cases.setdefault((1, length), []).append("length")
    return cases


def side_by_side_summary(experiment: Experiment) -> dict:
    """Per-variant spreads and the per-round ratios, each round's variants having run back to back."""
    times, peaks = experiment.times, experiment.peaks()
    rounds = range(len(times["grpo"]))
    efficiency = [(times["chord"][r] - times["grpo"][r]) / times["sft"][r] for r in rounds]
    grad_norms_efficiency = [(times["chord_grad_norms"][r] - times["grpo"][r]) / times["sft"][r] for r in rounds]
    grad_norms_cost = [(times["chord_grad_norms"][r] - times["chord"][r]) / times["sft"][r] for r in rounds]
    chord0_ratio = [times["chord0"][r] / times["grpo"][r] for r in rounds]
    return {
        "time_s": {name: summary(samples) for name, samples in times.items()},
        "time_samples_s": times,
        "peak_memory_bytes": {name: summary(samples) for name, samples in experiment.memory.items()},
        "expert_tokens_per_step": summary(experiment.expert_draw.tokens),
        "efficiency_E": summary(efficiency),
        "efficiency_E_grad_norms": summary(grad_norms_efficiency),
        "grad_norms_cost_over_sft": summary(grad_norms_cost),
        "chord0_over_grpo": summary(chord0_ratio),
        "memory_overhead_over_sft": (peaks["chord"] - peaks["grpo"]) / peaks["sft"],
        "stretch_chord_memory_over_max_grpo_sft": peaks["chord"] / max(peaks["grpo"], peaks["sft"]),
    }


def scaling_point(case: tuple[int, int], sweeps: list[str], experiment: Experiment) -> dict:
    """Extra time (paired per round) and extra peak memory of chord over grpo at one expert micro-batch shape."""
    times, peaks = experiment.times, experiment.peaks()
    return {
        "batch_size": case[0],
        "length": case[1],
        "sweeps": sweeps,
        "expert_tokens": experiment.expert_draw.tokens[-1],
        "extra_time_s": statistics.median(chord - grpo for chord, grpo in zip(times["chord"], times["grpo"])),
        "sft_time_s": statistics.median(times["sft"]),
        "extra_memory_bytes": peaks["chord"] - peaks["grpo"],
        "sft_memory_bytes": peaks["sft"],
        "chord_memory_over_max_grpo_sft": peaks["chord"] / max(peaks["grpo"], peaks["sft"]),
    }


def scaling_summary(points: list[dict]) -> dict:
    """Linear fits of extra time and extra memory against expert tokens, over each sweep and over all points."""
    fits = {}
    for sweep in ("batch_size", "length", "all"):
        members = [point for point in points if sweep == "all" or sweep in point["sweeps"]]
        if len(members) < 2:
            continue
        tokens = [point["expert_tokens"] for point in members]
        fits[sweep] = {
            "extra_time": linear_fit(tokens, [point["extra_time_s"] for point in members]),
            "extra_memory": linear_fit(tokens, [point["extra_memory_bytes"] for point in members]),
        }
    return {"points": points, "fits": fits}


def head_summary(case: tuple[int, int], experiment: Experiment) -> dict:
    return {
        "batch_size": case[0],
        "length": case[1],
        "time_s": {name: summary(samples) for name, samples in experiment.times.items()},
        "peak_memory_bytes": experiment.peaks(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def busy_cpu_seconds() -> float:
    """CPU time every process of the machine has used since boot (and time the hypervisor stole from it)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ExternalLoad:
    """How many cores other processes kept busy, on average, from its creation to `cores()`: the run's conditions."""

    def __init__(self):
        self._start = (busy_cpu_seconds(), time.process_time(), time.perf_counter())

    def cores(self) -> float:
        busy, own, wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        return (busy - self._start[0] - (own - self._start[1])) / (wall - self._start[2])


def machine_description(device: torch.device) -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def mebibytes(size: float) -> str:
    return f"{size / MIB:.1f}"


def spread(stats: dict, fmt: Callable[[float], str]) -> str:
    return f"{fmt(stats['median'])} [{fmt(stats['q1'])}, {fmt(stats['q3'])}]"


def verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def markdown_report(result: dict) -> str:
    machine, main, passed = result["machine"], result["side_by_side"], result["bars"]
    ratio = "{:.3f}".format
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch thread(s), "
        f"device {machine['device']}{gpu}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"trl {machine['trl']}. Timer: {result['timer']} time. Other processes kept "
        f"{result['external_load_cores']:.2f} cores busy on average while timing. The run took "
        f"{result['duration_s']:.0f} s.",
        "",
        f"Side by side: {main['time_s']['grpo']['n']} rounds in balanced orders; median [q1, q3]. chord includes its "
        f"expert draw (chord_draw), {main['expert_tokens_per_step']['median']:.0f} expert tokens per step (median).",
        "",
        "| variant | step time (ms) | step peak memory (MiB) |",
        "| --- | --- | --- |",
    ]
    for name in ("grpo", "chord", "chord_grad_norms", "chord_draw", "chord0", "sft"):
        lines.append(
            f"| {name} | {spread(main['time_s'][name], milliseconds)} | "
            f"{spread(main['peak_memory_bytes'][name], mebibytes)} |"
        )
    efficiency, chord0 = main["efficiency_E"], main["chord0_over_grpo"]
    grad_norms_efficiency, grad_norms_cost = main["efficiency_E_grad_norms"], main["grad_norms_cost_over_sft"]
    lines += [
        "",
        "| measure | median [q1, q3] | 95% CI of the median | bar | verdict |",
        "| --- | --- | --- | --- | --- |",
        f"| E = (T_chord - T_grpo) / T_sft, per round | {spread(efficiency, ratio)} | "
        f"{ratio(efficiency['ci95'][0])} - {ratio(efficiency['ci95'][1])} | <= {E_BAR} | "
        f"{verdict(passed['efficiency_E'])} |",
        f"| E with chord_log_term_grad_norms, per round | {spread(grad_norms_efficiency, ratio)} | "
        f"{ratio(grad_norms_efficiency['ci95'][0])} - {ratio(grad_norms_efficiency['ci95'][1])} | | |",
        f"| their cost: (T_chord_grad_norms - T_chord) / T_sft, per round | {spread(grad_norms_cost, ratio)} | "
        f"{ratio(grad_norms_cost['ci95'][0])} - {ratio(grad_norms_cost['ci95'][1])} | (off by default) | |",
        f"| T_chord0 / T_grpo, per round | {spread(chord0, ratio)} | "
        f"{ratio(chord0['ci95'][0])} - {ratio(chord0['ci95'][1])} | <= {CHORD0_BAR} | "
        f"{verdict(passed['chord0_over_grpo'])} |",
        f"| (M_chord - M_grpo) / M_sft | {ratio(main['memory_overhead_over_sft'])} | | <= 1 | "
        f"{verdict(passed['memory_overhead'])} |",
        f"| stretch: M_chord / max(M_grpo, M_sft) | {ratio(main['stretch_chord_memory_over_max_grpo_sft'])} | | "
        f"<= {STRETCH_MEMORY_MARGIN} | {verdict(passed['stretch_memory'])} |",
        "",
        "Scaling with the expert micro-batch: extra = chord - grpo (time: median of per-round differences).",
        "",
        "| batch | length | expert tokens | extra time (ms) | sft time (ms) | extra / sft time | extra memory (MiB) "
        "| sft memory (MiB) | M_chord / max(M_grpo, M_sft) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in result["scaling"]["points"]:
        lines.append(
            f"| {point['batch_size']} | {point['length']} | {point['expert_tokens']} | "
            f"{milliseconds(point['extra_time_s'])} | {milliseconds(point['sft_time_s'])} | "
            f"{ratio(point['extra_time_s'] / point['sft_time_s'])} | {mebibytes(point['extra_memory_bytes'])} | "
            f"{mebibytes(point['sft_memory_bytes'])} | {ratio(point['chord_memory_over_max_grpo_sft'])} |"
        )
    lines += ["", "| line fitted against expert tokens | R^2 | max deviation / max value |", "| --- | --- | --- |"]
    for sweep, fits in result["scaling"]["fits"].items():
        for quantity, fit in fits.items():
            lines.append(f"| {quantity}, {sweep} sweep | {fit['r2']:.4f} | {fit['max_relative_deviation']:.3f} |")
    lines += [
        "",
        "The expert term alone (forward + backward): trl_chord's head (as ChordTrainer runs it, with its token "
        "weighting), TRL's fused LM head, and full logits with `log_softmax`.",
        "",
        "| batch | length | "
        + " | ".join(f"{head} time (ms)" for head in HEADS)
        + " | "
        + " | ".join(f"{head} peak (MiB)" for head in HEADS)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in range(2 * len(HEADS))) + " |",
    ]
    for case in result["expert_heads"]:
        times = [spread(case["time_s"][head], milliseconds) for head in HEADS]
        peaks = [mebibytes(case["peak_memory_bytes"][head]) for head in HEADS]
        lines.append(f"| {case['batch_size']} | {case['length']} | " + " | ".join(times + peaks) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def main_expert_lengths(sizes: Sizes) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(*sizes.expert_lengths) for _ in range(sizes.num_expert_examples)]


def bars(main: dict) -> dict[str, bool]:
    return {
        "efficiency_E": main["efficiency_E"]["median"] <= E_BAR,
        "chord0_over_grpo": main["chord0_over_grpo"]["median"] <= CHORD0_BAR,
        "memory_overhead": main["memory_overhead_over_sft"] <= 1.0,
        "stretch_memory": main["stretch_chord_memory_over_max_grpo_sft"] <= STRETCH_MEMORY_MARGIN,
    }


def run(sizes: Sizes, scratch_dir: str, log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    log("building the models and trainers, generating the GRPO batch")
    bench = Workbench(sizes, scratch_dir)
    grpo = bench.grpo_trainer()
    device = grpo.accelerator.device
    grpo_batch = generate_grpo_batch(grpo)
    sft_model = bench.model().to(device).train()
    chord = bench.chord_trainer(sizes.expert_batch_size, main_expert_lengths(sizes))
    chord0 = bench.chord_trainer()
    cases = scaling_cases(sizes)
    scaling_chords = [bench.chord_trainer(size, [length] * sizes.num_expert_examples) for size, length in cases]
    for trainer in [grpo, chord, chord0, *scaling_chords]:
        skip_generation(trainer)
    main = chord_experiment(grpo, chord, grpo_batch, sft_model, chord0)
    scaling = [chord_experiment(grpo, trainer, grpo_batch, sft_model) for trainer in scaling_chords]
    trl_fused_model = bench.model().to(device).train()
    add_fused_lm_head(trl_fused_model)
    heads = [
        head_experiment(chord.model, trl_fused_model, collated_expert_batch(bench.tokenizer, *case, device))
        for case in sizes.head_batches
    ]

    clock = StepClock(device)
    external_load = ExternalLoad()
    log(f"timing grpo, chord, chord_grad_norms, chord0, sft side by side: {sizes.timed_rounds} rounds")
    main.time(clock, sizes.timed_rounds, sizes.warmup_rounds)
    for case, experiment in zip(cases, scaling):
        log(f"timing the scaling point {case[0]} x {case[1]} expert tokens: {sizes.scaling_rounds} rounds")
        experiment.time(clock, sizes.scaling_rounds, warmup_rounds=1)
    for case, experiment in zip(sizes.head_batches, heads):
        log(f"timing the expert term's LM heads on {case[0]} x {case[1]} tokens: {sizes.head_rounds} rounds")
        experiment.time(clock, sizes.head_rounds, warmup_rounds=1)
    external_load_cores = external_load.cores()
    log("measuring peak memory")
    peak_memory = PeakMemory(device)
    for experiment in [main, *scaling, *heads]:
        experiment.measure_memory(peak_memory, sizes.memory_rounds)

    side_by_side = side_by_side_summary(main)
    # chord_grad_norms's steps, and only they, measured the term gradient norms (one of each per step)
    side_by_side["term_grad_norms_logged"] = len(chord._metrics["train"]["chord/expert_grad_norm"])
    points = [scaling_point(case, sweeps, experiment) for (case, sweeps), experiment in zip(cases.items(), scaling)]
    return {
        "machine": machine_description(device),
        "sizes": asdict(sizes),
        "timer": clock.kind,
        "external_load_cores": external_load_cores,
        "side_by_side": side_by_side,
        "bars": bars(side_by_side),
        "scaling": scaling_summary(points),
        "expert_heads": [head_summary(case, experiment) for case, experiment in zip(sizes.head_batches, heads)],
        "duration_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2-3 steps per variant: a smoke run")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where the JSON and markdown land (default: results/ beside this script, results/quick/ with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, a descheduled OpenMP thread stalls every step)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as scratch_dir:
        result = run(QUICK if args.quick else FULL, scratch_dir, log)
    report = markdown_report(result)
    results_dir = Path(__file__).resolve().parent / "results"
    output_dir = args.output_dir or (results_dir / "quick" if args.quick else results_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "chord_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "chord_overhead.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
