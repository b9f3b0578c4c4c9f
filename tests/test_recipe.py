"""The recipe end to end, as users run it (the `trl-chord` command and `recipes/chord.py`), on the built-in task."""

import json
import os
import sys

import pytest
import yaml
from bounded_run import run_bounded
from helpers import async_grpo_unavailable

from trl_chord import ChordConfig, LuffyConfig
from trl_chord.cli import main as cli_main
from trl_chord.recipes import config_path, shipped_configs
from trl_chord.recipes.chord import ChordScriptArguments, parse_args
from trl_chord.recipes.sft_best_rl import parse_sft_best_rl_args


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "chord.py")
# The console script that `pip install` put next to this interpreter
TRL_CHORD = os.path.join(os.path.dirname(sys.executable), "trl-chord")


def test_builtin_demo_runs_and_reports(tmp_path):
    command = [
        TRL_CHORD,
        "--config",
        "demo",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "6",
        "--logging_steps",
        "2",
        "--heldout_eval_steps",
        "3",
        "--chord_mu_decay_steps",
        "4",
        "--chord_log_term_grad_norms",
        "true",
    ]
    completed = run_bounded(command, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-5000:]
    assert "Held-out accuracy: 0% before training" in completed.stdout
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_logs = [e for e in entries if "chord/mu" in e]
    assert [e["step"] for e in train_logs] == [2, 4, 6]
    assert [e["chord/mu"] for e in train_logs][-1] == 0.1
    # The expert term's strength, in every log of the run (issue 19's metrics)
    strength = (
        "chord/token_weight_mean",
        "chord/effective_mu",
        "chord/expert_prob_below_0.1",
        "chord/expert_grad_norm",
    )
    assert all(key in entry for entry in train_logs for key in strength)
    assert sum("heldout/accuracy" in e for e in entries) == 2  # steps 3 and 6
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    assert (tmp_path / "model.safetensors").exists()


def test_shipped_configs_parse_by_name():
    training_configs = {name: path for name, path in shipped_configs().items() if not name.startswith("accelerate/")}
    assert set(training_configs) == {
        "demo",
        "geometry_vlm_chord",
        "math_chord_mu",
        "math_chord_phi",
        "math_chord_phi_lora",
        "math_luffy",
        "tool_chord_phi",
        "demo_sft_best_rl",
        "math_sft_best_grpo",
    }
    for name, path in training_configs.items():
        # GPU configs set bf16, which the arguments refuse on a machine without a GPU unless told to use the CPU
        if "sft_best" in name:  # `trl-chord sft-best-rl`'s: its options too, and the SFT stage's config
            script_args, sft, sft_args, training_args, model_args = parse_sft_best_rl_args(
                ["--config", name, "--use_cpu", "true"]
            )
            assert (sft_args.learning_rate, sft_args.max_steps) == (sft.sft_learning_rate, sft.sft_max_steps), name
            assert sft_args.chord_mu_peak == sft_args.chord_mu_valley == 1.0 and sft_args.save_only_model, name
            assert training_args.chord_mu_peak == training_args.chord_mu_valley == 0.0, name
            options = (script_args, sft, training_args, model_args)
            config_class = ChordConfig
        else:
            script_args, training_args, model_args = parse_args(["--config", name, "--use_cpu", "true"])
            config_class = LuffyConfig if name == "math_luffy" else ChordConfig
            options = (script_args, training_args, model_args)
        assert isinstance(script_args, ChordScriptArguments) and isinstance(training_args, config_class), name
        with open(path) as file:
            for key, value in yaml.safe_load(file).items():
                owners = [a for a in options if hasattr(a, key)]
                assert owners, (name, key)  # every key is an option of the recipe
                if isinstance(value, (int, float, bool)):
                    assert getattr(owners[0], key) == value, (name, key)


def test_config_names_and_paths(tmp_path, capsys):
    own = tmp_path / "demo"  # a file of the user's wins over a shipped config of the same name
    own.write_text("max_steps: 1\n")
    assert config_path(str(own)) == str(own)
    assert config_path("demo") == config_path("demo.yaml") == shipped_configs()["demo"]
    assert os.path.isfile(config_path("accelerate/zero3"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config; shipped configs: demo, "):
        config_path("no_such_config")
    cli_main(["configs"])
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert listed == shipped_configs() and all(os.path.isfile(path) for path in listed.values())
    cli_main(["configs", "accelerate/zero2"])
    assert capsys.readouterr().out.strip() == shipped_configs()["accelerate/zero2"]


def test_config_given_with_an_equals_sign(tmp_path):
    script_args, training_args, _ = parse_args(["--config=demo", "--output_dir", str(tmp_path)])
    assert training_args.max_steps == 1500 and script_args.heldout_eval_steps == 100  # the demo config's


def test_help_opens_with_the_commands_and_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    opening = "\n".join(capsys.readouterr().out.splitlines()[:12])
    assert "--config NAME_OR_FILE" in opening and "trl-chord configs" in opening and "trl-chord prepare" in opening


@pytest.mark.parametrize(
    "command, message",
    [
        (["configs", "nope"], "'nope' is neither a file nor a shipped config; shipped configs: demo, "),
        (["--config", "nope"], "'nope' is neither a file nor a shipped config"),
        (["prepare", "nope"], "no data preparation 'nope'; there are: openr1_math, toolace, geometry3k."),
        # GPU configs on a machine without one: what to add, in place of transformers' bf16 error
        (["--config", "math_chord_phi"], "add --use_cpu true --bf16 false, and --use_vllm false"),
    ],
)
def test_command_line_mistakes_are_one_line_errors(command, message):
    if command[-1] == "math_chord_phi":
        from transformers.utils import is_torch_bf16_gpu_available

        if is_torch_bf16_gpu_available():
            pytest.skip("this machine has a GPU with bf16")
    completed = run_bounded([TRL_CHORD, *command], timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 2
    errors = [line for line in completed.stderr.splitlines() if line.startswith("trl-chord: error: ")]
    assert len(errors) == 1 and message in errors[0], completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    # Nor bitsandbytes' notice about an optional CPU kernel, which its import (through peft) logged in every command
    assert "Failed to load CPU gemm_4bit_forward" not in completed.stderr


def test_listing_configs_and_preparations_imports_neither_torch_nor_trl():
    probe = (
        "import sys\n"
        "from trl_chord.cli import main\n"
        "main(['configs']); main(['configs', 'accelerate/zero3']); main(['prepare'])\n"
        "print(sorted({'torch', 'transformers', 'trl', 'datasets'} & set(sys.modules)))"
    )
    completed = run_bounded([sys.executable, "-c", probe], timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[-1] == "[]"
    assert any(line.startswith("toolace ") or line.strip().startswith("toolace ") for line in lines)
    assert lines[len(shipped_configs())] == shipped_configs()["accelerate/zero3"]


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
LAUNCHES = {
    "ddp": [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2"],
    # The shipped GPU configs, told to run two processes without mixed precision
    "zero2": [
        ACCELERATE,
        "launch",
        "--config_file",
        "trl_chord/recipes/accelerate/zero2.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ],
    "zero3": [
        ACCELERATE,
        "launch",
        "--config_file",
        "trl_chord/recipes/accelerate/zero3.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
    ],
    "lora": [sys.executable],
}
EXTRA_ARGS = {
    "lora": ["--use_peft", "true", "--lora_r", "16", "--lora_target_modules", "all-linear", "--learning_rate", "3e-2"]
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", sorted(LAUNCHES))
def test_recipe_trains_under_each_launch(tmp_path, launch):
    command = LAUNCHES[launch] + [
        RECIPE,
        "--config",
        "demo",
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        "12",
        "--logging_steps",
        "4",
        "--heldout_eval_steps",
        "6",
        # A short run: a constant, larger learning rate than the demo's so that the expert loss moves in 12 steps
        "--learning_rate",
        "3e-3",
        "--lr_scheduler_type",
        "constant",
        *EXTRA_ARGS.get(launch, []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = run_bounded(command, cwd=ROOT, timeout=900, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-5000:]
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_logs = [e for e in entries if "chord/mu" in e]
    assert [e["step"] for e in train_logs] == [4, 8, 12]
    nll = [e["chord/expert_nll"] for e in train_logs]
    # The expert term trained (a LoRA adapter on a random model, with its embeddings frozen, moves more slowly)
    assert nll[-1] < nll[0] - (0.25 if launch == "lora" else 0.5), nll
    if launch == "lora":
        assert (tmp_path / "adapter_model.safetensors").exists()
    assert sum("heldout/accuracy" in e for e in entries) == 2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sum_prompts(numbers):
    return [{"prompt": [{"role": "user", "content": f"{n}+1="}], "answer": str(n + 1)} for n in numbers]


def sum_experts(numbers, style):
    return [
        {
            "prompt": [{"role": "user", "content": f"{n}+1="}],
            "completion": [{"role": "assistant", "content": style(n)}],
        }
        for n in numbers
    ]


def recipe_args(tiny_model_dir, tmp_path, *extra):
    return [
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        write_jsonl(tmp_path / "prompts.jsonl", sum_prompts(range(8))),
        "--reward_funcs",
        "addition_reward",
        "--output_dir",
        str(tmp_path / "run"),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "4",
        "--max_completion_length",
        "4",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        *extra,
    ]


def test_recipe_mixes_several_expert_sources_in_the_given_proportions(tiny_model_dir, tmp_path):
    from trl_chord.recipes.chord import main

    short = write_jsonl(tmp_path / "short.jsonl", sum_experts(range(6), lambda n: str(n + 1)))
    worked = write_jsonl(tmp_path / "worked.jsonl", sum_experts(range(4), lambda n: f"{n} and 1 make {n + 1}"))
    args = recipe_args(
        tiny_model_dir,
        tmp_path,
        "--chord_sft_dataset",
        short,
        f"long={worked}",
        "--chord_sft_dataset_proportions",
        '{"short": 1, "long": 3}',
        "--chord_sft_per_device_train_batch_size",
        "4",
        "--max_steps",
        "2",
    )
    main(*parse_args(args))
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in entries if "chord/mu" in entry]
    assert len(steps) == 2
    for entry in steps:
        # 1 of every 4 expert examples from "short" (3 tokens each with the end of turn), 3 from "long"
        assert entry["chord/expert_tokens/short"] == 1 * 3
        assert entry["chord/expert_tokens/long"] > 3 * 10
        assert entry["chord/expert_nll/short"] > 0 and entry["chord/expert_nll/long"] > 0


def test_recipe_reports_the_held_out_experts_at_each_evaluation_and_plots_them(tiny_model_dir, tmp_path, monkeypatch):
    import matplotlib.axes

    from trl_chord.recipes.chord import main

    expert = write_jsonl(tmp_path / "experts.jsonl", sum_experts(range(4), lambda n: str(n + 1)))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", sum_experts(range(10, 13), lambda n: str(n + 1)))
    args = recipe_args(tiny_model_dir, tmp_path, "--chord_sft_dataset", expert, "--chord_eval_sft_dataset", held_out)
    args += ["--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1"]
    plotted = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda axis, *a, **k: plotted.append(k.get("label")) or plot(axis, *a, **k)
    )
    main(*parse_args(args))
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [entry for entry in entries if "eval_chord/expert_nll" in entry]
    # At steps 1 and 2, all 3 held-out examples: 4 tokens each (a one-digit answer takes 3, test above; these have 2)
    assert [entry["step"] for entry in evaluations] == [1, 2]
    assert all(entry["eval_chord/expert_tokens"] == 3 * 4 for entry in evaluations)
    assert "held-out experts" in plotted


def test_two_expert_sources_with_one_name_are_refused(tmp_path):
    from trl_chord.recipes.chord import load_expert_sources

    (tmp_path / "other").mkdir()
    first = write_jsonl(tmp_path / "math.jsonl", sum_experts([1], str))
    second = write_jsonl(tmp_path / "other" / "math.jsonl", sum_experts([2], str))
    with pytest.raises(ValueError, match="Two expert sources are named 'math'"):
        load_expert_sources([first, second], None, "train")


def test_only_the_main_process_clears_an_old_metrics_file(tiny_model_dir, tmp_path, monkeypatch):
    # Every process runs the recipe; with several, a second one that also removed the old metrics file raced the
    # first (and could delete what the first had begun to write). As a process other than the main one:
    import accelerate

    from trl_chord.recipes.chord import main

    (tmp_path / "run").mkdir()
    old_run = '{"step": 1, "loss": 1.0}\n'
    (tmp_path / "run" / "metrics.jsonl").write_text(old_run)
    monkeypatch.setattr(accelerate.Accelerator, "is_main_process", property(lambda self: False))
    expert = write_jsonl(tmp_path / "experts.jsonl", sum_experts(range(4), lambda n: str(n + 1)))
    main(*parse_args(recipe_args(tiny_model_dir, tmp_path, "--chord_sft_dataset", expert, "--max_steps", "1")))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().startswith(old_run)


def test_one_reward_function_given_as_a_yaml_string_loads(tmp_path):
    from trl_chord.recipes.chord import resolve_reward_funcs
    from trl_chord.rewards import math_accuracy_reward

    config = tmp_path / "run.yaml"
    config.write_text("reward_funcs: math_accuracy_reward\noutput_dir: unused\nuse_cpu: true\nbf16: false\n")
    script_args, _, _ = parse_args(["--config", str(config)])
    assert resolve_reward_funcs(script_args.reward_funcs) == [math_accuracy_reward]


def test_an_unnamed_expert_folder_with_an_equals_sign_loads_as_one_source(tmp_path):
    from datasets import Dataset

    from trl_chord.recipes.chord import load_expert_sources, split_source_name

    folder = tmp_path / "experts" / "split=train"  # a Hive-style partition folder
    folder.mkdir(parents=True)
    Dataset.from_list(sum_experts([1, 2], str)).to_parquet(str(folder / "part-0.parquet"))
    Dataset.from_list(sum_experts([3], str)).to_parquet(str(folder / "part-1.parquet"))
    experts = load_expert_sources([str(folder)], None, "train")
    assert isinstance(experts, Dataset) and len(experts) == 3
    # Named sources keep working, paths with `=` included
    named = load_expert_sources([f"sums={folder}", f"more={folder}/part-1.parquet"], None, "train")
    assert {name: len(data) for name, data in named.items()} == {"sums": 3, "more": 1}
    assert split_source_name("org/data=v2") == (None, "org/data=v2")
    assert split_source_name("math=org/data") == ("math", "org/data")


def test_the_trainer_option_picks_the_trainer_and_its_config(tmp_path):
    from trl_chord import ChordRLOOConfig
    from trl_chord.recipes.chord import trainer_classes

    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    assert isinstance(parse_args(cpu)[1], ChordConfig) and parse_args(cpu)[0].trainer == "grpo"
    # RLOOConfig's own options are options of the run
    rloo = ["--trainer", "rloo", "--beta", "0.0", "--chord_mu_valley", "0.3"]
    script_args, training_args, _ = parse_args([*cpu, *rloo])
    assert script_args.trainer == "rloo" and isinstance(training_args, ChordRLOOConfig)
    assert training_args.beta == 0.0 and training_args.chord_mu_valley == 0.3
    # From a YAML config, where the command line wins
    config = tmp_path / "run.yaml"
    config.write_text("trainer: rloo\nchord_mu_valley: 0.2\n")
    assert isinstance(parse_args([*cpu, "--config", str(config)])[1], ChordRLOOConfig)
    assert type(parse_args([*cpu, "--config", str(config), "--trainer", "grpo"])[1]) is ChordConfig
    with pytest.raises(ValueError, match="--trainer must be one of grpo, rloo, async_grpo, luffy, chord_luffy, got"):
        trainer_classes("ppo")
    # The GRPO options another trainer lacks are refused by name
    with pytest.raises(ValueError, match="scale_rewards"):
        parse_args([*cpu, "--trainer", "rloo", "--scale_rewards", "group"])


ASYNC_GRPO = pytest.mark.skipif(
    async_grpo_unavailable() is not None, reason="TRL's AsyncGRPOTrainer needs transformers 5"
)


@ASYNC_GRPO
def test_the_async_grpo_trainer_takes_async_grpo_configs_options(tmp_path):
    from trl_chord.chord_async_grpo import ChordAsyncGRPOConfig

    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    script_args, training_args, model_args = parse_args(
        [*cpu, "--trainer=async_grpo", "--vllm_server_base_url", "http://gpu-node:8000", "--dtype", "bfloat16"]
    )
    assert isinstance(training_args, ChordAsyncGRPOConfig)
    assert training_args.vllm_server_base_url == "http://gpu-node:8000"
    # `dtype` is an option of both TRL's ModelConfig and AsyncGRPOConfig (the same one): it goes to the latter
    assert training_args.dtype == "bfloat16" and not hasattr(model_args, "dtype")
    with pytest.raises(ValueError, match="scale_rewards"):
        parse_args([*cpu, "--trainer", "async_grpo", "--scale_rewards", "group"])


@pytest.mark.skipif(async_grpo_unavailable() is None, reason="TRL's AsyncGRPOTrainer imports with this transformers")
def test_async_grpo_with_transformers_4_is_a_clear_error(tmp_path):
    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    with pytest.raises(ImportError, match="It needs transformers 5 .* ChordTrainer and ChordRLOOTrainer work with"):
        parse_args([*cpu, "--trainer", "async_grpo"])


def test_recipe_trains_with_rloo(tiny_model_dir, tmp_path):
    from trl_chord.recipes.chord import main

    expert = write_jsonl(tmp_path / "experts.jsonl", sum_experts(range(4), lambda n: str(n + 1)))
    args = recipe_args(
        tiny_model_dir, tmp_path, "--trainer", "rloo", "--beta", "0", "--chord_sft_dataset", expert, "--max_steps", "2"
    )
    main(*parse_args(args))
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in entries if "chord/mu" in entry]
    assert len(steps) == 2 and all("chord/rloo_loss" in entry and "chord/sft_loss" in entry for entry in steps)


@ASYNC_GRPO
def test_the_builtin_demo_refuses_async_grpo_with_the_reason(tmp_path):
    from trl_chord.recipes.chord import main

    # (the demo's config sets `beta`, an option AsyncGRPOConfig has not: the command line is the built-in task's)
    cpu = ["--use_cpu", "true", "--bf16", "false"]
    args = parse_args(["--output_dir", str(tmp_path), *cpu, "--trainer", "async_grpo"])
    with pytest.raises(ValueError, match="--trainer async_grpo needs a vLLM server"):
        main(*args)


@ASYNC_GRPO
@pytest.mark.parametrize(
    "option, message",
    [(["--attn_implementation", "sdpa"], "own packed attention"), (["--load_in_4bit", "true"], "no quantized model")],
)
def test_async_grpo_refuses_model_options_it_would_ignore_before_loading_anything(tmp_path, option, message):
    from trl_chord.recipes.chord import main

    cpu = ["--use_cpu", "true", "--bf16", "false"]
    # Neither path exists: the refusal comes before any model or data is read
    missing = ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no-data.jsonl")]
    args = parse_args(["--output_dir", str(tmp_path), *cpu, *missing, "--trainer", "async_grpo", *option])
    with pytest.raises(ValueError, match=message):
        main(*args)


def test_plot_has_a_heldout_panel_only_with_heldout_evaluations(tmp_path):
    from PIL import Image

    from trl_chord.demo.reporting import plot_metrics

    log = tmp_path / "metrics.jsonl"
    write_jsonl(log, [{"step": s, "chord/mu": 0.1, "reward": 0.5, "chord/expert_nll": 2.0 / s} for s in (1, 2)])
    history = [{"step": 0, "accuracy": 0.0}, {"step": 2, "accuracy": 0.5}]
    widths = {}
    for name, heldout in {"without": None, "with": history}.items():
        with Image.open(plot_metrics(str(log), str(tmp_path / f"{name}.png"), heldout)) as image:
            widths[name] = image.width
    # 4 inches at 100 dpi per panel: mu, reward, expert NLL, and held-out accuracy when there is any
    assert widths == {"without": 3 * 400, "with": 4 * 400}
