"""The run directory: its lock, the one-run-per-directory rule, and the logs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import HERE, one_line_exit, run_aent

import aent


def test_a_run_shorter_than_sample_every_stores_samples_of_its_first_and_last_step(tmp_path):
    args = aent.parse_args(["--model", "tiny", "--steps", "3", "--out-dir", str(tmp_path / "run")])
    assert args.sample_every > 3
    aent.train(args)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert sorted({s["step"] for s in samples}) == [1, 3] and len(samples) == 6
    assert all(set(s) == {"step", "prompt", "completion", "gold", "reward"} for s in samples)


def test_training_logs_held_out_accuracy_with_eval_every(tmp_path):
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--eval-size",
            "3",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    aent.train(args)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert "eval_accuracy" not in lines[0] and 0.0 <= lines[1]["eval_accuracy"] <= 1.0


def test_an_output_directory_holding_a_different_run_is_refused(tmp_path):
    out = str(tmp_path / "run")
    aent.main(["--model", "tiny", "--steps", "1", "--out-dir", out])
    assert "--lr" in one_line_exit(
        aent.main, ["--model", "tiny", "--steps", "2", "--lr", "0.5", "--out-dir", out]
    )
    aent.main(
        ["--model", "tiny", "--steps", "2", "--out-dir", out]
    )  # same settings, more steps: resumes
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    del saved["lora_rank"], saved["lora_alpha"]  # a run from before these flags existed
    (tmp_path / "run" / "args.json").write_text(json.dumps(saved))
    aent.main(["--model", "tiny", "--steps", "3", "--out-dir", out])  # resumes: they are defaults
    assert one_line_exit(aent.main, ["--model", "tiny", "--steps", "4", "--lora-rank", "8",
                                     "--out-dir", out]).count("--lora-rank")  # fmt: skip


def test_an_out_dir_that_is_a_file_or_holds_foreign_output_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_exit(
        aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "file")]
    )
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.jsonl").write_text("hi\n")
    assert "no args.json" in one_line_exit(
        aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "foreign")]
    )
    assert (tmp_path / "foreign" / "metrics.jsonl").read_text() == "hi\n"


@pytest.mark.slow
def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    hold = "import sys, time; from support import rundir; rundir.claim_out_dir(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(out)], cwd=HERE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_aent("--model", "tiny", "--steps", "1", "--out-dir", str(out))
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: another run (pid {holder.pid}) is using --out-dir {out}; wait for it to end"
        ]
        assert os.listdir(out) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    res = run_aent("--model", "tiny", "--steps", "1", "--out-dir", str(out))  # the lock died too
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]


def test_an_unwritable_out_dir_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "run")
    message = one_line_exit(aent.main, ["--model", "nobody/no-such-model", "--out-dir", out])
    assert message == f"error: cannot write to --out-dir {out}: Not a directory"
    cmd = [sys.executable, "eval.py", "--model", "nobody/no-such-model", "--out-dir", out]
    res = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [message]


def test_a_run_removes_only_its_own_half_written_files(tmp_path):
    out = tmp_path / "run"
    aent.main(["--model", "tiny", "--steps", "1", "--out-dir", str(out)])
    (out / "notes.tmp").mkdir()
    (out / "notes.tmp" / "mine.txt").write_text("x")
    (out / "draft.tmp").write_text("y")
    (out / "step_000007.tmp").mkdir()  # what a killed save leaves
    (out / "metrics.jsonl.tmp").write_text("z")
    aent.main(["--model", "tiny", "--steps", "2", "--out-dir", str(out)])  # resumes
    assert (out / "notes.tmp" / "mine.txt").read_text() == "x"
    assert (out / "draft.tmp").read_text() == "y"
    assert not (out / "step_000007.tmp").exists() and not (out / "metrics.jsonl.tmp").exists()
    assert not (out / ".lock").exists()  # released with the run


@pytest.mark.parametrize("content", ["[]", '"run"', "[[[[", "{}"])
def test_an_args_json_that_is_not_a_runs_settings_is_one_line(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text(content)
    flags = ["--model", "tiny", "--steps", "1", "--out-dir", str(out)]
    if content == "{}":  # settings, all missing: the defaults', which the demo's are not
        message = one_line_exit(aent.main, flags)
        assert "holds a different run (--model 'Qwen/Qwen2.5-Math-1.5B' -> 'tiny'" in message
        return
    assert (
        one_line_exit(aent.main, flags)
        == f"error: {out / 'args.json'} is damaged; choose another --out-dir"
    )


def test_a_full_disk_while_taking_the_lock_is_one_line(tmp_path, monkeypatch):
    import errno

    real = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    try:
        message = one_line_exit(aent.main, ["--model", "tiny", "--out-dir", str(tmp_path / "run")])
    finally:
        monkeypatch.setattr(os, "write", real)
    assert (
        message == f"error: cannot write to --out-dir {tmp_path / 'run'}: No space left on device"
    )


def test_every_completion_masked_out_is_said_in_a_line(tmp_path, capsys):
    args = aent.parse_args(["--model", "tiny", "--steps", "1", "--max-new-tokens", "1",
                            "--mask-truncated", "--group-size", "2", "--prompts-per-step", "2",
                            "--mini-batch-prompts", "1", "--out-dir", str(tmp_path / "run")])  # fmt: skip
    aent.train(args)
    out = capsys.readouterr().out
    assert "step 1: every completion was cut at --max-new-tokens and masked" in out
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["loss"] is None and line["entropy_full"] is None  # null, not NaN
