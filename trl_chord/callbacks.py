from transformers import TrainerCallback
from transformers.utils import logging

from .schedule import MuSchedule


logger = logging.get_logger(__name__)


class ChordMuCallback(TrainerCallback):
    """Sets the cosine schedule's `mu` ([`MuSchedule.start_step`]) before every optimizer step, from
    `state.global_step`, so that a resumed run picks up where it stopped."""

    def __init__(self, schedule: MuSchedule):
        self.schedule = schedule

    def on_train_begin(self, args, state, control, **kwargs):
        self.schedule.start_step(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.start_step(state.global_step)


# The expert term counts as off when it acts at under this fraction of mu ...
WEAK_EXPERT_TERM_RATIO = 0.1
# ... while at least this fraction of expert tokens is implausible to the policy (p < 0.1): there is much to learn
WEAK_EXPERT_TERM_MIN_LOW_PROB_FRACTION = 0.1
# ... for this many consecutive logged steps
WEAK_EXPERT_TERM_PATIENCE = 20


def expert_term_is_weak(logs: dict) -> bool | None:
    """
    Whether a logged step's expert term is effectively off: its effective mu below [`WEAK_EXPERT_TERM_RATIO`] of mu
    while at least [`WEAK_EXPERT_TERM_MIN_LOW_PROB_FRACTION`] of the expert tokens have `p < 0.1` (so not because the
    policy already reproduces the experts). `None` for a log without the expert term's metrics (or with `mu = 0`).
    """
    mu, effective_mu = logs.get("chord/mu"), logs.get("chord/effective_mu")
    low_prob_fraction = logs.get("chord/expert_prob_below_0.1")
    if not mu or effective_mu is None or low_prob_fraction is None:
        return None
    return effective_mu < WEAK_EXPERT_TERM_RATIO * mu and low_prob_fraction >= WEAK_EXPERT_TERM_MIN_LOW_PROB_FRACTION


class WeakExpertTermCallback(TrainerCallback):
    """
    Warns once when the expert term has been effectively off ([`expert_term_is_weak`]) for
    [`WEAK_EXPERT_TERM_PATIENCE`] consecutive logged steps, with the numbers and the remedies. Logs without the expert
    term's metrics neither count nor break the run of weak ones.
    """

    def __init__(self, patience: int = WEAK_EXPERT_TERM_PATIENCE):
        self.patience = patience
        self.weak_logs = 0
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        weak = expert_term_is_weak(logs or {})
        if weak is None or self.warned:
            return
        self.weak_logs = self.weak_logs + 1 if weak else 0
        if self.weak_logs < self.patience:
            return
        self.warned = True
        if state.is_world_process_zero:
            weight_mean = logs.get("chord/token_weight_mean", float("nan"))
            high_fraction = logs.get("chord/expert_prob_above_0.9", float("nan"))
            logger.warning(
                f"For {self.weak_logs} logged steps up to step {state.global_step}, the CHORD expert term has acted "
                f"at under a tenth of its mu: effective mu {logs['chord/effective_mu']:.3g} against mu "
                f"{logs['chord/mu']:.3g} (mean token weight {weight_mean:.3g}), while "
                f"{logs['chord/expert_prob_below_0.1']:.0%} of the expert tokens have p < 0.1 and {high_fraction:.0%} "
                f"p > 0.9. The expert writes in a style the policy does not produce, and the "
                f"'{args.chord_token_weighting}' weights all but vanish on such tokens. To let the expert term act: "
                "chord_token_weight_normalization='mean' (the same tokens favoured, at the strength of uniform "
                "weights), a larger mu, chord_token_weighting='uniform', or an SFT warm-up first (a CHORD-mu schedule "
                "that starts high). See 'Is the expert term doing anything?' in the README. Shown once."
            )
