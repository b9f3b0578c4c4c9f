"""The recipe end to end, as users run it (the `trl-chord` command and `recipes/chord.py`), on the built-in task."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from trl_chord import ChordConfig
from trl_chord.cli import main as cli_main
from trl_chord.recipes import config_path, shipped_configs
from trl_chord.recipes.chord import ChordScriptArguments, parse_args


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
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-5000:]
    assert "Held-out accuracy: 0% before training" in completed.stdout
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_logs = [e for e in entries if "chord/mu" in e]
    assert [e["step"] for e in train_logs] == [2, 4, 6]
    assert [e["chord/mu"] for e in train_logs][-1] == 0.1
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
        "tool_chord_phi",
    }
    for name, path in training_configs.items():
        # GPU configs set bf16, which the arguments refuse on a machine without a GPU unless told to use the CPU
        script_args, training_args, model_args = parse_args(["--config", name, "--use_cpu", "true"])
        assert isinstance(script_args, ChordScriptArguments) and isinstance(training_args, ChordConfig), name
        with open(path) as file:
            for key, value in yaml.safe_load(file).items():
                owners = [a for a in (script_args, training_args, model_args) if hasattr(a, key)]
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
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
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
