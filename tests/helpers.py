"""Data and reward functions shared by the tests and the multi-process scripts they launch."""

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from trl_chord import ChordConfig, ChordTrainer


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


def make_trainer(model_dir, args, expert_dataset=None, reward_funcs=None, **kwargs) -> ChordTrainer:
    return ChordTrainer(
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
