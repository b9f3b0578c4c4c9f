"""
The `math-verify` child process of `math_accuracy_reward`: one JSON request per stdin line, one JSON verdict per stdout
line. It is run as a script (`python math_verify_worker.py`), so the child imports neither `trl_chord` nor torch.
"""

import functools
import json
import logging
import sys


def serve() -> None:
    """Answers check requests until stdin closes; a verdict is `true`, `false`, or `null` (solution unparsable)."""
    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeouts are off
    from math_verify import LatexExtractionConfig, parse, verify

    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol

    @functools.lru_cache(maxsize=4096)
    def parse_solution(solution: str) -> list:
        # A bare solution such as `x+1` has no LaTeX delimiters; math-verify finds it once boxed.
        return parse(solution, parsing_timeout=None) or parse(f"\\boxed{{{solution}}}", parsing_timeout=None)

    def check(solution: str, answer: str) -> bool | None:
        gold = parse_solution(solution)
        if not gold:
            return None
        # LaTeX only: the answer is boxed LaTeX, and the plain-expression extractor would hand text to SymPy's
        # `parse_expr`, which evaluates Python.
        predicted = parse(f"\\boxed{{{answer}}}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
        return bool(predicted) and bool(verify(gold, predicted, timeout_seconds=None))

    check("1", "1")  # warm up the LaTeX parser before reporting ready
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            verdict = check(request["solution"], request["answer"])
        except Exception:  # a parse failure on odd input is a wrong answer, not a dead worker
            verdict = False
        protocol.write(json.dumps({"id": request_id, "verdict": verdict}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    serve()
