import functools
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest

from trl_chord.rewards import (
    ANSWER_TOO_LONG,
    MAX_ANSWER_CHARS,
    MAX_COMPLETION_CHARS,
    completion_text,
    json_values_equal,
    last_boxed_answer,
    math_accuracy,
    math_accuracy_reward,
    parse_tool_calls,
    tool_call_reward,
)


pytest.importorskip("math_verify")

HACKED_MARKER = Path(tempfile.gettempdir()) / "trl_chord_reward_hacked"
HACK = f"__import__('os').system('echo hacked > {HACKED_MARKER}')"


def _conversational(text):
    return [{"role": "assistant", "content": text}]


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


@pytest.fixture
def warm_math_verifier():
    """Start (or restart) the math-verify child outside the timed part: starting it is a one-off, not a check."""
    assert math_accuracy_reward([r"\boxed{1}"], solution=["1"]) == [1.0]


# --------------------------------------------------------------------------------------------------------------------
# last_boxed_answer / completion_text


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"x = \boxed{3}", "3"),
        (r"first \boxed{1} then \boxed{ 2 }", "2"),
        (r"\boxed {\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{a^{b^{c}}} done", "a^{b^{c}}"),
        ("no answer", None),
        (r"\boxed{}", None),
        (r"\boxed{3", None),
        (r"\boxed{1} and finally \boxed{2", None),  # the last box is unclosed: cut off while answering
        (r"\boxed 3", None),
    ],
)
def test_last_boxed_answer(text, expected):
    assert last_boxed_answer(text) == expected


def test_last_boxed_answer_too_long():
    assert last_boxed_answer(r"\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}") is ANSWER_TOO_LONG
    assert last_boxed_answer(r"\boxed{" + "1" * MAX_ANSWER_CHARS + "}") == "1" * MAX_ANSWER_CHARS


def test_completion_text_shapes_and_cap():
    assert completion_text("plain") == "plain"
    assert completion_text(_conversational("chat")) == "chat"
    multimodal = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert completion_text(multimodal) == "a"
    with_tool_turn = [
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": r"\boxed{99}"},
        {"role": "assistant", "content": "done"},
    ]
    assert completion_text(with_tool_turn) == "call\ndone"  # tool output is not the model's text
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text("x" * (MAX_COMPLETION_CHARS + 10) + "END").endswith("END")
    assert len(completion_text("x" * (2 * MAX_COMPLETION_CHARS))) == MAX_COMPLETION_CHARS


# --------------------------------------------------------------------------------------------------------------------
# math_accuracy_reward


@pytest.mark.parametrize("shape", [str, _conversational], ids=["plain", "conversational"])
def test_math_reward_scores(shape):
    completions = [
        r"The answer is \boxed{\frac{1}{2}}.",  # correct, other notation
        r"So \boxed{0.5}",  # correct
        r"So \boxed{0.4}",  # wrong, well formatted
        "It is one half.",  # no boxed answer, ended normally
        r"\boxed{0.5",  # unclosed box
    ]
    rewards_ = math_accuracy_reward([shape(c) for c in completions], solution=["0.5"] * len(completions))
    assert rewards_ == [1.0, 1.0, 0.0, -0.1, -0.1]


def test_math_reward_symbolic_and_latex_solutions():
    completions = [r"\boxed{1+x}", r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{\{2, 1\}}", r"\boxed{x+2}"]
    solutions = ["x+1", r"$\sqrt{2}/2$", r"\{1,2\}", "The answer is $\\boxed{x+1}$."]
    assert math_accuracy_reward(completions, solution=solutions) == [1.0, 1.0, 1.0, 0.0]


def test_math_reward_overlong_uses_completion_ids_and_max_length():
    completions = ["I keep thinking and", r"\boxed{2}", r"\boxed{3}", "short, no answer"]
    ids = [[7] * 16, [7] * 16, [7] * 16, [7] * 5]
    rewards_ = math_accuracy_reward(completions, solution=["2"] * 4, completion_ids=ids, max_completion_length=16)
    # A cut-off completion that still has a boxed answer is graded on it.
    assert rewards_ == [-1.0, 1.0, 0.0, -0.1]
    # Per-completion limits (a dataset column) work too.
    assert math_accuracy_reward(
        completions[:1] * 2, solution=["2"] * 2, completion_ids=ids[:1] * 2, max_completion_length=[16, 32]
    ) == [-1.0, -0.1]


def test_math_reward_without_length_information_never_says_overlong():
    ids = [[7] * 16]
    assert math_accuracy_reward(["I keep thinking and"], solution=["2"], completion_ids=ids) == [-0.1]
    assert math_accuracy_reward(["I keep thinking and"], solution=["2"], max_completion_length=16) == [-0.1]


def test_math_reward_reads_max_length_from_the_calling_trainer():
    class FakeTrainer:  # what TRL passes: its bound `_log_metric`, whose owner has `max_completion_length`
        max_completion_length = 16

        def _log_metric(self, name, value):
            pass

    log_metric = FakeTrainer()._log_metric
    assert math_accuracy_reward(["cut off"], solution=["2"], completion_ids=[[7] * 16], log_metric=log_metric) == [
        -1.0
    ]
    assert math_accuracy_reward(
        ["cut off"], solution=["2"], completion_ids=[[7] * 16], log_metric=log_metric, max_completion_length=64
    ) == [-0.1]


def test_math_reward_with_functools_partial_as_trl_names_it():
    from trl.trainer.utils import get_callable_name

    reward = functools.partial(math_accuracy_reward, max_completion_length=4)
    assert get_callable_name(reward) == "math_accuracy_reward"
    assert reward(["abcd"], solution=["1"], completion_ids=[[1, 2, 3, 4]]) == [-1.0]


def test_math_reward_numeric_solution_column():
    assert math_accuracy_reward([r"\boxed{12}", r"\boxed{0.25}", r"\boxed{3}"], solution=[12, 0.25, 4]) == [
        1.0,
        1.0,
        0.0,
    ]


def test_math_reward_unparseable_solution_is_none_but_format_still_scored():
    assert math_accuracy_reward([r"\boxed{3}", "no box", r"\boxed{3}"], solution=["", "", None]) == [None, -0.1, None]


def test_math_reward_works_outside_the_main_thread():
    # math-verify's own signal-based timeouts raise there; the child process does not care which thread asks.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_accuracy_reward([r"\boxed{4}"], solution=["4"])))
    thread.start()
    thread.join(timeout=60)
    assert results == [[1.0]]


def test_math_reward_survives_a_dead_worker(warm_math_verifier):
    math_accuracy._math_verify_worker._process.kill()
    math_accuracy._math_verify_worker._process.wait()
    assert math_accuracy_reward([r"\boxed{5}", r"\boxed{6}"], solution=["5", "5"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        pytest.param("a" * 1_000_000, -0.1, id="1MB-no-answer"),
        pytest.param("a" * 1_000_000 + r" \boxed{2}", 1.0, id="1MB-answer-at-end"),
        pytest.param(r"\boxed{\frac{1}{0}}", 0.0, id="divide-by-zero"),
        # The box starts before the last MAX_COMPLETION_CHARS characters, so it is not seen.
        pytest.param(r"\boxed{" + "9" * 1_000_000 + "}", -0.1, id="million-digit-number"),
        pytest.param(r"\boxed{" + "9" * 50_000 + "}", 0.0, id="50k-digit-number"),
        pytest.param("{" * 100_000, -0.1, id="100k-open-braces"),
        pytest.param(r"\boxed{" + "{" * 50_000, -0.1, id="boxed-100k-open-braces"),
        pytest.param(r"\boxed{" + "{" * 300 + "2" + "}" * 300 + "}", 0.0, id="300-nested-braces"),
        pytest.param(HACK, -0.1, id="python-code"),
        pytest.param(r"\boxed{" + HACK + "}", 0.0, id="boxed-python-code"),
        # SymPy would compute a 370-million-digit integer: the check is killed at its timeout.
        pytest.param(r"\boxed{9^{9^{9}}}", 0.0, id="power-tower"),
        pytest.param(r"\boxed{(10^{9})!}", 0.0, id="huge-factorial"),
    ],
)
@pytest.mark.parametrize("shape", [str, _conversational], ids=["plain", "conversational"])
def test_math_reward_pathological_answers_are_fast_and_safe(warm_math_verifier, shape, completion, expected):
    result, seconds = _timed(math_accuracy_reward, [shape(completion)], solution=["2"])
    assert result == [expected]
    assert seconds < 1.0
    assert not HACKED_MARKER.exists()


def test_math_reward_pathological_batch_with_a_timeout_in_the_middle(warm_math_verifier):
    completions = [r"\boxed{2}", r"\boxed{9^{9^{9}}}", r"\boxed{2}", r"\boxed{3}"]
    result, seconds = _timed(math_accuracy_reward, completions, solution=["2"] * 4)
    assert result == [1.0, 0.0, 1.0, 0.0]
    assert seconds < 10.0  # one timeout (0.5 s) and one restart of the child, not a hang


# --------------------------------------------------------------------------------------------------------------------
# tool_call_reward

WEATHER_PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME_PARIS = {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}


def _call_json(*calls):
    return json.dumps(list(calls)) if len(calls) != 1 else json.dumps(calls[0])


def _tagged(*calls):
    return "".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>\n" for call in calls)


@pytest.mark.parametrize(
    "completion, expected",
    [
        pytest.param(_call_json(WEATHER_PARIS), 1.0, id="exact-json-object"),
        pytest.param(_tagged(WEATHER_PARIS), 1.0, id="exact-tagged"),
        pytest.param("<think>Paris, so get_weather.</think>\n" + _tagged(WEATHER_PARIS), 1.0, id="tagged-after-think"),
        pytest.param("<think>hm</think>\n" + _call_json(WEATHER_PARIS), 1.0, id="json-after-think"),
        pytest.param("```json\n" + _call_json(WEATHER_PARIS) + "\n```", 1.0, id="json-code-fence"),
        pytest.param(
            json.dumps({"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}), 1.0, id="key-order"
        ),
        pytest.param(
            json.dumps({"name": "get_weather", "parameters": WEATHER_PARIS["arguments"]}), 1.0, id="parameters-key"
        ),
        pytest.param(
            json.dumps({"name": "get_weather", "arguments": json.dumps(WEATHER_PARIS["arguments"])}),
            1.0,
            id="arguments-as-json-string",
        ),
        pytest.param(
            json.dumps({"name": "get_weather", "arguments": {"city": "paris", "unit": "celsius"}}), 0.5, id="wrong-arg"
        ),
        pytest.param(json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}), 0.5, id="missing-arg"),
        pytest.param(
            json.dumps({"name": "get_weather", "arguments": {**WEATHER_PARIS["arguments"], "days": 3}}),
            0.5,
            id="extra-arg",
        ),
        pytest.param(json.dumps({**WEATHER_PARIS, "name": "get_forecast"}), 0.0, id="wrong-name"),
        pytest.param(_call_json(WEATHER_PARIS, WEATHER_PARIS), 0.0, id="called-twice"),
        pytest.param("It is sunny in Paris.", 0.0, id="no-call"),
        pytest.param('{"name": "get_weather", "arguments": {"city": "Paris"', -0.1, id="truncated-json"),
        pytest.param("<tool_call>\n" + _call_json(WEATHER_PARIS), -0.1, id="unclosed-tag"),
        pytest.param("<tool_call>{'name': 'get_weather'}</tool_call>", -0.1, id="python-dict-not-json"),
        pytest.param('{"arguments": {"city": "Paris"}}', -0.1, id="no-name"),
        pytest.param('{"name": "get_weather", "arguments": ["Paris"]}', -0.1, id="arguments-not-object"),
        pytest.param("[1, 2]", -0.1, id="list-of-non-calls"),
        pytest.param('{"name": "get_weather", "arguments": "{bad json"}', -0.1, id="arguments-string-not-json"),
        pytest.param('{"name": "get_weather", "arguments": null}', 0.5, id="arguments-null"),
    ],
)
@pytest.mark.parametrize("shape", [str, _conversational], ids=["plain", "conversational"])
def test_tool_call_reward_single_call(shape, completion, expected):
    reference = json.dumps([WEATHER_PARIS])
    assert tool_call_reward([shape(completion)], reference_calls=[reference]) == [expected]


def test_tool_call_reward_parallel_calls_in_any_order():
    reference = [WEATHER_PARIS, TIME_PARIS]  # a list of dicts works as well as a JSON string
    completions = [
        _tagged(TIME_PARIS, WEATHER_PARIS),
        _call_json(TIME_PARIS, WEATHER_PARIS),
        _tagged(WEATHER_PARIS),
        _tagged(WEATHER_PARIS, {**TIME_PARIS, "arguments": {"timezone": "UTC"}}),
        "<tool_call>" + _call_json(TIME_PARIS, WEATHER_PARIS) + "</tool_call>",  # a list inside one tag
        _tagged(WEATHER_PARIS) + "<tool_call>{oops}</tool_call>",  # one good call, one malformed
    ]
    assert tool_call_reward(completions, reference_calls=[reference] * len(completions)) == [
        1.0,
        1.0,
        0.0,
        0.5,
        1.0,
        -0.1,
    ]


def test_tool_call_reward_same_function_twice_matches_one_to_one():
    paris, rome = WEATHER_PARIS, {**WEATHER_PARIS, "arguments": {"city": "Rome", "unit": "celsius"}}
    reference = json.dumps([paris, rome])
    assert tool_call_reward([_tagged(rome, paris), _tagged(paris, paris)], reference_calls=[reference] * 2) == [
        1.0,
        0.5,
    ]


def test_tool_call_reward_uses_trainer_parsed_tool_calls():
    parsed = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": WEATHER_PARIS}]}]
    wrong = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": TIME_PARIS}]}]
    assert tool_call_reward([parsed, wrong], reference_calls=[[WEATHER_PARIS]] * 2) == [1.0, 0.0]


def test_tool_call_reward_no_call_expected_and_bad_reference():
    assert tool_call_reward(["I can't do that.", _tagged(TIME_PARIS)], reference_calls=["[]", "[]"]) == [1.0, 0.0]
    assert tool_call_reward(["x", "x"], reference_calls=["not json", None]) == [None, None]
    assert tool_call_reward([_call_json(WEATHER_PARIS)], reference_calls=[WEATHER_PARIS]) == [1.0]  # a single dict


def test_json_values_equal_is_type_aware():
    assert json_values_equal({"a": 1, "b": [1.0, "x"]}, {"b": [1, "x"], "a": 1.0})
    assert not json_values_equal({"a": True}, {"a": 1})
    assert not json_values_equal({"a": "1"}, {"a": 1})
    assert not json_values_equal({"a": None}, {})
    assert not json_values_equal([1, 2], [2, 1])


def test_parse_tool_calls_returns_normalized_calls():
    assert parse_tool_calls(_tagged(WEATHER_PARIS, TIME_PARIS)) == [WEATHER_PARIS, TIME_PARIS]
    assert parse_tool_calls('{"name": "now"}') == [{"name": "now", "arguments": {}}]
    assert parse_tool_calls("no call here") == []
    assert parse_tool_calls('{"name": "f", "arguments": {') is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        pytest.param("{" * 1_000_000, -0.1, id="1MB-open-braces"),
        pytest.param("[" * 15_000 + "]" * 15_000, -0.1, id="deep-json-nesting"),
        pytest.param("[" * 5_000 + "]" * 5_000, -0.1, id="json-nesting-under-the-size-cap"),
        pytest.param('{"name": "get_weather", "arguments": {"city": ' + "9" * 15_000 + "}}", -0.1, id="15k-digits"),
        pytest.param("<tool_call>" * 100_000, -0.1, id="100k-open-tags"),
        pytest.param(_tagged(WEATHER_PARIS) * 3_000, 0.0, id="3000-calls"),
        pytest.param(HACK, 0.0, id="python-code"),
        pytest.param('{"name": "get_weather", "arguments": {"city": "' + HACK + '"}}', 0.5, id="python-code-in-arg"),
        pytest.param("a" * 1_000_000 + _tagged(WEATHER_PARIS), 1.0, id="1MB-then-call"),
    ],
)
def test_tool_call_reward_pathological_outputs_are_fast_and_safe(completion, expected):
    result, seconds = _timed(tool_call_reward, [completion], reference_calls=[json.dumps([WEATHER_PARIS])])
    assert result == [expected]
    assert seconds < 1.0
    assert not HACKED_MARKER.exists()
