from trl import GRPOTrainer

from .chord_config import ChordConfig
from .chord_mixin import ChordMixin


class ChordTrainer(ChordMixin, GRPOTrainer):
    """
    Trainer for CHORD (arXiv 2508.11408): [`~trl.GRPOTrainer`] plus an SFT term on expert answers,
    `loss = (1 - mu) * grpo_loss + mu * sft_loss` on every training micro-step.

    Args:
        expert_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Expert demonstrations in one of TRL's standard formats: `prompt`/`completion` (plain text or
            conversational) or conversational `messages` (every assistant turn is trained), with an optional `tools`
            column; with a vision-language policy, examples may carry images (`images` or `image`). Needed whenever
            `mu > 0` at some step. A dict of named datasets mixes several sources in
            `args.chord_sft_dataset_proportions`, with per-source metrics.
    """

    _chord_config = ChordConfig
    _on_policy_term = "grpo"
    _tag_names = ["trl", "grpo", "chord"]
    _name = "CHORD"
