"""
`trl-chord`: the CHORD recipe from an installed package.

    trl-chord --config demo                  # the built-in demo; any recipe option is a flag
    trl-chord --config my_run.yaml --max_steps 100
    trl-chord configs                        # every shipped config and its path
    trl-chord configs accelerate/zero3       # the path of one, e.g. for `accelerate launch --config_file`
    trl-chord prepare                        # the data preparations of the paper configs
    trl-chord prepare toolace --output_dir data/toolace
    trl-chord sft-best-rl --config demo_sft_best_rl   # SFT, its best held-out checkpoint, then GRPO or RLOO from it

Multi-process: `accelerate launch [--config_file ...] -m trl_chord.cli --config ...`.
"""

import logging
import sys

from .recipes import CommandLineError, config_path, shipped_configs
from .recipes.prepare import PREPARERS, run_preparation


def list_configs(args: list[str]) -> None:
    if len(args) > 1:
        raise CommandLineError(f"`trl-chord configs` takes at most one config name, got {' '.join(args)}.")
    if args:
        print(config_path(args[0]))
        return
    for name, path in shipped_configs().items():
        print(f"{name:<28}{path}")


def prepare(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print("usage: trl-chord prepare NAME [--help | OPTIONS]\n\nData preparations (NAME):")
        for name, what in PREPARERS.items():
            print(f"  {name:<14}{what}")
        return
    run_preparation(args[0], args[1:])


def drop_bitsandbytes_cpu_kernel_notice() -> None:
    """
    peft imports bitsandbytes whenever it is installed (the `test` extra installs it), and on a CPU with AVX512-BF16
    its CPU backend logs at import that it could not load an optional 4-bit kernel from the hub (`kernels` package),
    then uses its own. That line, printed by every command whether anything is quantized or not, is dropped; the
    logger's other messages are kept.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
    )


def train(args: list[str]) -> None:
    # Imported here, so that listing the configs and the preparations does not wait for torch and TRL
    from .recipes.chord import main as run_recipe
    from .recipes.chord import parse_args

    run_recipe(*parse_args(args))


def sft_best_rl(args: list[str]) -> None:
    # Imported here, as `train` imports the recipe
    from .recipes.sft_best_rl import main as run_sft_best_rl
    from .recipes.sft_best_rl import parse_sft_best_rl_args

    run_sft_best_rl(*parse_sft_best_rl_args(args))


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else list(args)
    drop_bitsandbytes_cpu_kernel_notice()
    command = {"configs": list_configs, "prepare": prepare, "sft-best-rl": sft_best_rl}.get(args[0] if args else None)
    try:
        if command is None:
            train(args)
        else:
            command(args[1:])
    except CommandLineError as error:
        print(f"trl-chord: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
