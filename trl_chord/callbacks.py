from transformers import TrainerCallback

from .schedule import adaptive_chord_mu, chord_mu


class ChordMuCallback(TrainerCallback):
    """
    Drives the weight `mu` of CHORD's SFT term.

    With the cosine schedule, `mu` is set before every optimizer step to the CHORD-mu schedule at `state.global_step`
    (0-based: the steps already completed), so a resumed run picks up where it stopped. With the adaptive schedule
    (`adaptive_tau` given), `mu = max(0, tau - mean reward)` is set from each newly scored batch of rollouts through
    [`observe_mean_reward`], which the trainer calls; it then holds for the micro-steps trained on that batch.
    """

    def __init__(
        self, peak: float, valley: float, warmup_steps: int, decay_steps: int, adaptive_tau: float | None = None
    ):
        self.peak = peak
        self.valley = valley
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.adaptive_tau = adaptive_tau
        self.mu = self.mu_at(0) if adaptive_tau is None else 0.0

    def mu_at(self, step: int) -> float:
        return chord_mu(step, self.peak, self.valley, self.warmup_steps, self.decay_steps)

    def observe_mean_reward(self, mean_reward: float) -> None:
        if self.adaptive_tau is not None:
            self.mu = adaptive_chord_mu(self.adaptive_tau, mean_reward)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.adaptive_tau is None:
            self.mu = self.mu_at(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.adaptive_tau is None:
            self.mu = self.mu_at(state.global_step)
