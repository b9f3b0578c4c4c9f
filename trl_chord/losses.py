"""The expert SFT term of CHORD as small pure functions over per-token log-probabilities."""

from dataclasses import dataclass

import torch


def phi_token_weights(per_token_logps: torch.Tensor) -> torch.Tensor:
    """
    CHORD-phi token weights `phi = p * (1 - p)` with `p = exp(logp)`, detached.

    The weight peaks at `p = 0.5` and vanishes for tokens the model already predicts with certainty or finds
    implausible, so the SFT term concentrates on tokens the policy is unsure about. It is a stop-gradient weight: the
    gradient of `-logp * phi` is `-phi * grad(logp)`, never a gradient through `phi` itself.
    """
    probs = per_token_logps.detach().exp()
    return probs * (1.0 - probs)


@dataclass
class ExpertLossOutput:
    """The expert SFT loss of one micro-batch and the sums its metrics are built from (all detached but `loss`)."""

    loss: torch.Tensor
    nll_sum: torch.Tensor
    prob_sum: torch.Tensor
    weight_sum: torch.Tensor
    num_tokens: torch.Tensor


def expert_sft_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, use_phi: bool) -> ExpertLossOutput:
    """
    Masked token-mean of `-logp` over the expert completion tokens, each term weighted by detached `phi` if `use_phi`.

    Args:
        per_token_logps (`torch.Tensor` of shape `(batch, seq_len)`):
            Log-probability of each expert token under the policy at temperature 1.
        mask (`torch.Tensor` of shape `(batch, seq_len)`):
            1 for expert completion tokens, 0 for prompt and padding tokens.
        use_phi (`bool`):
            Whether to weight each token by `phi = p * (1 - p)` (CHORD-phi).

    Returns:
        [`ExpertLossOutput`]: the loss (a token mean, divided by at least one token so that an empty batch gives 0)
        and the detached sums of NLL, probability and weight over the masked tokens, and their count.
    """
    mask = mask.to(per_token_logps.dtype)
    per_token_nll = -per_token_logps
    weights = phi_token_weights(per_token_logps) if use_phi else torch.ones_like(per_token_logps)
    num_tokens = mask.sum()
    loss = (per_token_nll * weights * mask).sum() / num_tokens.clamp(min=1.0)
    return ExpertLossOutput(
        loss=loss,
        nll_sum=(per_token_nll.detach() * mask).sum(),
        prob_sum=(per_token_logps.detach().exp() * mask).sum(),
        weight_sum=(weights * mask).sum(),
        num_tokens=num_tokens.detach(),
    )
