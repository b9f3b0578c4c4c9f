"""
The CHORD recipe (`chord.py`, run by `trl-chord` and `recipes/chord.py`), its dataset helpers, the data preparation of
the paper configs (`prepare/`, run by `trl-chord prepare`), and the configs it ships: training configs in `configs/`
and accelerate configs in `accelerate/`, found by name from an installed package.
"""

import os


RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))


class CommandLineError(ValueError):
    """A mistake on the `trl-chord` command line, which the command reports in one line, without a traceback."""


class ConfigNotFoundError(CommandLineError, FileNotFoundError):
    """A `--config` or `trl-chord configs NAME` that is neither a file nor a shipped config."""


def shipped_configs() -> dict[str, str]:
    """The path of every shipped config by name: training configs (`demo`) and accelerate ones (`accelerate/zero3`)."""
    configs = {}
    for folder, prefix in (("configs", ""), ("accelerate", "accelerate/")):
        for file_name in sorted(os.listdir(os.path.join(RECIPES_DIR, folder))):
            name = prefix + os.path.splitext(file_name)[0]
            configs[name] = os.path.join(RECIPES_DIR, folder, file_name)
    return configs


def config_path(name_or_path: str) -> str:
    """`name_or_path` if it is a file; else the shipped config of that name, with or without `.yaml`."""
    if os.path.isfile(name_or_path):
        return name_or_path
    configs = shipped_configs()
    name = name_or_path.removesuffix(".yaml")
    if name not in configs:
        raise ConfigNotFoundError(
            f"{name_or_path!r} is neither a file nor a shipped config; shipped configs: {', '.join(configs)}."
        )
    return configs[name]
