"""LUFFY (arXiv 2504.14945) on TRL's GRPOTrainer, alone or with CHORD's expert SFT term."""

import textwrap

import torch
from datasets import Dataset
from transformers.utils import logging
from trl import GRPOTrainer

from .chord_mixin import ChordMixin
from .luffy import aggregate_luffy_loss, expert_slots, luffy_token_losses, splice_expert_completions
from .luffy_config import ChordLuffyConfig, LuffyConfig, LuffyOptions, luffy_loss_is_used
from .luffy_data import expert_completion_ids, expert_completions


logger = logging.get_logger(__name__)

LUFFY_PAPER = {
    "title": "Learning to Reason under Off-Policy Guidance",
    "id": "2504.14945",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{yan2025luffy,
            title        = {{Learning to Reason under Off-Policy Guidance}},
            author       = {Jianhao Yan and Yafu Li and Zican Hu and Zhi Wang and Ganqu Cui and Xiaoye Qu and
                            Yu Cheng and Yue Zhang},
            year         = 2025,
            eprint       = {arXiv:2504.14945},
        }"""),
}


class LuffyMixin:
    """
    LUFFY for TRL's GRPOTrainer, as a mixin in front of it (as [`ChordMixin`] is), so that one implementation serves
    LUFFY alone ([`LuffyTrainer`]) and with CHORD's expert term ([`ChordLuffyTrainer`]).

    In training, each prompt's group of `num_generations` holds `k = args.luffy_num_expert_completions` expert
    completions of the prompt, from the RL dataset's `args.luffy_expert_column`, in place of as many rollouts. They
    are put in at one point, [`_generate_single_turn`], where GRPOTrainer's generation returns its completions whether
    they come from `generate` or from vLLM; from there on, TRL's code treats them as rollouts: decoded, scored by the
    reward functions, their advantages computed over the whole mixed group (with `scale_rewards`), and their
    reference log-probabilities computed when `beta > 0`. [`_compute_loss`] then gives their tokens LUFFY's shaped
    loss ([`luffy_token_losses`]: no sampling correction nor `old_per_token_logps`, which experts lack) and aggregates
    the mixed batch ([`aggregate_luffy_loss`]).
    """

    _paper = LUFFY_PAPER

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, expert_dataset=None, **trainer_kwargs):
        if expert_dataset is not None:
            raise TypeError(
                "`LuffyTrainer` takes no `expert_dataset`: LUFFY's expert completions come with the RL prompts, in "
                "the column `args.luffy_expert_column`. For CHORD's expert SFT term as well, use `ChordLuffyTrainer`."
            )
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = LuffyConfig(f"{model_name.split('/')[-1]}-LUFFY")
        elif not isinstance(args, LuffyOptions):
            raise TypeError(
                f"`args` must be a `LuffyConfig` (a `GRPOConfig` with the luffy_* options), got "
                f"{type(args).__name__}. Build it with `LuffyConfig.from_grpo_config(grpo_config, luffy_...=...)`."
            )
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        self._luffy_expert_ids = None  # the expert completions waiting for the splice, one entry per local row
        self._luffy_rewards_per_func = None
        if args.luffy_num_expert_completions > 0:
            self._check_luffy_inputs()

    def _check_luffy_inputs(self) -> None:
        """Refuse what the splice cannot serve, and check the expert column of the RL dataset (counting the prompts
        without an expert completion) before training starts."""
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError(
                "LUFFY's expert completions are whole answers put in place of rollouts: they cannot be run through "
                "tool calls, environments or a `rollout_func`. Leave those out."
            )
        if self._is_vlm:
            raise ValueError(
                "LUFFY with a vision-language model (a processor as `processing_class`) is not supported yet."
            )
        column = self.args.luffy_expert_column
        dataset = self.train_dataset
        column_names = getattr(dataset, "column_names", None)
        if column_names is not None and column not in column_names:
            raise ValueError(
                f"The RL dataset has no column {column!r} (`luffy_expert_column`) with the expert completions LUFFY "
                f"puts in each prompt's group; its columns are {column_names}."
            )
        if not isinstance(dataset, Dataset):
            return  # a streamed dataset's rows are checked as they come
        missing, index = 0, 0
        for batch in dataset.select_columns([column]).iter(batch_size=1024):
            for value in batch[column]:
                missing += not expert_completions(value, column, f"RL prompt {index}")
                index += 1
        if missing == len(dataset):
            raise ValueError(f"No row of the RL dataset has an expert completion in {column!r}.")
        if missing:
            logger.warning(
                f"{missing} of {len(dataset)} RL prompts have no expert completion in {column!r}: their groups are "
                "trained on rollouts alone (`luffy/missing_expert_frac` counts them)."
            )

    def _expert_ids_of(self, inputs: list[dict]) -> tuple[list[list[int] | None], int, int, int]:
        """Each local row's expert completion tokens (`None` for a rollout), and the counts of expert places, of
        those without an expert completion, and of expert completions cut at `max_completion_length`."""
        column = self.args.luffy_expert_column
        places = expert_slots(
            len(inputs),
            self.accelerator.process_index * len(inputs),
            self.num_generations,
            self.args.luffy_num_expert_completions,
        )
        expert_ids, num_places, missing, truncated = [], 0, 0, 0
        for row, place in zip(inputs, places):
            ids = None
            if place >= 0:
                num_places += 1
                if column not in row:
                    raise ValueError(
                        f"An RL prompt reached the trainer without its {column!r} column (`luffy_expert_column`): "
                        "with `remove_unused_columns=True` the Trainer drops it; set it to False (GRPOConfig's "
                        "default)."
                    )
                completions = expert_completions(row[column], column, f"The RL prompt {str(row['prompt'])[:80]!r}")
                if completions:
                    ids = expert_completion_ids(
                        row["prompt"],
                        completions[place % len(completions)],
                        self.processing_class,
                        self.eos_token_ids,
                        self.chat_template,
                        self.chat_template_kwargs,
                    )
                    if self.max_completion_length is not None and len(ids) > self.max_completion_length:
                        ids = ids[: self.max_completion_length]
                        truncated += 1
                else:
                    missing += 1
            expert_ids.append(ids)
        return expert_ids, num_places, missing, truncated

    def _generate_and_score_completions(self, inputs):
        if not self.model.training or self.args.luffy_num_expert_completions == 0:
            return super()._generate_and_score_completions(inputs)
        expert_ids, num_places, missing, truncated = self._expert_ids_of(inputs)
        self._luffy_expert_ids = expert_ids
        try:
            output = super()._generate_and_score_completions(inputs)
            spliced = self._luffy_expert_ids is None
        finally:
            self._luffy_expert_ids = None
            rewards_per_func, self._luffy_rewards_per_func = self._luffy_rewards_per_func, None
        if not spliced:
            raise RuntimeError(
                "The expert completions were not put into the groups: GRPOTrainer's generation did not go through "
                "`_generate_single_turn` (docs/trl-internals.md)."
            )
        is_expert = torch.tensor([ids is not None for ids in expert_ids], device=self.accelerator.device)
        output["luffy_off_policy"] = is_expert
        self._log_mixed_group(is_expert, output["advantages"], rewards_per_func, num_places, missing, truncated)
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        # Both of GRPOTrainer's generation paths (transformers' `generate` and vLLM) return their completions here
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
        )
        if self._luffy_expert_ids is not None:
            if len(self._luffy_expert_ids) != len(completion_ids):
                raise RuntimeError(
                    f"{len(completion_ids)} completions were generated for {len(self._luffy_expert_ids)} rollout rows."
                )
            completion_ids, logprobs = splice_expert_completions(completion_ids, logprobs, self._luffy_expert_ids)
            self._luffy_expert_ids = None
        return completion_ids, logprobs

    def _calculate_rewards(self, *args, **kwargs):
        # Every process's rewards, kept for the expert completions' metrics
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._luffy_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _log_mixed_group(self, is_expert, advantages, rewards_per_func, num_places, missing, truncated) -> None:
        """The metrics of a batch of mixed groups, over every process's rollouts."""
        device = self.accelerator.device
        rows = self.accelerator.gather(torch.stack([is_expert.float(), advantages.float()], dim=1))
        counts = torch.tensor([num_places, missing, truncated, int(is_expert.sum())], device=device, dtype=torch.float)
        num_places, missing, truncated, num_expert = self.accelerator.reduce(counts, reduction="sum").tolist()
        gathered_expert = rows[:, 0].bool()
        # The reward as GRPOTrainer logs it: weighted sum over the functions, NaN where none scored the completion
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        metrics = self._metrics["train"]
        metrics["luffy/missing_expert_frac"].append(missing / num_places)
        metrics["luffy/on_policy_reward"].append(torch.nanmean(rewards[~gathered_expert]).item())
        if num_expert:
            metrics["luffy/expert_reward"].append(torch.nanmean(rewards[gathered_expert]).item())
            metrics["luffy/expert_advantage"].append(rows[gathered_expert, 1].mean().item())
            metrics["luffy/expert_truncated_frac"].append(truncated / num_expert)

    def _compute_loss(self, model, inputs):
        if not luffy_loss_is_used(self.args):
            return super()._compute_loss(model, inputs)
        return self._luffy_loss(model, inputs)

    def _luffy_loss(self, model, inputs) -> torch.Tensor:
        """The LUFFY loss of a micro-batch of mixed groups, on the scale of GRPOTrainer's own loss."""
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        off_policy = inputs.get("luffy_off_policy")
        if off_policy is None:  # LUFFY's aggregation without expert completions, or evaluation
            off_policy = torch.zeros(completion_ids.size(0), dtype=torch.bool, device=completion_ids.device)
        off_policy = off_policy.unsqueeze(1)
        per_token_loss, ratio, shaping, kl = self._luffy_per_token_loss(inputs, per_token_logps, off_policy)
        mode = "train" if self.model.training else "eval"
        accumulation_steps = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        step_tokens = None
        if self.loss_type == "dapo":  # GRPOTrainer's normaliser: this process's share of the step's trained tokens
            step_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                step_tokens = step_tokens * accumulation_steps / self.args.steps_per_generation
        loss = aggregate_luffy_loss(
            per_token_loss, mask, self.loss_type, accumulation_steps, self.max_completion_length, step_tokens
        )
        if self.entropy_coef != 0.0:
            # Over every completion token, the expert's too (the authors' entropy term), as GRPOTrainer scales it
            entropy_loss = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation_steps
            loss = loss - self.entropy_coef * entropy_loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_luffy_loss_metrics(mode, inputs, off_policy, ratio, shaping, per_token_logps, entropies, kl)
        return loss

    def _luffy_per_token_loss(self, inputs, per_token_logps, off_policy) -> tuple:
        """`(per_token_loss, ratio, shaping, per_token_kl)`: LUFFY's token losses plus GRPOTrainer's KL term (`None`
        at `beta = 0`)."""
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:  # on-policy: GRPOTrainer leaves them out when they equal the current ones
            old_per_token_logps = per_token_logps.detach()
        sampling_correction = self.use_vllm and self.vllm_importance_sampling_correction
        per_token_loss, ratio, shaping = luffy_token_losses(
            per_token_logps,
            old_per_token_logps,
            inputs["advantages"],
            off_policy,
            self.args.luffy_gamma,
            self.epsilon_low,
            self.epsilon_high,
            self.args.delta,
            inputs["importance_sampling_ratio"] if sampling_correction else None,
        )
        per_token_kl = None
        if self.beta != 0.0:
            ref_per_token_logps = inputs["ref_per_token_logps"]
            per_token_kl = (
                torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
            )
            if self.args.use_bias_correction_kl:  # GRPOTrainer's correction; the ratio is 1 at expert tokens
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl
        return per_token_loss, ratio, shaping, per_token_kl

    def _log_luffy_loss_metrics(self, mode, inputs, off_policy, ratio, shaping, logps, entropies, kl) -> None:
        """The loss's metrics, from sums over every process's micro-batch: GRPOTrainer's (over the rollout tokens for
        the clip ratios) and LUFFY's over the expert tokens."""
        mask = inputs["completion_mask"]
        expert_tokens = mask * off_policy
        rollout_tokens = mask * ~off_policy
        advantages = inputs["advantages"].unsqueeze(1)
        low_clipped = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high_clipped = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        sums = {
            "shaping": (shaping * expert_tokens).sum(),
            "expert_prob": (logps.exp() * expert_tokens).sum(),
            "expert_tokens": expert_tokens.sum(),
            "entropy": (entropies * mask).sum(),
            "tokens": mask.sum(),
            "low_clipped": (low_clipped * rollout_tokens).sum(),
            "high_clipped": (high_clipped * rollout_tokens).sum(),
            "clipped": ((low_clipped | high_clipped) * rollout_tokens).sum(),
            "rollout_tokens": rollout_tokens.sum(),
        }
        if self.beta != 0.0:
            sums["kl"] = (kl * mask).sum()
        reduced = self.accelerator.reduce(torch.stack([s.detach().float() for s in sums.values()]), reduction="sum")
        totals = dict(zip(sums, reduced.tolist()))
        metrics = self._metrics[mode]
        tokens, rollout_token_count = max(totals["tokens"], 1.0), max(totals["rollout_tokens"], 1.0)
        metrics["entropy"].append(totals["entropy"] / tokens)
        metrics["clip_ratio/low_mean"].append(totals["low_clipped"] / rollout_token_count)
        metrics["clip_ratio/high_mean"].append(totals["high_clipped"] / rollout_token_count)
        metrics["clip_ratio/region_mean"].append(totals["clipped"] / rollout_token_count)
        if self.beta != 0.0:
            metrics["kl"].append(totals["kl"] / tokens)
        if totals["expert_tokens"] > 0:
            metrics["luffy/shaping_weight_mean"].append(totals["shaping"] / totals["expert_tokens"])
            metrics["luffy/expert_token_prob"].append(totals["expert_prob"] / totals["expert_tokens"])


class LuffyTrainer(LuffyMixin, GRPOTrainer):
    """
    Trainer for LUFFY (arXiv 2504.14945): GRPO whose groups mix each prompt's rollouts with `k` expert completions of
    the prompt, the expert tokens trained with LUFFY's policy shaping ([`LuffyMixin`] says how). It takes every
    argument of [`~trl.GRPOTrainer`], with a [`LuffyConfig`] as `args`; the RL dataset carries each prompt's expert
    completion in the column `args.luffy_expert_column`.
    """

    _tag_names = ["trl", "grpo", "luffy"]
    _name = "LUFFY"


class ChordLuffyTrainer(ChordMixin, LuffyMixin, GRPOTrainer):
    """
    LUFFY's mixed groups with CHORD's expert SFT term: `(1 - mu) * L_LUFFY + mu * L_SFT` on every micro-step, the
    on-policy term being [`LuffyTrainer`]'s loss and the SFT term [`ChordTrainer`]'s, on the `expert_dataset`.
    """

    _chord_config = ChordLuffyConfig
    _on_policy_term = "grpo"
    _tag_names = ["trl", "grpo", "chord", "luffy"]
    _name = "CHORD-LUFFY"
