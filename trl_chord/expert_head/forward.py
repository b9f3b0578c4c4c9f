"""
The expert forward: [`add_expert_loss_head`] puts it on a model, [`expert_loss`] calls it through the model's forward
(so that DDP, DeepSpeed, FSDP and PEFT wrappers see the call), and [`expert_head_forward`] answers with the head
[`choose_lm_head`] chose, one function per head.
"""

import copy
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from transformers import PreTrainedModel
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from ..losses import ExpertLossOutput, expert_sft_loss, token_loss_scales, token_weights
from . import EXPERT_HEADS
from .choice import LMHeadProbe, choose_lm_head, hooked, language_backbone, last_hidden_state
from .chunked_nll import weighted_expert_nll


@dataclass
class ExpertHead:
    """
    What a model's expert forward needs, kept on the model as `model.chord_expert_head` (no closure holds any of it):
    the settings of [`add_expert_loss_head`], the forward the model had (`forward_without_head`) and the same with
    TRL's fused head at temperature 1 (`trl_head_forward`), and the head chosen at the first expert call (`choice`).
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


# What a prepared model holds on its instance: the patched forward (TRL's fused head, ours, accelerate's autocast
# wrapper around them), accelerate's record of the forward it wrapped, the expert head's state, and the copy hook
INSTANCE_PATCHES = ("forward", "_original_forward", "chord_expert_head", "__deepcopy__")


def _deepcopy_as_loaded(self, memo):
    """A deep copy without the instance's patched forwards (they wrap this instance's forward: a copy keeping them
    would run the original's weights), so that it works as the model as loaded."""
    patched = {name: self.__dict__.pop(name) for name in INSTANCE_PATCHES if name in self.__dict__}
    try:
        return copy.deepcopy(self, memo)
    finally:
        self.__dict__.update(patched)


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
    Let `model(..., labels, chord_expert_loss=True)` return the expert SFT loss ([`ExpertLossOutput`], temperature 1,
    the tokens weighted by `weighting` and aggregated by `aggregation`) with the head `head` asks for; every other call
    goes to the forward the model had. `packed_inputs(lengths, device)`: the extra inputs of a model whose attention
    takes sequences packed into one row (the expert call then passes `chord_sequence_ids`). A deep copy of the model
    is the model as loaded.
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


def expert_loss(model, inputs: dict, gradient_in_forward: bool = True, **model_kwargs) -> ExpertLossOutput:
    """
    The expert loss of one expert micro-batch (`inputs`: the model's inputs and `labels`) through `model`, wrapped or
    not; [`expert_head_forward`] answers. `gradient_in_forward`: the chunked head makes its gradient in the forward
    (for a backward that follows at once), else recomputes it in the backward.
    """
    return model(**inputs, chord_expert_loss=True, chord_head_gradient_in_forward=gradient_in_forward, **model_kwargs)


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
    call = ExpertCall(args, kwargs, labels, chord_sequence_ids, chord_head_gradient_in_forward)
    return HEAD_LOSSES[head.choice.path](self, head, call)


@dataclass
class ExpertCall:
    """One expert call: the model's own inputs, the labels, each position's sequence in a packed row (else `None`),
    and where the chunked head makes its gradient."""

    args: tuple
    kwargs: dict
    labels: torch.Tensor
    sequence_ids: torch.Tensor | None
    gradient_in_forward: bool

    def sequences(self, mask: torch.Tensor) -> torch.Tensor:
        """The expert sequences as rows of masks over the positions that predict their tokens: `mask` itself for
        padded rows, one row per sequence for a packed one."""
        if self.sequence_ids is None:
            return mask
        ids = self.sequence_ids[:, 1:].to(mask.device)  # shifted as the labels are: the sequence of each target
        return (ids == torch.arange(int(ids.max()) + 1, device=mask.device)[:, None]) & mask

    def loss_scales(self, head: ExpertHead, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scales = token_loss_scales(self.sequences(mask), head.aggregation, head.norm_length, dtype=dtype)
        return scales if self.sequence_ids is None else scales.sum(0, keepdim=True)

    def loss_from_log_probs(self, head: ExpertHead, log_probs, mask, entropies=None) -> ExpertLossOutput:
        weights = token_weights(
            head.weighting, log_probs, mask, entropies, focal_gamma=head.focal_gamma, normalization=head.normalization
        )
        return expert_sft_loss(log_probs, mask, weights, self.loss_scales(head, mask, log_probs.dtype))


def trl_fused_expert_loss(model, head: ExpertHead, call: ExpertCall) -> ExpertLossOutput:
    """TRL's fused LM head at temperature 1 gives the expert tokens' log-probabilities (and entropies)."""
    output = head.trl_head_forward(*call.args, labels=call.labels, fused_lm_head=True, **call.kwargs)
    loss = call.loss_from_log_probs(head, output.log_probs, output.label_mask, output.entropy)
    return _with_rows_and_aux(loss, output.log_probs, call.sequences(output.label_mask), output.aux_loss)


def full_logits_expert_loss(model, head: ExpertHead, call: ExpertCall) -> ExpertLossOutput:
    """The model's own forward and full logits; the log-softmax of the expert positions only, put back in place."""
    labels = call.labels[:, 1:]
    mask = labels != -100
    output = head.forward_without_head(*call.args, **call.kwargs)
    mask = mask.to(output.logits.device)
    float_dtype = torch.promote_types(output.logits.dtype, torch.float32)
    log_softmax = output.logits[:, :-1][mask].to(float_dtype).log_softmax(-1)
    token_log_probs = log_softmax.gather(-1, labels.to(mask.device)[mask].unsqueeze(-1)).squeeze(-1)
    log_probs = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_log_probs)
    entropies = None
    if head.weighting == "entropy":
        token_entropies = -(log_softmax.exp() * log_softmax).sum(-1)
        entropies = log_softmax.new_zeros(mask.shape).masked_scatter(mask, token_entropies)
    loss = call.loss_from_log_probs(head, log_probs, mask, entropies)
    return _with_rows_and_aux(loss, log_probs, call.sequences(mask), getattr(output, "aux_loss", None))


def chunked_expert_loss(model, head: ExpertHead, call: ExpertCall) -> ExpertLossOutput:
    """The model's own forward keeping one position's logits gives the backbone's output (and any aux loss);
    [`weighted_expert_nll`] takes it from there with the LM head's weight."""
    labels = call.labels[:, 1:]
    mask = labels != -100
    seen = {}

    def capture(module, args, output):
        seen["hidden_states"] = last_hidden_state(output)

    # The backbone and the head are looked up on each call, since FSDP and PEFT replace them after patching
    with hooked(language_backbone(model), forward_hook=capture):
        output = head.forward_without_head(*call.args, logits_to_keep=1, **call.kwargs)
    hidden_states = seen["hidden_states"][:, :-1]
    lm_head = model.get_output_embeddings()
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
            gradient_in_forward=call.gradient_in_forward,
            token_scales=call.loss_scales(head, mask, float_dtype)[mask],
            normalization=head.normalization,
        )
    token_log_probs = loss.token_log_probs
    log_probs = token_log_probs.new_zeros(mask.shape).masked_scatter(mask.to(token_log_probs.device), token_log_probs)
    return _with_rows_and_aux(loss, log_probs, call.sequences(mask), getattr(output, "aux_loss", None))


# The expert loss of each head (`LMHeadProbe.path`)
HEAD_LOSSES = {
    "chunked": chunked_expert_loss,
    "trl_fused": trl_fused_expert_loss,
    "full_logits": full_logits_expert_loss,
}


def full_tensor_with_averaged_gradient(tensor: DTensor) -> torch.Tensor:
    """The whole of an FSDP2-sharded parameter on every rank, its gradient averaged over the ranks as FSDP2 averages
    its own (`full_tensor()` would give each shard its own rank's gradient alone)."""
    num_dims = tensor.device_mesh.ndim
    replicated = tensor.redistribute(placements=[Replicate()] * num_dims)
    return replicated.to_local(grad_placements=[Partial("avg")] * num_dims)


def _with_rows_and_aux(loss: ExpertLossOutput, log_probs, sequence_masks, aux_loss) -> ExpertLossOutput:
    """Add each sequence's NLL sum and token count (for per-source metrics; `sequence_masks`: one row of the
    positions of `log_probs` per sequence) and the router aux loss."""
    sequence_masks = sequence_masks.to(log_probs.device)
    loss.row_nll_sums = -(log_probs.detach() * sequence_masks).sum(-1)
    loss.row_num_tokens = sequence_masks.sum(-1).to(log_probs.dtype)
    loss.aux_loss = aux_loss
    return loss
