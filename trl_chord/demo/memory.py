"""
Peak memory of one step, in live tensor bytes: the meter of `benchmarks/chord_overhead.py` and of the test that the
expert head never holds the full logits.
"""

import contextlib
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Variant:
    """One thing to measure: a step, and the model whose gradients are zeroed before each run of it."""

    name: str
    model: torch.nn.Module | None  # whose gradients are zeroed before each step
    step: Callable[[], object]


def prepare(variant: Variant) -> None:
    # Gradients stay allocated and are zeroed in place, so a step's memory is its activations and temporaries only
    if variant.model is not None:
        variant.model.zero_grad(set_to_none=False)
    gc.collect()


@contextlib.contextmanager
def stderr_silenced():
    """Kineto, under the PyTorch profiler, logs every start and stop to stderr at a level no setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PeakMemory:
    """
    The peak of the bytes allocated during one step above what was allocated before it.

    On CUDA: the caching allocator's `max_memory_allocated`. On CPU: the same quantity from the PyTorch profiler's
    allocation and free events, summed in order. Both count live tensors, not what an allocator holds on to, so the
    figure does not depend on what ran before (the resident set of a CPU process does: freed heap memory stays).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, variant: Variant) -> int:
        prepare(variant)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            variant.step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        with stderr_silenced(), memory_profiler() as profiler:
            variant.step()
        return peak_live_bytes(profiler)


def memory_profiler() -> torch.profiler.profile:
    """A CPU profiler that records tensor allocations and frees."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)


def allocation_bytes(profiler: torch.profiler.profile) -> list[int]:
    """The bytes of each allocation (positive) and free (negative) a finished profiler saw, in time order. It only
    sizes allocations made while it ran, so frees of older tensors count 0."""
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    return [event.nbytes() for event in sorted(events, key=lambda event: event.start_ns())]


def peak_live_bytes(profiler: torch.profiler.profile) -> int:
    """The peak, over the profiled region, of the bytes allocated in it and not yet freed."""
    live = peak = 0
    for size in allocation_bytes(profiler):
        live += size
        peak = max(peak, live)
    return peak
