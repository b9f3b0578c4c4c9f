"""A run's report: every log entry as a JSON line, and a PNG plot of the main metrics."""

import json
import math
import os

from transformers import TrainerCallback


class JsonLinesLoggerCallback(TrainerCallback):
    """Appends every log entry of the run (with its step) as one JSON line to `path`, on the main process."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


PLOTTED_METRICS = [
    ("chord/mu", "mu (weight of the SFT term)"),
    ("reward", "mean on-policy reward"),
    ("chord/expert_nll", "expert NLL (SFT loss before phi)"),
    ("heldout/accuracy", "held-out accuracy"),
]
# Evaluation curves drawn in a training metric's panel: the held-out experts' NLL beside the training experts'
BESIDE = {"chord/expert_nll": ("eval_chord/expert_nll", "held-out experts")}


def logged_points(entries: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]


def plot_metrics(jsonl_path: str, png_path: str, heldout_history: list[dict] | None = None) -> str:
    """
    Plots mu, reward, expert NLL and held-out accuracy over steps from a JSON lines log into a PNG; the held-out curve
    comes from `heldout_history` (a [`HeldOutEvaluationCallback`]'s, which has step 0) when given. A run without
    held-out evaluations (only the built-in task has a held-out set) gets no held-out panel. The held-out experts' NLL
    (`eval_chord/expert_nll`, with an `eval_expert_dataset`) is drawn beside the training experts'.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl_path) as file:
        entries = [json.loads(line) for line in file if line.strip()]
    panels = []
    for key, title in PLOTTED_METRICS:
        points = logged_points(entries, key)
        if key == "heldout/accuracy":
            if heldout_history:
                points = [(evaluation["step"], evaluation["accuracy"]) for evaluation in heldout_history]
            if not points:
                continue
        curves = [("training", points)]
        if key in BESIDE and logged_points(entries, BESIDE[key][0]):
            curves.append((BESIDE[key][1], logged_points(entries, BESIDE[key][0])))
        panels.append((title, curves))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (title, curves) in zip(axes[0], panels):
        for label, points in curves:
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        if len(curves) > 1:
            axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
