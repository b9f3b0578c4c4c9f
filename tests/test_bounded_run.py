"""The test launcher's time limit: a hung multi-process launch must not outlive its test."""

import os
import sys
import time

import pytest
from bounded_run import run_bounded


def test_a_timeout_kills_the_launchers_children_too(tmp_path):
    # A launcher that starts a child (as torchrun starts its ranks) and both hang
    child_pid = tmp_path / "child.pid"
    launcher = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(AssertionError, match="ran past 5 s"):
        run_bounded([sys.executable, "-c", launcher], timeout=5)
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # raises once the child is gone (reaped by init after the group's SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the launcher's child outlived the timeout")


def test_a_finished_command_returns_its_output_and_status():
    completed = run_bounded([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (completed.returncode, completed.stdout) == (3, "out\n")
