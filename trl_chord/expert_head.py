"""
The expert term's LM head: the weighted token-mean NLL of the expert tokens, computed in token chunks together with
its gradient, so that neither the `(tokens, vocab)` logits nor a recomputation of them in the backward are needed.
"""

import functools
import types

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from .losses import ExpertLossOutput, expert_sft_loss, token_weight_scale, token_weights, unnormalized_token_weights


# Largest fp32 `(tokens, vocab)` tile the head allocates at once: 440 tokens of a 150k vocabulary, 8k of an 8k one
EXPERT_HEAD_TILE_BYTES = 256 << 20

# Config fields through which some models scale or cap their logits; TRL's fused head knows each of them
_LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def has_plain_lm_head(model: PreTrainedModel) -> bool:
    """Whether the model's logits are exactly `hidden @ lm_head.weight.T (+ bias)`, with no scaling or capping."""
    text_config = model.config.get_text_config()
    return all(getattr(text_config, field, None) is None for field in _LOGIT_TRANSFORM_FIELDS)


def _add_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`accumulator += a @ b` at the accumulator's precision: summing chunk products rounded to bf16 skews training."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    else:
        accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


class _WeightedNLLFunction(torch.autograd.Function):
    """
    `sum_t w_t * -log softmax(hidden_t @ weight.T + bias)[target_t] / N` over `N` tokens, with `w_t` detached token
    weights, and the detached per-token log-probabilities and weights for metrics.

    The weights depend only on each token's own distribution (and, for "entropy", one scale over all tokens), so the
    gradient of every input is known once a chunk's softmax is: it is accumulated during the forward, and the backward
    only scales it by the incoming gradient. This is the three products of a plain LM head's forward and backward
    (TRL's chunked kernel recomputes the logits in its backward: four), and one `(chunk, vocab)` fp32 tile.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weighting, focal_gamma, compute_dtype, chunk_tokens):
        needs_hidden_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        num_tokens = hidden.shape[0]
        # The softmax and the gradient sums run in at least fp32
        float_dtype = torch.promote_types(compute_dtype, torch.float32)
        float_options = {"device": hidden.device, "dtype": float_dtype}
        grad_hidden = torch.empty(hidden.shape, **float_options) if needs_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, **float_options) if needs_weight_grad else None
        grad_bias = torch.zeros(bias.shape, **float_options) if needs_bias_grad else None
        log_probs = torch.empty(num_tokens, **float_options)
        raw_weights = torch.empty(num_tokens, **float_options)
        weight = weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)

        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            hidden_chunk = hidden[start:end].to(compute_dtype)
            chunk_targets = targets[start:end].unsqueeze(-1)
            logits = hidden_chunk @ weight.t()
            if bias is not None:
                logits += bias
            log_softmax = logits.to(float_dtype).log_softmax(-1)
            del logits
            log_probs[start:end] = log_softmax.gather(-1, chunk_targets).squeeze(-1)
            probs = log_softmax.exp_() if weighting != "entropy" else log_softmax.exp()
            entropies = -(probs * log_softmax).sum(-1) if weighting == "entropy" else None
            del log_softmax
            raw_weights[start:end] = unnormalized_token_weights(
                weighting, log_probs[start:end], entropies=entropies, focal_gamma=focal_gamma
            )
            if not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
                continue
            # d(-log p_target) / d(logit_v) = p_v - 1[v = target], times the token's weight over the token count
            coefficients = (raw_weights[start:end] / max(num_tokens, 1)).unsqueeze(-1)
            grad_logits = probs.mul_(coefficients).scatter_add_(-1, chunk_targets, -coefficients)
            if needs_bias_grad:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(compute_dtype)
            if needs_hidden_grad:
                grad_hidden[start:end] = grad_logits @ weight
            if needs_weight_grad:
                _add_product(grad_weight, grad_logits.t(), hidden_chunk)
            del probs, grad_logits

        # "entropy" divides every weight by their mean, known only now: the gradients take the same factor
        scale = token_weight_scale(weighting, raw_weights, torch.ones_like(raw_weights))
        weights = raw_weights * scale
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(scale)
        loss = -(log_probs * weights).sum() / max(num_tokens, 1)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(log_probs, weights)
        return loss, log_probs, weights

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = tuple(
            None if grad is None else (grad * grad_loss).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)
        )
        return *grads, None, None, None, None, None


def weighted_expert_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    weighting: str,
    focal_gamma: float = 2.0,
    compute_dtype: torch.dtype | None = None,
    tile_bytes: int = EXPERT_HEAD_TILE_BYTES,
) -> ExpertLossOutput:
    """
    The expert SFT loss of [`expert_sft_loss`] with the weights of [`token_weights`], straight from the LM head's
    input: the token mean of `-logp * stopgrad(w)` over the rows of `hidden`, and its metric sums.

    Args:
        hidden (`torch.Tensor` of shape `(num_tokens, hidden_size)`):
            Hidden states of the positions that predict expert tokens (and only those).
        weight (`torch.Tensor` of shape `(vocab_size, hidden_size)`) and bias (`torch.Tensor` or `None`):
            The LM head.
        targets (`torch.Tensor` of shape `(num_tokens,)`):
            The expert token each row predicts.
        weighting (`str`) and focal_gamma (`float`):
            As in [`token_weights`].
        compute_dtype (`torch.dtype`, *optional*):
            Dtype of the head's products (the softmax runs in at least fp32); defaults to `hidden`'s.
        tile_bytes (`int`, *optional*):
            Bound on the fp32 `(tokens, vocab)` tile: the tokens are processed in chunks that fit it.
    """
    chunk_tokens = max(1, tile_bytes // (4 * weight.shape[0]))
    # The products run in `compute_dtype` exactly, whatever autocast would choose for them
    with torch.autocast(hidden.device.type, enabled=False):
        loss, log_probs, weights = _WeightedNLLFunction.apply(
            hidden, weight, bias, targets, weighting, focal_gamma, compute_dtype or hidden.dtype, chunk_tokens
        )
    return ExpertLossOutput(
        loss=loss,
        nll_sum=-log_probs.sum(),
        prob_sum=log_probs.exp().sum(),
        weight_sum=weights.sum(),
        num_tokens=torch.tensor(float(targets.numel()), device=log_probs.device),
    )


def add_expert_loss_head(
    model: PreTrainedModel, weighting: str, focal_gamma: float, cast_lm_head_to_fp32: bool
) -> None:
    """
    Let `model(input_ids, attention_mask, labels, chord_expert_loss=True)` return the expert SFT loss as an
    [`ExpertLossOutput`], at temperature 1, through the model's forward (so DDP, DeepSpeed and PEFT wrappers see the
    call); every other call goes to the forward the model had.

    Models with a plain LM head use [`weighted_expert_nll`] on the positions with a label. Models that scale or cap
    their logits go through TRL's fused LM head (`add_fused_lm_head`), which knows each of those transforms, and the
    loss is built from its per-token log-probabilities.
    """
    original_forward = model.forward
    trl_head_forward = None
    if not has_plain_lm_head(model):
        outputs = ("log_probs", "entropy") if weighting == "entropy" else ("log_probs",)
        add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
        trl_head_forward = model.forward

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, chord_expert_loss=False, labels=None, **kwargs):
        if not chord_expert_loss:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        if trl_head_forward is not None:
            output = trl_head_forward(*args, labels=labels, fused_lm_head=True, **kwargs)
            weights = token_weights(
                weighting, output.log_probs, output.label_mask, entropies=output.entropy, focal_gamma=focal_gamma
            )
            return expert_sft_loss(output.log_probs, output.label_mask, weights)

        # The backbone and the head are looked up on each call, since FSDP and PEFT replace them after patching
        hidden_states = self.base_model(*args, use_cache=False, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it once for all chunks
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden_states = hidden_states[mask.to(hidden_states.device)].to(weight.device)
        if cast_lm_head_to_fp32:
            hidden_states, compute_dtype = hidden_states.float(), torch.float32
        elif torch.is_autocast_enabled(hidden_states.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden_states.device.type)
        else:
            compute_dtype = hidden_states.dtype
        with maybe_gather_lm_head_ctx(weight, bias):
            return weighted_expert_nll(
                hidden_states, weight, bias, labels[mask].to(weight.device), weighting, focal_gamma, compute_dtype
            )

    model.forward = types.MethodType(forward, model)
