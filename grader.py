"""The reward: a completion's final answer, graded against the gold answer by math-verify.

Training (`aent.py`) and evaluation (`eval.py`) use these same functions.

    extract_answer("so \\boxed{\\frac{1}{2}}.") -> "\\frac{1}{2}"
    grade("so \\boxed{0.5}", "\\frac12")      -> 1.0

The answer is the last \\boxed{}; without one, the last final-answer statement ("the answer is
$x$.", "Final Answer: x"); without one, the last number. Before math-verify compares it with
the gold, the model's answer loses trailing unit words ("42 inches", "\\text{ cm}^2") and a
choice letter's text ("(C) Plane"); both sides get ° as ^\\circ, "4.5e33" as 4.5 \\times 10^{33}
and redundant nested parentheses and braces dropped. Two plain numbers (integers, decimals,
fractions, scientific notation) are compared exactly, as rationals: math-verify rounds floats
to 6 decimals, which would equate 2.88e-18 and 2.88e-19.
"""

import re
import threading
from fractions import Fraction
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


# "the answer is", "The final answer is", "Final Answer:", "**Answer:**", "answer to the problem is"
STATEMENT = re.compile(
    r"\banswer(?:\s+to\s+(?:the|this)\s+(?:question|problem))?\s*(?:is\b|:|=)[\s:*]*", re.I
)
NOT_AN_ANSWER = re.compile(r"(?i)(?:correct|incorrect|right|wrong|not|indeed|as|that|the same)\b")
DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def stated_answer(text: str) -> Optional[str]:
    """The answer of the last final-answer statement: 'Thus the answer is $\\frac{3}{56}$.' ->
    '\\frac{3}{56}'; 'The answer is 18. Next, 5 ...' -> '18'. None if there is none, or if the
    last one states no answer ('the answer is not 5, it is 6', 'the answer is correct')."""
    for match in list(STATEMENT.finditer(text))[-1:]:
        rest = text[match.end() : match.end() + 2000]
        for open_, close in DELIMITERS:
            if rest.startswith(open_):  # up to the closing delimiter; \$ is a dollar sign
                end = re.search(r"(?<!\\)" + re.escape(close), rest[len(open_) :])
                answer = rest[len(open_) : len(open_) + end.start()] if end else None
                break
        else:  # plain text: up to the end of the line or of the sentence
            answer = re.split(r"\n|\.(?:\s|$)|,\s+(?:since|because|which|so|as)\b", rest)[0]
            answer = re.sub(
                r"(?i)^\W*(?:approximately|about|roughly|exactly|simply)\s+", "", answer
            )
            mathy = re.match(r"[-+\d.(\[]", answer.strip(" *")) or re.search(r"[\\^=+/{]", answer)
            if NOT_AN_ANSWER.match(answer) or not mathy and len(answer.split()) > 4:
                return None  # 'the answer is correct', 'the answer is the number of ways to ...'
            prose = re.fullmatch(r"\s*(-?[\d.,]*\d)\s+[A-Za-z]{2,}[A-Za-z ]*", answer)
            answer = prose.group(1) if prose else answer  # 'the answer is 18 apples' -> 18
        answer = (answer or "").strip().strip("*").strip()
        if answer:
            return answer
    return None


def find_answer(text: str) -> tuple[Optional[str], Optional[str]]:
    """(answer, where it came from: 'boxed', 'statement' or 'number'), or (None, None).

    A completion whose last box is unclosed (cut off mid-answer) has no answer.
    """
    if "\\boxed{" in text or "\\fbox{" in text:
        answer = last_boxed(text)
        return (answer, "boxed") if answer is not None else (None, None)
    answer = stated_answer(text)
    if answer is not None:
        return answer, "statement"
    numbers = NUMBER.findall(text)
    return (numbers[-1], "number") if numbers else (None, None)


def extract_answer(text: str) -> Optional[str]:
    """The final answer: the last \\boxed{...}, else the last final-answer statement, else the
    last number. 'so 3/4, i.e. 0.75' -> '0.75'; 'The answer is $7$. Check: 3 + 4' -> '7'."""
    return find_answer(text)[0]


# ----------------------------------------------------------------------------------------------
# Normalisation: forms math-verify does not know, each rewritten to one it does
# ----------------------------------------------------------------------------------------------
TEXT = r"\\(?:text|textbf|mbox|mathrm)\s*"
UNITS = set(
    "inch inches in ft foot feet yard yards yd mile miles mi cm centimeter centimeters mm km "
    "meter meters metre metres millimeters kilometers dollar dollars cent cents unit units "
    "square sq cubic per degree degrees second seconds sec minute minutes min hour hours hr hrs "
    "day days week weeks month months year years pound pounds lb lbs ounce ounces oz gram grams "
    "kg kilograms liter liters litre litres ml gallon gallons mph kmh cal calories".split()
)
UNIT_TAIL = re.compile(  # words after a digit or a closing bracket, to the end: '5\text{ cm}^2'
    rf"(?<=[\d)\]}}])\s*+(?:{TEXT}\{{)?\s*+((?:[A-Za-z]{{2,}}+\.?[\s/]*+)++)\}}?"
    r"\s*+(?:\^\{?[23]\}?)?\s*+$"
)
SCIENTIFIC = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:[eE]\s*|(?:\\times|\\cdot|x|×)\s*10\^)"
                        r"\{?([-+]?\d+)\}?(?![\w.])")  # fmt: skip


def both_sides(s: str) -> str:
    """Rewrites safe on gold and answer alike: bold, LaTeX spacing at the end, degrees,
    scientific notation, nested brackets."""
    s = re.sub(r"\\(?:textbf|mathbf|boldsymbol|bm)\s*\{", "{", s)  # \textbf{(C)} -> {(C)}
    s = re.sub(r"(?:\\q?quad|\\[ ,;!]|\\$|~|\s)++$", "", s)
    s = drop_nested_parentheses(s)
    while s.startswith("{") and closing_brace(s, 0) == len(s) - 1:  # {x} -> x
        s = s[1:-1].strip()
    s = s.replace("°", "^\\circ").replace("\\degree", "^\\circ").replace("−", "-")
    s = re.sub(r"\\[dt]frac\b", r"\\frac", s)
    return SCIENTIFIC.sub(scientific, s)


def scientific(m: re.Match) -> str:
    """'4.5e33' -> '4.5\\times 10^{33}', '1e-5' too: a digit, e and an integer are read as
    scientific notation, never as a product with Euler's e."""
    return f"{m.group(1)}\\times 10^{{{m.group(2)}}}"


def closing_brace(s: str, i: int) -> int:
    """Index of the brace that closes the one at s[i] (-1 if none)."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return -1


def drop_nested_parentheses(s: str) -> str:
    """'((((5))))' -> '(5)', '{{{5}}}' -> '{5}': a pair of parentheses or braces that only wraps
    another pair of the same kind is dropped (math-verify takes seconds per level of nesting)."""
    drop = set()
    for open_, close in ("()", "{}"):
        pairs, stack = {}, []
        for i, c in enumerate(s):
            if c == open_:
                stack.append(i)
            elif c == close and stack:
                pairs[stack.pop()] = i
        drop |= {k for i, j in pairs.items() if pairs.get(i + 1) == j - 1 for k in (i, j)}
    return "".join(c for i, c in enumerate(s) if i not in drop)


def answer_only(answer: str) -> str:
    """Rewrites for the model's answer alone: '\\text{42 inches}' -> '42', '18 dollars' -> '18',
    '5\\text{ cm}^2' -> '5'. Never applied to the gold, where a letter may be the answer."""
    whole = re.fullmatch(rf"{TEXT}\{{\s*([\d(][^{{}}]*)\}}", answer.strip())
    if whole:  # \text{42 inches}, \text{(C) Plane}, \text{9 customers}: words in text are prose
        answer = whole.group(1)
        prose = re.fullmatch(r"(-?[\d.,]*\d)\s+[A-Za-z]{2,}[A-Za-z ]*", answer.strip())
        answer = prose.group(1) if prose else answer
    tail = UNIT_TAIL.search(answer)
    if tail and set(tail.group(1).lower().replace(".", " ").replace("/", " ").split()) <= UNITS:
        answer = answer[: tail.start()]
    return answer.strip()


def choice_letter(s: str, exact: bool) -> Optional[str]:
    """A gold's '(C)', '\\text{(C)}', 'C' -> 'C'; with exact=False an answer's '(C) Plane',
    'C. Plane' or 'C' too, but not 'A and C'. None if there is no single letter."""
    s = re.sub(rf"{TEXT}\{{([^{{}}]*)\}}", r"\1", s.strip()).strip("{} ")
    if exact:
        m = re.fullmatch(r"\(([A-Z])\)|([A-E])", s)  # a gold 'C': MATH's 'enter the letter'
        return m and (m.group(1) or m.group(2))
    m = re.match(r"\(?([A-Z])\)?(?:[\s.:]|$)", s)
    if not m or re.search(r"(?:^|[\s(])[A-Z](?:[\s).,:]|$)", s[m.end() :]):
        return None  # 'A and C', '(A) (B)': not one choice
    return m.group(1)


def plain_number(s: str) -> Optional[Fraction]:
    """An integer, decimal, fraction (a/b, \\frac{a}{b}) or m \\times 10^{e} as an exact
    rational; None for anything else. '12,345' -> 12345 (but '2,3' is a list: None)."""
    s = re.sub(r",\\!\s*", ",", s)  # '11,\\! 111' is digit grouping
    s = re.sub(r"\\!|\\?\$", "", s).strip()  # LaTeX negative space, dollar signs
    if re.fullmatch(r"-?\d{1,3}(?:(?:,|\\,|\\;)\d{3})+(?:\.\d+)?", s):  # 12,345 or 12\,345
        s = re.sub(r"\\?[,;]", "", s)
    if "," in s or len(s) > 200 or re.search(r"\d\s+\d", s):
        return None  # '2,3', '12, 345' and '3 4' are not one number
    s = re.sub(r"\s+|\\[,;]", "", s)
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)", s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else m.groups()[3:]
        return None if int(den) == 0 else Fraction(int(num), int(den)) * (-1 if sign else 1)
    m = re.fullmatch(r"(-?(?:\d+(?:\.\d*)?|\.\d+))(?:\\times10\^\{?([-+]?\d{1,4})\}?)?", s)
    if not m:
        return None
    return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2) or 0)


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------
_PARSED = {}  # answer -> math-verify's parse of it


def _parse(answer: str, timeout):
    """math-verify's parse, cached; an empty result (a failure or a timeout) is not cached, so a
    gold answer that timed out once on a busy machine is not wrong for the rest of the run."""
    from math_verify import LatexExtractionConfig, parse

    if answer not in _PARSED:  # LaTeX only: the default also takes a bare number out of a
        # formula it cannot parse, so '\\omega(v+2/2)' and '\\omega(v+1/2)' both became 2
        latex = [LatexExtractionConfig()]
        parsed = parse("\\boxed{" + answer + "}", latex, parsing_timeout=timeout)
        if not parsed:
            return parsed
        if getattr(parsed[0], "free_symbols", None) == set() and re.search(
            r"[A-Za-z]_", re.sub(r"\\[A-Za-z]+", "", answer)
        ):  # subscripted symbols lost: '\\frac{2}{3} E_{1}+\\frac{2}{3} E_{2}' was read as 2/3
            parsed = []
        if len(_PARSED) >= 65536:
            _PARSED.clear()
        _PARSED[answer] = parsed
    return _PARSED[answer]


def grade(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals gold mathematically, else 0.0.

    Any failure to parse or verify, or a timeout (5 s, signal-based: main thread only), scores 0.
    """
    answer = extract_answer(completion)
    if answer is None or len(answer) > 1000:  # no answer, or a runaway one
        return 0.0
    try:
        return _grade(answer, gold)
    except Exception:  # math-verify raises on pathological input and on timeouts
        return 0.0


def _grade(answer: str, gold: str) -> float:
    from math_verify import verify

    gold, answer = both_sides(gold), both_sides(answer)
    if " ".join(answer.split()) == " ".join(gold.split()):  # the same text
        return 1.0
    answer = answer_only(answer)
    letter, chosen = choice_letter(gold, exact=True), choice_letter(answer, exact=False)
    if letter and chosen:  # a multiple-choice question
        return float(chosen == letter)
    a, g = plain_number(answer), plain_number(gold)
    if a is not None and g is not None:
        return float(a == g)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return float(verify(_parse(gold, timeout), _parse(answer, timeout), timeout_seconds=timeout))
