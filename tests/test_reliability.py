"""Reliability: kills and exact resume, coverage of the expert set, numerics, bad input, long runs, security."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.checkpoints import CHORD_STATE_NAME, TRAINER_STATE_NAME, complete_checkpoints
from trl_chord.expert_data import ExpertSampler


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
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
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
        "prompt longer than the max length",
        {"prompt": "x" * 300, "completion": "2"},
        "1 with completion truncated away",
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
