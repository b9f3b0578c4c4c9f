"""The experiment's verifiable task: a two-digit number plus a one-digit number, with and without a carry.

Three datasets come from it, all deterministic from a seed and built offline:

- the "instruct" data: no-carry sums only, answered in a SHORT style (`42`), used to pre-train the starting model;
- the expert demonstrations: every training sum, answered in a LONGER worked style
  (`7+5=12 carry 1; 3+1=4; answer 42`), so supervised learning on them is off-policy for the starting model;
- RL prompts (every training sum) and held-out prompts (sums never trained on, with and without carries).
"""

import random
import re

from datasets import Dataset

from trl_chord.rewards import completion_text


ALL_PAIRS = [(a, b) for a in range(10, 100) for b in range(10)]
# The final answer in either style: the whole completion is a number, or it ends with "answer <number>"
SHORT_ANSWER = re.compile(r"\s*(\d+)\s*")
WORKED_ANSWER = re.compile(r".*answer (\d+)\s*", re.DOTALL)
# The worked style's longest answer ("9+9=18 carry 1; 9+1=10; answer 108" is 34 characters) plus the end token
MAX_COMPLETION_TOKENS = 36


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b >= 10


def prompt(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def short_answer(a: int, b: int) -> str:
    return str(a + b)


def worked_answer(a: int, b: int) -> str:
    """The expert's style: the units column with its carry, then the tens column, then the answer."""
    units, carry = a % 10 + b, (a % 10 + b) // 10
    tens = a // 10
    return f"{a % 10}+{b}={units} carry {carry}; {tens}+{carry}={tens + carry}; answer {a + b}"


def split_pairs(num_heldout: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training pairs and held-out pairs; the held-out split is stratified so that half of it needs a carry."""
    rng = random.Random(seed)
    carry = [pair for pair in ALL_PAIRS if has_carry(*pair)]
    no_carry = [pair for pair in ALL_PAIRS if not has_carry(*pair)]
    heldout = rng.sample(carry, num_heldout // 2) + rng.sample(no_carry, num_heldout - num_heldout // 2)
    heldout_set = set(heldout)
    return [pair for pair in ALL_PAIRS if pair not in heldout_set], heldout


def prompt_dataset(pairs: list[tuple[int, int]]) -> Dataset:
    """Conversational prompts with an `answer` column for the reward and a `carry` column for the breakdown."""
    return Dataset.from_dict(
        {
            "prompt": [prompt(a, b) for a, b in pairs],
            "answer": [str(a + b) for a, b in pairs],
            "carry": [has_carry(a, b) for a, b in pairs],
        }
    )


def completion_dataset(pairs: list[tuple[int, int]], style) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [prompt(a, b) for a, b in pairs],
            "completion": [[{"role": "assistant", "content": style(a, b)}] for a, b in pairs],
        }
    )


def task_datasets(num_heldout: int = 100, seed: int = 0) -> dict[str, Dataset]:
    """`instruct` (no-carry, short style), `expert` (worked style), `rl` prompts and `heldout` prompts."""
    train, heldout = split_pairs(num_heldout, seed)
    return {
        "instruct": completion_dataset([pair for pair in train if not has_carry(*pair)], short_answer),
        "expert": completion_dataset(train, worked_answer),
        "rl": prompt_dataset(train),
        "heldout": prompt_dataset(heldout),
    }


def parse_answer(text: str) -> str | None:
    """The final number of a completion in either style, or None when it is in neither."""
    match = SHORT_ANSWER.fullmatch(text) or WORKED_ANSWER.fullmatch(text)
    return None if match is None else match.group(1)


def text_reward(text: str, expected: str) -> float:
    """The paper's reward shape: 1 correct, 0 a wrong number, -0.1 no parseable answer."""
    answer = parse_answer(text)
    return -0.1 if answer is None else float(answer == expected)


def addition_reward(completions, answer, **kwargs) -> list[float]:
    return [text_reward(completion_text(c), expected) for c, expected in zip(completions, answer, strict=True)]
