import json
import math
import os
import textwrap
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import DatasetDict, IterableDatasetDict, concatenate_datasets
from transformers import ProcessorMixin
from transformers.trainer_utils import IntervalStrategy
from transformers.training_args import OptimizerNames
from transformers.utils import logging
from trl import GRPOTrainer

from .callbacks import ChordMuCallback, WeakExpertTermCallback
from .checkpoints import CHORD_STATE_NAME, checkpoint_problem, complete_checkpoints
from .chord_config import ChordConfig
from .expert_data import (
    ExpertMixtureSampler,
    ExpertSampler,
    collate_expert_batch,
    collate_expert_images,
    prepare_expert_dataset,
)
from .expert_head import LMHeadProbe, add_expert_loss_head
from .losses import HIGH_PROB, LOW_PROB, ExpertLossOutput, expert_term_strength
from .schedule import chord_mu_is_ever_positive


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


class TermGradientNorms:
    """
    The squared norm of the gradient each term sends to the trainable parameters in one micro-step, summed by a hook
    on each parameter while [`measuring`] is active: `term` names the term whose backward runs now (`"expert"` or
    `"grpo"`). It needs the terms' backwards to be separate (the expert term's first); a hook sees the gradient before
    it is accumulated into `.grad` (and, under DDP, before the all-reduce).
    """

    def __init__(self, parameters):
        self.parameters = [param for param in parameters if param.requires_grad]
        self.term = "grpo"
        self.squared: dict[str, torch.Tensor] = {}

    def _add(self, grad: torch.Tensor) -> None:
        squared = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()
        self.squared[self.term] = self.squared[self.term] + squared if self.term in self.squared else squared

    @contextmanager
    def measuring(self):
        self.term, self.squared = "grpo", {}
        handles = [param.register_hook(self._add) for param in self.parameters]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def expert_backward_runs_first(distributed_type: DistributedType, optim: str) -> bool:
    """
    Whether the expert term is backpropagated on its own, before the GRPO forward: that frees its graph and folds its
    gradient into `.grad` before the GRPO graph exists, so the step's peak memory is that of the larger term. Not
    under DeepSpeed or FSDP, which own the backward (one per micro-step), nor with optimizers that step inside the
    backward (LOMO, AdaLOMO and the `*_layerwise` GaLore and APOLLO ones, which step each parameter from a hook on its
    gradient): a second backward would be a second optimizer step, on the expert gradient alone. There the two terms
    share one backward.
    """
    steps_in_backward = optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO) or getattr(
        optim, "value", optim
    ).endswith("layerwise")
    return distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP) and not steps_in_backward


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
                "Build it with `ChordConfig.from_grpo_config(grpo_config, chord_...=...)`."
            )
        if isinstance(expert_dataset, (DatasetDict, IterableDatasetDict)):
            raise ValueError(
                f"`expert_dataset` is a `DatasetDict` with the splits {list(expert_dataset)}, not one dataset: pick "
                "the split of expert demonstrations (`load_dataset(..., split='train')` or `dataset_dict['train']`). "
                "To mix several datasets as sources on purpose, pass a plain dict, `{name: Dataset, ...}`."
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
        if not mu_ever_positive and (expert_dataset is not None or args.chord_sft_dataset_proportions is not None):
            unused = "the `expert_dataset`" if expert_dataset is not None else "`chord_sft_dataset_proportions`"
            logger.warning(
                f"mu is 0 at every step (chord_mu_peak and chord_mu_valley are 0), so {unused} is never used and "
                "this run is plain GRPO."
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
        if mu_ever_positive:
            self.add_callback(WeakExpertTermCallback())
        self._warned_zero_advantages = False
        self._logged_grpo_skip = False
        self.skips_grpo_at_mu_one = (
            args.chord_mu_schedule == "cosine" and max(args.chord_mu_peak, args.chord_mu_valley) >= 1
        )
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
                cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                aggregation=args.chord_sft_loss_agg_mode,
                norm_length=args.chord_sft_max_length,
                head=args.chord_expert_head,
                normalization=args.chord_token_weight_normalization,
            )
        self.backward_expert_term_first = expert_backward_runs_first(self.accelerator.distributed_type, args.optim)
        self.term_gradient_norms = TermGradientNorms(self.model.parameters())

    @property
    def chord_mu(self) -> float:
        """Weight of the SFT term for the current optimizer step."""
        return self.mu_callback.mu

    @property
    def chord_expert_head(self) -> LMHeadProbe | None:
        """The LM head the expert term uses and why; `None` until the first expert forward chooses it."""
        model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        head = getattr(model, "chord_expert_head", None)
        return None if head is None else head.choice

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
                self.term_gradient_norms.term = "expert"
                self.accelerator.backward(expert_term)
                self.term_gradient_norms.term = "grpo"
            expert_term = expert_term.detach()
        elif mu > 0:
            expert, per_source = self._expert_loss(model)
            expert_term = mu * expert.loss / accumulation_steps

        stats = []
        if skip_grpo:
            loss = expert_term
            self.term_gradient_norms.term = "expert"  # the backward of the returned loss is the expert term's
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
            stats += [expert.loss.detach(), *(expert[name] for name in EXPERT_METRIC_SUMS)]
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
        if not self.backward_expert_term_first or self.chord_mu == 0 or not self._step_is_logged():
            # One joint backward (DeepSpeed, FSDP, LOMO): the terms' gradients arrive summed, and cannot be told apart.
            # With mu = 0 there is one term: nothing to compare, and the GRPO step stays exactly GRPOTrainer's. The
            # hooks cost a pass over the gradients per backward, so they run on the steps that are logged only
            return super().training_step(model, inputs, num_items_in_batch)
        with self.term_gradient_norms.measuring():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._log_term_gradient_norms()
        return loss

    def _log_term_gradient_norms(self) -> None:
        """
        `chord/expert_grad_norm` and `chord/grpo_grad_norm`: the norms of `mu * grad(L_SFT)` and
        `(1 - mu) * grad(L_GRPO)` of this micro-step on each process (before the all-reduce and clipping), on the scale
        of the trainer's `grad_norm` (times the accumulation steps, over any loss scale), averaged over processes. Only
        the micro-steps of logged optimizer steps are measured.
        """
        squared = self.term_gradient_norms.squared
        terms = [term for term in ("expert", "grpo") if term in squared]  # alike on every process: mu decides it
        if not terms:
            return
        scaler = getattr(self.accelerator, "scaler", None)
        scale = self.current_gradient_accumulation_steps / (scaler.get_scale() if scaler is not None else 1.0)
        norms = torch.stack([squared[term].sqrt() for term in terms]).to(self.accelerator.device) * scale
        norms = self.accelerator.reduce(norms, reduction="mean").tolist()
        for term, norm in zip(terms, norms):
            self._metrics["train"][f"chord/{term}_grad_norm"].append(norm)

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
