r"""Reward functions for TRL's `GRPOTrainer` (and so `ChordTrainer`): math answers and function calls.

Both follow TRL's reward-function signature, `reward(completions, **kwargs) -> list[float | None]`: one score per
completion, `None` where the example cannot be graded (TRL turns it into NaN and leaves it out). Dataset columns
arrive as keyword arguments, one value per completion. Completions may be plain strings or conversational (a list of
messages whose `"content"` is the text); both shapes are accepted.

- [`math_accuracy_reward`]: the CHORD paper's shape. +1 correct, 0 wrong but answered in a final `\boxed{...}`,
  -0.1 no boxed answer, -1 no boxed answer because the completion was cut at `max_completion_length`. Answers are
  checked with `math-verify`.
- [`tool_call_reward`]: BFCL-style function-call matching against a `reference_calls` column. 1 all calls right,
  0.5 right functions with wrong arguments, 0 wrong or missing functions, -0.1 malformed calls.

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

import atexit
import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any


logger = logging.getLogger(__name__)

MAX_COMPLETION_CHARS = 100_000
"""Only this many characters from the end of a completion are read."""

MAX_ANSWER_CHARS = 1_000
r"""A `\boxed{...}` answer longer than this is scored as wrong without parsing it."""

MAX_CALL_JSON_CHARS = 20_000
"""A function-call JSON text longer than this is scored as malformed without parsing it."""

DEFAULT_VERIFY_TIMEOUT_S = 0.5
"""Seconds `math-verify` gets to compare one answer with its solution; past that the answer counts as wrong."""

WORKER_START_TIMEOUT_S = 60.0
"""Seconds to wait for the `math-verify` child process to import SymPy and report ready."""

CORRECT_REWARD = 1.0
WRONG_ANSWER_REWARD = 0.0
NO_ANSWER_REWARD = -0.1
OVERLONG_NO_ANSWER_REWARD = -1.0

TOOL_CALLS_CORRECT_REWARD = 1.0
TOOL_ARGUMENTS_WRONG_REWARD = 0.5
TOOL_NAMES_WRONG_REWARD = 0.0
TOOL_CALLS_MALFORMED_REWARD = -0.1


# --------------------------------------------------------------------------------------------------------------------
# Completion text


def _message_text(message: Any) -> str:
    if isinstance(message, str):
        return message
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content: [{"type": "text", "text": ...}, {"type": "image"}, ...]
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _assistant_messages(completion: Any) -> list:
    """The model's own messages of a conversational completion (tool results are not the model's)."""
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, list):
        return []
    return [m for m in completion if not (isinstance(m, dict) and m.get("role") not in (None, "assistant"))]


def completion_text(completion: Any) -> str:
    """The model-written text of one completion, plain or conversational, cut to its last `MAX_COMPLETION_CHARS`.

    Example:
        >>> completion_text("The answer is 4.")
        'The answer is 4.'
        >>> completion_text([{"role": "assistant", "content": "The answer is 4."}])
        'The answer is 4.'
    """
    if isinstance(completion, str):
        text = completion
    else:
        text = "\n".join(_message_text(message) for message in _assistant_messages(completion))
    return text[-MAX_COMPLETION_CHARS:]


def _per_completion(value: Any, count: int) -> list:
    """A keyword argument as one value per completion: a list stays as it is, a single value is repeated."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count


# --------------------------------------------------------------------------------------------------------------------
# Math answers

_BOXED = "\\boxed"
ANSWER_TOO_LONG = object()  # returned by `last_boxed_answer` for a closed box over MAX_ANSWER_CHARS


def last_boxed_answer(text: str) -> str | None | object:
    r"""The content of the last `\boxed{...}` in `text`.

    `None` when there is no box, the last box is never closed (e.g. the completion was cut inside it) or is empty;
    the sentinel `ANSWER_TOO_LONG` when its content is longer than `MAX_ANSWER_CHARS`. Escaped braces (`\{`, `\}`)
    do not count towards nesting.

    Example:
        >>> last_boxed_answer(r"so x = \boxed{3}, i.e. \boxed{\frac{1}{2}}.")
        '\\frac{1}{2}'
        >>> last_boxed_answer(r"\boxed{\{1, 2\}}")
        '\\{1, 2\\}'
        >>> last_boxed_answer("no box here") is None
        True
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    position = start + len(_BOXED)
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    content_start = position + 1
    depth = 1
    position = content_start
    while position < len(text):  # linear in the text, which is at most MAX_COMPLETION_CHARS long
        char = text[position]
        if char == "\\":
            position += 2  # skip the escaped character, so `\{` and `\}` do not nest
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                if position - content_start > MAX_ANSWER_CHARS:
                    return ANSWER_TOO_LONG
                return text[content_start:position].strip() or None
        position += 1
    return None


def _serve_math_verify() -> None:
    """The child process's loop: one JSON request per stdin line, one JSON verdict per stdout line."""
    import functools

    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeouts are off
    from math_verify import LatexExtractionConfig, parse, verify

    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol

    @functools.lru_cache(maxsize=4096)
    def parse_solution(solution: str) -> list:
        # A bare solution such as `x+1` has no LaTeX delimiters; math-verify finds it once boxed.
        return parse(solution, parsing_timeout=None) or parse(f"\\boxed{{{solution}}}", parsing_timeout=None)

    def check(solution: str, answer: str) -> bool | None:
        gold = parse_solution(solution)
        if not gold:
            return None
        # LaTeX only: the answer is boxed LaTeX, and the plain-expression extractor would hand text to SymPy's
        # `parse_expr`, which evaluates Python.
        predicted = parse(f"\\boxed{{{answer}}}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
        return bool(predicted) and bool(verify(gold, predicted, timeout_seconds=None))

    check("1", "1")  # warm up the LaTeX parser before reporting ready
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            verdict = check(request["solution"], request["answer"])
        except Exception:  # a parse failure on odd input is a wrong answer, not a dead worker
            verdict = False
        protocol.write(json.dumps({"id": request_id, "verdict": verdict}) + "\n")
        protocol.flush()


# Runs the worker from this file's path, without importing the `trl_chord` package (and so torch) in the child.
_WORKER_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_trl_chord_math_verify_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve_math_verify()\n"
)

_WORKER_GONE = None  # what the reader thread queues when the child's stdout closes


class _MathVerifyWorker:
    """A `math-verify` child process that answers one (solution, answer) check at a time, killed on timeout.

    Thread-safe; one per process. A killed or crashed child is replaced right away, so the next check usually finds
    it ready.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None
        self._ready = False
        self._next_id = 0
        self._owner_pid = os.getpid()

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOTSTRAP, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self._lines = queue.Queue()
        self._ready = False
        threading.Thread(
            target=self._read_lines, args=(self._process.stdout, self._lines), name="math-verify-reader", daemon=True
        ).start()

    @staticmethod
    def _read_lines(stream, lines: queue.Queue) -> None:
        try:
            for line in stream:
                lines.put(line)
        except (OSError, ValueError):
            pass
        lines.put(_WORKER_GONE)

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._process = None
        self._ready = False

    def _restart(self) -> None:
        self._kill()
        self._start()

    def _receive(self, timeout_s: float) -> dict | None:
        """The child's next message, or `None` if it exits, writes garbage or stays silent for `timeout_s`."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if line is _WORKER_GONE:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None

    def _ensure_ready(self) -> bool:
        if self._owner_pid != os.getpid():
            # A forked copy of this object: the child process and its pipes belong to the parent, leave them be.
            self._process, self._ready, self._owner_pid = None, False, os.getpid()
        if self._process is None or self._process.poll() is not None:
            self._restart()
        if not self._ready:
            message = self._receive(WORKER_START_TIMEOUT_S)
            self._ready = bool(message and message.get("ready"))
            if not self._ready:
                logger.warning("The math-verify worker did not start; these answers are left ungraded (None).")
                self._kill()
        return self._ready

    def check(self, solution: str, answer: str, timeout_s: float) -> bool | None:
        """Whether `answer` equals `solution`; `None` when the solution cannot be parsed or the worker is down."""
        with self._lock:
            if not self._ensure_ready():
                return None
            request_id = self._next_id
            self._next_id += 1
            try:
                self._process.stdin.write(
                    json.dumps({"id": request_id, "solution": solution, "answer": answer}) + "\n"
                )
                self._process.stdin.flush()
            except OSError:  # the child died between checks: this answer was never looked at
                self._restart()
                return None
            reply = self._receive(timeout_s)
            if reply is None or reply.get("id") != request_id:
                # Timed out or crashed: the answer could not be verified, so it is not correct.
                self._restart()
                return False
            return reply.get("verdict")

    def close(self) -> None:
        with self._lock:
            if self._owner_pid == os.getpid():
                self._kill()


_math_verify_worker = _MathVerifyWorker()
atexit.register(_math_verify_worker.close)


def _require_math_verify() -> None:
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError("math_accuracy_reward needs the math-verify package: pip install 'math-verify[antlr4_13_2]'")


def _max_completion_length_from_trainer(log_metric: Any) -> int | None:
    # TRL passes its trainer's bound `_log_metric`, so the trainer and its `max_completion_length` are reachable.
    trainer = getattr(log_metric, "__self__", None)
    value = getattr(trainer, "max_completion_length", None)
    return value if isinstance(value, int) else None


def _is_truncated(ids: Any, max_length: Any) -> bool:
    if ids is None or not isinstance(max_length, int) or max_length <= 0:
        return False
    try:
        return len(ids) >= max_length
    except TypeError:
        return False


def math_accuracy_reward(
    completions: Sequence[Any],
    solution: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_completion_length: int | Sequence[int] | None = None,
    verify_timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    **kwargs: Any,
) -> list[float | None]:
    r"""CHORD's math reward: +1 correct, 0 wrong, -0.1 no final boxed answer, -1 cut off with no boxed answer.

    The answer is the content of the last `\boxed{...}` in the completion (see [`last_boxed_answer`]); it is
    compared with the example's `solution` by `math-verify`, in a child process killed after `verify_timeout_s`.

    | completion                                                             | reward |
    | ---------------------------------------------------------------------- | ------ |
    | boxed answer equal to `solution`                                       | 1.0    |
    | boxed answer not equal, longer than `MAX_ANSWER_CHARS`, or timed out   | 0.0    |
    | boxed answer, but `solution` is empty or cannot be parsed              | None   |
    | no (closed, non-empty) boxed answer, completion ended on its own       | -0.1   |
    | no boxed answer and the completion was cut at the length limit         | -1.0   |

    "Cut at the length limit" means `len(completion_ids[i]) >= max_completion_length`: TRL passes no truncation
    flag to reward functions, but it does pass `completion_ids`. `max_completion_length` comes from this argument
    (bind it with `functools.partial`, or give a dataset column of that name), else from the TRL trainer that calls
    the function (it passes its bound `log_metric`). With neither, or without `completion_ids`, a completion with no
    boxed answer is never called overlong and scores -0.1. A completion that ends with EOS on exactly its last
    allowed token also counts as cut off, which only matters when it has no boxed answer.

    Args:
        completions: plain strings, or lists of messages (the assistant messages' `"content"` is read).
        solution: the reference answer per completion: LaTeX (`\frac{1}{2}`, `$x+1$`), a number (`int`, `float` or
            text), or a full solution text containing `\boxed{...}`.
        completion_ids: token ids per completion, passed by TRL.
        max_completion_length: the generation length limit, one int or one per completion.
        verify_timeout_s: seconds `math-verify` may spend on one answer before it counts as wrong.

    Example:
        >>> math_accuracy_reward(
        ...     [r"So \boxed{\frac{1}{2}}", r"\boxed{0.4}", "It is one half.", "Let me think about it and"],
        ...     solution=["0.5"] * 4,
        ...     completion_ids=[[1] * 5, [1] * 5, [1] * 5, [1] * 8],
        ...     max_completion_length=8,
        ... )
        [1.0, 0.0, -0.1, -1.0]
    """
    _require_math_verify()
    count = len(completions)
    ids_per_completion = _per_completion(completion_ids, count)
    if max_completion_length is None:
        max_completion_length = _max_completion_length_from_trainer(kwargs.get("log_metric"))
    max_length_per_completion = _per_completion(max_completion_length, count)
    verdicts: dict[tuple[str, str], bool | None] = {}  # a GRPO group repeats solutions and often answers

    rewards: list[float | None] = []
    for completion, reference, ids, max_length in zip(
        completions, solution, ids_per_completion, max_length_per_completion, strict=True
    ):
        answer = last_boxed_answer(completion_text(completion))
        if answer is None:
            truncated = _is_truncated(ids, max_length)
            rewards.append(OVERLONG_NO_ANSWER_REWARD if truncated else NO_ANSWER_REWARD)
            continue
        if answer is ANSWER_TOO_LONG:
            rewards.append(WRONG_ANSWER_REWARD)
            continue
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)
        if not isinstance(reference, str) or not reference.strip():
            rewards.append(None)
            continue
        key = (reference[:MAX_COMPLETION_CHARS], answer)
        if key not in verdicts:
            verdicts[key] = _math_verify_worker.check(key[0], answer, verify_timeout_s)
        verdict = verdicts[key]
        rewards.append(None if verdict is None else (CORRECT_REWARD if verdict else WRONG_ANSWER_REWARD))
    return rewards


# --------------------------------------------------------------------------------------------------------------------
# Function calls

_OPEN_TAG, _CLOSE_TAG = "<tool_call>", "</tool_call>"
_FENCE = "```"
MALFORMED = None  # what the call parsers return for output that tries to call a function but cannot be read


def _normalize_call(call: Any) -> dict | None:
    """`{"name": str, "arguments": dict}` from the common call shapes, or `None` if it is not a call.

    Accepted: `{"name", "arguments"}`, `{"name", "parameters"}` (Llama style), and the OpenAI / TRL message shape
    `{"type": "function", "function": {"name", "arguments"}}`; `arguments` may also be a JSON string.
    """
    if not isinstance(call, dict):
        return None
    if isinstance(call.get("function"), dict):
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if arguments is None:  # a call without arguments
        arguments = {}
    elif isinstance(arguments, str):
        arguments = _load_json(arguments)  # `MALFORMED` (None) if unreadable, rejected below
    if not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


def _load_json(text: str) -> Any:
    """`json.loads` within `MAX_CALL_JSON_CHARS`; `MALFORMED` for anything it cannot read (never raises)."""
    if len(text) > MAX_CALL_JSON_CHARS:
        return MALFORMED
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, over-long integers, nesting past the recursion limit
        return MALFORMED


def _calls_from_json(value: Any) -> list[dict] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_normalize_call(item) for item in items]
    return MALFORMED if any(call is None for call in calls) else calls


def _tool_call_blocks(text: str) -> list[str] | None:
    """The contents of the `<tool_call>...</tool_call>` blocks; `MALFORMED` if a block is never closed.

    A linear scan with `str.find`: a lazy regex would rescan the rest of the text for every unclosed tag.
    """
    blocks = []
    position = 0
    while (start := text.find(_OPEN_TAG, position)) >= 0:
        end = text.find(_CLOSE_TAG, start + len(_OPEN_TAG))
        if end < 0:
            return MALFORMED  # cut off or garbled
        blocks.append(text[start + len(_OPEN_TAG) : end])
        position = end + len(_CLOSE_TAG)
    return blocks


def _strip_code_fence(text: str) -> str:
    if len(text) >= 2 * len(_FENCE) and text.startswith(_FENCE) and text.endswith(_FENCE):
        inner = text[len(_FENCE) : -len(_FENCE)]
        return inner.removeprefix("json").strip()
    return text


def parse_tool_calls(text: str) -> list[dict] | None:
    """The function calls in a model's text, as `[{"name": str, "arguments": dict}, ...]`.

    Read, in this order:

    1. `<tool_call>{...}</tool_call>` blocks (Hermes / Qwen templates), each holding one call or a list of calls;
       anything outside the blocks is ignored. An unclosed `<tool_call>` is malformed.
    2. Otherwise the text after a `</think>` (if any), stripped of a surrounding ```` ```json ```` fence: a JSON call
       object, or a JSON list of them, when it starts with `{` or `[`.
    3. Otherwise no calls: `[]`.

    Returns `None` (malformed) when a call is attempted but is not valid JSON, or lacks a string `name`, or its
    `arguments` are not an object.

    Example:
        >>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
        [{'name': 'f', 'arguments': {'x': 1}}]
        >>> parse_tool_calls('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"y": "a"}}]')
        [{'name': 'f', 'arguments': {}}, {'name': 'g', 'arguments': {'y': 'a'}}]
        >>> parse_tool_calls('{"name": "f", "arguments": {"x": 1') is None
        True
        >>> parse_tool_calls("I cannot help with that.")
        []
    """
    text = text[-MAX_COMPLETION_CHARS:]
    if _OPEN_TAG in text:
        blocks = _tool_call_blocks(text)
        if blocks is MALFORMED:
            return MALFORMED
        calls = []
        for block in blocks:
            block_calls = _calls_from_json(_load_json(block.strip()))
            if block_calls is MALFORMED:
                return MALFORMED
            calls.extend(block_calls)
        return calls
    answer = _strip_code_fence(text.rsplit("</think>", 1)[-1].strip())
    if answer.startswith(("{", "[")):
        return _calls_from_json(_load_json(answer))
    return []


def _structured_tool_calls(completion: Any) -> list:
    """Calls the trainer already parsed into the messages' `tool_calls` (TRL does when given `tools`), unchecked."""
    if isinstance(completion, str):
        return []
    raw_calls = []
    for message in _assistant_messages(completion):
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
            raw_calls.extend(message["tool_calls"])
    return raw_calls


def _load_reference_calls(reference: Any) -> list[dict] | None:
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except ValueError:
            return None
    if reference is None:
        return None
    return _calls_from_json(reference)


def json_values_equal(left: Any, right: Any) -> bool:
    """Equality of parsed JSON values by JSON type: `1 == 1.0`, but `true != 1` and `"1" != 1`; key order is ignored.

    Example:
        >>> json_values_equal({"a": [1, 2.0]}, {"a": [1.0, 2]}), json_values_equal({"a": True}, {"a": 1})
        (True, False)
    """
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_values_equal(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(json_values_equal(a, b) for a, b in zip(left, right))
    return type(left) is type(right) and left == right


def _all_calls_match(predicted: list[dict], reference: list[dict]) -> bool:
    """Whether the calls pair up one-to-one, in any order, with equal names and arguments."""
    if len(predicted) != len(reference):
        return False
    unmatched = list(reference)
    for call in predicted:
        for index, candidate in enumerate(unmatched):
            if candidate["name"] == call["name"] and json_values_equal(candidate["arguments"], call["arguments"]):
                del unmatched[index]
                break
        else:
            return False
    return True


def score_tool_calls(predicted: list[dict] | None, reference: list[dict]) -> float:
    """The `tool_call_reward` score of parsed calls (`None` = malformed) against the reference calls."""
    if predicted is MALFORMED:
        return TOOL_CALLS_MALFORMED_REWARD
    try:
        if _all_calls_match(predicted, reference):
            return TOOL_CALLS_CORRECT_REWARD
    except RecursionError:  # arguments nested deeper than Python recurses: not a match
        pass
    if Counter(call["name"] for call in predicted) == Counter(call["name"] for call in reference):
        return TOOL_ARGUMENTS_WRONG_REWARD
    return TOOL_NAMES_WRONG_REWARD


def tool_call_reward(completions: Sequence[Any], reference_calls: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """BFCL-style function-call reward against the dataset column `reference_calls`.

    `reference_calls` holds, per example, the expected calls: a list of `{"name": ..., "arguments": {...}}` (or a
    single such object), or that list as a JSON string. Prefer the JSON string in a `datasets.Dataset`: Arrow merges
    the argument dicts of all rows into one struct type and fills absent arguments with `None`. An empty list means
    the model should call nothing. An unreadable reference gives `None` (the example is not graded).

    The model's calls come from the messages' `tool_calls` when the trainer parsed them, else from the text (see
    [`parse_tool_calls`]). Calls are compared as a multiset: the order of parallel calls does not matter.

    | model output                                                                        | reward |
    | ----------------------------------------------------------------------------------- | ------ |
    | the same calls: names equal, arguments equal as JSON values, none extra or missing  | 1.0    |
    | the same function names (with multiplicity), some arguments differ                  | 0.5    |
    | different, missing or extra function names (including no call when one is due)      | 0.0    |
    | a malformed call: bad JSON, no string `name`, non-object `arguments`, unclosed tag  | -0.1   |

    Argument values are compared exactly as JSON (`json_values_equal`): no string normalization, no optional
    arguments or alternative values as in BFCL's own checker.

    Example:
        >>> tool_call_reward(
        ...     ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        ...      '{"name": "get_weather", "arguments": {"city": "Rome"}}',
        ...      '{"name": "get_time", "arguments": {}}',
        ...      '{"name": "get_weather", "arguments": {"city": "Paris"'],
        ...     reference_calls=['[{"name": "get_weather", "arguments": {"city": "Paris"}}]'] * 4,
        ... )
        [1.0, 0.5, 0.0, -0.1]
    """
    rewards: list[float | None] = []
    for completion, reference in zip(completions, reference_calls, strict=True):
        expected = _load_reference_calls(reference)
        if expected is None:
            rewards.append(None)
            continue
        structured_calls = _structured_tool_calls(completion)
        if structured_calls:
            predicted = _calls_from_json(structured_calls)
        else:
            predicted = parse_tool_calls(completion_text(completion))
        rewards.append(score_tool_calls(predicted, expected))
    return rewards
