import os
import tempfile
from unittest import mock

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU shared-memory op on first use, under a lock file in the shared extensions cache; a build
# killed half-way (a timeout, a machine stopped) leaves the lock behind and every later DeepSpeed launch waits on it
# forever. A cache of this session's own costs one build (about 40 s on 2 cores) and cannot inherit a stale lock.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    session_extensions = tempfile.TemporaryDirectory(prefix="trl-chord-torch-extensions-")  # removed at exit
    os.environ["TORCH_EXTENSIONS_DIR"] = session_extensions.name

TESTED_PACKAGES = ("torch", "trl", "transformers", "accelerate", "datasets", "peft", "deepspeed", "math-verify")


def pytest_report_header(config):
    """The versions under test, at the top of the run (CI runs the newest and the oldest supported ones)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {installed(name)}" for name in TESTED_PACKAGES)


@pytest.fixture(autouse=True)
def restore_environment():
    """transformers 4 exports parsed training arguments (`bf16` as ACCELERATE_MIXED_PRECISION) to the environment,
    where every later Accelerator would read them: each test gets the environment back as it found it."""
    with mock.patch.dict(os.environ):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2-shaped model and its char-level tokenizer, saved like a hub checkpoint (nothing downloaded)."""
    from trl_chord.demo.tiny import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
