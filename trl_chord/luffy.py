"""
LUFFY's maths (arXiv 2504.14945, "Learning to Reason under Off-Policy Guidance"), as pure functions.

A LUFFY group holds a prompt's on-policy completions and `k` expert completions of the same prompt, scored alike, with
advantages over the whole mixed group. Each token of an on-policy completion takes the policy-gradient loss of the
clipped importance ratio to the policy that sampled it; each token of an expert completion takes `-A * f(p)`, with
`p` the policy's probability of the token and `f(p) = p / (p + gamma)` LUFFY's policy shaping (the importance weight
`p / pi_expert` with the expert's probability taken as 1, regularised): unclipped, and differentiated through `p`, so
its gradient `-A * gamma * p / (p + gamma) ** 2 * grad(log p)` stays large on tokens the policy finds unlikely.
"""

import torch


# How the token losses of a micro-batch become its loss: TRL's names for the four aggregations of the clipped
# surrogate, and `"luffy"`, the aggregation of the authors' training script
LUFFY_LOSS_TYPES = ("luffy", "grpo", "bnpo", "dr_grpo", "dapo")


def luffy_shaping(log_probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy shaping `f(p) = p / (p + gamma)` of the probabilities `p = exp(log_probs)`, with its gradient."""
    probs = log_probs.exp()
    return probs / (probs + gamma)


def luffy_token_losses(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    off_policy: torch.Tensor,
    gamma: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The per-token losses of a micro-batch of on-policy and expert completions, `(batch, tokens)`.

    - On-policy tokens: TRL's clipped surrogate, `-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)` with
      `r = exp(log_probs - old_log_probs)` (capped at `delta` when set), times `importance_sampling_ratio` (TRL's
      correction for the generator's sampling probabilities) when given. `epsilon = inf` is no clipping.
    - Off-policy (expert) tokens, where `off_policy` is true: `-A * luffy_shaping(log_probs, gamma)`, unclipped. They
      were not sampled by any policy, so neither `old_log_probs` nor the sampling correction applies to them.

    `advantages` is one per completion, `(batch,)` or `(batch, 1)`; `off_policy` broadcasts against the tokens
    (`(batch, 1)` marks whole completions). Returns the per-token losses, the on-policy ratios `r` (1 at expert tokens)
    for the KL correction and the clipping metrics, and the shaping weights `f(p)` (at every token; the caller keeps
    the expert ones).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    # An expert token has no old probability: its ratio is taken as exactly 1, which leaves its (unused) on-policy
    # branch finite, so no inf or NaN can leak into the gradient through the branch `where` does not select
    old_log_probs = torch.where(off_policy, log_probs.detach(), old_log_probs)
    ratio = torch.exp(log_probs - old_log_probs)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    on_policy_loss = -torch.min(capped_ratio * advantages, clipped_ratio * advantages)
    if importance_sampling_ratio is not None:
        on_policy_loss = on_policy_loss * importance_sampling_ratio
    shaping = luffy_shaping(log_probs, gamma)
    off_policy_loss = -advantages * shaping
    return torch.where(off_policy, off_policy_loss, on_policy_loss), ratio, shaping


def aggregate_luffy_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    accumulation_steps: int | float,
    max_completion_length: int | None = None,
    step_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """
    One micro-batch's loss from its per-token losses and its mask of trained tokens, on TRL's scale (divided by the
    `accumulation_steps` of an optimizer step, so that the step's gradient is the mean over its micro-steps):

    - `"luffy"`: the token sum over the padded width, `max_completion_length` (the authors' `loss_remove_token_mean`:
      the micro-batch's `sum(loss * mask) / mask.shape[-1]`, their responses padded to the maximum length); no
      division by the number of completions;
    - `"grpo"`: the mean over completions of each completion's token mean;
    - `"bnpo"`: the token mean over the micro-batch;
    - `"dr_grpo"`: the token sum over `completions * max_completion_length`;
    - `"dapo"`: the token sum over `step_tokens`, this process's share of the trained tokens of the whole optimizer
      step (TRL's normaliser, which spans the accumulation steps itself).

    Expert and on-policy tokens count alike: the completions of a mixed group are one batch.
    """
    masked = per_token_loss * mask
    if loss_type == "dapo":
        return masked.sum() / step_tokens
    if loss_type == "luffy":
        loss = masked.sum() / max_completion_length
    elif loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token_loss.size(0) * max_completion_length)
    else:
        raise ValueError(f"LUFFY's loss aggregates with loss_type in {LUFFY_LOSS_TYPES}, got {loss_type!r}.")
    return loss / accumulation_steps


def expert_slots(num_rows: int, first_row: int, group_size: int, num_expert: int) -> list[int]:
    """
    Which of a process's `num_rows` rollout rows hold expert completions: the last `num_expert` places of each group
    of `group_size`, the rows numbered across processes as TRL groups them for the advantages (`first_row`: the global
    number of this process's first row). Returns, per local row, its place among its group's expert completions
    (0 to `num_expert - 1`), or -1 for an on-policy row.
    """
    first_expert_place = group_size - num_expert
    return [max((first_row + row) % group_size - first_expert_place, -1) for row in range(num_rows)]


def splice_expert_completions(
    completion_ids: list, logprobs: list | None, expert_ids: list[list[int] | None]
) -> tuple[list, list | None]:
    """
    The generated completions with each row that has expert token ids in `expert_ids` replaced by them. The
    generator's per-token log-probabilities (vLLM's, for TRL's sampling correction) of such a row become `None`: no
    sampler produced those tokens, and TRL reads `None` as "no sampling log-probability" (a correction ratio of 1).
    """
    completion_ids = [list(ids) if expert is None else expert for ids, expert in zip(completion_ids, expert_ids)]
    if logprobs is not None:
        logprobs = [row if expert is None else [None] * len(expert) for row, expert in zip(logprobs, expert_ids)]
    return completion_ids, logprobs
