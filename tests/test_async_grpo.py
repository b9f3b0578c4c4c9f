"""
What is ChordAsyncGRPOTrainer's own (the contract all CHORD trainers keep is tests/test_trainer_contract.py): the
packed expert row and the CPU seam of the packed attention, training with the worker's weight sync, LoRA, the refused
adaptive schedule, the token budget; on a CPU, with rollouts from an in-process Hugging Face model
(tests/async_grpo_cpu.py).
"""

import dataclasses
import logging

import pytest
import torch
from helpers import COMMON_ARGS, async_grpo_unavailable, logged, make_expert_dataset, weights
from transformers import AutoModelForCausalLM


if async_grpo_unavailable():  # transformers 4 (the oldest supported set): TRL's AsyncGRPOTrainer does not import
    pytest.skip(async_grpo_unavailable(), allow_module_level=True)

from async_grpo_cpu import ASYNC_ARGS, cpu_seams, make_async_grpo_trainer, varlen_attention  # noqa: E402

from trl_chord import ChordConfig, ChordRLOOConfig  # noqa: E402
from trl_chord.chord_async_grpo import (  # noqa: E402
    ChordAsyncGRPOConfig,
    ChordAsyncGRPOTrainer,
    packed_attention_inputs,
)
from trl_chord.chord_config import CHORD_OPTIONS_DOC, ChordOptions  # noqa: E402


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    cpu_seams(monkeypatch)


def chord_trainer(model_dir, tmp_path, expert_dataset, peft_config=None, **options):
    """ChordAsyncGRPOTrainer on [`ASYNC_ARGS`] with `options`, and its own in-process worker."""
    args = ChordAsyncGRPOConfig(**{**ASYNC_ARGS, **options, "output_dir": str(tmp_path / "chord")})
    return make_async_grpo_trainer(model_dir, args, expert_dataset, peft_config)


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


def test_a_short_run_trains(tiny_model_dir, tmp_path):
    # mu = 0.5 with plain SFT weights for 6 steps: the expert NLL falls, both terms act, and the worker ends up
    # generating with the trained weights
    options = dict(chord_mu_peak=0.5, chord_mu_valley=0.5, chord_token_weighting="uniform")
    options["chord_log_term_grad_norms"] = True
    trainer = chord_trainer(
        tiny_model_dir, tmp_path, make_expert_dataset(4), **options, max_steps=6, learning_rate=1e-2
    )
    worker = trainer.rollout_worker
    trainer.train()
    nll = logged(trainer, "chord/expert_nll")
    assert len(nll) == 6 and nll[-1] < nll[0] - 1.0
    assert all(entry["chord/grpo_grad_norm"] > 0 for entry in trainer.state.log_history if "chord/mu" in entry)
    assert worker.versions_generated == [1, 1, *range(2, 8)]
    final = weights(trainer)
    for name, value in worker.model.named_parameters():
        assert torch.equal(value, final[name]), name


def test_lora_trains_the_adapter_and_syncs_it_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    options = dict(chord_mu_peak=0.5, chord_mu_valley=0.5)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = chord_trainer(tiny_model_dir, tmp_path, make_expert_dataset(), lora, **options, learning_rate=5e-2)
    worker = trainer.rollout_worker
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


def test_every_chord_config_has_the_same_chord_options():
    # One definition: the same fields, defaults, help and choices, the same documentation and the same checks
    configs = (ChordConfig, ChordRLOOConfig, ChordAsyncGRPOConfig)
    expected = [(spec.name, spec.default, spec.metadata) for spec in dataclasses.fields(ChordOptions)]
    assert len(expected) == 16
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
    options = dict(chord_sft_per_device_train_batch_size=2, chord_sft_max_length=64)
    with caplog.at_level(logging.WARNING):
        chord_trainer(tiny_model_dir, tmp_path, make_expert_dataset(), **options, token_budget=100)
    assert "An expert micro-batch row can hold up to 128 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        chord_trainer(tiny_model_dir, tmp_path, make_expert_dataset(), **options, token_budget=128)
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
