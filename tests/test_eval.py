"""eval.py: the training run's prompt and length, pass@k, batching, grading workers, the
table and files it writes, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import HERE, write_jsonl

import aent
import eval as ev
from support.demo import build_tiny


def test_eval_scores_a_checkpoint_with_its_training_prompt_and_length(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "trainer_state.pt").write_bytes(b"")  # a checkpoint of aent.py
    (run / "args.json").write_text(json.dumps({"prompt": "r1", "max_new_tokens": 7168}))
    args = ev.parse_args(["--model", str(run / "final"), "--protocol", "aent"])
    assert (args.prompt, args.max_new_tokens, args.top_k, args.top_p) == ("r1", 7168, 20, 0.95)
    args = ev.parse_args(["--model", str(run / "final"), "--prompt", "qwen-math"])
    assert (args.prompt, args.max_new_tokens, args.top_k) == ("qwen-math", 7168, 0)
    args = ev.parse_args(["--model", "Qwen/Qwen2.5-Math-1.5B"])
    assert (args.prompt, args.max_new_tokens) == ("qwen-math", 2048)


def test_eval_takes_a_runs_settings_only_for_that_runs_checkpoint(tmp_path):
    run = tmp_path / "run"
    for folder in ("final", "step_000050", "my_export"):
        (run / folder).mkdir(parents=True)
    (run / "step_000050" / "trainer_state.pt").write_bytes(b"")
    (run / "args.json").write_text(json.dumps({"prompt": "r1", "max_new_tokens": 7168}))
    assert ev.parse_args(["--model", str(run / "step_000050")]).prompt == "r1"
    for other in ("final", "my_export"):  # no trainer state, or not a checkpoint's name
        args = ev.parse_args(["--model", str(run / other)])
        assert (args.prompt, args.max_new_tokens) == ("qwen-math", 2048)


def test_eval_validates_an_r1_distill_run_as_its_recipe_did_without_top_k(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "trainer_state.pt").write_bytes(b"")
    (run / "args.json").write_text(json.dumps({"recipe": "r1-distill", "prompt": "verl"}))
    args = ev.parse_args(["--model", str(run / "final"), "--protocol", "aent"])
    want = (0.6, 0.95, 0, 4, "verl")
    assert (args.temperature, args.top_p, args.top_k, args.samples, args.prompt) == want


def test_pass_at_k_matches_the_combinatorial_definition():

    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(expected)


def test_complete_returns_completions_in_prompt_order_whatever_the_batching(tiny):

    model, tokenizer = tiny
    gen = aent.generation_config(tokenizer, [0], max_new_tokens=6, temperature=0)
    prompts = [
        "Question: a\nAnswer:",
        "Question: a much longer one\nAnswer:",
        "Q\nA:",
        "Question: 1+1\nAnswer:",
    ]
    together = ev.complete(model, tokenizer, prompts, gen, samples=1, batch_size=3)
    alone = [ev.complete(model, tokenizer, [p], gen)[0] for p in prompts]
    assert together == alone


def test_grading_in_worker_processes_agrees_with_grading_here():

    pairs = [
        ("\\boxed{0.5}", "\\frac12"),
        ("\\boxed{3}", "4"),
        ("so 1,600", "1600"),
        ("nothing", "1"),
    ]
    assert ev.grade_all(pairs, workers=2) == ev.grade_all(pairs, workers=0) == [1.0, 0.0, 1.0, 0.0]


def test_eval_runs_end_to_end_on_a_checkpoint_and_writes_table_summary_and_predictions(
    tmp_path, tiny_dir
):
    rows = [
        {
            "problem": f"What is {a}+{a}?",
            "solution": f"\\boxed{{{2 * a}}}",
            "level": 1 + a % 2,
            "subject": "Algebra",
        }
        for a in range(5)
    ]
    bench = write_jsonl(tmp_path / "bench.jsonl", rows)
    cmd = [
        sys.executable,
        "eval.py",
        "--model",
        str(tiny_dir),
        "--benchmarks",
        bench,
        "--protocol",
        "aent",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--out-dir",
        str(tmp_path / "out"),
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pass@1" in res.stdout and "Level 1" in res.stdout and "Algebra" in res.stdout
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    result = summary["benchmarks"][bench]
    preds = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert (
        result["n"] == len(preds) == 5 and summary["samples"] == 4 and summary["temperature"] == 0.6
    )
    assert all(len(p["completions"]) == len(p["verdicts"]) == len(p["answers"]) == 4 for p in preds)
    assert [p["gold"] for p in preds] == [str(2 * a) for a in range(5)]
    assert result["pass@1"] == pytest.approx(sum(sum(p["verdicts"]) for p in preds) / 20)
    assert result["pass@4"] == pytest.approx(sum(any(p["verdicts"]) for p in preds) / 5)
    assert set(result["by_level"]) == {"Level 1", "Level 2"}
    sources = [s for p in preds for s in p["answer_from"]]
    assert result["completions"] == 20 and result["no_answer"] == sources.count(None)
    assert result["unboxed"] == sum(s in ("statement", "number") for s in sources)
    assert "no answer" in res.stdout and "unboxed (correct)" in res.stdout


@pytest.mark.parametrize(
    "bench_rows, model, words",
    [
        (None, "tiny_dir", "unknown benchmark"),
        (
            [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "q", "solution": "no box"}],
            "tiny_dir",
            "line 2",
        ),
        ([{"problem": "p", "answer": "1"}, "{not json"], "tiny_dir", "line 2"),
        ([{"problem": "p", "answer": "1"}], "no_tokenizer", "no tokenizer"),
    ],
)
def test_eval_bad_input_is_one_line_error(tmp_path, tiny_dir, bench_rows, model, words):
    bench = "gsm9k" if bench_rows is None else write_jsonl(tmp_path / "b.jsonl", bench_rows)
    if model == "no_tokenizer":
        model_dir = tmp_path / "m"
        build_tiny()[0].save_pretrained(model_dir)
    else:
        model_dir = tiny_dir
    cmd = [
        sys.executable,
        "eval.py",
        "--model",
        str(model_dir),
        "--benchmarks",
        bench,
        "--out-dir",
        str(tmp_path / "out"),
    ]
    res = subprocess.run(
        cmd, cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def eval_flags(tmp_path, tiny_dir, n=6):
    rows = [{"problem": f"What is {a}+{a}?", "solution": f"\\boxed{{{2 * a}}}"} for a in range(n)]
    bench = write_jsonl(tmp_path / "bench.jsonl", rows)
    return ["--model", str(tiny_dir), "--benchmarks", bench, "--max-new-tokens", "3",
            "--batch-size", "2", "--out-dir", str(tmp_path / "out")]  # fmt: skip


def test_a_signal_stops_eval_after_its_batch_and_the_same_command_resumes_the_rest(
    tmp_path, tiny_dir, monkeypatch, capsys
):
    import signal

    flags, real = eval_flags(tmp_path, tiny_dir), ev.append_predictions
    sent = []

    def append_then_signal(out_dir, records):
        real(out_dir, records)
        if not sent:  # SIGTERM lands while the first batch is being written
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    monkeypatch.setattr(ev, "append_predictions", append_then_signal)
    assert ev.main(flags) is None
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: 2 problems kept in ") and "rerun" in last
    first = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(first) == 2 and not (tmp_path / "out" / "summary.json").exists()

    monkeypatch.setattr(ev, "append_predictions", real)
    summary = ev.main(flags)  # the same command: only the 4 problems left are generated
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 6
    result = summary["benchmarks"][flags[3]]
    assert result["n"] == 6 and result["generated_now"] == 4
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(6))


def test_eval_refuses_an_out_dir_holding_another_evaluation(tmp_path, tiny_dir):
    flags = eval_flags(tmp_path, tiny_dir, n=2)
    ev.main(flags)
    with pytest.raises(SystemExit) as stop:
        ev.main(flags + ["--temperature", "0.5"])
    assert "holds another evaluation (--temperature 0.0 -> 0.5)" in str(stop.value.code)


def test_a_full_disk_at_the_end_of_eval_keeps_the_predictions_and_leaves_no_tmp(
    tmp_path, tiny_dir, monkeypatch
):
    import errno

    from support import rundir

    flags, real = eval_flags(tmp_path, tiny_dir, n=2), rundir.write_atomic

    def full(path, text):
        if path.endswith("summary.json"):
            with open(path + ".tmp", "w") as f:
                f.write(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(rundir, "write_atomic", full)
    with pytest.raises(SystemExit) as stop:
        ev.main(flags)
    message = str(stop.value.code)
    assert message.startswith("error: cannot write ") and "No space left" in message
    assert "predictions are kept" in message and "\n" not in message
    out = tmp_path / "out"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(rundir, "write_atomic", real)
    assert ev.main(flags)["benchmarks"][flags[3]]["generated_now"] == 0  # nothing redone
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_an_out_of_range_eval_seed_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "x", "--seed", str(2**70)])
    assert "--seed must be in [0, 2**32)" in capsys.readouterr().err
