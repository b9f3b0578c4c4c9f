"""Reading and writing datasets for the recipes: hub ids or local files, read only with `datasets`' safe loaders."""

import json
import os
from collections import Counter

from datasets import Dataset, load_dataset


LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def local_data_files(folder: str) -> tuple[str, list[str]]:
    """
    The builder and the files of a local dataset folder (e.g. a Hive-style `split=train/` of Parquet parts): every
    `.json`, `.jsonl` or `.parquet` file under it, all of one kind; a clear error for a folder with none or a mix.
    """
    files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in LOCAL_BUILDERS
    )
    builders = {LOCAL_BUILDERS[os.path.splitext(path)[1].lower()] for path in files}
    if len(builders) != 1:
        found = "no" if not files else "both JSON and Parquet"
        raise ValueError(f"{folder}: a local dataset folder must hold .json/.jsonl or .parquet files, found {found}.")
    return builders.pop(), files


def load_dataset_file_or_hub(name_or_path: str, config: str | None = None, split: str = "train") -> Dataset:
    """
    One split of a hub dataset, or a local `.json`, `.jsonl` or `.parquet` file or folder of them (any other local
    file is refused: nothing is ever unpickled).
    """
    if os.path.isfile(name_or_path):
        extension = os.path.splitext(name_or_path)[1].lower()
        if extension not in LOCAL_BUILDERS:
            raise ValueError(f"{name_or_path}: a local dataset must be a .json, .jsonl or .parquet file.")
        return load_dataset(LOCAL_BUILDERS[extension], data_files={split: name_or_path}, split=split)
    if os.path.isdir(name_or_path):
        builder, files = local_data_files(name_or_path)
        return load_dataset(builder, data_files={split: files}, split=split)
    return load_dataset(name_or_path, name=config, split=split)


def write_jsonl(path: str, examples: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, non-ASCII kept as is."""
    with open(path, "w", encoding="utf-8") as file:
        for example in examples:
            file.write(json.dumps(example, ensure_ascii=False) + "\n")


def format_counts(counts: Counter) -> str:
    """`"2 duplicate, 1 too long"`: a counter of reasons, for the data scripts' reports."""
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items())) or "none"
