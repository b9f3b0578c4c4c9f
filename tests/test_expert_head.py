"""The expert term's LM head against full logits differentiated by autograd, and against TRL's fused head: both
gradient modes, fp16, the memory it holds between forward and backward, and which head the probe picks."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from trl_chord.expert_head.chunked_nll import weighted_expert_nll
from trl_chord.expert_head.forward import add_expert_loss_head
from trl_chord.losses import TOKEN_WEIGHTINGS, expert_sft_loss, token_weights


def _head_inputs(seed=0, num_tokens=7, hidden_size=5, vocab_size=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator, dtype=dtype)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=dtype)
    bias = torch.randn(vocab_size, generator=generator, dtype=dtype)
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    return hidden, weight, bias, targets


def _oracle(hidden, weight, bias, targets, weighting, upstream, normalization="none"):
    """Full logits, `log_softmax`, the weights of `token_weights`, and autograd."""
    hidden, weight, bias = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logits = hidden @ weight.t() + bias
    log_softmax = logits.log_softmax(-1)
    logps = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    entropies = -(log_softmax.exp() * log_softmax).sum(-1)
    mask = torch.ones_like(logps)
    weights = token_weights(weighting, logps, mask, entropies, focal_gamma=1.5, normalization=normalization)
    out = expert_sft_loss(logps, mask, weights)
    (out.loss * upstream).backward()
    return out, hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("weighting", TOKEN_WEIGHTINGS)
@pytest.mark.parametrize("tile_tokens", [1, 3, 100], ids=["chunk1", "chunk3", "one-chunk"])
def test_loss_metrics_and_gradients_match_full_logits(weighting, tile_tokens, gradient_in_forward):
    hidden, weight, bias, targets = _head_inputs()
    upstream = 2.5  # the gradient the head stored must be scaled by the one that reaches it
    expected, *expected_grads = _oracle(hidden, weight, bias, targets, weighting, upstream)

    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = weighted_expert_nll(
        *inputs,
        targets,
        weighting,
        focal_gamma=1.5,
        tile_bytes=tile_tokens * 4 * 11,
        gradient_in_forward=gradient_in_forward,
    )
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


def _expert_loss_and_grads(model, weighting, input_ids, labels, path="auto"):
    add_expert_loss_head(model, weighting=weighting, focal_gamma=2.0, cast_lm_head_to_fp32=False, head=path)
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, chord_expert_loss=True)
    out.loss.backward()
    return out, {name: param.grad for name, param in model.named_parameters()}


def _expert_batch(vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 7:] = -100  # padding
    return input_ids, labels


@pytest.mark.parametrize("path", ["trl_fused", "full_logits"])
@pytest.mark.parametrize("weighting", ["phi", "entropy"])
def test_chunked_head_matches_the_other_heads_on_the_same_model(tiny_model_dir, weighting, path):
    chunked = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids, labels = _expert_batch(chunked.config.vocab_size)
    chunked_out, chunked_grads = _expert_loss_and_grads(chunked, weighting, input_ids, labels)
    assert chunked.chord_expert_head.choice.path == "chunked"
    other_out, other_grads = _expert_loss_and_grads(other, weighting, input_ids, labels, path=path)
    for field in ("loss", "nll_sum", "prob_sum", "weight_sum", "num_tokens"):
        torch.testing.assert_close(chunked_out[field], other_out[field].to(chunked_out[field].dtype), msg=field)
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(grad, other_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert chunked_out.num_tokens.item() == (labels[:, 1:] != -100).sum().item()
    # The other calls still reach the model's own forward
    logits = chunked(input_ids=input_ids).logits
    assert logits.shape == (2, 9, chunked.config.vocab_size)


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


def _bytes_held_after(step):
    """`step()`, and the bytes it allocated that are still alive when it returns (profiler allocation events)."""
    from trl_chord.demo.memory import allocation_bytes, memory_profiler

    with memory_profiler() as profiler:
        result = step()
    return result, sum(allocation_bytes(profiler))


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
def test_what_the_head_holds_between_forward_and_backward(gradient_in_forward):
    num_tokens, hidden_size, vocab_size = 512, 32, 4096
    head_gradient_bytes = 4 * vocab_size * hidden_size
    hidden, weight, bias, targets = (
        t.float().requires_grad_(True) if t.is_floating_point() else t
        for t in _head_inputs(5, num_tokens, hidden_size, vocab_size)
    )
    out, held = _bytes_held_after(
        lambda: weighted_expert_nll(
            hidden,
            weight,
            bias,
            targets,
            "phi",
            tile_bytes=64 * 4 * vocab_size,
            gradient_in_forward=gradient_in_forward,
        )
    )
    if gradient_in_forward:  # the head's gradient, waiting for the backward
        assert held >= head_gradient_bytes
    else:  # per-token values only: the hidden states are the caller's
        assert held < 16 * num_tokens * 4 < head_gradient_bytes / 4
    out.loss.backward()
    assert torch.count_nonzero(weight.grad) > 0


def _fp16_case(seed=0, num_tokens=1024, vocab_size=32768, hidden_size=64):
    """The issue's case: a 1k-token expert micro-batch over a 32k vocabulary, and its lm_head gradient in fp64."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    input_ids = torch.randint(0, vocab_size, (1, num_tokens + 1), generator=torch.Generator().manual_seed(seed))
    reference = Qwen2ForCausalLM(config).double()
    reference.load_state_dict(model.state_dict())
    log_probs = reference(input_ids=input_ids).logits[0, :-1].log_softmax(-1)
    (-log_probs.gather(-1, input_ids[0, 1:, None]).mean()).backward()
    return model, input_ids, reference.lm_head.weight.grad


def _relative_error(grad, reference):
    return ((grad.double() - reference).norm() / reference.norm()).item()


def test_fp16_head_gradient_is_as_accurate_as_standard_amp():
    model, input_ids, reference = _fp16_case()
    loss_scale = 2.0**16  # GradScaler's initial scale

    # Standard fp16 AMP: fp16 logits, fp32 loss, a scaled backward
    amp_model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = amp_model(input_ids=input_ids).logits[0, :-1]
    assert logits.dtype == torch.float16
    log_probs = logits.float().log_softmax(-1).gather(-1, input_ids[0, 1:, None])
    (-log_probs.mean() * loss_scale).backward()
    amp_error = _relative_error(amp_model.lm_head.weight.grad / loss_scale, reference)

    labels = input_ids.clone()
    labels[0, 0] = -100
    for gradient_in_forward in (True, False):
        chord_model = copy.deepcopy(model)
        add_expert_loss_head(chord_model, weighting="uniform", focal_gamma=2.0, cast_lm_head_to_fp32=False)
        with torch.autocast("cpu", dtype=torch.float16):
            out = chord_model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                labels=labels,
                chord_expert_loss=True,
                chord_head_gradient_in_forward=gradient_in_forward,
            )
        (out.loss * loss_scale).backward()
        error = _relative_error(chord_model.lm_head.weight.grad / loss_scale, reference)
        assert error <= 3 * amp_error, (gradient_in_forward, error, amp_error)


def _peaked_head_case(num_uniform, peak_scale, seed=0, num_tokens=512, vocab_size=4096, hidden_size=64):
    """Hidden states under which the policy knows nothing of `num_uniform` tokens (all-zero hidden states: the uniform
    distribution, p = 1 / V, entropy log V) and favours the others' targets, by far (`peak_scale` 30: p ~ 0.99) or
    about evenly (10: p ~ 0.6). A few of one kind among many of the other make mean-normalised weights large."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) / hidden_size**0.5
    targets = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    hidden = peak_scale * weight[targets] + 0.1 * torch.randn(num_tokens, hidden_size, generator=generator)
    hidden[:num_uniform] = 0.0
    return hidden, weight, targets


# For each weighting, a few tokens whose weight is far above the others': the large normalised weights
LARGE_NORMALISED_WEIGHTS = {
    "entropy": dict(num_uniform=4, peak_scale=30.0),  # a few unknown tokens among certain ones: high entropy
    "focal": dict(num_uniform=4, peak_scale=30.0),  # the same: (1 - p)^gamma ~ 1 there, ~0 elsewhere
    "phi": dict(num_uniform=508, peak_scale=10.0),  # a few even tokens among unknown ones: p(1 - p) ~ 1/4 there
    "is": dict(num_uniform=508, peak_scale=30.0),  # a few certain tokens among unknown ones: p ~ 1 there
}


@pytest.mark.parametrize(
    "weighting, normalization", [("entropy", "none"), ("phi", "mean"), ("is", "mean"), ("focal", "mean")]
)
def test_fp16_normalised_weights_stay_finite_and_as_accurate_as_amp_in_both_head_modes(weighting, normalization):
    # Mean-normalised weights have no bound (phi's 1/4 no longer holds): the largest is about max / mean
    hidden, weight, targets = _peaked_head_case(**LARGE_NORMALISED_WEIGHTS[weighting])
    bias = torch.zeros(len(weight), dtype=torch.float64)
    _, _, expected_weight_grad, _ = _oracle(
        hidden.double(), weight.double(), bias, targets, weighting, 1.0, normalization
    )
    loss_scale = 2.0**16

    # Standard fp16 AMP: fp16 logits, the loss (with the same detached weights) in fp32, a scaled backward
    amp_weight = weight.clone().requires_grad_(True)
    logits = (hidden.half() @ amp_weight.half().t()).float()
    log_softmax = logits.log_softmax(-1)
    entropies = -(log_softmax.exp() * log_softmax).sum(-1)
    logps = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    mask = torch.ones_like(logps)
    amp_weights = token_weights(weighting, logps, mask, entropies, focal_gamma=1.5, normalization=normalization)
    (expert_sft_loss(logps, mask, amp_weights).loss * loss_scale).backward()
    amp_error = _relative_error(amp_weight.grad / loss_scale, expected_weight_grad)
    assert amp_weights.max().item() > 20  # the normalised weights reach far beyond any weighting's bound

    for gradient_in_forward in (True, False):
        chord_weight = weight.clone().requires_grad_(True)
        out = weighted_expert_nll(
            hidden,
            chord_weight,
            None,
            targets,
            weighting,
            focal_gamma=1.5,
            compute_dtype=torch.float16,
            gradient_in_forward=gradient_in_forward,
            normalization=normalization,
        )
        (out.loss * loss_scale).backward()
        assert torch.isfinite(chord_weight.grad).all(), gradient_in_forward
        error = _relative_error(chord_weight.grad / loss_scale, expected_weight_grad)
        assert error <= 3 * amp_error, (gradient_in_forward, error, amp_error)


def test_grad_scaler_skips_a_step_whose_expert_gradient_overflows_and_takes_the_next():
    model, input_ids, _ = _fp16_case(seed=1, num_tokens=64, vocab_size=512, hidden_size=32)
    add_expert_loss_head(model, weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False)
    labels = input_ids.clone()
    labels[0, 0] = -100
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def scaled_step(scaler):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, chord_expert_loss=True
            )
        scaler.scale(out.loss).backward()
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        expected = before["lm_head.weight"] - 0.1 * model.lm_head.weight.grad / scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
        return changed, expected

    # 2**64 times the expert gradient overflows fp16 in the backbone's backward: the scaler skips the step and halves
    # its scale, as for any other overflow
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**64)
    changed, _ = scaled_step(scaler)
    assert changed == [] and scaler.get_scale() == 2.0**63
    # At 2**8 nothing overflows: the step is the unscaled gradient's
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    changed, expected = scaled_step(scaler)
    assert "lm_head.weight" in changed
    torch.testing.assert_close(model.lm_head.weight, expected)


class _DoubledLogitsModel(Qwen2ForCausalLM):
    """A model family with a logit transform no config field names (TRL's fused head does not know it)."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


class _HalvedHiddenModel(Qwen2ForCausalLM):
    """Scales the last hidden state before its LM head, as MiniCPM does."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden_states[:, -logits_to_keep:] / 2))


class _WrappedLinear(torch.nn.Linear):
    """A head that is a Linear but computes something else (like a quantized Linear's own forward)."""

    def forward(self, hidden_states):
        return super().forward(hidden_states.round())


def _own_expert_loss_and_grads(model, input_ids, labels, weighting="phi"):
    """The oracle: the model's own full logits, `token_weights` and `expert_sft_loss`, and autograd."""
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    out = expert_sft_loss(log_probs, mask, token_weights(weighting, log_probs, mask))
    out.loss.backward()
    return out, {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    "model_class, head_class, expected_reason",
    [
        (_DoubledLogitsModel, None, "transforms the LM head's output"),
        (_HalvedHiddenModel, None, "input is not the backbone's last hidden state"),
        (Qwen2ForCausalLM, _WrappedLinear, "the LM head is a _WrappedLinear"),
    ],
    ids=["logit-transform", "hidden-transform", "head-module"],
)
def test_a_head_the_chunked_path_cannot_compute_falls_back_to_the_models_own_logits(
    tiny_model_dir, model_class, head_class, expected_reason
):
    model = model_class.from_pretrained(tiny_model_dir)
    if head_class is not None:
        head = head_class(model.config.hidden_size, model.config.vocab_size, bias=False)
        head.load_state_dict(model.lm_head.state_dict())
        model.lm_head = head
    oracle_model = copy.deepcopy(model)
    input_ids, labels = _expert_batch(model.config.vocab_size, seed=3)
    out, grads = _expert_loss_and_grads(model, "phi", input_ids, labels)
    assert model.chord_expert_head.choice.path == "full_logits"
    assert expected_reason in model.chord_expert_head.choice.reason
    expected, expected_grads = _own_expert_loss_and_grads(oracle_model, input_ids, labels)
    torch.testing.assert_close(out.loss, expected.loss)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
