"""
The data of the paper configs, made from the public datasets: `trl-chord prepare NAME [options]` runs
`trl_chord.recipes.prepare.NAME.main` (`trl-chord prepare NAME --help` for its options).
"""

import argparse
import json
import os

from .. import CommandLineError


# Each preparer's module name and what it makes, listed without importing it (they import `datasets`)
PREPARERS = {
    "openr1_math": "OpenR1-Math-220k -> expert solutions and RL prompts (math_chord_mu, math_chord_phi, _lora); with "
    "--luffy, LUFFY's prompts with their expert solutions (math_luffy)",
    "toolace": "ToolACE -> expert conversations and RL prompts with reference calls (tool_chord_phi)",
    "geometry3k": "Geometry3K and expert solutions -> RL prompts and experts with their images (geometry_vlm_chord)",
}


def run_preparation(name: str, argv: list[str]) -> None:
    """`trl-chord prepare NAME ...`: the preparation's `main` on the options that follow its name."""
    if name == "openr1_math":
        from .openr1_math import main
    elif name == "toolace":
        from .toolace import main
    elif name == "geometry3k":
        from .geometry3k import main
    else:
        raise CommandLineError(f"no data preparation {name!r}; there are: {', '.join(PREPARERS)}.")
    main(argv)


def preparation_parser(name: str, doc: str, num_sft: tuple, num_rl: tuple, dataset: str | None = None):
    """
    The parser of `trl-chord prepare NAME`, with what every preparation has: `--output_dir`, `--num_sft` and `--num_rl`
    (each a default and its help); with a `dataset` to split, `--dataset`, `--split` and `--seed` of the shuffle.
    """
    parser = argparse.ArgumentParser(
        prog=f"trl-chord prepare {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if dataset is not None:
        parser.add_argument("--dataset", default=dataset, help="Hub id, or a local .json/.jsonl/.parquet file.")
        parser.add_argument("--split", default="train", help="Split to read (default: train).")
    parser.add_argument("--output_dir", required=True, help="Folder for the output files (created if missing).")
    parser.add_argument("--num_sft", type=int, default=num_sft[0], help=num_sft[1])
    parser.add_argument("--num_rl", type=int, default=num_rl[0], help=num_rl[1])
    if dataset is not None:
        parser.add_argument("--seed", type=int, default=42, help="Seed of the shuffle that decides the split.")
    return parser


def check_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_sft < 0 or args.num_rl < 0:
        parser.error("--num_sft and --num_rl must not be negative.")


def write_outputs(output_dir: str, outputs: dict, summary: dict) -> None:
    """The sets (`.jsonl`: lists of rows, `.parquet`: datasets) and `summary.json` (the arguments and the counts, also
    printed) in `output_dir`."""
    from ..data_files import write_jsonl  # `datasets` is imported for a preparation only

    os.makedirs(output_dir, exist_ok=True)
    for name, rows in outputs.items():
        path = os.path.join(output_dir, name)
        rows.to_parquet(path) if name.endswith(".parquet") else write_jsonl(path, rows)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    print(f"Wrote {output_dir}/{', '.join(outputs)} and summary.json.")
