r"""
CHORD's math reward: the last `\boxed{...}` answer of a completion, checked against the solution with `math-verify` in
a child process that is killed when a check runs over its time limit.
"""

import atexit
import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .completions import MAX_COMPLETION_CHARS, completion_text, per_completion


logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1_000
r"""A `\boxed{...}` answer longer than this is scored as wrong without parsing it."""

DEFAULT_VERIFY_TIMEOUT_S = 0.5
"""Seconds `math-verify` gets to compare one answer with its solution; past that the answer counts as wrong."""

WORKER_START_TIMEOUT_S = 60.0
"""Seconds to wait for the `math-verify` child process to import SymPy and report ready."""

CORRECT_REWARD = 1.0
WRONG_ANSWER_REWARD = 0.0
NO_ANSWER_REWARD = -0.1
OVERLONG_NO_ANSWER_REWARD = -1.0

_BOXED = "\\boxed"
ANSWER_TOO_LONG = object()  # returned by `last_boxed_answer` for a closed box over MAX_ANSWER_CHARS


def last_boxed_answer(text: str) -> str | None | object:
    r"""The content of the last `\boxed{...}` in `text`.

    `None` when there is no box, the last box is never closed (e.g. the completion was cut inside it) or is empty;
    the sentinel `ANSWER_TOO_LONG` when its content is longer than `MAX_ANSWER_CHARS`. Escaped braces (`\{`, `\}`)
    do not count towards nesting.

    Example:
        >>> last_boxed_answer(r"so x = \boxed{3}, i.e. \boxed{\frac{1}{2}}.")
        '\\frac{1}{2}'
        >>> last_boxed_answer(r"\boxed{\{1, 2\}}")
        '\\{1, 2\\}'
        >>> last_boxed_answer("no box here") is None
        True
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    position = start + len(_BOXED)
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    content_start = position + 1
    depth = 1
    position = content_start
    while position < len(text):  # linear in the text, which is at most MAX_COMPLETION_CHARS long
        char = text[position]
        if char == "\\":
            position += 2  # skip the escaped character, so `\{` and `\}` do not nest
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                if position - content_start > MAX_ANSWER_CHARS:
                    return ANSWER_TOO_LONG
                return text[content_start:position].strip() or None
        position += 1
    return None


# Run as a script by path: the child imports neither the `trl_chord` package nor torch
WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_verify_worker.py")
_WORKER_GONE = None  # what the reader thread queues when the child's stdout closes


class _MathVerifyWorker:
    """A `math-verify` child process that answers one (solution, answer) check at a time, killed on timeout.

    Thread-safe; one per process. A killed or crashed child is replaced right away, so the next check usually finds
    it ready.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None
        self._ready = False
        self._next_id = 0
        self._owner_pid = os.getpid()

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self._lines = queue.Queue()
        self._ready = False
        threading.Thread(
            target=self._read_lines, args=(self._process.stdout, self._lines), name="math-verify-reader", daemon=True
        ).start()

    @staticmethod
    def _read_lines(stream, lines: queue.Queue) -> None:
        try:
            for line in stream:
                lines.put(line)
        except (OSError, ValueError):
            pass
        lines.put(_WORKER_GONE)

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._process = None
        self._ready = False

    def _restart(self) -> None:
        self._kill()
        self._start()

    def _receive(self, timeout_s: float) -> dict | None:
        """The child's next message, or `None` if it exits, writes garbage or stays silent for `timeout_s`."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if line is _WORKER_GONE:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None

    def _ensure_ready(self) -> bool:
        if self._owner_pid != os.getpid():
            # A forked copy of this object: the child process and its pipes belong to the parent, leave them be.
            self._process, self._ready, self._owner_pid = None, False, os.getpid()
        if self._process is None or self._process.poll() is not None:
            self._restart()
        if not self._ready:
            message = self._receive(WORKER_START_TIMEOUT_S)
            self._ready = bool(message and message.get("ready"))
            if not self._ready:
                logger.warning("The math-verify worker did not start; these answers are left ungraded (None).")
                self._kill()
        return self._ready

    def check(self, solution: str, answer: str, timeout_s: float) -> bool | None:
        """Whether `answer` equals `solution`; `None` when the solution cannot be parsed or the worker is down."""
        with self._lock:
            if not self._ensure_ready():
                return None
            request_id = self._next_id
            self._next_id += 1
            try:
                self._process.stdin.write(
                    json.dumps({"id": request_id, "solution": solution, "answer": answer}) + "\n"
                )
                self._process.stdin.flush()
            except OSError:  # the child died between checks: this answer was never looked at
                self._restart()
                return None
            reply = self._receive(timeout_s)
            if reply is None or reply.get("id") != request_id:
                # Timed out or crashed: the answer could not be verified, so it is not correct.
                self._restart()
                return False
            return reply.get("verdict")

    def close(self) -> None:
        with self._lock:
            if self._owner_pid == os.getpid():
                self._kill()


_math_verify_worker = _MathVerifyWorker()
atexit.register(_math_verify_worker.close)


def _require_math_verify() -> None:
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError("math_accuracy_reward needs the math-verify package: pip install 'trl-chord[rewards]'")


def _max_completion_length_from_trainer(log_metric: Any) -> int | None:
    # TRL passes its trainer's bound `_log_metric`, so the trainer and its `max_completion_length` are reachable.
    trainer = getattr(log_metric, "__self__", None)
    value = getattr(trainer, "max_completion_length", None)
    return value if isinstance(value, int) else None


def _is_truncated(ids: Any, max_length: Any) -> bool:
    if ids is None or not isinstance(max_length, int) or max_length <= 0:
        return False
    try:
        return len(ids) >= max_length
    except TypeError:
        return False


# Over 60 lines for its docstring (37: the users' reward table and example); its code is 31
def math_accuracy_reward(
    completions: Sequence[Any],
    solution: Sequence[str],
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_completion_length: int | Sequence[int] | None = None,
    verify_timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S,
    **kwargs: Any,
) -> list[float | None]:
    r"""CHORD's math reward: +1 correct, 0 wrong, -0.1 no final boxed answer, -1 cut off with no boxed answer.

    The answer is the content of the last `\boxed{...}` in the completion (see [`last_boxed_answer`]); it is
    compared with the example's `solution` by `math-verify`, in a child process killed after `verify_timeout_s`.

    | completion                                                             | reward |
    | ---------------------------------------------------------------------- | ------ |
    | boxed answer equal to `solution`                                       | 1.0    |
    | boxed answer not equal, longer than `MAX_ANSWER_CHARS`, or timed out   | 0.0    |
    | boxed answer, but `solution` is empty or cannot be parsed              | None   |
    | no (closed, non-empty) boxed answer, completion ended on its own       | -0.1   |
    | no boxed answer and the completion was cut at the length limit         | -1.0   |

    "Cut at the length limit" means `len(completion_ids[i]) >= max_completion_length`: TRL passes no truncation
    flag to reward functions, but it does pass `completion_ids`. `max_completion_length` comes from this argument
    (bind it with `functools.partial`, or give a dataset column of that name), else from the TRL trainer that calls
    the function (it passes its bound `log_metric`). With neither, or without `completion_ids`, a completion with no
    boxed answer is never called overlong and scores -0.1. A completion that ends with EOS on exactly its last
    allowed token also counts as cut off, which only matters when it has no boxed answer.

    Args:
        completions: plain strings, or lists of messages (the assistant messages' `"content"` is read).
        solution: the reference answer per completion: LaTeX (`\frac{1}{2}`, `$x+1$`), a number (`int`, `float` or
            text), or a full solution text containing `\boxed{...}`.
        completion_ids: token ids per completion, passed by TRL.
        max_completion_length: the generation length limit, one int or one per completion.
        verify_timeout_s: seconds `math-verify` may spend on one answer before it counts as wrong.

    Example:
        >>> math_accuracy_reward(
        ...     [r"So \boxed{\frac{1}{2}}", r"\boxed{0.4}", "It is one half.", "Let me think about it and"],
        ...     solution=["0.5"] * 4,
        ...     completion_ids=[[1] * 5, [1] * 5, [1] * 5, [1] * 8],
        ...     max_completion_length=8,
        ... )
        [1.0, 0.0, -0.1, -1.0]
    """
    _require_math_verify()
    count = len(completions)
    ids_per_completion = per_completion(completion_ids, count)
    if max_completion_length is None:
        max_completion_length = _max_completion_length_from_trainer(kwargs.get("log_metric"))
    max_length_per_completion = per_completion(max_completion_length, count)
    verdicts: dict[tuple[str, str], bool | None] = {}  # a GRPO group repeats solutions and often answers

    rewards: list[float | None] = []
    for completion, reference, ids, max_length in zip(
        completions, solution, ids_per_completion, max_length_per_completion, strict=True
    ):
        answer = last_boxed_answer(completion_text(completion))
        if answer is None:
            truncated = _is_truncated(ids, max_length)
            rewards.append(OVERLONG_NO_ANSWER_REWARD if truncated else NO_ANSWER_REWARD)
            continue
        if answer is ANSWER_TOO_LONG:
            rewards.append(WRONG_ANSWER_REWARD)
            continue
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)
        if not isinstance(reference, str) or not reference.strip():
            rewards.append(None)
            continue
        key = (reference[:MAX_COMPLETION_CHARS], answer)
        if key not in verdicts:
            verdicts[key] = _math_verify_worker.check(key[0], answer, verify_timeout_s)
        verdict = verdicts[key]
        rewards.append(None if verdict is None else (CORRECT_REWARD if verdict else WRONG_ANSWER_REWARD))
    return rewards
