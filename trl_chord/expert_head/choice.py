"""
Which LM head the expert term uses for a model, chosen once: [`probe_lm_head`] runs the model on a few fixed tokens
with known values in place of the backbone's and the head's outputs, and finds which heads are exact for it;
[`pick_lm_head`] takes the cheapest exact one (or checks a requested one); [`choose_lm_head`] makes the choice the
same on every process and logs it.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.utils import logging

from . import HEAD_PATHS


logger = logging.get_logger(__name__)

# Magnitude of the logits the probe makes the model produce: transforms such as softcapping show at this size
PROBE_LOGIT_MAGNITUDE = 50.0
PROBE_TOKENS = 8


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
def hooked(module: torch.nn.Module, forward_hook=None, forward_pre_hook=None):
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


def last_hidden_state(output):
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
        seen["backbone"] = last_hidden_state(output)

    def capture_head_input(module, args):
        seen["head_input"] = args[0]

    def known_logits(module, args, output):
        generator = torch.Generator(device="cpu").manual_seed(0)
        values = (torch.rand(output.shape, generator=generator) * 2 - 1) * PROBE_LOGIT_MAGNITUDE
        seen["known"] = values.to(device=output.device, dtype=output.dtype)
        return seen["known"]

    with hooked(backbone, forward_hook=capture_backbone), hooked(lm_head, forward_pre_hook=capture_head_input):
        forward_without_head(**inputs)
    with hooked(lm_head, forward_hook=known_logits):
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
        hidden = last_hidden_state(output)
        columns = torch.arange(num_tokens, device=hidden.device) * hidden.shape[-1] // num_tokens
        rows = torch.zeros_like(hidden)
        rows[0, torch.arange(num_tokens, device=hidden.device), columns] = seen["scale"]
        return _with_last_hidden_state(output, rows)

    def head_output_in_fp32(module, args, output):
        seen["largest_logit"] = output.detach().abs().max().item()
        seen["head_dtype"] = output.dtype
        return output.to(torch.promote_types(output.dtype, torch.float32))

    with hooked(backbone, forward_hook=one_hot_rows), hooked(lm_head, forward_hook=head_output_in_fp32):
        forward_without_head(**inputs)
    if not seen["largest_logit"] > 0:
        return "the probe could not size its logits (the LM head's columns are 0)"
    seen["scale"] = 2.0 ** math.floor(math.log2(PROBE_LOGIT_MAGNITUDE / seen["largest_logit"]))
    with hooked(backbone, forward_hook=one_hot_rows), hooked(lm_head, forward_hook=head_output_in_fp32):
        logits = forward_without_head(**inputs).logits[:, :-1].double()
    labels = inputs["input_ids"].clone()
    labels[:, 1:] = logits.argmin(-1)
    expected = logits.log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    try:
        with hooked(backbone, forward_hook=one_hot_rows):
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
    Why each head of `paths` would be inexact for `model` (`None`: exact), from a few fixed tokens: `"chunked"` needs
    logits exactly `lm_head(last_hidden_state)` and a plain linear head, `"trl_fused"` a plain linear head whose logits
    TRL transforms as the model does; `"full_logits"` is exact. Depends on the model's weights and code only.
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
    """The cheapest exact head for `requested="auto"`, else the requested one, refused (`ValueError`) if inexact."""
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
    """The costliest head any process chose, on every process (they agree; this makes the collectives match)."""
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


def choose_lm_head(model: PreTrainedModel, head) -> LMHeadProbe:
    """The head for `model` and an [`ExpertHead`]'s request: probed, agreed on by every process, logged."""
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
