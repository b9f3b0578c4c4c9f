r"""Build CHORD's tool-use data from ToolACE: expert conversations and a disjoint set of RL function-call prompts.

The paper trains Llama-3.2-3B-Instruct on 500 expert conversations and 5k RL prompts from ToolACE. Its exact split
was never released; this script draws one reproducibly, with the paper's sizes:

```bash
trl-chord prepare toolace --dataset Team-ACE/ToolACE --split train \
    --output_dir data/toolace --num_sft 500 --num_rl 5000 --seed 42
```

ToolACE rows have a `system` text, which holds the tool list as JSON, and `conversations` (`{"from", "value"}`
turns by "user", "assistant" and "tool"), where the assistant calls functions in Python syntax,
`[get_weather(city="Paris", days=3)]`. `trl_chord.rewards.tool_call_reward` reads calls written as JSON, so both sets
are rewritten to one JSON format, and the expert demonstrations teach the format the reward scores:

- the system message is replaced by a fixed instruction, with the row's tool list as JSON and the call format,
  `[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]`;
- each assistant call turn is rewritten in that format. Calls are read with Python's `ast` module (the text is
  parsed, never run); argument values must be literals (`true`/`false`/`null` are read as JSON's).

The tool list sits in the system message rather than in a `tools` column because TRL's `GRPOTrainer` renders no
per-example tools, so this way the RL prompts and the expert conversations put the tools in the same place.

The rows are shuffled with `--seed`. A row is skipped when its tool list cannot be read, a turn has another role,
it has no user turn, its first user turn repeats an earlier row's, or an assistant call cannot be read or calls a
function not in its list. The first `--num_sft` usable conversations become experts; after them, conversations with
a function call become RL prompts, up to `--num_rl`, so no conversation is in both.

Outputs, in `--output_dir`:

- `expert_conversations.jsonl`: `messages` (system, user, assistant and tool turns); `ChordTrainer` trains every
  assistant turn. The `expert_dataset`.
- `rl_prompts.jsonl`: `prompt` (the messages before the conversation's first assistant turn that calls functions)
  and `reference_calls` (that turn's calls, a JSON string list of `{"name", "arguments"}`, which `tool_call_reward`
  reads). The `train_dataset`.
- `summary.json`: the arguments and the counts of kept and skipped rows, by reason (also printed).
"""

import argparse
import ast
import json
import re
from collections import Counter

from datasets import Dataset
from tqdm import tqdm

from trl_chord.recipes.data_files import format_counts, load_dataset_file_or_hub
from trl_chord.recipes.prepare import check_sizes, preparation_parser, write_outputs


ROLES = {"user", "assistant", "tool"}
JSON_LITERALS = {"true": True, "false": False, "null": None}
ALIAS_PREFIX = "_chord_tool_alias_"  # stands in for tool names that are not Python identifiers ("Get Weather")

SYSTEM_PROMPT = (
    "You are an assistant that can call functions. These are the functions you may call, as JSON schemas:\n"
    "{tools}\n\n"
    "To call functions, reply with only a JSON list of the calls and no other text, in this format:\n"
    '[{{"name": "function_name", "arguments": {{"argument_name": "value"}}}}]\n'
    "If no function fits the request, or a required argument is missing, say so in plain text."
)

UNREADABLE_TOOLS = "tool list not readable from the system text"
OTHER_ROLE = "turn with a role other than user, assistant or tool"
UNREADABLE_CALL = "assistant function call not readable"
UNLISTED_FUNCTION = "call to a function not in the tool list"
NO_USER_TURN = "no user turn"
DUPLICATE = "first user turn repeats an earlier conversation's"
NO_FUNCTION_CALL = "no assistant turn that calls a function"


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason counted in the summary."""


class CallParseError(SkipRow):
    """An assistant turn that looks like function calls but cannot be read as such."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preparation_parser(
        "toolace",
        __doc__,
        num_sft=(500, "Expert conversations to keep (paper: 500)."),
        num_rl=(5000, "RL prompts to keep (paper: 5000)."),
        dataset="Team-ACE/ToolACE",
    )
    args = parser.parse_args(argv)
    check_sizes(parser, args)
    return args


# --------------------------------------------------------------------------------------------------------------------
# Tool lists


def is_tool_list(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(tool, dict) and isinstance(tool.get("name"), str) and tool["name"] for tool in value)
    )


def parse_tools(system: str) -> list[dict] | None:
    """The first JSON list of `{"name": ...}` objects in the system text, or `None` if there is none."""
    decoder = json.JSONDecoder()
    start = system.find("[")
    while start >= 0:  # the preamble may hold other brackets, such as the call-format example
        try:
            value, _ = decoder.raw_decode(system, start)
        except ValueError:
            value = None
        if is_tool_list(value):
            return value
        start = system.find("[", start + 1)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Function calls in Python syntax


def looks_like_calls(text: str) -> bool:
    text = text.strip()
    return text.startswith("[") and text.endswith("]")


def alias_tool_names(text: str, names: list[str]) -> tuple[str, dict[str, str]]:
    """The text with each `name(` replaced by an identifier `ast` can parse, and the map back to the names."""
    ordered = sorted(set(names), key=len, reverse=True)  # longest first: "Get Weather Now(" is not "Get Weather"
    alias_of = {name: f"{ALIAS_PREFIX}{index}" for index, name in enumerate(ordered)}
    call_start = re.compile("(?:" + "|".join(re.escape(name) for name in ordered) + r")(?=\()")
    aliased = call_start.sub(lambda match: alias_of[match.group(0)], text)  # one pass: aliases are never re-matched
    return aliased, {alias: name for name, alias in alias_of.items()}


class _JsonLiterals(ast.NodeTransformer):
    """Turns the bare names `true`, `false` and `null` into constants, so `literal_eval` accepts them."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in JSON_LITERALS:
            return ast.copy_location(ast.Constant(JSON_LITERALS[node.id]), node)
        return node


def argument_value(node: ast.expr):
    """A call argument's literal value, as the JSON value it round-trips to (tuples become lists)."""
    try:
        value = ast.literal_eval(_JsonLiterals().visit(node))
        return json.loads(json.dumps(value, allow_nan=False))
    except (ValueError, TypeError, SyntaxError, RecursionError) as error:
        raise CallParseError(UNREADABLE_CALL) from error  # not a literal, or not a JSON value


def parse_call(node: ast.expr, aliases: dict[str, str]) -> dict:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise CallParseError(UNREADABLE_CALL)
    if node.args or any(keyword.arg is None for keyword in node.keywords):
        raise CallParseError(UNREADABLE_CALL)  # only keyword arguments name their parameters
    name = aliases.get(node.func.id)
    if name is None:
        raise CallParseError(UNLISTED_FUNCTION)
    arguments = {keyword.arg: argument_value(keyword.value) for keyword in node.keywords}
    if ALIAS_PREFIX in json.dumps(arguments):  # a tool name followed by "(" inside a string argument
        raise CallParseError(UNREADABLE_CALL)
    return {"name": name, "arguments": arguments}


def parse_python_calls(text: str, tool_names: list[str]) -> list[dict]:
    """`[f(a=1, b="x"), g()]` as `[{"name": "f", "arguments": {"a": 1, "b": "x"}}, {"name": "g", ...}]`.

    Only functions in `tool_names` may be called. The text is parsed with `ast`, never evaluated; raises
    `CallParseError` when it is not a list of calls with literal keyword arguments.
    """
    aliased, aliases = alias_tool_names(text.strip(), tool_names)
    try:
        tree = ast.parse(aliased, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as error:
        raise CallParseError(UNREADABLE_CALL) from error
    if not isinstance(tree.body, ast.List):
        raise CallParseError(UNREADABLE_CALL)
    return [parse_call(node, aliases) for node in tree.body.elts]


# --------------------------------------------------------------------------------------------------------------------
# Conversations


def conversation_key(messages: list[dict]) -> str | None:
    """The first user turn, whitespace-normalised: conversations that share it are the same request."""
    first_user = next((message["content"] for message in messages if message["role"] == "user"), None)
    return None if first_user is None else " ".join(first_user.split())


def build_messages(row: dict) -> tuple[list[dict], list[list[dict] | None]]:
    """The row's messages with our system message and JSON calls, and per message its calls (`None`: no call).

    Raises `SkipRow` with the reason when the row cannot be used.
    """
    tools = parse_tools(row["system"] or "")
    if tools is None:
        raise SkipRow(UNREADABLE_TOOLS)
    tool_names = [tool["name"] for tool in tools]
    messages = [{"role": "system", "content": SYSTEM_PROMPT.format(tools=json.dumps(tools, ensure_ascii=False))}]
    calls_per_message = [None]
    for turn in row["conversations"]:
        if turn["from"] not in ROLES:
            raise SkipRow(OTHER_ROLE)
        calls = None
        content = turn["value"]
        if turn["from"] == "assistant" and looks_like_calls(content):
            calls = parse_python_calls(content, tool_names)
            content = json.dumps(calls, ensure_ascii=False)
        messages.append({"role": turn["from"], "content": content})
        calls_per_message.append(calls)
    return messages, calls_per_message


def rl_example(messages: list[dict], calls_per_message: list) -> dict | None:
    """The prompt up to the first assistant turn that calls functions, and its calls; `None` without one."""
    for index, calls in enumerate(calls_per_message):
        if calls:
            return {"prompt": messages[:index], "reference_calls": json.dumps(calls, ensure_ascii=False)}
    return None


def split_rows(rows: Dataset, args: argparse.Namespace) -> tuple[list, list, dict]:
    """The expert conversations, the RL examples and the counts, from rows already in their shuffled order."""
    expert, rl = [], []
    counts = {"skipped": Counter(), "rl_rejected": Counter(), "unused": 0}
    seen_keys = set()
    for row in tqdm(rows, desc="Splitting conversations", unit=" conversations"):
        if len(expert) >= args.num_sft and len(rl) >= args.num_rl:
            break
        try:
            messages, calls_per_message = build_messages(row)
        except SkipRow as reason:
            counts["skipped"][str(reason)] += 1
            continue
        key = conversation_key(messages)
        if key is None or key in seen_keys:
            counts["skipped"][NO_USER_TURN if key is None else DUPLICATE] += 1
            continue
        seen_keys.add(key)
        if len(expert) < args.num_sft:
            expert.append({"messages": messages})
        elif len(rl) >= args.num_rl:
            counts["unused"] += 1
        elif (example := rl_example(messages, calls_per_message)) is not None:
            rl.append(example)
        else:
            counts["rl_rejected"][NO_FUNCTION_CALL] += 1
    return expert, rl, counts


def report(expert: list, rl: list, counts: dict, args: argparse.Namespace) -> dict:
    """Print the counts, warn about a set left short, and return them for `summary.json`."""
    print(f"Expert conversations: {len(expert)} of {args.num_sft} wanted.")
    print(f"RL prompts: {len(rl)} of {args.num_rl} wanted.")
    print(f"  Conversations not usable for RL: {format_counts(counts['rl_rejected'])}.")
    print(f"Skipped: {format_counts(counts['skipped'])}. Left over once both sets were full: {counts['unused']}.")
    if len(expert) < args.num_sft or len(rl) < args.num_rl:
        print("WARNING: the dataset ran out of usable conversations before both sets were full.")
    return {
        "args": vars(args),
        "expert": {"kept": len(expert)},
        "rl": {"kept": len(rl), "rejected": dict(counts["rl_rejected"])},
        "skipped": dict(counts["skipped"]),
        "unused": counts["unused"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = load_dataset_file_or_hub(args.dataset, split=args.split).shuffle(seed=args.seed)
    expert, rl, counts = split_rows(rows, args)
    sets = {"expert_conversations.jsonl": expert, "rl_prompts.jsonl": rl}
    write_outputs(args.output_dir, sets, report(expert, rl, counts, args))
