"""Data and reward functions shared by the tests and the multi-process scripts they launch."""

import functools

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import RLOOConfig

from trl_chord import ChordConfig, ChordRLOOConfig, ChordRLOOTrainer, ChordTrainer


def make_rl_prompts(num_prompts: int = 16) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(num_prompts)]})


def make_expert_dataset(num_examples: int = 12) -> Dataset:
    """Conversational prompt/completion examples; example i's answer is `i + 1`, so each example is identifiable."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(num_examples)],
            "completion": [[{"role": "assistant", "content": f"{i + 1}"}] for i in range(num_examples)],
        }
    )


def short_answer_reward(completions, **kwargs) -> list[float]:
    """1 for a completion of at most two characters (so early random models get a mix of rewards), else 0."""
    return [float(len(completion[0]["content"]) <= 2) for completion in completions]


def odd_char_reward(completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters with an odd code point: rewards that vary even for a random model."""
    return [sum(ord(char) % 2 for char in c[0]["content"]) / max(len(c[0]["content"]), 1) for c in completions]


COMMON_ARGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=6,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    bf16=False,
    learning_rate=1e-2,
    seed=0,
    save_strategy="no",
)


# Plain SGD at a constant rate, unclipped: each update is -learning_rate times the accumulated gradient
PLAIN_SGD = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)


def chord_config(tmp_path, **overrides) -> ChordConfig:
    return ChordConfig(output_dir=str(tmp_path / "out"), **{**COMMON_ARGS, **overrides})


# RLOOConfig's `beta` defaults to 0.05 (a reference model), GRPOConfig's to 0: the RLOO tests run without one
RLOO_ARGS = {**COMMON_ARGS, "beta": 0.0}


def chord_rloo_config(tmp_path, **overrides) -> ChordRLOOConfig:
    return ChordRLOOConfig(output_dir=str(tmp_path / "out"), **{**RLOO_ARGS, **overrides})


def make_trainer(model_dir, args, expert_dataset=None, reward_funcs=None, **kwargs) -> ChordTrainer:
    """The CHORD trainer of `args`: a `ChordRLOOTrainer` for an RLOO config, else a `ChordTrainer`."""
    trainer_class = ChordRLOOTrainer if isinstance(args, RLOOConfig) else ChordTrainer
    return trainer_class(
        model=model_dir,
        reward_funcs=reward_funcs or odd_char_reward,
        args=args,
        train_dataset=make_rl_prompts(),
        expert_dataset=expert_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        **kwargs,
    )


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def trained_update(trainer) -> dict[str, torch.Tensor]:
    """Trains `trainer` and returns how far each parameter moved."""
    before = weights(trainer)
    trainer.train()
    return {name: param - before[name] for name, param in weights(trainer).items()}


def recording_draws(trainer) -> list:
    """The expert micro-batches `trainer` draws, in order, as lists of example indices."""
    drawn = []
    next_batch = trainer.expert_sampler.next_batch
    trainer.expert_sampler.next_batch = lambda: drawn.append(next_batch()) or drawn[-1]
    return drawn


def logged(trainer, key) -> list:
    """Every value of `key` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def make_expert_dataset_of_lengths(lengths: list[int]) -> Dataset:
    """Examples whose completions are `length` characters long, so that the aggregations weigh them differently."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"repeat {i}"}] for i in range(len(lengths))],
            "completion": [[{"role": "assistant", "content": str(i) * n}] for i, n in enumerate(lengths)],
        }
    )


def oracle_weights(weighting: str, logits: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Detached token weights computed from the full distribution, independently of trl_chord.losses."""
    probs = logps.exp().detach()
    if weighting == "entropy":  # raw entropies here; normalised by the mean over all tokens by the caller
        distribution = torch.softmax(logits.detach(), -1)
        return -(distribution * distribution.log()).sum(-1)
    return {"uniform": torch.ones_like(probs), "phi": probs * (1 - probs), "is": probs, "focal": (1 - probs) ** 2}[
        weighting
    ]


def aggregate(terms: list[torch.Tensor], aggregation: str, norm_length: int | None = None) -> torch.Tensor:
    """One micro-batch's SFT loss from each example's per-token terms, written out per mode."""
    if aggregation == "token-mean":
        return torch.cat(terms).sum() / sum(len(t) for t in terms)
    if aggregation == "seq-mean-token-mean":
        return sum(t.mean() for t in terms) / len(terms)
    if aggregation == "seq-mean-token-sum":
        return sum(t.sum() for t in terms) / len(terms)
    assert aggregation == "seq-mean-token-sum-norm"
    return sum(t.sum() / norm_length for t in terms) / len(terms)


def completion_logits(model, tokenizer, example) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's fp32 logits at the positions that predict an expert example's completion tokens, and those tokens:
    the chat template of the prompt and of prompt + completion, and the model's plain forward at temperature 1."""
    prompt_ids = tokenizer.apply_chat_template(
        example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full_ids = tokenizer.apply_chat_template(
        example["prompt"] + example["completion"], tokenize=True, return_dict=True
    )["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    logits = model(torch.tensor([full_ids])).logits[0, :-1].float()[len(prompt_ids) - 1 :]
    return logits, torch.tensor(full_ids[len(prompt_ids) :])


def expert_nll_gradient(
    model_dir,
    expert_dataset,
    weighting: str,
    aggregation: str = "token-mean",
    norm_length: int | None = None,
    normalization: str = "none",
) -> dict[str, torch.Tensor]:
    """The weighted NLL of the expert completions, aggregated over the examples as one micro-batch, and its
    gradient; with `normalization="mean"`, the weights divided by their mean over the micro-batch's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    nlls, all_weights = [], []
    for example in expert_dataset:
        logits, targets = completion_logits(model, tokenizer, example)
        logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        nlls.append(-logps)
        all_weights.append(oracle_weights(weighting, logits, logps))
    if weighting == "entropy" or normalization == "mean":  # normalised by the mean over the micro-batch's tokens
        mean = torch.cat(all_weights).mean()
        all_weights = [weights / mean for weights in all_weights]
    terms = [nll * weights for nll, weights in zip(nlls, all_weights)]
    aggregate(terms, aggregation, norm_length).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def held_out_sources() -> dict[str, Dataset]:
    """Two named held-out expert sources, 5 rows: on 2 processes, 2 per micro-batch, one runs an uncounted forward."""
    return {"short": make_expert_dataset(2), "long": make_expert_dataset_of_lengths([3, 7, 1])}


def held_out_oracle(model_dir, sources, mu: float, state_dict=None) -> dict[str, float]:
    """The metrics from the model's logits (with `state_dict`'s weights, if given), one sequence at a time, written
    out: the token means over every held-out row, and (one micro-batch, token mean) the effective mu, mu times the mean
    CHORD-phi weight."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    log_probs = {}
    with torch.no_grad():
        for name, dataset in sources.items():
            per_row = []
            for example in dataset:
                logits, targets = completion_logits(model, tokenizer, example)
                per_row.append(logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1))
            log_probs[name] = torch.cat(per_row).double()
    every = torch.cat(list(log_probs.values()))
    probs = every.exp()
    oracle = {
        "eval_chord/expert_nll": -every.mean().item(),
        "eval_chord/expert_token_prob": probs.mean().item(),
        "eval_chord/expert_tokens": float(every.numel()),
        "eval_chord/expert_prob_below_0.1": (probs < 0.1).double().mean().item(),
        "eval_chord/expert_prob_above_0.9": (probs > 0.9).double().mean().item(),
        "eval_chord/effective_mu": mu * (probs * (1 - probs)).mean().item(),
    }
    for name, source_log_probs in log_probs.items():
        oracle[f"eval_chord/expert_nll/{name}"] = -source_log_probs.mean().item()
        oracle[f"eval_chord/expert_tokens/{name}"] = float(source_log_probs.numel())
    return oracle


@functools.cache
def async_grpo_unavailable() -> str | None:
    """Why ChordAsyncGRPOTrainer cannot be imported here (TRL's AsyncGRPOTrainer needs transformers 5), or `None`."""
    try:
        import trl_chord.chord_async_grpo  # noqa: F401
    except ImportError as error:
        return str(error)
    return None
