"""The expert term's LM head against full logits differentiated by autograd, and against TRL's fused head."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_chord.expert_head import add_expert_loss_head, has_plain_lm_head, weighted_expert_nll
from trl_chord.losses import TOKEN_WEIGHTINGS, expert_sft_loss, token_weights


def _head_inputs(seed=0, num_tokens=7, hidden_size=5, vocab_size=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, dtype=dtype)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=dtype)
    bias = torch.randn(vocab_size, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    return hidden, weight, bias, targets


def _oracle(hidden, weight, bias, targets, weighting, upstream):
    """Full logits, `log_softmax`, the weights of `token_weights`, and autograd."""
    hidden, weight, bias = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logits = hidden @ weight.t() + bias
    log_softmax = logits.log_softmax(-1)
    logps = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    entropies = -(log_softmax.exp() * log_softmax).sum(-1)
    mask = torch.ones_like(logps)
    out = expert_sft_loss(logps, mask, token_weights(weighting, logps, mask, entropies=entropies, focal_gamma=1.5))
    (out.loss * upstream).backward()
    return out, hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("weighting", TOKEN_WEIGHTINGS)
@pytest.mark.parametrize("tile_tokens", [1, 3, 100], ids=["chunk1", "chunk3", "one-chunk"])
def test_loss_metrics_and_gradients_match_full_logits(weighting, tile_tokens):
    hidden, weight, bias, targets = _head_inputs()
    upstream = 2.5  # the gradient the head stored must be scaled by the one that reaches it
    expected, *expected_grads = _oracle(hidden, weight, bias, targets, weighting, upstream)

    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = weighted_expert_nll(*inputs, targets, weighting, focal_gamma=1.5, tile_bytes=tile_tokens * 4 * 11)
    (out.loss * upstream).backward()

    for field in ("loss", "nll_sum", "prob_sum", "weight_sum", "num_tokens"):
        torch.testing.assert_close(out[field], expected[field].to(out[field].dtype), msg=field)
    for name, tensor, expected_grad in zip(("hidden", "weight", "bias"), inputs, expected_grads):
        torch.testing.assert_close(tensor.grad, expected_grad, msg=name)


def test_frozen_head_gets_no_gradient():
    hidden, weight, bias, targets = _head_inputs(1)
    _, expected_hidden_grad, _, _ = _oracle(hidden, weight, bias, targets, "phi", 1.0)
    hidden.requires_grad_(True)
    weighted_expert_nll(hidden, weight, bias, targets, "phi").loss.backward()
    torch.testing.assert_close(hidden.grad, expected_hidden_grad)
    assert weight.grad is None and bias.grad is None


def test_no_expert_tokens_gives_a_zero_loss_that_backpropagates():
    hidden, weight, bias, targets = _head_inputs(2, num_tokens=0)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = weighted_expert_nll(hidden, weight, None, targets, "uniform")
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
    assert torch.count_nonzero(weight.grad) == 0


def test_bf16_products_stay_close_to_fp32():
    hidden, weight, bias, targets = _head_inputs(3, 64, 32, 97)
    expected, _, expected_weight_grad, _ = _oracle(hidden, weight, bias, targets, "uniform", 1.0)
    hidden, weight, bias = hidden.float(), weight.float().requires_grad_(True), bias.float()
    # bf16 products from fp32 inputs (autocast), over 4 chunks whose weight gradients add up in fp32
    autocast = weighted_expert_nll(
        hidden, weight, bias, targets, "uniform", compute_dtype=torch.bfloat16, tile_bytes=6208
    )
    autocast.loss.backward()
    # bf16 inputs
    bf16 = weighted_expert_nll(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), targets, "uniform").loss
    for loss in (autocast.loss, bf16):
        assert loss.dtype == torch.float32  # the softmax and the loss stay fp32
        torch.testing.assert_close(loss, expected.loss.float(), rtol=2e-2, atol=0)
        assert loss.item() != pytest.approx(expected.loss.item(), rel=1e-6)  # bf16 products really ran
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, expected_weight_grad.float(), rtol=2e-2, atol=1e-3)


def _expert_loss_and_grads(model, weighting, input_ids, labels):
    add_expert_loss_head(model, weighting=weighting, focal_gamma=2.0, cast_lm_head_to_fp32=False)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, chord_expert_loss=True)
    out.loss.backward()
    return out, {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("weighting", ["phi", "entropy"])
def test_plain_head_matches_trls_fused_head_on_the_same_model(tiny_model_dir, weighting):
    # `logit_scale = 1.0` changes no logit, but sends the model through TRL's fused head (TRL knows that field)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scaled = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scaled.config.logit_scale = 1.0
    assert has_plain_lm_head(plain) and not has_plain_lm_head(scaled)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    plain_out, plain_grads = _expert_loss_and_grads(plain, weighting, input_ids, labels)
    scaled_out, scaled_grads = _expert_loss_and_grads(scaled, weighting, input_ids, labels)
    for field in ("loss", "nll_sum", "prob_sum", "weight_sum", "num_tokens"):
        torch.testing.assert_close(plain_out[field], scaled_out[field].to(plain_out[field].dtype), msg=field)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grad, scaled_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert plain_out.num_tokens.item() == (labels[:, 1:] != -100).sum().item()
    # The other calls still reach the model's own forward
    logits = plain(input_ids=input_ids).logits
    assert logits.shape == (2, 9, plain.config.vocab_size)


def test_the_head_never_holds_the_full_logits():
    # Peak live bytes of the head's forward and backward, measured by the benchmark's own profiler-based meter
    from trl_chord.demo.memory import PeakMemory, Variant

    num_tokens, hidden_size, vocab_size = 512, 32, 4096
    hidden, weight, bias, targets = (
        t.float().requires_grad_(True) if t.is_floating_point() else t
        for t in _head_inputs(4, num_tokens, hidden_size, vocab_size)
    )
    full_logits_bytes = num_tokens * vocab_size * 4  # 8 MiB
    tile_bytes = full_logits_bytes // 8

    def chunked_step():
        weighted_expert_nll(hidden, weight, bias, targets, "phi", tile_bytes=tile_bytes).loss.backward()

    def unfused_step():
        log_softmax = (hidden @ weight.t() + bias).log_softmax(-1)
        (-log_softmax.gather(-1, targets[:, None]).mean()).backward()

    meter = PeakMemory(torch.device("cpu"))
    chunked, unfused = (
        meter.measure(Variant(name, None, step))
        for name, step in [("chunked", chunked_step), ("unfused", unfused_step)]
    )
    assert unfused >= 2 * full_logits_bytes  # the oracle meter sees the logits and their log_softmax
    # One tile, its dtype copies, and the fp32 gradients of the head and the hidden states
    gradients_bytes = 4 * (vocab_size * hidden_size + vocab_size + num_tokens * hidden_size)
    assert chunked <= 3 * tile_bytes + 2 * gradients_bytes < full_logits_bytes
