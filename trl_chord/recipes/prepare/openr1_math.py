r"""Build CHORD's math data from OpenR1-Math-220k: an expert SFT set of R1 solutions and a disjoint RL prompt set.

The paper trains Qwen2.5-7B-Instruct on 5k expert solutions (DeepSeek-R1 generations from OpenR1-Math-220k) and 20k
RL prompts, with no problem in both. Its exact split was never released; this script draws one reproducibly. The
paper's sizes, with expert solutions capped at its 16k-token response limit in the policy's tokens:

```bash
trl-chord prepare openr1_math --dataset open-r1/OpenR1-Math-220k --split train \
    --output_dir data/openr1-math --num_sft 5000 --num_rl 20000 --seed 42 \
    --tokenizer Qwen/Qwen2.5-7B-Instruct --max_expert_tokens 16384
```

The rows are shuffled with `--seed` and read in that order; a problem seen before (same text up to whitespace) is
dropped. While the expert set is short of `--num_sft`, a row goes there if it has an expert solution: its first
generation that math-verify marked correct (`correctness_math_verify`), whose reasoning is complete
(`is_reasoning_complete`, when the column exists) and that fits in `--max_expert_tokens`; with `--reverify`, its last
`\boxed{}` answer must also match `answer` when math-verify checks it here. Otherwise the row goes to the RL set while
that is short of `--num_rl`, if its `answer` can be checked (not empty, not "proof" or "notfound").

Outputs, in `--output_dir`:

- `expert_solutions.jsonl`: `prompt` ([user message]) and `completion` ([assistant message]), conversational; the
  `expert_dataset` of `ChordTrainer`.
- `rl_prompts.jsonl`: `prompt` ([user message]) and `solution` (the reference answer, which
  `trl_chord.rewards.math_accuracy_reward` reads); the `train_dataset`.
- `luffy_prompts.jsonl`, with `--luffy`: the RL prompts of LUFFY (`math_luffy`), on the same problems and expert
  solutions as the two sets above: every problem of both sets, each with `prompt`, `solution` and
  `expert_completion`, the expert set's solution ([assistant message]) for its problems and `null` for the RL set's
  (LUFFY trains those groups on rollouts alone). An expert problem whose `answer` cannot be checked is left out.
  With `--num_rl 0` every prompt has an expert solution, as in the LUFFY authors' own data.
- `summary.json`: the arguments and the counts of kept and dropped rows, by reason (also printed).

Every set also carries the source row's `uuid` and `source`, so the split can be traced back.
"""

import argparse
from collections import Counter

from datasets import Dataset
from tqdm import tqdm

from trl_chord.recipes.data_files import format_counts, load_dataset_file_or_hub
from trl_chord.recipes.prepare import check_sizes, preparation_parser, write_outputs


BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
UNCHECKABLE_ANSWERS = {"", "proof", "notfound"}  # OpenR1's placeholders for problems without a final answer
PROVENANCE_COLUMNS = ("uuid", "source")
COLUMNS_READ = ("problem", "answer", "generations", "correctness_math_verify", "is_reasoning_complete")

NO_VERIFIED_GENERATION = "no generation marked correct with complete reasoning"
FAILED_REVERIFY = "no marked-correct generation passed the math-verify re-check"
NO_CHECKABLE_ANSWER = "no checkable answer"
DUPLICATE_PROBLEM = "duplicate problem"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preparation_parser(
        "openr1_math",
        __doc__,
        num_sft=(5000, "Expert examples to keep (paper: 5000)."),
        num_rl=(20000, "RL prompts to keep (paper: 20000)."),
        dataset="open-r1/OpenR1-Math-220k",
    )
    parser.add_argument(
        "--tokenizer", help="Hub id or local path of the policy's tokenizer; --max_expert_tokens counts its tokens."
    )
    parser.add_argument(
        "--max_expert_tokens",
        type=int,
        help="Longest expert solution kept, in --tokenizer tokens of the completion text (the paper's response "
        "limit: 16384). A longer generation is passed over for the row's next correct one. Default: no limit.",
    )
    parser.add_argument(
        "--reverify",
        action="store_true",
        help="Also re-check each expert solution's last \\boxed{} answer against `answer` with math-verify.",
    )
    parser.add_argument(
        "--luffy",
        action="store_true",
        help="Also write luffy_prompts.jsonl: both sets' problems as LUFFY's RL prompts, with the expert solution "
        "in an `expert_completion` column (null for the RL set's problems).",
    )
    args = parser.parse_args(argv)
    if (args.tokenizer is None) != (args.max_expert_tokens is None):
        parser.error("--tokenizer and --max_expert_tokens go together: the limit is counted in that tokenizer.")
    check_sizes(parser, args)
    return args


def user_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem}\n\n{BOXED_INSTRUCTION}"}]


def problem_key(problem: str) -> str:
    return " ".join(problem.split())


class ExpertPicker:
    """Chooses a row's expert solution, applying the length limit and the optional math-verify re-check."""

    def __init__(self, tokenizer_name: str | None, max_tokens: int | None, reverify: bool):
        self.max_tokens = max_tokens
        self.tokenizer = None
        if tokenizer_name is not None:
            from transformers import AutoTokenizer  # imported only when needed: it is slow to import

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        self.reward = None
        if reverify:
            from trl_chord.rewards import CORRECT_REWARD, math_accuracy_reward  # imported only when needed: slow

            self.reward, self.correct_reward = math_accuracy_reward, CORRECT_REWARD

    def marked_correct(self, row: dict) -> list[str]:
        """The generations math-verify marked correct whose reasoning is complete (when the dataset says)."""
        correct = row.get("correctness_math_verify") or []
        complete = row.get("is_reasoning_complete") or [True] * len(correct)
        return [text for text, right, done in zip(row.get("generations") or [], correct, complete) if right and done]

    def fits(self, text: str) -> bool:
        if self.tokenizer is None:
            return True
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= self.max_tokens

    def passes_reverify(self, text: str, answer: str) -> bool:
        return self.reward is None or self.reward([text], solution=[answer])[0] == self.correct_reward

    def pick(self, row: dict) -> tuple[str | None, str]:
        """The first usable generation, or `None` and the reason there is none."""
        candidates = self.marked_correct(row)
        if not candidates:
            return None, NO_VERIFIED_GENERATION
        any_fits = False
        for text in candidates:  # lazily: tokenizing and re-verifying cost time
            if not self.fits(text):
                continue
            any_fits = True
            if self.passes_reverify(text, row["answer"]):
                return text, ""
        if not any_fits:
            return None, f"every marked-correct generation longer than {self.max_tokens} tokens"
        return None, FAILED_REVERIFY


def has_checkable_answer(row: dict) -> bool:
    answer = row.get("answer")
    return isinstance(answer, str) and answer.strip().lower() not in UNCHECKABLE_ANSWERS


def provenance(row: dict) -> dict:
    return {column: row[column] for column in PROVENANCE_COLUMNS if column in row}


def split_rows(rows: Dataset, args: argparse.Namespace, picker: ExpertPicker) -> tuple[list, list, list, dict]:
    """The expert examples, the RL examples, LUFFY's prompts (with `--luffy`) and the counts, from rows already in
    their shuffled order."""
    expert, rl, luffy = [], [], []
    counts = {
        "expert_rejected": Counter(),
        "rl_rejected": Counter(),
        "luffy_rejected": Counter(),
        "dropped": Counter(),
        "unused": 0,
    }
    seen_problems = set()
    for row in tqdm(rows, desc="Splitting problems", unit=" problems"):
        if len(expert) >= args.num_sft and len(rl) >= args.num_rl:
            break
        key = problem_key(row["problem"])
        if key in seen_problems:
            counts["dropped"][DUPLICATE_PROBLEM] += 1
            continue
        seen_problems.add(key)
        if len(expert) < args.num_sft:
            generation, reason = picker.pick(row)
            if generation is not None:
                completion = [{"role": "assistant", "content": generation}]
                expert.append({"prompt": user_prompt(row["problem"]), "completion": completion, **provenance(row)})
                if not args.luffy:
                    continue
                if has_checkable_answer(row):
                    luffy.append(luffy_prompt(row, completion))
                else:
                    counts["luffy_rejected"][f"expert problem with {NO_CHECKABLE_ANSWER}"] += 1
                continue
            counts["expert_rejected"][reason] += 1
        if len(rl) >= args.num_rl:
            counts["unused"] += 1
        elif has_checkable_answer(row):
            rl.append({"prompt": user_prompt(row["problem"]), "solution": row["answer"].strip(), **provenance(row)})
            if args.luffy:
                luffy.append(luffy_prompt(row, None))
        else:
            counts["rl_rejected"][NO_CHECKABLE_ANSWER] += 1
    return expert, rl, luffy, counts


def luffy_prompt(row: dict, completion: list | None) -> dict:
    """A LUFFY RL prompt: the problem, its reference answer and its expert solution (`None` if it has none)."""
    solution = {"solution": row["answer"].strip(), "expert_completion": completion}
    return {"prompt": user_prompt(row["problem"]), **solution, **provenance(row)}


def report(expert: list, rl: list, luffy: list, counts: dict, args: argparse.Namespace) -> dict:
    """Print the counts, warn about a set left short, and return them for `summary.json`."""
    print(f"Expert SFT set: {len(expert)} of {args.num_sft} wanted.")
    print(f"  Rows not usable as experts: {format_counts(counts['expert_rejected'])}.")
    print(f"RL prompt set: {len(rl)} of {args.num_rl} wanted.")
    print(f"  Rows not usable for RL: {format_counts(counts['rl_rejected'])}.")
    if args.luffy:
        with_expert = sum(example["expert_completion"] is not None for example in luffy)
        print(f"LUFFY prompts: {len(luffy)}, {with_expert} with an expert solution.")
        print(f"  Problems left out: {format_counts(counts['luffy_rejected'])}.")
    print(f"Dropped: {format_counts(counts['dropped'])}. Rows left over once a set was full: {counts['unused']}.")
    if len(expert) < args.num_sft or len(rl) < args.num_rl:
        print("WARNING: the dataset ran out of usable rows before both sets were full.")
    summary = {
        "args": vars(args),
        "expert": {"kept": len(expert), "rejected": dict(counts["expert_rejected"])},
        "rl": {"kept": len(rl), "rejected": dict(counts["rl_rejected"])},
        "dropped": dict(counts["dropped"]),
        "unused": counts["unused"],
    }
    if args.luffy:
        summary["luffy"] = {
            "kept": len(luffy),
            "with_expert": sum(example["expert_completion"] is not None for example in luffy),
            "rejected": dict(counts["luffy_rejected"]),
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    picker = ExpertPicker(args.tokenizer, args.max_expert_tokens, args.reverify)
    rows = load_dataset_file_or_hub(args.dataset, split=args.split)
    # Reading fewer columns row by row is faster: OpenR1 also holds each problem's generations a second time
    rows = rows.select_columns([column for column in COLUMNS_READ + PROVENANCE_COLUMNS if column in rows.column_names])
    expert, rl, luffy, counts = split_rows(rows.shuffle(seed=args.seed), args, picker)
    sets = {"expert_solutions.jsonl": expert, "rl_prompts.jsonl": rl}
    if args.luffy:
        sets["luffy_prompts.jsonl"] = luffy
    write_outputs(args.output_dir, sets, report(expert, rl, luffy, counts, args))
