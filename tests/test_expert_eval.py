"""
Held-out evaluation of the expert term (`eval_expert_dataset`, `eval_chord/...`): the metrics against an oracle from
the model's own logits on every CHORD trainer, and a run that evaluates against one that does not (same experts drawn,
same weights). Two processes: tests/test_distributed.py.
"""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    COMMON_ARGS,
    async_grpo_unavailable,
    held_out_oracle,
    held_out_sources,
    logged,
    make_expert_dataset,
    make_expert_dataset_of_lengths,
    make_rl_prompts,
    recording_draws,
    weights,
)
from luffy_oracle import luffy_prompts
from trainer_kinds import AsyncGRPOKind, GRPOKind, RLOOKind
from transformers import AutoTokenizer

from trl_chord import ChordLuffyConfig, ChordLuffyTrainer
from trl_chord.expert_eval import evaluation_batches, preserved_random_state


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with heavy attention dropout: an evaluation in train mode would not see the oracle's logits."""
    path = tmp_path_factory.mktemp("dropout-model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return str(path)


class LuffyKind(GRPOKind):
    """`ChordLuffyTrainer` on prompts that carry their expert completions."""

    id = "luffy"

    def chord(self, model_dir, tmp_path, expert_dataset=None, trainer_kwargs=None, **options):
        args = ChordLuffyConfig(output_dir=str(tmp_path / "out"), **{**COMMON_ARGS, **options})
        return ChordLuffyTrainer(
            model=model_dir,
            reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
            args=args,
            train_dataset=luffy_prompts(),
            expert_dataset=expert_dataset,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            **(trainer_kwargs or {}),
        )


KINDS = [
    pytest.param(GRPOKind(), id="grpo"),
    pytest.param(RLOOKind(), id="rloo"),
    pytest.param(
        AsyncGRPOKind(),
        id="async",
        marks=pytest.mark.skipif(async_grpo_unavailable() is not None, reason=str(async_grpo_unavailable())),
    ),
    pytest.param(LuffyKind(), id="luffy"),
]


@pytest.mark.parametrize("num_examples, batch_size, num_replicas", [(8, 3, 1), (5, 2, 2), (7, 3, 2), (1, 4, 2)])
def test_evaluation_batches_count_every_row_once_in_as_many_forwards_per_process(
    num_examples, batch_size, num_replicas
):
    per_process = [evaluation_batches(num_examples, batch_size, num_replicas, rank) for rank in range(num_replicas)]
    assert len({len(batches) for batches in per_process}) == 1
    counted = [index for batches in per_process for batch in batches if batch.counted for index in batch.indices]
    assert sorted(counted) == list(range(num_examples))
    assert all(0 < len(batch.indices) <= batch_size for batches in per_process for batch in batches)


def test_preserved_random_state_puts_back_python_numpy_and_torch():
    before = (random.random(), np.random.rand(), torch.rand(()).item())
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with preserved_random_state(torch.device("cpu")):
        random.random(), np.random.rand(), torch.rand(())
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    with preserved_random_state(torch.device("cpu")):
        random.random(), np.random.rand(), torch.rand(())
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected != before


@pytest.mark.parametrize("kind", KINDS)
def test_held_out_metrics_are_the_oracles_of_the_models_logits(kind, dropout_model_dir, tmp_path, monkeypatch):
    kind.prepare(monkeypatch)
    trainer = kind.chord(
        dropout_model_dir,
        tmp_path,
        make_expert_dataset(),
        trainer_kwargs={"eval_expert_dataset": held_out_sources()},
        chord_mu_peak=0.3,
        chord_mu_valley=0.3,
        chord_token_weighting="phi",
        chord_sft_per_device_train_batch_size=16,  # one micro-batch: the oracle's effective mu
    )
    trainer.model.train()  # as in training: the evaluation must switch dropout off itself
    draws, rng = recording_draws(trainer), torch.get_rng_state()
    metrics = trainer.evaluate()
    oracle = held_out_oracle(dropout_model_dir, held_out_sources(), mu=0.3)
    assert set(oracle) <= set(metrics)
    assert {name: metrics[name] for name in oracle} == pytest.approx(oracle, rel=1e-5, abs=1e-7)
    assert trainer.model.training is False  # as the Trainer's evaluation leaves it; training sets it back
    assert draws == [] and torch.equal(torch.get_rng_state(), rng)


def test_a_run_that_evaluates_draws_the_same_experts_and_ends_with_the_same_weights(dropout_model_dir, tmp_path):
    runs = {}
    for evaluates in (False, True):
        options = dict(eval_strategy="steps", eval_steps=1) if evaluates else {}
        trainer = GRPOKind().chord(
            dropout_model_dir,
            tmp_path / str(evaluates),
            make_expert_dataset(),
            trainer_kwargs={"eval_expert_dataset": make_expert_dataset(4)} if evaluates else None,
            chord_mu_peak=0.5,
            chord_mu_valley=0.5,
            **options,
        )
        draws = recording_draws(trainer)
        trainer.train()
        runs[evaluates] = draws, weights(trainer), logged(trainer, "eval_chord/expert_nll")
    assert runs[True][0] == runs[False][0] != []
    assert all(torch.equal(runs[True][1][name], runs[False][1][name]) for name in runs[False][1])
    # Evaluated after each of the two steps, the policy's held-out NLL moving with its weights
    assert len(runs[True][2]) == 2 and runs[True][2][0] != runs[True][2][1] and runs[False][2] == []


def test_evaluate_with_an_eval_dataset_reports_the_trainers_metrics_and_the_held_out_ones(tiny_model_dir, tmp_path):
    trainer = GRPOKind().chord(
        tiny_model_dir,
        tmp_path,
        make_expert_dataset(),
        trainer_kwargs={"eval_dataset": make_rl_prompts(4), "eval_expert_dataset": make_expert_dataset(3)},
        per_device_eval_batch_size=4,
    )
    metrics = trainer.evaluate()
    assert "eval_reward" in metrics and metrics["eval_chord/expert_tokens"] > 0
    assert "eval_chord/expert_nll" in trainer.state.log_history[-1]
