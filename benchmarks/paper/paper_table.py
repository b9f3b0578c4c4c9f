"""
The paper's experiment at small scale: CHORD against SFT, GRPO and SFT-then-GRPO, on a CPU, from random weights.

    HF_HUB_OFFLINE=1 python benchmarks/paper/paper_table.py [--quick] [--output_dir docs/results]

For each seed, a tiny random model is first pre-trained with plain SFT (TRL's SFTTrainer) on the EASY half of the task
(sums without a carry) in a SHORT answer style: that is the "instruct model". Every method then trains it for the
same number of optimizer steps, with the same expert data (every training sum in a LONGER worked style) and the same
RL prompts, through `ChordTrainer`, and is scored on held-out sums by greedy decoding. It writes `paper_table.json`
and `paper_table.png` (held-out accuracy over steps, mean over seeds) to the output directory and prints the table.
"""

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import datasets
import torch
import transformers
from datasets import Dataset
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.demo.addition import (
    MAX_COMPLETION_TOKENS,
    addition_reward,
    carry_split,
    completion_dataset,
    has_carry,
    operand_pairs,
    prompt_dataset,
    short_answer,
    worked_answer,
)
from trl_chord.demo.heldout import HeldOutEvaluationCallback, evaluate
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


def task_datasets(num_heldout: int = 100, seed: int = 0) -> dict[str, Dataset]:
    """
    The addition task with a two-digit `a`: `instruct` (no-carry sums in the short style, to pre-train the starting
    model), `expert` (every training sum in the worked style, so supervised learning on it is off-policy for the
    starting model), `rl` prompts and `heldout` prompts (half of them need a carry).
    """
    train, heldout = carry_split(operand_pairs(2), num_heldout, seed)
    return {
        "instruct": completion_dataset([pair for pair in train if not has_carry(*pair)], short_answer),
        "expert": completion_dataset(train, worked_answer),
        "rl": prompt_dataset(train),
        "heldout": prompt_dataset(heldout),
    }


@dataclass
class Scale:
    """How big the experiment is: the full run and `--quick` differ only here."""

    seeds: list[int]
    instruct_steps: int
    steps: int
    eval_every: int
    prompts_per_step: int
    num_generations: int
    expert_batch_size: int
    learning_rate: float


FULL = Scale(
    seeds=[0, 1, 2],
    instruct_steps=200,
    steps=360,
    eval_every=20,
    prompts_per_step=8,
    num_generations=8,
    expert_batch_size=32,
    learning_rate=5e-4,
)
QUICK = Scale(
    seeds=[0],
    instruct_steps=20,
    steps=2,
    eval_every=1,
    prompts_per_step=2,
    num_generations=4,
    expert_batch_size=4,
    learning_rate=5e-4,
)


@dataclass
class Method:
    """One row of the table: `chord` are the ChordConfig options; `then_grpo` splits the budget SFT -> GRPO."""

    name: str
    description: str
    chord: dict = field(default_factory=dict)
    then_grpo: bool = False
    trains: bool = True


def methods(steps: int) -> list[Method]:
    uniform = dict(chord_token_weighting="uniform")
    sft = dict(chord_mu_peak=1.0, chord_mu_valley=1.0, **uniform)
    fixed_mu = dict(chord_mu_peak=0.1, chord_mu_valley=0.1)
    return [
        Method("start", "the instruct model, no training", trains=False),
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


def pretrain_instruct_model(seed: int, scale: Scale, path: str) -> str:
    """The starting model: a random tiny model after plain SFT on the no-carry sums in the short style."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **MODEL_SHAPE)
    args = SFTConfig(
        output_dir=os.path.join(path, "sft-trainer"),
        seed=seed,
        max_steps=scale.instruct_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        logging_steps=scale.instruct_steps,
        **COMMON_ARGS,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=task_datasets()["instruct"], processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def chord_config(scale: Scale, seed: int, steps: int, output_dir: str, chord: dict) -> ChordConfig:
    return ChordConfig(
        output_dir=output_dir,
        seed=seed,
        max_steps=steps,
        learning_rate=scale.learning_rate,
        per_device_train_batch_size=scale.prompts_per_step * scale.num_generations,
        num_generations=scale.num_generations,
        max_completion_length=MAX_COMPLETION_TOKENS,
        temperature=1.0,
        beta=0.0,
        logging_steps=scale.eval_every,
        chord_sft_per_device_train_batch_size=scale.expert_batch_size,
        **COMMON_ARGS,
        **chord,
    )


def train_phase(model_path, scale, seed, steps, output_dir, chord, step_offset=0) -> tuple[ChordTrainer, list, list]:
    """One ChordTrainer run from `model_path`; returns the trainer, its held-out evaluations and its log."""
    data = task_datasets()
    args = chord_config(scale, seed, steps, output_dir, chord)
    uses_expert = args.chord_mu_schedule == "adaptive" or max(args.chord_mu_peak, args.chord_mu_valley) > 0
    trainer = ChordTrainer(
        model=model_path,
        reward_funcs=addition_reward,
        args=args,
        train_dataset=data["rl"],
        expert_dataset=data["expert"] if uses_expert else None,
    )
    callback = HeldOutEvaluationCallback(
        trainer, data["heldout"], scale.eval_every, MAX_COMPLETION_TOKENS, step_offset
    )
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    log = [
        {"step": step_offset + entry["step"], **{key: entry[key] for key in LOGGED_KEYS if key in entry}}
        for entry in trainer.state.log_history
    ]
    return trainer, callback.history, log


LOGGED_KEYS = ("reward", "chord/mu", "chord/expert_nll", "entropy", "completions/mean_length", "frac_reward_zero_std")


def quiet_worker() -> None:
    """One CPU thread per run (two runs share the two cores), and no per-step log lines or progress bars."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def run_method(method: Method, seed: int, scale: Scale, instruct_path: str, work_dir: str) -> dict:
    """Trains one method for one seed; returns its held-out evaluations over steps and its training log."""
    quiet_worker()
    started = time.time()
    output_dir = os.path.join(work_dir, f"{method.name}-seed{seed}")
    if not method.then_grpo:
        _, history, log = train_phase(instruct_path, scale, seed, scale.steps, output_dir, method.chord)
    else:
        sft_steps = scale.steps // 2
        trainer, history, log = train_phase(instruct_path, scale, seed, sft_steps, output_dir, method.chord)
        trainer.save_model(os.path.join(output_dir, "after-sft"))
        grpo = dict(chord_mu_peak=0.0, chord_mu_valley=0.0)
        _, more_history, more_log = train_phase(
            os.path.join(output_dir, "after-sft"), scale, seed, scale.steps - sft_steps, output_dir, grpo, sft_steps
        )
        history, log = history + more_history, log + more_log
    return {"method": method.name, "seed": seed, "history": history, "log": log, "seconds": time.time() - started}


def prepare_seed(seed: int, scale: Scale, work_dir: str) -> dict:
    """Pre-trains the seed's instruct model and evaluates it: step 0 of every curve, and the `start` row."""
    quiet_worker()
    started = time.time()
    path = pretrain_instruct_model(seed, scale, os.path.join(work_dir, f"instruct-seed{seed}"))
    tokenizer = build_tiny_tokenizer()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    evaluation = evaluate(model, tokenizer, task_datasets()["heldout"], MAX_COMPLETION_TOKENS)
    return {"seed": seed, "path": path, "evaluation": asdict(evaluation), "seconds": time.time() - started}


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


FINAL_METRICS = ("accuracy", "carry_accuracy", "worked_style", "mean_length", "mean_entropy")


def method_summary(method: Method, runs: list[dict]) -> dict:
    """Final-step statistics over seeds, the mean curve, and the lowest point of the mean curve (the dip)."""
    finals = [run["history"][-1] for run in runs]
    steps = [entry["step"] for entry in runs[0]["history"]]
    curve = [statistics.fmean(run["history"][index]["accuracy"] for run in runs) for index in range(len(steps))]
    return {
        "description": method.description,
        "final": {metric: summarize([final[metric] for final in finals]) for metric in FINAL_METRICS},
        "curve": {"steps": steps, "accuracy": curve},
        "dip": min(curve),
        "runs": runs,
    }


def run_all(scale: Scale, work_dir: str, workers: int) -> dict[str, dict]:
    """Every (method, seed) run, two at a time; prints one line per finished run with the elapsed time."""
    started = time.time()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        seeds = pool.starmap(prepare_seed, [(seed, scale, work_dir) for seed in scale.seeds])
        for prepared in seeds:
            print(
                f"[{time.time() - started:6.0f}s] instruct model seed {prepared['seed']}: {prepared['evaluation']}",
                flush=True,
            )
        starts = {prepared["seed"]: prepared["evaluation"] for prepared in seeds}
        paths = {prepared["seed"]: prepared["path"] for prepared in seeds}
        all_methods = methods(scale.steps)
        jobs = [(m, seed, scale, paths[seed], work_dir) for m in all_methods if m.trains for seed in scale.seeds]
        runs = {m.name: [] for m in all_methods}
        for result in pool.imap_unordered(run_method_star, jobs):
            result["history"] = [starts[result["seed"]]] + result["history"]
            runs[result["method"]].append(result)
            final = result["history"][-1]
            print(
                f"[{time.time() - started:6.0f}s] {result['method']:>14} seed {result['seed']}: "
                f"accuracy {final['accuracy']:.2f} (carry {final['carry_accuracy']:.2f}) in {result['seconds']:.0f}s",
                flush=True,
            )
    runs["start"] = [{"method": "start", "seed": seed, "history": [starts[seed]], "log": []} for seed in scale.seeds]
    return {m.name: method_summary(m, sorted(runs[m.name], key=lambda r: r["seed"])) for m in all_methods}


def run_method_star(job):
    return run_method(*job)


def markdown_table(results: dict[str, dict]) -> str:
    header = (
        "| method | held-out accuracy, mean ± std [min, max] | carry sums | lowest point of the mean curve "
        "| worked style | mean length (tokens) | mean entropy (nats/token) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    for name, result in results.items():
        final = result["final"]
        accuracy = final["accuracy"]
        rows.append(
            f"| {name}: {result['description']} | {accuracy['mean']:.3f} ± {accuracy['std']:.3f} "
            f"[{accuracy['min']:.2f}, {accuracy['max']:.2f}] | {final['carry_accuracy']['mean']:.3f} "
            f"| {result['dip']:.3f} | {final['worked_style']['mean']:.2f} | {final['mean_length']['mean']:.1f} "
            f"| {final['mean_entropy']['mean']:.3f} |"
        )
    return "\n".join([header, *rows])


def plot_curves(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for name, result in results.items():
        curve = result["curve"]
        if len(curve["steps"]) == 1:  # the starting model: a flat reference line
            axis.axhline(curve["accuracy"][0], color="gray", linestyle=":", label=name)
            continue
        style = "-" if name in ("sft", "grpo", "sft_then_grpo", "chord_mu", "chord_phi") else "--"
        axis.plot(curve["steps"], curve["accuracy"], style, label=name, linewidth=2 if style == "-" else 1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("held-out accuracy (greedy), mean over seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def provenance() -> dict:
    """The commit the run started from, whether the tree had changes, and the machine."""

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
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a much smaller smoke version (about a minute)")
    parser.add_argument("--output_dir", default="docs/results", help="where the JSON and the PNG go")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one CPU thread each")
    options = parser.parse_args()
    scale = QUICK if options.quick else FULL
    started = time.time()
    info = provenance()
    with tempfile.TemporaryDirectory(prefix="chord-paper-") as work_dir:
        results = run_all(scale, work_dir, options.workers)
    wall_seconds = time.time() - started
    os.makedirs(options.output_dir, exist_ok=True)
    name = "paper_table_quick" if options.quick else "paper_table"
    plot_curves(results, os.path.join(options.output_dir, f"{name}.png"))
    report = {"scale": asdict(scale), "wall_seconds": wall_seconds, "provenance": info, "methods": results}
    with open(os.path.join(options.output_dir, f"{name}.json"), "w") as file:
        json.dump(report, file, indent=1)
    print(markdown_table(results))
    print(
        f"\nWall time {wall_seconds / 60:.1f} min; commit {info['commit']}; results in {options.output_dir}/{name}.*"
    )


if __name__ == "__main__":
    main()
