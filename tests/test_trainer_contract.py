"""
The contract every CHORD trainer keeps, tested on each of them (tests/trainer_kinds.py): ChordTrainer against TRL's
GRPOTrainer (`grpo`), ChordRLOOTrainer against RLOOTrainer (`rloo`), ChordAsyncGRPOTrainer against AsyncGRPOTrainer
(`async`; skipped where TRL's AsyncGRPOTrainer does not import, on transformers 4). `mu = 0` is the TRL trainer bit
for bit; `mu = 1` is the SFT gradient, computed independently; a mixed step is the weighted sum of the two; a step
with `mu == 1` leaves the on-policy term out; a resumed run continues mu and the expert order.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers import (
    PLAIN_SGD,
    async_grpo_unavailable,
    expert_nll_gradient,
    logged,
    make_expert_dataset,
    make_expert_dataset_of_lengths,
    recording_draws,
    trained_update,
    weights,
)
from trainer_kinds import AsyncGRPOKind, GRPOKind, RLOOKind
from transformers import AutoModelForCausalLM

from trl_chord import chord_mu
from trl_chord.checkpoints import CHORD_STATE_NAME


ASYNC = pytest.param(
    AsyncGRPOKind(),
    id="async",
    marks=pytest.mark.skipif(async_grpo_unavailable() is not None, reason=str(async_grpo_unavailable())),
)
GENERATING = [pytest.param(GRPOKind(), id="grpo"), pytest.param(RLOOKind(), id="rloo")]


@pytest.fixture(params=[*GENERATING, ASYNC])
def kind(request, monkeypatch):
    request.param.prepare(monkeypatch)
    return request.param


# The trainers that generate their own rollouts: the adaptive schedule and the prompt-count check are theirs
@pytest.fixture(params=GENERATING)
def generating_kind(request):
    return request.param


@pytest.mark.parametrize("with_expert_dataset", [False, True])
def test_mu_zero_is_the_trl_trainer_bit_for_bit(kind, tiny_model_dir, tmp_path, with_expert_dataset):
    # Two optimizer steps (for `async`, step 2 trains on rollouts generated after the weight sync of step 1)
    baseline = kind.baseline(tiny_model_dir, tmp_path)
    baseline.train()
    expert = make_expert_dataset() if with_expert_dataset else None
    chord = kind.chord(tiny_model_dir, tmp_path, expert, chord_mu_peak=0.0, chord_mu_valley=0.0)
    chord.train()

    assert logged(chord, "loss") == logged(baseline, "loss")
    assert logged(chord, "reward") == logged(baseline, "reward")
    assert logged(chord, "chord/mu") == [0.0, 0.0]
    assert "chord/sft_loss" not in chord.state.log_history[0]
    assert f"chord/{kind.term}_loss" in chord.state.log_history[0]
    baseline_weights, chord_weights = weights(baseline), weights(chord)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(baseline_weights[name], initial[name]) for name in baseline_weights), "no training"
    for name, value in baseline_weights.items():
        assert torch.equal(value, chord_weights[name]), name
    if not kind.generates_rollouts:
        # The workers generated alike, the CHORD one with the trainer's weights, synced after each step
        assert kind.record_rollouts(chord) == kind.record_rollouts(baseline) == [1, 1, 2, 3]
        for name, value in chord.rollout_worker.model.named_parameters():
            assert torch.equal(value, chord_weights[name]), name


@pytest.mark.parametrize(
    "weighting, aggregation, head",
    [
        ("uniform", "token-mean", "auto"),
        ("phi", "token-mean", "auto"),
        ("is", "token-mean", "auto"),
        ("focal", "token-mean", "auto"),
        ("entropy", "token-mean", "auto"),
        ("phi", "seq-mean-token-mean", "auto"),
        ("uniform", "token-mean", "full_logits"),
        ("entropy", "seq-mean-token-sum", "trl_fused"),
    ],
)
def test_mu_one_sgd_step_follows_the_expert_gradient(kind, tiny_model_dir, tmp_path, weighting, aggregation, head):
    # Two accumulated micro-steps, each with two expert examples of very different lengths: the update is -lr times
    # the mean of the micro-batches' aggregated SFT gradients, computed from the model's plain forward on each example.
    # A term divided by the accumulation steps twice, or not at all (RLOOTrainer leaves the division to
    # Trainer.training_step), shows; the rollouts are tempered, the SFT term must not be; each head reads `async`'s
    # packed row, and the aggregation sees its sequences apart
    expert = make_expert_dataset_of_lengths([1, 9, 3, 14])
    options = dict(
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_token_weighting=weighting,
        chord_sft_loss_agg_mode=aggregation,
        chord_expert_head=head,
        chord_sft_per_device_train_batch_size=2,
        chord_sft_max_length=48,
        temperature=0.7,
    )
    trainer = kind.chord(tiny_model_dir, tmp_path, expert, **options, **kind.two_micro_steps, **PLAIN_SGD, max_steps=1)
    drawn = recording_draws(trainer)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    assert trainer.chord_expert_head.path == ("chunked" if head == "auto" else head)
    assert len(drawn) == 2 and sorted(sum(drawn, [])) == [0, 1, 2, 3]
    oracle = [
        expert_nll_gradient(tiny_model_dir, expert.select(indices), weighting, aggregation, 48) for indices in drawn
    ]
    assert set(oracle[0]) == set(after)
    for name in after:
        expected = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-4, atol=1e-7, msg=name)
    assert max(grads.abs().max().item() for grads in oracle[0].values()) > 1e-4
    assert logged(trainer, "chord/mu") == [1.0] and logged(trainer, f"chord/{kind.term}_skipped") == [1.0]
    expected_tokens = sum(len(str(i)) * length + 2 for i, length in enumerate([1, 9, 3, 14]))  # answer + <|im_end|>\n
    assert logged(trainer, "chord/expert_tokens") == [expected_tokens / 2]  # the mean over the two micro-steps


@pytest.mark.parametrize("backward_first", [True, False], ids=["backward-first", "joint-backward"])
def test_mixed_update_is_the_weighted_sum_of_the_trl_trainers_and_the_expert_terms(
    kind, tiny_model_dir, tmp_path, backward_first
):
    # One plain SGD step of 2 accumulated micro-steps: the TRL trainer's own update on the same rollouts (the same
    # seed: generation comes before any expert forward) times (1 - mu), plus mu times the update of the SFT gradient of
    # each micro-step's expert micro-batch, computed independently; in both backward modes
    mu, expert = 0.3, make_expert_dataset_of_lengths([1, 9, 3, 14])
    steps = dict(**kind.two_micro_steps, **PLAIN_SGD, max_steps=1)
    baseline = kind.baseline(tiny_model_dir, tmp_path, **steps)
    baseline_update = trained_update(baseline)

    options = dict(chord_token_weighting="phi", chord_sft_per_device_train_batch_size=2, chord_sft_max_length=48)
    options["chord_log_term_grad_norms"] = True
    trainer = kind.chord(tiny_model_dir, tmp_path, expert, chord_mu_peak=mu, chord_mu_valley=mu, **options, **steps)
    assert trainer.backward_expert_term_first  # the default on one process
    trainer.backward_expert_term_first = backward_first
    drawn = recording_draws(trainer)
    update = trained_update(trainer)

    oracle = [expert_nll_gradient(tiny_model_dir, expert.select(indices), "phi") for indices in drawn]
    assert len(drawn) == 2
    for name, value in update.items():
        sft_update = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        expected = (1 - mu) * baseline_update[name] + mu * sft_update
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=3e-7, msg=name)
    assert max(update.abs().max().item() for update in baseline_update.values()) > 1e-3
    # Both terms' logged losses: the on-policy one as the TRL trainer logs its own, and the loss is their mix
    entry, term = trainer.state.log_history[0], kind.term
    # (transformers 4 logs the TRL trainer's `loss` to 4 decimals; the chord/* metrics are not rounded)
    logged_to = 5e-5 if transformers.__version__.startswith("4.") else 1e-7
    assert entry[f"chord/{term}_loss"] == pytest.approx(baseline.state.log_history[0]["loss"], rel=1e-5, abs=logged_to)
    mixed = (1 - mu) * entry[f"chord/{term}_loss"] + mu * entry["chord/sft_loss"]
    assert entry["loss"] == pytest.approx(mixed, rel=1e-5, abs=5e-5)
    assert (f"chord/{term}_grad_norm" in entry) == backward_first
    assert {f"chord/{other}_loss" for other in ("grpo", "rloo") if other != term}.isdisjoint(entry)


def test_mu_one_steps_skip_the_on_policy_term(kind, tiny_model_dir, tmp_path, monkeypatch):
    _, trl_trainer_class = kind.trl_classes
    on_policy_forwards = []
    compute_loss = trl_trainer_class.compute_loss
    monkeypatch.setattr(
        trl_trainer_class,
        "compute_loss",
        lambda self, *a, **k: on_policy_forwards.append(self.state.global_step) or compute_loss(self, *a, **k),
    )
    # mu = 1 at step 1 (0-based: the warm-up to 1 ends there, the decay from 1 starts there), below 1 after
    schedule = dict(chord_mu_peak=1.0, chord_mu_valley=0.5, chord_mu_warmup_steps=1, chord_mu_decay_steps=3)
    expected_mu = [chord_mu(step, 1.0, 0.5, 1, 3) for step in range(5)]
    assert expected_mu[:3] == [0.0, 1.0, pytest.approx(0.875)]
    trainer = kind.chord(
        tiny_model_dir, tmp_path, make_expert_dataset(), **schedule, **kind.two_micro_steps, max_steps=5
    )
    rollouts = kind.record_rollouts(trainer)
    trainer.train()

    assert logged(trainer, "chord/mu") == pytest.approx(expected_mu)
    assert logged(trainer, f"chord/{kind.term}_skipped") == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert on_policy_forwards == [0, 0, 2, 2, 3, 3, 4, 4]  # one per micro-step, none at step 1
    step_logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    assert f"chord/{kind.term}_loss" not in step_logs[1] and "chord/sft_loss" in step_logs[1]
    if kind.generates_rollouts:
        # Generated at the first micro-step of every step but step 1 (steps_per_generation = gradient accumulation)
        assert rollouts == [0, 4, 6, 8]
        assert "reward" not in step_logs[1] and "reward" in step_logs[2]
    else:
        # The rollouts of the skipped step were still drawn (generation is the worker's): the worker kept pace
        assert rollouts == [1, 1, 2, 3, 4, 5, 6]


def test_resume_continues_mu_and_the_expert_order(kind, tiny_model_dir, tmp_path):
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
        trainer = kind.chord(tiny_model_dir, tmp_path / output, make_expert_dataset(7), **schedule)
        drawn = recording_draws(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, drawn

    full, full_drawn = run("full")
    checkpoint = Path(full.args.output_dir) / "checkpoint-2"
    draws_per_step = full.args.gradient_accumulation_steps  # one expert micro-batch of 2 per micro-step
    state = json.loads((checkpoint / CHORD_STATE_NAME).read_text())
    assert state == {"expert_sampler": {"examples_drawn": 2 * draws_per_step * 2}}
    resumed, resumed_drawn = run("resumed", resume=str(checkpoint))
    assert resumed_drawn == full_drawn[2 * draws_per_step :]
    # The resumed run restores the log history up to the checkpoint, then logs steps 3 and 4 itself
    expected_mu = [chord_mu(step, 0.9, 0.1, 0, 4) for step in range(4)]
    assert logged(resumed, "chord/mu") == logged(full, "chord/mu") == pytest.approx(expected_mu)
    if kind.resume_is_exact:
        assert logged(resumed, "chord/sft_loss") == logged(full, "chord/sft_loss")
        full_weights, resumed_weights = weights(full), weights(resumed)
        for name, value in full_weights.items():
            torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


def test_a_trl_config_is_refused_with_a_conversion_that_works(kind, tiny_model_dir, tmp_path):
    config_class, _ = kind.trl_classes
    trl_config = kind.config(config_class, tmp_path, gradient_accumulation_steps=2)
    chord_class = kind.chord_config_class
    with pytest.raises(TypeError, match=f"must be a `{chord_class.__name__}`") as refusal:
        kind.trainer_for(tiny_model_dir, trl_config, make_expert_dataset())
    # The conversion the message gives, run as written
    argument = {"grpo": "grpo_config", "rloo": "rloo_config", "async": "async_grpo_config"}[kind.id]
    assert f"{chord_class.__name__}.from_{argument}({argument}, chord_...=...)" in str(refusal.value)
    converted = getattr(chord_class, f"from_{argument}")(trl_config, chord_mu_valley=0.3)
    assert converted.chord_mu_valley == 0.3
    chord_options = {name for name in converted.to_dict() if name.startswith("chord_")}
    assert {k: v for k, v in converted.to_dict().items() if k not in chord_options} == trl_config.to_dict()
    kind.trainer_for(tiny_model_dir, converted, make_expert_dataset())


def test_adaptive_mu_follows_the_on_policy_reward(generating_kind, tiny_model_dir, tmp_path):
    options = dict(chord_mu_schedule="adaptive", chord_adaptive_mu_tau=0.75, max_steps=6)
    trainer = generating_kind.chord(tiny_model_dir, tmp_path, make_expert_dataset(), **options)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    assert len(logs) == 6
    for entry in logs:
        assert entry["chord/mu"] == pytest.approx(min(1.0, max(0.0, 0.75 - entry["reward"])))
        assert ("chord/sft_loss" in entry) == (entry["chord/mu"] > 0)
    assert len({entry["chord/mu"] for entry in logs}) > 1


@pytest.mark.parametrize("gradient_accumulation_steps, fills_a_step", [(4, True), (5, False)])
def test_too_few_rl_prompts_for_a_step_fail_before_training(
    generating_kind, tiny_model_dir, tmp_path, gradient_accumulation_steps, fills_a_step
):
    # 16 prompts; a step takes 8 completions x gradient_accumulation_steps, 2 per prompt: 16 prompts, then 20
    options = dict(per_device_train_batch_size=8, num_generations=2, max_steps=1)
    trainer = generating_kind.chord(
        tiny_model_dir,
        tmp_path,
        make_expert_dataset(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        **options,
    )
    # The oracle: TRL's own dataloader, which has batches exactly when the prompts fill a generation batch
    assert (len(trainer.get_train_dataloader()) > 0) == fills_a_step
    if fills_a_step:
        trainer.train()
        assert trainer.state.global_step == 1
    else:
        with pytest.raises(ValueError, match="The RL dataset has 16 prompts, but an optimizer step needs 20"):
            trainer.train()
        assert trainer.state.global_step == 0
