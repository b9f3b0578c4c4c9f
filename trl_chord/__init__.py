"""CHORD for TRL: on-policy GRPO (or RLOO) mixed with an SFT term on expert demonstrations (arXiv 2508.11408), and
LUFFY (arXiv 2504.14945): expert completions inside GRPO's groups."""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Each public name and its module, imported on first use: `import trl_chord` (and the `trl-chord` command's `configs`
# and `prepare` listings) then loads neither torch nor TRL, nor TRL's experimental AsyncGRPOTrainer but for its names
_import_structure = {
    "callbacks": ["ChordMuCallback"],
    "chord_async_grpo": ["ChordAsyncGRPOConfig", "ChordAsyncGRPOTrainer"],
    "chord_config": ["ChordConfig", "ChordOptions"],
    "chord_rloo": ["ChordRLOOConfig", "ChordRLOOTrainer"],
    "chord_trainer": ["ChordTrainer"],
    "losses": ["expert_sft_loss", "phi_token_weights", "token_weights"],
    "luffy_config": ["ChordLuffyConfig", "LuffyConfig", "LuffyOptions"],
    "luffy_trainer": ["ChordLuffyTrainer", "LuffyTrainer"],
    "schedule": ["adaptive_chord_mu", "chord_mu"],
}
_module_of = {name: module for module, names in _import_structure.items() for name in names}
__all__ = sorted(_module_of)

if TYPE_CHECKING:  # the same names, for type checkers
    from .callbacks import ChordMuCallback  # noqa: F401
    from .chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer  # noqa: F401
    from .chord_config import ChordConfig, ChordOptions  # noqa: F401
    from .chord_rloo import ChordRLOOConfig, ChordRLOOTrainer  # noqa: F401
    from .chord_trainer import ChordTrainer  # noqa: F401
    from .losses import expert_sft_loss, phi_token_weights, token_weights  # noqa: F401
    from .luffy_config import ChordLuffyConfig, LuffyConfig, LuffyOptions  # noqa: F401
    from .luffy_trainer import ChordLuffyTrainer, LuffyTrainer  # noqa: F401
    from .schedule import adaptive_chord_mu, chord_mu  # noqa: F401


def __getattr__(name: str):
    if name not in _module_of:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f".{_module_of[name]}", __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
