"""
The built-in verifiable task: `a + b` with a one-digit `b`, and a one-digit (the demo) or two-digit (the paper
benchmark) `a`. Everything is deterministic from a seed and built offline, so a tiny random model learns it on a CPU.

Answers come in two styles, and the reward reads either: SHORT (`42`) and WORKED, the units column with its carry,
then the tens column, then the answer (`7+5=12 carry 1; 3+1=4; answer 42`). Held-out sums are split off in one of two
ways:

- `mirrored_split` (the demo): held-out `a + b` with `a < b`, whose mirror `b + a` stays in training, so a model that
  learns that addition commutes can answer them;
- `carry_split` (the paper benchmark): half of the held-out sums need a carry, half do not.
"""

import random
import re
from collections.abc import Callable

from datasets import Dataset

from ..rewards import completion_text


# The final answer in either style: the whole completion is a number, or it ends with "answer <number>"
SHORT_ANSWER = re.compile(r"\s*(\d+)\s*")
WORKED_ANSWER = re.compile(r".*answer (\d+)\s*", re.DOTALL)
# The worked style's longest answer ("9+9=18 carry 1; 9+1=10; answer 108" is 34 characters) plus the end token
MAX_COMPLETION_TOKENS = 36


def operand_pairs(first_digits: int) -> list[tuple[int, int]]:
    """Every `(a, b)` with an `a` of `first_digits` digits (0 to 9 for one digit) and a one-digit `b`."""
    low = 0 if first_digits == 1 else 10 ** (first_digits - 1)
    return [(a, b) for a in range(low, 10**first_digits) for b in range(10)]


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b >= 10


def prompt(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def short_answer(a: int, b: int) -> str:
    return str(a + b)


def worked_answer(a: int, b: int) -> str:
    """The units column with its carry, then the tens column, then the answer."""
    units, carry = a % 10 + b, (a % 10 + b) // 10
    tens = a // 10
    return f"{a % 10}+{b}={units} carry {carry}; {tens}+{carry}={tens + carry}; answer {a + b}"


def mirrored_split(
    pairs: list[tuple[int, int]], num_heldout: int, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training pairs and `num_heldout` held-out pairs with `a < b`, whose mirror `(b, a)` stays in training."""
    rng = random.Random(seed)
    heldout = rng.sample([(a, b) for a, b in pairs if a < b], num_heldout)
    return [pair for pair in pairs if pair not in heldout], heldout


def carry_split(
    pairs: list[tuple[int, int]], num_heldout: int, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training pairs and `num_heldout` held-out pairs, half of which need a carry."""
    rng = random.Random(seed)
    carry = [pair for pair in pairs if has_carry(*pair)]
    no_carry = [pair for pair in pairs if not has_carry(*pair)]
    heldout = rng.sample(carry, num_heldout // 2) + rng.sample(no_carry, num_heldout - num_heldout // 2)
    heldout_set = set(heldout)
    return [pair for pair in pairs if pair not in heldout_set], heldout


def prompt_dataset(pairs: list[tuple[int, int]]) -> Dataset:
    """Conversational prompts with an `answer` column for the reward and a `carry` column for the breakdown."""
    return Dataset.from_dict(
        {
            "prompt": [prompt(a, b) for a, b in pairs],
            "answer": [str(a + b) for a, b in pairs],
            "carry": [has_carry(a, b) for a, b in pairs],
        }
    )


def completion_dataset(pairs: list[tuple[int, int]], style: Callable[[int, int], str]) -> Dataset:
    """Expert demonstrations: each prompt answered in `style` (`short_answer` or `worked_answer`)."""
    return Dataset.from_dict(
        {
            "prompt": [prompt(a, b) for a, b in pairs],
            "completion": [[{"role": "assistant", "content": style(a, b)}] for a, b in pairs],
        }
    )


def demo_datasets(num_heldout: int = 20, seed: int = 0) -> tuple[Dataset, Dataset, Dataset]:
    """The demo's single-digit sums: RL prompts, short-style expert demonstrations, and held-out prompts."""
    train, heldout = mirrored_split(operand_pairs(1), num_heldout, seed)
    return prompt_dataset(train), completion_dataset(train, short_answer), prompt_dataset(heldout)


def parse_answer(text: str) -> str | None:
    """The final number of a completion in either style, or None when it is in neither."""
    match = SHORT_ANSWER.fullmatch(text) or WORKED_ANSWER.fullmatch(text)
    return None if match is None else match.group(1)


def text_reward(text: str, expected: str) -> float:
    """The paper's reward shape: 1 correct, 0 a wrong number, -0.1 no parseable answer."""
    answer = parse_answer(text)
    return -0.1 if answer is None else float(answer == expected)


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """[`text_reward`] of each completion against the dataset's `answer` column, as a TRL reward function."""
    return [text_reward(completion_text(c), expected) for c, expected in zip(completions, answer, strict=True)]
