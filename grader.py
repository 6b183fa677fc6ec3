"""The reward: a completion's final answer, graded against the gold answer by math-verify.

Training (`aent.py`) and evaluation (`eval.py`) use these same two functions.

    extract_answer("so \\boxed{\\frac{1}{2}}.") -> "\\frac{1}{2}"
    grade("so \\boxed{0.5}", "\\frac12")      -> 1.0
"""

import re
import threading
from typing import Optional

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+/\d+|-?\d+(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if unclosed.

    'so \\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}'.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the last \\boxed{...}, else the last number. 'so 3/4, i.e. 0.75' -> '0.75'.

    A completion whose last box is unclosed (cut off mid-answer) has no answer.
    """
    if "\\boxed{" in text or "\\fbox{" in text:
        return last_boxed(text)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


_PARSED = {}  # answer -> math-verify's parse of it


def _parse(answer: str, timeout):
    """math-verify's parse, cached; an empty result (a failure or a timeout) is not cached, so a
    gold answer that timed out once on a busy machine is not wrong for the rest of the run."""
    from math_verify import parse

    if answer not in _PARSED:
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
        if not parsed:
            return parsed
        if len(_PARSED) >= 65536:
            _PARSED.clear()
        _PARSED[answer] = parsed
    return _PARSED[answer]


def grade(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals gold mathematically (math-verify), else 0.0.

    Any failure to parse or verify, or a timeout (5 s, signal-based: main thread only), scores 0.
    """
    from math_verify import verify

    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return float(
            verify(_parse(gold, timeout), _parse(answer, timeout), timeout_seconds=timeout)
        )
    except Exception:  # math-verify raises on pathological input and on timeouts
        return 0.0
