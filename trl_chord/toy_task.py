"""The built-in verifiable task: single-digit addition, with programmatic expert answers and a held-out split.

It needs nothing from a hub, and a tiny random model learns it on a CPU in minutes, which makes CHORD's effect
visible: the model starts at zero reward (so GRPO alone has nothing to reinforce), the expert term teaches the answer
format and the facts, and GRPO sharpens what the model then samples. The held-out pairs never appear in training; their
mirror images (`b+a` for a held-out `a+b`) do, so a model that learns that addition commutes can answer them.
"""

import random
import re

from datasets import Dataset

from .rewards import completion_text


ANSWER_PATTERN = re.compile(r"\s*(-?\d+)\s*")


def addition_prompt(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def addition_pairs(num_heldout: int = 20, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All single-digit pairs, split into training pairs and `num_heldout` held-out pairs with `a < b`."""
    rng = random.Random(seed)
    heldout = rng.sample([(a, b) for a in range(10) for b in range(10) if a < b], num_heldout)
    train = [(a, b) for a in range(10) for b in range(10) if (a, b) not in heldout]
    return train, heldout


def addition_datasets(num_heldout: int = 20, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """RL prompts (with an `answer` column for the reward), expert demonstrations, and the held-out prompts."""
    train, heldout = addition_pairs(num_heldout, seed)

    def prompts(pairs):
        return Dataset.from_dict(
            {"prompt": [addition_prompt(a, b) for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
        )

    expert = Dataset.from_dict(
        {
            "prompt": [addition_prompt(a, b) for a, b in train],
            "completion": [[{"role": "assistant", "content": str(a + b)}] for a, b in train],
        }
    )
    return prompts(train), expert, prompts(heldout)


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """The paper's reward shape on the toy task: 1 correct, 0 a wrong number, -0.1 anything that is not a number."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        match = ANSWER_PATTERN.fullmatch(completion_text(completion))
        rewards.append(-0.1 if match is None else float(match.group(1) == expected))
    return rewards
