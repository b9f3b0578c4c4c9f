"""The package as users get it: the core alone imports without the demo, reward and image dependencies, and a plain
(non-editable) install runs the demo through the `trl-chord` command and through `recipes/chord.py`."""

import json
import os
import sys
import sysconfig
import tarfile
import textwrap
import zipfile

import pytest
from bounded_run import run_bounded


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("matplotlib", "math_verify", "deepspeed", "PIL")


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


def run(command, **kwargs):
    completed = run_bounded(command, timeout=900, **kwargs)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.slow
def test_plain_install_runs_the_demo(tmp_path):
    # The wheel as pip builds it, and the source distribution with the files the wheel leaves out
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), ROOT])
    run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"], cwd=ROOT)
    (sdist,) = dist.glob("trl_chord-*.tar.gz")
    sdist_names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {"recipes/chord.py", "recipes/data/prepare_toolace.py", "tests/test_package.py"} <= sdist_names
    (wheel,) = dist.glob("trl_chord-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"trl_chord/py.typed", "trl_chord/recipes/configs/demo.yaml", "trl_chord/recipes/accelerate/zero3.yaml"}
    assert shipped <= set(names)
    assert not any(name.startswith(("tests/", "benchmarks/", "recipes/")) for name in names)

    # A fresh environment with the wheel alone; its dependencies come from this one's site-packages, read as plain
    # folders (so this checkout's editable install is not seen)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    venv_python = venv / "bin" / "python"
    venv_site = run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    with open(os.path.join(venv_site, "dependencies.pth"), "w") as file:
        file.write(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-deps", str(wheel)])

    workdir = tmp_path / "elsewhere"  # not the checkout, so nothing is imported from it
    workdir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    short_run = ["--max_steps", "2", "--logging_steps", "1", "--heldout_eval_steps", "2", "--output_dir"]
    for name, command in {
        "entry-point": [str(venv / "bin" / "trl-chord"), "--config", "demo"],
        "recipe-file": [str(venv_python), os.path.join(ROOT, "recipes", "chord.py"), "--config", "demo"],
    }.items():
        stdout = run(command + short_run + [str(tmp_path / name)], cwd=workdir, env=env)
        assert "Held-out accuracy: 0% before training" in stdout, name
        assert (tmp_path / name / "metrics.png").exists() and (tmp_path / name / "model.safetensors").exists()
    located = run([str(venv_python), "-c", "import trl_chord; print(trl_chord.__file__)"], cwd=workdir, env=env)
    assert located.startswith(venv_site), located
