"""
LUFFY's objective written from the paper's equations (arXiv 2504.14945, Sec. 3), independently of trl_chord.luffy,
and the data the LUFFY tests and their multi-process script share.

The mixed group of a prompt holds on-policy rollouts and expert completions; the advantage of each member is its
reward minus the mean reward of the whole group (the authors' script divides by nothing more: `grpo_use_std=False`).
The objective to maximise is `sum_i sum_t w_i,t * A_i`, with `w = pi_theta / pi_theta_old` (value 1, the gradient of
`log pi_theta`) at a rollout's tokens and `w = f(pi_theta) = pi_theta / (pi_theta + gamma)` at an expert's, normalised
by the padded response width, minus `entropy_coef` times the mean entropy of the policy over every completion token.
"""

from dataclasses import dataclass

import torch
from datasets import Dataset


EXPERT_WORDS = "plus one is"


def luffy_prompts(num_prompts: int = 10) -> Dataset:
    """Prompts of one length (no padding between them), each with its expert completion: `"{i} plus one is {i+1}"`."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(num_prompts)],
            "expert_completion": [f"{i} {EXPERT_WORDS} {i + 1}" for i in range(num_prompts)],
        }
    )


def expert_first_reward(completions, **kwargs) -> list[float]:
    """1 for an expert-style answer, else the fraction of characters with an odd code point (varies for a random
    model), so that every mixed group has rewards of both kinds."""
    texts = [completion[0]["content"] if isinstance(completion, list) else completion for completion in completions]
    return [1.0 if EXPERT_WORDS in text else sum(ord(c) % 2 for c in text) / max(len(text), 1) for text in texts]


@dataclass
class Rollout:
    prompt: list | str
    completion_ids: list[int]
    reward: float


def recording(reward_func, rollouts: list[Rollout]):
    """`reward_func`, recording every row it scores (prompt, completion tokens and reward) in `rollouts`, in the
    order of the generation batch (a group's rows are consecutive)."""

    def reward(prompts, completions, completion_ids, **kwargs):
        rewards = reward_func(completions, **kwargs)
        rollouts.extend(Rollout(*row) for row in zip(prompts, completion_ids, rewards))
        return rewards

    reward.__name__ = reward_func.__name__
    return reward


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def expert_token_ids(tokenizer, prompt, completion: str, max_length: int) -> list[int]:
    """The tokens a rollout writing `completion` would have: what the chat template renders after the prompt, up to
    and including the end of the turn, cut at `max_length`."""
    if isinstance(prompt, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        messages = prompt + [{"role": "assistant", "content": completion}]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        ids = full[len(prompt_token_ids(tokenizer, prompt)) :]
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return ids[:max_length]


def group_advantages(rewards: list[float], group_size: int) -> list[float]:
    """Each reward minus the mean of its group (the mixed group: rollouts and experts alike)."""
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        advantages += [reward - sum(group) / len(group) for reward in group]
    return advantages


def luffy_objective_loss(
    model,
    rows: list[tuple[list[int], list[int], float, bool]],
    gamma: float,
    max_completion_length: int,
    entropy_coef: float,
) -> tuple[torch.Tensor, dict]:
    """
    The negated LUFFY objective of one micro-batch, `rows` of (prompt tokens, completion tokens, advantage, is expert),
    each through the model's plain forward (temperature 1), and the expert tokens' mean `f(p)` and `p`.
    """
    total, entropy_sum, num_tokens = 0.0, 0.0, 0
    expert_shaping, expert_probs = [], []
    for prompt_ids, completion_ids, advantage, is_expert in rows:
        ids = torch.tensor([prompt_ids + completion_ids])
        log_probs = model(ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
        token_log_probs = log_probs.gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)
        if is_expert:
            probs = token_log_probs.exp()
            weight = probs / (probs + gamma)
            expert_shaping.append(weight.detach())
            expert_probs.append(probs.detach())
        else:
            weight = torch.exp(token_log_probs - token_log_probs.detach())
        total = total - (weight * advantage).sum()
        entropy_sum = entropy_sum - (log_probs.exp() * log_probs).sum()
        num_tokens += len(completion_ids)
    loss = total / max_completion_length - entropy_coef * entropy_sum / num_tokens
    stats = {}
    if expert_shaping:
        stats = {"shaping": torch.cat(expert_shaping).mean().item(), "prob": torch.cat(expert_probs).mean().item()}
    return loss, stats
