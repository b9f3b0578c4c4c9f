"""
CHORD on TRL's AsyncGRPOTrainer (`trl.experimental.async_grpo`): the expert term of [`ChordMixin`] added to the loss on
the training side. The rollout worker and the weight sync are AsyncGRPOTrainer's own and untouched: expert answers need
no generation.
"""

from dataclasses import dataclass

import torch
import transformers
from transformers.utils import logging


try:
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer
except ImportError as error:  # TRL 1.16's packing imports what transformers 4 lacks
    raise ImportError(
        f"ChordAsyncGRPOTrainer extends TRL's AsyncGRPOTrainer, which does not import with transformers "
        f"{transformers.__version__} ({error}). It needs transformers 5 (tested with 5.17 and 5.24); ChordTrainer and "
        "ChordRLOOTrainer work with transformers 4.56 and later."
    ) from error

from .chord_config import ChordOptions, documented
from .chord_mixin import ChordMixin


logger = logging.get_logger(__name__)


@documented
@dataclass
class ChordAsyncGRPOConfig(ChordOptions, AsyncGRPOConfig):
    r"""
    Configuration class for [`ChordAsyncGRPOTrainer`]: every parameter of
    [`~trl.experimental.async_grpo.AsyncGRPOConfig`] and the `chord_*` ones of [`ChordOptions`], below, but
    `chord_mu_schedule="adaptive"`: the rollouts' rewards reach the main process only, and mu must be alike on every
    process.
    """

    _base_config = AsyncGRPOConfig

    @classmethod
    def from_async_grpo_config(cls, async_grpo_config: AsyncGRPOConfig, **chord_options) -> "ChordAsyncGRPOConfig":
        """A `ChordAsyncGRPOConfig` with every option of `async_grpo_config` and the given `chord_*` ones."""
        return cls._from_base_config(async_grpo_config, **chord_options)

    def __post_init__(self):
        if self.chord_mu_schedule == "adaptive":
            raise ValueError(
                "chord_mu_schedule='adaptive' is not available with AsyncGRPOTrainer: its rollouts' rewards reach the "
                "main process only, and mu must be the same on every process at every micro-step. Use the cosine "
                "schedule (chord_mu_peak, chord_mu_valley, chord_mu_warmup_steps, chord_mu_decay_steps)."
            )
        super().__post_init__()


def packed_attention_inputs(lengths: list[int], device: torch.device) -> dict:
    """
    The inputs AsyncGRPOTrainer's packed ("tree") attention needs for independent sequences of these lengths laid end
    to end in one row: each sequence's positions from 0, and each one a segment attending to its own tokens only (the
    packing of [`~trl.experimental.async_grpo.packing.TreeRow`] with nothing shared between the sequences).
    """
    boundaries = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(length, device=device) for length in lengths])
    longest = max(lengths)
    return {
        "position_ids": positions.unsqueeze(0),
        "tree_kv_index": torch.arange(int(boundaries[-1]), device=device),
        "tree_cu_seqlens_q": boundaries,
        "tree_cu_seqlens_k": boundaries,
        "tree_max_seqlen_q": longest,
        "tree_max_seqlen_k": longest,
    }


class ChordAsyncGRPOTrainer(ChordMixin, AsyncGRPOTrainer):
    """
    Trainer for CHORD on TRL's asynchronous GRPO: [`~trl.experimental.async_grpo.AsyncGRPOTrainer`] plus the expert
    term of [`ChordTrainer`] on the training side, each process's expert micro-batch packed into one row of
    independent sequences ([`packed_attention_inputs`]); the rollout worker and the weight sync are TRL's, unchanged.
    """

    _chord_config = ChordAsyncGRPOConfig
    _on_policy_term = "grpo"
    _generates_rollouts = False
    _tag_names = ["trl", "async-grpo", "chord"]
    _name = "CHORD-AsyncGRPO"

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, expert_dataset=None, **trainer_kwargs):
        super().__init__(model, reward_funcs, args, *trainer_args, expert_dataset=expert_dataset, **trainer_kwargs)
        expert_tokens = self.args.chord_sft_per_device_train_batch_size * self.args.chord_sft_max_length
        budget = self.args.token_budget
        if self.expert_dataset is not None and budget is not None and 0 < budget < expert_tokens:
            logger.warning(
                f"An expert micro-batch row can hold up to {expert_tokens} tokens "
                f"(chord_sft_per_device_train_batch_size x chord_sft_max_length), more than token_budget={budget} "
                "allows a rollout row: the expert forward "
                "can then take more memory than the GRPO one. Lower either chord_* option to keep it within budget."
            )

    def _packed_attention_inputs(self):
        return packed_attention_inputs

    def _expert_model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert micro-batch packed into one row: its sequences end to end, the labels of their completion tokens
        (-100 elsewhere, and at each sequence's first token, which nothing before it in the row predicts), each
        position's sequence, and the packed attention's inputs."""
        lengths = batch["attention_mask"].sum(-1).tolist()
        input_ids, labels, sequence_ids = [], [], []
        for row, length in enumerate(lengths):
            ids = batch["input_ids"][row, :length]
            row_labels = ids.masked_fill(batch["completion_mask"][row, :length] == 0, -100)
            row_labels[0] = -100
            input_ids.append(ids)
            labels.append(row_labels)
            sequence_ids.append(torch.full_like(ids, row))
        return {
            "input_ids": torch.cat(input_ids).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "chord_sequence_ids": torch.cat(sequence_ids).unsqueeze(0),
            **packed_attention_inputs(lengths, batch["input_ids"].device),
        }

    def _rollout_advantages(self, inputs) -> torch.Tensor:
        # One advantage per trained rollout token; the row is padded to the longest row with token_index -1
        return inputs["advantages"][inputs["token_index"] >= 0]
