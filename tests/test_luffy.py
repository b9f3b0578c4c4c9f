"""LUFFY (arXiv 2504.14945) on GRPOTrainer: its maths, the mixed groups, the oracle of the paper's equations, the
k = 0 baseline, the vLLM seam, resume, CHORD's expert term alongside, and the bad inputs."""

import logging
import os
import sys

import pytest
import torch
from bounded_run import run_bounded
from datasets import Dataset
from helpers import PLAIN_SGD, logged, make_expert_dataset, trained_update, weights
from luffy_oracle import (
    EXPERT_WORDS,
    expert_first_reward,
    expert_token_ids,
    group_advantages,
    luffy_objective_loss,
    luffy_prompts,
    prompt_token_ids,
    recording,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from trl_chord import ChordLuffyConfig, ChordLuffyTrainer, LuffyConfig, LuffyTrainer
from trl_chord.luffy import (
    aggregate_luffy_loss,
    expert_slots,
    luffy_shaping,
    luffy_token_losses,
    splice_expert_completions,
)


LUFFY_ARGS = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    max_steps=1,
    logging_steps=1,
    report_to="none",
    bf16=False,
    seed=0,
    save_strategy="no",
)


def luffy_config(tmp_path, config_class=LuffyConfig, **overrides):
    return config_class(output_dir=str(tmp_path / "out"), **{**LUFFY_ARGS, **overrides})


def luffy_trainer(model_dir, args, train_dataset=None, reward_funcs=None, trainer_class=LuffyTrainer, **kwargs):
    return trainer_class(
        model=model_dir,
        reward_funcs=reward_funcs or expert_first_reward,
        args=args,
        train_dataset=luffy_prompts() if train_dataset is None else train_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# The maths


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_shaping_is_p_over_p_plus_gamma_and_its_gradient_goes_through_p(gamma):
    log_probs = torch.linspace(-8.0, -0.01, 9, dtype=torch.float64, requires_grad=True)
    shaping = luffy_shaping(log_probs, gamma)
    shaping.sum().backward()
    probs = log_probs.detach().exp()
    torch.testing.assert_close(shaping.detach(), probs / (probs + gamma))
    # d f(p) / d log p = p * f'(p) = gamma * p / (p + gamma)^2
    torch.testing.assert_close(log_probs.grad, gamma * probs / (probs + gamma) ** 2)


def test_expert_tokens_take_neither_old_log_probs_nor_the_sampling_correction():
    # Two completions of three tokens, the second an expert's. The expert's old log-probabilities (none exist: here
    # -inf, as if its tokens were impossible for the sampler) and its sampling-correction ratio (0) must not reach its
    # loss or gradient; the rollout's must (they are TRL's)
    generator = torch.Generator().manual_seed(0)
    log_probs = (-torch.rand(2, 3, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    old = log_probs.detach() - 0.3
    old[1] = -torch.inf
    sampling_ratio = torch.tensor([[1.5], [0.0]], dtype=torch.float64)
    advantages = torch.tensor([0.5, -0.7], dtype=torch.float64)
    off_policy = torch.tensor([[False], [True]])
    loss, ratio, _ = luffy_token_losses(
        log_probs, old, advantages, off_policy, 0.1, 0.2, 0.2, importance_sampling_ratio=sampling_ratio
    )
    loss.sum().backward()
    probs = log_probs.detach().exp()
    assert torch.isfinite(log_probs.grad).all()
    torch.testing.assert_close(loss[1].detach(), 0.7 * probs[1] / (probs[1] + 0.1))
    torch.testing.assert_close(log_probs.grad[1], 0.7 * 0.1 * probs[1] / (probs[1] + 0.1) ** 2)
    assert torch.equal(ratio[1], torch.ones(3, dtype=torch.float64))
    # The rollout: ratio exp(0.3) clipped at 1.2 for a positive advantage, times the sampling ratio 1.5
    torch.testing.assert_close(loss[0].detach(), torch.full((3,), -0.5 * 1.2 * 1.5, dtype=torch.float64))
    assert torch.equal(log_probs.grad[0], torch.zeros(3, dtype=torch.float64))  # clipped: no gradient


def test_the_authors_aggregation_is_the_token_sum_over_the_padded_width():
    per_token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # (1 + 2 + 4 + 5 + 6) / 16 over 2 accumulation steps: no division by the number of completions
    assert aggregate_luffy_loss(per_token_loss, mask, "luffy", 2, max_completion_length=16).item() == 18 / 16 / 2
    assert aggregate_luffy_loss(per_token_loss, mask, "dr_grpo", 2, max_completion_length=16).item() == 18 / 32 / 2
    with pytest.raises(ValueError, match="loss_type in"):
        aggregate_luffy_loss(per_token_loss, mask, "cispo", 1)


def test_expert_slots_are_the_last_k_of_each_group_numbered_across_processes():
    # Groups of 4 spread over 2 processes of 2 rows: the expert (k = 1) of each group is on process 1
    assert expert_slots(2, 0, 4, 1) == [-1, -1]
    assert expert_slots(2, 2, 4, 1) == [-1, 0]
    # k = 2 of groups of 4, 8 rows on one process: two groups
    assert expert_slots(8, 0, 4, 2) == [-1, -1, 0, 1, -1, -1, 0, 1]
    assert expert_slots(4, 0, 4, 0) == [-1] * 4


def test_splice_replaces_the_expert_rows_and_drops_their_sampling_log_probs():
    ids, logprobs = splice_expert_completions(
        [[1, 2], [3], [4, 5, 6]], [[-0.1, -0.2], [-0.3], None], [None, [7, 8], None]
    )
    assert ids == [[1, 2], [7, 8], [4, 5, 6]]
    assert logprobs == [[-0.1, -0.2], [None, None], None]
    assert splice_expert_completions([[1]], None, [[9]]) == ([[9]], None)


# --------------------------------------------------------------------------------------------------------------------
# The trainer against the paper's equations


def oracle_update(model_dir, rollouts, expert_of, group_size, gamma, max_completion_length, entropy_coef, lr):
    """-lr times the gradient of LUFFY's objective (luffy_oracle) on the recorded rollouts, one micro-batch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    advantages = group_advantages([rollout.reward for rollout in rollouts], group_size)
    rows = [
        (prompt_token_ids(tokenizer, r.prompt), r.completion_ids, advantage, r.completion_ids == expert_of(r.prompt))
        for r, advantage in zip(rollouts, advantages)
    ]
    loss, stats = luffy_objective_loss(model, rows, gamma, max_completion_length, entropy_coef)
    loss.backward()
    update = {name: -lr * param.grad for name, param in model.named_parameters()}
    return update, rows, stats


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("gamma", [0.05, 0.1, 1.0])
def test_luffy_update_is_the_papers_objective_on_the_mixed_groups(tiny_model_dir, tmp_path, gamma, k):
    # One plain-SGD step on two groups of 4 (4 - k rollouts, k expert completions each), with the authors' defaults:
    # the update must be -lr times the gradient of the paper's objective, written out in luffy_oracle, on the very
    # rollouts the trainer scored (its reward function records them); the metrics must be the oracle's
    rollouts = []
    args = luffy_config(tmp_path, luffy_gamma=gamma, luffy_num_expert_completions=k, **PLAIN_SGD)
    trainer = luffy_trainer(tiny_model_dir, args, reward_funcs=recording(expert_first_reward, rollouts))
    update = trained_update(trainer)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expert_texts = {str(row["prompt"]): row["expert_completion"] for row in luffy_prompts()}

    def expert_of(prompt):
        return expert_token_ids(tokenizer, prompt, expert_texts[str(prompt)], args.max_completion_length)

    expected, rows, stats = oracle_update(
        tiny_model_dir, rollouts, expert_of, 4, gamma, args.max_completion_length, 0.001, PLAIN_SGD["learning_rate"]
    )
    # The groups hold k expert completions each, the other rows are the policy's own
    assert len(rows) == 8 and [sum(row[3] for row in rows[g : g + 4]) for g in (0, 4)] == [k, k]
    assert all(rollout.reward == 1.0 for rollout, row in zip(rollouts, rows) if row[3])
    assert max(u.abs().max().item() for u in expected.values()) > 1e-4
    for name, value in expected.items():
        torch.testing.assert_close(update[name], value, rtol=1e-4, atol=1e-7, msg=name)

    expert_advantages = [row[2] for row in rows if row[3]]
    assert logged(trainer, "luffy/expert_reward") == [1.0]
    assert logged(trainer, "luffy/expert_advantage") == [
        pytest.approx(sum(expert_advantages) / len(expert_advantages))
    ]
    on_policy = [rollout.reward for rollout, row in zip(rollouts, rows) if not row[3]]
    assert logged(trainer, "luffy/on_policy_reward") == [pytest.approx(sum(on_policy) / len(on_policy))]
    assert logged(trainer, "luffy/shaping_weight_mean") == [pytest.approx(stats["shaping"], rel=1e-5)]
    assert logged(trainer, "luffy/expert_token_prob") == [pytest.approx(stats["prob"], rel=1e-5)]
    assert logged(trainer, "luffy/missing_expert_frac") == [0.0]


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "plain-text"])
def test_groups_hold_the_expert_tokens_decoded_as_written_and_their_reward(tiny_model_dir, tmp_path, conversational):
    # Two expert completions per prompt (k = 2 takes one each), one longer than max_completion_length
    long_answer = "so the answer is " + "9" * 30
    prompts = [[{"role": "user", "content": f"{i}+1="}] for i in range(4)] if conversational else ["0+1=", "1+1="]
    dataset = Dataset.from_dict(
        {
            "prompt": prompts,
            "expert_completion": [[f"{i} {EXPERT_WORDS} {i + 1}", long_answer] for i in range(len(prompts))],
        }
    )
    rollouts, texts = [], []

    def reward(completions, **kwargs):
        texts.extend(completions)
        return expert_first_reward(completions)

    args = luffy_config(tmp_path, per_device_train_batch_size=4, luffy_num_expert_completions=2, max_steps=2)
    trainer = luffy_trainer(tiny_model_dir, args, dataset, reward_funcs=recording(reward, rollouts))
    trainer.train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for group in range(2):
        rows = list(zip(rollouts, texts))[4 * group : 4 * group + 4]
        prompt = rows[0][0].prompt
        index = prompts.index(prompt)
        written = [f"{index} {EXPERT_WORDS} {index + 1}", long_answer]
        # The last two rows of the group: the expert's tokens, decoded to its text (cut to 16 tokens), and its reward
        for (rollout, text), completion in zip(rows[2:], written):
            assert rollout.completion_ids == expert_token_ids(tokenizer, prompt, completion, 16)
            decoded = text[0]["content"] if conversational else text
            assert decoded == completion[:16]
            assert rollout.reward == expert_first_reward([text])[0]
    # The long expert completion is cut in every group: half the expert completions
    assert logged(trainer, "luffy/expert_truncated_frac") == [0.5, 0.5]


def test_k_zero_is_grpo_trainer_bit_for_bit(tiny_model_dir, tmp_path):
    # LUFFY off on a GRPOConfig's own settings: the run is GRPOTrainer's, on the same data (its expert column unused)
    common = dict(LUFFY_ARGS, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2)
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), **common)
    grpo = GRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=expert_first_reward,
        args=grpo_args,
        train_dataset=luffy_prompts(),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    grpo.train()
    args = LuffyConfig.from_grpo_config(grpo_args, output_dir=str(tmp_path / "luffy"), luffy_num_expert_completions=0)
    assert (args.loss_type, args.scale_rewards, args.epsilon, args.entropy_coef) == ("dapo", "group", 0.2, 0.0)
    luffy = luffy_trainer(tiny_model_dir, args)
    luffy.train()
    assert logged(luffy, "loss") == logged(grpo, "loss") and len(logged(grpo, "loss")) == 2
    assert logged(luffy, "reward") == logged(grpo, "reward")
    assert not [key for key in luffy.state.log_history[0] if key.startswith("luffy/")]
    grpo_weights, luffy_weights = weights(grpo), weights(luffy)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(grpo_weights[name], initial[name]) for name in grpo_weights), "GRPO did not train"
    for name, value in grpo_weights.items():
        assert torch.equal(value, luffy_weights[name]), name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_without_expert_tokens_the_loss_is_grpo_trainers(tiny_model_dir, tmp_path, loss_type):
    # On a batch of rollouts alone, LUFFY's loss with every TRL option it keeps (a KL term with its correction,
    # an entropy bonus, two-sided clipping, old log-probabilities from an earlier policy, a sampling-correction ratio)
    # is GRPOTrainer's own, loss and gradient, bit for bit
    args = luffy_config(
        tmp_path,
        luffy_num_expert_completions=0,
        loss_type=loss_type,
        beta=0.1,
        entropy_coef=0.01,
        epsilon=0.1,
        epsilon_high=0.3,
        delta=1.5,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
    )
    trainer = luffy_trainer(tiny_model_dir, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # (set by the Trainer's training loop)
    batch = [row for row in luffy_prompts().select(range(2)) for _ in range(4)]
    inputs = trainer._generate_and_score_completions(batch)
    generator = torch.Generator().manual_seed(0)
    shape = inputs["completion_ids"].shape
    inputs["old_per_token_logps"] = -torch.rand(shape, generator=generator) * 6
    inputs["importance_sampling_ratio"] = torch.rand(shape[0], 1, generator=generator) + 0.5
    trainer.use_vllm = True  # so that both losses apply the sampling correction (nothing is generated from here)

    results = []
    for compute in (
        lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs),
        lambda: trainer._luffy_loss(trainer.model, inputs),
    ):
        trainer.model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (grpo_loss, grpo_grads), (luffy_loss, luffy_grads) = results
    assert torch.equal(luffy_loss, grpo_loss), (luffy_loss, grpo_loss)
    for name, grad in grpo_grads.items():
        assert torch.equal(luffy_grads[name], grad), name
    assert max(grad.abs().max().item() for grad in grpo_grads.values()) > 1e-4


def test_vllm_sampling_log_probs_and_correction_leave_the_expert_rows_alone(tiny_model_dir, tmp_path, monkeypatch):
    # GRPOTrainer's vLLM path after generation, with vLLM's one call replaced by what it returns (completions and
    # each sampled token's log-probability): the splice must leave the expert rows with no sampling log-probability
    # (NaN), a correction ratio of exactly 1 in every mode, and a loss in which neither can act
    def vllm_generation(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        completions = [[ord(str(i)) % 200 + 3, 11, self.eos_token_ids[0]] for i in range(len(prompt_ids))]
        return completions, [[-2.5, -0.1, -1.0] for _ in completions]

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", vllm_generation)
    batch = [row for row in luffy_prompts().select(range(2)) for _ in range(4)]
    for mode in ("sequence_mask", "token_truncate"):
        args = luffy_config(tmp_path, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5)
        trainer = luffy_trainer(tiny_model_dir, args)
        trainer.use_vllm = True  # the configuration cannot ask for vLLM where it is not installed
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # (set by the Trainer's training loop)
        inputs = trainer._generate_and_score_completions(batch)
        expert = inputs["luffy_off_policy"]
        assert expert.tolist() == [False, False, False, True] * 2
        mask = inputs["completion_mask"].bool()
        assert torch.isnan(inputs["sampling_per_token_logps"][expert][mask[expert]]).all()
        assert not torch.isnan(inputs["sampling_per_token_logps"][~expert][mask[~expert]]).any()
        ratio = inputs["importance_sampling_ratio"].expand_as(mask)
        assert torch.equal(ratio[expert][mask[expert]], torch.ones_like(ratio[expert][mask[expert]]))
        assert not torch.equal(ratio[~expert], torch.ones_like(ratio[~expert]))

        # Whatever the expert rows' ratio and old log-probabilities, their loss is the same; the rollouts' is not
        def gradients(change_rows):
            changed = dict(inputs)
            changed["importance_sampling_ratio"] = inputs["importance_sampling_ratio"].clone()
            changed["importance_sampling_ratio"][change_rows] = 0.25
            changed["old_per_token_logps"] = inputs["old_per_token_logps"].clone()
            changed["old_per_token_logps"][change_rows] -= 3.0
            trainer.model.zero_grad()
            trainer._luffy_loss(trainer.model, changed).backward()
            return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

        unchanged = gradients(torch.zeros_like(expert))
        assert torch.equal(gradients(expert), unchanged)
        assert not torch.allclose(gradients(~expert), unchanged)


# --------------------------------------------------------------------------------------------------------------------
# Training paths: resume, LoRA, CHORD's expert term alongside


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    options = dict(max_steps=4, save_steps=2, save_strategy="steps", learning_rate=1e-2, per_device_train_batch_size=4)

    def run(output, resume=None):
        trainer = luffy_trainer(tiny_model_dir, luffy_config(tmp_path / output, **options))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    resumed = run("resumed", resume=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert logged(resumed, "luffy/expert_reward") == logged(full, "luffy/expert_reward")
    assert logged(resumed, "loss") == logged(full, "loss") and len(logged(full, "loss")) == 4
    full_weights, resumed_weights = weights(full), weights(resumed)
    for name, value in full_weights.items():
        assert torch.equal(resumed_weights[name], value), name


def test_lora_trains_the_adapter_alone(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    args = luffy_config(tmp_path, max_steps=2, learning_rate=5e-2)
    trainer = luffy_trainer(
        tiny_model_dir, args, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    update = trained_update(trainer)
    changed = {name for name, value in update.items() if value.abs().max() > 0}
    assert changed and all("lora_" in name for name in changed)
    assert len(logged(trainer, "luffy/shaping_weight_mean")) == 2


def test_chord_luffy_mixes_the_luffy_and_sft_updates(tiny_model_dir, tmp_path):
    # Plain SGD, one step: mu = 0 is LuffyTrainer bit for bit; mu = 1 is the SFT update alone; mu = 0.5 is their mean
    # (both mu < 1 runs generate the same rollouts: the expert term draws nothing from the global RNG)
    def update(mu, trainer_class=ChordLuffyTrainer, config_class=ChordLuffyConfig):
        chord = {} if config_class is LuffyConfig else dict(chord_mu_peak=mu, chord_mu_valley=mu)
        args = luffy_config(tmp_path / f"{trainer_class.__name__}-{mu}", config_class, **PLAIN_SGD, **chord)
        expert = {} if trainer_class is LuffyTrainer else {"expert_dataset": make_expert_dataset(6)}
        trainer = luffy_trainer(tiny_model_dir, args, trainer_class=trainer_class, **expert)
        return trainer, trained_update(trainer)

    _, luffy = update(None, LuffyTrainer, LuffyConfig)
    _, mu_zero = update(0.0)
    sft_trainer, sft = update(1.0)
    mixed_trainer, mixed = update(0.5)
    for name in luffy:
        assert torch.equal(mu_zero[name], luffy[name]), name
        torch.testing.assert_close(mixed[name], 0.5 * luffy[name] + 0.5 * sft[name], rtol=1e-4, atol=1e-7)
    assert logged(sft_trainer, "chord/grpo_skipped") == [1.0]
    assert len(logged(mixed_trainer, "chord/sft_loss")) == 1 and len(logged(mixed_trainer, "luffy/expert_reward")) == 1


# --------------------------------------------------------------------------------------------------------------------
# Prompts without an expert completion, and bad inputs


def test_prompts_without_an_expert_completion_are_counted_and_trained_on_rollouts(tiny_model_dir, tmp_path, caplog):
    answer = [{"role": "assistant", "content": "0 plus one is 1"}]
    blank = [{"role": "assistant", "content": " "}]
    dataset = (
        luffy_prompts(4).remove_columns("expert_completion").add_column("expert_completion", [answer, None, [], blank])
    )
    rollouts = []
    with caplog.at_level(logging.WARNING):
        trainer = luffy_trainer(
            tiny_model_dir,
            luffy_config(tmp_path, per_device_train_batch_size=16),
            dataset,
            reward_funcs=recording(expert_first_reward, rollouts),
        )
    assert "3 of 4 RL prompts have no expert completion in 'expert_completion'" in caplog.text
    trainer.train()
    assert logged(trainer, "luffy/missing_expert_frac") == [0.75]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expert_ids = expert_token_ids(tokenizer, dataset[0]["prompt"], "0 plus one is 1", 16)
    assert sum(rollout.completion_ids == expert_ids for rollout in rollouts) == 1  # the one prompt with an expert


@pytest.mark.parametrize(
    "column, message",
    [
        ([None] * 10, "No row of the RL dataset has an expert completion"),
        ([7] * 10, "must be an expert completion"),
        ([[{"content": "x"}]] * 10, "must be a string or a list of messages"),
    ],
)
def test_bad_expert_columns(tiny_model_dir, tmp_path, column, message):
    dataset = luffy_prompts().remove_columns("expert_completion").add_column("expert_completion", column)
    with pytest.raises(ValueError, match=message):
        luffy_trainer(tiny_model_dir, luffy_config(tmp_path), dataset)


def test_a_missing_expert_column_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'answer' .* its columns are \['prompt', 'expert_completion'\]"):
        luffy_trainer(tiny_model_dir, luffy_config(tmp_path, luffy_expert_column="answer"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"luffy_num_expert_completions": 4}, r"must be in \[0, num_generations\)"),
        ({"luffy_num_expert_completions": -1}, r"must be in \[0, num_generations\)"),
        ({"luffy_gamma": 0.0}, "must be > 0"),
        ({"loss_type": "cispo"}, "loss_type"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='token'"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=1.0"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold=None"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy=False"),
        ({"loss_type": "luffy", "max_completion_length": None}, "max_completion_length"),
    ],
)
def test_bad_luffy_options(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        luffy_config(tmp_path, **overrides)


def test_unused_luffy_options_are_not_checked_with_luffy_off(tmp_path):
    # k = 0 with one of TRL's loss types is GRPOTrainer: its options are its own
    args = luffy_config(tmp_path, luffy_num_expert_completions=0, loss_type="cispo", importance_sampling_level="token")
    assert args.loss_type == "cispo"


def test_chord_luffy_config_from_a_grpo_config_keeps_its_values(tmp_path):
    grpo_args = GRPOConfig(
        output_dir=str(tmp_path), learning_rate=3e-6, num_generations=4, loss_type="grpo", bf16=False, use_cpu=True
    )
    args = ChordLuffyConfig.from_grpo_config(grpo_args, chord_mu_valley=0.2, luffy_gamma=0.3)
    assert (args.learning_rate, args.num_generations, args.loss_type, args.scale_rewards) == (3e-6, 4, "grpo", "group")
    assert (args.chord_mu_valley, args.luffy_gamma, args.luffy_num_expert_completions) == (0.2, 0.3, 1)


def test_chord_luffy_refuses_the_adaptive_mu(tmp_path):
    with pytest.raises(ValueError, match="include its expert completions"):
        luffy_config(tmp_path, ChordLuffyConfig, chord_mu_schedule="adaptive")


def test_luffy_trainer_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(TypeError, match="takes no `expert_dataset`"):
        luffy_trainer(tiny_model_dir, luffy_config(tmp_path), expert_dataset=make_expert_dataset())
    with pytest.raises(TypeError, match=r"LuffyConfig.from_grpo_config"):
        luffy_trainer(tiny_model_dir, GRPOConfig(output_dir=str(tmp_path / "grpo"), **LUFFY_ARGS))

    with pytest.raises(ValueError, match="tool calls, environments or a `rollout_func`"):
        luffy_trainer(tiny_model_dir, luffy_config(tmp_path), rollout_func=lambda prompts, trainer: {})


def test_the_recipe_picks_the_luffy_trainers_and_the_demo_refuses_them(tmp_path):
    from trl_chord.recipes.chord import main, parse_args, trainer_classes

    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    assert trainer_classes("luffy") == (LuffyConfig, LuffyTrainer)
    assert trainer_classes("chord_luffy") == (ChordLuffyConfig, ChordLuffyTrainer)
    options = ["--trainer", "chord_luffy", "--luffy_gamma", "0.2", "--chord_mu_valley", "0"]
    script, args, model = parse_args([*cpu, *options])
    assert type(args) is ChordLuffyConfig and (args.luffy_gamma, args.chord_mu_valley) == (0.2, 0.0)
    with pytest.raises(ValueError, match="The built-in demo is CHORD's"):
        main(script, args, model)


def test_the_recipe_takes_the_shipped_luffy_config_with_the_authors_settings():
    from trl_chord.recipes.chord import parse_args

    script, args, _ = parse_args(["--config", "math_luffy", "--use_cpu", "true", "--bf16", "false"])
    assert script.trainer == "luffy" and isinstance(args, LuffyConfig)
    settings = (args.loss_type, args.scale_rewards, args.epsilon, args.entropy_coef, args.beta, args.luffy_gamma)
    assert settings == ("luffy", "none", float("inf"), 0.001, 0.0, 0.1)
    assert args.luffy_num_expert_completions == 1 and args.num_generations == 8
    defaults = LuffyConfig(output_dir="x", use_cpu=True, bf16=False)
    assert (defaults.loss_type, defaults.scale_rewards, defaults.epsilon, defaults.entropy_coef) == settings[:4]


# --------------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 3], ids=["ddp", "zero3"])
def test_two_processes_train_the_papers_objective_on_a_group_that_spans_them(tiny_model_dir, tmp_path, zero_stage):
    # One group of 4 per step, 2 rows on each process: its expert completion is on process 1, so process 0's
    # advantages need it in the group mean across processes. The update (plain SGD, 2 accumulated micro-steps on each
    # process) must be -lr times the mean over processes of the summed gradients of the paper's objective on each
    # micro-batch, with advantages over the whole group: computed here from the rows each process scored
    script = os.path.join(os.path.dirname(__file__), "scripts", "luffy_multiprocess.py")
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", script]
    command += ["--model", tiny_model_dir, "--output", str(tmp_path)]
    if zero_stage is not None:
        command += ["--zero-stage", str(zero_stage)]
    completed = run_bounded(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [rank["num_processes"] for rank in ranks] == [2, 2]
    if zero_stage is None:  # (under ZeRO-3 the weights are gathered on process 0 only)
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] is not None

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rollouts = [row for rank in ranks for row in rank["rollouts"]]  # TRL's order: process 0's rows, then 1's
    prompt = rollouts[0][0]
    assert len(rollouts) == 4 and all(row[0] == prompt for row in rollouts)
    expert_text = luffy_prompts()[int(prompt[0]["content"][0])]["expert_completion"]
    expert_ids = expert_token_ids(tokenizer, prompt, expert_text, 16)
    assert [row[1] == expert_ids for row in rollouts] == [False, False, False, True]
    assert rollouts[3][2] == 1.0 and len({row[2] for row in rollouts}) > 1

    rewards = [row[2] for row in rollouts]
    advantages = dict(zip([tuple(row[1]) for row in rollouts], group_advantages(rewards, 4), strict=True))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss = 0.0
    for rank in ranks:
        assert len(rank["micro_batches"]) == 2
        for batch in rank["micro_batches"]:
            rows = []
            for row in range(batch["completion_ids"].size(0)):
                prompt_ids = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
                completion_ids = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
                advantage = advantages[tuple(completion_ids)]
                # The trainer's advantage for the row is the oracle's: the group mean took in the other process's rows
                assert batch["advantages"][row].item() == pytest.approx(advantage, abs=1e-6)
                assert batch["luffy_off_policy"][row].item() == (completion_ids == expert_ids)
                rows.append((prompt_ids, completion_ids, advantage, completion_ids == expert_ids))
            micro_loss, _ = luffy_objective_loss(model, rows, 0.1, 16, 0.001)
            loss = loss + micro_loss / 2 / 2  # over the 2 accumulation steps, then the mean over the 2 processes
    loss.backward()
    trained = torch.load(tmp_path / "weights.pt")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    checked = 0
    for name, param in model.named_parameters():
        if name not in trained:  # the tied output embedding is saved once
            continue
        expected = -PLAIN_SGD["learning_rate"] * param.grad
        torch.testing.assert_close(trained[name] - initial[name], expected, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked > 10 and max(param.grad.abs().max().item() for param in model.parameters()) > 1e-4
    assert ranks[0]["logs"]["luffy/expert_reward"] == ranks[1]["logs"]["luffy/expert_reward"] == 1.0


def test_the_readmes_luffy_example_runs(tmp_path, monkeypatch):
    # The README's LUFFY example as a user pastes it (2 steps instead of 10), in an empty folder
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme.split("## LUFFY: expert completions inside GRPO's groups")[1]
    example = section.split("```python")[1].split("```")[0]
    assert "max_steps=10" in example
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example.replace("max_steps=10", "max_steps=2"), "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert set(logged(namespace["trainer"], "luffy/expert_reward")) == {1.0}  # every expert answer is right
