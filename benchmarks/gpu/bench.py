"""
What CHORD's expert term costs on a GPU, measured side by side in one process.

    python benchmarks/gpu/bench.py [--tiny] [--output-dir DIR] [--time-limit SECONDS]

For each model shape (Qwen2.5-0.5B and 1.5B: their configs with random weights, in bf16) and each expert sequence
length (1k and 4k tokens), five steps run one after another in every round, in balanced orders, on one fixed GRPO
micro-batch (8 completions of 256 tokens, generated once: generation is outside every measurement) and one fixed
expert micro-batch (one example of that length):

- grpo:        TRL's `GRPOTrainer.training_step`, through TRL's fused LM head;
- chord:       `ChordTrainer.training_step` with the defaults (mu = 0.1, phi weights): the GRPO step plus the expert
               term through trl_chord's head, its backward first;
- chord_naive: the same with the expert term computed from the model's full logits (an fp32 `log_softmax` of the
               `(tokens, vocab)` logits, as ms-swift computes it);
- sft:         the plain SFT step: the expert micro-batch through the model's own forward and loss (full logits, fp32
               cross entropy), forward and backward, on a separate copy of the model;
- sft_head:    the expert term alone through trl_chord's head, forward and backward.

Each step is timed with CUDA events after warm-up rounds, for as many rounds as the time limit leaves (at least 5):
the overhead efficiency `E = (T_chord - T_grpo) / T_sft` and `E_naive` (the same with chord_naive) per round, with
medians and quartiles; and each step's peak memory above what was allocated before it
(`torch.cuda.max_memory_allocated`, its peak reset before each step). No optimizer step runs: every step sees the same
weights. `gpu_bench.json` and `gpu_bench.md` are written after every case, so that a run cut short keeps what it
measured, and cases the time limit leaves out are listed as skipped.

Without CUDA, or with `--tiny`, it runs a tiny model on the CPU (wall-clock time, the profiler's memory count): a
check that the benchmark runs end to end, not a measurement.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the CPU benchmark's helpers
from chord_overhead import (  # noqa: E402
    balanced_orders,
    collated_expert_batch,
    expert_dataset,
    generate_grpo_batch,
    machine_description,
    ready,
    seeded_random_reward,
    sft_step,
    skip_generation,
    summary,
    trainer_options,
)
from gpu_setup import (  # noqa: E402
    QWEN2_5_0_5B,
    QWEN2_5_1_5B,
    TINY,
    ModelShape,
    expert_head_path,
    expert_term_backward,
    full_vocabulary_tokenizer,
    random_model,
    use_full_logits_expert_head,
)

from trl_chord import ChordConfig, ChordTrainer  # noqa: E402
from trl_chord.demo.memory import PeakMemory, Variant, prepare  # noqa: E402


MIB = 2**20
VARIANTS = ("grpo", "chord", "chord_naive", "sft", "sft_head")


@dataclass(frozen=True)
class Settings:
    """The cases and repetitions of one run."""

    shapes: tuple[ModelShape, ...]
    expert_lengths: tuple[int, ...]  # tokens of the expert example, prompt and completion
    num_generations: int  # the GRPO micro-batch: one prompt's completions
    completion_length: int
    warmup_rounds: int
    min_rounds: int
    max_rounds: int
    memory_rounds: int


GPU = Settings(
    shapes=(QWEN2_5_0_5B, QWEN2_5_1_5B),
    expert_lengths=(1024, 4096),
    num_generations=8,
    completion_length=256,
    warmup_rounds=2,
    min_rounds=5,
    max_rounds=30,
    memory_rounds=2,
)
TINY_RUN = Settings(
    shapes=(TINY,),
    expert_lengths=(32, 64),
    num_generations=2,
    completion_length=8,
    warmup_rounds=1,
    min_rounds=3,
    max_rounds=3,
    memory_rounds=1,
)


class StepClock:
    """The time of one step: CUDA events recorded before it and after it returns (its host work included), or the
    wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_events" if device.type == "cuda" else "wall"

    def measure(self, variant: Variant) -> float:
        prepare(variant)
        if self.device.type != "cuda":
            started = time.perf_counter()
            variant.step()
            return time.perf_counter() - started
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        variant.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def run_rounds(
    variants: list[Variant], measure, rounds: int, deadline: Deadline | None = None, min_rounds: int = 0
) -> dict:
    """Up to `rounds` rounds of one step of each variant, in balanced orders (each variant in each position and
    after each other one equally often); past `deadline`, no round after the first `min_rounds` starts."""
    results = {variant.name: [] for variant in variants}
    orders = balanced_orders(len(variants))
    for round_index in range(rounds):
        if round_index >= min_rounds and deadline is not None and deadline.left() <= 0:
            break
        for index in orders[round_index % len(orders)]:
            results[variants[index].name].append(measure(variants[index]))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The trainers and steps of one model shape


class ShapeBench:
    """The four models of one shape (same weights), their trainers, the fixed GRPO micro-batch, and the steps."""

    def __init__(self, shape: ModelShape, settings: Settings, device: torch.device, scratch_dir: str):
        self.shape, self.settings, self.device = shape, settings, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer = full_vocabulary_tokenizer(shape)
        self.prompts = Dataset.from_dict({"prompt": [f"Task {index}: " for index in range(16)]})
        max_length = max(settings.expert_lengths)
        options = dict(bf16=device.type == "cuda", use_cpu=device.type != "cuda")
        self.config_kwargs = trainer_options(
            scratch_dir, settings.num_generations, settings.completion_length, **options
        )
        self.grpo = self._ready(
            GRPOTrainer(
                model=self._model(),
                reward_funcs=seeded_random_reward,
                args=GRPOConfig(**self.config_kwargs),
                train_dataset=self.prompts,
                processing_class=self.tokenizer,
            )
        )
        self.grpo_batch = generate_grpo_batch(self.grpo)
        self.chord = self._chord_trainer(max_length)
        self.chord_naive = self._chord_trainer(max_length)
        use_full_logits_expert_head(self.chord_naive.model)
        self.sft_model = self._model().train()
        for trainer in (self.grpo, self.chord, self.chord_naive):
            skip_generation(trainer)
        self.expert_batch = None

    def _model(self):
        return random_model(self.shape, self.tokenizer, self.device, self.dtype)

    def _ready(self, trainer: GRPOTrainer) -> GRPOTrainer:
        ready(trainer).model.train()
        return trainer

    def _chord_trainer(self, max_length: int) -> ChordTrainer:
        trainer = ChordTrainer(
            model=self._model(),
            reward_funcs=seeded_random_reward,
            args=ChordConfig(**self.config_kwargs, chord_sft_max_length=max_length),
            train_dataset=self.prompts,
            processing_class=self.tokenizer,
            expert_dataset=expert_dataset(self.tokenizer, [max_length], seed=0),
        )
        # Every step draws the benchmark's expert micro-batch, so that chord, chord_naive and sft see the same one
        trainer._next_expert_batch = lambda: self.expert_batch
        return self._ready(trainer)

    def use_expert_length(self, length: int) -> None:
        """One expert example of `length` tokens, tokenized and collated as ChordTrainer does."""
        self.expert_batch = collated_expert_batch(self.tokenizer, 1, length, self.device)

    def variants(self) -> list[Variant]:
        def training_step(trainer):
            return lambda: trainer.training_step(trainer.model, self.grpo_batch, None)

        return [
            Variant("grpo", self.grpo.model, training_step(self.grpo)),
            Variant("chord", self.chord.model, training_step(self.chord)),
            Variant("chord_naive", self.chord_naive.model, training_step(self.chord_naive)),
            Variant("sft", self.sft_model, lambda: sft_step(self.sft_model, self.expert_batch)),
            Variant("sft_head", self.chord.model, lambda: expert_term_backward(self.chord.model, self.expert_batch)),
        ]

    def grpo_tokens(self) -> int:
        return self.grpo_batch["prompt_ids"].numel() + self.grpo_batch["completion_ids"].numel()


def measure_case(bench: ShapeBench, length: int, clock: StepClock, budget_s: float, settings: Settings) -> dict:
    """Warm-up rounds, then as many timed rounds as `budget_s` leaves (within the settings' bounds), then memory."""
    deadline = Deadline(budget_s)
    bench.use_expert_length(length)
    variants = bench.variants()
    for _ in range(settings.warmup_rounds):  # the last one's time sizes the rest (the first compiles kernels)
        started = time.perf_counter()
        run_rounds(variants, clock.measure, 1)
        round_s = time.perf_counter() - started
    memory_s = settings.memory_rounds * round_s
    affordable = int((deadline.left() - memory_s) / round_s)
    rounds = min(max(affordable, settings.min_rounds), settings.max_rounds)
    times = run_rounds(variants, clock.measure, rounds, Deadline(deadline.left() - memory_s), settings.min_rounds)
    memory = run_rounds(variants, PeakMemory(bench.device).measure, settings.memory_rounds)
    num_rounds = len(times["grpo"])
    efficiency = [(times["chord"][r] - times["grpo"][r]) / times["sft"][r] for r in range(num_rounds)]
    efficiency_naive = [(times["chord_naive"][r] - times["grpo"][r]) / times["sft"][r] for r in range(num_rounds)]
    peaks = {name: statistics.median(samples) for name, samples in memory.items()}
    floor = max(peaks["grpo"], peaks["sft"])
    return {
        "model": bench.shape.name,
        "expert_tokens": length,
        "expert_completion_tokens": int(bench.expert_batch["completion_mask"][:, 1:].sum()),
        "grpo_tokens": bench.grpo_tokens(),
        "rounds": num_rounds,
        "warmup_rounds": settings.warmup_rounds,
        "expert_head_paths": {
            "chord": expert_head_path(bench.chord.model),
            "chord_naive": expert_head_path(bench.chord_naive.model),
        },
        "time_ms": {name: summary([sample * 1e3 for sample in samples]) for name, samples in times.items()},
        "time_samples_ms": {name: [sample * 1e3 for sample in samples] for name, samples in times.items()},
        "efficiency_E": summary(efficiency),
        "efficiency_E_naive": summary(efficiency_naive),
        "peak_memory_mib": {name: peak / MIB for name, peak in peaks.items()},
        "memory_ratios": {
            "chord_over_max_grpo_sft": peaks["chord"] / floor,
            "chord_naive_over_max_grpo_sft": peaks["chord_naive"] / floor,
            "chord_extra_over_sft": (peaks["chord"] - peaks["grpo"]) / peaks["sft"],
            "chord_naive_extra_over_sft": (peaks["chord_naive"] - peaks["grpo"]) / peaks["sft"],
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def machine(device: torch.device) -> dict:
    description = machine_description(device)
    description["datasets"] = datasets.__version__
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        description["cuda"] = torch.version.cuda
        try:
            import triton

            description["triton"] = triton.__version__
        except ImportError:
            description["triton"] = None
    return description


def spread(stats: dict, digits: int = 1) -> str:
    return f"{stats['median']:.{digits}f} [{stats['q1']:.{digits}f}, {stats['q3']:.{digits}f}]"


def markdown_report(result: dict) -> str:
    machine = result["machine"]
    device = f"{machine['gpu']} ({machine.get('gpu_memory_gib')} GiB)" if machine["gpu"] else "CPU"
    lines = [
        f"Machine: {device}, {machine['cpu_model']}, {machine['cpu_cores']} cores; Python {machine['python']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, trl {machine['trl']}, datasets "
        f"{machine['datasets']}. Timer: {result['timer']}. {result['mode']} run, {result['duration_s']:.0f} s "
        f"(limit {result['time_limit_s']:.0f} s).",
        "",
        f"GRPO micro-batch: {result['settings']['num_generations']} completions of "
        f"{result['settings']['completion_length']} tokens; one expert example per micro-step; mu = 0.1, phi weights. "
        "Step times in ms, median [q1, q3] over the rounds; E per round.",
        "",
        "| model | expert tokens | rounds | grpo | chord | chord_naive | sft | sft_head | E | E_naive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in result["cases"]:
        if "error" in case:
            lines.append(f"| {case['model']} | {case['expert_tokens']} | failed: {case['error']} |")
            continue
        times = " | ".join(spread(case["time_ms"][name]) for name in VARIANTS)
        lines.append(
            f"| {case['model']} | {case['expert_tokens']} | {case['rounds']} | {times} | "
            f"{spread(case['efficiency_E'], 3)} | {spread(case['efficiency_E_naive'], 3)} |"
        )
    lines += [
        "",
        "Peak memory of each step above what was allocated before it, MiB; M_floor = max(M_grpo, M_sft).",
        "",
        "| model | expert tokens | grpo | chord | chord_naive | sft | sft_head | M_chord / M_floor "
        "| M_naive / M_floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in result["cases"]:
        if "error" in case:
            continue
        peaks = " | ".join(f"{case['peak_memory_mib'][name]:.0f}" for name in VARIANTS)
        ratios = case["memory_ratios"]
        lines.append(
            f"| {case['model']} | {case['expert_tokens']} | {peaks} | {ratios['chord_over_max_grpo_sft']:.3f} | "
            f"{ratios['chord_naive_over_max_grpo_sft']:.3f} |"
        )
    for skipped in result["skipped"]:
        lines.append(
            f"\nNot measured: {skipped['model']} with {skipped['expert_tokens']} expert tokens ({skipped['reason']})."
        )
    return "\n".join(lines) + "\n"


def write(result: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "gpu_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (output_dir / "gpu_bench.md").write_text(markdown_report(result))


# ---------------------------------------------------------------------------------------------------------------------


def run(settings: Settings, device: torch.device, time_limit_s: float, output_dir: Path, log) -> dict:
    started = time.perf_counter()
    deadline = Deadline(time_limit_s)
    cases = [(shape, length) for shape in settings.shapes for length in settings.expert_lengths]
    result = {
        "mode": "gpu" if device.type == "cuda" else "tiny-cpu",
        "machine": machine(device),
        "settings": {**asdict(settings), "shapes": [asdict(shape) for shape in settings.shapes]},
        "timer": StepClock(device).kind,
        "time_limit_s": time_limit_s,
        "cases": [],
        "skipped": [],
        "complete": False,
        "duration_s": 0.0,
    }
    clock = StepClock(device)
    bench = None
    with tempfile.TemporaryDirectory() as scratch_dir:
        for index, (shape, length) in enumerate(cases):
            if deadline.left() < 10:  # nothing starts past the limit
                result["skipped"].append({"model": shape.name, "expert_tokens": length, "reason": "time limit"})
                continue
            try:
                if bench is None or bench.shape != shape:
                    bench = None
                    release_memory()
                    log(f"{shape.name}: building 4 models and 3 trainers, generating the GRPO micro-batch")
                    bench = ShapeBench(shape, settings, device, scratch_dir)
                # An equal share of what is left for this case and each one still to come
                budget = deadline.left() / (len(cases) - index)
                log(f"{shape.name}, {length} expert tokens: timing {', '.join(VARIANTS)} ({budget:.0f} s)")
                case = measure_case(bench, length, clock, max(budget - 5, 1), settings)
                log(
                    f"  E = {case['efficiency_E']['median']:.3f}, E_naive = {case['efficiency_E_naive']['median']:.3f}"
                )
            except torch.OutOfMemoryError as error:  # recorded, and the next case runs
                bench = None
                case = {"model": shape.name, "expert_tokens": length, "error": f"out of memory: {error}"[:300]}
            result["cases"].append(case)
            result["duration_s"] = time.perf_counter() - started
            write(result, output_dir)
    result["complete"] = not result["skipped"] and all("error" not in case for case in result["cases"])
    result["duration_s"] = time.perf_counter() - started
    write(result, output_dir)
    return result


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the default without CUDA)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where gpu_bench.json and gpu_bench.md land (default: results/ beside this script, results/tiny/ for a "
        "tiny run)",
    )
    parser.add_argument(
        "--time-limit", type=float, help="seconds for the whole run, setup included (default: 300 on a GPU, 120 tiny)"
    )
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    if tiny and not args.tiny:
        log("no CUDA device: running the tiny shape on the CPU (a check that the benchmark runs, not a measurement)")
    results_dir = Path(__file__).resolve().parent / "results"
    output_dir = args.output_dir or (results_dir / "tiny" if tiny else results_dir)
    time_limit = args.time_limit or (120.0 if tiny else 300.0)
    result = run(TINY_RUN if tiny else GPU, device, time_limit, output_dir, log)
    print(markdown_report(result))
    log(f"wrote {output_dir / 'gpu_bench.json'} and {output_dir / 'gpu_bench.md'}")


if __name__ == "__main__":
    main()
