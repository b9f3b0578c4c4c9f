"""ChordRLOOTrainer: CHORD's expert term on TRL's RLOOTrainer, against RLOOTrainer itself and an independent SFT
gradient."""

import json

import pytest
import torch
from helpers import (
    PLAIN_SGD,
    RLOO_ARGS,
    chord_rloo_config,
    expert_nll_gradient,
    logged,
    make_expert_dataset,
    make_expert_dataset_of_lengths,
    make_rl_prompts,
    make_trainer,
    odd_char_reward,
    recording_draws,
    trained_update,
    weights,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import RLOOConfig, RLOOTrainer

from trl_chord import ChordRLOOConfig, chord_mu
from trl_chord.checkpoints import CHORD_STATE_NAME


def rloo_trainer(model_dir, tmp_path, **overrides) -> RLOOTrainer:
    """TRL's own RLOOTrainer on the data and settings of the CHORD runs below."""
    return RLOOTrainer(
        model=model_dir,
        reward_funcs=odd_char_reward,
        args=RLOOConfig(output_dir=str(tmp_path / "rloo"), **{**RLOO_ARGS, **overrides}),
        train_dataset=make_rl_prompts(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


@pytest.mark.parametrize("with_expert_dataset", [False, True])
def test_mu_zero_is_bit_identical_to_rloo(tiny_model_dir, tmp_path, with_expert_dataset):
    rloo = rloo_trainer(tiny_model_dir, tmp_path)
    rloo.train()
    args = chord_rloo_config(tmp_path, chord_mu_peak=0.0, chord_mu_valley=0.0)
    chord = make_trainer(tiny_model_dir, args, make_expert_dataset() if with_expert_dataset else None)
    chord.train()

    assert logged(chord, "loss") == logged(rloo, "loss")
    assert logged(chord, "reward") == logged(rloo, "reward")
    assert logged(chord, "chord/mu") == [0.0, 0.0]
    assert "chord/sft_loss" not in chord.state.log_history[0] and "chord/rloo_loss" in chord.state.log_history[0]
    rloo_weights, chord_weights = weights(rloo), weights(chord)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(rloo_weights[name], initial[name]) for name in rloo_weights), "RLOO did not train"
    for name, value in rloo_weights.items():
        assert torch.equal(value, chord_weights[name]), name


@pytest.mark.parametrize("weighting", ["uniform", "phi"])
def test_mu_one_sgd_step_follows_the_expert_gradient(tiny_model_dir, tmp_path, weighting):
    # Two accumulated micro-batches of two examples of different lengths: RLOOTrainer leaves the division by the
    # accumulation steps to Trainer.training_step, so a term divided twice (or not at all) shows here
    expert = make_expert_dataset_of_lengths([1, 9, 3, 14])
    args = chord_rloo_config(
        tmp_path,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_token_weighting=weighting,
        chord_sft_per_device_train_batch_size=2,
        chord_sft_max_length=48,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        temperature=0.7,  # rollouts are tempered, the SFT term must not be
        **PLAIN_SGD,
        max_steps=1,
    )
    trainer = make_trainer(tiny_model_dir, args, expert)
    drawn = recording_draws(trainer)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    assert len(drawn) == 2 and sorted(sum(drawn, [])) == [0, 1, 2, 3]
    oracle = [expert_nll_gradient(tiny_model_dir, expert.select(indices), weighting) for indices in drawn]
    for name in after:
        expected = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-4, atol=1e-7, msg=name)
    assert max(grads.abs().max().item() for grads in oracle[0].values()) > 1e-4
    assert logged(trainer, "chord/mu") == [1.0] and logged(trainer, "chord/rloo_skipped") == [1.0]


@pytest.mark.parametrize("backward_first", [True, False], ids=["backward-first", "joint-backward"])
def test_mixed_update_is_the_weighted_sum_of_rloos_and_the_expert_terms(tiny_model_dir, tmp_path, backward_first):
    # One plain SGD step of 2 accumulated micro-steps: RLOOTrainer's own update on the same rollouts (the same seed:
    # generation comes before any expert forward) times (1 - mu), plus mu times the update of the SFT gradient of each
    # micro-step's expert micro-batch, computed independently
    mu, expert = 0.3, make_expert_dataset_of_lengths([1, 9, 3, 14])
    steps = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2, **PLAIN_SGD, max_steps=1)
    rloo = rloo_trainer(tiny_model_dir, tmp_path, **steps)
    rloo_update = trained_update(rloo)

    args = chord_rloo_config(
        tmp_path,
        chord_mu_peak=mu,
        chord_mu_valley=mu,
        chord_token_weighting="phi",
        chord_sft_per_device_train_batch_size=2,
        chord_sft_max_length=48,
        **steps,
    )
    trainer = make_trainer(tiny_model_dir, args, expert)
    assert trainer.backward_expert_term_first  # the default on one process
    trainer.backward_expert_term_first = backward_first
    drawn = recording_draws(trainer)
    update = trained_update(trainer)

    oracle = [expert_nll_gradient(tiny_model_dir, expert.select(indices), "phi") for indices in drawn]
    assert len(drawn) == 2
    for name, value in update.items():
        sft_update = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        expected = (1 - mu) * rloo_update[name] + mu * sft_update
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=3e-7, msg=name)
    assert max(update.abs().max().item() for update in rloo_update.values()) > 1e-3
    # Both terms' logged losses: RLOO's as RLOOTrainer logs its own, and the loss is their mix
    entry = trainer.state.log_history[0]
    assert entry["chord/rloo_loss"] == pytest.approx(rloo.state.log_history[0]["loss"], rel=1e-5, abs=1e-7)
    mixed = (1 - mu) * entry["chord/rloo_loss"] + mu * entry["chord/sft_loss"]
    assert entry["loss"] == pytest.approx(mixed, rel=1e-5, abs=5e-5)
    assert ("chord/rloo_grad_norm" in entry) == backward_first and "chord/grpo_loss" not in entry


def test_resume_continues_mu_and_expert_order(tiny_model_dir, tmp_path):
    schedule = dict(
        chord_mu_peak=0.9,
        chord_mu_valley=0.1,
        chord_mu_decay_steps=4,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        chord_sft_per_device_train_batch_size=2,
    )

    def run(output, resume=None):
        args = chord_rloo_config(tmp_path / output, **schedule)
        trainer = make_trainer(tiny_model_dir, args, make_expert_dataset(7))
        drawn = recording_draws(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, drawn

    full, full_drawn = run("full")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert json.loads((checkpoint / CHORD_STATE_NAME).read_text()) == {"expert_sampler": {"examples_drawn": 4}}
    resumed, resumed_drawn = run("resumed", resume=str(checkpoint))
    assert resumed_drawn == full_drawn[2:]
    assert (
        logged(resumed, "chord/mu")
        == logged(full, "chord/mu")
        == pytest.approx([chord_mu(step, 0.9, 0.1, 0, 4) for step in range(4)])
    )
    assert logged(resumed, "chord/sft_loss") == logged(full, "chord/sft_loss")
    full_weights, resumed_weights = weights(full), weights(resumed)
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


def test_mu_one_steps_skip_generation_and_the_rloo_forward(tiny_model_dir, tmp_path, monkeypatch):
    rloo_forwards = []
    rloo_compute_loss = RLOOTrainer.compute_loss
    monkeypatch.setattr(
        RLOOTrainer,
        "compute_loss",
        lambda self, *a, **k: rloo_forwards.append(self._step) or rloo_compute_loss(self, *a, **k),
    )
    # mu = 1 on step 1 (0-based; warm-up to 1 ends there), below 1 after
    schedule = dict(chord_mu_peak=1.0, chord_mu_valley=0.5, chord_mu_warmup_steps=1, chord_mu_decay_steps=3)
    expected_mu = [chord_mu(step, 1.0, 0.5, 1, 3) for step in range(4)]
    args = chord_rloo_config(
        tmp_path, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2, **schedule
    )
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    generations = []
    generate = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: generations.append(trainer._step) or generate(inputs)
    trainer.train()

    assert logged(trainer, "chord/mu") == pytest.approx(expected_mu)
    assert logged(trainer, "chord/rloo_skipped") == [0.0, 1.0, 0.0, 0.0]
    assert generations == [0, 4, 6]
    assert rloo_forwards == [0, 1, 4, 5, 6, 7]
    step_logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    assert "reward" not in step_logs[1] and "chord/rloo_loss" not in step_logs[1]
    assert "chord/sft_loss" in step_logs[1] and "reward" in step_logs[2]


def test_rloo_config_is_refused_with_a_conversion_that_works(tiny_model_dir, tmp_path):
    rloo_config = RLOOConfig(output_dir=str(tmp_path), **{**RLOO_ARGS, "gradient_accumulation_steps": 2})
    with pytest.raises(TypeError, match="must be a `ChordRLOOConfig`") as refusal:
        make_trainer(tiny_model_dir, rloo_config, make_expert_dataset())
    assert "ChordRLOOConfig.from_rloo_config(rloo_config, chord_...=...)" in str(refusal.value)
    converted = ChordRLOOConfig.from_rloo_config(rloo_config, chord_mu_valley=0.3)
    assert converted.chord_mu_valley == 0.3
    chord_options = {name for name in converted.to_dict() if name.startswith("chord_")}
    assert {k: v for k, v in converted.to_dict().items() if k not in chord_options} == rloo_config.to_dict()
    make_trainer(tiny_model_dir, converted, make_expert_dataset())


def test_adaptive_mu_follows_the_on_policy_reward(tiny_model_dir, tmp_path):
    args = chord_rloo_config(tmp_path, chord_mu_schedule="adaptive", chord_adaptive_mu_tau=0.75, max_steps=3)
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["chord/mu"] == pytest.approx(min(1.0, max(0.0, 0.75 - entry["reward"])))
        assert ("chord/sft_loss" in entry) == (entry["chord/mu"] > 0)


def test_too_few_rl_prompts_for_a_step_fail_before_training(tiny_model_dir, tmp_path):
    # 16 prompts; a step of 8 completions x 5 accumulation steps, 2 per prompt, needs 20. The oracle: TRL's own
    # dataloader (RLOOTrainer draws generation batches as GRPOTrainer does), which has no batch then
    args = chord_rloo_config(
        tmp_path, per_device_train_batch_size=8, num_generations=2, gradient_accumulation_steps=5, max_steps=1
    )
    trainer = make_trainer(tiny_model_dir, args, expert_dataset=make_expert_dataset())
    assert len(trainer.get_train_dataloader()) == 0
    with pytest.raises(ValueError, match="The RL dataset has 16 prompts, but an optimizer step needs 20"):
        trainer.train()
