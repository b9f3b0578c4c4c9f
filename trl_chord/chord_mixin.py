"""
CHORD's expert term, written once for every TRL online trainer it extends.

A CHORD trainer is [`ChordMixin`] in front of a TRL trainer, `class ChordTrainer(ChordMixin, GRPOTrainer)`: the mixin
owns everything about the expert term (its data and sampler, the mu schedule and its callback, the token weightings and
aggregation through the expert LM head, the mixing into the trainer's loss, the metrics, the checkpoint state and the
skip of the on-policy term at `mu == 1`), and reads from the trainer only what every TRL online trainer has:
`compute_loss` giving the on-policy loss of a micro-batch, `loss_is_scaled_for_ga`, `_metrics`, `aux_loss_enabled` and
`router_aux_loss_coef`. What differs between trainers is a few class attributes and two small methods
([`_rollout_advantages`], [`_expert_model_inputs`]).
"""

import json
import math
import os
import textwrap
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import DatasetDict, IterableDatasetDict, concatenate_datasets
from transformers import ProcessorMixin
from transformers.trainer_utils import IntervalStrategy
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from .callbacks import ChordMuCallback, WeakExpertTermCallback
from .checkpoints import CHORD_STATE_NAME, checkpoint_problem, complete_checkpoints
from .expert_data import (
    ExpertMixtureSampler,
    ExpertSampler,
    collate_expert_batch,
    collate_expert_images,
    prepare_expert_dataset,
)
from .expert_head.choice import LMHeadProbe
from .expert_head.forward import add_expert_loss_head, expert_loss
from .losses import HIGH_PROB, LOW_PROB, ExpertLossOutput, expert_term_strength
from .schedule import MuSchedule


logger = logging.get_logger(__name__)

# The sums of an `ExpertLossOutput` that the expert term's metrics are made of, reduced over processes
EXPERT_METRIC_SUMS = (
    "nll_sum",
    "prob_sum",
    "weight_sum",
    "num_tokens",
    "scaled_weight_sum",
    "scale_sum",
    "low_prob_tokens",
    "high_prob_tokens",
)

CHORD_PAPER = {
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


class TermGradientNorms:
    """
    The squared norm of the gradient each term sends to the trainable parameters in one micro-step, summed by a hook
    on each parameter while [`measuring`] is active: `term` names the term whose backward runs now (`"expert"` or the
    on-policy term's name, `on_policy_term`). It needs the terms' backwards to be separate (the expert term's first); a
    hook sees the gradient before it is accumulated into `.grad` (and, under DDP, before the all-reduce).
    """

    def __init__(self, parameters, on_policy_term: str = "grpo"):
        self.parameters = [param for param in parameters if param.requires_grad]
        self.on_policy_term = on_policy_term
        self.term = on_policy_term
        self.squared: dict[str, torch.Tensor] = {}

    def _add(self, grad: torch.Tensor) -> None:
        squared = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()
        self.squared[self.term] = self.squared[self.term] + squared if self.term in self.squared else squared

    @contextmanager
    def measuring(self):
        self.term, self.squared = self.on_policy_term, {}
        handles = [param.register_hook(self._add) for param in self.parameters]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def expert_backward_runs_first(distributed_type: DistributedType, optim: str) -> bool:
    """
    Whether the expert term is backpropagated on its own, before the on-policy forward: that frees its graph and folds
    its gradient into `.grad` before the on-policy graph exists, so the step's peak memory is that of the larger term.
    Not under DeepSpeed or FSDP, which own the backward (one per micro-step), nor with optimizers that step inside the
    backward (LOMO, AdaLOMO and the `*_layerwise` GaLore and APOLLO ones, which step each parameter from a hook on its
    gradient): a second backward would be a second optimizer step, on the expert gradient alone. There the two terms
    share one backward.
    """
    steps_in_backward = optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO) or getattr(
        optim, "value", optim
    ).endswith("layerwise")
    return distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP) and not steps_in_backward


def check_prompts_fill_a_step(num_prompts: int, args) -> None:
    """
    Raises a `ValueError` when `num_prompts` RL prompts give no optimizer step. GRPOTrainer's and RLOOTrainer's sampler
    draws the prompts in generation batches of `generation_batch_size // num_generations` distinct prompts and drops an
    incomplete last one, and nothing trains before a generation batch is complete: with fewer prompts than one, the
    Trainer would end "training" at once, without a step and without a word.
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


class ChordMixin:
    """
    CHORD's expert term for a TRL online trainer: `loss = (1 - mu) * on_policy_loss + mu * sft_loss` on every training
    micro-step, `on_policy_loss` being what the trainer's own `compute_loss` returns for the micro-batch.

    It takes every argument of the trainer it extends, plus `expert_dataset` (see [`ChordTrainer`]). At each training
    micro-step, each process draws one micro-batch of `args.chord_sft_per_device_train_batch_size` expert examples from
    its own shard and adds its SFT loss, on the scale of the trainer's own loss (divided by the gradient-accumulation
    steps where the trainer divides its own, `loss_is_scaled_for_ga`). When `mu` is 0 for a step, no expert forward
    runs; when it is 1 under the cosine schedule, the on-policy term is left out (and, in trainers that generate their
    own rollouts, their generation too). `mu` depends on the optimizer step alone, so every process makes each of these
    choices alike and runs the expert forward at the same micro-steps.

    Class attributes a CHORD trainer sets:

    - `_chord_config`: its config class, a [`ChordOptions`] in front of the trainer's config.
    - `_on_policy_term`: the on-policy term's name in metrics and messages (`"grpo"`: `chord/grpo_loss`, ...).
    - `_generates_rollouts`: whether the trainer generates its rollouts itself, in `_prepare_inputs`, buffered in
      `_buffered_inputs` (GRPOTrainer, RLOOTrainer), rather than receiving them from a worker.
    """

    _chord_config: type
    _on_policy_term = "grpo"
    _generates_rollouts = True
    _paper = CHORD_PAPER

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, expert_dataset=None, **trainer_kwargs):
        config_class = self._chord_config
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = config_class(f"{model_name.split('/')[-1]}-{self._name}")
        elif not isinstance(args, config_class):
            base = config_class._base_config.__name__
            argument = config_class._conversion.removeprefix("from_")
            raise TypeError(
                f"`args` must be a `{config_class.__name__}` (a `{base}` with the chord_* options), got "
                f"{type(args).__name__}. "
                f"Build it with `{config_class.__name__}.{config_class._conversion}({argument}, chord_...=...)`."
            )
        if isinstance(expert_dataset, (DatasetDict, IterableDatasetDict)):
            raise ValueError(
                f"`expert_dataset` is a `DatasetDict` with the splits {list(expert_dataset)}, not one dataset: pick "
                "the split of expert demonstrations (`load_dataset(..., split='train')` or `dataset_dict['train']`). "
                "To mix several datasets as sources on purpose, pass a plain dict, `{name: Dataset, ...}`."
            )
        schedule = MuSchedule.from_options(args)
        mu_ever_positive = schedule.is_ever_positive()
        if mu_ever_positive and expert_dataset is None:
            raise ValueError(
                f"The CHORD schedule gives mu > 0 at some step ({schedule.describe()}), but no `expert_dataset` was "
                "given. Pass `expert_dataset=...`, or set chord_mu_peak=chord_mu_valley=0 for plain "
                f"{self._on_policy_term.upper()}."
            )
        if not mu_ever_positive and (expert_dataset is not None or args.chord_sft_dataset_proportions is not None):
            unused = "the `expert_dataset`" if expert_dataset is not None else "`chord_sft_dataset_proportions`"
            logger.warning(
                f"mu is 0 at every step (chord_mu_peak and chord_mu_valley are 0), so {unused} is never used and "
                f"this run is plain {self._on_policy_term.upper()}."
            )
            expert_dataset = None

        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)

        self.mu_schedule = schedule
        self.add_callback(ChordMuCallback(schedule))
        if mu_ever_positive:
            self.add_callback(WeakExpertTermCallback())
        self._warned_zero_advantages = False
        self._logged_on_policy_skip = False
        self._chord_micro_steps = 0
        self.expert_dataset = None
        self.expert_sampler = None
        self.expert_source_names = None
        if (
            mu_ever_positive
            and args.chord_sft_dataset_proportions is not None
            and not isinstance(expert_dataset, dict)
        ):
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
                # GRPOConfig's option; RLOOConfig and AsyncGRPOConfig have none (their heads run in the model's dtype)
                cast_lm_head_to_fp32=getattr(args, "cast_lm_head_to_fp32", False),
                aggregation=args.chord_sft_loss_agg_mode,
                norm_length=args.chord_sft_max_length,
                head=args.chord_expert_head,
                normalization=args.chord_token_weight_normalization,
                packed_inputs=self._packed_attention_inputs(),
            )
        self.backward_expert_term_first = expert_backward_runs_first(self.accelerator.distributed_type, args.optim)
        self.term_gradient_norms = TermGradientNorms(self.model.parameters(), self._on_policy_term)

    @property
    def chord_mu(self) -> float:
        """Weight of the SFT term for the current optimizer step."""
        return self.mu_schedule.mu

    @property
    def chord_expert_head(self) -> LMHeadProbe | None:
        """The LM head the expert term uses and why; `None` until the first expert forward chooses it."""
        model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        head = getattr(model, "chord_expert_head", None)
        return None if head is None else head.choice

    def _prepare_expert_sources(self, sources: dict, args) -> None:
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

    def _packed_attention_inputs(self):
        """
        For a trainer whose model attends over sequences packed into one row (AsyncGRPOTrainer's tree attention): the
        function giving the forward's extra inputs for packed sequences of given lengths ([`add_expert_loss_head`]'s
        `packed_inputs`). `None`: the model takes padded batches with an attention mask.
        """
        return None

    def _next_expert_batch(self) -> dict[str, torch.Tensor]:
        """The next expert micro-batch: token ids and masks, the source of each example with several sources, and
        for a vision-language policy the image inputs of its examples' images."""
        indices = self.expert_sampler.next_batch()
        examples = [self.expert_dataset[index] for index in indices]
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        batch = collate_expert_batch(examples, pad_token_id=tokenizer.pad_token_id)
        if isinstance(self.processing_class, ProcessorMixin):
            batch.update(collate_expert_images(examples, self.processing_class, batch["input_ids"].shape[1]))
        if self.expert_source_names is not None:
            batch["source"] = torch.tensor([self.expert_sampler.source_of(index) for index in indices])
        return {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}

    def _expert_model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert forward's inputs for an expert micro-batch: its padded rows, their images, and the labels of
        their completion tokens (-100 elsewhere)."""
        # Pixel values, image grids or sizes, token types: whatever the processor gave for the micro-batch's images
        image_inputs = {
            name: value
            for name, value in batch.items()
            if name not in ("input_ids", "attention_mask", "completion_mask", "source")
        }
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            **image_inputs,
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
        }

    def _expert_loss(self, model) -> tuple[ExpertLossOutput, torch.Tensor | None]:
        """
        The expert SFT loss of one micro-batch, plus the router load-balancing loss as the trainer adds its own to the
        on-policy term; and, with several sources, each source's NLL sum and token count (a `(2, num_sources)` tensor).
        """
        batch = self._next_expert_batch()
        # MoE models: request the router logits exactly when the trainer does for the on-policy term
        moe_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            # When the backward comes at once, the head computes its gradient in the forward; else it recomputes in
            # the backward, so that no (vocab, hidden) gradient is held through the on-policy pass
            gradient_in_forward = self.backward_expert_term_first
            expert = expert_loss(model, self._expert_model_inputs(batch), gradient_in_forward, **moe_kwargs)
        if self.aux_loss_enabled:
            expert.loss = expert.loss + self.router_aux_loss_coef * expert.aux_loss
        per_source = None
        if self.expert_source_names is not None:
            rows = torch.stack([expert.row_nll_sums, expert.row_num_tokens]).float()
            per_source = rows.new_zeros(2, len(self.expert_source_names))
            per_source.index_add_(1, batch["source"].to(rows.device), rows)
        return expert, per_source

    def on_policy_term_skipped(self) -> bool:
        """
        Whether this training step leaves out the on-policy term: `mu == 1` under the cosine schedule gives it weight
        0, so its forward does not run (nor, in a trainer that generates its own rollouts, their generation and
        scoring). `mu` depends only on the step, so every process decides alike. (The adaptive schedule needs every
        step's rollouts to set `mu`, so it never skips.)
        """
        return self.model.training and self.mu_schedule.skips_on_policy_term()

    def _prepare_inputs(self, generation_batch):
        if self.on_policy_term_skipped():
            if self._generates_rollouts:
                # The buffered rollouts are dropped: the next step that trains on rollouts generates them afresh
                self._buffered_inputs = None
            if not self._logged_on_policy_skip:
                skipped = (
                    "its rollouts are not generated and its forward does not run"
                    if self._generates_rollouts
                    else "its forward does not run (the rollouts of the step are drawn and dropped: generation is the "
                    "rollout worker's)"
                )
                logger.info(
                    f"mu = 1 at optimizer step {self.state.global_step + 1}: the {self._on_policy_term.upper()} term "
                    f"weighs 0, so {skipped} (`chord/{self._on_policy_term}_skipped` = 1) on such steps."
                )
                self._logged_on_policy_skip = True
            return {}
        return super()._prepare_inputs(generation_batch)

    def _rollout_advantages(self, inputs) -> torch.Tensor:
        """The advantages of the micro-batch's rollouts (or of their tokens), for `chord/nonzero_advantage_frac`."""
        return inputs["advantages"]

    def _on_trainer_loss_scale(self, term: torch.Tensor) -> torch.Tensor:
        """A micro-step's term on the scale of the loss the trainer's `compute_loss` returns: divided by the
        accumulation steps where the trainer divides its own (`loss_is_scaled_for_ga`), else as it is (then
        `Trainer.training_step` divides the returned loss)."""
        return term / self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else term

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        mu = self.chord_mu
        skip_on_policy = self.on_policy_term_skipped()
        accumulation_steps = self.current_gradient_accumulation_steps
        # mu depends only on the step, so every process makes the same choice here: no collective is left waiting
        if mu > 0 and self.backward_expert_term_first and not skip_on_policy:
            # Under DDP the gradients are all-reduced once, by the on-policy backward, over both terms' sum
            with self.accelerator.no_sync(model):
                expert, per_source = self._expert_loss(model)
                expert_term = mu * expert.loss
                # Scaled as `training_step` scales the backward of the loss returned below, so both terms are alike
                self.term_gradient_norms.term = "expert"
                self.accelerator.backward(expert_term / accumulation_steps)
                self.term_gradient_norms.term = self._on_policy_term
            expert_term = self._on_trainer_loss_scale(expert_term.detach())
        elif mu > 0:
            expert, per_source = self._expert_loss(model)
            expert_term = self._on_trainer_loss_scale(mu * expert.loss)

        stats = []
        if skip_on_policy:
            loss = expert_term
            self.term_gradient_norms.term = "expert"  # the backward of the returned loss is the expert term's
        else:
            on_policy_loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            advantages = self._rollout_advantages(inputs)
            logged_loss = on_policy_loss.detach()
            stats += [
                logged_loss * accumulation_steps if self.loss_is_scaled_for_ga else logged_loss,
                (advantages != 0).sum(),
                torch.tensor(advantages.numel()),
            ]
            loss = (1.0 - mu) * on_policy_loss + expert_term if mu > 0 else on_policy_loss
        if mu > 0:
            stats += [expert.loss.detach(), *(expert[name] for name in EXPERT_METRIC_SUMS)]
            if self.aux_loss_enabled:
                stats.append(expert.aux_loss.detach())
            if per_source is not None:
                stats += list(per_source.flatten())

        device = self.accelerator.device
        totals = self.accelerator.reduce(torch.stack([s.float().to(device) for s in stats]), reduction="sum").tolist()
        metrics = self._metrics["train"]
        metrics["chord/mu"].append(mu)
        if self.mu_schedule.reaches_one():
            metrics[f"chord/{self._on_policy_term}_skipped"].append(float(skip_on_policy))
        if not skip_on_policy:
            self._log_on_policy_term(*totals[:3])
            totals = totals[3:]
        if mu > 0:
            num_sources = 0 if self.expert_source_names is None else len(self.expert_source_names)
            self._log_expert_term(mu, *totals[: len(totals) - 2 * num_sources])
            if num_sources:
                self._log_expert_sources(totals[-2 * num_sources :])
        return loss

    def _step_is_logged(self) -> bool:
        """Whether the optimizer step in progress will be logged (as transformers' `DefaultFlowCallback` decides)."""
        step = self.state.global_step + 1
        if step == 1 and self.args.logging_first_step:
            return True
        return self.args.logging_strategy == IntervalStrategy.STEPS and step % self.state.logging_steps == 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        # One joint backward (DeepSpeed, FSDP, LOMO): the terms' gradients arrive summed, and cannot be told apart.
        # With mu = 0 there is one term: nothing to compare, and the step stays exactly the trainer's own. The hooks
        # cost a pass over the gradients per backward, so they run on the steps that are logged only
        measured = self.backward_expert_term_first and self.chord_mu != 0 and self._step_is_logged()
        with self.term_gradient_norms.measuring() if measured else nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if measured:
            self._log_term_gradient_norms()
        self._chord_micro_steps += 1
        return loss

    def _log_term_gradient_norms(self) -> None:
        """
        `chord/expert_grad_norm` and `chord/grpo_grad_norm` (`chord/rloo_grad_norm` for RLOO): the norms of
        `mu * grad(L_SFT)` and `(1 - mu) * grad(L_on_policy)` of this micro-step on each process (before the all-reduce
        and clipping), on the scale of the trainer's `grad_norm` (times the accumulation steps, over any loss scale),
        averaged over processes. Only the micro-steps of logged optimizer steps are measured.
        """
        squared = self.term_gradient_norms.squared
        # alike on every process: mu decides it
        terms = [term for term in ("expert", self._on_policy_term) if term in squared]
        if not terms:
            return
        scaler = getattr(self.accelerator, "scaler", None)
        scale = self.current_gradient_accumulation_steps / (scaler.get_scale() if scaler is not None else 1.0)
        norms = torch.stack([squared[term].sqrt() for term in terms]).to(self.accelerator.device) * scale
        norms = self.accelerator.reduce(norms, reduction="mean").tolist()
        for term, norm in zip(terms, norms):
            self._metrics["train"][f"chord/{term}_grad_norm"].append(norm)

    def _log_on_policy_term(self, on_policy_loss: float, nonzero_advantages: float, num_advantages: float) -> None:
        """The on-policy term's metrics, from sums over processes."""
        # Reduced over processes, so every process sees a bad value and stops at the same point, before any update
        term = self._on_policy_term
        self._raise_if_not_finite(term.upper(), on_policy_loss)
        metrics = self._metrics["train"]
        metrics[f"chord/{term}_loss"].append(on_policy_loss / self.accelerator.num_processes)
        metrics["chord/nonzero_advantage_frac"].append(nonzero_advantages / num_advantages)
        if nonzero_advantages == 0 and not self._warned_zero_advantages:
            # The "loss is always 0" report: with identical rewards in every group, the term has nothing to learn from
            logger.warning(
                f"At optimizer step {self.state.global_step + 1}, every rollout group had identical rewards, so every "
                f"advantage and the {term.upper()} term are 0 (see `frac_reward_zero_std` and "
                "`chord/nonzero_advantage_frac`); the SFT term still trains whenever mu > 0. Shown once per run."
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

    def _log_expert_term(self, mu: float, sft_loss: float, *sums: float) -> None:
        """The expert term's metrics, from sums over processes (`sums`: [`EXPERT_METRIC_SUMS`], then the aux loss)."""
        self._raise_if_not_finite("SFT", sft_loss)
        totals = dict(zip(EXPERT_METRIC_SUMS, sums))
        metrics = self._metrics["train"]
        num_processes = self.accelerator.num_processes
        num_tokens = max(totals["num_tokens"], 1.0)
        metrics["chord/sft_loss"].append(sft_loss / num_processes)
        metrics["chord/expert_nll"].append(totals["nll_sum"] / num_tokens)
        metrics["chord/expert_token_prob"].append(totals["prob_sum"] / num_tokens)
        metrics["chord/expert_tokens"].append(totals["num_tokens"])
        metrics["chord/token_weight_mean"].append(totals["weight_sum"] / num_tokens)
        metrics[f"chord/expert_prob_below_{LOW_PROB}"].append(totals["low_prob_tokens"] / num_tokens)
        metrics[f"chord/expert_prob_above_{HIGH_PROB}"].append(totals["high_prob_tokens"] / num_tokens)
        metrics["chord/effective_mu"].append(
            mu * expert_term_strength(totals["scaled_weight_sum"], totals["scale_sum"])
        )
        if len(sums) > len(EXPERT_METRIC_SUMS):
            metrics["chord/expert_aux_loss"].append(sums[-1] / num_processes)

    def _generate_and_score_completions(self, inputs):
        # GRPOTrainer and RLOOTrainer score each batch of rollouts here (the adaptive schedule's input)
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            # The mean reward over every process's rollouts, which the trainer has just logged
            self.mu_schedule.observe_mean_reward(self._metrics["train"]["reward"][-1])
        return output

    def _raise_if_not_finite(self, term: str, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"The {term} loss is {value} at optimizer step {self.state.global_step + 1} (micro-step "
                f"{self._chord_micro_steps + 1} of the run): training stops before it reaches the weights. Lower the "
                "learning rate, check the rewards and the expert data, or use bf16 rather than fp16."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """[`~transformers.Trainer.train`], resuming only from complete checkpoints.

        A trainer that generates its own rollouts fails at once when the RL dataset has fewer prompts than an optimizer
        step needs (`check_prompts_fill_a_step`; AsyncGRPOTrainer's worker cycles through its prompts).

        With `resume_from_checkpoint=True`, the newest complete checkpoint in `output_dir` is used: ones cut short by
        a crash during the save are skipped with a warning. A checkpoint path given explicitly must be complete.
        """
        # A streamed (iterable) RL dataset has no length to check
        if self._generates_rollouts and self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
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
