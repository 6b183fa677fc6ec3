"""The reward: which answer grader.py takes from a completion, and when it equals the gold."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from conftest import shared_rows

import grader
from grader import extract_answer, find_answer, grade
from support import equivalence
from support.data import problem_from_row


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
        ("she pays 1,600 dollars", "1,600"),
        ("first 3, then -4.5", "-4.5"),
        ("3/4 of it", "3/4"),
        ("no number here", None),
        ("cut off in \\boxed{12", None),
        ("\\boxed{3} and then 4", "3"),
    ],
)
def test_extract_answer_takes_the_last_boxed_else_the_last_number(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
        ("\\boxed{x = 3}", "3"),
        ("so 1,600 in total", "1600"),
        ("\\boxed{10\\text{ cm}}", "10"),
        ("\\boxed{(1, 2]}", "(1,2]"),
        ("\\boxed{30^\\circ}", "30"),
        ("The answer is 7", "7"),
    ],
)
def test_grade_accepts_equivalent_answers(completion, gold):
    assert grade(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{4}", "5"),
        ("\\boxed{0.33}", "\\frac13"),
        ("\\boxed{(2,1)}", "(1,2)"),
        ("\\boxed{7}", "-7"),
        ("no answer", "3"),
        ("\\boxed{\\frac{", "3"),
    ],
)
def test_grade_rejects_different_or_malformed_answers(completion, gold):
    assert grade(completion, gold) == 0.0


def test_grader_accepts_every_math500_solution_and_rejects_shifted_answers():
    rows = shared_rows("math500_test.jsonl")
    assert sum(grade(r["solution"], r["answer"]) for r in rows) == 500
    for r, other in zip(rows, rows[1:] + rows[:1]):
        if grade(r["solution"], other["answer"]):  # only where the two answers really agree
            assert (
                grade("\\boxed{" + r["answer"] + "}", other["answer"])
                and other["answer"].replace("x=", "") == r["answer"]
            )


def test_grader_accepts_every_gsm8k_test_gold_and_rejects_shifted_answers():
    rows = shared_rows("gsm8k_test.jsonl")
    golds = [problem_from_row(r)["gold"] for r in rows]
    assert sum(grade(r["answer"], g) for r, g in zip(rows, golds)) == 1319
    shifted = golds[1:] + golds[:1]
    accepted = [(g, s) for r, g, s in zip(rows, golds, shifted) if grade(r["answer"], s)]
    assert all(g == s for g, s in accepted)


@pytest.mark.parametrize(
    "completion, gold, verdict",
    [
        ("\\boxed{\\frac{3}{4}}", "0.75", 1),
        ("\\boxed{0.75}", "\\dfrac34", 1),
        ("\\boxed{\\tfrac{3}{4}}", "\\frac{3}{4}", 1),
        ("\\boxed{y = -2}", "-2", 1),
        ("\\boxed{12,345}", "12345", 1),
        ("\\boxed{5\\text{ inches}}", "5", 1),
        ("\\boxed{\\$4.50}", "4.5", 1),
        ("\\boxed{[2, 5)}", "[2,5)", 1),
        ("\\boxed{(3,-1)}", "(3, -1)", 1),
        ("\\boxed{45^\\circ}", "45", 1),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
        ("\\boxed{\\frac{3}{5}}", "0.75", 0),
        ("\\boxed{[2, 5]}", "[2,5)", 0),
        ("\\boxed{(-1,3)}", "(3,-1)", 0),
        ("\\boxed{12,346}", "12345", 0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{12}", 0),
        ("\\boxed{46^\\circ}", "45", 0),
        ("\\boxed{10^{10^{10}}}", "3", 0),
        ("\\boxed{\\frac{1}{0}}", "3", 0),
        ("\\boxed{}", "3", 0),
    ],
)
def test_grader_on_equivalent_forms_and_near_misses(completion, gold, verdict):
    assert grade(completion, gold) == verdict


GRADER_CLASSES = {
    "final-answer statement, no box": [
        ("Therefore, the answer is ${}$.", "\\frac{3}{56}", "\\frac{3}{55}"),
        ("The answer is {}. Next we check: 3 + 4 = 7 and 12 - 5 = 7.", "18", "17"),
        ("Final Answer: The final answer is ${}$. I hope it is correct.", "6", "5"),
        ("**Answer:** {}\n\nSteps used 3 and 9.", "42", "24"),
        ("So the answer is: \\(x = {}\\)", "-2", "2"),
        ("We verify the answer is correct: 5 + 1 = 6.\nThe answer is {}.", "11", "6"),
    ],
    "units in the answer": [
        ("\\boxed{{\\text{{{} inches}}}}", "42", "41"),
        ("\\boxed{{{}\\text{{ cm}}^2}}", "5", "6"),
        ("\\boxed{{{} dollars}}", "18", "19"),
        ("\\boxed{{{} centimeters}}", "12", "21"),
        ("\\boxed{{{} \\text{{ inches per second}}}}", "10", "100"),
        ("\\boxed{{{} square units}}", "\\frac{3}{2}", "\\frac{2}{3}"),
        ("The answer is {} apples.", "18", "81"),
    ],
    "degrees": [
        ("\\boxed{{{}°}}", "30^\\circ", "31^\\circ"),
        ("\\boxed{{{} degrees}}", "45^\\circ", "54^\\circ"),
        ("\\boxed{{{}^{{\\circ}}}}", "120", "60"),
    ],
    "choice letters": [
        ("\\boxed{{\\text{{{} Plane}}}}", "\\text{(C)}", "\\text{(D)}"),
        ("\\boxed{{{}}}", "(B)", "(E)"),
        ("The answer is {}.", "\\text{(A)}", "\\text{(C)}"),
    ],
    "scientific notation": [
        ("\\boxed{{{} \\times 10^{{33}}}}", "4.5e33", "4.6e33"),
        ("\\boxed{{{}\\cdot10^{{-18}}}}", "2.88e-18", "2.87e-18"),
        ("\\boxed{{{} x 10^{{8}}}}", "3.0e8", "3.1e8"),
    ],
}


def grader_cases():
    for kind, rows in GRADER_CLASSES.items():
        for template, right, wrong in rows:
            letter = re.fullmatch(r"(?:\\text\{)?\(([A-E])\)\}?", right)
            for value, verdict in ((right, 1), (wrong, 0)):
                shown = value
                if letter:  # the model writes the letter the way the template shows it
                    shown = "(" + re.search(r"\(([A-E])\)", value).group(1) + ")"
                elif kind == "scientific notation":
                    shown = value.split("e")[0]
                elif kind == "degrees":
                    shown = value.replace("^\\circ", "")
                yield pytest.param(template.format(shown), right, verdict, id=f"{kind}-{verdict}")


@pytest.mark.parametrize("completion, gold, verdict", list(grader_cases()))
def test_grader_accepts_each_new_form_of_the_right_value_and_rejects_a_wrong_one(
    completion, gold, verdict
):
    assert grade(completion, gold) == verdict


@pytest.mark.parametrize(
    "completion, gold, verdict",
    [
        ("\\boxed{2.88 \\times 10^{-18}}", "2.88 \\times 10^{-19}", 0),  # rounding equated these
        ("\\boxed{2.88 \\times 10^{-19}}", "2.88e-19", 1),
        ("\\boxed{3e8}", "3 \\times 10^{8}", 1),
        ("\\boxed{3E+9}", "3 \\times 10^{8}", 0),
        ("\\boxed{1000001}", "1000000", 0),
        ("\\boxed{13536}", "13535", 0),
        ("\\boxed{0.333333}", "\\frac{1}{3}", 0),  # plain numbers compare exactly
        ("\\boxed{1.50}", "\\frac{3}{2}", 1),
        ("\\boxed{12,345}", "12345", 1),
        ("\\boxed{2,3}", "23", 0),  # a list, not a thousands separator
        ("\\boxed{2 pi}", "2", 0),  # math words are not units
        ("\\boxed{\\text{(D) Plane}}", "\\text{(C)}", 0),
        ("the answer is the number of ways to choose them. So we get 10", "10", 1),
        ("\\boxed{" + "(" * 200 + "5" + ")" * 200 + "}", "5", 1),  # was a 5 s timeout
        ("\\boxed{" + "(" * 200 + "6" + ")" * 200 + "}", "5", 0),
        ("\\boxed{" + "{" * 60 + "84" + "}" * 60 + "}", "84", 1),
    ],
)
def test_grader_compares_plain_numbers_exactly_and_stays_strict(completion, gold, verdict):
    t0 = time.time()
    assert grade(completion, gold) == verdict
    assert time.time() - t0 < 2


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{6xy}", "6"),  # letters after a number are a unit only if they name one
        ("\\boxed{(x+1) squared}", "x+1"),
        ("\\boxed{3 dozen}", "3"),
        ("\\boxed{0.5 percent}", "\\frac12"),
        ("\\boxed{100, 200}", "100200"),  # a list, not a thousands separator
        ("\\boxed{100200}", "100, 200"),
        ("\\boxed{3 4}", "34"),
        ("\\boxed{A B C D E}", "(A)"),  # several letters are not one choice
        ("\\boxed{A and C}", "(A)"),
        ("\\boxed{(A) (B) (C) (D) (E)}", "(A)"),
        ("The answer is 5. Wait, that is wrong: the answer is not 5, it is 6.", "5"),
        ("\\boxed{" + "1" * 5000 + "}", "1"),  # too many digits for int(): 0, not an exception
    ],
)
def test_grader_rejects_wrong_answers_that_normalisation_could_make_equal(completion, gold):
    assert grade(completion, gold) == 0.0


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 12 " + "apples remain after everything is distributed " * 3,
        "\\boxed{1" + "\\ " * 5000 + "x}",
        "\\boxed{" + "{" * 10000 + "}" * 10000 + "}",
        "the answer is not " * 7000,
        "\\boxed{" + "\\text{" * 15000 + "}",
        "\\boxed{" + " " * 20000 + "5 inches}",
    ],
)
def test_grader_time_stays_bounded_on_adversarial_answers(completion):
    t0 = time.time()
    grade(completion, "12")
    assert time.time() - t0 < 2  # regexes outside math-verify's timeout must not backtrack


@pytest.mark.parametrize(
    "text, answer, source",
    [
        ("so \\boxed{7} and then 8", "7", "boxed"),
        ("cut off in \\boxed{12", None, None),
        ("The answer is $\\frac{1}{2}$. Also 3.", "\\frac{1}{2}", "statement"),
        ("so the answer is correct, 12", "12", "number"),
        ("no answer at all", None, None),
    ],
)
def test_find_answer_says_where_the_answer_came_from(text, answer, source):
    assert find_answer(text) == (answer, source)


# ----------------------------------------------------------------------------------------------
# A hostile probe: false accepts, negated answers, multipliers, prose read as a choice, and
# grading time and verdicts that must not depend on the machine's load
# ----------------------------------------------------------------------------------------------
def cpu_seconds(completion, gold):
    """(verdict, CPU seconds this process spent on it)."""
    t0 = time.process_time()
    verdict = grader.grade(completion, gold)
    return verdict, time.process_time() - t0


# ----------------------------------------------------------------------------------------------
# Numbers: exact, whatever their size
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{0.0}", "10^{-7}"),  # math-verify rounds floats to 6 decimals
        ("0.00000049", "10^{-7}"),
        ("\\boxed{\\sqrt{3}\\cdot 10^{-20}}", "\\sqrt{2}\\cdot 10^{-20}"),  # it chops < 1e-15
        ("\\boxed{\\sqrt{3}\\times 10^{-60}}", "\\sqrt{2}\\times 10^{-60}"),
        ("\\boxed{1.0 \\times 10^{20}}", "10^{20}+1"),  # sympy floats have 15 digits
        ("\\boxed{1e20}", "10^{20}+1"),
        ("\\boxed{1.0e20}", "100000000000000000001"),
        ("\\boxed{\\frac{10^{101}}{10}}", "10^{100}+1"),
        ("\\boxed{0}", "10^{-30}"),
        ("\\boxed{0}", "1 \\cdot 10^{-9}"),
        ("\\boxed{0.0}", "1e-7"),
        ("\\boxed{10^{-7}}", "0"),
        ("\\boxed{2^{-100}}", "0"),
        ("\\boxed{e^{-50}}", "0"),
        ("\\boxed{2\\cdot 10^{-20}}", "10^{-20}"),
        ("\\boxed{4.5 \\times 10^{-30}}", "4.6 \\times 10^{-30}"),
        ("\\boxed{1}", "1+10^{-20}"),
        ("\\boxed{\\pi}", "3.14159265358979"),
        ("\\boxed{0.866025}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\sqrt{10^{40}+1}}", "10^{20}"),
        ("\\boxed{x+10^{-20}}", "x"),
        ("\\boxed{(0, 1)}", "(10^{-7}, 1)"),
        ("\\boxed{(\\sqrt{3}\\cdot 10^{-20}, 1)}", "(\\sqrt{2}\\cdot 10^{-20}, 1)"),
        ("\\boxed{[0, 10^{-9}]}", "[0, 0]"),
        ("\\boxed{\\{0\\}}", "\\{10^{-8}\\}"),
        ("\\boxed{x = 0}", "x = 10^{-8}"),
        (
            "\\boxed{\\begin{pmatrix}0\\\\1\\end{pmatrix}}",
            "\\begin{pmatrix}10^{-9}\\\\1\\end{pmatrix}",
        ),
    ],
)
def test_a_number_off_by_any_amount_however_small_or_large_scores_0(completion, gold):
    assert grader.grade(completion, gold) == 0.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("\\boxed{\\sqrt{2+\\sqrt{3}}}", "\\frac{\\sqrt{6}+\\sqrt{2}}{2}"),  # equal, not identical
        ("\\boxed{\\frac{\\sqrt{6}+\\sqrt{2}}{4}}", "\\cos \\frac{\\pi}{12}"),
        ("\\boxed{\\log_2 8}", "3"),
        ("\\boxed{\\frac{\\pi}{4}}", "\\arctan 1"),
        ("\\boxed{10^{-7}}", "0.0000001"),
        ("\\boxed{1e-7}", "10^{-7}"),
        ("\\boxed{\\frac{1}{10^{7}}}", "10^{-7}"),
        ("\\boxed{\\sqrt{3}\\cdot 10^{-20}}", "\\sqrt{3}\\times 10^{-20}"),
        ("\\boxed{10^{20}+1}", "100000000000000000001"),
        ("\\boxed{0.1+0.2}", "0.3"),
        ("\\boxed{0.5x}", "\\frac{x}{2}"),
        ("\\boxed{50\\%}", "50"),
        ("\\boxed{50\\%}", "0.5"),
        ("\\boxed{(1,2]}", "(1, 2]"),
        ("\\boxed{(3,-1)}", "(3, -1)"),
        ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),
        ("\\boxed{x=\\frac{1}{2}}", "0.5"),
        ("\\boxed{45^\\circ}", "45"),
        (
            "\\boxed{\\begin{pmatrix}0.5\\\\1\\end{pmatrix}}",
            "\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}",
        ),
    ],
)
def test_equal_values_in_different_forms_still_score_1(completion, gold):
    assert grader.grade(completion, gold) == 1.0


# ----------------------------------------------------------------------------------------------
# A number the completion negates or rejects is not its answer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion",
    [
        "The answer is not 42.",
        "I first guessed 42, but that is wrong.",
        "The answer isn't 42.",
        "The answer is not equal to 42",
        "It is definitely not 42",
        "It cannot be 42",
        "It can't be 42.",
        "The result is never 42",
        "The answer doesn't equal 42",
        "So x \\neq 42",
        "So x ≠ 42",
        "It is 43 and not 42.",
        "42 is incorrect.",
        "42 is not the answer.",
        "We got 42, which is wrong.",
        "Maybe 42? No, that's not quite right.",
        "The answer is $42$, but this is incorrect.",
        "The answer is not $42$.",
        "Final Answer: 42 is wrong",
        "The answer is not \\boxed{42}.",
        "So \\boxed{42} is wrong.",
        "\\boxed{42} is incorrect",
        "I first guessed 42. That is wrong.",
        "The answer is 42.\nWait, that's not right.",
    ],
)
def test_a_negated_or_rejected_number_is_not_the_answer(completion):
    assert grader.grade(completion, "42") == 0.0


def test_a_rejected_final_answer_statement_falls_back_to_the_number_after_it():
    completion = "**Final Answer:** 17 is wrong, so 19"
    assert grader.find_answer(completion) == ("19", "number")
    assert grader.grade(completion, "17") == 0.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("The answer is 42, not 41.", "42"),
        ("The answer isn't 40, it's 42", "42"),
        ("so the answer is correct, 12", "12"),
        ("The number of students who did not pass is 12", "12"),  # 'not' negates 'pass'
        ("The answer is $42$. I hope it is correct.", "42"),
        ("We verify the answer is correct: 5 + 1 = 6.\nThe answer is 11.", "11"),
        ("Hence \\boxed{42} is the correct answer.", "42"),
        ("The answer is 42. Option A is wrong.", "42"),  # the next sentence is not about 42
    ],
)
def test_an_answer_stated_next_to_a_negation_of_something_else_still_counts(completion, gold):
    assert grader.grade(completion, gold) == 1.0


# ----------------------------------------------------------------------------------------------
# Multiplier words multiply; a capital opening a phrase is no choice
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{5 \\text{ million}}",
        "\\boxed{5 million}",
        "\\boxed{5million}",
        "\\boxed{5 Million}",
        "\\boxed{5 \\mathrm{million}}",
        "\\boxed{5\\,\\text{million}}",
        "\\boxed{\\text{5 million}}",
        "\\boxed{5 \\text{ million dollars}}",
        "\\boxed{5 \\text{ thousand}}",
        "\\boxed{5 thousands}",
        "\\boxed{5 hundred}",
        "\\boxed{5 billion}",
        "\\boxed{5 trillion}",
        "\\boxed{5 dozen}",
        "\\boxed{5 squared}",
        "The answer is 5 million.",
        "The answer is 5 million dollars.",
        "so 5 million",
    ],
)
def test_a_number_with_a_multiplier_word_is_not_the_bare_number(completion):
    assert grader.grade(completion, "5") == 0.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{5 \\text{ million}}", "5000000"),
        ("The answer is 5 million.", "5000000"),
        ("\\boxed{3 dozen}", "36"),
        ("\\boxed{2.5 billion}", "2500000000"),
        ("\\boxed{5 hundred thousand}", "500000"),
        ("\\boxed{50 \\text{ percent}}", "0.5"),  # as 50\%
        ("\\boxed{5 squared}", "25"),
    ],
)
def test_a_number_with_a_multiplier_word_is_the_product(completion, gold):
    assert grader.grade(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{A lot}", "(A)"),
        ("\\boxed{\\text{A lot}}", "(A)"),
        ("\\boxed{B sides}", "(B)"),
        ("\\boxed{D dollars}", "(D)"),
        ("\\boxed{E for everyone}", "\\text{(E)}"),
        ("The answer is A lot.", "(A)"),
    ],
)
def test_a_capital_letter_opening_a_phrase_is_not_a_choice(completion, gold):
    assert grader.grade(completion, gold) == 0.0


@pytest.mark.parametrize(
    "completion",
    ["\\boxed{\\text{(C) Plane}}", "\\boxed{C. Plane}", "\\boxed{C Plane}", "The answer is (C)."],
)
def test_a_choice_letter_with_its_text_is_still_the_choice(completion):
    assert grader.grade(completion, "\\text{(C)}") == 1.0


# ----------------------------------------------------------------------------------------------
# Bounds: the verdict depends on the inputs alone, and every grade is quick
# ----------------------------------------------------------------------------------------------
NESTED_6 = "\\boxed{" + "[(" * 3 + "5" + ")]" * 3 + "}"  # [([([(5)])])]
NESTED_7 = "\\boxed{(" + "[(" * 3 + "5" + ")]" * 3 + ")}"
NESTED_240 = "\\boxed{" + "{(" * 120 + "5" + ")}" * 120 + "}"  # 0 or 1 by load, once


def test_an_answer_nested_up_to_6_deep_is_graded_and_deeper_scores_0_at_once():
    assert cpu_seconds(NESTED_6, "5")[0] == 1.0
    for completion in (NESTED_7, NESTED_240):
        verdict, seconds = cpu_seconds(completion, "5")
        assert verdict == 0.0 and seconds < 0.1


def test_redundant_nesting_is_dropped_before_the_bound_is_applied():
    assert grader.grade("\\boxed{" + "(" * 240 + "5" + ")" * 240 + "}", "5") == 1.0
    assert grader.grade("\\boxed{" + "{ " * 240 + "5" + " }" * 240 + "}", "5") == 1.0


def test_an_answer_or_gold_longer_than_250_characters_scores_0():
    sum_of_ones = "+".join(["1"] * 125)  # 249 characters
    assert grader.grade(f"\\boxed{{{sum_of_ones}}}", "125") == 1.0
    assert grader.grade(f"\\boxed{{{sum_of_ones}+1}}", "126") == 0.0
    assert grader.grade("\\boxed{126}", sum_of_ones + "+1") == 0.0


@contextmanager
def loaded_machine():
    """Two busy processes per core."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def test_the_verdict_on_a_deeply_nested_answer_does_not_depend_on_the_load():
    nested = (NESTED_6, NESTED_7, NESTED_240)
    quiet = [grader.grade(completion, "5") for completion in nested]
    equivalence._PARSED.clear()  # parse again, under load
    equivalence.load_math_verify().parser.parse_latex_cached.cache_clear()
    with loaded_machine():
        loaded = [cpu_seconds(completion, "5") for completion in nested]
    assert [verdict for verdict, _ in loaded] == quiet == [1.0, 0.0, 0.0]
    assert all(seconds < 2 for _, seconds in loaded)


def test_the_verdict_does_not_depend_on_what_was_graded_before():
    pairs = [(NESTED_6, "5"), ("\\boxed{\\sqrt{2+\\sqrt{3}}}", "\\frac{\\sqrt{6}+\\sqrt{2}}{2}")]
    warm = [grader.grade(c, g) for c, g in pairs]
    equivalence._PARSED.clear()
    equivalence.gold_form.cache_clear()
    assert [grader.grade(c, g) for c, g in pairs] == warm == [1.0, 1.0]


PATHOLOGICAL = {
    "a tower of exponents": ("\\boxed{10^{10^{10^{10}}}}", "3"),
    "a huge factorial": ("\\boxed{(10^{9})!}", "3"),
    "the sine of a huge number": ("\\boxed{\\sin(10^{10^{5}})}", "0"),
    "a binomial of a million": ("\\boxed{\\binom{10^{6}}{5\\cdot 10^{5}}}", "3"),
    "a 10000th power": ("\\boxed{(x+1)^{10000}}", "x^{10000}+1"),
    "two differential equations (sympy's solve ran 10 s)": (
        "\\boxed{\\frac{d^{2} v_{o}}{d t^{2}}+\\frac{v_{o}}{L C}=\\frac{v_{i}}{L C}}",
        "m l \\ddot{\\theta}(t)-m g \\sin \\theta(t)=f(t) \\cos \\theta(t)",
    ),
    "40 nested fractions": ("\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}", "1"),
    "a chain of 30 equalities": ("\\boxed{" + "=".join(f"x_{{{i}}}" for i in range(30)) + "}", "1"),
    "a gold with a run of 16,000 spaces": ("\\boxed{12}", "1" + " " * 16000 + "2"),
    "a gold of 4,000 spaced brace pairs": ("\\boxed{12}", "{ " * 4000 + "12" + " }" * 4000),
    "a gold of 20,000 nested braces": ("\\boxed{12}", "{" * 20000 + "12" + "}" * 20000),
    "an answer of 100,000 spaces": ("\\boxed{1" + " " * 100000 + "2}", "12"),
    "100 kB without a box": ("7 " * 50000, "7"),
}


@pytest.mark.parametrize("completion, gold", PATHOLOGICAL.values(), ids=PATHOLOGICAL)
def test_every_grade_takes_under_2_s_of_cpu(completion, gold):
    verdict, seconds = cpu_seconds(completion, gold)
    assert verdict in (0.0, 1.0) and seconds < 2


@pytest.mark.parametrize("n", [100_000, 400_000])
def test_normalisation_is_linear_in_the_length_of_the_text(n):
    """At 7.6 s for 16,000 spaces, a quadratic normaliser would take minutes on these."""
    for text in ("1" + " " * n + "2", "{ " * (n // 2) + "1" + " }" * (n // 2), "5\\ " * (n // 3)):
        t0 = time.process_time()
        equivalence.both_sides(text)
        assert time.process_time() - t0 < 2


def test_the_gold_is_normalised_once_per_problem(monkeypatch):
    gold = "\\frac{\\sqrt{3}}{2}"
    calls = []
    both_sides = equivalence.both_sides
    monkeypatch.setattr(equivalence, "both_sides", lambda s: calls.append(s) or both_sides(s))
    equivalence.gold_form.cache_clear()
    for completion in ("\\boxed{\\frac{\\sqrt3}{2}}", "\\boxed{0.87}", "\\boxed{\\sin 60^\\circ}"):
        grader.grade(completion, gold)
    assert calls.count(gold) == 1


def test_a_grade_past_its_cpu_budget_leaves_no_timer_or_handler_behind():
    handler = signal.getsignal(signal.SIGPROF)
    assert grader.grade("\\boxed{10^{10^{10^{10}}}}", "3") == 0.0
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) is handler


def test_grading_works_outside_the_main_thread_without_a_budget():
    with ThreadPoolExecutor(2) as pool:
        pairs = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{x^2+2x+1}", "(x+1)^2")]
        assert list(pool.map(lambda pair: grader.grade(*pair), pairs)) == [1.0, 1.0]
