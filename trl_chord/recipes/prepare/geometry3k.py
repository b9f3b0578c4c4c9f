r"""Build CHORD's vision-language data for Geometry3K: RL prompts with their diagrams, expert solutions with theirs.

Trinity-RFT's `mix_vlm` example runs CHORD on Qwen2.5-VL with Geometry3K (`hiyouga/geometry3k`: a diagram, a problem,
a short answer) for the RL prompts, and expert solutions that a larger model (Qwen2.5-VL-32B-Instruct there) wrote for
problems of another split. Geometry3K itself has answers, not worked solutions, so the expert solutions come from a
second dataset in Trinity-RFT's SFT layout: `problem`, `response` (the worked solution) and `images`.

```bash
trl-chord prepare geometry3k --dataset hiyouga/geometry3k --rl_split train \
    --expert_dataset my-org/geometry3k-validation-solutions --expert_split train \
    --output_dir data/geometry3k --num_rl 2000 --num_sft 300
```

Each problem's `<image>` marker is dropped from its text: TRL puts the images before the user message's text, for the
RL prompts and the expert examples alike, and the marker would otherwise reach the tokenizer as text (or, for a
LLaVA-style tokenizer, as an image token with no image). A problem seen before (same text up to whitespace) is dropped,
and an expert problem that is also an RL prompt is dropped from the expert set, so the two sets are disjoint.

Outputs, in `--output_dir`, as Parquet files that keep the images (PNG or JPEG bytes, as the source had them):

- `expert_solutions.parquet`: `prompt` ([user message]), `completion` ([assistant message]) and `images`; the
  `expert_dataset` of `ChordTrainer` (`--chord_sft_dataset` of the recipe).
- `rl_prompts.parquet`: `prompt` ([user message]), `images` and `solution` (the answer, which
  `trl_chord.rewards.math_accuracy_reward` reads); the `train_dataset` (`--dataset_name`).
- `summary.json`: the arguments and the counts of kept and dropped rows, by reason (also printed).
"""

import argparse
from collections import Counter

from datasets import Dataset, Image, Sequence

from trl_chord.expert_data import without_image_decoding
from trl_chord.recipes.data_files import format_counts, load_dataset_file_or_hub
from trl_chord.recipes.prepare import preparation_parser, write_outputs


BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
IMAGE_MARKER = "<image>"

NO_IMAGE = "no image"
NO_ANSWER = "no answer"
NO_SOLUTION = "no solution"
DUPLICATE_PROBLEM = "duplicate problem"
ALSO_AN_RL_PROMPT = "also an RL prompt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preparation_parser(
        "geometry3k",
        __doc__,
        num_sft=(None, "Expert examples to keep (default: all)."),
        num_rl=(None, "RL prompts to keep (default: all)."),
    )
    parser.add_argument(
        "--dataset", default="hiyouga/geometry3k", help="RL problems: hub id, or a local .json/.jsonl/.parquet file."
    )
    parser.add_argument("--rl_split", default="train", help="Split of --dataset for the RL prompts (default: train).")
    parser.add_argument(
        "--expert_dataset",
        required=True,
        help="Expert solutions (`problem`, `response`, `images`): hub id, or a local .json/.jsonl/.parquet file.",
    )
    parser.add_argument("--expert_split", default="train", help="Split of --expert_dataset (default: train).")
    return parser.parse_args(argv)


def problem_text(problem: str) -> str:
    """The problem without its `<image>` markers, whitespace tidied."""
    return " ".join(problem.replace(IMAGE_MARKER, " ").split())


def user_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem_text(problem)}\n\n{BOXED_INSTRUCTION}"}]


def row_images(row: dict) -> list:
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    return list(images or [])


def select(rows: Dataset, limit: int | None, reason_of, seen: set, counts: Counter) -> list[int]:
    """Indices of the rows to keep, in order, up to `limit`: `reason_of(row)` is empty for a usable row."""
    kept = []
    for index, row in enumerate(rows):
        if limit is not None and len(kept) >= limit:
            break
        key = problem_text(row.get("problem") or "")
        reason = reason_of(row) or (DUPLICATE_PROBLEM if key in seen else "")
        if reason:
            counts[reason] += 1
            continue
        seen.add(key)
        kept.append(index)
    return kept


def rl_reason(row: dict) -> str:
    if not row_images(row):
        return NO_IMAGE
    return "" if str(row.get("answer") or "").strip() else NO_ANSWER


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The images are copied as stored, never decoded and encoded again (which would re-compress a JPEG)
    problems = without_image_decoding(load_dataset_file_or_hub(args.dataset, split=args.rl_split))
    solutions = without_image_decoding(load_dataset_file_or_hub(args.expert_dataset, split=args.expert_split))
    counts = {"rl": Counter(), "expert": Counter()}

    rl_problems = set()
    rl_indices = select(problems, args.num_rl, rl_reason, rl_problems, counts["rl"])

    def expert_reason(row: dict) -> str:
        if not row_images(row):
            return NO_IMAGE
        if not str(row.get("response") or "").strip():
            return NO_SOLUTION
        return ALSO_AN_RL_PROMPT if problem_text(row.get("problem") or "") in rl_problems else ""

    expert_indices = select(solutions, args.num_sft, expert_reason, set(), counts["expert"])

    rl = problems.select(rl_indices).map(
        lambda row: {"prompt": user_prompt(row["problem"]), "images": row_images(row), "solution": row["answer"]},
        remove_columns=problems.column_names,
    )
    expert = solutions.select(expert_indices).map(
        lambda row: {
            "prompt": user_prompt(row["problem"]),
            "completion": [{"role": "assistant", "content": row["response"]}],
            "images": row_images(row),
        },
        remove_columns=solutions.column_names,
    )
    # Stored as images again, so that the trainer (and `datasets`) read them as such
    rl, expert = (dataset.cast_column("images", Sequence(Image())) for dataset in (rl, expert))
    print(f"RL prompt set: {len(rl)} kept. Rows not used: {format_counts(counts['rl'])}.")
    print(f"Expert SFT set: {len(expert)} kept. Rows not used: {format_counts(counts['expert'])}.")
    summary = {
        "args": vars(args),
        "rl": {"kept": len(rl), "rejected": dict(counts["rl"])},
        "expert": {"kept": len(expert), "rejected": dict(counts["expert"])},
    }
    write_outputs(args.output_dir, {"expert_solutions.parquet": expert, "rl_prompts.parquet": rl}, summary)
