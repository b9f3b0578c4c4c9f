"""The CHORD-mu schedule: linear warm-up to a peak, cosine decay to a valley, then constant."""

import math


def chord_mu(step: int, peak: float, valley: float, warmup_steps: int, decay_steps: int) -> float:
    """
    Weight `mu` of the expert SFT term at optimizer step `step` (0-based: the number of steps already completed).

    With `W = warmup_steps` and `D = decay_steps`:

    - `step < W`: `mu = peak * step / W` (linear warm-up from 0),
    - `W <= step < W + D`: `mu = valley + (peak - valley) * 0.5 * (1 + cos(pi * (step - W) / D))`,
    - `step >= W + D`: `mu = valley`.

    With `W = D = 0`, `mu` is the constant `valley` at every step.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step < warmup_steps + decay_steps:
        progress = (step - warmup_steps) / decay_steps
        return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return valley


def chord_mu_is_ever_positive(peak: float, valley: float, warmup_steps: int, decay_steps: int) -> bool:
    """Whether the schedule gives `mu > 0` at some step (it is the constant 0 only when no phase reaches above 0)."""
    return valley > 0 or (peak > 0 and warmup_steps + decay_steps > 0)


def adaptive_chord_mu(tau: float, mean_reward: float) -> float:
    """The paper's adaptive weight `mu = max(0, tau - mean on-policy reward)`, capped at 1: the expert term fades as
    the policy's own rewards pass `tau`."""
    return min(1.0, max(0.0, tau - mean_reward))
