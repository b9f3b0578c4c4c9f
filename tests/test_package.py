"""The package as users get it: the core alone imports without the demo, reward and image dependencies; a plain
(non-editable) install runs the demo through the `trl-chord` command and through `recipes/chord.py`, and every shipped
config's header commands (data preparation and training) as written."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from types import SimpleNamespace

import pytest
import yaml
from bounded_run import run_bounded


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The extras' packages, which the core must import without. Where vLLM is installed (CI's third environment has its CPU
# build), pillow is not optional: vLLM requires it, and TRL imports vLLM with GRPOTrainer
OPTIONAL = ("matplotlib", "math_verify", "deepspeed") + (() if importlib.util.find_spec("vllm") else ("PIL",))


def test_the_core_needs_neither_the_demo_nor_the_optional_dependencies():
    # In a fresh interpreter where the optional packages are missing (a `None` entry makes Python treat them so)
    probe = textwrap.dedent(f"""
        import json, sys

        sys.modules.update(dict.fromkeys({OPTIONAL!r}))
        import trl_chord
        from trl_chord import ChordConfig, ChordTrainer, chord_mu

        print(json.dumps(sorted(m for m in sys.modules if m.startswith("trl_chord"))))
    """)
    completed = run_bounded(
        [sys.executable, "-c", probe],
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.splitlines()[-1])
    assert "trl_chord.chord_trainer" in loaded
    assert [m for m in loaded if m.split(".")[1:2] in (["demo"], ["rewards"], ["recipes"], ["cli"])] == []


def test_every_public_name_is_imported_from_where_type_checkers_are_told_it_is():
    import ast

    from helpers import async_grpo_unavailable

    import trl_chord

    tree = ast.parse(open(trl_chord.__file__).read())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    declared = {(node.module, alias.name) for node in block.body for alias in node.names}
    exported = {(module, name) for module, names in trl_chord._import_structure.items() for name in names}
    assert declared == exported and len(exported) == len(trl_chord.__all__) == 18
    for module, name in exported:
        if module == "chord_async_grpo" and async_grpo_unavailable():
            continue
        assert getattr(trl_chord, name) is getattr(importlib.import_module(f"trl_chord.{module}"), name)


def run(command, **kwargs):
    completed = run_bounded(command, timeout=900, **kwargs)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """
    The wheel and the source distribution, and a fresh environment with the wheel alone, installed offline; its
    dependencies come from this one's site-packages, read as plain folders (so this checkout's editable install is
    not seen). Commands run from a folder outside the checkout, offline.
    """
    tmp_path = tmp_path_factory.mktemp("wheel-install")
    dist = tmp_path / "dist"
    for build in ("build_wheel", "build_sdist"):  # what pip calls, with this environment's setuptools: offline
        run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.{build}({str(dist)!r})"], cwd=ROOT)
    (wheel,) = dist.glob("trl_chord-*.whl")
    (sdist,) = dist.glob("trl_chord-*.tar.gz")

    venv = tmp_path / "venv"
    workdir = tmp_path / "elsewhere"  # not the checkout, so nothing is imported from it
    workdir.mkdir()
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
        "PYTHONNOUSERSITE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env).strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as file:
        file.write(sysconfig.get_path("purelib") + "\n")
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", str(wheel)]
    run(install, cwd=workdir, env=env)
    # The dependencies' own commands that the configs' headers call, run by this environment's interpreter
    (venv / "bin" / "accelerate").write_text(
        f"#!{python}\nfrom accelerate.commands.accelerate_cli import main\n\nmain()\n"
    )
    (venv / "bin" / "accelerate").chmod(0o755)
    return SimpleNamespace(wheel=wheel, sdist=sdist, venv=venv, python=python, site=site, workdir=workdir, env=env)


@pytest.mark.slow
def test_distributions_hold_the_package_and_the_checkout_files(wheel_install):
    sdist_names = {name.split("/", 1)[1] for name in tarfile.open(wheel_install.sdist).getnames() if "/" in name}
    assert {"recipes/chord.py", "tests/test_package.py", "docs/recipes.md"} <= sdist_names
    names = set(zipfile.ZipFile(wheel_install.wheel).namelist())
    shipped = {
        "trl_chord/py.typed",
        "trl_chord/recipes/configs/demo.yaml",
        "trl_chord/recipes/configs/math_luffy.yaml",
        "trl_chord/recipes/accelerate/zero3.yaml",
        "trl_chord/recipes/prepare/openr1_math.py",
        "trl_chord/recipes/prepare/toolace.py",
        "trl_chord/recipes/prepare/geometry3k.py",
    }
    assert shipped <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "recipes/")) for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    metadata_text = zipfile.ZipFile(wheel_install.wheel).read(metadata).decode()
    # No public repository exists yet: the metadata names no address, and the README links to the docs in the clone
    assert "Project-URL" not in metadata_text and "Home-page" not in metadata_text
    links = re.findall(r"\]\((docs/[^)#]+)", metadata_text)
    assert "docs/recipes.md" in links and all(os.path.exists(os.path.join(ROOT, link)) for link in links), links


@pytest.mark.slow
def test_plain_install_runs_the_demo(wheel_install, tmp_path):
    short_run = ["--max_steps", "2", "--logging_steps", "1", "--heldout_eval_steps", "2", "--output_dir"]
    for name, command in {
        "entry-point": [str(wheel_install.venv / "bin" / "trl-chord"), "--config", "demo"],
        "recipe-file": [wheel_install.python, os.path.join(ROOT, "recipes", "chord.py"), "--config", "demo"],
    }.items():
        stdout = run(command + short_run + [str(tmp_path / name)], cwd=wheel_install.workdir, env=wheel_install.env)
        assert "Held-out accuracy: 0% before training" in stdout, name
        assert (tmp_path / name / "metrics.png").exists() and (tmp_path / name / "model.safetensors").exists()
    located = run(
        [wheel_install.python, "-c", "import trl_chord; print(trl_chord.__file__)"],
        cwd=wheel_install.workdir,
        env=wheel_install.env,
    )
    assert located.startswith(wheel_install.site), located


@pytest.mark.slow
def test_plain_install_runs_sft_best_rl_as_the_readme_says(wheel_install, tmp_path):
    """The README's SFT-best -> RL command on the built-in task, shortened, from the wheel outside the checkout."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "trl-chord sft-best-rl --config demo_sft_best_rl\n" in readme
    short_run = "--sft_max_steps 4 --sft_eval_steps 2 --max_steps 2 --logging_steps 1 --output_dir"
    completed = run_header_command(
        f"trl-chord sft-best-rl --config demo_sft_best_rl {short_run} {tmp_path / 'run'}", wheel_install
    )
    summary = json.loads((tmp_path / "run" / "sft_best_rl.json").read_text())
    kept = summary["sft"]["kept"]
    assert [entry["step"] for entry in summary["sft"]["history"]] == [0, 2, 4]
    assert kept["eval_reward"] == max(entry["eval_reward"] for entry in summary["sft"]["history"])
    assert (
        f"SFT stage: best held-out eval_reward {kept['eval_reward']:.4f} at step {kept['step']} of 4"
        in completed.stdout
    )
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "sft" / "metrics.jsonl").exists()


HEADER_COMMAND = re.compile(r"#\s*(Data|Run|On a CPU)[^:]*:\s*(.+)")


def header_commands(config_file: str) -> dict[str, str]:
    """A config's header commands by their label (`Data`, `Run`, `On a CPU`), lines ending in a backslash joined."""
    commands, label = {}, None
    with open(config_file) as file:
        for line in file:
            if not line.startswith("#"):
                break
            if label is not None:
                commands[label] = commands[label].removesuffix("\\").rstrip() + " " + line[1:].strip()
            elif match := HEADER_COMMAND.match(line):
                label, commands[label] = match[1], match[2].strip()
            if label is not None and not commands[label].endswith("\\"):
                label = None
    return commands


# What turns a paper run into a few-second one: a tiny local model, 2 steps of 4 short completions (and, for a
# config with CHORD's expert term, one expert example per micro-step)
TINY_RUN = (
    "--max_steps 2 --logging_steps 1 --save_strategy no --per_device_train_batch_size 4 --num_generations 4 "
    "--gradient_accumulation_steps 1 --max_completion_length 8"
)
TINY_EXPERT_BATCH = "--chord_sft_per_device_train_batch_size 1"
# And for sft-best-rl: an SFT stage of 2 steps, each evaluated, on one held-out RL prompt
TINY_SFT_STAGE = " --sft_max_steps 2 --sft_eval_steps 1 --heldout_size 1 --per_device_eval_batch_size 4"
NOISE = ("Failed to load CPU gemm_4bit_forward", "`gradient_checkpointing` is deprecated", "Traceback")


def run_header_command(command: str, wheel_install, timeout: int = 600) -> subprocess.CompletedProcess:
    """A header command through bash (as a user pastes it: `$(trl-chord configs ...)` included), in the work folder."""
    completed = run_bounded(["bash", "-c", command], timeout=timeout, cwd=wheel_install.workdir, env=wheel_install.env)
    assert completed.returncode == 0, command + "\n" + completed.stdout[-3000:] + completed.stderr[-5000:]
    assert not [noise for noise in NOISE if noise in completed.stderr], completed.stderr[-5000:]
    return completed


@pytest.mark.slow
def test_every_shipped_config_runs_as_its_header_says(wheel_install, tmp_path):
    """
    From the installed wheel, outside the checkout: each paper config's data preparation (`Data`) on small local
    files in its source's layout, then its training: the `On a CPU` command, and for one config the multi-GPU `Run`
    command on one CPU process, each with a tiny local model and a few steps. The demo runs in the test above.
    """
    from test_data_prep import GEOMETRY_ROWS, GEOMETRY_SOLUTIONS, MATH_ROWS, TOOLACE_ROWS, image_parquet, write_jsonl
    from tiny_vlms import build_vlm

    from trl_chord.demo.tiny import save_tiny_model

    configs = run(
        [str(wheel_install.venv / "bin" / "trl-chord"), "configs"], cwd=wheel_install.workdir, env=wheel_install.env
    )
    config_files = dict(line.split() for line in configs.splitlines() if not line.startswith("accelerate/"))
    assert all(path.startswith(wheel_install.site) for path in config_files.values())
    headers = {name: header_commands(path) for name, path in config_files.items()}
    assert headers.pop("demo") == {"Run": "trl-chord --config demo"}
    assert headers.pop("demo_sft_best_rl") == {"Run": "trl-chord sft-best-rl --config demo_sft_best_rl"}  # below
    for name, commands in headers.items():
        assert set(commands) == {"Data", "Run", "On a CPU"}, (name, commands)
        assert commands["On a CPU"].startswith(
            (f"trl-chord --config {name} ", f"trl-chord sft-best-rl --config {name} ")
        )

    # The data: each distinct `Data` command, on local files in place of the hub datasets and tokenizer
    tiny_model = save_tiny_model(str(tmp_path / "tiny-model"))
    sources = {
        "openr1_math": f"--dataset {write_jsonl(tmp_path / 'openr1.jsonl', MATH_ROWS)} --tokenizer {tiny_model}",
        "toolace": f"--dataset {write_jsonl(tmp_path / 'toolace.jsonl', TOOLACE_ROWS)} --num_sft 2",
        "geometry3k": f"--dataset {image_parquet(tmp_path / 'geometry3k.parquet', GEOMETRY_ROWS)}",
    }
    solutions = image_parquet(tmp_path / "solutions.parquet", GEOMETRY_SOLUTIONS)
    for command in sorted({commands["Data"] for commands in headers.values()}):
        preparation = command.split()[2]
        completed = run_header_command(
            f"{command.replace('SOLUTIONS', solutions)} {sources[preparation]}", wheel_install
        )
        assert "Wrote data/" in completed.stdout, command

    # Training: a tiny model of the config's kind, the header's command as written, the tiny run's options after it
    vlm, processor = build_vlm("llava", tmp_path / "vlm-tokenizer")
    vlm.save_pretrained(str(tmp_path / "tiny-vlm"))
    processor.save_pretrained(str(tmp_path / "tiny-vlm"))
    runs = {name: commands["On a CPU"] for name, commands in headers.items()}
    # The multi-GPU command, on one CPU process without mixed precision (the `On a CPU` flags after it)
    gpu_command = headers["math_chord_mu"]["Run"]
    assert gpu_command.startswith('accelerate launch --config_file "$(trl-chord configs accelerate/zero3)" -m ')
    cpu_flags = runs["math_chord_mu"].removeprefix("trl-chord --config math_chord_mu")
    runs["math_chord_mu"] = (
        gpu_command.replace("accelerate launch", "accelerate launch --num_processes 1 --mixed_precision no", 1)
        + cpu_flags
    )
    for name, command in runs.items():
        model = tmp_path / ("tiny-vlm" if name == "geometry_vlm_chord" else "tiny-model")
        output_dir = tmp_path / name
        with open(config_files[name]) as file:
            luffy_alone = yaml.safe_load(file).get("trainer") == "luffy"  # LUFFY without CHORD's expert term
        tiny_run = TINY_RUN if luffy_alone else f"{TINY_RUN} {TINY_EXPERT_BATCH}"
        tiny_run += TINY_SFT_STAGE if " sft-best-rl " in command else ""
        completed = run_header_command(
            f"{command} --model_name_or_path {model} --output_dir {output_dir} {tiny_run}", wheel_install
        )
        assert f"Model: {output_dir}" in completed.stdout, name
        entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        logged_every_step = "luffy/missing_expert_frac" if luffy_alone else "chord/mu"
        assert [entry["step"] for entry in entries if logged_every_step in entry] == [1, 2], name
        weights = "adapter_model.safetensors" if name == "math_chord_phi_lora" else "model.safetensors"
        assert (output_dir / weights).exists(), name
