"""CHORD's expert term, written once for the TRL trainers it extends: `ChordTrainer(ChordMixin, GRPOTrainer)`."""

import math
import textwrap
from contextlib import nullcontext
from typing import NamedTuple

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import DatasetDict, IterableDatasetDict, concatenate_datasets
from transformers import ProcessorMixin
from transformers.trainer_utils import IntervalStrategy
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from .callbacks import ChordMuCallback, WeakExpertTermCallback
from .checkpoints import read_chord_state, resolved_checkpoint, write_chord_state
from .chord_config import checked_chord_args
from .chord_metrics import (
    TermGradientNorms,
    expert_source_metrics,
    expert_term_metrics,
    expert_term_sums,
    on_policy_term_metrics,
)
from .expert_data import (
    collate_expert_batch,
    collate_expert_images,
    prepare_expert_dataset,
    prepare_expert_sources,
)
from .expert_eval import HeldOutExpertEvaluation, eval_strategy_without_eval_dataset, prepare_held_out_experts
from .expert_head.choice import LMHeadProbe
from .expert_head.forward import add_expert_loss_head, expert_loss
from .expert_sampler import ExpertMixtureSampler, ExpertSampler
from .losses import ExpertLossOutput
from .schedule import MuSchedule


logger = logging.get_logger(__name__)

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


def expert_backward_runs_first(distributed_type: DistributedType, optim: str) -> bool:
    """
    Whether the expert term gets a backward of its own before the on-policy forward (its graph freed first, so the
    step's peak is the larger term's). Not under DeepSpeed or FSDP, which own the backward, nor with optimizers that
    step inside it (LOMO, AdaLOMO, the `*_layerwise` ones): a second backward would be a second optimizer step.
    """
    steps_in_backward = optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO) or getattr(
        optim, "value", optim
    ).endswith("layerwise")
    return distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP) and not steps_in_backward


def check_prompts_fill_a_step(num_prompts: int, args) -> None:
    """
    A `ValueError` when `num_prompts` RL prompts give no optimizer step: GRPOTrainer's and RLOOTrainer's sampler drops
    an incomplete generation batch of `generation_batch_size // num_generations` prompts, and the Trainer would end
    "training" at once, without a word.
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


class ExpertTerm(NamedTuple):
    """One micro-step's expert term: the loss and its metric sums, each source's NLL sum and token count (with several
    sources), and `mu` times the loss on the trainer's loss scale (detached once its own backward has run)."""

    output: ExpertLossOutput
    per_source: torch.Tensor | None
    weighted: torch.Tensor


class ChordMixin(HeldOutExpertEvaluation):
    """
    `loss = (1 - mu) * on_policy_loss + mu * sft_loss` on every training micro-step of a TRL online trainer, whose own
    `compute_loss` gives `on_policy_loss`. A CHORD trainer sets `_chord_config` (its config class), `_on_policy_term`
    (the term's name in metrics) and `_generates_rollouts` (its `_prepare_inputs` generates them, buffered).
    """

    _chord_config: type
    _on_policy_term = "grpo"
    _generates_rollouts = True
    _paper = CHORD_PAPER

    def __init__(
        self, model, reward_funcs=None, args=None, *trainer_args, expert_dataset=None, eval_expert_dataset=None, **kwargs
    ):
        args = checked_chord_args(self._chord_config, args, model, self._name)
        self.mu_schedule = MuSchedule.from_options(args)
        expert_dataset = self._used_expert_dataset(expert_dataset, args)
        eval_dataset = kwargs.get("eval_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        with eval_strategy_without_eval_dataset(args, waived=eval_expert_dataset is not None and eval_dataset is None):
            super().__init__(model, reward_funcs, args, *trainer_args, **kwargs)

        self.add_callback(ChordMuCallback(self.mu_schedule))
        if self.mu_schedule.is_ever_positive():
            self.add_callback(WeakExpertTermCallback())
        self._warned_zero_advantages = False
        self._logged_on_policy_skip = False
        self._chord_micro_steps = 0
        self._prepare_expert_data(expert_dataset, args)
        self.held_out_experts = prepare_held_out_experts(self, eval_expert_dataset)
        # The head also serves the held-out evaluation alone (the expert NLL of a plain GRPO run)
        if self.expert_dataset is not None or self.held_out_experts is not None:
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
        self.term_gradient_norms = TermGradientNorms(self.model.parameters())
        if args.chord_log_term_grad_norms and not self.backward_expert_term_first:
            logger.warning(
                "chord_log_term_grad_norms is set, but both terms share one backward here (DeepSpeed, FSDP or an "
                "optimizer that steps in the backward): their gradients arrive summed, so no term's norm is logged."
            )

    def _used_expert_dataset(self, expert_dataset, args):
        """`expert_dataset`, checked against the schedule: required where mu is ever > 0, dropped with a warning where
        it never is."""
        if isinstance(expert_dataset, (DatasetDict, IterableDatasetDict)):
            raise ValueError(
                f"`expert_dataset` is a `DatasetDict` with the splits {list(expert_dataset)}, not one dataset: pick "
                "the split of expert demonstrations (`load_dataset(..., split='train')` or `dataset_dict['train']`). "
                "To mix several datasets as sources on purpose, pass a plain dict, `{name: Dataset, ...}`."
            )
        term = self._on_policy_term.upper()
        if self.mu_schedule.is_ever_positive():
            if expert_dataset is None:
                raise ValueError(
                    f"The CHORD schedule gives mu > 0 at some step ({self.mu_schedule.describe()}), but no "
                    f"`expert_dataset` was given. Pass `expert_dataset=...`, or set chord_mu_peak=chord_mu_valley=0 "
                    f"for plain {term}."
                )
            return expert_dataset
        if expert_dataset is not None or args.chord_sft_dataset_proportions is not None:
            unused = "the `expert_dataset`" if expert_dataset is not None else "`chord_sft_dataset_proportions`"
            logger.warning(
                f"mu is 0 at every step (chord_mu_peak and chord_mu_valley are 0), so {unused} is never used and "
                f"this run is plain {term}."
            )
        return None

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

    def _prepare_expert_data(self, expert_dataset, args) -> None:
        """Tokenize the expert data (one dataset, or a dict of named sources) and make its sampler."""
        self.expert_dataset = self.expert_sampler = self.expert_source_names = None
        proportions = args.chord_sft_dataset_proportions
        if self.mu_schedule.is_ever_positive() and proportions is not None and not isinstance(expert_dataset, dict):
            raise ValueError(
                "`chord_sft_dataset_proportions` is set, but `expert_dataset` is not a dict of named datasets: give "
                "`expert_dataset={name: dataset, ...}` with the names the proportions use."
            )
        if expert_dataset is None:
            return
        tokenized = dict(max_length=args.chord_sft_max_length, image_token_id=self._image_token_id())
        sampling = dict(
            batch_size=args.chord_sft_per_device_train_batch_size,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            seed=args.seed,
        )
        if not isinstance(expert_dataset, dict):
            with self.accelerator.main_process_first():
                self.expert_dataset = prepare_expert_dataset(expert_dataset, self.processing_class, **tokenized)
            self.expert_sampler = ExpertSampler(len(self.expert_dataset), **sampling)
            return
        with self.accelerator.main_process_first():
            sources = prepare_expert_sources(expert_dataset, self.processing_class, **tokenized)
        sizes = {name: len(source) for name, source in sources.items()}
        self.expert_sampler = ExpertMixtureSampler(sizes, proportions or sizes, **sampling)
        self.expert_source_names = list(sources)
        self.expert_dataset = concatenate_datasets(list(sources.values()))

    def _image_token_id(self) -> int | None:
        """The placeholder token of an image's features, for a vision-language policy (the config entry TRL reads)."""
        if not isinstance(self.processing_class, ProcessorMixin):
            return None
        return getattr(self.model.config, "image_token_id", None)

    def _packed_attention_inputs(self):
        """`packed_inputs` of [`add_expert_loss_head`], for a model that attends over sequences packed into one row;
        `None`: padded rows with an attention mask."""
        return None

    def _next_expert_batch(self) -> dict[str, torch.Tensor]:
        """The next expert micro-batch: token ids and masks, each example's source (with several sources), and the
        image inputs of its examples' images (for a vision-language policy)."""
        indices = self.expert_sampler.next_batch()
        batch = self._collated_expert_batch([self.expert_dataset[index] for index in indices])
        if self.expert_source_names is not None:
            batch["source"] = torch.tensor([self.expert_sampler.source_of(index) for index in indices])
        return {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}

    def _collated_expert_batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Tokenized expert examples as one padded micro-batch on the device, with their images' inputs."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        batch = collate_expert_batch(examples, pad_token_id=tokenizer.pad_token_id)
        if isinstance(self.processing_class, ProcessorMixin):
            batch.update(collate_expert_images(examples, self.processing_class, batch["input_ids"].shape[1]))
        return {name: tensor.to(self.accelerator.device) for name, tensor in batch.items()}

    def _expert_model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The expert forward's inputs: the padded rows, their image inputs, the labels of the completion tokens."""
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
        """The SFT loss of the next expert micro-batch (with the router aux loss where the trainer adds its own), and
        each source's NLL sum and token count, `(2, num_sources)`, with several sources."""
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

    def _expert_term(self, model, mu: float, own_backward: bool) -> ExpertTerm:
        """The expert term of the micro-step; with `own_backward` it is backpropagated here, before the on-policy
        forward (why here and not in `training_step`: see there)."""
        if not own_backward:
            expert, per_source = self._expert_loss(model)
            return ExpertTerm(expert, per_source, self._on_trainer_loss_scale(mu * expert.loss))
        # Under DDP the gradients are all-reduced once, by the on-policy backward, over both terms' sum
        with self.accelerator.no_sync(model):
            expert, per_source = self._expert_loss(model)
            weighted = mu * expert.loss
            with self.term_gradient_norms.attributed_to("expert"):
                # Scaled as `Trainer.training_step` scales the backward of the loss `compute_loss` returns
                self.accelerator.backward(weighted / self.current_gradient_accumulation_steps)
        return ExpertTerm(expert, per_source, self._on_trainer_loss_scale(weighted.detach()))

    def on_policy_term_skipped(self) -> bool:
        """Whether this training step leaves out the on-policy term (and the generation of its rollouts): `mu == 1`
        under the cosine schedule, the same on every process."""
        return self.mu_schedule.skips_on_policy_term()

    def _prepare_inputs(self, generation_batch):
        if self.model.training and self.on_policy_term_skipped():
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
        """`term` on the scale of the trainer's own `compute_loss`: divided by the accumulation steps where it divides
        its own (`loss_is_scaled_for_ga`); else `Trainer.training_step` divides the returned loss."""
        return term / self.current_gradient_accumulation_steps if self.loss_is_scaled_for_ga else term

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mu, skipped = self.chord_mu, self.on_policy_term_skipped()
        # mu depends only on the step, so every process makes the same choices here: no collective is left waiting
        expert = None
        if mu > 0:  # its own backward, where it has one, runs in there: why, see `training_step`
            expert = self._expert_term(model, mu, own_backward=self.backward_expert_term_first and not skipped)
        on_policy_loss = None if skipped else super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._log_micro_step(mu, on_policy_loss, inputs, expert)
        if skipped:
            return expert.weighted
        return on_policy_loss if expert is None else (1.0 - mu) * on_policy_loss + expert.weighted

    def training_step(self, model, inputs, num_items_in_batch=None):
        """
        The trainer's step: its `_prepare_inputs` (the rollouts), `compute_loss`, and one backward of the loss it
        returns, the on-policy term's (both terms' in a joint backward; the expert term's where `mu == 1` skips the
        on-policy term); with each term's gradient norm measured on logged steps (`chord_log_term_grad_norms`).

        The expert term's own backward, where it has one (`backward_expert_term_first`: one device, DDP), runs in
        [`_expert_term`], from `compute_loss`. It must come after `_prepare_inputs` (so that generation draws the
        random numbers of a run without the expert term) and before the on-policy forward (so that the two graphs are
        never alive together, and DDP all-reduces the terms' sum once). `compute_loss` is the only hook the trainer's
        `training_step` has between the two; moving the backward here would mean rewriting that `training_step`.
        """
        # One joint backward (DeepSpeed, FSDP, LOMO): the terms' gradients arrive summed, and cannot be told apart.
        # With mu = 0 there is one term: nothing to compare, and the step stays exactly the trainer's own. The hooks
        # cost a hook call and a pass over the gradients per backward: asked for only, and on logged steps only
        asked = self.args.chord_log_term_grad_norms and self.backward_expert_term_first
        measured = asked and self.chord_mu != 0 and self._step_is_logged()
        trainer_backward_term = "expert" if self.on_policy_term_skipped() else self._on_policy_term
        with self.term_gradient_norms.measuring(trainer_backward_term) if measured else nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if measured:
            self._log_term_gradient_norms()
        self._chord_micro_steps += 1
        return loss

    def _step_is_logged(self) -> bool:
        """Whether the optimizer step in progress will be logged (as transformers' `DefaultFlowCallback` decides)."""
        step = self.state.global_step + 1
        if step == 1 and self.args.logging_first_step:
            return True
        return self.args.logging_strategy == IntervalStrategy.STEPS and step % self.state.logging_steps == 0

    def _log_micro_step(self, mu, on_policy_loss, inputs, expert: ExpertTerm | None) -> None:
        """The micro-step's `chord/*` metrics, from sums over processes (so every process stops alike on a NaN)."""
        sums = {}
        if on_policy_loss is not None:
            advantages = self._rollout_advantages(inputs)
            logged_loss = on_policy_loss.detach()
            if self.loss_is_scaled_for_ga:
                logged_loss = logged_loss * self.current_gradient_accumulation_steps
            sums.update(on_policy_loss=logged_loss, nonzero_advantages=(advantages != 0).sum())
            sums["advantages"] = torch.tensor(advantages.numel())
        if expert is not None:
            sums.update(
                expert_term_sums(expert.output, expert.per_source, self.expert_source_names, self.aux_loss_enabled)
            )
        device = self.accelerator.device
        reduced = self.accelerator.reduce(torch.stack([s.float().to(device) for s in sums.values()]), reduction="sum")
        totals = dict(zip(sums, reduced.tolist()))
        num_processes = self.accelerator.num_processes
        metrics = {"chord/mu": mu}
        if self.mu_schedule.reaches_one():
            metrics[f"chord/{self._on_policy_term}_skipped"] = float(on_policy_loss is None)
        if on_policy_loss is not None:
            self._raise_if_not_finite(self._on_policy_term.upper(), totals["on_policy_loss"])
            metrics.update(on_policy_term_metrics(self._on_policy_term, totals, num_processes))
            if totals["nonzero_advantages"] == 0:
                self._warn_once_without_advantages()
        if expert is not None:
            self._raise_if_not_finite("SFT", totals["sft_loss"])
            metrics.update(expert_term_metrics(mu, totals, num_processes))
            if self.expert_source_names is not None:
                metrics.update(expert_source_metrics(self.expert_source_names, totals))
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)

    def _warn_once_without_advantages(self) -> None:
        # The "loss is always 0" report: with identical rewards in every group, the term has nothing to learn from
        if not self._warned_zero_advantages:
            logger.warning(
                f"At optimizer step {self.state.global_step + 1}, every rollout group had identical rewards, so every "
                f"advantage and the {self._on_policy_term.upper()} term are 0 (see `frac_reward_zero_std` and "
                "`chord/nonzero_advantage_frac`); the SFT term still trains whenever mu > 0. Shown once per run."
            )
            self._warned_zero_advantages = True

    def _log_term_gradient_norms(self) -> None:
        """`chord/expert_grad_norm` and `chord/<on-policy term>_grad_norm` of the micro-step, before the all-reduce and
        clipping, on the scale of the trainer's `grad_norm`, averaged over processes."""
        measured = self.term_gradient_norms.norms()
        # alike on every process: mu decides it
        terms = [term for term in ("expert", self._on_policy_term) if term in measured]
        if not terms:
            return
        scaler = getattr(self.accelerator, "scaler", None)
        scale = self.current_gradient_accumulation_steps / (scaler.get_scale() if scaler is not None else 1.0)
        norms = torch.stack([measured[term] for term in terms]).to(self.accelerator.device) * scale
        norms = self.accelerator.reduce(norms, reduction="mean").tolist()
        for term, norm in zip(terms, norms):
            self._metrics["train"][f"chord/{term}_grad_norm"].append(norm)

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
        """
        [`~transformers.Trainer.train`], resuming only from complete checkpoints (`True`: the newest complete one in
        `output_dir`); a trainer that generates its rollouts first checks that the RL prompts fill an optimizer step.
        """
        # A streamed (iterable) RL dataset has no length to check
        if self._generates_rollouts and self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            check_prompts_fill_a_step(len(self.train_dataset), self.args)
        needs_chord_state = self.expert_sampler is not None
        resume_from_checkpoint = resolved_checkpoint(resume_from_checkpoint, self.args.output_dir, needs_chord_state)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_rng_state(self, output_dir):
        # The expert sampler's position is data-order state, like the RNG states, and is written with them: before
        # trainer_state.json, which the Trainer writes last, so a checkpoint with both state files is complete.
        super()._save_rng_state(output_dir)
        if self.expert_sampler is not None and self.args.should_save:
            write_chord_state(output_dir, self.expert_sampler.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.expert_sampler is not None and checkpoint is not None:
            self.expert_sampler.load_state_dict(read_chord_state(checkpoint))
