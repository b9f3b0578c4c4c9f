r"""Reward functions for TRL's `GRPOTrainer` (and so `ChordTrainer`): math answers and function calls.

Both follow TRL's reward-function signature, `reward(completions, **kwargs) -> list[float | None]`: one score per
completion, `None` where the example cannot be graded (TRL turns it into NaN and leaves it out). Dataset columns
arrive as keyword arguments, one value per completion. Completions may be plain strings or conversational (a list of
messages whose `"content"` is the text); both shapes are accepted.

- [`math_accuracy_reward`] (`math_accuracy.py`): the CHORD paper's shape. +1 correct, 0 wrong but answered in a
  final `\boxed{...}`, -0.1 no boxed answer, -1 no boxed answer because the completion was cut at
  `max_completion_length`. Answers are checked with `math-verify` (`pip install 'trl-chord[rewards]'`), in the child
  process of `math_verify_worker.py`.
- [`tool_call_reward`] (`tool_calls.py`): BFCL-style function-call matching against a `reference_calls` column. 1 all
  calls right, 0.5 right functions with wrong arguments, 0 wrong or missing functions, -0.1 malformed calls.

Safety: model output is untrusted. Nothing here evaluates it as code. Function calls are read with `json.loads`
only; boxed answers are parsed as LaTeX only (no SymPy `parse_expr`, which evaluates Python). `math-verify` runs in
a child process that is killed when a check runs over its time limit, because its SymPy work (`\boxed{9^{9^{9}}}`
asks for a number with 370 million digits) cannot be stopped reliably from inside the process, and its own
`signal.alarm` timeouts work only in the main thread and only in whole seconds.
Inputs are capped before parsing:

- [`MAX_COMPLETION_CHARS`]: only the last 100,000 characters of a completion are read (answers and calls come at
  the end).
- [`MAX_ANSWER_CHARS`]: a boxed answer longer than 1,000 characters counts as wrong and is never parsed.
- [`MAX_CALL_JSON_CHARS`]: a function-call JSON text longer than 20,000 characters counts as malformed.

Use with TRL:

```python
from functools import partial

from trl import GRPOConfig, GRPOTrainer
from trl_chord.rewards import math_accuracy_reward

args = GRPOConfig(max_completion_length=1024)
# `max_completion_length` lets the reward tell a cut-off completion (-1) from one that just has no answer (-0.1).
reward = partial(math_accuracy_reward, max_completion_length=args.max_completion_length)
trainer = GRPOTrainer(model=..., reward_funcs=[reward], args=args, train_dataset=dataset_with_solution_column)
```
"""

from .completions import MAX_COMPLETION_CHARS, completion_text
from .math_accuracy import (
    ANSWER_TOO_LONG,
    CORRECT_REWARD,
    DEFAULT_VERIFY_TIMEOUT_S,
    MAX_ANSWER_CHARS,
    NO_ANSWER_REWARD,
    OVERLONG_NO_ANSWER_REWARD,
    WRONG_ANSWER_REWARD,
    last_boxed_answer,
    math_accuracy_reward,
)
from .tool_calls import (
    MAX_CALL_JSON_CHARS,
    TOOL_ARGUMENTS_WRONG_REWARD,
    TOOL_CALLS_CORRECT_REWARD,
    TOOL_CALLS_MALFORMED_REWARD,
    TOOL_NAMES_WRONG_REWARD,
    json_values_equal,
    parse_tool_calls,
    score_tool_calls,
    tool_call_reward,
)


__all__ = [
    "ANSWER_TOO_LONG",
    "CORRECT_REWARD",
    "DEFAULT_VERIFY_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "MAX_CALL_JSON_CHARS",
    "MAX_COMPLETION_CHARS",
    "NO_ANSWER_REWARD",
    "OVERLONG_NO_ANSWER_REWARD",
    "TOOL_ARGUMENTS_WRONG_REWARD",
    "TOOL_CALLS_CORRECT_REWARD",
    "TOOL_CALLS_MALFORMED_REWARD",
    "TOOL_NAMES_WRONG_REWARD",
    "WRONG_ANSWER_REWARD",
    "completion_text",
    "json_values_equal",
    "last_boxed_answer",
    "math_accuracy_reward",
    "parse_tool_calls",
    "score_tool_calls",
    "tool_call_reward",
]
