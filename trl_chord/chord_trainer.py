import json
import math
import os
import textwrap

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import concatenate_datasets
from transformers import ProcessorMixin
from transformers.training_args import OptimizerNames
from transformers.utils import logging
from trl import GRPOTrainer

from .callbacks import ChordMuCallback
from .checkpoints import CHORD_STATE_NAME, checkpoint_problem, complete_checkpoints
from .chord_config import ChordConfig
from .expert_data import (
    ExpertMixtureSampler,
    ExpertSampler,
    collate_expert_batch,
    collate_expert_images,
    prepare_expert_dataset,
)
from .expert_head import add_expert_loss_head
from .losses import ExpertLossOutput
from .schedule import chord_mu_is_ever_positive


logger = logging.get_logger(__name__)


def check_prompts_fill_a_step(num_prompts: int, args: ChordConfig) -> None:
    """
    Raises a `ValueError` when `num_prompts` RL prompts give no optimizer step. GRPOTrainer's sampler draws the prompts
    in generation batches of `generation_batch_size // num_generations` distinct prompts and drops an incomplete last
    one, and nothing trains before a generation batch is complete: with fewer prompts than one, the Trainer would end
    "training" at once, without a step and without a word.
    """
    needed = args.generation_batch_size // args.num_generations
    if num_prompts < needed:
        raise ValueError(
            f"The RL dataset has {num_prompts} prompts, but an optimizer step needs {needed}: generation_batch_size "
            f"{args.generation_batch_size} completions (per_device_train_batch_size {args.per_device_train_batch_size}"
            f" x {args.world_size} processes x steps_per_generation {args.steps_per_generation}, which defaults to "
            f"gradient_accumulation_steps) / num_generations {args.num_generations}. Training would make no step: "
            "give more prompts, or lower per_device_train_batch_size or gradient_accumulation_steps."
        )


class ChordTrainer(GRPOTrainer):
    """
    Trainer for CHORD (arXiv 2508.11408): GRPO on the model's own rollouts plus an SFT term on expert answers,
    `loss = (1 - mu) * grpo_loss + mu * sft_loss` on every micro-step.

    It takes every argument of [`~trl.GRPOTrainer`], plus `expert_dataset`. At each GRPO micro-step in training, each
    process draws one micro-batch of `args.chord_sft_per_device_train_batch_size` expert examples from its own shard
    and adds its SFT loss, scaled for gradient accumulation as GRPOTrainer scales its own. When `mu` is 0 for a step,
    no expert forward pass runs. Evaluation loss stays GRPO's. The expert term goes through its own LM head
    ([`~trl_chord.expert_head.weighted_expert_nll`], chosen by probing the model) and, on one device and under DDP, is
    backpropagated before the GRPO forward (`backward_expert_term_first`), so that the step's peak memory is the larger
    term's. Under DeepSpeed, FSDP and LOMO the two terms share one backward, and the head recomputes its logits in it
    rather than hold its gradient through the GRPO pass. For Mixture-of-Experts models, the expert term carries the
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

    _tag_names = ["trl", "grpo", "chord"]
    _name = "CHORD"
    _paper = {
        "title": "On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and Reinforcement "
        "Learning via Dynamic Weighting",
        "id": "2508.11408",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhang2025chord,
                title        = {{On-Policy RL Meets Off-Policy Experts: Harmonizing Supervised Fine-Tuning and
                                 Reinforcement Learning via Dynamic Weighting}},
                author       = {Wenhao Zhang and Yuexiang Xie and Yuchang Sun and Yanxi Chen and Guoyin Wang and
                                Yaliang Li and Bolin Ding and Jingren Zhou},
                year         = 2025,
                eprint       = {arXiv:2508.11408},
            }"""),
    }

    def __init__(
        self, model, reward_funcs=None, args: ChordConfig | None = None, *grpo_args, expert_dataset=None, **grpo_kwargs
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = ChordConfig(f"{model_name.split('/')[-1]}-CHORD")
        elif not isinstance(args, ChordConfig):
            raise TypeError(
                "`args` must be a `ChordConfig` (a `GRPOConfig` with the chord_* options), got "
                f"{type(args).__name__}. "
                "Build it with `ChordConfig(**grpo_config.to_dict(), chord_...=...)`."
            )
        if args.chord_mu_schedule == "adaptive":
            mu_ever_positive = args.chord_adaptive_mu_tau > 0
        else:
            mu_ever_positive = chord_mu_is_ever_positive(
                args.chord_mu_peak, args.chord_mu_valley, args.chord_mu_warmup_steps, args.chord_mu_decay_steps
            )
        if mu_ever_positive and expert_dataset is None:
            if args.chord_mu_schedule == "adaptive":
                schedule = f"chord_mu_schedule='adaptive', chord_adaptive_mu_tau={args.chord_adaptive_mu_tau}"
            else:
                schedule = f"chord_mu_peak={args.chord_mu_peak}, chord_mu_valley={args.chord_mu_valley}"
            raise ValueError(
                f"The CHORD schedule gives mu > 0 at some step ({schedule}), but no `expert_dataset` was given. Pass "
                "`expert_dataset=...`, or set chord_mu_peak=chord_mu_valley=0 for plain GRPO."
            )
        if not mu_ever_positive and expert_dataset is not None:
            logger.warning(
                "mu is 0 at every step (chord_mu_peak and chord_mu_valley are 0), so the `expert_dataset` is never "
                "used and this run is plain GRPO."
            )
            expert_dataset = None

        super().__init__(model, reward_funcs, args, *grpo_args, **grpo_kwargs)

        self.mu_callback = ChordMuCallback(
            args.chord_mu_peak,
            args.chord_mu_valley,
            args.chord_mu_warmup_steps,
            args.chord_mu_decay_steps,
            adaptive_tau=args.chord_adaptive_mu_tau if args.chord_mu_schedule == "adaptive" else None,
        )
        self.add_callback(self.mu_callback)
        self._warned_zero_advantages = False
        self._logged_grpo_skip = False
        self.skips_grpo_at_mu_one = (
            args.chord_mu_schedule == "cosine" and max(args.chord_mu_peak, args.chord_mu_valley) >= 1
        )
        self.expert_dataset = None
        self.expert_sampler = None
        self.expert_source_names = None
        if args.chord_sft_dataset_proportions is not None and not isinstance(expert_dataset, dict):
            raise ValueError(
                "`chord_sft_dataset_proportions` is set, but `expert_dataset` is not a dict of named datasets: give "
                "`expert_dataset={name: dataset, ...}` with the names the proportions use."
            )
        if isinstance(expert_dataset, dict):
            self._prepare_expert_sources(expert_dataset, args)
        elif expert_dataset is not None:
            with self.accelerator.main_process_first():
                self.expert_dataset = prepare_expert_dataset(
                    expert_dataset,
                    self.processing_class,
                    max_length=args.chord_sft_max_length,
                    image_token_id=self._image_token_id(),
                )
            self.expert_sampler = ExpertSampler(
                len(self.expert_dataset),
                batch_size=args.chord_sft_per_device_train_batch_size,
                num_replicas=self.accelerator.num_processes,
                rank=self.accelerator.process_index,
                seed=args.seed,
            )
        if self.expert_dataset is not None:
            add_expert_loss_head(
                self.model.get_base_model() if is_peft_model(self.model) else self.model,
                weighting=args.chord_token_weighting,
                focal_gamma=args.chord_focal_gamma,
                cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                aggregation=args.chord_sft_loss_agg_mode,
                norm_length=args.chord_sft_max_length,
            )
        # Backpropagating the expert term before the GRPO forward frees its graph and folds its gradient into `.grad`
        # before the GRPO graph exists: the step's peak memory is that of the larger term, not of both plus a second
        # copy of the gradients. DeepSpeed and FSDP own the backward (one per micro-step), and LOMO updates the
        # weights inside it, so there the two terms share one backward.
        self.backward_expert_term_first = self.accelerator.distributed_type not in (
            DistributedType.DEEPSPEED,
            DistributedType.FSDP,
        ) and args.optim not in (OptimizerNames.LOMO, OptimizerNames.ADALOMO)

    @property
    def chord_mu(self) -> float:
        """Weight of the SFT term for the current optimizer step."""
        return self.mu_callback.mu

    def _prepare_expert_sources(self, sources: dict, args: ChordConfig) -> None:
        """Tokenize several named expert datasets into one, and mix them with an [`ExpertMixtureSampler`]."""
        if not sources:
            raise ValueError("`expert_dataset` is an empty dict: give at least one named dataset.")
        prepared = {}
        with self.accelerator.main_process_first():
            for name, dataset in sources.items():
                try:
                    prepared[name] = prepare_expert_dataset(
                        dataset,
                        self.processing_class,
                        max_length=args.chord_sft_max_length,
                        source=name,
                        image_token_id=self._image_token_id(),
                    )
                except (TypeError, ValueError) as error:
                    raise type(error)(f"Expert source {name!r}: {error}") from error
        proportions = args.chord_sft_dataset_proportions or {name: len(data) for name, data in prepared.items()}
        if set(proportions) != set(prepared):
            raise ValueError(
                f"`chord_sft_dataset_proportions` names the sources {sorted(proportions)}, but `expert_dataset` has "
                f"{sorted(prepared)}: give a proportion for each source, and only for those."
            )
        self.expert_source_names = list(prepared)
        self.expert_dataset = concatenate_datasets(list(prepared.values()))
        self.expert_sampler = ExpertMixtureSampler(
            {name: len(data) for name, data in prepared.items()},
            proportions,
            batch_size=args.chord_sft_per_device_train_batch_size,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            seed=args.seed,
        )

    def _image_token_id(self) -> int | None:
        """The placeholder token of an image's features, for a vision-language policy (the config entry TRL reads)."""
        if not isinstance(self.processing_class, ProcessorMixin):
            return None
        return getattr(self.model.config, "image_token_id", None)

    def _next_expert_batch(self) -> dict[str, torch.Tensor]:
        """The next expert micro-batch: token ids and masks, the source of each example with several sources, and
        for a vision-language policy the image inputs of its examples' images."""
        indices = self.expert_sampler.next_batch()
        examples = [self.expert_dataset[index] for index in indices]
        batch = collate_expert_batch(examples, pad_token_id=self._tokenizer.pad_token_id)
        if isinstance(self.processing_class, ProcessorMixin):
            batch.update(collate_expert_images(examples, self.processing_class, batch["input_ids"].shape[1]))
        if self.expert_source_names is not None:
            batch["source"] = torch.tensor([self.expert_sampler.source_of(index) for index in indices])
        return {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}

    def _expert_loss(self, model) -> tuple[ExpertLossOutput, torch.Tensor | None]:
        """
        The expert SFT loss of one micro-batch, plus the router load-balancing loss as GRPOTrainer adds its own; and,
        with several sources, each source's NLL sum and token count (a `(2, num_sources)` tensor).
        """
        batch = self._next_expert_batch()
        # Pixel values, image grids or sizes, token types: whatever the processor gave for the micro-batch's images
        image_inputs = {
            name: value
            for name, value in batch.items()
            if name not in ("input_ids", "attention_mask", "completion_mask", "source")
        }
        # MoE models: request the router logits exactly when GRPOTrainer does for the GRPO term
        moe_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            expert = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **image_inputs,
                labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                chord_expert_loss=True,
                # When the backward comes at once, the head computes its gradient in the forward; else it recomputes
                # in the backward, so that no (vocab, hidden) gradient is held through the GRPO pass
                chord_head_gradient_in_forward=self.backward_expert_term_first,
                **moe_kwargs,
            )
        if self.aux_loss_enabled:
            expert.loss = expert.loss + self.router_aux_loss_coef * expert.aux_loss
        per_source = None
        if self.expert_source_names is not None:
            rows = torch.stack([expert.row_nll_sums, expert.row_num_tokens]).float()
            per_source = rows.new_zeros(2, len(self.expert_source_names))
            per_source.index_add_(1, batch["source"].to(rows.device), rows)
        return expert, per_source

    def grpo_term_skipped(self) -> bool:
        """
        Whether this training step leaves out the GRPO term: `mu == 1` under the cosine schedule gives it weight 0, so
        no rollouts are generated or scored and no GRPO forward runs. `mu` depends only on the step, so every process
        decides alike. (The adaptive schedule needs every step's rollouts to set `mu`, so it never skips.)
        """
        return self.model.training and self.mu_callback.adaptive_tau is None and self.chord_mu >= 1.0

    def _prepare_inputs(self, generation_batch):
        if self.grpo_term_skipped():
            # The buffered rollouts are dropped: the next step that trains on rollouts generates them afresh
            self._buffered_inputs = None
            if not self._logged_grpo_skip:
                logger.info(
                    f"mu = 1 at optimizer step {self.state.global_step + 1}: the GRPO term weighs 0, so its rollouts "
                    "are not generated and its forward does not run (`chord/grpo_skipped` = 1) on such steps."
                )
                self._logged_grpo_skip = True
            return {}
        return super()._prepare_inputs(generation_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        mu = self.chord_mu
        skip_grpo = self.grpo_term_skipped()
        # GRPOTrainer's loss is already divided by the accumulation steps; the logged terms are per micro-step
        accumulation_steps = self.current_gradient_accumulation_steps
        # mu depends only on the step, so every process makes the same choice here: no collective is left waiting
        if mu > 0 and self.backward_expert_term_first and not skip_grpo:
            # Under DDP the gradients are all-reduced once, by the GRPO backward, over both terms' sum
            with self.accelerator.no_sync(model):
                expert, per_source = self._expert_loss(model)
                expert_term = mu * expert.loss / accumulation_steps
                # `training_step` hands the returned loss to this same call, so both terms are scaled alike
                self.accelerator.backward(expert_term)
            expert_term = expert_term.detach()
        elif mu > 0:
            expert, per_source = self._expert_loss(model)
            expert_term = mu * expert.loss / accumulation_steps

        stats = []
        if skip_grpo:
            loss = expert_term
        else:
            grpo_loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            advantages = inputs["advantages"]
            stats += [
                grpo_loss.detach() * accumulation_steps,
                (advantages != 0).sum(),
                torch.tensor(advantages.numel()),
            ]
            loss = (1.0 - mu) * grpo_loss + expert_term if mu > 0 else grpo_loss
        if mu > 0:
            stats += [expert.loss.detach(), expert.nll_sum, expert.prob_sum, expert.weight_sum, expert.num_tokens]
            if self.aux_loss_enabled:
                stats.append(expert.aux_loss.detach())
            if per_source is not None:
                stats += list(per_source.flatten())

        device = self.accelerator.device
        totals = self.accelerator.reduce(torch.stack([s.float().to(device) for s in stats]), reduction="sum").tolist()
        metrics = self._metrics["train"]
        metrics["chord/mu"].append(mu)
        if self.skips_grpo_at_mu_one:
            metrics["chord/grpo_skipped"].append(float(skip_grpo))
        if not skip_grpo:
            self._log_grpo_term(*totals[:3])
            totals = totals[3:]
        if mu > 0:
            num_sources = 0 if self.expert_source_names is None else len(self.expert_source_names)
            self._log_expert_term(*totals[: len(totals) - 2 * num_sources])
            if num_sources:
                self._log_expert_sources(totals[-2 * num_sources :])
        return loss

    def _log_grpo_term(self, grpo_loss: float, nonzero_advantages: float, num_rollouts: float) -> None:
        """The GRPO term's metrics, from sums over processes."""
        # Reduced over processes, so every process sees a bad value and stops at the same point, before any update
        self._raise_if_not_finite("GRPO", grpo_loss)
        metrics = self._metrics["train"]
        metrics["chord/grpo_loss"].append(grpo_loss / self.accelerator.num_processes)
        metrics["chord/nonzero_advantage_frac"].append(nonzero_advantages / num_rollouts)
        if nonzero_advantages == 0 and not self._warned_zero_advantages:
            # The "loss is always 0" report: with identical rewards in every group, GRPO has nothing to learn from
            logger.warning(
                f"At optimizer step {self.state.global_step + 1}, every rollout group had identical rewards, so every "
                "advantage and the GRPO term are 0 (see `frac_reward_zero_std` and `chord/nonzero_advantage_frac`); "
                "the SFT term still trains whenever mu > 0. Shown once per run."
            )
            self._warned_zero_advantages = True

    def _log_expert_sources(self, totals: list[float]) -> None:
        """Each source's NLL and token count this micro-step, from sums over processes (`totals`: NLL sums, then
        token counts); a source with no token in it is left out of its NLL's average."""
        metrics = self._metrics["train"]
        num_sources = len(self.expert_source_names)
        for name, nll_sum, num_tokens in zip(self.expert_source_names, totals[:num_sources], totals[num_sources:]):
            metrics[f"chord/expert_tokens/{name}"].append(num_tokens)
            if num_tokens > 0:
                metrics[f"chord/expert_nll/{name}"].append(nll_sum / num_tokens)

    def _log_expert_term(self, sft_loss, nll_sum, prob_sum, weight_sum, num_tokens, aux_loss=None) -> None:
        """The expert term's metrics, from sums over processes."""
        self._raise_if_not_finite("SFT", sft_loss)
        metrics = self._metrics["train"]
        num_processes = self.accelerator.num_processes
        metrics["chord/sft_loss"].append(sft_loss / num_processes)
        metrics["chord/expert_nll"].append(nll_sum / max(num_tokens, 1.0))
        metrics["chord/expert_token_prob"].append(prob_sum / max(num_tokens, 1.0))
        metrics["chord/expert_tokens"].append(num_tokens)
        if aux_loss is not None:
            metrics["chord/expert_aux_loss"].append(aux_loss / num_processes)
        if self.args.chord_token_weighting != "uniform":
            name = "phi" if self.args.chord_token_weighting == "phi" else "token_weight"
            metrics[f"chord/{name}_mean"].append(weight_sum / max(num_tokens, 1.0))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            # The mean reward over every process's rollouts, which GRPOTrainer has just logged
            self.mu_callback.observe_mean_reward(self._metrics["train"]["reward"][-1])
        return output

    def _raise_if_not_finite(self, term: str, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"The {term} loss is {value} at optimizer step {self.state.global_step + 1} (micro-step "
                f"{self._step + 1} of the run): training stops before it reaches the weights. Lower the learning "
                "rate, check the rewards and the expert data, or use bf16 rather than fp16."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """[`~transformers.Trainer.train`], resuming only from complete checkpoints.

        Fails at once when the RL dataset has fewer prompts than an optimizer step needs (`check_prompts_fill_a_step`).

        With `resume_from_checkpoint=True`, the newest complete checkpoint in `output_dir` is used: ones cut short by
        a crash during the save are skipped with a warning. A checkpoint path given explicitly must be complete.
        """
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):  # not a streamed dataset
            check_prompts_fill_a_step(len(self.train_dataset), self.args)
        needs_chord_state = self.expert_sampler is not None
        if resume_from_checkpoint is True:
            complete, incomplete = complete_checkpoints(self.args.output_dir, needs_chord_state)
            for checkpoint, problem in incomplete.items():
                logger.warning(f"Not resuming from {checkpoint}: {problem}.")
            if not complete:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
            resume_from_checkpoint = complete[0]
        elif isinstance(resume_from_checkpoint, str):
            problem = checkpoint_problem(resume_from_checkpoint, needs_chord_state)
            if problem is not None:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir):
        # The expert sampler's position is data-order state, like the RNG states, and is written with them: before
        # trainer_state.json, which the Trainer writes last, so a checkpoint with both state files is complete.
        super()._save_rng_state(output_dir)
        if self.expert_sampler is not None and self.args.should_save:
            temporary_path = os.path.join(output_dir, CHORD_STATE_NAME + ".tmp")
            with open(temporary_path, "w") as file:
                json.dump({"expert_sampler": self.expert_sampler.state_dict()}, file)
            os.replace(temporary_path, os.path.join(output_dir, CHORD_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.expert_sampler is not None and checkpoint is not None:
            with open(os.path.join(checkpoint, CHORD_STATE_NAME)) as file:
                self.expert_sampler.load_state_dict(json.load(file)["expert_sampler"])
