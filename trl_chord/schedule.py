"""The weight `mu` of CHORD's SFT term over training: CHORD-mu's warm-up and cosine decay, or the adaptive schedule."""

import math
from dataclasses import dataclass, field


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


def adaptive_chord_mu(tau: float, mean_reward: float) -> float:
    """The paper's adaptive weight `mu = max(0, tau - mean on-policy reward)`, capped at 1."""
    return min(1.0, max(0.0, tau - mean_reward))


@dataclass
class MuSchedule:
    """
    `mu` of the current optimizer step. Cosine ([`chord_mu`]): set by [`start_step`] at each step's start. Adaptive
    (`adaptive_tau` given, [`adaptive_chord_mu`]): set by [`observe_mean_reward`] from each scored batch of rollouts,
    0 before the first.
    """

    peak: float = 0.1
    valley: float = 0.1
    warmup_steps: int = 0
    decay_steps: int = 0
    adaptive_tau: float | None = None
    mu: float = field(init=False)

    def __post_init__(self):
        self.mu = 0.0 if self.adaptive else self.mu_at(0)

    @classmethod
    def from_options(cls, args) -> "MuSchedule":
        """The schedule of a CHORD config's `chord_mu_*` options."""
        adaptive = args.chord_mu_schedule == "adaptive"
        return cls(
            args.chord_mu_peak,
            args.chord_mu_valley,
            args.chord_mu_warmup_steps,
            args.chord_mu_decay_steps,
            adaptive_tau=args.chord_adaptive_mu_tau if adaptive else None,
        )

    @property
    def adaptive(self) -> bool:
        return self.adaptive_tau is not None

    def mu_at(self, step: int) -> float:
        return chord_mu(step, self.peak, self.valley, self.warmup_steps, self.decay_steps)

    def start_step(self, step: int) -> None:
        if not self.adaptive:
            self.mu = self.mu_at(step)

    def observe_mean_reward(self, mean_reward: float) -> None:
        if self.adaptive:
            self.mu = adaptive_chord_mu(self.adaptive_tau, mean_reward)

    def is_ever_positive(self) -> bool:
        """Whether `mu > 0` at some step (the cosine schedule is the constant 0 only when no phase rises above 0)."""
        if self.adaptive:
            return self.adaptive_tau > 0
        return self.valley > 0 or (self.peak > 0 and self.warmup_steps + self.decay_steps > 0)

    def reaches_one(self) -> bool:
        """Whether some step can have `mu == 1` and leave out the on-policy term (the adaptive schedule never does:
        it needs every step's rollouts)."""
        return not self.adaptive and max(self.peak, self.valley) >= 1

    def skips_on_policy_term(self) -> bool:
        """Whether the current step gives the on-policy term weight 0 and leaves it out."""
        return not self.adaptive and self.mu >= 1.0

    def describe(self) -> str:
        if self.adaptive:
            return f"chord_mu_schedule='adaptive', chord_adaptive_mu_tau={self.adaptive_tau}"
        return f"chord_mu_peak={self.peak}, chord_mu_valley={self.valley}"
