"""
The data of the paper configs, made from the public datasets: `trl-chord prepare NAME [options]` runs
`trl_chord.recipes.prepare.NAME.main` (`trl-chord prepare NAME --help` for its options).
"""

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
