"""The expert term across model families, Mixture-of-Experts routing and quantized bases.

For each family a tiny random model is built from its config; the expert loss and every parameter's gradient must
equal those from the model's own full logits, with phi weights. Which LM head the probe picks is checked too: the
chunked head where the logits are plain head products, TRL's fused head where the family scales or caps them.
"""

import copy

import pytest
import torch
import transformers
from helpers import PLAIN_SGD, chord_config, make_rl_prompts, odd_char_reward, weights

from trl_chord import ChordTrainer
from trl_chord.expert_head.forward import add_expert_loss_head
from trl_chord.losses import expert_sft_loss, token_weights


VOCAB_SIZE = 259  # the tiny tokenizer's, so that any of these models can be saved with it
SMALL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# family: (config class, model class, config overrides, the head the probe must pick)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "chunked"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "chunked"),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        "chunked",
    ),
    "llama3_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        "chunked",
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "chunked"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 30.0}, "trl_fused"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 30.0}, "trl_fused"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, "chunked"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "chunked"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}, "chunked"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}, "trl_fused"),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}, "trl_fused"),
}


def expected_head(family: str) -> str:
    """The head the probe must pick. Under transformers 4, TRL's fused head cannot read Gemma 3's text model (it takes
    the causal LM for its own backbone): the probe sees it fail and takes the exact full-logits path instead."""
    if family == "gemma3" and int(transformers.__version__.split(".")[0]) < 5:
        return "full_logits"
    return FAMILIES[family][3]


def build_model(family: str, seed: int = 0, **overrides):
    config_name, model_name, family_overrides, _ = FAMILIES[family]
    settings = {**SMALL, **family_overrides, **overrides}
    settings = {key: value for key, value in settings.items() if value is not None}
    config = getattr(transformers, config_name)(**settings)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def expert_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0  # padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :5] = -100  # a prompt
    labels[1, :3] = -100
    return input_ids, attention_mask, labels


def own_expert_loss(model, input_ids, attention_mask, labels, weighting="phi", **kwargs):
    """The oracle: the model's own forward and full logits, `token_weights` and `expert_sft_loss`."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = output.logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return expert_sft_loss(log_probs, mask, token_weights(weighting, log_probs, mask)), output


def chord_expert_loss(model, input_ids, attention_mask, labels, weighting="phi", **kwargs):
    add_expert_loss_head(model, weighting=weighting, focal_gamma=2.0, cast_lm_head_to_fp32=False)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, chord_expert_loss=True, **kwargs)


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_loss_and_every_gradient_match_the_models_own_logits(family, gradient_in_forward):
    model = build_model(family)
    oracle_model = copy.deepcopy(model)
    batch = expert_batch()
    out = chord_expert_loss(model, *batch, chord_head_gradient_in_forward=gradient_in_forward)
    out.loss.backward()
    expected, _ = own_expert_loss(oracle_model, *batch)
    expected.loss.backward()

    assert model.chord_expert_head.choice.path == expected_head(family), model.chord_expert_head.choice
    for field in ("loss", "nll_sum", "prob_sum", "weight_sum", "num_tokens"):
        torch.testing.assert_close(out[field], expected[field].to(out[field].dtype), msg=field)
    grads = {name: param.grad for name, param in model.named_parameters()}
    checked = 0
    for name, param in oracle_model.named_parameters():
        if param.grad is None:  # e.g. experts no token was routed to
            assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name
            continue
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked >= len(grads) // 2


# Mixture-of-Experts: the router's load-balancing loss
def test_moe_expert_term_returns_the_models_own_router_aux_loss_as_trl_computes_it():
    from trl.trainer.utils import add_fused_lm_head

    model = build_model("qwen3_moe")
    batch = expert_batch(1)
    out = chord_expert_loss(copy.deepcopy(model), *batch, output_router_logits=True)
    _, own = own_expert_loss(model, *batch, output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, own.aux_loss)
    # GRPOTrainer's own forward (TRL's fused head) computes the same load-balancing loss for its term
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model)
    input_ids, attention_mask, labels = batch
    trl_out = trl_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        output_router_logits=True,
    )
    torch.testing.assert_close(out.aux_loss, trl_out.aux_loss)
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0


def test_moe_sgd_step_follows_the_expert_nll_plus_the_router_aux_loss(tiny_tokenizer, tmp_path):
    coefficient = 0.5  # large, so that leaving the aux loss out shows in every router weight
    model = build_model("qwen3_moe", router_aux_loss_coef=coefficient)
    expert = make_expert_rows(4)
    args = chord_config(
        tmp_path,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_sft_per_device_train_batch_size=len(expert),
        **PLAIN_SGD,
        max_steps=1,
    )
    oracle_model = copy.deepcopy(model)
    trainer = ChordTrainer(
        model=model,
        reward_funcs=odd_char_reward,
        args=args,
        train_dataset=make_rl_prompts(),
        expert_dataset=expert,
        processing_class=tiny_tokenizer,
    )
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == coefficient
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)

    rows = [chat_ids(tiny_tokenizer, row["prompt"] + row["completion"]) for row in expert]
    input_ids = torch.full((len(rows), max(map(len, rows))), tiny_tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for index, (ids, row) in enumerate(zip(rows, expert)):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        attention_mask[index, : len(ids)] = 1
        prompt_length = len(chat_ids(tiny_tokenizer, row["prompt"], add_generation_prompt=True))
        labels[index, prompt_length : len(ids)] = input_ids[index, prompt_length : len(ids)]
    expected, own = own_expert_loss(oracle_model, input_ids, attention_mask, labels, output_router_logits=True)
    (expected.loss + coefficient * own.aux_loss).backward()
    router_names = [name for name in after if "mlp.gate.weight" in name]
    assert router_names
    for name, param in oracle_model.named_parameters():
        expected_update = -PLAIN_SGD["learning_rate"] * (param.grad if param.grad is not None else 0 * param)
        torch.testing.assert_close(after[name] - before[name], expected_update, rtol=1e-4, atol=1e-7, msg=name)
    aux_logged = [entry["chord/expert_aux_loss"] for entry in trainer.state.log_history if "chord/mu" in entry]
    assert aux_logged == [pytest.approx(own.aux_loss.item(), rel=1e-5)]


def chat_ids(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def make_expert_rows(num_examples):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"{i}*3="}] for i in range(num_examples)],
            "completion": [[{"role": "assistant", "content": f"{i * 3}"}] for i in range(num_examples)],
        }
    )


# Quantized bases (bitsandbytes' CPU backend)
def quantized_model(model_dir, **quantization):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(**quantization), device_map="cpu", dtype=torch.float32
    )
    # In eval mode bitsandbytes repacks 4-bit weights for CPU inference, a path autograd cannot go through
    return model.train()


def lora_gradients(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Qwen2 model whose LM head is its own Linear, so that a quantization config can quantize it or leave it."""
    path = str(tmp_path_factory.mktemp("untied-model"))
    # bitsandbytes' CPU kernels want each projection at least 32 wide and 64 deep
    shapes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    build_model("qwen2", tie_word_embeddings=False, **shapes).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_qlora_4bit_base_expert_loss_equals_its_own_logits_and_adapters_get_the_gradient(untied_model_dir):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    model = quantized_model(untied_model_dir, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, param in model.named_parameters():  # LoRA's B starts at 0, which would hide A's gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = expert_batch(2)
    expected, _ = own_expert_loss(model, *batch)
    expected.loss.backward()
    expected_grads = lora_gradients(model)
    model.zero_grad()

    add_expert_loss_head(model.get_base_model(), weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False)
    input_ids, attention_mask, labels = batch
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, chord_expert_loss=True)
    out.loss.backward()
    assert model.get_base_model().chord_expert_head.choice.path == "chunked"  # the head itself is not quantized
    torch.testing.assert_close(out.loss, expected.loss)
    grads = lora_gradients(model)
    assert set(grads) == set(expected_grads) and len(grads) == 2 * 3 * 2  # A and B, 3 modules, 2 layers
    for name, grad in expected_grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(param.grad is None for name, param in model.named_parameters() if "lora_" not in name)


def test_a_quantized_lm_head_is_detected_and_the_exact_fallback_is_taken(untied_model_dir):
    pytest.importorskip("bitsandbytes")
    # 8-bit everywhere, the LM head included: its weight is int8, which no matmul of the chunked head may read
    model = quantized_model(untied_model_dir, load_in_8bit=True, llm_int8_skip_modules=[])
    assert type(model.lm_head).__name__ == "Linear8bitLt" and model.lm_head.weight.dtype == torch.int8
    batch = expert_batch(3)
    with torch.no_grad():
        expected, _ = own_expert_loss(model, *batch)
        out = chord_expert_loss(model, *batch)
    probe = model.chord_expert_head.choice
    assert probe.path == "full_logits" and "Linear8bitLt" in probe.reason, probe
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.nll_sum, expected.nll_sum)


def test_qlora_training_run_moves_only_the_adapters(untied_model_dir, tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    args = chord_config(
        tmp_path,
        chord_mu_valley=0.5,
        learning_rate=5e-2,
        model_init_kwargs={
            "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
            "device_map": "cpu",
            "dtype": torch.float32,
        },
    )
    trainer = ChordTrainer(
        model=untied_model_dir,
        reward_funcs=odd_char_reward,
        args=args,
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_rows(6),
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(param, before[name])}
    assert changed and all("lora_" in name for name in changed)
    sft_losses = [entry["chord/sft_loss"] for entry in trainer.state.log_history if "chord/sft_loss" in entry]
    assert len(sft_losses) == 2 and all(torch.isfinite(torch.tensor(sft_losses)))
