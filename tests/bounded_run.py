"""Launching the subprocesses that tests run (multi-process training, recipes, benchmarks) with a hard time limit."""

import os
import signal
import subprocess


def run_bounded(command, timeout, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, ...)`, but a timeout kills the whole process group.

    `subprocess.run` kills only the launcher on a timeout: the ranks torchrun or accelerate started live on, holding
    the CPU cores and any lock they took (a half-built DeepSpeed extension's lock hangs every later DeepSpeed launch),
    and one hang becomes a CI run that never ends.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{command[:3]} ran past {timeout} s and was killed with its children\n{stdout[-3000:]}\n{stderr[-5000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
