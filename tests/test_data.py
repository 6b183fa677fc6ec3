"""Data and prompts: rows read into problems, chat-template prompts, local files, prompt
lengths, and bad input as one error line before any work."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import HERE, QWEN, one_line_exit, run_aent

import aent
from support import data
from support.demo import build_tiny


def test_problem_from_row_reads_gsm8k_math_and_plain_answer_rows():
    assert data.problem_from_row({"question": "q", "answer": "work\n#### 1,600"}) == {
        "question": "q",
        "gold": "1600",
    }
    assert data.problem_from_row({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."}) == {
        "question": "p",
        "gold": "\\frac{1}{2}",
    }
    assert data.problem_from_row({"problem": "p", "answer": 27.0}) == {
        "question": "p",
        "gold": "27.0",
    }
    assert data.problem_from_row({"problem": "p", "solution": "no box"}) is None
    assert data.problem_from_row({"answer": "3"}) is None
    assert data.problem_from_row({"question": "  q \n", "answer": "3"})["question"] == "q"


def test_prompt_uses_the_chat_template_with_the_system_prompt_when_there_is_one(tiny):
    _, tokenizer = tiny
    assert aent.build_prompt(tokenizer, "What is 1 + 1?") == "Question: What is 1 + 1?\nAnswer:"
    tokenizer = build_tiny()[1]
    tokenizer.chat_template = (  # Qwen2.5's ChatML, shortened
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    prompt = aent.build_prompt(tokenizer, "What is 1 + 1?")
    assert prompt.startswith("<|im_start|>system\n" + aent.SYSTEM_PROMPT) and prompt.endswith(
        "<|im_start|>assistant\n"
    )


R1_TEMPLATE = (  # DeepSeek-R1-Distill's template, reduced to what a math prompt uses
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def test_prompt_styles_for_qwen_math_the_verl_recipe_and_r1(tiny):
    tokenizer = build_tiny()[1]
    tokenizer.chat_template, tokenizer.bos_token = R1_TEMPLATE, "<|endoftext|>"
    assert aent.build_prompt(tokenizer, "What is 1+1?", "r1") == (
        "<|endoftext|><｜User｜>What is 1+1?\nPlease reason step by step, and put your final "
        "answer within \\boxed{}.<｜Assistant｜><think>\n"
    )
    if not os.path.isdir(QWEN):
        pytest.skip(f"{QWEN} not present")
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(QWEN)
    assert aent.build_prompt(qwen, "What is 1+1?", "verl") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1? Let's think step by step and output "
        "the final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )  # the template's default system prompt, the recipe's instruction after the question


def test_a_saved_model_directory_trains_on_a_gsm8k_format_jsonl(tmp_path):
    model, tokenizer = build_tiny(seed=1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many?",
            "answer": f"{a} + {b} = {a + b}\n#### {a + b:,}",
        }
        for a in range(4)
        for b in range(900, 1300, 100)
    ]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cmd = [
        sys.executable,
        "aent.py",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "train.jsonl"),
        "--out-dir",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--prompts-per-step",
        "4",
        "--group-size",
        "2",
        "--mini-batch-prompts",
        "2",
        "--max-new-tokens",
        "8",
        "--max-prompt-tokens",
        "128",
        "--lr",
        "1e-4",
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["step"] == 1
    assert os.path.isfile(tmp_path / "run" / "final" / "config.json")


@pytest.mark.parametrize(
    "case",
    [
        "missing_dir",
        "unknown_hub_id",
        "missing_file",
        "binary_file",
        "bad_json",
        "no_gold",
        "too_long",
        "context",
    ],
)
def test_bad_training_input_is_one_line_error_before_any_work(tmp_path, tiny_dir, case):
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"})] * 3
    flags = [
        "--model",
        str(tiny_dir),
        "--dataset",
        str(data),
        "--max-new-tokens",
        "8",
        "--prompts-per-step",
        "2",
        "--mini-batch-prompts",
        "1",
    ]
    if case == "missing_dir":
        flags[1], words = str(tmp_path / "nope"), "does not exist"
    elif case == "unknown_hub_id":
        flags[1], words = "nobody/no-such-model", "cannot load model"
    elif case == "missing_file":
        flags[3], words = str(tmp_path / "absent.jsonl"), "not found"
    elif case == "binary_file":
        data.write_bytes(b"\xff\xfe\x00garbage\n")
        words = "line 1"
    elif case == "bad_json":
        rows[1], words = '{"question": "x", ', "line 2"
    elif case == "no_gold":
        rows[2], words = json.dumps({"question": "What is 1 + 1?"}), "line 3"
    elif case == "too_long":
        flags += ["--max-prompt-tokens", "20", "--long-prompts", "error"]
        words = "longer than --max-prompt-tokens"
    elif case == "context":
        flags[5], words = "5000", "exceeds the model's context"
    if case != "binary_file":
        data.write_text("\n".join(rows) + "\n")
    message = one_line_exit(aent.main, [*flags, "--out-dir", str(tmp_path / "out")])
    assert words in message
    assert not (tmp_path / "out").exists()


def test_long_prompts_are_skipped_with_a_count_by_default(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"question": q, "answer": "#### 4"}) for q in ["2+2?", "2+2?", "x" * 100]
        )
        + "\n"
    )
    res = run_aent(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(data),
        "--max-prompt-tokens",
        "40",
        "--max-new-tokens",
        "4",
        "--steps",
        "1",
        "--prompts-per-step",
        "2",
        "--mini-batch-prompts",
        "1",
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stderr[-1500:]
    assert "skipped 1 of 3 prompts longer than 40 tokens" in res.stdout


def test_dataset_errors_come_before_the_model_is_loaded(tmp_path):
    message = one_line_exit(
        aent.main,
        [
            "--model",
            "nobody/no-such-model",
            "--dataset",
            str(tmp_path / "absent.jsonl"),
            "--out-dir",
            str(tmp_path / "o"),
        ],
    )
    assert "absent.jsonl" in message


def test_a_huge_prompt_is_measured_as_too_long_without_being_tokenized(tiny):
    _, tokenizer = tiny
    prompts = ["Question: Repeat 7\nAnswer:", "Repeat " * 2_000_000, "a b " * 20]
    t0 = time.time()
    lengths = data.prompt_lengths(tokenizer, prompts, limit=64)
    assert time.time() - t0 < 2
    exact = [len(ids) for ids in tokenizer(prompts[::2], add_special_tokens=False).input_ids]
    assert lengths == [exact[0], 65, exact[1]] and exact[1] > 64  # over, but counted exactly


@pytest.mark.parametrize("case", ["every prompt over the limit", "100,000 nested brackets"])
def test_input_that_once_raised_a_traceback_is_one_line(tmp_path, case):
    flags = ["--model", "tiny", "--out-dir", str(tmp_path / "out")]
    if case == "every prompt over the limit":
        flags += ["--max-prompt-tokens", "1"]
        words = "longer than --max-prompt-tokens 1 (the first is problem 1)"
    else:
        (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
        flags += ["--dataset", str(tmp_path / "deep.jsonl")]
        words = "line 1: not valid JSON"
    assert words in one_line_exit(aent.main, flags)
    assert not (tmp_path / "out").exists()
