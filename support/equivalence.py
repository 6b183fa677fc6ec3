"""When a model's answer equals the gold one (grader.py takes the answer out of a completion).

Before math-verify compares them, the model's answer loses trailing unit words ("42 inches",
"\\text{ cm}^2") and a choice letter's text ("(C) Plane"); both sides get ° as ^\\circ, "4.5e33"
as 4.5 \\times 10^{33}, "5 million" as 5 \\times 1000000, and redundant nested parentheses and
braces dropped. Numbers are compared exactly: math-verify rounds floats to 6 decimals and chops
differences under 1e-15, which would equate 0 and 1e-7, or 2.88e-18 and 2.88e-19. Answers too
long or too deeply nested to parse quickly are not equal to anything.
"""

import functools
import logging
import re
import signal
import threading
from contextlib import contextmanager
from fractions import Fraction
from typing import Optional

# Words after a number that change its value: '5 million' is not 5, nor '3 dozen' 3
SCALES = {"hundred": "\\times 100", "thousand": "\\times 1000", "million": "\\times 1000000",
          "billion": "\\times 1000000000", "trillion": "\\times 1000000000000",
          "dozen": "\\times 12", "lakh": "\\times 100000", "crore": "\\times 10000000",
          "percent": "\\%", "per cent": "\\%", "squared": "^2", "cubed": "^3"}  # fmt: skip
SCALE = rf"(?i:{'|'.join(SCALES).replace(' ', ' ?')})s?\b"
PROSE = re.compile(rf"\s*(-?[\d.,]*\d)\s+(?!{SCALE})[A-Za-z]{{2,}}[A-Za-z ]*")  # '18 apples'

# ----------------------------------------------------------------------------------------------
# Normalisation: forms math-verify does not know, each rewritten to one it does. Every step is
# linear in the length of the text: a gold with a run of 16,000 spaces once took 7.6 s.
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
MULTIPLIER = re.compile(  # after a digit, in \text{} or not: '5 million', '5\,\text{ dozen}'
    rf"(?<=\d)(?:\s|\\[,;: ]|~)*({TEXT}\{{\s*)?((?:{SCALE}\s*)+)"
)
SPACING = ("\\qquad", "\\quad", "\\ ", "\\,", "\\;", "\\!", "~", "\\", " ", "\n", "\t", "\r")


def both_sides(s: str) -> str:
    """Rewrites safe on gold and answer alike: bold, LaTeX spacing at the end, degrees,
    scientific notation, multiplier words ('3 dozen' is 36, not 3), nested brackets."""
    s = re.sub(r"\\(?:textbf|mathbf|boldsymbol|bm)\s*\{", "{", s)  # \textbf{(C)} -> {(C)}
    end = len(s)  # LaTeX spacing at the end, scanned backwards: '1\quad' -> '1'
    while token := next((t for t in SPACING if s.startswith(t, max(0, end - len(t)), end)), ""):
        end -= len(token)
    s = " ".join(drop_nested_parentheses(s[:end]).split())  # runs of spaces count as one
    if s.startswith("{") and closing_brace(s, 0) == len(s) - 1:  # {x} -> x
        s = s[1:-1].strip()
    s = s.replace("°", "^\\circ").replace("\\degree", "^\\circ").replace("−", "-")
    s = re.sub(r"\\[dt]frac\b", r"\\frac", s)
    s = MULTIPLIER.sub(scale, s)
    s = re.sub(rf"{TEXT}\{{\s*\}}", "", s)  # the \text{} a multiplier leaves empty
    return SCIENTIFIC.sub(scientific, s)


def scale(m: re.Match) -> str:
    """'5 million' -> '5 \\times 1000000', '2\\text{ percent}' -> '2 \\%', '5\\text{ hundred
    thousand km}' -> '5 \\times 100 \\times 1000 \\text{ km}': taken out of the \\text{}, which
    math-verify drops."""
    words = re.findall(r"[a-z]+(?: cent)?", m.group(2).lower())
    return "".join(f" {SCALES[word.rstrip('s')]}" for word in words) + f" {m.group(1) or ''}"


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
    """'((((5))))' -> '(5)', '{ {{5}} }' -> '{5}': a pair of parentheses or braces that only wraps
    another pair of the same kind, spaces aside, is dropped (math-verify's parser takes time
    exponential in nesting)."""
    drop, space = set(), re.compile(r"\s*")
    for open_, close in ("()", "{}"):
        pairs, stack = {}, []
        for i, c in enumerate(s):
            if c == open_:
                stack.append(i)
            elif c == close and stack:
                pairs[stack.pop()] = i
        for i, j in pairs.items():  # each run of spaces is scanned at most twice: linear
            inner = pairs.get(space.match(s, i + 1).end())
            if inner is not None and not s[inner + 1 : j].strip():
                drop |= {i, j}
    return "".join(c for i, c in enumerate(s) if i not in drop)


def answer_only(answer: str) -> str:
    """Rewrites for the model's answer alone: '\\text{42 inches}' -> '42', '18 dollars' -> '18',
    '5\\text{ cm}^2' -> '5'. Never applied to the gold, where a letter may be the answer."""
    whole = re.fullmatch(rf"{TEXT}\{{\s*([\d(][^{{}}]*)\}}", answer.strip())
    if whole:  # \text{42 inches}, \text{(C) Plane}, \text{9 customers}: words in text are prose
        answer = whole.group(1)
        prose = PROSE.fullmatch(answer.strip())
        answer = prose.group(1) if prose else answer
    tail = UNIT_TAIL.search(answer)
    if tail and set(tail.group(1).lower().replace(".", " ").replace("/", " ").split()) <= UNITS:
        answer = answer[: tail.start()]
    return answer.strip()


def choice_letter(s: str, exact: bool) -> Optional[str]:
    """A gold's '(C)', '\\text{(C)}', 'C' -> 'C'; with exact=False an answer's '(C) Plane',
    'C. Plane' or 'C' too, but not 'A and C', nor 'A lot' (a capital opening a phrase). None if
    there is no single letter."""
    s = re.sub(rf"{TEXT}\{{([^{{}}]*)\}}", r"\1", s.strip()).strip("{} ")
    if exact:
        m = re.fullmatch(r"\(([A-Z])\)|([A-E])", s)  # a gold 'C': MATH's 'enter the letter'
        return m and (m.group(1) or m.group(2))
    m = re.match(r"\(?([A-Z])\)?(?:[\s.:]|$)", s)
    if not m or re.search(r"(?:^|[\s(])[A-Z](?:[\s).,:]|$)", s[m.end() :]):
        return None  # 'A and C', '(A) (B)': not one choice
    if re.match(r"[A-Z]\s+[a-z]", s):  # a choice's text is a name ('C Plane'); 'B sides' is prose
        return None
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
# Bounds: math-verify's parser (ANTLR) costs time linear in length and exponential in nesting.
# Measured cold (a fresh process, CPU time): nesting 6 deep ('{[{[{[5]}]}]}') 0.35 s, 8 deep
# 0.6 s, 12 deep 0.85 s, 20 deep 4.5 s; 250 characters of polynomial or subscripts 0.3 s, of
# chained equalities 0.7 s; ordinary answers 1-30 ms. MATH-500's and Minerva's answers are at
# most 210 characters long, and no formula in their solutions nests deeper than 6.
# ----------------------------------------------------------------------------------------------
MAX_CHARS, MAX_DEPTH = 250, 6
CPU_BUDGET = 1.0  # seconds per call, for sympy's solve and simplify, which know no bound


def out_of_bounds(s: str) -> bool:
    """Whether s is too long or too deeply nested in (), [] and {} to grade: '{({({(5)})})}'."""
    depth = deepest = 0
    for c in s[: MAX_CHARS + 1]:
        depth = depth + 1 if c in "([{" else max(depth - (c in ")]}"), 0)
        deepest = max(deepest, depth)
    return len(s) > MAX_CHARS or deepest > MAX_DEPTH


class OutOfTime(BaseException):
    """A grade past its CPU budget: a BaseException, which sympy's and math-verify's `except
    Exception` blocks do not swallow."""


@contextmanager
def cpu_budget(seconds: float):
    """Raises OutOfTime once the block has used `seconds` of this process's CPU time (and again
    every 0.1 s, should something swallow it). A wall clock allows less work on a loaded machine
    (a verdict would depend on the load); CPU time does not, unless other threads of this process
    are busy. Signals reach the main thread only: elsewhere there is no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@functools.cache
def load_math_verify():
    """math-verify, imported on first use (with sympy, it takes a second), with its numeric
    comparison made exact (`equal_values`) and without the warning that its own wall-clock
    timeouts are off: `cpu_budget` replaces them."""
    import math_verify
    from math_verify import grader
    from sympy import Expr, MatrixExpr

    if not hasattr(grader, "sympy_numeric_eq") or not hasattr(grader, "get_pct_val"):
        raise ImportError("this math-verify lacks the comparison patched here: install 0.9.*")
    loose = grader.sympy_numeric_eq

    def exact_numeric_eq(a, b, *tolerances) -> bool:
        plain = [x for x in (a, b) if isinstance(x, Expr) and not isinstance(x, MatrixExpr)]
        if len(plain) == 2 and all(grader.get_pct_val(x) is None for x in plain):
            return equal_values(a, b)
        return loose(a, b, *tolerances)  # matrices (entry by entry, back here), 9\% = 9

    grader.sympy_numeric_eq = exact_numeric_eq  # sympy_expr_eq looks the name up at each call
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    warm_up = [math_verify.parse(s, parsing_timeout=None) for s in ("$x+1$", "$\\frac{2x+2}{2}$")]
    math_verify.verify(*warm_up, timeout_seconds=None)  # sets up the parser and simplify: 0.2 s
    return math_verify


def equal_values(a, b) -> bool:
    """Whether two sympy numbers are equal whatever their size: their difference is exactly 0,
    or each of its terms has a value and they cancel at every precision sympy tries (up to 1000
    digits). sqrt(3)e-20 != sqrt(2)e-20, 10^20 + 1 != 10^20, sqrt(2 + sqrt(3)) ==
    (sqrt(6) + sqrt(2))/2. With variables, False: math-verify's simplify decides."""
    from sympy import Add
    from sympy.core.evalf import PrecisionExhausted

    try:
        difference = a - b
        if difference.free_symbols:
            return False
        for term in Add.make_args(difference):
            term.evalf(15, strict=True)
    except Exception:  # PrecisionExhausted: a term with no value sympy can find, tan(10^(10^5))
        return False
    try:
        return difference.evalf(30, strict=True, maxn=1000) == 0
    except PrecisionExhausted:
        return True


_PARSED = {}  # answer -> math-verify's parse of it


def _parse(answer: str):
    """math-verify's parse, cached, its floats made the exact decimals they were written as
    (0.00000049 -> 49/10^8: sympy compares floats at 15 digits, 1.0e20 == 10^20 + 1)."""
    from sympy import Float, Rational

    if answer not in _PARSED:  # LaTeX only: the default also takes a bare number out of a
        # formula it cannot parse, so '\\omega(v+2/2)' and '\\omega(v+1/2)' both became 2
        mv = load_math_verify()
        parsed = mv.parse(
            f"\\boxed{{{answer}}}", [mv.LatexExtractionConfig()], parsing_timeout=None
        )
        subscripts = re.search(r"[A-Za-z]_", re.sub(r"\\[A-Za-z]+", "", answer))
        if parsed and subscripts and getattr(parsed[0], "free_symbols", None) == set():
            parsed = []  # subscripts lost: '\\frac{2}{3} E_{1}+\\frac{2}{3} E_{2}' read as 2/3
        for i, p in enumerate(parsed):  # a sympy object, then the text it was read from
            floats = p.atoms(Float) if hasattr(p, "atoms") else ()
            parsed[i] = (
                p.xreplace({f: Rational(str(f)) for f in floats if f.is_finite}) if floats else p
            )
        if len(_PARSED) >= 65536:
            _PARSED.clear()
        _PARSED[answer] = parsed
    return _PARSED[answer]


@functools.lru_cache(maxsize=16384)
def gold_form(gold: str) -> Optional[tuple[str, Optional[str], Optional[Fraction]]]:
    """The gold normalised once per problem: (text, choice letter, exact number), or None if it
    is out of bounds."""
    gold = both_sides(gold)
    if out_of_bounds(gold):
        return None
    return gold, choice_letter(gold, exact=True), plain_number(gold)


def equal(answer: str, gold: str) -> bool:
    """Whether answer (a completion's, as grader.py finds it) equals gold mathematically."""
    form, answer = gold_form(gold), both_sides(answer)
    if form is None or out_of_bounds(answer):
        return False
    gold, letter, number = form
    if " ".join(answer.split()) == " ".join(gold.split()):  # the same text
        return True
    answer = answer_only(answer)
    chosen = choice_letter(answer, exact=False)
    if letter and chosen:  # a multiple-choice question
        return chosen == letter
    a = plain_number(answer)
    if a is not None and number is not None:
        return a == number
    return bool(load_math_verify().verify(_parse(gold), _parse(answer), timeout_seconds=None))
