"""Data and reward functions shared by the tests and the multi-process scripts they launch."""

from datasets import Dataset


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
