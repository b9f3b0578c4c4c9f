"""
Held-out evaluation of the expert term: the policy's NLL, token probability, effective mu and fractions of implausible
and near-certain tokens on expert demonstrations it does not train on, the sign of over-fitting to the experts.
The trainer's glue is [`HeldOutExpertEvaluation`], a base of `ChordMixin`; the metrics mean what the training ones mean
([`expert_term_metrics`]), over the whole held-out set.
"""

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader
from transformers.trainer_utils import IntervalStrategy

from .chord_metrics import EXPERT_METRIC_SUMS, expert_source_metrics, expert_term_metrics, expert_term_sums
from .expert_data import prepare_expert_dataset, prepare_expert_sources
from .expert_head.forward import expert_loss
from .losses import HIGH_PROB, LOW_PROB, ExpertLossOutput


# The training metrics that mean something over a held-out set (the loss and the token weights' mean belong to a
# micro-batch); each source's NLL and token count come beside them
HELD_OUT_METRICS = (
    "chord/expert_nll",
    "chord/expert_token_prob",
    "chord/expert_tokens",
    "chord/effective_mu",
    f"chord/expert_prob_below_{LOW_PROB}",
    f"chord/expert_prob_above_{HIGH_PROB}",
)


class EvaluationBatch(NamedTuple):
    """The held-out rows of one forward, and whether they count: a process whose rows have run out still runs a
    forward on one row (ZeRO-3 and FSDP gather the weights in every forward, on every process together), uncounted."""

    indices: list[int]
    counted: bool


class HeldOutExperts(NamedTuple):
    """The tokenized held-out expert rows (the sources one after another) and each source's name and first row."""

    dataset: Dataset
    source_names: list[str] | None = None
    offsets: list[int] | None = None

    def source_of(self, index: int) -> int:
        return max(source for source, offset in enumerate(self.offsets) if offset <= index)


def evaluation_batches(num_examples: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> list:
    """
    Process `rank`'s [`EvaluationBatch`]es: every `num_replicas`-th row from `rank`, in order, `batch_size` at a time,
    so that over the processes every row is counted exactly once; every process gets as many batches.
    """
    rows = list(range(rank, num_examples, num_replicas))
    rows_of_the_largest_shard = len(range(0, num_examples, num_replicas))
    num_batches = -(-rows_of_the_largest_shard // batch_size)
    batches = [EvaluationBatch(rows[start : start + batch_size], True) for start in range(0, len(rows), batch_size)]
    filler = EvaluationBatch([rows[0] if rows else 0], False)
    return batches + [filler] * (num_batches - len(batches))


@contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's random states (the CPU's, and `device`'s for a GPU) put back as they were found,
    so that a run that evaluates draws the same random numbers as one that does not."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def held_out_sums(
    run_batch: Callable[[list[int]], ExpertLossOutput], held_out: HeldOutExperts, batches: list
) -> dict[str, torch.Tensor]:
    """
    The sums of [`expert_term_sums`] over this process's counted `batches`, each source's NLL sum and token count
    among them (with several sources). `run_batch(indices)`: the expert term's output on those rows, in order.
    """
    names = ["sft_loss", *EXPERT_METRIC_SUMS]
    for source in held_out.source_names or []:
        names += [f"nll_sum/{source}", f"num_tokens/{source}"]
    # Every name, zero where this process counted no row: the processes reduce the same tensor
    totals = dict.fromkeys(names, torch.zeros((), dtype=torch.float64))
    for batch in batches:
        output = run_batch(batch.indices)
        if not batch.counted:
            continue
        per_source = None
        if held_out.source_names is not None:
            rows = torch.stack([output.row_nll_sums, output.row_num_tokens]).float()
            sources = torch.tensor([held_out.source_of(index) for index in batch.indices], device=rows.device)
            per_source = rows.new_zeros(2, len(held_out.source_names)).index_add_(1, sources, rows)
        sums = expert_term_sums(output, per_source, held_out.source_names, with_aux_loss=False)
        for name, value in sums.items():
            totals[name] = totals[name] + value.detach().to("cpu", torch.float64)
    return totals


def held_out_metrics(
    totals: dict[str, float], mu: float, source_names: list[str] | None, metric_key_prefix: str
) -> dict[str, float]:
    """The held-out metrics from `totals` summed over every process's rows, named `<metric_key_prefix>_chord/...`
    as transformers names evaluation metrics: the training metrics' meaning over the whole set."""
    every_metric = expert_term_metrics(mu, totals, num_processes=1)
    metrics = {name: every_metric[name] for name in HELD_OUT_METRICS}
    if source_names is not None:
        metrics.update(expert_source_metrics(source_names, totals))
    return {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}


def prepare_held_out_experts(trainer, expert_dataset) -> HeldOutExperts | None:
    """The `eval_expert_dataset` (one dataset, or a dict of named sources) tokenized as `trainer` tokenizes its
    training experts; `None` for none."""
    if expert_dataset is None:
        return None
    tokenized = dict(max_length=trainer.args.chord_sft_max_length, image_token_id=trainer._image_token_id())
    with trainer.accelerator.main_process_first():
        if not isinstance(expert_dataset, dict):
            return HeldOutExperts(prepare_expert_dataset(expert_dataset, trainer.processing_class, **tokenized))
        sources = prepare_expert_sources(expert_dataset, trainer.processing_class, **tokenized)
    offsets = np.cumsum([0] + [len(source) for source in sources.values()])[:-1].tolist()
    return HeldOutExperts(concatenate_datasets(list(sources.values())), list(sources), offsets)


@contextmanager
def eval_strategy_without_eval_dataset(args, waived: bool) -> Iterator[None]:
    """With `waived`, `args.eval_strategy` reads "no" inside: `Trainer.__init__` refuses an evaluation strategy
    without an `eval_dataset`, and the held-out experts are one on their own."""
    strategy = args.eval_strategy
    if waived:
        args.eval_strategy = IntervalStrategy.NO
    try:
        yield
    finally:
        args.eval_strategy = strategy


def held_out_expert_metrics(trainer, held_out: HeldOutExperts, metric_key_prefix: str) -> dict[str, float]:
    """
    The held-out metrics of `trainer`'s policy as it stands: in eval mode (no dropout), without gradients, with every
    random state and the training expert sampler left as found, reduced over processes (each row counted once).
    """
    model, accelerator = trainer.model, trainer.accelerator
    batches = evaluation_batches(
        len(held_out.dataset),
        trainer.args.chord_sft_per_device_train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
    )

    def run_batch(indices: list[int]) -> ExpertLossOutput:
        batch = trainer._collated_expert_batch([held_out.dataset[index] for index in indices])
        with accelerator.autocast():
            return expert_loss(model, trainer._expert_model_inputs(batch), gradient_in_forward=False)

    was_training = model.training
    model.eval()
    try:
        with preserved_random_state(accelerator.device), torch.no_grad():
            sums = held_out_sums(run_batch, held_out, batches)
    finally:
        model.train(was_training)
    reduced = accelerator.reduce(torch.stack(list(sums.values())).to(accelerator.device), reduction="sum")
    totals = dict(zip(sums, reduced.tolist()))
    return held_out_metrics(totals, trainer.chord_mu, held_out.source_names, metric_key_prefix)


def evaluate_held_out_experts_alone(trainer, metric_key_prefix: str) -> dict[str, float]:
    """[`~transformers.Trainer.evaluate`] of a trainer with held-out experts and no `eval_dataset`: the Trainer's
    evaluation loop over no RL prompt, to which the trainer's `evaluation_loop` adds the held-out metrics, logged and
    handed to the callbacks as the Trainer's own evaluation does."""
    trainer._memory_tracker.start()
    # The loop prepares a model not yet trained (DeepSpeed, FSDP) and leaves it in eval mode, which the trainer's `log`
    # reads. Iterating a DataLoader draws a seed from torch's generator: put back, so training draws what it would have
    with preserved_random_state(trainer.accelerator.device):
        output = trainer.evaluation_loop(DataLoader([]), "Evaluation", True, metric_key_prefix=metric_key_prefix)
    metrics = output.metrics
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
    trainer._memory_tracker.stop_and_update_metrics(metrics)
    return metrics


class HeldOutExpertEvaluation:
    """The trainer's `evaluate` and `evaluation_loop` with the held-out expert metrics of its `held_out_experts`."""

    held_out_experts: HeldOutExperts | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """[`~transformers.Trainer.evaluate`], with the held-out expert metrics (`eval_chord/...`) of the
        `eval_expert_dataset`; these alone where there is no `eval_dataset`."""
        if self.held_out_experts is None or eval_dataset is not None or self.eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return evaluate_held_out_experts_alone(self, metric_key_prefix)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.held_out_experts is not None:
            output.metrics.update(held_out_expert_metrics(self, self.held_out_experts, metric_key_prefix))
        return output
