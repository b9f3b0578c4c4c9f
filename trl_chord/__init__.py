"""CHORD for TRL: on-policy GRPO mixed with an SFT term on expert demonstrations (arXiv 2508.11408)."""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use: `import trl_chord` (and the `trl-chord`
# command's `configs` and `prepare` listings, which import `trl_chord.recipes`) then loads neither torch nor TRL.
_EXPORTS = {
    "ChordConfig": "chord_config",
    "ChordMuCallback": "callbacks",
    "ChordTrainer": "chord_trainer",
    "adaptive_chord_mu": "schedule",
    "chord_mu": "schedule",
    "expert_sft_loss": "losses",
    "phi_token_weights": "losses",
    "token_weights": "losses",
}

__all__ = [
    "ChordConfig",
    "ChordMuCallback",
    "ChordTrainer",
    "adaptive_chord_mu",
    "chord_mu",
    "expert_sft_loss",
    "phi_token_weights",
    "token_weights",
]

if TYPE_CHECKING:
    from .callbacks import ChordMuCallback
    from .chord_config import ChordConfig
    from .chord_trainer import ChordTrainer
    from .losses import expert_sft_loss, phi_token_weights, token_weights
    from .schedule import adaptive_chord_mu, chord_mu


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
