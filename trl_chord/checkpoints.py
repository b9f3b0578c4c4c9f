"""Which checkpoints a CHORD run can resume from.

The Trainer writes a checkpoint's files one after another and `trainer_state.json` last; `ChordTrainer` writes
`chord_state.json` (the expert sampler's position) before it. A checkpoint whose two state files both parse is
therefore complete; one cut short by a crash or a kill during the save is not, and is never loaded.
"""

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


logger = logging.get_logger(__name__)


CHORD_STATE_NAME = "chord_state.json"
TRAINER_STATE_NAME = "trainer_state.json"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError):
        return None


def checkpoint_problem(checkpoint: str, needs_chord_state: bool) -> str | None:
    """Why `checkpoint` cannot be resumed from, or `None` if it is complete."""
    if not os.path.isdir(checkpoint):
        return "it is not a folder"
    if _read_json(os.path.join(checkpoint, TRAINER_STATE_NAME)) is None:
        return f"its {TRAINER_STATE_NAME} is missing or unreadable (the save was interrupted)"
    if needs_chord_state and _read_json(os.path.join(checkpoint, CHORD_STATE_NAME)) is None:
        return (
            f"its {CHORD_STATE_NAME} is missing or unreadable, so the expert data order cannot be resumed (it was not "
            "written by a ChordTrainer with an expert dataset, or the save was interrupted)"
        )
    return None


def complete_checkpoints(output_dir: str, needs_chord_state: bool) -> tuple[list[str], dict[str, str]]:
    """The complete checkpoints in `output_dir`, newest first, and the incomplete ones with their problem."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = pattern.match(name)
            if match:
                steps[os.path.join(output_dir, name)] = int(match.group(1))
    complete, incomplete = [], {}
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(checkpoint, needs_chord_state)
        if problem is None:
            complete.append(checkpoint)
        else:
            incomplete[checkpoint] = problem
    return complete, incomplete


def resolved_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str, needs_chord_state: bool):
    """What to resume from: `True` is the newest complete checkpoint in `output_dir` (incomplete ones skipped with a
    warning); a path must be complete."""
    if resume_from_checkpoint is True:
        complete, incomplete = complete_checkpoints(output_dir, needs_chord_state)
        for checkpoint, problem in incomplete.items():
            logger.warning(f"Not resuming from {checkpoint}: {problem}.")
        if not complete:
            raise ValueError(f"No complete checkpoint to resume from in {output_dir}.")
        return complete[0]
    if isinstance(resume_from_checkpoint, str):
        problem = checkpoint_problem(resume_from_checkpoint, needs_chord_state)
        if problem is not None:
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
    return resume_from_checkpoint


def write_chord_state(output_dir: str, expert_sampler_state: dict) -> None:
    """`chord_state.json`, written whole or not at all (through a temporary file)."""
    temporary_path = os.path.join(output_dir, CHORD_STATE_NAME + ".tmp")
    with open(temporary_path, "w") as file:
        json.dump({"expert_sampler": expert_sampler_state}, file)
    os.replace(temporary_path, os.path.join(output_dir, CHORD_STATE_NAME))


def read_chord_state(checkpoint: str) -> dict:
    """The expert sampler's state that `checkpoint`'s `chord_state.json` holds."""
    with open(os.path.join(checkpoint, CHORD_STATE_NAME)) as file:
        return json.load(file)["expert_sampler"]
