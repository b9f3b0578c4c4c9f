"""
The expert term's LM head: the weighted token-mean NLL of the expert tokens, computed in token chunks, so that the
`(tokens, vocab)` logits never exist at once.

Which head a model gets is decided once, from the model itself (`probe_lm_head`), never from a list of config fields:

- `"chunked"`: the logits are exactly `lm_head(last_hidden_state)` and `lm_head` is a plain `nn.Linear` with a plain
  floating-point weight. [`weighted_expert_nll`] then computes the loss from the hidden states and the head's weight.
- `"trl_fused"`: the model transforms its logits after the head (Gemma's softcapping, Cohere's `logit_scale`,
  Granite's `logits_scaling`, ...) and TRL's fused LM head, which knows those transforms, reproduces the model's own
  log-probabilities on large logits.
- `"full_logits"`: anything else (a quantized or wrapped head, a transform TRL does not know): the model's own forward
  and its full logits, exact by construction and costlier in memory.
"""

import functools
import math
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from transformers import PreTrainedModel
from transformers.utils import logging
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from .losses import (
    ExpertLossOutput,
    expert_sft_loss,
    token_loss_scales,
    token_weight_scale,
    token_weights,
    unnormalized_token_weight_bound,
    unnormalized_token_weights,
)


logger = logging.get_logger(__name__)

# Largest fp32 `(tokens, vocab)` tile the head allocates at once: 440 tokens of a 150k vocabulary, 8k of an 8k one
EXPERT_HEAD_TILE_BYTES = 256 << 20
# With fp16 products, `d loss / d logit` is scaled so that its largest possible value is this before the cast to fp16
# (2**14 leaves headroom below fp16's 65504): `p_v * w / N` of a 32k vocabulary and 1k tokens would otherwise underflow
FP16_GRADIENT_PEAK = 2.0**14
# Magnitude of the logits the probe makes the model produce: transforms such as softcapping show at this size
PROBE_LOGIT_MAGNITUDE = 50.0
PROBE_TOKENS = 8


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
    Power of two that `d loss / d logit` is multiplied by before it is cast to fp16 (and divided by after the
    products, exactly). `|d loss / d logit_v| = |p_v - 1[v = target]| * w * c <= max(w * c)`, with `w` the token's
    weight and `c` its factor in the aggregated loss (`1 / N` for a token mean): given a bound on `w * c`
    (`largest_coefficient`), the scaled values stay below [`FP16_GRADIENT_PEAK`] and the small ones keep fp16's
    precision, as a GradScaler's scale does for a plain head.
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


class _WeightedNLLFunction(torch.autograd.Function):
    """
    `sum_t c_t * w_t * -log softmax(hidden_t @ weight.T + bias)[target_t]`, with `w_t` detached token weights and `c_t`
    each token's factor in the aggregation (`1 / N` for a token mean), and the detached per-token log-probabilities
    and weights for metrics.

    The weights depend only on each token's own distribution (and, for "entropy", one scale over all tokens), so the
    gradients are known once a chunk's softmax is. With `gradient_in_forward`, they are accumulated during the forward
    and the backward only scales them: the three products of a plain head's forward and backward, for a backward that
    follows at once. Otherwise the forward keeps only the hidden states and per-token weights, and the backward
    recomputes each chunk's logits (four products), so that no `(vocab, hidden)` gradient waits through whatever runs
    between the two (the GRPO pass, when both terms share one backward under DeepSpeed or FSDP).
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
        compute_dtype,
        chunk_tokens,
        gradient_in_forward,
    ):
        needs_grads = ctx.needs_input_grad[:3]
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        num_tokens = hidden.shape[0]
        # The softmax and the gradient sums run in at least fp32
        float_dtype = torch.promote_types(compute_dtype, torch.float32)
        float_options = {"device": hidden.device, "dtype": float_dtype}
        fp16_products = compute_dtype == torch.float16 and num_tokens > 0
        gradient_scale = 1.0
        if fp16_products and gradient_in_forward:
            # The weights are not known before the chunks are: their bound sizes the scale (the micro-batch factor of
            # "entropy" is applied after the products)
            weight_bound = unnormalized_token_weight_bound(weighting, weight.shape[0], focal_gamma)
            gradient_scale = fp16_gradient_scale(weight_bound * token_scales.max().item())
        grads = (None, None, None)
        if gradient_in_forward:
            grads = tuple(
                torch.zeros(tensor.shape, **float_options) if needed else None
                for tensor, needed in zip((hidden, weight, bias), needs_grads)
            )
        log_probs = torch.empty(num_tokens, **float_options)
        raw_weights = torch.empty(num_tokens, **float_options)
        head_weight, head_bias = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)

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
            if gradient_in_forward and any(needs_grads):
                coefficients = raw_weights[rows] * token_scales[rows]
                _accumulate_chunk_gradients(
                    probs, chunk_targets, coefficients, hidden_chunk, head_weight, grads, rows, gradient_scale
                )
            del probs

        # "entropy" divides every weight by their mean, known only now: the gradients take the same factor
        scale = token_weight_scale(weighting, raw_weights, torch.ones_like(raw_weights))
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
        return *grads, None, None, None, None, None, None, None


def _recomputed_gradients(ctx) -> tuple:
    """The gradients of the unscaled loss, from the hidden states and weights kept by the forward."""
    hidden, targets, coefficients = ctx.saved_tensors
    weight, bias = ctx.head
    compute_dtype, chunk_tokens, gradient_scale = ctx.options
    needs_grads = ctx.needs_input_grad[:3]
    float_options = {"device": hidden.device, "dtype": torch.promote_types(compute_dtype, torch.float32)}
    num_tokens = hidden.shape[0]
    with maybe_gather_lm_head_ctx(weight, bias):
        grads = tuple(
            torch.zeros(tensor.shape, **float_options) if needed else None
            for tensor, needed in zip((hidden, weight, bias), needs_grads)
        )
        head_weight, head_bias = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
        for start in range(0, num_tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, num_tokens))
            hidden_chunk = hidden[rows].to(compute_dtype)
            probs = _chunk_log_softmax(hidden_chunk, head_weight, head_bias, float_options["dtype"]).exp_()
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
) -> ExpertLossOutput:
    """
    The expert SFT loss of [`expert_sft_loss`] with the weights of [`token_weights`], straight from the LM head's
    input: the token mean of `-logp * stopgrad(w)` over the rows of `hidden` (or the aggregation `token_scales`
    gives), and its metric sums.

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
            Dtype of the head's products (the softmax and the gradient sums run in at least fp32); defaults to
            `hidden`'s. With fp16, `d loss / d logit` is scaled into fp16's range before its products.
        tile_bytes (`int`, *optional*):
            Bound on the fp32 `(tokens, vocab)` tile: the tokens are processed in chunks that fit it.
        gradient_in_forward (`bool`, *optional*, defaults to `True`):
            Compute the gradients during the forward (three head products; they are held until the backward), or
            recompute the logits in the backward (four products; only the hidden states are held). The first suits a
            backward that follows at once, the second one that runs after another forward and backward.
        token_scales (`torch.Tensor` of shape `(num_tokens,)`, *optional*):
            Each token's factor in the aggregated loss ([`token_loss_scales`] at the expert tokens); `1 / num_tokens`
            (the token mean) when not given.
    """
    float_dtype = torch.promote_types(compute_dtype or hidden.dtype, torch.float32)
    if token_scales is None:
        token_scales = torch.full(targets.shape, 1.0 / max(targets.numel(), 1), device=hidden.device)
    chunk_tokens = max(1, tile_bytes // (4 * weight.shape[0]))
    # The products run in `compute_dtype` exactly, whatever autocast would choose for them
    with torch.autocast(hidden.device.type, enabled=False):
        loss, log_probs, weights = _WeightedNLLFunction.apply(
            hidden,
            weight,
            bias,
            targets,
            token_scales.to(device=hidden.device, dtype=float_dtype),
            weighting,
            focal_gamma,
            compute_dtype or hidden.dtype,
            chunk_tokens,
            gradient_in_forward,
        )
    return ExpertLossOutput(
        loss=loss,
        token_log_probs=log_probs,
        nll_sum=-log_probs.sum(),
        prob_sum=log_probs.exp().sum(),
        weight_sum=weights.sum(),
        num_tokens=torch.tensor(float(targets.numel()), device=log_probs.device),
    )


def full_tensor_with_averaged_gradient(tensor: DTensor) -> torch.Tensor:
    """
    The whole of an FSDP2-sharded parameter, on every rank, whose gradient goes back to the shards averaged over the
    ranks, as FSDP2 averages the gradients it reduces itself. (`full_tensor()` takes each rank's gradient as the
    gradient: each shard would get its own rank's part alone.)
    """
    num_dims = tensor.device_mesh.ndim
    replicated = tensor.redistribute(placements=[Replicate()] * num_dims)
    return replicated.to_local(grad_placements=[Partial("avg")] * num_dims)


HEAD_PATHS = ("chunked", "trl_fused", "full_logits")


@dataclass
class LMHeadProbe:
    """Which head the expert term uses for a model (one of [`HEAD_PATHS`]), and why."""

    path: str
    reason: str


def _is_plain_weight(tensor) -> bool:
    """A floating-point tensor the head can multiply: not quantized, not wrapped in a tensor subclass but DTensor."""
    if tensor is None:
        return True
    data = tensor.to_local() if isinstance(tensor, DTensor) else tensor.data
    return type(data) is torch.Tensor and data.dtype.is_floating_point


@contextmanager
def _hooked(module: torch.nn.Module, forward_hook=None, forward_pre_hook=None):
    handles = []
    if forward_pre_hook is not None:
        handles.append(module.register_forward_pre_hook(forward_pre_hook))
    if forward_hook is not None:
        handles.append(module.register_forward_hook(forward_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def language_backbone(model: PreTrainedModel) -> torch.nn.Module:
    """
    The module whose last hidden state the LM head reads: the model's decoder where it names one (a vision-language
    model's language model; transformers 4's Gemma 3 has no `base_model` of its own), else its `base_model`, else
    `model.model` (transformers 4's LLaVA names neither). [`probe_lm_head`] checks the choice.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        return decoder
    if model.base_model is not model:
        return model.base_model
    return getattr(model, "model", model)


def _last_hidden_state(output):
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _with_last_hidden_state(output, hidden_states):
    if hasattr(output, "last_hidden_state"):
        output.last_hidden_state = hidden_states
        return output
    return (hidden_states, *output[1:])


def probe_token_ids(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    The `(1, n)` token ids the probe runs on: the first [`PROBE_TOKENS`] attended tokens of the first row, leaving out
    image and video placeholders (`config.image_token_id`, `video_token_id`), so that the probe needs no image inputs:
    the head is applied to text tokens as to any other.
    """
    keep = attention_mask[0].bool()
    for name in ("image_token_id", "video_token_id"):
        placeholder = getattr(model.config, name, None)
        if placeholder is not None:
            keep &= input_ids[0] != placeholder
    return input_ids[0][keep][:PROBE_TOKENS].unsqueeze(0)


@torch.no_grad()
def probe_lm_head(model: PreTrainedModel, original_forward, trl_head_forward, input_ids) -> LMHeadProbe:
    """
    Find out, by running the model on a few tokens (`input_ids`, shape `(1, n)`: [`probe_token_ids`]), whether its
    logits are exactly `lm_head(last_hidden_state)` with a plain linear head (`"chunked"`), else whether TRL's fused
    head reproduces them (`"trl_fused"`), else `"full_logits"`.

    The first test replaces the head's output by known values of magnitude [`PROBE_LOGIT_MAGNITUDE`] and checks that
    the model returns them unchanged and that the head's input is the backbone's output: any scaling, capping or
    other transform before or after the head shows, whatever it is called in the config. The second scales the
    backbone's output so that the logits are that large, and compares TRL's log-probabilities with the model's.
    """
    backbone, lm_head = language_backbone(model), model.get_output_embeddings()
    if backbone is model or lm_head is None:
        return LMHeadProbe("full_logits", "the model has no separate backbone and LM head")
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    seen = {}

    def capture_backbone(module, args, output):
        seen["backbone"] = _last_hidden_state(output)

    def capture_head_input(module, args):
        seen["head_input"] = args[0]

    with _hooked(backbone, forward_hook=capture_backbone), _hooked(lm_head, forward_pre_hook=capture_head_input):
        logits = original_forward(**inputs).logits
    head_input, backbone_output = seen["head_input"], seen["backbone"]
    largest_logit = logits.detach().float().abs().max().clamp(min=1e-6)

    def known_logits(module, args, output):
        generator = torch.Generator(device="cpu").manual_seed(0)
        values = (torch.rand(output.shape, generator=generator) * 2 - 1) * PROBE_LOGIT_MAGNITUDE
        seen["known"] = values.to(device=output.device, dtype=output.dtype)
        return seen["known"]

    with _hooked(lm_head, forward_hook=known_logits):
        returned = original_forward(**inputs).logits
    transform = None
    if not torch.equal(returned.float(), seen["known"].float()):
        transform = "the model transforms the LM head's output (scaling or capping its logits)"
    elif head_input.shape != backbone_output.shape or not torch.equal(head_input, backbone_output):
        transform = "the LM head's input is not the backbone's last hidden state"
    plain_head = (
        isinstance(lm_head, torch.nn.Linear)
        and type(lm_head).forward is torch.nn.Linear.forward  # FSDP's wrapper class is fine, a quantized Linear is not
        and _is_plain_weight(lm_head.weight)
        and _is_plain_weight(lm_head.bias)
    )
    if transform is None and plain_head:
        return LMHeadProbe("chunked", "the logits are exactly lm_head(last_hidden_state) with a plain linear head")
    reason = (
        transform or f"the LM head is a {type(lm_head).__name__} whose weight is not a plain floating-point tensor"
    )

    if trl_head_forward is not None:
        # The backbone's output, scaled so that the logits are large enough for any transform to show
        factor = PROBE_LOGIT_MAGNITUDE / largest_logit

        def enlarge(module, args, output):
            return _with_last_hidden_state(output, _last_hidden_state(output) * factor.to(output[0].dtype))

        labels = inputs["input_ids"]
        try:
            with _hooked(backbone, forward_hook=enlarge):
                model_log_probs = original_forward(**inputs).logits[:, :-1].float().log_softmax(-1)
                expected = model_log_probs.gather(-1, labels[:, 1:, None]).squeeze(-1)
                trl_log_probs = trl_head_forward(**inputs, labels=labels, fused_lm_head=True).log_probs
        except Exception as error:  # a head TRL cannot read (e.g. quantized) fails here rather than in training
            trl_log_probs, reason = None, f"{reason}; TRL's fused head fails on it ({type(error).__name__}: {error})"
        if trl_log_probs is not None:
            # A few roundings of logits of that size apart; the transforms models use move them by far more
            tolerance = max(8 * torch.finfo(logits.dtype).eps * PROBE_LOGIT_MAGNITUDE, 1e-3)
            if torch.allclose(trl_log_probs.float(), expected, rtol=0, atol=tolerance):
                return LMHeadProbe("trl_fused", f"{reason}, and TRL's fused head reproduces its log-probabilities")
            reason = f"{reason}, and TRL's fused head does not reproduce its log-probabilities"
    return LMHeadProbe("full_logits", reason)


def add_expert_loss_head(
    model: PreTrainedModel,
    weighting: str,
    focal_gamma: float,
    cast_lm_head_to_fp32: bool,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
) -> None:
    """
    Let `model(input_ids, attention_mask, labels, chord_expert_loss=True)` return the expert SFT loss as an
    [`ExpertLossOutput`], at temperature 1, through the model's forward (so DDP, DeepSpeed, FSDP and PEFT wrappers see
    the call); every other call goes to the forward the model had.

    The first expert call probes the model ([`probe_lm_head`]) and picks the head; `model.chord_lm_head_probe` then
    says which and why. `chord_head_gradient_in_forward` (default `True`) is passed on to [`weighted_expert_nll`].
    The per-token losses are aggregated as `aggregation` says ([`token_loss_scales`], with `norm_length` for
    `"seq-mean-token-sum-norm"`). With `output_router_logits=True`, a Mixture-of-Experts model's load-balancing loss on
    the expert micro-batch comes back as `aux_loss`, as the model's own forward computes it.
    """
    original_forward = model.forward
    outputs = ("log_probs", "entropy") if weighting == "entropy" else ("log_probs",)
    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
    trl_head_forward = model.forward
    model.chord_lm_head_probe = None

    def loss_from_log_probs(log_probs, mask, entropies=None):
        weights = token_weights(weighting, log_probs, mask, entropies=entropies, focal_gamma=focal_gamma)
        return expert_sft_loss(log_probs, mask, weights, token_loss_scales(mask, aggregation, norm_length))

    # Keep the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, chord_expert_loss=False, chord_head_gradient_in_forward=True, labels=None, **kwargs):
        if not chord_expert_loss:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        if self.chord_lm_head_probe is None:
            self.chord_lm_head_probe = probe_lm_head(
                self,
                original_forward,
                trl_head_forward,
                probe_token_ids(self, kwargs["input_ids"], kwargs["attention_mask"]),
            )
            logger.info(
                f"CHORD expert term: {self.chord_lm_head_probe.path} LM head ({self.chord_lm_head_probe.reason})."
            )
            if self.chord_lm_head_probe.path == "full_logits":
                logger.warning(
                    f"The CHORD expert term computes the full logits of each expert micro-batch: "
                    f"{self.chord_lm_head_probe.reason}."
                )
        path = self.chord_lm_head_probe.path
        kwargs["use_cache"] = False

        if path == "trl_fused":
            output = trl_head_forward(*args, labels=labels, fused_lm_head=True, **kwargs)
            loss = loss_from_log_probs(output.log_probs, output.label_mask, output.entropy)
            return _with_rows_and_aux(loss, output.log_probs, output.label_mask, output.aux_loss)

        labels = labels[:, 1:]
        mask = labels != -100
        if path == "full_logits":
            output = original_forward(*args, **kwargs)
            mask = mask.to(output.logits.device)
            # The fp32 log-softmax of the expert positions only, put back in place
            log_softmax = output.logits[:, :-1][mask].float().log_softmax(-1)
            token_log_probs = log_softmax.gather(-1, labels.to(mask.device)[mask].unsqueeze(-1)).squeeze(-1)
            log_probs = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_log_probs)
            entropies = None
            if weighting == "entropy":
                token_entropies = -(log_softmax.exp() * log_softmax).sum(-1)
                entropies = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_entropies)
            loss = loss_from_log_probs(log_probs, mask, entropies)
            return _with_rows_and_aux(loss, log_probs, mask, getattr(output, "aux_loss", None))

        # The model's own forward, keeping one position's logits, gives the backbone's output (and any aux loss)
        seen = {}

        def capture(module, args, output):
            seen["hidden_states"] = _last_hidden_state(output)

        # The backbone and the head are looked up on each call, since FSDP and PEFT replace them after patching
        with _hooked(language_backbone(self), forward_hook=capture):
            output = original_forward(*args, logits_to_keep=1, **kwargs)
        hidden_states = seen["hidden_states"][:, :-1]
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards a separately wrapped head: gather it once for all chunks
            weight = full_tensor_with_averaged_gradient(weight)
            bias = None if bias is None else full_tensor_with_averaged_gradient(bias)
        hidden_states = hidden_states[mask.to(hidden_states.device)].to(weight.device)
        if cast_lm_head_to_fp32:
            hidden_states, compute_dtype = hidden_states.float(), torch.float32
        elif torch.is_autocast_enabled(hidden_states.device.type):
            compute_dtype = torch.get_autocast_dtype(hidden_states.device.type)
        else:
            compute_dtype = hidden_states.dtype
        with maybe_gather_lm_head_ctx(weight, bias):
            loss = weighted_expert_nll(
                hidden_states,
                weight,
                bias,
                labels[mask].to(weight.device),
                weighting,
                focal_gamma,
                compute_dtype,
                gradient_in_forward=chord_head_gradient_in_forward,
                token_scales=token_loss_scales(mask, aggregation, norm_length)[mask],
            )
        log_probs = torch.zeros(mask.shape, device=loss.token_log_probs.device).masked_scatter(
            mask.to(loss.token_log_probs.device), loss.token_log_probs
        )
        return _with_rows_and_aux(loss, log_probs, mask, getattr(output, "aux_loss", None))

    model.forward = types.MethodType(forward, model)


def _with_rows_and_aux(loss: ExpertLossOutput, log_probs, mask, aux_loss) -> ExpertLossOutput:
    """Add each sequence's NLL sum and token count (for per-source metrics) and the router aux loss."""
    mask = mask.to(log_probs.device)
    loss.row_nll_sums = -(log_probs.detach() * mask).sum(-1)
    loss.row_num_tokens = mask.sum(-1).to(log_probs.dtype)
    loss.aux_loss = aux_loss
    return loss
