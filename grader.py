"""The reward: a completion's final answer, graded against the gold answer.

Training (`aent.py`) and evaluation (`eval.py`) use these same functions.

    extract_answer("so \\boxed{\\frac{1}{2}}.") -> "\\frac{1}{2}"
    grade("so \\boxed{0.5}", "\\frac12")      -> 1.0

The answer is the last \\boxed{}; without one, the last final-answer statement ("the answer is
$x$.", "Final Answer: x"); without one, the last number. An answer the completion negates or
rejects ("not 42", "42 is wrong") is no answer. Whether it equals the gold is decided by
support/equivalence.py: normalisation, exact numbers and math-verify. The verdict depends on
the inputs alone: answers too long or too deeply nested to parse quickly score 0, and a CPU-time
budget, not a wall clock, stops sympy when it runs away.
"""

import re
from typing import Optional

from support.equivalence import CPU_BUDGET, PROSE, SCALE, OutOfTime, closing_brace, cpu_budget
from support.equivalence import equal, load_math_verify

NUMBER = re.compile(
    rf"(?:-?\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|-?\d+/\d+|-?\d+(?:\.\d+)?|-?\.\d+)(?:\s*{SCALE})?"
)

# 'not 42', "isn't 42", 'not equal to 42', 'cannot be 42', '\\neq 42': a negation just before
# the answer, with only these words between ('who did not pass is 12' negates no number)
NEGATED = re.compile(
    r"(?i)(?:\b(?:not|never|cannot|\w+n['’]t|instead\s+of|rather\s+than)\s+(?:(?:be|equal|equals"
    r"|to|exactly|just|simply|actually|really|quite|necessarily|the|same|as|answer|is|it)\s+)*"
    r"|\\neq?\b\s*|≠\s*)[\s$(\\\[]*$"
)
# '42 is wrong', "42, but that isn't right", '42. That is incorrect.': a rejection in the rest of
# the answer's sentence, or in the next one's first words about it ('That is wrong.')
REJECTED = re.compile(
    r"(?i)(?:[^.!\n]|\.(?=\S))*?(?:[.!?\n]\s*(?:(?:no|wait|but|oops)\W+)*(?:that|this|it)\b"
    r"[^.!?\n,;]{0,20}?)?\b"
    r"(?:wrong|incorrect|mistaken|a\s+mistake|rejected|ruled\s+out|(?:not|\w+n['’]t)\s+"
    r"(?:\w+\s+){0,2}?(?:the\s+answer|right|correct|valid|true|possible|work))\b"
)


def rejected(text: str, start: int, end: int) -> bool:
    """Whether the completion negates or rejects the answer at text[start:end] in its sentence:
    'The answer is not 42.', 'I guessed 42, but that is wrong.'"""
    before, after = text[max(0, start - 60) : start], text[end : end + 200]
    return bool(NEGATED.search(before) or REJECTED.match(after))


def _last_box(text: str) -> Optional[tuple[int, int]]:
    """(start, end) of the last \\boxed{...} or \\fbox{...}; None if none, or if unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    end = closing_brace(text, text.index("{", start)) + 1 if start >= 0 else 0
    return (start, end) if end else None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if unclosed.

    'so \\boxed{\\frac{1}{2}}' -> '\\frac{1}{2}'.
    """
    box = _last_box(text)
    return box and text[text.index("{", box[0]) + 1 : box[1] - 1].strip()


# "the answer is", "The final answer is", "Final Answer:", "**Answer:**", "answer to the problem is"
STATEMENT = re.compile(  # not "the answer isn't"
    r"(?i)\banswer(?:\s+to\s+(?:the|this)\s+(?:question|problem))?\s*(?:is\b(?!['’])|:|=)[\s:*]*"
)
NOT_AN_ANSWER = re.compile(r"(?i)(?:correct|incorrect|right|wrong|not|indeed|as|that|the same)\b")
DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def stated_answer(text: str) -> Optional[str]:
    """The answer of the last final-answer statement: 'Thus the answer is $\\frac{3}{56}$.' ->
    '\\frac{3}{56}'; 'The answer is 18. Next, 5 ...' -> '18'. None if there is none, or if the
    last one states no answer ('the answer is not 5, it is 6', 'the answer is correct', 'the
    answer is 17, which is wrong')."""
    for match in list(STATEMENT.finditer(text))[-1:]:
        rest = text[match.end() : match.end() + 2000]
        for open_, close in DELIMITERS:
            if rest.startswith(open_):  # up to the closing delimiter; \$ is a dollar sign
                end = re.search(r"(?<!\\)" + re.escape(close), rest[len(open_) :])
                answer = rest[len(open_) : len(open_) + end.start()] if end else None
                break
        else:  # plain text: up to the end of the line or of the sentence
            answer = re.split(r"\n|\.(?:\s|$)|,\s+(?:since|because|which|so|as|but|not)\b", rest)[0]
            answer = re.sub(
                r"(?i)^\W*(?:approximately|about|roughly|exactly|simply)\s+", "", answer
            )
            mathy = re.match(r"[-+\d.(\[]", answer.strip(" *")) or re.search(r"[\\^=+/{]", answer)
            if NOT_AN_ANSWER.match(answer) or not mathy and len(answer.split()) > 4:
                return None  # 'the answer is correct', 'the answer is the number of ways to ...'
            prose = PROSE.fullmatch(answer)
            answer = prose.group(1) if prose else answer  # 'the answer is 18 apples' -> 18
        answer = (answer or "").strip().strip("*").strip()
        start = match.end() + rest.find(answer)
        if answer and not rejected(text, start, start + len(answer)):
            return answer
    return None


def find_answer(text: str) -> tuple[Optional[str], Optional[str]]:
    """(answer, where it came from: 'boxed', 'statement' or 'number'), or (None, None).

    A completion whose last box is unclosed (cut off mid-answer), or whose last answer it
    negates or rejects ('\\boxed{42} is wrong', 'not 42'), has no answer.
    """
    if "\\boxed{" in text or "\\fbox{" in text:
        box = _last_box(text)
        return (last_boxed(text), "boxed") if box and not rejected(text, *box) else (None, None)
    answer = stated_answer(text)
    if answer is not None:
        return answer, "statement"
    numbers = list(NUMBER.finditer(text))
    if not numbers or rejected(text, numbers[-1].start(), numbers[-1].end()):
        return None, None
    return numbers[-1].group(), "number"


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the last \\boxed{...}, else the last final-answer statement, else the
    last number. 'so 3/4, i.e. 0.75' -> '0.75'; 'The answer is $7$. Check: 3 + 4' -> '7'."""
    return find_answer(text)[0]


def grade(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals gold mathematically, else 0.0.

    Any failure to parse or verify, an answer or gold out of bounds (over 250 characters, or
    nested over 6 deep) or a grade over its CPU budget (1 s, main thread only) scores 0.
    """
    load_math_verify()  # importing sympy (0.4 s the first time) is not grading: no budget
    try:
        with cpu_budget(CPU_BUDGET):
            answer = extract_answer(completion)
            return 0.0 if answer is None else float(equal(answer, gold))
    except (Exception, OutOfTime):  # math-verify raises on pathological input
        return 0.0
