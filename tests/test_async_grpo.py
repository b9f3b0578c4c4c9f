"""
ChordAsyncGRPOTrainer: CHORD's expert term on TRL's AsyncGRPOTrainer, on a CPU, with rollouts from an in-process
Hugging Face model (tests/async_grpo_cpu.py: the worker, the weight sync, and the two GPU-only seams replaced), against
AsyncGRPOTrainer itself and an independent SFT gradient.
"""

import dataclasses

import pytest
import torch
from helpers import (
    COMMON_ARGS,
    PLAIN_SGD,
    async_grpo_unavailable,
    expert_nll_gradient,
    logged,
    make_expert_dataset,
    make_expert_dataset_of_lengths,
    make_rl_prompts,
    odd_char_reward,
    recording_draws,
    trained_update,
    weights,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


if async_grpo_unavailable():  # transformers 4 (the oldest supported set): TRL's AsyncGRPOTrainer does not import
    pytest.skip(async_grpo_unavailable(), allow_module_level=True)

from async_grpo_cpu import HFRolloutWorker, InProcessWeightTransfer, cpu_seams, varlen_attention  # noqa: E402
from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer  # noqa: E402

from trl_chord import ChordConfig, ChordRLOOConfig, chord_mu  # noqa: E402
from trl_chord.chord_async_grpo import (  # noqa: E402
    ChordAsyncGRPOConfig,
    ChordAsyncGRPOTrainer,
    packed_attention_inputs,
)
from trl_chord.chord_config import CHORD_OPTIONS_DOC, ChordOptions  # noqa: E402


# 4 rollouts per micro-step (one group), 2 micro-steps per optimizer step; fixed-count batching (no vLLM to ask for a
# token budget); fp32 weights and no gradient checkpointing, so that runs compare weight by weight
ASYNC_ARGS = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    num_generations=4,
    max_completion_length=6,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    bf16=False,
    use_cpu=True,
    learning_rate=1e-2,
    seed=0,
    save_strategy="no",
    token_budget=0,
    gradient_checkpointing=False,
)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    cpu_seams(monkeypatch)


def run(model_dir, tmp_path, name, chord_options=None, expert_dataset=None, peft_config=None, **overrides):
    """AsyncGRPOTrainer (`chord_options=None`) or ChordAsyncGRPOTrainer, each with its own worker (same seed)."""
    options = {**ASYNC_ARGS, **overrides, "output_dir": str(tmp_path / name)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker = HFRolloutWorker(
        model_dir,
        make_rl_prompts(),
        [odd_char_reward],
        tokenizer,
        step_samples=options["per_device_train_batch_size"] * options["gradient_accumulation_steps"],
        num_generations=options["num_generations"],
        max_completion_length=options["max_completion_length"],
    )
    trainer_kwargs = dict(
        model=model_dir,
        reward_funcs=odd_char_reward,
        train_dataset=make_rl_prompts(),
        processing_class=tokenizer,
        rollout_worker=worker,
        weight_transfer=InProcessWeightTransfer(worker),
        peft_config=peft_config,
    )
    if chord_options is None:
        trainer = AsyncGRPOTrainer(args=AsyncGRPOConfig(**options), **trainer_kwargs)
    else:
        args = ChordAsyncGRPOConfig(**options, **chord_options)
        trainer = ChordAsyncGRPOTrainer(args=args, expert_dataset=expert_dataset, **trainer_kwargs)
    return trainer, worker


def test_the_packed_attention_seam_gives_the_models_own_log_probabilities(tiny_model_dir):
    # The torch stand-in for FlashAttention's varlen kernel, on sequences packed into one row, against the model's own
    # (SDPA) forward on each sequence: the seam changes where attention runs, not what it computes
    from trl.experimental.async_grpo.packing import TREE_ATTENTION, register_tree_attention

    register_tree_attention()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=TREE_ATTENTION)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 200, (length,), generator=generator) for length in (5, 9)]
    with torch.no_grad():
        expected = torch.cat([plain(sequence[None]).logits[0] for sequence in sequences])
        inputs = packed_attention_inputs([5, 9], torch.device("cpu"))
        logits = packed(torch.cat(sequences)[None], **inputs).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # A segment with fewer queries than keys sees them aligned to the bottom right, as FlashAttention does
    query, key = torch.randn(2, 1, 4), torch.randn(5, 1, 4)
    boundaries = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = varlen_attention(query, key, key, *boundaries, 2, 5)
    first = torch.nn.functional.scaled_dot_product_attention(query[:1].transpose(0, 1), *[key[:4].transpose(0, 1)] * 2)
    torch.testing.assert_close(out[:1], first.transpose(0, 1))


@pytest.mark.parametrize("with_expert_dataset", [False, True])
def test_mu_zero_is_async_grpos_update_on_the_same_rollouts(tiny_model_dir, tmp_path, with_expert_dataset):
    # Two optimizer steps: step 2 trains on rollouts the worker generated with the weights synced after step 1, so the
    # runs agree only if every step, and every weight sync, does
    grpo, grpo_worker = run(tiny_model_dir, tmp_path, "grpo")
    grpo.train()
    expert = make_expert_dataset() if with_expert_dataset else None
    options = dict(chord_mu_peak=0.0, chord_mu_valley=0.0)
    chord, chord_worker = run(tiny_model_dir, tmp_path, "chord", options, expert)
    chord.train()

    assert logged(chord, "loss") == logged(grpo, "loss")
    assert logged(chord, "reward") == logged(grpo, "reward")
    assert logged(chord, "chord/mu") == [0.0, 0.0]
    assert "chord/sft_loss" not in chord.state.log_history[0] and "chord/grpo_loss" in chord.state.log_history[0]
    assert chord_worker.versions_generated == grpo_worker.versions_generated == [1, 1, 2, 3]
    grpo_weights, chord_weights = weights(grpo), weights(chord)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(grpo_weights[name], initial[name]) for name in grpo_weights), "AsyncGRPO did not train"
    for name, value in grpo_weights.items():
        assert torch.equal(value, chord_weights[name]), name
    # The worker generates with the trainer's weights: synced after the last step
    for name, value in chord_worker.model.named_parameters():
        assert torch.equal(value, chord_weights[name]), name


@pytest.mark.parametrize(
    "weighting, aggregation, head",
    [
        ("phi", "seq-mean-token-mean", "auto"),
        ("uniform", "token-mean", "full_logits"),
        ("entropy", "seq-mean-token-sum", "trl_fused"),
    ],
)
def test_mu_one_sgd_step_follows_the_expert_gradient(tiny_model_dir, tmp_path, weighting, aggregation, head):
    # Two accumulated micro-steps, each packing two expert examples of very different lengths into one row: the update
    # is -lr times the mean of each micro-batch's aggregated SFT gradient, computed from unpacked examples with the
    # model's own attention. Every head reads the packed row; the aggregation sees its sequences apart
    expert = make_expert_dataset_of_lengths([1, 9, 3, 14])
    options = dict(
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_token_weighting=weighting,
        chord_sft_loss_agg_mode=aggregation,
        chord_expert_head=head,
        chord_sft_per_device_train_batch_size=2,
        chord_sft_max_length=48,
    )
    trainer, _ = run(tiny_model_dir, tmp_path, "chord", options, expert, max_steps=1, temperature=0.7, **PLAIN_SGD)
    drawn = recording_draws(trainer)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    assert trainer.chord_expert_head.path == ("chunked" if head == "auto" else head)
    assert len(drawn) == 2 and sorted(sum(drawn, [])) == [0, 1, 2, 3]
    oracle = [
        expert_nll_gradient(tiny_model_dir, expert.select(indices), weighting, aggregation, 48) for indices in drawn
    ]
    for name in after:
        expected = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-4, atol=1e-7, msg=name)
    assert max(grads.abs().max().item() for grads in oracle[0].values()) > 1e-4
    assert logged(trainer, "chord/grpo_skipped") == [1.0]
    expected_tokens = sum(len(str(i)) * length + 2 for i, length in enumerate([1, 9, 3, 14]))  # answer + <|im_end|>\n
    assert logged(trainer, "chord/expert_tokens") == [expected_tokens / 2]  # the mean over the two micro-steps


@pytest.mark.parametrize("backward_first", [True, False], ids=["backward-first", "joint-backward"])
def test_mixed_update_is_the_weighted_sum_of_async_grpo_and_expert_terms(tiny_model_dir, tmp_path, backward_first):
    # One plain SGD step on the rollouts the worker generated from the initial weights (the same in both runs):
    # AsyncGRPOTrainer's own update times (1 - mu), plus mu times the update of the independent SFT gradient
    mu, expert = 0.4, make_expert_dataset_of_lengths([1, 9, 3, 14])
    grpo, _ = run(tiny_model_dir, tmp_path, "grpo", max_steps=1, **PLAIN_SGD)
    grpo_update = trained_update(grpo)

    options = dict(chord_mu_peak=mu, chord_mu_valley=mu, chord_sft_per_device_train_batch_size=2)
    trainer, _ = run(tiny_model_dir, tmp_path, "chord", options, expert, max_steps=1, **PLAIN_SGD)
    assert trainer.backward_expert_term_first  # the default on one process
    trainer.backward_expert_term_first = backward_first
    drawn = recording_draws(trainer)
    update = trained_update(trainer)

    oracle = [expert_nll_gradient(tiny_model_dir, expert.select(indices), "phi") for indices in drawn]
    assert len(drawn) == 2
    for name, value in update.items():
        sft_update = -PLAIN_SGD["learning_rate"] * (oracle[0][name] + oracle[1][name]) / 2
        torch.testing.assert_close(value, (1 - mu) * grpo_update[name] + mu * sft_update, rtol=1e-4, atol=3e-7)
    assert max(update.abs().max().item() for update in grpo_update.values()) > 1e-3
    entry = trainer.state.log_history[0]
    assert entry["chord/grpo_loss"] == pytest.approx(grpo.state.log_history[0]["loss"], rel=1e-5, abs=1e-7)
    mixed = (1 - mu) * entry["chord/grpo_loss"] + mu * entry["chord/sft_loss"]
    assert entry["loss"] == pytest.approx(mixed, rel=1e-5, abs=5e-5)


def test_a_short_run_trains(tiny_model_dir, tmp_path):
    # mu = 0.5 with plain SFT weights for 6 steps: the expert NLL falls, both terms act, and the worker ends up
    # generating with the trained weights
    options = dict(chord_mu_peak=0.5, chord_mu_valley=0.5, chord_token_weighting="uniform")
    trainer, worker = run(
        tiny_model_dir, tmp_path, "chord", options, make_expert_dataset(4), max_steps=6, learning_rate=1e-2
    )
    trainer.train()
    nll = logged(trainer, "chord/expert_nll")
    assert len(nll) == 6 and nll[-1] < nll[0] - 1.0
    assert all(entry["chord/grpo_grad_norm"] > 0 for entry in trainer.state.log_history if "chord/mu" in entry)
    assert worker.versions_generated == [1, 1, *range(2, 8)]
    final = weights(trainer)
    for name, value in worker.model.named_parameters():
        assert torch.equal(value, final[name]), name


def test_mu_one_steps_skip_the_grpo_forward(tiny_model_dir, tmp_path, monkeypatch):
    grpo_forwards = []
    grpo_compute_loss = AsyncGRPOTrainer.compute_loss
    monkeypatch.setattr(
        AsyncGRPOTrainer,
        "compute_loss",
        lambda self, *a, **k: grpo_forwards.append(self.state.global_step) or grpo_compute_loss(self, *a, **k),
    )
    schedule = dict(chord_mu_peak=1.0, chord_mu_valley=0.5, chord_mu_warmup_steps=1, chord_mu_decay_steps=2)
    trainer, worker = run(tiny_model_dir, tmp_path, "chord", schedule, make_expert_dataset(), max_steps=3)
    trainer.train()
    assert logged(trainer, "chord/mu") == pytest.approx([chord_mu(step, 1.0, 0.5, 1, 2) for step in range(3)])
    assert logged(trainer, "chord/grpo_skipped") == [0.0, 1.0, 0.0]
    assert grpo_forwards == [0, 0, 2, 2]  # two micro-steps per step, none at step 1 (0-based)
    # The rollouts of the skipped step were still drawn (generation is the worker's): the worker kept pace
    assert worker.versions_generated == [1, 1, 2, 3, 4]


def test_lora_trains_the_adapter_and_syncs_it_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    options = dict(chord_mu_peak=0.5, chord_mu_valley=0.5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, worker = run(
        tiny_model_dir, tmp_path, "chord", options, make_expert_dataset(), learning_rate=5e-2, peft_config=lora
    )
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    moved = {name: (param - before[name]).abs().max().item() for name, param in trainer.model.named_parameters()}
    assert min(moved[name] for name in moved if "lora_" in name) > 1e-3
    # The frozen weights move by rounding only: AsyncGRPOTrainer merges the adapter into them for each sync, in place,
    # and unmerges it after
    assert max(moved[name] for name in moved if "lora_" not in name) < 1e-6
    assert len(logged(trainer, "chord/sft_loss")) == 2
    # The worker's model is the merged policy: base weights plus the trained adapter
    prompt = torch.tensor([[5, 17, 42, 9, 33]])
    with torch.no_grad():
        trained = trainer.model(prompt, **packed_attention_inputs([5], prompt.device)).logits
        torch.testing.assert_close(worker.model(prompt).logits, trained, rtol=1e-5, atol=1e-5)
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.allclose(initial(prompt).logits, worker.model(prompt).logits)


def test_adaptive_mu_is_refused():
    with pytest.raises(ValueError, match="chord_mu_schedule='adaptive' is not available with AsyncGRPOTrainer"):
        ChordAsyncGRPOConfig(output_dir="unused", chord_mu_schedule="adaptive", **ASYNC_ARGS)


def test_async_grpo_config_is_refused_with_a_conversion_that_works(tiny_model_dir, tmp_path):
    config = AsyncGRPOConfig(output_dir=str(tmp_path), **ASYNC_ARGS)
    with pytest.raises(TypeError, match="must be a `ChordAsyncGRPOConfig`") as refusal:
        ChordAsyncGRPOTrainer(model=tiny_model_dir, args=config, expert_dataset=make_expert_dataset())
    assert "ChordAsyncGRPOConfig.from_async_grpo_config(async_grpo_config, chord_...=...)" in str(refusal.value)
    converted = ChordAsyncGRPOConfig.from_async_grpo_config(config, chord_mu_valley=0.3)
    assert converted.chord_mu_valley == 0.3
    chord_options = {name for name in converted.to_dict() if name.startswith("chord_")}
    assert {k: v for k, v in converted.to_dict().items() if k not in chord_options} == config.to_dict()


def test_every_chord_config_has_the_same_chord_options():
    # One definition: the same fields, defaults, help and choices, the same documentation and the same checks
    configs = (ChordConfig, ChordRLOOConfig, ChordAsyncGRPOConfig)
    expected = [(spec.name, spec.default, spec.metadata) for spec in dataclasses.fields(ChordOptions)]
    assert len(expected) == 15
    for config in configs:
        chord_fields = [spec for spec in dataclasses.fields(config) if spec.name.startswith("chord_")]
        assert [(spec.name, spec.default, spec.metadata) for spec in chord_fields] == expected, config
        assert dataclasses.fields(config)[0].name == "output_dir"  # still the first positional argument
        assert config.__doc__.endswith(CHORD_OPTIONS_DOC) and "chord_sft_loss_agg_mode (`str`" in config.__doc__
        with pytest.raises(ValueError, match=r"`chord_mu_peak` must be in \[0, 1\], got 1.5"):
            config(output_dir="unused", chord_mu_peak=1.5, **{**COMMON_ARGS, "use_cpu": True})
        parsed = config(output_dir="unused", chord_sft_dataset_proportions='{"a": 2}', use_cpu=True, bf16=False)
        assert parsed.chord_sft_dataset_proportions == {"a": 2} and parsed.chord_token_weighting == "phi"


def test_an_expert_row_longer_than_the_token_budget_warns(tiny_model_dir, tmp_path, caplog):
    import logging

    options = dict(chord_sft_per_device_train_batch_size=2, chord_sft_max_length=64)
    with caplog.at_level(logging.WARNING):
        run(tiny_model_dir, tmp_path, "chord", options, make_expert_dataset(), token_budget=100)
    assert "An expert micro-batch row can hold up to 128 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(tiny_model_dir, tmp_path, "chord", options, make_expert_dataset(), token_budget=128)
    assert "An expert micro-batch row" not in caplog.text


def test_the_expert_micro_batch_is_packed_into_one_row_of_independent_sequences():
    # Two right-padded examples, the second with no prompt (its first token is a completion token): the packed row
    # holds their tokens end to end, each sequence's positions from 0, one attention segment per sequence, and no
    # label at a sequence's first token (what precedes it in the row belongs to another sequence)
    batch = {
        "input_ids": torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]]),
    }
    packed = ChordAsyncGRPOTrainer._expert_model_inputs(None, batch)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22]]
    assert packed["labels"].tolist() == [[-100, -100, 13, 14, -100, 22]]
    assert packed["chord_sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    assert packed["tree_kv_index"].tolist() == [0, 1, 2, 3, 4, 5]
    assert packed["tree_cu_seqlens_q"].tolist() == packed["tree_cu_seqlens_k"].tolist() == [0, 4, 6]
    assert packed["tree_max_seqlen_q"] == packed["tree_max_seqlen_k"] == 4
