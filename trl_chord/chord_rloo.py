"""CHORD on TRL's RLOOTrainer: the expert term of [`ChordMixin`] added to the REINFORCE leave-one-out loss."""

from dataclasses import dataclass

from trl import RLOOConfig, RLOOTrainer

from .chord_config import ChordOptions, documented
from .chord_mixin import ChordMixin


@documented
@dataclass
class ChordRLOOConfig(ChordOptions, RLOOConfig):
    r"""
    Configuration class for [`ChordRLOOTrainer`]: every parameter of [`~trl.RLOOConfig`] (its `beta` defaults to 0.05:
    a reference model is loaded) and the `chord_*` ones of [`ChordOptions`], below.
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
    Trainer for CHORD with RLOO: [`~trl.RLOOTrainer`] plus the expert term of [`ChordTrainer`],
    `loss = (1 - mu) * rloo_loss + mu * sft_loss` (both undivided by the accumulation steps, as RLOOTrainer's is).
    """

    _chord_config = ChordRLOOConfig
    _on_policy_term = "rloo"
    _tag_names = ["trl", "rloo", "chord"]
    _name = "CHORD-RLOO"
