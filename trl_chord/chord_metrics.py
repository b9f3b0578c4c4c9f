"""The `chord/*` metrics of a micro-step, from sums reduced over processes, and each term's gradient norm."""

from contextlib import contextmanager

import torch

from .losses import HIGH_PROB, LOW_PROB, ExpertLossOutput, expert_term_strength


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


def expert_term_sums(output: ExpertLossOutput, per_source, source_names, with_aux_loss: bool) -> dict:
    """The sums the expert term's metrics are made of, to be reduced over processes (`per_source`: each source's NLL
    sum and token count, `(2, num_sources)`)."""
    sums = {"sft_loss": output.loss.detach(), **{name: output[name] for name in EXPERT_METRIC_SUMS}}
    if with_aux_loss:
        sums["aux_loss"] = output.aux_loss.detach()
    if per_source is not None:
        for kind, values in zip(("nll_sum", "num_tokens"), per_source):
            sums.update({f"{kind}/{name}": value for name, value in zip(source_names, values)})
    return sums


def on_policy_term_metrics(term: str, totals: dict[str, float], num_processes: int) -> dict[str, float]:
    """`totals`: the on-policy loss (summed over processes) and its rollouts' non-zero and total advantage counts."""
    return {
        f"chord/{term}_loss": totals["on_policy_loss"] / num_processes,
        "chord/nonzero_advantage_frac": totals["nonzero_advantages"] / totals["advantages"],
    }


def expert_term_metrics(mu: float, totals: dict[str, float], num_processes: int) -> dict[str, float]:
    """`totals`: the SFT loss and [`EXPERT_METRIC_SUMS`] summed over processes, and the router `aux_loss` if any."""
    num_tokens = max(totals["num_tokens"], 1.0)
    metrics = {
        "chord/sft_loss": totals["sft_loss"] / num_processes,
        "chord/expert_nll": totals["nll_sum"] / num_tokens,
        "chord/expert_token_prob": totals["prob_sum"] / num_tokens,
        "chord/expert_tokens": totals["num_tokens"],
        "chord/token_weight_mean": totals["weight_sum"] / num_tokens,
        f"chord/expert_prob_below_{LOW_PROB}": totals["low_prob_tokens"] / num_tokens,
        f"chord/expert_prob_above_{HIGH_PROB}": totals["high_prob_tokens"] / num_tokens,
        "chord/effective_mu": mu * expert_term_strength(totals["scaled_weight_sum"], totals["scale_sum"]),
    }
    if "aux_loss" in totals:
        metrics["chord/expert_aux_loss"] = totals["aux_loss"] / num_processes
    return metrics


def expert_source_metrics(names: list[str], totals: dict[str, float]) -> dict[str, float]:
    """Each source's token count and NLL (`totals`: `nll_sum/<name>`, `num_tokens/<name>`); a source without tokens
    in the micro-step is left out of its NLL's average."""
    metrics = {}
    for name in names:
        num_tokens = totals[f"num_tokens/{name}"]
        metrics[f"chord/expert_tokens/{name}"] = num_tokens
        if num_tokens > 0:
            metrics[f"chord/expert_nll/{name}"] = totals[f"nll_sum/{name}"] / num_tokens
    return metrics


class TermGradientNorms:
    """
    The norm of the gradient each term sends to the trainable parameters in one micro-step, from a hook on each
    parameter while [`measuring`]: a backward counts for the term `measuring` names, or the one [`attributed_to`]
    names around it. A hook sees the gradient before it reaches `.grad` (and, under DDP, the all-reduce).

    Each hook launches one kernel, the norm of its gradient, and keeps only that scalar: the gradient itself is freed
    (or taken as `.grad`) as without the hook, so the measuring holds no gradient memory. [`norms`] combines each
    term's scalars once, at the end.
    """

    def __init__(self, parameters):
        self.parameters = [param for param in parameters if param.requires_grad]
        self._term_norms: dict[str, list[torch.Tensor]] = {}
        self._current: list[torch.Tensor] = []  # the list of the term a backward counts for

    def _add(self, grad: torch.Tensor) -> None:
        # No `detach`: the trainer's backward builds no graph of its gradients (no `create_graph`)
        self._current.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def norms(self) -> dict[str, torch.Tensor]:
        """Each measured term's gradient norm over all the trainable parameters, an fp32 scalar."""
        measured = self._term_norms.items()
        return {term: torch.linalg.vector_norm(torch.stack(norms)) for term, norms in measured if norms}

    @contextmanager
    def measuring(self, term: str):
        self._term_norms = {}
        handles = [param.register_hook(self._add) for param in self.parameters]
        try:
            with self.attributed_to(term):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def attributed_to(self, term: str):
        outer, self._current = self._current, self._term_norms.setdefault(term, [])
        try:
            yield
        finally:
            self._current = outer
