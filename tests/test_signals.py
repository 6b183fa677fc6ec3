"""SIGINT, SIGTERM and SIGHUP: the step is finished and saved; Ctrl-C during the imports."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import HERE

import aent
from support import checkpoints
from support.signals import StopRequest


def sigterm_once_a_step_is_logged(out, steps):
    """Start a tiny run, send SIGTERM as soon as its first step is logged; (returncode, stdout, stderr).
    Steps of 1024 sequences take long enough here for the signal to land inside step 2."""
    flags = [
        "--model",
        "tiny",
        "--steps",
        str(steps),
        "--save-every",
        "0",
        "--prompts-per-step",
        "64",
        "--out-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        [sys.executable, "aent.py", *flags],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    start = time.time()
    while not (out / "metrics.jsonl").exists() and time.time() - start < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = sigterm_once_a_step_is_logged(out, steps=200)
    assert code == 0, stderr[-2000:]
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "rerun to resume" in last
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert (
        torch.load(
            os.path.join(checkpoints.latest_checkpoint(str(out)), "trainer_state.pt"),
            weights_only=True,
        )["step"]
        == steps[-1]
    )


def test_a_signal_during_the_last_step_still_writes_final(tmp_path, monkeypatch, capsys):
    stop, real, calls = StopRequest(), aent.policy_update, []

    def update(*a, **k):  # the signal lands inside the last step's update
        calls.append(1)
        if len(calls) == 2:
            stop.requested = "SIGTERM"
        return real(*a, **k)

    monkeypatch.setattr(aent, "policy_update", update)
    out = tmp_path / "run"
    aent.train(
        aent.parse_args(
            ["--model", "tiny", "--steps", "2", "--save-every", "0", "--out-dir", str(out)]
        ),
        stop,
    )
    assert (out / "final" / "trainer_state.pt").exists() and not list(out.glob("step_*"))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: 2 steps")


def test_an_interrupt_reports_whether_a_checkpoint_exists(tmp_path, three_steps):
    for out, note in [(tmp_path, "no checkpoint was written"),
                      (three_steps, f"the last checkpoint is {three_steps / 'final'}")]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            with StopRequest(str(out)):
                raise KeyboardInterrupt
        assert stop.value.code == f"interrupted ({note})"


def test_ctrl_c_while_the_libraries_import_exits_without_a_traceback():
    proc = subprocess.Popen(
        [sys.executable, "aent.py", "--help"], cwd=HERE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the imports finished before the signal")
    assert proc.returncode == -signal.SIGINT and "Traceback" not in stderr


@pytest.mark.slow
def test_a_reader_of_stdout_that_goes_away_does_not_stop_the_run(tmp_path):
    """`aent.py ... | head -1`: the pipe closes after the first line; the run trains to the end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "aent.py", "--model", "tiny", "--steps", "4", "--out-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = proc.stdout.readline()
    proc.stdout.close()  # as head -1 does
    _, stderr = proc.communicate(timeout=300)
    assert first.startswith("model tiny") and proc.returncode == 0, stderr[-2000:]
    assert "BrokenPipe" not in stderr and (out / "final").is_dir()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
