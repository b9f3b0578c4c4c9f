"""
The chunked head's kernel: the weighted NLL of the expert tokens from the LM head's input and weight, a chunk of tokens
at a time, its gradient made in the same pass (or recomputed in the backward), in fp32 or wider.
"""

import math

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..losses import (
    ExpertLossOutput,
    token_metric_sums,
    token_weight_scale,
    unnormalized_token_weight_bound,
    unnormalized_token_weights,
)


# Largest fp32 `(tokens, vocab)` tile the head allocates at once: 440 tokens of a 150k vocabulary, 8k of an 8k one
EXPERT_HEAD_TILE_BYTES = 256 << 20
# With fp16 products, `d loss / d logit` is scaled so that its largest possible value is this before the cast to fp16
# (2**14 leaves headroom below fp16's 65504): `p_v * w / N` of a 32k vocabulary and 1k tokens would otherwise underflow
FP16_GRADIENT_PEAK = 2.0**14


def _add_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`accumulator += a @ b` at the accumulator's precision: summing chunk products rounded to bf16 skews training."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif accumulator.device.type == "cuda":
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    else:
        accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


def fp16_gradient_scale(largest_coefficient: float) -> float:
    """
    Power of two that `d loss / d logit` is multiplied by before its cast to fp16 (and divided by after the products):
    `|d loss / d logit_v| <= max(w * c)` (token weight times aggregation factor), so with `largest_coefficient` that
    bound, the scaled values stay below [`FP16_GRADIENT_PEAK`].
    """
    if not largest_coefficient > 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(FP16_GRADIENT_PEAK / largest_coefficient))


def _chunk_log_softmax(hidden_chunk, weight, bias, float_dtype):
    logits = hidden_chunk @ weight.t()
    if bias is not None:
        logits += bias
    return logits.to(float_dtype).log_softmax(-1)


def _accumulate_chunk_gradients(probs, chunk_targets, coefficients, hidden_chunk, weight, grads, rows, gradient_scale):
    """
    Add one chunk's part of the gradients of `sum_t coefficient_t * -log p_t[target_t]` to `grads` (hidden, weight,
    bias; fp32 or wider), given the chunk's softmax `probs`, which is overwritten.
    """
    grad_hidden, grad_weight, grad_bias = grads
    coefficients = coefficients.unsqueeze(-1)
    # d(-log p_target) / d(logit_v) = p_v - 1[v = target], times the token's coefficient
    grad_logits = probs.mul_(coefficients).scatter_add_(-1, chunk_targets, -coefficients)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
    if gradient_scale != 1.0:
        grad_logits.mul_(gradient_scale)
    grad_logits = grad_logits.to(hidden_chunk.dtype)
    if grad_hidden is not None:
        _add_product(grad_hidden[rows], grad_logits, weight)
    if grad_weight is not None:
        _add_product(grad_weight, grad_logits.t(), hidden_chunk)


def _zero_gradients(tensors: tuple, needed: tuple, float_dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(
        torch.zeros(tensor.shape, device=device, dtype=float_dtype) if need else None
        for tensor, need in zip(tensors, needed)
    )


def _scan_chunks(hidden, head_weight, head_bias, targets, token_scales, options, grads, gradient_scale):
    """
    Each token's log-probability of its target and unnormalised weight, a chunk of `chunk_tokens` tokens at a time;
    with `grads`, each chunk's part of the gradients is added to them.
    """
    weighting, focal_gamma, compute_dtype, float_dtype, chunk_tokens = options
    num_tokens = hidden.shape[0]
    log_probs = torch.empty(num_tokens, device=hidden.device, dtype=float_dtype)
    raw_weights = torch.empty(num_tokens, device=hidden.device, dtype=float_dtype)
    for start in range(0, num_tokens, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, num_tokens))
        hidden_chunk = hidden[rows].to(compute_dtype)
        chunk_targets = targets[rows].unsqueeze(-1)
        log_softmax = _chunk_log_softmax(hidden_chunk, head_weight, head_bias, float_dtype)
        log_probs[rows] = log_softmax.gather(-1, chunk_targets).squeeze(-1)
        probs = log_softmax.exp_() if weighting != "entropy" else log_softmax.exp()
        entropies = -(probs * log_softmax).sum(-1) if weighting == "entropy" else None
        del log_softmax
        raw_weights[rows] = unnormalized_token_weights(
            weighting, log_probs[rows], entropies=entropies, focal_gamma=focal_gamma
        )
        if grads is not None:
            coefficients = raw_weights[rows] * token_scales[rows]
            _accumulate_chunk_gradients(
                probs, chunk_targets, coefficients, hidden_chunk, head_weight, grads, rows, gradient_scale
            )
        del probs
    return log_probs, raw_weights


class _WeightedNLLFunction(torch.autograd.Function):
    """
    `sum_t c_t * w_t * -log softmax(hidden_t @ weight.T + bias)[target_t]` (`w_t` detached token weights, `c_t` the
    aggregation factors), and the detached log-probabilities and weights. With `gradient_in_forward` the gradients are
    made in the forward (three products, held until the backward); otherwise the backward recomputes each chunk's
    logits (four products), so that no `(vocab, hidden)` gradient waits through a GRPO pass in between.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        token_scales,
        weighting,
        focal_gamma,
        normalization,
        compute_dtype,
        chunk_tokens,
        gradient_in_forward,
    ):
        needs_grads = ctx.needs_input_grad[:3]
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        # The softmax and the gradient sums run in at least fp32
        float_dtype = torch.promote_types(compute_dtype, torch.float32)
        fp16_products = compute_dtype == torch.float16 and hidden.shape[0] > 0
        gradient_scale = 1.0
        if fp16_products and gradient_in_forward:
            # The weights are not known before the chunks are: their bound sizes the scale (the micro-batch factor of
            # "entropy" is applied after the products)
            weight_bound = unnormalized_token_weight_bound(weighting, weight.shape[0], focal_gamma)
            gradient_scale = fp16_gradient_scale(weight_bound * token_scales.max().item())
        grads = (None, None, None)
        if gradient_in_forward:
            grads = _zero_gradients((hidden, weight, bias), needs_grads, float_dtype, hidden.device)
        head_weight, head_bias = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
        options = (weighting, focal_gamma, compute_dtype, float_dtype, chunk_tokens)
        accumulated = grads if gradient_in_forward and any(needs_grads) else None
        log_probs, raw_weights = _scan_chunks(
            hidden, head_weight, head_bias, targets, token_scales, options, accumulated, gradient_scale
        )

        # A mean-normalised weighting ("entropy", or any with normalization="mean") divides every weight by their
        # mean, known only now: the gradients take the same factor
        scale = token_weight_scale(weighting, raw_weights, torch.ones_like(raw_weights), normalization)
        weights = raw_weights * scale
        loss = -(log_probs * weights * token_scales).sum()
        ctx.mark_non_differentiable(log_probs, weights)
        ctx.gradient_in_forward = gradient_in_forward
        if gradient_in_forward:
            for index, grad in enumerate(grads):
                if grad is not None:
                    # Bias sums are taken before the fp16 scaling
                    grad.mul_(scale if index == 2 else scale / gradient_scale)
            ctx.save_for_backward(*grads)
        else:
            coefficients = weights * token_scales
            if fp16_products:
                # The backward multiplies by the final (e.g. mean-normalised) weights, which no bound caps: size the
                # scale from the largest one
                gradient_scale = fp16_gradient_scale(coefficients.max().item())
            ctx.save_for_backward(hidden, targets, coefficients)
            # The head is kept by reference, not saved: under ZeRO-3 its data is gathered again in the backward
            ctx.head = (weight, bias)
            ctx.options = (compute_dtype, chunk_tokens, gradient_scale)
        return loss, log_probs, weights

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.gradient_in_forward:
            grads = ctx.saved_tensors
        else:
            grads = _recomputed_gradients(ctx)
        grads = tuple(
            None if grad is None else (grad * grad_loss).to(dtype) for grad, dtype in zip(grads, ctx.input_dtypes)
        )
        return *grads, None, None, None, None, None, None, None, None


def _recomputed_gradients(ctx) -> tuple:
    """The gradients of the unscaled loss, from the hidden states and weights kept by the forward."""
    hidden, targets, coefficients = ctx.saved_tensors
    weight, bias = ctx.head
    compute_dtype, chunk_tokens, gradient_scale = ctx.options
    float_dtype = torch.promote_types(compute_dtype, torch.float32)
    num_tokens = hidden.shape[0]
    with maybe_gather_lm_head_ctx(weight, bias):
        grads = _zero_gradients((hidden, weight, bias), ctx.needs_input_grad[:3], float_dtype, hidden.device)
        head_weight, head_bias = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
        for start in range(0, num_tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, num_tokens))
            hidden_chunk = hidden[rows].to(compute_dtype)
            probs = _chunk_log_softmax(hidden_chunk, head_weight, head_bias, float_dtype).exp_()
            _accumulate_chunk_gradients(
                probs,
                targets[rows].unsqueeze(-1),
                coefficients[rows],
                hidden_chunk,
                head_weight,
                grads,
                rows,
                gradient_scale,
            )
            del probs
    for index in (0, 1):
        if grads[index] is not None and gradient_scale != 1.0:
            grads[index].div_(gradient_scale)
    return grads


def weighted_expert_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    weighting: str,
    focal_gamma: float = 2.0,
    compute_dtype: torch.dtype | None = None,
    tile_bytes: int = EXPERT_HEAD_TILE_BYTES,
    gradient_in_forward: bool = True,
    token_scales: torch.Tensor | None = None,
    normalization: str = "none",
) -> ExpertLossOutput:
    """
    The expert SFT loss ([`~trl_chord.losses.expert_sft_loss`] with [`~trl_chord.losses.token_weights`]) straight from
    the LM head's input: `sum(token_scales * -logp * stopgrad(w))` over the rows of `hidden` (the positions that
    predict expert tokens, `(num_tokens, hidden_size)`), `targets` their tokens, and its metric sums.

    `weight` and `bias` are the head's; `token_scales` each token's aggregation factor (the token mean when not given);
    `compute_dtype` the dtype of the head's products (`hidden`'s by default; fp16 scales `d loss / d logit` into its
    range); `tile_bytes` bounds the fp32 `(tokens, vocab)` tile of a chunk; `gradient_in_forward` makes the gradients
    in the forward (for a backward that follows at once) rather than recomputing the logits in the backward.
    """
    float_dtype = torch.promote_types(compute_dtype or hidden.dtype, torch.float32)
    if token_scales is None:
        token_scales = torch.full(targets.shape, 1.0 / max(targets.numel(), 1), device=hidden.device)
    chunk_tokens = max(1, tile_bytes // (4 * weight.shape[0]))
    # The products run in `compute_dtype` exactly, whatever autocast would choose for them
    token_scales = token_scales.to(device=hidden.device, dtype=float_dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, log_probs, weights = _WeightedNLLFunction.apply(
            hidden,
            weight,
            bias,
            targets,
            token_scales,
            weighting,
            focal_gamma,
            normalization,
            compute_dtype or hidden.dtype,
            chunk_tokens,
            gradient_in_forward,
        )
    return ExpertLossOutput(
        loss=loss, token_log_probs=log_probs, **token_metric_sums(log_probs, weights, token_scales)
    )
