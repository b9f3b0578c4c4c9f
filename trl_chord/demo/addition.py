"""
The built-in verifiable tasks. Everything is deterministic from a seed and built offline, so a tiny random model
learns them on a CPU.

Addition, the target task: `a + b` with operands of a given number of digits (one-digit sums in the demo, two-digit
ones in the paper benchmark, with three-digit `a` as its out-of-distribution split). Answers come in two styles, and
the rewards read either: SHORT (`42`) and WORKED, one column at a time from the units up with its carry, then the
answer (`7+5=12 carry 1; 3+1=4; answer 42`, `7+5=12 carry 1; 3+4+1=8; answer 82`). The demo's held-out sums are
`a + b` with `a < b`, whose mirror `b + a` stays in training (`mirrored_split`), so a model that learns that addition
commutes can answer them.

Reversal, the paper benchmark's second, general skill: `rev abc` answered `cba`, in its own prompt format, never in
the addition prompts or the expert answers, so how well a model keeps it after training on addition measures how
much that training damaged what the model already knew.
"""

import itertools
import random
import re
from collections.abc import Callable

from datasets import Dataset

from ..rewards import completion_text


# The final answer in either style: the whole completion is a number, or it ends with "answer <number>"
SHORT_ANSWER = re.compile(r"\s*(\d+)\s*")
WORKED_ANSWER = re.compile(r".*answer (\d+)\s*", re.DOTALL)


def numbers_of_digits(digits: int) -> range:
    """The numbers of `digits` digits: 0 to 9 for one digit, no leading zeros for more."""
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def operand_pairs(first_digits: int, second_digits: int = 1) -> list[tuple[int, int]]:
    """Every `(a, b)` with an `a` of `first_digits` digits and a `b` of `second_digits` digits."""
    return [(a, b) for a in numbers_of_digits(first_digits) for b in numbers_of_digits(second_digits)]


def column_steps(a: int, b: int) -> list[tuple[list[int], int]]:
    """Column addition from the units up: each column's terms (digit of `a`, digit of `b` if any, carry in) and sum."""
    steps, carry = [], 0
    for column in range(len(str(max(a, b)))):
        terms = [number // 10**column % 10 for number in (a, b) if number >= 10**column or column == 0]
        if column > 0:
            terms.append(carry)
        steps.append((terms, sum(terms)))
        carry = sum(terms) // 10
    return steps


def has_carry(a: int, b: int) -> bool:
    """Whether any column of `a + b` carries (the last one into a new digit)."""
    return any(total >= 10 for _, total in column_steps(a, b))


def prompt(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def short_answer(a: int, b: int) -> str:
    return str(a + b)


def worked_answer(a: int, b: int) -> str:
    """Each column from the units up, with the carry it passes on (but the last's), then the answer."""
    steps = column_steps(a, b)
    parts = [
        "+".join(map(str, terms)) + f"={total}" + (f" carry {total // 10}" if index < len(steps) - 1 else "")
        for index, (terms, total) in enumerate(steps)
    ]
    return "; ".join(parts) + f"; answer {a + b}"


def mirrored_split(
    pairs: list[tuple[int, int]], num_heldout: int, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training pairs and `num_heldout` held-out pairs with `a < b`, whose mirror `(b, a)` stays in training."""
    rng = random.Random(seed)
    heldout = rng.sample([(a, b) for a, b in pairs if a < b], num_heldout)
    return [pair for pair in pairs if pair not in heldout], heldout


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


# The reversal task's alphabet: words of three to five of these letters, 111,000 in all
REVERSAL_LETTERS = "abcdefghij"


def reversal_words(lengths: tuple[int, ...] = (3, 4, 5)) -> list[str]:
    """Every word of `REVERSAL_LETTERS` with one of the given lengths, in a fixed order."""
    return ["".join(letters) for length in lengths for letters in itertools.product(REVERSAL_LETTERS, repeat=length)]


def reversal_prompt(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"rev {word}"}]


def reversal_prompt_dataset(words: list[str]) -> Dataset:
    """Reversal prompts with their `answer`."""
    return Dataset.from_dict(
        {"prompt": [reversal_prompt(word) for word in words], "answer": [word[::-1] for word in words]}
    )


def reversal_completion_dataset(words: list[str]) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [reversal_prompt(word) for word in words],
            "completion": [[{"role": "assistant", "content": word[::-1]}] for word in words],
        }
    )


def is_correct(text: str, expected: str) -> bool:
    """Whether a completion's final answer is `expected`: a sum read in either style, a reversed word as it stands."""
    return (parse_answer(text) if expected.isdigit() else text.strip()) == expected


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """1 for a correct final answer, 0 for anything else, with no format term (so no style is preferred)."""
    return [float(is_correct(completion_text(c), expected)) for c, expected in zip(completions, answer, strict=True)]
