"""
The expert term's behaviour, tested once through ChordTrainer (ChordMixin's code, shared by every CHORD trainer): the
schedule, the metrics against an oracle, each aggregation and weighting, both backward modes, LoRA, bad input, several
expert sources, the weak-term warning. What every CHORD trainer keeps against its TRL trainer is
tests/test_trainer_contract.py.
"""

import json
import logging
import os
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import (
    PLAIN_SGD,
    chord_config,
    completion_logits,
    expert_nll_gradient,
    logged,
    make_expert_dataset,
    make_expert_dataset_of_lengths,
    make_trainer,
    odd_char_reward,
    oracle_weights,
    recording_draws,
    trained_update,
    weights,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_chord import ChordConfig, ChordTrainer, chord_mu
from trl_chord.checkpoints import CHORD_STATE_NAME


def test_expert_dataset_with_mu_always_zero_warns(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(
            tiny_model_dir, chord_config(tmp_path, chord_mu_peak=0.0, chord_mu_valley=0.0), make_expert_dataset()
        )
    assert "mu is 0 at every step" in caplog.text
    assert trainer.expert_dataset is None


# The logged mu follows the schedule step by step
def test_logged_mu_follows_the_schedule(tiny_model_dir, tmp_path):
    schedule = dict(chord_mu_peak=0.8, chord_mu_valley=0.2, chord_mu_warmup_steps=2, chord_mu_decay_steps=3)
    args = chord_config(tmp_path, max_steps=7, **schedule)
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    trainer.train()
    expected = [chord_mu(step, 0.8, 0.2, 2, 3) for step in range(7)]
    assert logged(trainer, "chord/mu") == pytest.approx(expected)
    assert expected[0] == 0.0 and expected[2] == pytest.approx(0.8) and expected[-1] == 0.2
    # Step 0 has mu = 0: no expert forward pass, so no SFT metrics on that step
    sft_steps = [entry["step"] for entry in trainer.state.log_history if "chord/sft_loss" in entry]
    assert sft_steps == [2, 3, 4, 5, 6, 7]
    assert trainer.expert_sampler.examples_drawn == 6 * args.chord_sft_per_device_train_batch_size


def test_adaptive_mu_needs_an_expert_dataset(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no `expert_dataset` was given"):
        make_trainer(tiny_model_dir, chord_config(tmp_path, chord_mu_schedule="adaptive"))


def test_metrics_are_logged(tiny_model_dir, tmp_path):
    args = chord_config(tmp_path, chord_mu_valley=0.3, chord_log_term_grad_norms=True)
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    trainer.train()
    entry = trainer.state.log_history[0]
    for key in (
        "chord/mu",
        "chord/sft_loss",
        "chord/grpo_loss",
        "chord/expert_token_prob",
        "chord/token_weight_mean",
        "chord/expert_prob_below_0.1",
        "chord/expert_prob_above_0.9",
        "chord/effective_mu",
        "chord/expert_grad_norm",
        "chord/grpo_grad_norm",
        "chord/expert_tokens",
        "chord/expert_nll",
    ):
        assert key in entry, key
    assert 0 < entry["chord/expert_token_prob"] < 1 and 0 < entry["chord/token_weight_mean"] <= 0.25
    # loss = (1 - mu) * grpo + mu * sft, with no gradient accumulation (transformers 4 logs `loss` to 4 decimals)
    mixed = 0.7 * entry["chord/grpo_loss"] + 0.3 * entry["chord/sft_loss"]
    assert entry["loss"] == pytest.approx(mixed, rel=1e-5, abs=5e-5)


def _token_scales(lengths: list[int], aggregation: str, norm_length: int) -> torch.Tensor:
    """Each expert token's factor in the aggregation, written out per mode, for examples of these lengths."""
    num_tokens, num_sequences = sum(lengths), len(lengths)
    per_example = {
        "token-mean": [1 / num_tokens] * num_sequences,
        "seq-mean-token-mean": [1 / (num_sequences * length) for length in lengths],
        "seq-mean-token-sum": [1 / num_sequences] * num_sequences,
        "seq-mean-token-sum-norm": [1 / (num_sequences * norm_length)] * num_sequences,
    }[aggregation]
    return torch.cat([torch.full((length,), factor) for factor, length in zip(per_example, lengths)])


@pytest.mark.parametrize("normalization", ["none", "mean"])
@pytest.mark.parametrize("weighting", ["uniform", "phi", "is", "entropy"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_expert_term_strength_metrics_equal_an_oracle(tiny_model_dir, tmp_path, aggregation, weighting, normalization):
    # One step at mu = 0.5 whose expert micro-batch is the whole expert set: every metric computed again from the
    # model's own logits, and the two terms' gradients from an independent SFT gradient and the SGD update
    mu, expert = 0.5, make_expert_dataset_of_lengths([1, 9, 3, 14])
    args = chord_config(
        tmp_path,
        chord_mu_peak=mu,
        chord_mu_valley=mu,
        chord_token_weighting=weighting,
        chord_token_weight_normalization=normalization,
        chord_sft_loss_agg_mode=aggregation,
        chord_sft_max_length=48,
        chord_sft_per_device_train_batch_size=4,
        chord_log_term_grad_norms=True,
        **PLAIN_SGD,
        max_steps=1,
    )
    trainer = make_trainer(tiny_model_dir, args, expert)
    update = trained_update(trainer)
    entry = trainer.state.log_history[0]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    probs, token_weights, lengths = [], [], []
    with torch.no_grad():
        for example in expert:
            logits, targets = completion_logits(model, tokenizer, example)
            logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            probs.append(logps.exp())
            token_weights.append(oracle_weights(weighting, logits, logps))
            lengths.append(len(targets))
    probs, token_weights = torch.cat(probs), torch.cat(token_weights)
    if weighting == "entropy" or normalization == "mean":
        token_weights = token_weights / token_weights.mean()
    scales = _token_scales(lengths, aggregation, norm_length=48)
    assert entry["chord/token_weight_mean"] == pytest.approx(token_weights.mean().item(), rel=1e-4)
    assert entry["chord/expert_prob_below_0.1"] == pytest.approx((probs < 0.1).float().mean().item())
    assert entry["chord/expert_prob_above_0.9"] == pytest.approx((probs > 0.9).float().mean().item())
    expected_effective_mu = mu * ((scales * token_weights).sum() / scales.sum()).item()
    assert entry["chord/effective_mu"] == pytest.approx(expected_effective_mu, rel=1e-4)
    if weighting == "uniform" or (normalization == "mean" and aggregation == "token-mean"):
        assert entry["chord/effective_mu"] == pytest.approx(mu, rel=1e-5)

    sft_gradient = expert_nll_gradient(tiny_model_dir, expert, weighting, aggregation, 48, normalization)
    expert_part = {name: mu * grad for name, grad in sft_gradient.items()}
    # The update is -lr * (grpo part + expert part): what is left of it once the expert part is taken away is GRPO's
    grpo_part = {name: -step / PLAIN_SGD["learning_rate"] - expert_part[name] for name, step in update.items()}

    def norm(gradient):
        return torch.stack([grad.norm() for grad in gradient.values()]).norm().item()

    assert entry["chord/expert_grad_norm"] == pytest.approx(norm(expert_part), rel=1e-3)
    assert entry["chord/grpo_grad_norm"] == pytest.approx(norm(grpo_part), rel=1e-3)
    assert entry["chord/grpo_grad_norm"] > 0


def test_expert_loss_falls_with_mu_one(tiny_model_dir, tmp_path):
    args = chord_config(
        tmp_path,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_enable_phi_function=False,
        chord_sft_per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=3e-3,
    )
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset(4))
    trainer.train()
    nll = logged(trainer, "chord/expert_nll")
    assert nll[-1] < nll[0] - 1.0


# LoRA, gradient accumulation, num_iterations, beta > 0
def test_lora(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = make_trainer(
        tiny_model_dir,
        chord_config(tmp_path, chord_mu_valley=0.5, learning_rate=5e-2),
        make_expert_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    assert len(logged(trainer, "chord/sft_loss")) == 2


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("normalization", ["none", "mean"])
@pytest.mark.parametrize("weighting", ["uniform", "phi", "is", "focal", "entropy"])
@pytest.mark.parametrize(
    "aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_each_sft_loss_aggregation_sgd_step_follows_its_oracle(
    tiny_model_dir, tmp_path, aggregation, weighting, normalization, gradient_in_forward
):
    # mu = 1, plain SGD, two accumulated micro-batches of two examples of very different lengths: the update is -lr
    # times the mean over the micro-batches of the gradient of each one's aggregate, computed independently; in both
    # head modes (the expert backward on its own: gradient in the forward; one joint backward: recomputed)
    expert = make_expert_dataset_of_lengths([1, 9, 3, 14])
    args = chord_config(
        tmp_path,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_token_weighting=weighting,
        chord_token_weight_normalization=normalization,
        chord_sft_loss_agg_mode=aggregation,
        chord_sft_max_length=48,  # longer than every example: nothing is cut
        chord_sft_per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        num_generations=4,
        **PLAIN_SGD,
        max_steps=1,
    )
    trainer = make_trainer(tiny_model_dir, args, expert)
    trainer.backward_expert_term_first = gradient_in_forward
    drawn = recording_draws(trainer)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    assert len(drawn) == 2 and sorted(sum(drawn, [])) == [0, 1, 2, 3]
    oracle = [
        expert_nll_gradient(tiny_model_dir, expert.select(indices), weighting, aggregation, 48, normalization)
        for indices in drawn
    ]
    for name in after:
        expected = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_sft_loss_aggregations_differ_on_examples_of_different_lengths(tiny_model_dir):
    # The modes are not the same loss written four ways: on one micro-batch their gradients all differ
    expert = make_expert_dataset_of_lengths([1, 14])
    gradients = {
        aggregation: expert_nll_gradient(tiny_model_dir, expert, "uniform", aggregation, norm_length=40)
        for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
    }
    names = list(gradients)
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            a, b = gradients[names[first]]["model.norm.weight"], gradients[names[second]]["model.norm.weight"]
            assert not torch.allclose(a, b, rtol=1e-2), (names[first], names[second])


@pytest.mark.parametrize("weighting", ["phi", "entropy"])
def test_expert_backward_first_gives_the_joint_backwards_update(tiny_model_dir, tmp_path, weighting):
    # Two backwards per micro-step (expert term first) against one through (1 - mu) * grpo + mu * sft, same seed
    args = chord_config(
        tmp_path,
        chord_mu_peak=0.5,
        chord_mu_valley=0.5,
        chord_token_weighting=weighting,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        num_generations=4,
        **PLAIN_SGD,
        max_steps=2,
    )
    updates = {}
    for backward_first in (True, False):
        trainer = make_trainer(tiny_model_dir, args, make_expert_dataset(6))
        assert trainer.backward_expert_term_first  # the default on one process
        trainer.backward_expert_term_first = backward_first
        updates[backward_first] = trained_update(trainer)
        losses = sum((logged(trainer, key) for key in ("loss", "chord/grpo_loss", "chord/sft_loss")), [])
        if backward_first:
            first_losses = losses
    assert losses == pytest.approx(first_losses, rel=1e-5)
    # The updates are differences of weights of order 1, whose spacing is 1.2e-7: allow two of those
    for name, update in updates[True].items():
        torch.testing.assert_close(update, updates[False][name], rtol=1e-4, atol=2.5e-7, msg=lambda m: f"{name}: {m}")
    assert max(update.abs().max().item() for update in updates[True].values()) > 1e-3


def test_num_iterations_and_beta(tiny_model_dir, tmp_path):
    args = chord_config(
        tmp_path, beta=0.1, num_iterations=2, gradient_accumulation_steps=2, max_steps=2, chord_mu_valley=0.5
    )
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    trainer.train()
    assert trainer.ref_model is not None
    assert len(logged(trainer, "kl")) == 2 and len(logged(trainer, "chord/sft_loss")) == 2
    assert trainer.expert_sampler.examples_drawn == 2 * 2  # one expert micro-batch per micro-step


def test_resume_from_a_checkpoint_without_chord_state_fails(tiny_model_dir, tmp_path):
    args = chord_config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model_dir, args, make_expert_dataset()).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    os.remove(checkpoint / CHORD_STATE_NAME)
    args = chord_config(tmp_path, max_steps=2, save_strategy="no")
    with pytest.raises(ValueError, match=f"its {CHORD_STATE_NAME} is missing or unreadable"):
        make_trainer(tiny_model_dir, args, make_expert_dataset()).train(resume_from_checkpoint=str(checkpoint))


# Bad input: a clear error before training starts
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(chord_mu_peak=1.5), r"`chord_mu_peak` must be in \[0, 1\], got 1.5"),
        (dict(chord_mu_valley=-0.1), r"`chord_mu_valley` must be in \[0, 1\], got -0.1"),
        (dict(chord_mu_warmup_steps=-1), "`chord_mu_warmup_steps` must be a number of optimizer steps >= 0"),
        (dict(chord_mu_decay_steps=-5), "`chord_mu_decay_steps` must be a number of optimizer steps >= 0"),
        (dict(chord_sft_per_device_train_batch_size=0), "`chord_sft_per_device_train_batch_size` must be >= 1"),
        (dict(chord_sft_max_length=1), "`chord_sft_max_length` must be >= 2"),
        (dict(chord_mu_schedule="linear"), "`chord_mu_schedule` must be 'cosine' or 'adaptive'"),
        (dict(chord_adaptive_mu_tau=-1.0), "`chord_adaptive_mu_tau` must be >= 0"),
        (dict(chord_token_weighting="top5"), "`chord_token_weighting` must be one of"),
        (dict(chord_focal_gamma=-1.0), "`chord_focal_gamma` must be >= 0"),
        (dict(chord_sft_loss_agg_mode="sum"), "`chord_sft_loss_agg_mode` must be one of"),
    ],
)
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        chord_config(tmp_path, **overrides)


def test_a_dataset_dict_is_refused_naming_its_splits(tiny_model_dir, tmp_path):
    from datasets import DatasetDict

    splits = DatasetDict({"train": make_expert_dataset(), "test": make_expert_dataset(4)})
    with pytest.raises(ValueError, match=r"a `DatasetDict` with the splits \['train', 'test'\]"):
        make_trainer(tiny_model_dir, chord_config(tmp_path), splits)
    # A plain dict of named datasets is a mixture of sources, on purpose
    trainer = make_trainer(tiny_model_dir, chord_config(tmp_path), dict(splits))
    assert trainer.expert_source_names == ["train", "test"]


def test_a_mu_zero_baseline_keeps_its_mixture_config_and_warns(tiny_model_dir, tmp_path, caplog):
    args = chord_config(tmp_path, chord_mu_peak=0.0, chord_mu_valley=0.0, chord_sft_dataset_proportions={"a": 1})
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    assert "mu is 0 at every step" in caplog.text and trainer.expert_dataset is None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        make_trainer(tiny_model_dir, args)
    assert "`chord_sft_dataset_proportions` is never used" in caplog.text


@pytest.mark.parametrize("optim", ["adamw_torch", "lomo", "galore_adamw_layerwise", "apollo_adamw_layerwise"])
def test_optimizers_that_step_inside_the_backward_get_one_joint_backward(tiny_model_dir, tmp_path, optim):
    # Layer-wise GaLore and APOLLO step each parameter from a hook on its gradient, as LOMO does: a separate expert
    # backward would be a separate optimizer step on the expert gradient alone
    trainer = make_trainer(tiny_model_dir, chord_config(tmp_path, optim=optim), make_expert_dataset())
    assert trainer.backward_expert_term_first == (optim == "adamw_torch")


@pytest.mark.parametrize(
    "setting",
    [{}, {"gradient_checkpointing": False}, {"gradient_checkpointing_kwargs": {"use_reentrant": False}}],
)
def test_gradient_checkpointing_settings_apply_without_a_deprecation_warning(tmp_path, setting):
    # transformers 5 renamed the option activation_checkpointing and warns on the old name, which GRPOConfig's
    # default (on) and the shipped configs set
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = chord_config(tmp_path, **setting)
    enabled = setting.get("gradient_checkpointing", True)
    kwargs = setting.get("gradient_checkpointing_kwargs")
    assert args.gradient_checkpointing is enabled and args.gradient_checkpointing_kwargs == kwargs
    assert getattr(args, "activation_checkpointing", enabled) is enabled  # transformers 5's own name, where it is
    assert getattr(args, "activation_checkpointing_kwargs", kwargs) == kwargs


def test_missing_expert_dataset(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no `expert_dataset` was given"):
        make_trainer(
            tiny_model_dir, chord_config(tmp_path, chord_mu_peak=0.5, chord_mu_valley=0.0, chord_mu_decay_steps=3)
        )


@pytest.mark.parametrize(
    "dataset, message",
    [
        (Dataset.from_dict({"prompt": []}), "`expert_dataset` is empty"),
        (Dataset.from_dict({"question": ["a"], "answer": ["b"]}), "CHORD needs either `prompt` and `completion`"),
        (
            Dataset.from_dict({"prompt": ["a", "b"], "completion": ["", ""]}),
            "Every one of the 2 expert examples was skipped",
        ),
        (
            Dataset.from_dict({"prompt": ["a"], "completion": [["x"]]}),
            "Expert example 0: `prompt` and `completion` must both be",
        ),
    ],
)
def test_bad_expert_datasets(tiny_model_dir, tmp_path, dataset, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny_model_dir, chord_config(tmp_path), dataset)


def test_expert_data_truncated_away_entirely(tiny_model_dir, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a long prompt"], "completion": ["x"]})
    with pytest.raises(ValueError, match=r"1 with completion truncated away.*chord_sft_max_length"):
        make_trainer(tiny_model_dir, chord_config(tmp_path, chord_sft_max_length=4), dataset)


def test_conversational_expert_data_needs_a_chat_template(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        ChordTrainer(
            model=tiny_model_dir,
            reward_funcs=odd_char_reward,
            args=chord_config(tmp_path),
            train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}),
            expert_dataset=make_expert_dataset(),
            processing_class=tokenizer,
        )


def test_a_skipped_grpo_term_gives_the_update_computing_it_would(tiny_model_dir, tmp_path):
    # The same mu = 1 step with the GRPO term skipped and with it computed (and weighted 0): the same weights
    args = chord_config(tmp_path, chord_mu_peak=1.0, chord_mu_valley=1.0, max_steps=2, **PLAIN_SGD)
    updated = {}
    for skip in (True, False):
        trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
        if not skip:
            trainer.on_policy_term_skipped = lambda: False
        trainer.train()
        assert logged(trainer, "chord/grpo_skipped") == ([1.0, 1.0] if skip else [0.0, 0.0])
        updated[skip] = weights(trainer)
    for name, value in updated[True].items():
        torch.testing.assert_close(value, updated[False][name], rtol=0, atol=1e-6, msg=name)


# Several expert sources
def two_sources() -> dict[str, Dataset]:
    return {"add": make_expert_dataset(6), "repeat": make_expert_dataset_of_lengths([3, 8, 5, 2])}


def test_two_expert_sources_mix_in_proportion_with_per_source_metrics(tiny_model_dir, tmp_path):
    # lr = 0, so the model is the same at every step and the logged per-source NLL can be checked directly
    args = chord_config(
        tmp_path,
        chord_mu_valley=0.5,
        chord_sft_per_device_train_batch_size=4,
        chord_sft_dataset_proportions={"add": 3, "repeat": 1},
        learning_rate=0.0,
        max_steps=3,
    )
    sources = two_sources()
    trainer = make_trainer(tiny_model_dir, args, sources)
    drawn = recording_draws(trainer)
    trainer.train()

    # 3 of every 4 examples from "add", in every micro-batch of 4 (the schedule is exact at multiples of 4)
    source_counts = [[trainer.expert_sampler.source_of(index) for index in batch].count(0) for batch in drawn]
    assert source_counts == [3, 3, 3]
    logs = [entry for entry in trainer.state.log_history if "chord/mu" in entry]
    for batch, entry in zip(drawn, logs):
        for source, name in enumerate(sources):
            local = [index - trainer.expert_sampler.offsets[source] for index in batch]
            rows = sources[name].select(
                [i for i, index in zip(local, batch) if trainer.expert_sampler.source_of(index) == source]
            )
            nll, tokens = own_nll_and_tokens(tiny_model_dir, rows)
            assert entry[f"chord/expert_tokens/{name}"] == tokens
            assert entry[f"chord/expert_nll/{name}"] == pytest.approx(nll / tokens, rel=1e-5)


def own_nll_and_tokens(model_dir, rows) -> tuple[float, int]:
    """The NLL sum and token count of expert completions, from the model's plain forward."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in rows:
            logits, targets = completion_logits(model, tokenizer, example)
            nll -= logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
            tokens += len(targets)
    return nll, tokens


def test_two_expert_sources_resume_exactly(tiny_model_dir, tmp_path):
    options = dict(
        chord_mu_valley=0.5,
        chord_sft_per_device_train_batch_size=3,
        chord_sft_dataset_proportions={"add": 1, "repeat": 1},
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
    )

    def run(output, resume=None):
        trainer = make_trainer(tiny_model_dir, chord_config(tmp_path / output, **options), two_sources())
        drawn = recording_draws(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, drawn

    full, full_drawn = run("full")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    state = json.loads((checkpoint / CHORD_STATE_NAME).read_text())
    assert state == {"expert_sampler": {"add": {"examples_drawn": 3}, "repeat": {"examples_drawn": 3}}}
    resumed, resumed_drawn = run("resumed", resume=str(checkpoint))
    assert resumed_drawn == full_drawn[2:]
    full_weights, resumed_weights = weights(full), weights(resumed)
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "expert, proportions, message",
    [
        ("sources", {"add": 1, "other": 1}, r"names the sources \['add', 'other'\], but `expert_dataset` has"),
        ("one", {"add": 1}, "`expert_dataset` is not a dict of named datasets"),
        ("sources", {"add": 0, "repeat": 1}, "the proportion of 'add' must be a number > 0"),
        ("empty_source", None, "Expert source 'empty': `expert_dataset` is empty"),
    ],
)
def test_bad_expert_sources(tiny_model_dir, tmp_path, expert, proportions, message):
    datasets = {
        "sources": two_sources(),
        "one": make_expert_dataset(),
        "empty_source": {"add": make_expert_dataset(), "empty": Dataset.from_dict({"prompt": [], "completion": []})},
    }
    with pytest.raises(ValueError, match=message):
        make_trainer(
            tiny_model_dir, chord_config(tmp_path, chord_sft_dataset_proportions=proportions), datasets[expert]
        )


def _strength_run(model_dir, tmp_path, name, weighting, max_steps, learning_rate=1e-4):
    """A run at mu = 1 (no rollouts to generate: fast) that logs every step, at a constant rate (1e-4: one that
    would not teach the expert's style within the run when the expert term is weak)."""
    args = chord_config(
        tmp_path / name,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_token_weighting=weighting,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
    )
    # One expert answer, in a style the random tiny model never produces, and which a few SFT steps make it reproduce
    trainer = make_trainer(model_dir, args, make_expert_dataset(1))
    trainer.train()
    return trainer


def test_term_gradient_norms_are_each_backwards_own_gradient_over_all_parameters():
    # Two terms backpropagated into gradients already accumulated from an earlier micro-step (and a frozen parameter):
    # each norm is that of the term's own gradient, from `torch.autograd.grad`, not of the accumulated `.grad`
    from trl_chord.chord_metrics import TermGradientNorms

    torch.manual_seed(0)
    weight, bias, frozen = torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(3)
    inputs = torch.randn(4, 3)

    def term_loss(power):
        return ((inputs + frozen) @ weight.T + bias).pow(power).sum()

    (term_loss(1) * 3).backward()  # an earlier micro-step's gradient, left in .grad
    norms = TermGradientNorms([weight, bias, frozen])
    with norms.measuring("grpo"):
        with norms.attributed_to("expert"):
            term_loss(2).backward()
        term_loss(3).backward()
    measured = norms.norms()

    def oracle(power):
        grads = torch.autograd.grad(term_loss(power), [weight, bias])
        return torch.cat([grad.flatten() for grad in grads]).norm().item()

    assert list(measured) == ["grpo", "expert"]
    assert measured["expert"].item() == pytest.approx(oracle(2), rel=1e-6)
    assert measured["grpo"].item() == pytest.approx(oracle(3), rel=1e-6)
    assert oracle(2) != pytest.approx(oracle(3), rel=0.1)


@pytest.mark.parametrize("asked", [True, False], ids=["grad-norms-asked", "grad-norms-default"])
def test_term_gradient_norms_are_measured_on_the_logged_steps_only_and_if_asked(
    tiny_model_dir, tmp_path, monkeypatch, asked
):
    # The hooks cost a hook call and a pass over the gradients per backward: only the micro-steps of logged optimizer
    # steps pay it, and only with chord_log_term_grad_norms (off by default)
    from trl_chord.chord_metrics import TermGradientNorms

    measured_steps = []
    measuring = TermGradientNorms.measuring

    def counted(self, term):
        measured_steps.append(trainer.state.global_step + 1)
        return measuring(self, term)

    monkeypatch.setattr(TermGradientNorms, "measuring", counted)
    steps = dict(logging_steps=2, max_steps=4, gradient_accumulation_steps=2)
    args = chord_config(tmp_path, chord_mu_valley=0.5, chord_log_term_grad_norms=asked, **steps)
    trainer = make_trainer(tiny_model_dir, args, make_expert_dataset())
    trainer.train()
    assert len(logged(trainer, "chord/mu")) == 2
    if asked:
        assert measured_steps == [2, 2, 4, 4]  # two micro-steps each
        assert len(logged(trainer, "chord/expert_grad_norm")) == len(logged(trainer, "chord/grpo_grad_norm")) == 2
    else:
        assert measured_steps == []
        assert not logged(trainer, "chord/expert_grad_norm") and not logged(trainer, "chord/grpo_grad_norm")


WEAK_EXPERT_TERM_WARNING = "the CHORD expert term has acted at under a tenth of its mu"


def test_the_weak_expert_term_warning_waits_for_20_consecutive_weak_logs_and_fires_once(caplog):
    from transformers import TrainerControl, TrainerState

    from trl_chord.callbacks import WeakExpertTermCallback

    weak = {"chord/mu": 0.1, "chord/effective_mu": 0.002, "chord/expert_prob_below_0.1": 0.35}
    strong = {**weak, "chord/effective_mu": 0.05}
    reproduced = {**weak, "chord/expert_prob_below_0.1": 0.02}  # phi is small because p is near 1: nothing to fix
    no_expert_term = {"chord/mu": 0.0}
    callback, state = WeakExpertTermCallback(), TrainerState()
    args = ChordConfig(output_dir="unused", use_cpu=True, bf16=False)

    def log(*entries):
        with caplog.at_level(logging.WARNING):
            for entry in entries:
                callback.on_log(args, state, TrainerControl(), logs=entry)
        return caplog.text.count(WEAK_EXPERT_TERM_WARNING)

    assert log(*[weak] * 19, strong, *[weak] * 19, reproduced, *[weak] * 10) == 0  # each run broken before 20
    assert log(no_expert_term, *[weak] * 9) == 0  # a log without the expert term neither counts nor breaks the run
    assert log(weak) == 1
    assert log(*[weak] * 40) == 1  # once


def test_the_weak_expert_term_warning_fires_on_an_unfamiliar_style_and_only_there(tiny_model_dir, tmp_path, caplog):
    warning = WEAK_EXPERT_TERM_WARNING
    # A random model has never produced the experts' answers: every token is improbable, phi ~ p is tiny
    with caplog.at_level(logging.WARNING):
        phi_run = _strength_run(tiny_model_dir, tmp_path, "phi", "phi", max_steps=21)
    assert caplog.text.count(warning) == 1
    assert "chord_token_weight_normalization='mean'" in caplog.text
    assert all(entry["chord/effective_mu"] < 0.1 for entry in phi_run.state.log_history if "chord/mu" in entry)
    # Uniform weights always act at mu
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _strength_run(tiny_model_dir, tmp_path, "uniform", "uniform", max_steps=21)
    assert warning not in caplog.text
    # A policy that already reproduces the experts (trained on them first): phi is small there too, rightly
    trained = _strength_run(tiny_model_dir, tmp_path, "sft", "uniform", max_steps=30, learning_rate=3e-2)
    trained.save_model(str(tmp_path / "trained"))
    trained.processing_class.save_pretrained(str(tmp_path / "trained"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reproduced = _strength_run(str(tmp_path / "trained"), tmp_path, "phi-trained", "phi", max_steps=21)
    assert warning not in caplog.text
    # phi is as weak as on the unfamiliar style, but no expert token is improbable any more
    logs = [entry for entry in reproduced.state.log_history if "chord/mu" in entry]
    assert all(entry["chord/effective_mu"] < 0.1 and entry["chord/expert_prob_below_0.1"] == 0 for entry in logs)
    assert logs[-1]["chord/expert_prob_above_0.9"] == 1
