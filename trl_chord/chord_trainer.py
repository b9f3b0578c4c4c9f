from trl import GRPOTrainer

from .chord_config import ChordConfig

# ChordMixin, and the names written here before it took them (issue 22): still importable from here
from .chord_mixin import (  # noqa: F401
    EXPERT_METRIC_SUMS,
    ChordMixin,
    TermGradientNorms,
    check_prompts_fill_a_step,
    expert_backward_runs_first,
)


class ChordTrainer(ChordMixin, GRPOTrainer):
    """
    Trainer for CHORD (arXiv 2508.11408): GRPO on the model's own rollouts plus an SFT term on expert answers,
    `loss = (1 - mu) * grpo_loss + mu * sft_loss` on every micro-step.

    It takes every argument of [`~trl.GRPOTrainer`], plus `expert_dataset`. At each GRPO micro-step in training, each
    process draws one micro-batch of `args.chord_sft_per_device_train_batch_size` expert examples from its own shard
    and adds its SFT loss, scaled for gradient accumulation as GRPOTrainer scales its own. When `mu` is 0 for a step,
    no expert forward pass runs. Evaluation loss stays GRPO's. The expert term goes through its own LM head
    (chosen once by probing the model, or set by `args.chord_expert_head`; `chord_expert_head` says which) and, on one
    device and under DDP, is backpropagated before the GRPO forward (`backward_expert_term_first`), so that the step's
    peak memory is the larger term's. Under DeepSpeed, FSDP and optimizers that step inside the backward (LOMO,
    layer-wise GaLore) the two terms share one backward, and the head recomputes its logits in it rather than hold its
    gradient through the GRPO pass. For Mixture-of-Experts models, the expert term carries the
    router load-balancing loss exactly when GRPOTrainer adds it to the GRPO term.

    Args:
        expert_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Expert demonstrations, in one of TRL's standard formats: `prompt`/`completion` (plain text or
            conversational) or conversational `messages` (every assistant turn is trained), with an optional `tools`
            column for the chat template. With a vision-language policy (a processor as `processing_class`), examples
            may carry images (`images` or `image` column), processed as GRPOTrainer processes its prompts' images.
            Needed whenever `mu > 0` at some step. A dict of named datasets mixes
            several sources in `args.chord_sft_dataset_proportions` (by default in proportion to their sizes), with
            per-source metrics `chord/expert_nll/<name>` and `chord/expert_tokens/<name>`.
    """

    _chord_config = ChordConfig
    _on_policy_term = "grpo"
    _tag_names = ["trl", "grpo", "chord"]
    _name = "CHORD"

    def grpo_term_skipped(self) -> bool:
        """
        Whether this training step leaves out the GRPO term: `mu == 1` under the cosine schedule gives it weight 0, so
        no rollouts are generated or scored and no GRPO forward runs. `mu` depends only on the step, so every process
        decides alike. (The adaptive schedule needs every step's rollouts to set `mu`, so it never skips.)
        """
        return super().on_policy_term_skipped()

    def on_policy_term_skipped(self) -> bool:
        # ChordTrainer's public name for it is `grpo_term_skipped`: what replaces that one decides
        return self.grpo_term_skipped()
