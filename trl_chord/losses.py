"""The expert SFT term of CHORD as small pure functions over per-token log-probabilities."""

import math
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


TOKEN_WEIGHTINGS = ("uniform", "phi", "is", "entropy", "focal")
# "mean": each micro-batch's token weights rescaled to mean 1 over its expert tokens (the entropy weighting always is)
TOKEN_WEIGHT_NORMALIZATIONS = ("none", "mean")
# Expert tokens the policy finds implausible, or near-certain, for the `chord/expert_prob_*` metrics
LOW_PROB, HIGH_PROB = 0.1, 0.9
# Trinity-RFT's and verl's names for how per-token losses become one number
SFT_LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def phi_token_weights(per_token_logps: torch.Tensor) -> torch.Tensor:
    """
    CHORD-phi token weights `phi = p * (1 - p)` with `p = exp(logp)`, detached.

    The weight peaks at `p = 0.5` and vanishes for tokens the model already predicts with certainty or finds
    implausible, so the SFT term concentrates on tokens the policy is unsure about. It is a stop-gradient weight: the
    gradient of `-logp * phi` is `-phi * grad(logp)`, never a gradient through `phi` itself.
    """
    probs = per_token_logps.detach().exp()
    return probs * (1.0 - probs)


def unnormalized_token_weights(
    weighting: str,
    per_token_logps: torch.Tensor,
    entropies: torch.Tensor | None = None,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """
    Per-token part of [`token_weights`]: every weighting is this token-wise value times one number per micro-batch
    ([`token_weight_scale`]), so a head that works through the tokens in chunks can weight each chunk on its own.
    """
    probs = per_token_logps.detach().exp()
    if weighting == "uniform":
        return torch.ones_like(probs)
    if weighting == "phi":
        return phi_token_weights(per_token_logps)
    if weighting == "is":
        return probs
    if weighting == "focal":
        return (1.0 - probs) ** focal_gamma
    if weighting == "entropy":
        if entropies is None:
            raise ValueError("The entropy token weighting needs the per-token entropies.")
        return entropies.detach()
    raise ValueError(f"Unknown token weighting {weighting!r}; expected one of {TOKEN_WEIGHTINGS}.")


def unnormalized_token_weight_bound(weighting: str, vocab_size: int, focal_gamma: float = 2.0) -> float:
    """
    An upper bound on [`unnormalized_token_weights`] for any distribution over `vocab_size` tokens: 1 for `"uniform"`,
    `"is"` and `"focal"` (`gamma >= 0`), 1/4 for `"phi"`, and `log(vocab_size)`, the largest entropy, for `"entropy"`.
    """
    if weighting == "phi":
        return 0.25
    if weighting == "entropy":
        return math.log(vocab_size)
    if weighting in TOKEN_WEIGHTINGS:
        return 1.0
    raise ValueError(f"Unknown token weighting {weighting!r}; expected one of {TOKEN_WEIGHTINGS}.")


def token_weight_scale(
    weighting: str, unnormalized_weights: torch.Tensor, mask: torch.Tensor, normalization: str = "none"
) -> torch.Tensor:
    """
    The micro-batch factor of [`token_weights`]: 1 over the masked mean where the weights are rescaled to mean 1
    (`"entropy"` always, every weighting with `normalization="mean"`), else 1.
    """
    if normalization not in TOKEN_WEIGHT_NORMALIZATIONS:
        raise ValueError(
            f"Unknown token weight normalization {normalization!r}; expected one of {TOKEN_WEIGHT_NORMALIZATIONS}."
        )
    if weighting != "entropy" and normalization == "none":
        return unnormalized_weights.new_ones(())
    mask = mask.to(unnormalized_weights.dtype)
    mean = (unnormalized_weights * mask).sum() / mask.sum().clamp(min=1.0)
    return 1.0 / mean.clamp(min=torch.finfo(unnormalized_weights.dtype).tiny)


def token_weights(
    weighting: str,
    per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    entropies: torch.Tensor | None = None,
    focal_gamma: float = 2.0,
    normalization: str = "none",
) -> torch.Tensor:
    """
    Detached per-token weights of the expert NLL, `w` in `-logp * stopgrad(w)`.

    - `"uniform"`: 1 (plain SFT).
    - `"phi"`: `p * (1 - p)` (CHORD-phi).
    - `"is"`: `p`, the importance-sampling weight of Trinity-RFT's variant: tokens the policy would sample count more.
    - `"entropy"`: the token's predictive entropy divided by the mean entropy over the micro-batch's masked tokens:
      tokens where the policy is uncertain count more, and the weights average 1 (the paper's entropy-normalised
      variant).
    - `"focal"`: `(1 - p) ** focal_gamma`: tokens the policy finds unlikely count more (the paper saw it collapse).

    With `normalization="mean"`, the weights of the micro-batch (`mask`) are rescaled to mean 1, as the entropy
    weighting's are: the weightings then differ in which tokens they favour, not in how much the expert term weighs.
    """
    weights = unnormalized_token_weights(weighting, per_token_logps, entropies, focal_gamma)
    return weights * token_weight_scale(weighting, weights, mask, normalization)


def token_loss_scales(
    mask: torch.Tensor, aggregation: str, norm_length: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """
    The factor `c` of each token in the aggregated loss `sum(c * w * -logp)` of one expert micro-batch of `B`
    sequences, 0 off the mask:

    - `"token-mean"`: `1 / (number of tokens)`: every token counts the same, a long solution counts more;
    - `"seq-mean-token-mean"`: `1 / (B * tokens of its sequence)`: every sequence counts the same;
    - `"seq-mean-token-sum"`: `1 / B`: the loss grows with a sequence's length;
    - `"seq-mean-token-sum-norm"`: `1 / (B * norm_length)`: the token sum over a constant length (Dr. GRPO's
      normalisation; verl divides by the padded length of the batch instead, and does not divide by `B`).

    Args:
        mask (`torch.Tensor` of shape `(B, seq_len)`): 1 for the expert tokens.
        aggregation (`str`): one of [`SFT_LOSS_AGGREGATIONS`].
        norm_length (`int`, *optional*): the constant length of `"seq-mean-token-sum-norm"`.
        dtype (`torch.dtype`, *optional*): the scales' dtype (float64 for a float64 loss: `1 / N` rounds).
    """
    mask = mask.to(dtype)
    num_sequences = max(mask.shape[0], 1)
    if aggregation == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        return mask / (num_sequences * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if aggregation == "seq-mean-token-sum":
        return mask / num_sequences
    if aggregation == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("The seq-mean-token-sum-norm aggregation needs a constant `norm_length`.")
        return mask / (num_sequences * norm_length)
    raise ValueError(f"Unknown SFT loss aggregation {aggregation!r}; expected one of {SFT_LOSS_AGGREGATIONS}.")


@dataclass
class ExpertLossOutput(ModelOutput):
    """
    The expert SFT loss of one micro-batch and the sums its metrics are built from (all detached but `loss` and
    `aux_loss`).

    A `ModelOutput`, so that a model's forward can return it through DDP and DeepSpeed wrappers. `aux_loss` is the
    router load-balancing loss of a Mixture-of-Experts model on the expert micro-batch, when it was asked for;
    `token_log_probs` the log-probability of each expert token, in order; `row_nll_sums` and `row_num_tokens` the NLL
    sum and token count of each sequence of the micro-batch. `scaled_weight_sum` and `scale_sum` are `sum(c * w)` and
    `sum(c)` over the expert tokens (`c` each token's factor in the aggregation, `w` its weight): their ratio is the
    term's strength against uniform weights ([`expert_term_strength`]). `low_prob_tokens` and `high_prob_tokens` count
    the expert tokens with `p <` [`LOW_PROB`] and `p >` [`HIGH_PROB`].
    """

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    token_log_probs: torch.Tensor | None = None
    row_nll_sums: torch.Tensor | None = None
    row_num_tokens: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    scaled_weight_sum: torch.Tensor | None = None
    scale_sum: torch.Tensor | None = None
    low_prob_tokens: torch.Tensor | None = None
    high_prob_tokens: torch.Tensor | None = None


def token_metric_sums(
    token_log_probs: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor
) -> dict[str, torch.Tensor]:
    """
    The detached sums of an [`ExpertLossOutput`] over a micro-batch's expert tokens, given each one's log-probability,
    weight and aggregation factor (1-D, expert tokens only).
    """
    log_probs, weights, scales = token_log_probs.detach(), weights.detach(), scales.detach().to(weights.dtype)
    probs = log_probs.exp()
    return {
        "nll_sum": -log_probs.sum(),
        "prob_sum": probs.sum(),
        "weight_sum": weights.sum(),
        "num_tokens": torch.tensor(float(log_probs.numel()), device=log_probs.device, dtype=log_probs.dtype),
        "scaled_weight_sum": (scales * weights).sum(),
        "scale_sum": scales.sum(),
        "low_prob_tokens": (probs < LOW_PROB).sum().to(log_probs.dtype),
        "high_prob_tokens": (probs > HIGH_PROB).sum().to(log_probs.dtype),
    }


def expert_term_strength(scaled_weight_sum: float, scale_sum: float) -> float:
    """
    How strongly the weighted expert term pulls against plain (uniform-weighted) SFT under the same aggregation:
    `sum(c * w) / sum(c)`, the `c`-weighted mean token weight. 1 for uniform weights (and for mean-normalised ones
    under a token mean); `mu` times it is the effective `mu`. With no expert token, 1.
    """
    return scaled_weight_sum / scale_sum if scale_sum > 0 else 1.0


def expert_sft_loss(
    per_token_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor | None = None
) -> ExpertLossOutput:
    """
    The aggregated `-logp * weights` over the expert completion tokens: their masked token mean, or any aggregation
    of [`token_loss_scales`] given as `scales`.

    Args:
        per_token_logps (`torch.Tensor` of shape `(batch, seq_len)`):
            Log-probability of each expert token under the policy at temperature 1.
        mask (`torch.Tensor` of shape `(batch, seq_len)`):
            1 for expert completion tokens, 0 for prompt and padding tokens.
        weights (`torch.Tensor` of shape `(batch, seq_len)`):
            Per-token weights, from [`token_weights`]; detached here, so they never carry a gradient.
        scales (`torch.Tensor` of shape `(batch, seq_len)`, *optional*):
            Per-token factors of the aggregation, from [`token_loss_scales`]; the token mean when not given.

    Returns:
        [`ExpertLossOutput`]: the loss (an empty batch gives 0) and the detached sums of NLL, probability and weight
        over the masked tokens, and their count.
    """
    if scales is None:
        scales = token_loss_scales(mask, "token-mean", dtype=torch.promote_types(per_token_logps.dtype, torch.float32))
    # Masked positions contribute 0 whatever they hold (a padded position's log-prob may be -inf)
    mask = mask.to(torch.bool)
    per_token_nll = torch.where(mask, -per_token_logps, 0.0)
    weights = torch.where(mask, weights.detach(), 0.0)
    scales = scales.to(per_token_nll.dtype)
    loss = (per_token_nll * weights * scales).sum()
    return ExpertLossOutput(loss=loss, **token_metric_sums(per_token_logps[mask], weights[mask], scales[mask]))
