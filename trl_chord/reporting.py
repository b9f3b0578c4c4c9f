"""Callbacks that report a run: held-out accuracy by greedy generation, metrics as JSON lines, and a PNG plot."""

import json
import math
import os
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from trl.models.utils import unwrap_model_for_generation


class HeldOutAccuracyCallback(TrainerCallback):
    """
    Greedy-decodes held-out prompts before training, every `every_n_steps` optimizer steps, and at the end, and logs
    the fraction answered correctly as `heldout/accuracy` through the trainer's own metrics (so it reaches the progress
    bar, TensorBoard, W&B and the JSON lines file). `history` keeps `(step, accuracy)` pairs, step 0 included.

    Args:
        trainer: the [`ChordTrainer`] (or any GRPOTrainer) being trained.
        prompts (`list`): conversational prompts (lists of messages).
        answers (`list[str]`): the expected answer of each prompt.
        is_correct (`Callable[[str, str], bool]`): whether a decoded completion answers correctly.
        every_n_steps (`int`): evaluation period in optimizer steps.
        max_new_tokens (`int`): generation budget per prompt.
    """

    def __init__(
        self,
        trainer,
        prompts,
        answers,
        is_correct: Callable[[str, str], bool],
        every_n_steps: int,
        max_new_tokens: int,
    ):
        self.trainer = trainer
        self.prompts = prompts
        self.answers = answers
        self.is_correct = is_correct
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[int, float]] = []

    @torch.no_grad()
    def accuracy(self) -> float:
        trainer, tokenizer = self.trainer, self.trainer.processing_class
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        inputs = tokenizer.apply_chat_template(
            self.prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(trainer.accelerator.device)
        tokenizer.padding_side = padding_side
        model = trainer.model_wrapped
        was_training = model.training
        model.eval()
        with unwrap_model_for_generation(model, trainer.accelerator) as unwrapped:
            outputs = unwrapped.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        model.train(was_training)
        texts = tokenizer.batch_decode(outputs[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return sum(self.is_correct(text, answer) for text, answer in zip(texts, self.answers)) / len(texts)

    def _record(self, step: int) -> float:
        accuracy = self.accuracy()
        self.history.append((step, accuracy))
        return accuracy

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.history:
            self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self.trainer._metrics["train"]["heldout/accuracy"].append(self._record(state.global_step))


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


def plot_metrics(jsonl_path: str, png_path: str, heldout_history: list[tuple[int, float]] | None = None) -> str:
    """Plots mu, reward, expert NLL and held-out accuracy over steps from a JSON lines log into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl_path) as file:
        entries = [json.loads(line) for line in file if line.strip()]
    figure, axes = plt.subplots(1, len(PLOTTED_METRICS), figsize=(4 * len(PLOTTED_METRICS), 3.2))
    for axis, (key, title) in zip(axes, PLOTTED_METRICS):
        points = [
            (e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])
        ]
        if key == "heldout/accuracy" and heldout_history:
            points = list(heldout_history)
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(points) < 30 else None)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
