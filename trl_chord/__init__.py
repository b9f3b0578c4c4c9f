"""CHORD for TRL: on-policy GRPO (or RLOO) mixed with an SFT term on expert demonstrations (arXiv 2508.11408), and
LUFFY (arXiv 2504.14945): expert completions inside GRPO's groups."""

from typing import TYPE_CHECKING


__version__ = "0.1.0"

__all__ = [
    "ChordAsyncGRPOConfig",
    "ChordAsyncGRPOTrainer",
    "ChordConfig",
    "ChordLuffyConfig",
    "ChordLuffyTrainer",
    "ChordMuCallback",
    "ChordOptions",
    "ChordRLOOConfig",
    "ChordRLOOTrainer",
    "ChordTrainer",
    "LuffyConfig",
    "LuffyOptions",
    "LuffyTrainer",
    "adaptive_chord_mu",
    "chord_mu",
    "expert_sft_loss",
    "phi_token_weights",
    "token_weights",
]

if TYPE_CHECKING:
    from .callbacks import ChordMuCallback
    from .chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer
    from .chord_config import ChordConfig, ChordOptions
    from .chord_rloo import ChordRLOOConfig, ChordRLOOTrainer
    from .chord_trainer import ChordTrainer
    from .losses import expert_sft_loss, phi_token_weights, token_weights
    from .luffy_config import ChordLuffyConfig, LuffyConfig, LuffyOptions
    from .luffy_trainer import ChordLuffyTrainer, LuffyTrainer
    from .schedule import adaptive_chord_mu, chord_mu


def __getattr__(name: str):
    # Each public name is imported on first use: `import trl_chord` (and the `trl-chord` command's `configs` and
    # `prepare` listings, which import `trl_chord.recipes`) then loads neither torch nor TRL (nor TRL's experimental
    # AsyncGRPOTrainer, for anything but the two async names).
    if name in ("ChordConfig", "ChordOptions"):
        from . import chord_config as module
    elif name in ("ChordRLOOConfig", "ChordRLOOTrainer"):
        from . import chord_rloo as module
    elif name in ("ChordAsyncGRPOConfig", "ChordAsyncGRPOTrainer"):
        from . import chord_async_grpo as module
    elif name == "ChordMuCallback":
        from . import callbacks as module
    elif name == "ChordTrainer":
        from . import chord_trainer as module
    elif name in ("ChordLuffyConfig", "LuffyConfig", "LuffyOptions"):
        from . import luffy_config as module
    elif name in ("ChordLuffyTrainer", "LuffyTrainer"):
        from . import luffy_trainer as module
    elif name in ("expert_sft_loss", "phi_token_weights", "token_weights"):
        from . import losses as module
    elif name in ("adaptive_chord_mu", "chord_mu"):
        from . import schedule as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
