"""Reliability: kills and exact resume, coverage of the expert set, numerics, bad input, long runs, security."""

import json
import os
import signal
import sys

import pytest
import torch
from bounded_run import run_bounded
from datasets import Dataset
from helpers import weights
from transformers import AutoTokenizer

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.checkpoints import CHORD_STATE_NAME, TRAINER_STATE_NAME, complete_checkpoints
from trl_chord.expert_sampler import ExpertSampler


HERE = os.path.dirname(os.path.abspath(__file__))
KILLABLE = os.path.join(HERE, "scripts", "chord_killable.py")


def run_killable(model_dir, output_dir, tag, *extra, expect_killed=False):
    draws, result = output_dir / f"{tag}-draws.jsonl", output_dir / f"{tag}-result.json"
    command = [
        sys.executable,
        KILLABLE,
        "--model",
        model_dir,
        "--output_dir",
        str(output_dir / "run"),
        "--draws",
        str(draws),
        "--result",
        str(result),
        *extra,
    ]
    completed = run_bounded(command, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if expect_killed:
        assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    else:
        assert completed.returncode == 0, completed.stderr[-3000:]
    lines = draws.read_text().splitlines() if draws.exists() else []
    draws_list = [json.loads(line) for line in lines]
    return draws_list, (json.loads(result.read_text()) if result.exists() else None), completed


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    return run_killable(tiny_model_dir, tmp_path_factory.mktemp("uninterrupted"), "full")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["between_steps", "during_save"])
def test_killed_run_resumes_exactly(tiny_model_dir, tmp_path, uninterrupted, kill):
    full_draws, full_result, _ = uninterrupted
    kill_args = ["--kill_after_step", "3"] if kill == "between_steps" else ["--kill_during_save_at_step", "3"]
    killed_draws, _, _ = run_killable(tiny_model_dir, tmp_path, "killed", *kill_args, expect_killed=True)
    assert [d["step"] for d in killed_draws] == [1, 2, 3]

    # Step 3's checkpoint is missing (killed before the save) or incomplete (killed inside it): never loaded
    complete, incomplete = complete_checkpoints(str(tmp_path / "run"), needs_chord_state=True)
    assert [os.path.basename(c) for c in complete] == ["checkpoint-2", "checkpoint-1"]
    if kill == "during_save":
        assert list(incomplete) == [str(tmp_path / "run" / "checkpoint-3")]
        assert (tmp_path / "run" / "checkpoint-3" / CHORD_STATE_NAME).exists()
        assert not (tmp_path / "run" / "checkpoint-3" / TRAINER_STATE_NAME).exists()

    resumed_draws, resumed_result, completed = run_killable(tiny_model_dir, tmp_path, "resumed", "--resume")
    if kill == "during_save":
        assert "Not resuming from" in completed.stderr and "checkpoint-3" in completed.stderr
    # Bit-exact on one process: the same weights, mu, SFT losses and expert examples as the uninterrupted run
    assert resumed_result == full_result
    assert killed_draws[:2] + resumed_draws == full_draws
    assert full_result["mu"] == pytest.approx([0.9, 0.7828427, 0.5, 0.2171573, 0.1])


def test_no_complete_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    os.makedirs(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / TRAINER_STATE_NAME).write_text("{truncated")
    args = ChordConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        report_to="none",
        bf16=False,
        max_steps=1,
        max_completion_length=4,
    )
    trainer = ChordTrainer(
        model=tiny_model_dir,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}),
        expert_dataset=Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(ValueError, match="No complete checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("num_examples, world, batch_size", [(13, 2, 2), (3, 2, 2), (10, 3, 4), (2, 2, 5)])
def test_every_example_is_trained_once_per_pass_across_processes(num_examples, world, batch_size):
    num_passes = 4
    samplers = [ExpertSampler(num_examples, batch_size, world, rank, seed=3) for rank in range(world)]
    streams = []
    for sampler in samplers:
        stream = []
        while len(stream) < num_passes * sampler.shard_size:
            stream.extend(sampler.next_batch())
        streams.append(stream[: num_passes * sampler.shard_size])
    counts = torch.bincount(torch.tensor(sum(streams, [])), minlength=num_examples)
    assert counts.tolist() == [num_passes] * num_examples
    for epoch in range(num_passes):
        shards = [
            set(s[epoch * sampler.shard_size : (epoch + 1) * sampler.shard_size])
            for s, sampler in zip(streams, samplers)
        ]
        assert all(a.isdisjoint(b) for i, a in enumerate(shards) for b in shards[i + 1 :])


# The bad-input catalogue: each malformed expert row either fails before training with an error naming the row and
# the problem, or is skipped and counted in a warning, as documented in docs/reliability.md
GOOD_ROW = {"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}
ERROR_ROWS = [
    ("prompt is None", {"prompt": None, "completion": "2"}, r"Expert example 1: `prompt` and `completion` must both"),
    ("completion is None", {"prompt": "1+1=", "completion": None}, r"Expert example 1: `prompt` and `completion`"),
    ("prompt is a number", {"prompt": 7, "completion": "2"}, r"Expert example 1: .* got int and str"),
    ("message is a string", {"messages": ["hello"]}, r"Expert example 1: `messages` must be a list of messages"),
    ("messages is a string", {"messages": "hello"}, r"Expert example 1: `messages` must be a list of messages"),
    (
        "unknown role",
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        r"Expert example 1: `messages` has messages with unknown roles \['robot'\]",
    ),
    ("tools is not JSON", {**GOOD_ROW, "tools": "[{oops"}, r"Expert example 1: the `tools` column is not valid JSON"),
    ("tools is a number", {**GOOD_ROW, "tools": 3}, r"Expert example 1: `tools` must be a list or a JSON string"),
]
SKIPPED_ROWS = [
    ("no assistant turn", {"messages": [{"role": "user", "content": "a"}]}, "1 with no assistant turn"),
    ("empty completion", {"prompt": "1+1=", "completion": ""}, "1 with empty completion"),
    (
        "empty completion list",
        {"prompt": [{"role": "user", "content": "a"}], "completion": []},
        "1 with empty completion",
    ),
    (
        "empty assistant content",
        {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": ""}]},
        "1 with empty completion",
    ),
    ("whitespace completion", {"prompt": "1+1=", "completion": " \n"}, "1 with empty completion"),
    (
        "empty assistant turns",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
        "1 with empty completion",
    ),
]


def _bad_row_dataset(bad_row):
    # The good row first, then the bad one, as rows of a plain Python list (no Arrow schema to reconcile)
    if "messages" in bad_row:
        first = {"messages": GOOD_ROW["prompt"] + GOOD_ROW["completion"]}
    else:
        first = {"prompt": "1+1=", "completion": "2"} if isinstance(bad_row["prompt"], str) else GOOD_ROW
    return [{**first, **({"tools": None} if "tools" in bad_row else {})}, bad_row]


@pytest.mark.parametrize("name, row, message", ERROR_ROWS, ids=[case[0] for case in ERROR_ROWS])
def test_malformed_expert_row_is_named(tiny_tokenizer, name, row, message):
    from trl_chord.expert_data import tokenize_expert_example

    rows = _bad_row_dataset(row)
    tokenize_expert_example(rows[0], 0, tiny_tokenizer, max_length=256)
    with pytest.raises(ValueError, match=message):
        tokenize_expert_example(rows[1], 1, tiny_tokenizer, max_length=256)


@pytest.mark.parametrize("name, row, counted", SKIPPED_ROWS, ids=[case[0] for case in SKIPPED_ROWS])
def test_unusable_expert_row_is_skipped_and_counted(tiny_tokenizer, caplog, name, row, counted):
    import logging

    from trl_chord.expert_data import prepare_expert_dataset

    with caplog.at_level(logging.WARNING):
        kept = prepare_expert_dataset(Dataset.from_list(_bad_row_dataset(row)), tiny_tokenizer, max_length=256)
    assert len(kept) == 1
    assert f"Skipped 1 of 2 expert examples: {counted}" in caplog.text


def test_a_long_completion_is_cut_not_dropped(tiny_tokenizer):
    from trl_chord.expert_data import prepare_expert_dataset

    kept = prepare_expert_dataset(Dataset.from_list([{"prompt": "1+1=", "completion": "2" * 500}]), tiny_tokenizer, 64)
    assert len(kept[0]["input_ids"]) == 64 and sum(kept[0]["completion_mask"]) == 60


def _trainer(model_dir, tmp_path, reward, **overrides):
    from helpers import chord_config, make_expert_dataset, make_trainer

    args = chord_config(tmp_path, **{"chord_mu_valley": 0.5, **overrides})
    return make_trainer(model_dir, args, make_expert_dataset(), reward_funcs=reward)


def test_nan_in_the_grpo_term_stops_before_the_update(tiny_model_dir, tmp_path, monkeypatch):
    from helpers import odd_char_reward
    from trl import GRPOTrainer

    compute_grpo_loss = GRPOTrainer._compute_loss
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, *a: compute_grpo_loss(self, *a) * float("nan"))
    trainer = _trainer(tiny_model_dir, tmp_path, odd_char_reward)
    before = weights(trainer)
    with pytest.raises(FloatingPointError, match=r"The GRPO loss is nan at optimizer step 1 \(micro-step 1"):
        trainer.train()
    assert all(torch.equal(before[name], param) for name, param in weights(trainer).items())


def test_nan_in_the_sft_term_stops_before_the_update(tiny_model_dir, tmp_path, monkeypatch):
    from helpers import odd_char_reward

    from trl_chord import ChordTrainer

    def poisoned_expert_loss(self, model):
        output, per_source = expert_loss(self, model)
        output.loss = output.loss * float("nan")
        return output, per_source

    expert_loss = ChordTrainer._expert_loss
    trainer = _trainer(tiny_model_dir, tmp_path, odd_char_reward)
    trainer.train()  # two healthy steps
    monkeypatch.setattr(ChordTrainer, "_expert_loss", poisoned_expert_loss)
    trainer.args.max_steps = 4
    before = weights(trainer)
    with pytest.raises(FloatingPointError, match=r"The SFT loss is nan at optimizer step 1"):
        trainer.train()  # a fresh train() call restarts at step 1 (no resume)
    assert all(torch.equal(before[name], param) for name, param in weights(trainer).items())


def test_bf16_autocast_on_cpu_gives_finite_losses(tiny_model_dir, tmp_path):
    from helpers import odd_char_reward

    trainer = _trainer(tiny_model_dir, tmp_path, odd_char_reward, bf16=True, use_cpu=True, max_steps=3)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "chord/sft_loss" in entry]
    assert len(history) == 3
    for entry in history:
        for key in ("loss", "chord/sft_loss", "chord/grpo_loss", "chord/expert_nll"):
            assert torch.isfinite(torch.tensor(entry[key])), (key, entry[key])


def test_identical_rewards_make_the_zero_grpo_term_visible(tiny_model_dir, tmp_path, caplog):
    import logging

    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = _trainer(tiny_model_dir, tmp_path, constant_reward)
    before = weights(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    assert [entry["chord/nonzero_advantage_frac"] for entry in logs] == [0.0, 0.0]
    assert [entry["chord/grpo_loss"] for entry in logs] == [0.0, 0.0]
    assert [entry["frac_reward_zero_std"] for entry in logs] == [1.0, 1.0]
    assert all(entry["chord/sft_loss"] > 0 for entry in logs)
    assert "every advantage and the GRPO term are 0" in caplog.text
    assert any(not torch.equal(before[name], param) for name, param in weights(trainer).items())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


RSS_GROWTH_BOUND = 64 * 2**20


@pytest.mark.slow
def test_200_steps_cycling_the_expert_set_do_not_grow_memory(tiny_model_dir, tmp_path):
    from helpers import odd_char_reward
    from transformers import TrainerCallback

    class RssProbe(TrainerCallback):
        samples = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (50, 200):
                self.samples[state.global_step] = _rss_bytes()

    # 7 expert examples, 2 per micro-batch: 200 steps cycle the expert set 57 times
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        odd_char_reward,
        max_steps=200,
        logging_steps=10,
        chord_sft_per_device_train_batch_size=2,
    )
    trainer.expert_dataset = trainer.expert_dataset.select(range(7))
    trainer.expert_sampler = ExpertSampler(7, batch_size=2, seed=0)
    probe = RssProbe()
    trainer.add_callback(probe)
    trainer.train()
    assert trainer.expert_sampler.examples_drawn == 400
    growth = probe.samples[200] - probe.samples[50]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB from step 50 to step 200"


# Modules that unpickle data or run files, and calls that run code or load it by name
UNPICKLING_MODULES = {"pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib", "runpy"}
CODE_RUNNING_CALLS = {"eval", "exec", "compile", "__import__", "torch.load"}
CODE_IMPORTING_METHODS = {"import_module", "exec_module", "spec_from_file_location", "__import__"}
# The deliberate uses: `--reward_funcs my_module.my_reward` imports the user's own module, as TRL's scripts do; the
# package imports its own modules lazily, by the constant names of `trl_chord._import_structure`
ALLOWED_CODE_LOADING = {
    ("trl_chord/recipes/chord.py", "importlib.import_module"),
    ("trl_chord/__init__.py", "importlib.import_module"),
}


def code_loading_sites(path: str, relative_path: str) -> set[tuple[str, str]]:
    """
    (file, what) for each import of an unpickling module, each call that runs code or imports a module by name, and
    each `trust_remote_code=` that is not False or the user's own setting.
    """
    import ast

    with open(path) as file:
        tree = ast.parse(file.read())
    sites = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            sites |= {(relative_path, m) for m in modules if m.split(".")[0] in UNPICKLING_MODULES}
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.removeprefix("builtins.") in CODE_RUNNING_CALLS or name.split(".")[-1] in CODE_IMPORTING_METHODS:
                sites.add((relative_path, name))
            for keyword in node.keywords:
                value = keyword.value
                users_own = isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
                if keyword.arg == "trust_remote_code" and not users_own and ast.unparse(value) != "False":
                    sites.add((relative_path, f"trust_remote_code={ast.unparse(value)}"))
    return sites


def test_code_loading_sites_finds_every_form(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import pickle\nfrom importlib import import_module\nimport importlib.util\nfrom runpy import run_path\n"
        "torch.load(path)\nimport_module(name)\nimportlib.import_module(name)\nspec.loader.exec_module(module)\n"
        "eval(text)\nbuiltins.exec(text)\nload(path, trust_remote_code=True)\n"
        # Not code loading: the user's own setting, a regex, a module's eval mode, a look-up that imports nothing
        "load(path, trust_remote_code=args.trust_remote_code)\nre.compile(text)\nmodel.eval()\n"
        "importlib.util.find_spec(name)\n"
    )
    assert {what for _, what in code_loading_sites(str(source), "probe.py")} == {
        "pickle",
        "runpy",
        "torch.load",
        "import_module",
        "importlib.import_module",
        "spec.loader.exec_module",
        "eval",
        "builtins.exec",
        "trust_remote_code=True",
    }


def test_nothing_loads_remote_code_or_unpickles_user_data():
    root = os.path.dirname(HERE)
    sites = set()
    for base in ("trl_chord", "recipes", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(root, base)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    sites |= code_loading_sites(path, os.path.relpath(path, root))
    assert sites == ALLOWED_CODE_LOADING
    assert ChordConfig(output_dir="unused", report_to="none", bf16=False).trust_remote_code is False


def test_recipe_refuses_local_files_it_cannot_read_safely(tmp_path):
    from trl_chord.recipes.data_files import load_dataset_file_or_hub

    pickled = tmp_path / "data.pkl"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="must be a .json, .jsonl or .parquet file"):
        load_dataset_file_or_hub(str(pickled))
