"""CHORD for TRL: on-policy GRPO (or RLOO) mixed with an SFT term on expert demonstrations (arXiv 2508.11408)."""

from .callbacks import ChordMuCallback
from .chord_config import ChordConfig, ChordOptions
from .chord_rloo import ChordRLOOConfig, ChordRLOOTrainer
from .chord_trainer import ChordTrainer
from .losses import expert_sft_loss, phi_token_weights, token_weights
from .schedule import adaptive_chord_mu, chord_mu


__version__ = "0.1.0"

__all__ = [
    "ChordConfig",
    "ChordMuCallback",
    "ChordOptions",
    "ChordRLOOConfig",
    "ChordRLOOTrainer",
    "ChordTrainer",
    "adaptive_chord_mu",
    "chord_mu",
    "expert_sft_loss",
    "phi_token_weights",
    "token_weights",
]
