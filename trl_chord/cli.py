"""
`trl-chord`: the CHORD recipe from an installed package.

    trl-chord --config demo                  # the built-in demo; any recipe option is a flag
    trl-chord --config my_run.yaml --max_steps 100
    trl-chord configs                        # every shipped config and its path
    trl-chord configs accelerate/zero3       # the path of one, e.g. for `accelerate launch --config_file`

Multi-process: `accelerate launch [--config_file ...] -m trl_chord.cli --config ...`.
"""

import sys

from .recipes import config_path, shipped_configs


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if args[:1] == ["configs"]:
        if len(args) > 1:
            print(config_path(args[1]))
        else:
            for name, path in shipped_configs().items():
                print(f"{name:<28}{path}")
        return
    # Imported here, so that listing the configs does not wait for torch and TRL
    from .recipes.chord import main as run_recipe
    from .recipes.chord import parse_args

    run_recipe(*parse_args(args))


if __name__ == "__main__":
    main()
