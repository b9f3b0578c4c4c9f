from transformers import TrainerCallback

from .schedule import chord_mu


class ChordMuCallback(TrainerCallback):
    """
    Drives the weight `mu` of CHORD's SFT term: before every optimizer step, `mu` is set to the CHORD-mu schedule at
    `state.global_step` (0-based: the steps already completed), so a resumed run picks up where it stopped.
    """

    def __init__(self, peak: float, valley: float, warmup_steps: int, decay_steps: int):
        self.peak = peak
        self.valley = valley
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.mu = self.mu_at(0)

    def mu_at(self, step: int) -> float:
        return chord_mu(step, self.peak, self.valley, self.warmup_steps, self.decay_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self.mu = self.mu_at(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.mu = self.mu_at(state.global_step)
