"""Which checkpoints a CHORD run can resume from.

The Trainer writes a checkpoint's files one after another and `trainer_state.json` last; `ChordTrainer` writes
`chord_state.json` (the expert sampler's position) before it. A checkpoint whose two state files both parse is
therefore complete; one cut short by a crash or a kill during the save is not, and is never loaded.
"""

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


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
