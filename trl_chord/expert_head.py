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

import copy
import functools
import math
import types
from collections.abc import Callable
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
    token_metric_sums,
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
# Vocabulary rows the probe multiplies at once in float64 (8 tokens x 64k rows: 4 MiB)
PROBE_VOCAB_CHUNK = 1 << 16


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
        normalization,
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
    normalization: str = "none",
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
        weighting (`str`), focal_gamma (`float`) and normalization (`str`, *optional*, defaults to `"none"`):
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
# The values of `ChordConfig.chord_expert_head`: the probe's choice, or one of the heads, checked to be exact
EXPERT_HEADS = ("auto", *HEAD_PATHS)


@dataclass
class LMHeadProbe:
    """Which head the expert term uses for a model (one of [`HEAD_PATHS`]), and why."""

    path: str
    reason: str


@dataclass
class ExpertHead:
    """
    Everything the expert forward of a model needs, kept on the model as `model.chord_expert_head` (no closure holds
    any of it): the expert term's settings, the forwards it calls, and the LM head chosen for it.

    Attributes:
        weighting, focal_gamma, normalization, aggregation, norm_length, cast_lm_head_to_fp32:
            As in [`add_expert_loss_head`].
        requested (`str`):
            `chord_expert_head`: `"auto"` (the probe chooses) or one of [`HEAD_PATHS`] (the probe checks it).
        forward_without_head (`Callable`):
            The forward the model had before [`add_expert_loss_head`]: every call but an expert one goes to it.
        trl_head_forward (`Callable`):
            The same forward with TRL's fused LM head at temperature 1 (`fused_lm_head=True`).
        packed_inputs (`Callable`, *optional*):
            For a model whose attention takes sequences packed into one row: `packed_inputs(lengths, device)`, the
            forward's extra inputs (positions, segment boundaries) for sequences of these lengths laid end to end. The
            probe runs its tokens as one such sequence. `None`: the model takes padded rows with an attention mask.
        choice ([`LMHeadProbe`], *optional*):
            The head in use and why, set by the first expert call ([`choose_lm_head`]).
    """

    weighting: str
    focal_gamma: float
    normalization: str
    cast_lm_head_to_fp32: bool
    aggregation: str
    norm_length: int | None
    requested: str
    forward_without_head: Callable
    trl_head_forward: Callable
    packed_inputs: Callable | None = None
    choice: LMHeadProbe | None = None


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


def _special_token_ids(config: dict) -> set[int]:
    """Every id a (nested) config names as a special token (`*_token_id`, `*_token_index`, `*_token_ids`)."""
    ids = set()
    for name, value in config.items():
        if isinstance(value, dict):
            ids |= _special_token_ids(value)
        elif isinstance(name, str) and name.endswith(("_token_id", "_token_index", "_token_ids")):
            values = value if isinstance(value, (list, tuple)) else [value]
            ids |= {item for item in values if isinstance(item, int)}
    return ids


def probe_token_ids(model: PreTrainedModel) -> torch.Tensor:
    """
    The `(1, n)` token ids the probe runs on: the [`PROBE_TOKENS`] smallest ids that the config names as no special
    token, so that the probe needs no image inputs (no image or video placeholder among them) and is the same on
    every process and in every run, whatever the data.
    """
    special = _special_token_ids(model.config.to_dict())
    vocab_size = model.config.get_text_config().vocab_size
    ids = [token for token in range(vocab_size) if token not in special][:PROBE_TOKENS]
    return torch.tensor([ids], device=model.get_input_embeddings().weight.device)


@contextmanager
def _probing(device: torch.device):
    """
    The probe's conditions: no gradients, and the RNG left as it was found, so that a run with the probe draws the
    same dropout masks as one without it. (The modules keep their train or eval mode: bitsandbytes repacks a 4-bit
    weight for inference, for good, on its first eval-mode forward on a CPU. Dropout cannot change what the probe
    finds: each check compares values within one forward, or replaces the backbone's output.)
    """
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        yield


def _plain_head_problem(lm_head: torch.nn.Module) -> str | None:
    """Why the LM head is not a plain `nn.Linear` with plain floating-point weights (which both the chunked head and
    TRL's multiply directly), or `None`."""
    plain = (
        isinstance(lm_head, torch.nn.Linear)
        # FSDP's wrapper class is fine, a quantized Linear is not
        and type(lm_head).forward is torch.nn.Linear.forward
        and _is_plain_weight(lm_head.weight)
        and _is_plain_weight(lm_head.bias)
    )
    if plain:
        return None
    return f"the LM head is a {type(lm_head).__name__} whose weight is not a plain floating-point tensor"


def _logit_transform_problem(forward_without_head, inputs, backbone, lm_head) -> str | None:
    """
    Why the logits are not exactly `lm_head(last_hidden_state)`, or `None`: the head's output is replaced by known
    values of magnitude [`PROBE_LOGIT_MAGNITUDE`], which the model must return unchanged, and the head's input must be
    the backbone's output. Any scaling, capping or other transform before or after the head shows, whatever it is
    called in the config.
    """
    seen = {}

    def capture_backbone(module, args, output):
        seen["backbone"] = _last_hidden_state(output)

    def capture_head_input(module, args):
        seen["head_input"] = args[0]

    def known_logits(module, args, output):
        generator = torch.Generator(device="cpu").manual_seed(0)
        values = (torch.rand(output.shape, generator=generator) * 2 - 1) * PROBE_LOGIT_MAGNITUDE
        seen["known"] = values.to(device=output.device, dtype=output.dtype)
        return seen["known"]

    with _hooked(backbone, forward_hook=capture_backbone), _hooked(lm_head, forward_pre_hook=capture_head_input):
        forward_without_head(**inputs)
    with _hooked(lm_head, forward_hook=known_logits):
        returned = forward_without_head(**inputs).logits
    if not torch.equal(returned.float(), seen["known"].float()):
        return "the model transforms the LM head's output (scaling or capping its logits)"
    head_input, backbone_output = seen["head_input"], seen["backbone"]
    if head_input.shape != backbone_output.shape or not torch.equal(head_input, backbone_output):
        return "the LM head's input is not the backbone's last hidden state"
    return None


def _trl_log_probs_problem(forward_without_head, trl_head_forward, inputs, backbone, lm_head) -> str | None:
    """
    Why TRL's fused head does not give the model's log-probabilities, or `None` where it does.

    The backbone's output is replaced by scaled one-hot rows (token `t` gets `c * e_j(t)`, `c` a power of two), so
    that the head's products are exact in any dtype and the logits reach magnitude [`PROBE_LOGIT_MAGNITUDE`], where
    softcapping and scaling show. The model's head output is handed on in fp32, so that its transforms run in fp32 as
    TRL's do. The two are compared at each position's least likely token, where a wrong transform moves the
    log-probability most.
    """
    num_tokens = inputs["input_ids"].shape[1]
    seen = {"scale": 1.0}

    def one_hot_rows(module, args, output):
        hidden = _last_hidden_state(output)
        columns = torch.arange(num_tokens, device=hidden.device) * hidden.shape[-1] // num_tokens
        rows = torch.zeros_like(hidden)
        rows[0, torch.arange(num_tokens, device=hidden.device), columns] = seen["scale"]
        return _with_last_hidden_state(output, rows)

    def head_output_in_fp32(module, args, output):
        seen["largest_logit"] = output.detach().abs().max().item()
        seen["head_dtype"] = output.dtype
        return output.to(torch.promote_types(output.dtype, torch.float32))

    with _hooked(backbone, forward_hook=one_hot_rows), _hooked(lm_head, forward_hook=head_output_in_fp32):
        forward_without_head(**inputs)
    if not seen["largest_logit"] > 0:
        return "the probe could not size its logits (the LM head's columns are 0)"
    seen["scale"] = 2.0 ** math.floor(math.log2(PROBE_LOGIT_MAGNITUDE / seen["largest_logit"]))
    with _hooked(backbone, forward_hook=one_hot_rows), _hooked(lm_head, forward_hook=head_output_in_fp32):
        logits = forward_without_head(**inputs).logits[:, :-1].double()
    labels = inputs["input_ids"].clone()
    labels[:, 1:] = logits.argmin(-1)
    expected = logits.log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    try:
        with _hooked(backbone, forward_hook=one_hot_rows):
            trl_log_probs = trl_head_forward(**inputs, labels=labels, fused_lm_head=True).log_probs
    except Exception as error:  # a head TRL cannot read fails here rather than in training
        return f"TRL's fused head fails on it ({type(error).__name__}: {error})"
    # Two roundings of the logits in the head's dtype (under bf16 autocast the model rounds an fp32 weight to bf16,
    # TRL multiplies it in fp32): a transform TRL gets 2% wrong moves these log-probabilities about twice as far
    tolerance = 1e-3 + 2 * torch.finfo(seen["head_dtype"]).eps * logits.abs().max().item()
    difference = (trl_log_probs.double().to(expected.device) - expected).abs().max().item()
    if difference > tolerance:
        return (
            f"TRL's fused head does not reproduce its log-probabilities ({difference:.3g} nats apart on the probe's "
            f"logits, more than the {tolerance:.2g} that rounding allows)"
        )
    return None


@torch.compiler.disable
def probe_lm_head(
    model: PreTrainedModel, forward_without_head, trl_head_forward, paths=HEAD_PATHS, packed_inputs=None
) -> dict:
    """
    Why each expert head of `paths` would be inexact for `model` (`None`: it is exact), found by running the model on
    a few fixed tokens ([`probe_token_ids`]) with the RNG left as found ([`_probing`]), outside `torch.compile`:

    - `"chunked"` needs logits that are exactly `lm_head(last_hidden_state)` ([`_logit_transform_problem`]) and a plain
      `nn.Linear` head;
    - `"trl_fused"` needs a plain `nn.Linear` head whose logits TRL's fused head transforms as the model does
      ([`_trl_log_probs_problem`]);
    - `"full_logits"`, the model's own forward, is exact by construction.

    The result depends on the model's weights and code only: not on the data, train or eval mode, dropout, the RNG
    or the process.
    """
    problems = {"full_logits": None}
    backbone, lm_head = language_backbone(model), model.get_output_embeddings()
    if backbone is model or lm_head is None:
        reason = "the model has no separate backbone and LM head"
        return {**problems, "chunked": reason, "trl_fused": reason}
    head_problem = _plain_head_problem(lm_head)
    input_ids = probe_token_ids(model)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    if packed_inputs is not None:  # the probe's tokens as one packed sequence (see `ExpertHead.packed_inputs`)
        inputs.update(packed_inputs([input_ids.shape[1]], input_ids.device))
    with _probing(input_ids.device):
        if "chunked" in paths:
            transform = _logit_transform_problem(forward_without_head, inputs, backbone, lm_head)
            problems["chunked"] = transform or head_problem
        if "trl_fused" in paths:
            problems["trl_fused"] = head_problem or _trl_log_probs_problem(
                forward_without_head, trl_head_forward, inputs, backbone, lm_head
            )
    return problems


def pick_lm_head(problems: dict, requested: str = "auto") -> LMHeadProbe:
    """
    The head for `requested` ([`EXPERT_HEADS`]) given the probe's `problems` ([`probe_lm_head`]): with `"auto"`, the
    first exact one of `"chunked"`, `"trl_fused"`, `"full_logits"` (cheapest first). A requested head that is not
    exact is refused with a `ValueError` saying why.
    """
    if requested != "auto":
        if problems.get(requested) is not None:
            raise ValueError(
                f"chord_expert_head={requested!r} would not compute this model's expert loss exactly: "
                f"{problems[requested]}. Use chord_expert_head='auto' (the exact head the probe finds) or "
                "'full_logits' (the model's own logits, always exact)."
            )
        return LMHeadProbe(requested, "set by chord_expert_head" + ("" if requested == "full_logits" else ", exact"))
    if problems["chunked"] is None:
        return LMHeadProbe("chunked", "the logits are exactly lm_head(last_hidden_state) with a plain linear head")
    if problems["trl_fused"] is None:
        reason = f"{problems['chunked']}, and TRL's fused head reproduces its log-probabilities"
        return LMHeadProbe("trl_fused", reason)
    return LMHeadProbe("full_logits", f"{problems['chunked']}; {problems['trl_fused']}")


def _agreed_across_processes(choice: LMHeadProbe) -> LMHeadProbe:
    """
    The same head on every process: the costliest any process chose (all probe the same tokens with the same
    weights, so they agree; this makes it certain, and every process then runs the same collectives).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return choice
    if torch.distributed.get_world_size() == 1:
        return choice
    # Where the default group's backend reduces: NCCL on the current GPU (even when the weights are offloaded)
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    index = torch.tensor([HEAD_PATHS.index(choice.path)], device=device)
    torch.distributed.all_reduce(index, op=torch.distributed.ReduceOp.MAX)
    agreed = HEAD_PATHS[int(index.item())]
    if agreed == choice.path:
        return choice
    return LMHeadProbe(agreed, f"another process's probe ruled out the {choice.path} head ({choice.reason} here)")


def choose_lm_head(model: PreTrainedModel, head: ExpertHead) -> LMHeadProbe:
    """
    The expert term's head for `model`, chosen once (at its first expert call): probed ([`probe_lm_head`]) unless
    `head.requested` is `"full_logits"`, the same on every process (a refusal too), logged once.
    """
    if head.requested == "full_logits":
        choice = pick_lm_head({"full_logits": None}, "full_logits")
    else:
        first = ("chunked",) if head.requested == "auto" else (head.requested,)
        forwards = (head.forward_without_head, head.trl_head_forward)
        problems = probe_lm_head(model, *forwards, first, head.packed_inputs)
        if head.requested == "auto" and problems["chunked"] is not None:
            problems.update(probe_lm_head(model, *forwards, ("trl_fused",), head.packed_inputs))
        try:
            choice, refusal = pick_lm_head(problems, head.requested), None
        except ValueError as error:
            choice, refusal = LMHeadProbe("full_logits", str(error)), error
        agreed = _agreed_across_processes(choice)
        if refusal is not None:
            raise refusal
        if head.requested != "auto" and agreed.path != head.requested:
            raise ValueError(
                f"chord_expert_head={head.requested!r} would not compute this model's expert loss exactly on every "
                f"process: {agreed.reason}."
            )
        choice = agreed
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        cost = ""
        if choice.path == "full_logits":
            cost = " (the full logits of each expert micro-batch: costlier in memory)"
        logger.warning(f"CHORD expert term: {choice.path} LM head{cost}; {choice.reason}.")
    return choice


def _deepcopy_as_loaded(self, memo):
    """
    A deep copy of a model prepared for the expert term, as it was loaded: without the forwards that TRL's trainer and
    [`add_expert_loss_head`] put on this instance (they wrap this instance's own forward, so a copy keeping them would
    run the original's weights). The copy works as any model does and can be given to a new trainer.
    """
    patched = {name: self.__dict__.pop(name) for name in INSTANCE_PATCHES if name in self.__dict__}
    try:
        return copy.deepcopy(self, memo)
    finally:
        self.__dict__.update(patched)


# What a prepared model holds on its instance: the patched forward (TRL's fused head, ours, accelerate's autocast
# wrapper around them), accelerate's record of the forward it wrapped, the expert head's state, and the copy hook
INSTANCE_PATCHES = ("forward", "_original_forward", "chord_expert_head", "__deepcopy__")


@functools.cache
def _expert_forward_for(model_class: type) -> Callable:
    """[`expert_head_forward`] with `model_class.forward`'s signature (`generate` validates its kwargs against it)."""

    @functools.wraps(model_class.forward)
    def forward(self, *args, **kwargs):
        return expert_head_forward(self, *args, **kwargs)

    return forward


def add_expert_loss_head(
    model: PreTrainedModel,
    weighting: str,
    focal_gamma: float,
    cast_lm_head_to_fp32: bool,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
    head: str = "auto",
    normalization: str = "none",
    packed_inputs: Callable | None = None,
) -> None:
    """
    Let `model(input_ids, attention_mask, labels, chord_expert_loss=True)` return the expert SFT loss as an
    [`ExpertLossOutput`], at temperature 1, through the model's forward (so DDP, DeepSpeed, FSDP and PEFT wrappers see
    the call); every other call goes to the forward the model had.

    The state this needs is one [`ExpertHead`], `model.chord_expert_head`. The first expert call chooses the LM head
    ([`choose_lm_head`]: `head` is `"auto"` or one of [`HEAD_PATHS`], checked); `model.chord_expert_head.choice` then
    says which and why. `chord_head_gradient_in_forward` (default `True`) is passed on to [`weighted_expert_nll`].
    The per-token losses are aggregated as `aggregation` says ([`token_loss_scales`], with `norm_length` for
    `"seq-mean-token-sum-norm"`), with the token weights of `weighting`, rescaled to mean 1 per micro-batch with
    `normalization="mean"` ([`token_weights`]). With `output_router_logits=True`, a Mixture-of-Experts model's
    load-balancing loss on the expert micro-batch comes back as `aux_loss`, as the model's own forward computes it. A
    deep copy of the model is the model as loaded, without either head.

    For a model whose attention takes sequences packed into one row, `packed_inputs` gives the forward's extra inputs
    ([`ExpertHead`]); an expert micro-batch is then one row of `B` sequences laid end to end, with
    `chord_sequence_ids` (`(1, seq_len)`: the sequence of each position) telling the aggregation and the per-sequence
    sums which is which.
    """
    if head not in EXPERT_HEADS:
        raise ValueError(f"The expert LM head must be one of {EXPERT_HEADS}, got {head!r}.")
    forward_without_head = model.forward
    outputs = ("log_probs", "entropy") if weighting == "entropy" else ("log_probs",)
    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
    model.chord_expert_head = ExpertHead(
        weighting=weighting,
        focal_gamma=focal_gamma,
        normalization=normalization,
        cast_lm_head_to_fp32=cast_lm_head_to_fp32,
        aggregation=aggregation,
        norm_length=norm_length,
        requested=head,
        forward_without_head=forward_without_head,
        trl_head_forward=model.forward,
        packed_inputs=packed_inputs,
    )
    model.forward = types.MethodType(_expert_forward_for(type(model)), model)
    model.__deepcopy__ = types.MethodType(_deepcopy_as_loaded, model)


def expert_head_forward(
    self: PreTrainedModel,
    *args,
    chord_expert_loss=False,
    chord_head_gradient_in_forward=True,
    chord_sequence_ids=None,
    labels=None,
    **kwargs,
):
    """The forward of a model prepared by [`add_expert_loss_head`]: the expert loss, or the model's own forward."""
    head = self.chord_expert_head
    if not chord_expert_loss:
        if labels is not None:
            kwargs["labels"] = labels
        return head.forward_without_head(*args, **kwargs)
    if head.choice is None:
        head.choice = choose_lm_head(self, head)
    kwargs["use_cache"] = False

    def sequences(mask):
        """The expert sequences as rows of masks over the positions that predict their tokens: `mask` itself for
        padded rows, one row per sequence for a packed one."""
        if chord_sequence_ids is None:
            return mask
        ids = chord_sequence_ids[:, 1:].to(mask.device)  # shifted as the labels are: the sequence of each target
        return (ids == torch.arange(int(ids.max()) + 1, device=mask.device)[:, None]) & mask

    def scales_of(mask, dtype):
        scales = token_loss_scales(sequences(mask), head.aggregation, head.norm_length, dtype=dtype)
        return scales if chord_sequence_ids is None else scales.sum(0, keepdim=True)

    def loss_from_log_probs(log_probs, mask, entropies=None):
        weights = token_weights(
            head.weighting, log_probs, mask, entropies, focal_gamma=head.focal_gamma, normalization=head.normalization
        )
        return expert_sft_loss(log_probs, mask, weights, scales_of(mask, log_probs.dtype))

    if head.choice.path == "trl_fused":
        output = head.trl_head_forward(*args, labels=labels, fused_lm_head=True, **kwargs)
        loss = loss_from_log_probs(output.log_probs, output.label_mask, output.entropy)
        return _with_rows_and_aux(loss, output.log_probs, sequences(output.label_mask), output.aux_loss)

    labels = labels[:, 1:]
    mask = labels != -100
    if head.choice.path == "full_logits":
        output = head.forward_without_head(*args, **kwargs)
        mask = mask.to(output.logits.device)
        # The log-softmax of the expert positions only (in at least fp32), put back in place
        float_dtype = torch.promote_types(output.logits.dtype, torch.float32)
        log_softmax = output.logits[:, :-1][mask].to(float_dtype).log_softmax(-1)
        token_log_probs = log_softmax.gather(-1, labels.to(mask.device)[mask].unsqueeze(-1)).squeeze(-1)
        log_probs = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_log_probs)
        entropies = None
        if head.weighting == "entropy":
            token_entropies = -(log_softmax.exp() * log_softmax).sum(-1)
            entropies = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_entropies)
        loss = loss_from_log_probs(log_probs, mask, entropies)
        return _with_rows_and_aux(loss, log_probs, sequences(mask), getattr(output, "aux_loss", None))

    # The model's own forward, keeping one position's logits, gives the backbone's output (and any aux loss)
    seen = {}

    def capture(module, args, output):
        seen["hidden_states"] = _last_hidden_state(output)

    # The backbone and the head are looked up on each call, since FSDP and PEFT replace them after patching
    with _hooked(language_backbone(self), forward_hook=capture):
        output = head.forward_without_head(*args, logits_to_keep=1, **kwargs)
    hidden_states = seen["hidden_states"][:, :-1]
    lm_head = self.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards a separately wrapped head: gather it once for all chunks
        weight = full_tensor_with_averaged_gradient(weight)
        bias = None if bias is None else full_tensor_with_averaged_gradient(bias)
    hidden_states = hidden_states[mask.to(hidden_states.device)].to(weight.device)
    if head.cast_lm_head_to_fp32:
        hidden_states, compute_dtype = hidden_states.float(), torch.float32
    elif torch.is_autocast_enabled(hidden_states.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden_states.device.type)
    else:
        compute_dtype = hidden_states.dtype
    float_dtype = torch.promote_types(compute_dtype, torch.float32)
    with maybe_gather_lm_head_ctx(weight, bias):
        loss = weighted_expert_nll(
            hidden_states,
            weight,
            bias,
            labels[mask].to(weight.device),
            head.weighting,
            head.focal_gamma,
            compute_dtype,
            gradient_in_forward=chord_head_gradient_in_forward,
            token_scales=scales_of(mask, float_dtype)[mask],
            normalization=head.normalization,
        )
    token_log_probs = loss.token_log_probs
    log_probs = token_log_probs.new_zeros(mask.shape).masked_scatter(mask.to(token_log_probs.device), token_log_probs)
    return _with_rows_and_aux(loss, log_probs, sequences(mask), getattr(output, "aux_loss", None))


def _with_rows_and_aux(loss: ExpertLossOutput, log_probs, sequence_masks, aux_loss) -> ExpertLossOutput:
    """Add each sequence's NLL sum and token count (for per-source metrics; `sequence_masks`: one row of the
    positions of `log_probs` per sequence) and the router aux loss."""
    sequence_masks = sequence_masks.to(log_probs.device)
    loss.row_nll_sums = -(log_probs.detach() * sequence_masks).sum(-1)
    loss.row_num_tokens = sequence_masks.sum(-1).to(log_probs.dtype)
    loss.aux_loss = aux_loss
    return loss
