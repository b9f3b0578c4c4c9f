"""CHORD on TRL's RLOOTrainer: the expert term of [`ChordMixin`] added to the REINFORCE leave-one-out loss."""

from dataclasses import dataclass

from trl import RLOOConfig, RLOOTrainer

from .chord_config import ChordOptions, documented
from .chord_mixin import ChordMixin


@documented
@dataclass
class ChordRLOOConfig(ChordOptions, RLOOConfig):
    r"""
    Configuration class for [`ChordRLOOTrainer`].

    CHORD (arXiv 2508.11408) with RLOO as the on-policy term: `(1 - mu) * L_RLOO + mu * L_SFT`, TRL's RLOO loss on the
    model's own rollouts plus a supervised loss on expert answers from a separate dataset. [`ChordRLOOConfig`] inherits
    every parameter of [`~trl.RLOOConfig`] (note its `beta` defaults to 0.05: a reference model is loaded) and adds the
    `chord_*` parameters of [`ChordOptions`], below, exactly as [`ChordConfig`] does.
    """

    _base_config = RLOOConfig

    @classmethod
    def from_rloo_config(cls, rloo_config: RLOOConfig, **chord_options) -> "ChordRLOOConfig":
        """
        A `ChordRLOOConfig` with every option of `rloo_config` and the given `chord_*` ones: for a script that builds
        an `RLOOConfig`. (`generation_batch_size` is left out: `RLOOConfig` derives it from `steps_per_generation`,
        which is kept, and refuses both.)
        """
        return cls._from_base_config(rloo_config, ("generation_batch_size",), **chord_options)


class ChordRLOOTrainer(ChordMixin, RLOOTrainer):
    """
    Trainer for CHORD with RLOO (REINFORCE leave-one-out) as the on-policy term:
    `loss = (1 - mu) * rloo_loss + mu * sft_loss` on every micro-step.

    It takes every argument of [`~trl.RLOOTrainer`], plus `expert_dataset` (as [`ChordTrainer`] takes it), and its
    expert term is [`ChordTrainer`]'s, from the same code: the same expert data and sampler, schedule, token
    weightings, aggregations, LM head, metrics (`chord/rloo_loss`, `chord/rloo_grad_norm` and `chord/rloo_skipped` in
    place of the `chord/grpo_*` ones) and checkpoint state. RLOOTrainer returns its loss undivided by the
    gradient-accumulation steps (`Trainer.training_step` divides it), so the expert term is added undivided too. Steps
    with `mu == 1` generate no rollouts and run no RLOO forward.
    """

    _chord_config = ChordRLOOConfig
    _on_policy_term = "rloo"
    _tag_names = ["trl", "rloo", "chord"]
    _name = "CHORD-RLOO"
