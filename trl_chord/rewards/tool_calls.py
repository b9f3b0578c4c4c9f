"""BFCL-style function-call reward: the calls a completion makes, read as JSON only, against the reference calls."""

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .completions import MAX_COMPLETION_CHARS, assistant_messages, completion_text


MAX_CALL_JSON_CHARS = 20_000
"""A function-call JSON text longer than this is scored as malformed without parsing it."""

TOOL_CALLS_CORRECT_REWARD = 1.0
TOOL_ARGUMENTS_WRONG_REWARD = 0.5
TOOL_NAMES_WRONG_REWARD = 0.0
TOOL_CALLS_MALFORMED_REWARD = -0.1

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
    for message in assistant_messages(completion):
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
