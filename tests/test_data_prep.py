"""The data preparations (`trl-chord prepare NAME`), run as users run them, on small local files in each source's
schema."""

import io
import json
import os
import sys

import pytest
from bounded_run import run_bounded
from datasets import load_dataset

from trl_chord.expert_data import prepare_expert_dataset
from trl_chord.rewards import math_accuracy_reward, tool_call_reward


# The console script that `pip install` put next to this interpreter
TRL_CHORD = os.path.join(os.path.dirname(sys.executable), "trl-chord")
MAX_EXPERT_TOKENS = 120


def run_script(name: str, tmp_path, *arguments: str) -> str:
    """Run `trl-chord prepare NAME` offline; returns its stdout."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    command = [TRL_CHORD, "prepare", name, *arguments]
    completed = run_bounded(command, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-5000:]
    return completed.stdout


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def user_text(messages: list[dict]) -> str:
    return next(message["content"] for message in messages if message["role"] == "user")


# --------------------------------------------------------------------------------------------------------------------
# OpenR1-Math


def math_row(uuid, problem, answer, generations, correct, complete=None) -> dict:
    return {
        "problem": problem,
        "solution": f"Worked solution, ending in {answer}.",
        "answer": answer,
        "source": "olympiads",
        "uuid": uuid,
        "generations": generations,
        "correctness_math_verify": correct,
        "is_reasoning_complete": complete or [True] * len(generations),
    }


def short(answer: str) -> str:
    return f"<think>Quick check.</think> The answer is $\\boxed{{{answer}}}$."


def long(answer: str, length: int) -> str:
    return f"<think>{'Let me check that again. ' * (length // 25)}</think> So $\\boxed{{{answer}}}$."


MATH_ROWS = [
    # First generation marked wrong, second right: the expert is the second
    math_row("a", "What is 2+2?", "4", [short("5"), short("4")], [False, True]),
    math_row("a-duplicate", "What is  2+2?\n", "4", [short("4")], [True]),
    # The first correct generation is over the token limit, the second is not
    math_row("b", "Compute 3*3.", "9", [long("9", 200), short("9")], [True, True]),
    math_row("c", "Solve x+1=3.", "2", [short("2")], [True], complete=[False]),
    math_row("d", "Find 10/2.", "5", [short("4"), short("6")], [False, False]),
    math_row("e", "Find 6+1.", "7", [long("7", 300)], [True]),
    math_row("g", "Prove that there are infinitely many primes.", "proof", [short("1")], [False]),
    math_row("h", "What is 1+1?", "2", [short("2")], [True]),
    # Marked correct, but its boxed answer is wrong: only `--reverify` catches it
    math_row("i", "What is 3+4?", "7", [short("8")], [True]),
]
SUMMARY_REASON_NO_VERIFIED = "no generation marked correct with complete reasoning"


@pytest.fixture(scope="module")
def math_source(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("openr1") / "openr1.jsonl", MATH_ROWS)


def test_openr1_math_split_with_token_limit(math_source, tmp_path, tiny_model_dir, tiny_tokenizer):
    stdout = run_script(
        "openr1_math",
        tmp_path,
        *("--dataset", math_source, "--output_dir", str(tmp_path / "out"), "--num_sft", "10", "--num_rl", "10"),
        *("--tokenizer", tiny_model_dir, "--max_expert_tokens", str(MAX_EXPERT_TOKENS)),
    )
    assert "Expert SFT set: 4 of 10 wanted." in stdout and "WARNING" in stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["expert"] == {
        "kept": 4,
        "rejected": {
            SUMMARY_REASON_NO_VERIFIED: 3,  # c (reasoning incomplete), d (none correct), g
            f"every marked-correct generation longer than {MAX_EXPERT_TOKENS} tokens": 1,  # e
        },
    }
    assert summary["rl"] == {"kept": 3, "rejected": {"no checkable answer": 1}}  # g's answer is "proof"
    assert summary["dropped"] == {"duplicate problem": 1} and summary["unused"] == 0

    expert = read_jsonl(tmp_path / "out" / "expert_solutions.jsonl")
    rl = read_jsonl(tmp_path / "out" / "rl_prompts.jsonl")
    assert all(set(example) == {"prompt", "completion", "uuid", "source"} for example in expert)
    assert all(set(example) == {"prompt", "solution", "uuid", "source"} for example in rl)
    expert_uuids = {example["uuid"] for example in expert}
    assert expert_uuids - {"a", "a-duplicate"} == {"b", "h", "i"} and len(expert_uuids & {"a", "a-duplicate"}) == 1
    assert {example["uuid"]: example["solution"] for example in rl} == {"c": "2", "d": "5", "e": "7"}
    expert_problems = {user_text(example["prompt"]) for example in expert}
    assert not expert_problems & {user_text(example["prompt"]) for example in rl}

    by_uuid = {example["uuid"]: example for example in expert}
    assert by_uuid["b"]["completion"] == [{"role": "assistant", "content": short("9")}]
    assert by_uuid["h"]["prompt"] == [
        {
            "role": "user",
            "content": "What is 1+1?\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]
    for example in expert:
        completion = example["completion"][0]["content"]
        assert len(tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]) <= MAX_EXPERT_TOKENS

    # The expert set loads into the trainer's expert pipeline, the RL answers are what the math reward reads
    expert_dataset = load_dataset("json", data_files=str(tmp_path / "out" / "expert_solutions.jsonl"), split="train")
    assert len(prepare_expert_dataset(expert_dataset, tiny_tokenizer, max_length=1024)) == 4
    boxed = [f"\\boxed{{{example['solution']}}}" for example in rl]
    assert math_accuracy_reward(boxed, solution=[example["solution"] for example in rl]) == [1.0] * len(rl)


def test_openr1_math_luffy_prompts_hold_both_sets_with_the_expert_solutions(
    math_source, tmp_path, tiny_model_dir, tiny_tokenizer, caplog
):
    # With --luffy, the same split, plus LUFFY's RL prompts: every problem of both sets, the expert set's with its
    # solution as `expert_completion`, the RL set's with none; an expert problem whose answer is "proof" is left out
    output_dir = tmp_path / "out"
    arguments = ("--dataset", math_source, "--num_sft", "10", "--num_rl", "10", "--tokenizer", tiny_model_dir)
    arguments += ("--max_expert_tokens", str(MAX_EXPERT_TOKENS))
    stdout = run_script("openr1_math", tmp_path, *arguments, "--output_dir", str(output_dir), "--luffy")
    assert "LUFFY prompts: 7, 4 with an expert solution." in stdout and "luffy_prompts.jsonl" in stdout
    expert = read_jsonl(output_dir / "expert_solutions.jsonl")
    rl = read_jsonl(output_dir / "rl_prompts.jsonl")
    luffy = read_jsonl(output_dir / "luffy_prompts.jsonl")
    assert all(set(example) == {"prompt", "solution", "expert_completion", "uuid", "source"} for example in luffy)
    by_uuid = {example["uuid"]: example for example in luffy}
    assert set(by_uuid) == {example["uuid"] for example in expert + rl}
    for example in expert:
        assert by_uuid[example["uuid"]]["expert_completion"] == example["completion"]
        assert by_uuid[example["uuid"]]["prompt"] == example["prompt"]
    for example in rl:
        assert by_uuid[example["uuid"]]["expert_completion"] is None
        assert by_uuid[example["uuid"]]["solution"] == example["solution"]
    assert by_uuid["b"]["solution"] == "9" and by_uuid["h"]["solution"] == "2"
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["luffy"] == {"kept": 7, "with_expert": 4, "rejected": {}}
    # Without --luffy the file is not written, and the other two are the same
    run_script("openr1_math", tmp_path, *arguments, "--output_dir", str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "luffy_prompts.jsonl").exists()
    assert read_jsonl(tmp_path / "plain" / "expert_solutions.jsonl") == expert
    assert read_jsonl(tmp_path / "plain" / "rl_prompts.jsonl") == rl

    # The file loads as the RL dataset of LuffyTrainer, which counts the prompts without an expert solution
    from trl_chord import LuffyConfig, LuffyTrainer

    prompts = load_dataset("json", data_files=str(output_dir / "luffy_prompts.jsonl"), split="train")
    args = LuffyConfig(output_dir=str(tmp_path / "run"), num_generations=2, per_device_train_batch_size=2, bf16=False)
    with caplog.at_level("WARNING"):
        LuffyTrainer(
            tiny_model_dir, math_accuracy_reward, args, train_dataset=prompts, processing_class=tiny_tokenizer
        )
    assert "3 of 7 RL prompts have no expert completion in 'expert_completion'" in caplog.text


def test_openr1_math_luffy_keeps_expert_problems_with_a_checkable_answer_only(tmp_path):
    rows = [
        math_row("p", "Show that 2 is prime.", "proof", [short("2")], [True]),
        math_row("q", "What is 5+5?", "10", [short("10")], [True]),
    ]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_script("openr1_math", tmp_path, "--dataset", source, "--output_dir", str(tmp_path / "out"), "--luffy")
    luffy = read_jsonl(tmp_path / "out" / "luffy_prompts.jsonl")
    assert [example["uuid"] for example in luffy] == ["q"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["luffy"]["rejected"] == {"expert problem with no checkable answer": 1}


def test_openr1_math_reverify_and_caps(math_source, tmp_path):
    run_script(
        "openr1_math",
        tmp_path,
        *("--dataset", math_source, "--output_dir", str(tmp_path / "out"), "--num_sft", "10", "--num_rl", "2"),
        *("--reverify", "--seed", "7"),
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # Without a token limit e is an expert; i's boxed 8 fails the re-check against 7
    assert summary["expert"]["rejected"] == {
        SUMMARY_REASON_NO_VERIFIED: 3,
        "no marked-correct generation passed the math-verify re-check": 1,
    }
    expert = read_jsonl(tmp_path / "out" / "expert_solutions.jsonl")
    rl = read_jsonl(tmp_path / "out" / "rl_prompts.jsonl")
    assert {example["uuid"] for example in expert} - {"a", "a-duplicate"} == {"b", "e", "h"}
    assert len(rl) == 2 and {example["uuid"] for example in rl} <= {"c", "d", "i"}


# --------------------------------------------------------------------------------------------------------------------
# ToolACE

WEATHER = {
    "name": "Get Weather",
    "description": "Weather forecast for a city.",
    "parameters": {
        "type": "dict",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
NEWS = {
    "name": "search_news",
    "description": "Search news articles.",
    "parameters": {"type": "dict", "properties": {"query": {"type": "string"}, "tags": {"type": "array"}}},
}
CLOCK = {"name": "time.now", "description": "The current time.", "parameters": {"type": "dict", "properties": {}}}


def toolace_system(tools: list[dict]) -> str:
    # ToolACE's shape: a preamble with a bracketed call-format example, then the tool list as JSON
    return (
        "You compose function calls. Answer in the format [func_name1(param1=value1), func_name2(params)].\n"
        f"The functions you can call, in JSON:\n{json.dumps(tools)}.\nAnswer with the calls only."
    )


def conversation(*turns: tuple[str, str], tools=(WEATHER, NEWS, CLOCK)) -> dict:
    return {"system": toolace_system(list(tools)), "conversations": [{"from": f, "value": v} for f, v in turns]}


TOOLACE_ROWS = [
    conversation(
        ("user", "What's the weather in Paris for the next 3 days?"),
        ("assistant", '[Get Weather(city="Paris", days=3)]'),
        ("tool", '[{"name": "Get Weather", "results": {"forecast": "sunny"}}]'),
        ("assistant", "It will be sunny in Paris."),
    ),
    conversation(
        ("user", "Find recent AI news, and tell me the time in UTC."),
        (
            "assistant",
            '[search_news(query="AI", tags=["tech", "science"], filters={"recent": true, "limit": 5}), '
            'time.now(zone="UTC")]',
        ),
    ),
    conversation(
        ("user", "What's the weather like?"),
        ("assistant", "Which city do you mean?"),
        ("user", "Oslo."),
        ("assistant", "[Get Weather(city='Oslo')]"),
    ),
    conversation(("user", "Tell me a joke."), ("assistant", "Why did the function return early? It had no args.")),
    # Skipped: no tool list, an unquoted argument, a positional argument, an unlisted function, a repeated request,
    # an unknown role
    {"system": "You can use some tools.", "conversations": [{"from": "user", "value": "Hi"}]},
    conversation(("user", "News about robots?"), ("assistant", "[search_news(query=robots)]")),
    conversation(("user", "Weather in Rome?"), ("assistant", '[Get Weather("Rome")]')),
    conversation(("user", "Delete my files."), ("assistant", "[delete_files(confirm=True)]")),
    conversation(("user", "Hello"), ("function", "{}")),
]
TOOLACE_ROWS.append(TOOLACE_ROWS[0])  # a repeat: whichever copy comes first is kept, the other skipped
EXPECTED_CALLS = {
    "What's the weather in Paris for the next 3 days?": [
        {"name": "Get Weather", "arguments": {"city": "Paris", "days": 3}}
    ],
    "Find recent AI news, and tell me the time in UTC.": [
        {
            "name": "search_news",
            "arguments": {"query": "AI", "tags": ["tech", "science"], "filters": {"recent": True, "limit": 5}},
        },
        {"name": "time.now", "arguments": {"zone": "UTC"}},
    ],
    "What's the weather like?": [{"name": "Get Weather", "arguments": {"city": "Oslo"}}],
}
EXPECTED_SKIPPED = {
    "tool list not readable from the system text": 1,
    "assistant function call not readable": 2,
    "call to a function not in the tool list": 1,
    "first user turn repeats an earlier conversation's": 1,
    "turn with a role other than user, assistant or tool": 1,
}


@pytest.fixture(scope="module")
def toolace_source(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toolace") / "toolace.json"
    path.write_text(json.dumps(TOOLACE_ROWS))  # the hub's file is one JSON list too
    return str(path)


def test_toolace_rl_prompts_parse_calls_exactly(toolace_source, tmp_path):
    output_dir = tmp_path / "out"
    run_script(
        "toolace",
        tmp_path,
        *("--dataset", toolace_source, "--output_dir", str(output_dir), "--num_sft", "0", "--num_rl", "10"),
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["skipped"] == EXPECTED_SKIPPED
    assert summary["rl"] == {"kept": 3, "rejected": {"no assistant turn that calls a function": 1}}

    rl = read_jsonl(output_dir / "rl_prompts.jsonl")
    assert all(set(example) == {"prompt", "reference_calls"} for example in rl)
    assert {user_text(example["prompt"]): json.loads(example["reference_calls"]) for example in rl} == EXPECTED_CALLS
    for example in rl:
        system = example["prompt"][0]
        assert system["role"] == "system" and json.dumps(WEATHER) in system["content"]
        assert example["prompt"][-1]["role"] == "user"
    oslo = next(example for example in rl if user_text(example["prompt"]) == "What's the weather like?")
    assert [message["role"] for message in oslo["prompt"]] == ["system", "user", "assistant", "user"]

    # The calls written as the system prompt asks (a JSON list) score full marks
    completions = [[{"role": "assistant", "content": json.dumps(json.loads(e["reference_calls"]))}] for e in rl]
    assert tool_call_reward(completions, [example["reference_calls"] for example in rl]) == [1.0] * len(rl)


def test_toolace_split_is_disjoint_and_experts_load(toolace_source, tmp_path, tiny_tokenizer):
    output_dir = tmp_path / "out"
    stdout = run_script(
        "toolace",
        tmp_path,
        *("--dataset", toolace_source, "--output_dir", str(output_dir), "--num_sft", "2", "--num_rl", "1"),
    )
    assert "Expert conversations: 2 of 2 wanted." in stdout and "RL prompts: 1 of 1 wanted." in stdout
    expert = read_jsonl(output_dir / "expert_conversations.jsonl")
    rl = read_jsonl(output_dir / "rl_prompts.jsonl")
    assert len(expert) == 2 and len(rl) == 1 and all(set(example) == {"messages"} for example in expert)
    expert_requests = {user_text(example["messages"]) for example in expert}
    assert not expert_requests & {user_text(example["prompt"]) for example in rl}

    for example in expert:
        roles = [message["role"] for message in example["messages"]]
        assert roles[0] == "system" and set(roles[1:]) <= {"user", "assistant", "tool"}
        # An assistant call turn is rewritten as the JSON calls that `tool_call_reward` scores 1.0
        expected = EXPECTED_CALLS.get(user_text(example["messages"]))
        call_turns = [m["content"] for m in example["messages"] if m["role"] == "assistant" and m["content"][0] == "["]
        if expected is not None:
            assert json.loads(call_turns[0]) == expected
            assert tool_call_reward([call_turns[0]], [json.dumps(expected)]) == [1.0]

    expert_dataset = load_dataset("json", data_files=str(output_dir / "expert_conversations.jsonl"), split="train")
    assert len(prepare_expert_dataset(expert_dataset, tiny_tokenizer, max_length=4096)) == 2


# --------------------------------------------------------------------------------------------------------------------
# Geometry3K (vision-language)


def diagram(color: tuple[int, int, int], image_format: str) -> dict:
    """An image as a dataset stores it: encoded bytes."""
    from tiny_vlms import solid_image

    buffer = io.BytesIO()
    solid_image(color, noise_seed=sum(color)).save(buffer, format=image_format)
    return {"bytes": buffer.getvalue(), "path": None}


GEOMETRY_ROWS = [
    {"images": [diagram((200, 0, 0), "PNG")], "problem": "<image>Find x.", "answer": "3"},
    {"images": [diagram((0, 200, 0), "JPEG")], "problem": "<image>In the figure, find the angle ABC.", "answer": "60"},
    {"images": [diagram((0, 0, 200), "PNG")], "problem": "<image> Find  x.", "answer": "3"},  # x again
    {"images": [], "problem": "Find y.", "answer": "2"},
    {"images": [diagram((90, 90, 0), "PNG")], "problem": "<image>Find z.", "answer": ""},
]
GEOMETRY_SOLUTIONS = [
    {"images": [diagram((0, 90, 90), "JPEG")], "problem": "<image>Find the area.", "response": "6 * 2 = \\boxed{12}"},
    {"images": [diagram((200, 0, 0), "PNG")], "problem": "<image>Find x.", "response": "So \\boxed{3}"},
    {"images": [diagram((9, 9, 9), "PNG")], "problem": "<image>Find r.", "response": ""},
]


def image_parquet(path, rows: list[dict]) -> str:
    from datasets import Dataset, Image, Sequence

    Dataset.from_list(rows).cast_column("images", Sequence(Image())).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def geometry_dir(tmp_path_factory):
    """The script's output on local files in Geometry3K's layout and Trinity-RFT's SFT layout."""
    folder = tmp_path_factory.mktemp("geometry3k")
    run_script(
        "geometry3k",
        folder,
        *("--dataset", image_parquet(folder / "geometry3k.parquet", GEOMETRY_ROWS)),
        *("--expert_dataset", image_parquet(folder / "solutions.parquet", GEOMETRY_SOLUTIONS)),
        *("--output_dir", str(folder / "out")),
    )
    return folder / "out"


def test_geometry3k_vision_sets_are_disjoint_and_keep_their_images_as_stored(geometry_dir):
    summary = json.loads((geometry_dir / "summary.json").read_text())
    assert summary["rl"] == {"kept": 2, "rejected": {"duplicate problem": 1, "no image": 1, "no answer": 1}}
    assert summary["expert"] == {"kept": 1, "rejected": {"also an RL prompt": 1, "no solution": 1}}

    rl = load_dataset("parquet", data_files=str(geometry_dir / "rl_prompts.parquet"), split="train")
    expert = load_dataset("parquet", data_files=str(geometry_dir / "expert_solutions.parquet"), split="train")
    instruction = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert [row["prompt"] for row in rl] == [
        [{"role": "user", "content": "Find x." + instruction}],
        [{"role": "user", "content": "In the figure, find the angle ABC." + instruction}],
    ]
    assert rl["solution"] == ["3", "60"]
    assert expert[0]["prompt"] == [{"role": "user", "content": "Find the area." + instruction}]
    assert expert[0]["completion"] == [{"role": "assistant", "content": "6 * 2 = \\boxed{12}"}]
    # The images are images again, with the very bytes of the source: the JPEG is not re-compressed
    from datasets import Image, Sequence

    assert rl.features["images"].feature == Image() and expert.features["images"].feature == Image()
    stored = rl.cast_column("images", Sequence(Image(decode=False)))["images"]
    assert [images[0]["bytes"] for images in stored] == [GEOMETRY_ROWS[i]["images"][0]["bytes"] for i in (0, 1)]
    assert math_accuracy_reward(["\\boxed{3}", "\\boxed{60}"], solution=rl["solution"]) == [1.0, 1.0]


def test_geometry3k_vision_recipe_trains_a_vlm_on_the_prepared_files(geometry_dir, tmp_path):
    """`trl-chord` with a (tiny, local) vision-language model and the script's output: its processor is loaded, the
    RL prompts' and the experts' images reach the model."""
    from tiny_vlms import build_vlm

    model, processor = build_vlm("llava", tmp_path / "tokenizer")
    model_dir = tmp_path / "tiny-llava"
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    output_dir = tmp_path / "run"
    command = [
        os.path.join(os.path.dirname(sys.executable), "trl-chord"),
        *("--model_name_or_path", str(model_dir), "--output_dir", str(output_dir)),
        *("--dataset_name", str(geometry_dir / "rl_prompts.parquet")),
        *("--chord_sft_dataset", str(geometry_dir / "expert_solutions.parquet")),
        *("--reward_funcs", "math_accuracy_reward", "--chord_mu_valley", "0.5", "--max_steps", "2"),
        *("--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8"),
        *("--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--bf16", "false"),
    ]
    completed = run_bounded(command, timeout=600)
    assert completed.returncode == 0, completed.stderr[-5000:]
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in entries if "chord/expert_nll" in entry]
    assert len(steps) == 2 and all(entry["chord/expert_tokens"] > 0 and "chord/grpo_loss" in entry for entry in steps)
