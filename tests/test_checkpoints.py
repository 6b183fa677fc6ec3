"""Checkpoints: resuming after a kill, damaged checkpoints passed over, a full disk, and weights
that stop being finite."""

import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import HERE, one_line_exit, run_aent, tiny_args, truncate

import aent
from support import checkpoints


def wait_for_checkpoint(out_dir, newer_than, proc, timeout=180):
    start = time.time()
    while time.time() - start < timeout and proc.poll() is None:
        latest = checkpoints.latest_checkpoint(str(out_dir))
        state = checkpoints.load_state(latest) if latest else None
        if state and state["step"] > newer_than:
            return state["step"]
        time.sleep(0.05)
    return newer_than


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-rank", "8"]], ids=["full", "lora"])
def test_a_run_killed_at_random_moments_resumes_to_the_same_weights_as_an_uninterrupted_one(
    tmp_path, lora
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    flags = ["--model", "tiny", "--steps", "10", "--save-every", "1", "--keep-last", "3",
             "--sample-every", "2", *lora]  # fmt: skip
    assert run_aent(*flags, "--out-dir", str(tmp_path / "straight")).returncode == 0
    rng, step = random.Random(0), 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "aent.py", *flags, "--out-dir", str(tmp_path / "killed")],
            cwd=HERE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        step = wait_for_checkpoint(tmp_path / "killed", step, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside a step, or inside a checkpoint write
        proc.kill()
        proc.wait()
    assert 0 < step < 10  # the kills did land mid-run
    assert run_aent(*flags, "--out-dir", str(tmp_path / "killed")).returncode == 0

    for weights in ["model.safetensors"] + ["adapter/adapter_model.safetensors"] * bool(lora):
        straight = load_file(tmp_path / "straight" / "final" / weights)
        killed = load_file(tmp_path / "killed" / "final" / weights)
        assert straight.keys() == killed.keys()
        assert all(torch.equal(straight[k], killed[k]) for k in straight)
    lines = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    reference = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == list(range(1, 11))
    assert [(m["reward"], m["loss"]) for m in lines] == [
        (m["reward"], m["loss"]) for m in reference
    ]
    assert [json.loads(line)["step"] for line in open(tmp_path / "killed" / "samples.jsonl")] == [
        s for s in (1, 2, 4, 6, 8, 10) for _ in range(3)
    ]
    saved = [d for d in os.listdir(tmp_path / "killed") if d.startswith("step_") or d == "final"]
    assert "final" in saved and len(saved) <= 4
    for d in saved:
        if not d.endswith(".tmp"):
            assert checkpoints.checkpoint_problem(str(tmp_path / "killed" / d)) is None
            if d == "final" or not lora:  # a LoRA step checkpoint holds the adapters alone
                AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / d)


def test_non_finite_updates_are_skipped_then_the_run_stops_without_a_bad_checkpoint(
    tmp_path, monkeypatch
):
    real = aent.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **kw):
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 1 or calls["n"] > 4 else loss), stats

    monkeypatch.setattr(aent, "policy_loss", sometimes_nan)
    args = aent.parse_args(
        [
            "--model",
            "tiny",
            "--steps",
            "10",
            "--save-every",
            "1",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    with pytest.raises(SystemExit) as stop:
        aent.train(args)
    assert "non-finite" in str(stop.value) and "without saving" in str(stop.value)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert (
        lines[0]["skipped_updates"] == 1 and lines[0]["step"] == 1
    )  # the first update skipped, the second applied
    for d in os.listdir(tmp_path / "run"):
        if d.startswith("step_"):
            from safetensors.torch import load_file

            assert all(
                torch.isfinite(t).all()
                for t in load_file(tmp_path / "run" / d / "model.safetensors").values()
            )


DAMAGE = {
    "empty trainer_state.pt": lambda d: truncate(d / "trainer_state.pt", 0),
    "truncated trainer_state.pt": lambda d: truncate(d / "trainer_state.pt", 0.5),
    "truncated optimizer.pt": lambda d: truncate(d / "optimizer.pt", 0.9),
    "missing optimizer.pt": lambda d: os.remove(d / "optimizer.pt"),
    "truncated model.safetensors": lambda d: truncate(d / "model.safetensors", 0.99),
    "missing model.safetensors": lambda d: os.remove(d / "model.safetensors"),
    "missing config.json": lambda d: os.remove(d / "config.json"),
    "damaged config.json": lambda d: truncate(d / "config.json", 0.5),
    "missing tokenizer": lambda d: [os.remove(d / f) for f in os.listdir(d) if "token" in f],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_intact_one(
    tmp_path, three_steps, damage, capsys
):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    want = {k: v.clone() for k, v in load_file(out / "final" / "model.safetensors").items()}
    DAMAGE[damage](out / "final")
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    printed = capsys.readouterr().out
    assert f"passing over the damaged checkpoint {out / 'final'} (it" in printed
    assert f"resuming from {out / 'step_000002'} (step 2)" in printed
    got = load_file(out / "final" / "model.safetensors")  # step 3 redone from step 2
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_damaged_newer_checkpoints_are_set_aside_so_keep_last_keeps_good_ones(
    tmp_path, three_steps, capsys
):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    truncate(out / "final" / "optimizer.pt", 0.5)
    truncate(out / "step_000002" / "model.safetensors", 0.5)
    aent.train(tiny_args(out, "--steps", "5", "--save-every", "1", "--keep-last", "2"))
    printed = capsys.readouterr().out
    assert printed.count("passing over the damaged checkpoint") == 2
    assert f"resuming from {out / 'step_000001'} (step 1)" in printed
    names = sorted(os.listdir(out))
    assert not [n for n in names if ".damaged" in n]  # set aside, then pruned by newer saves
    kept = [n for n in names if n.startswith("step_") and "." not in n] + ["final"]
    assert kept == ["step_000003", "step_000004", "final"]
    assert all(checkpoints.checkpoint_problem(str(out / n)) is None for n in kept)


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_and_keeps_its_logs(
    tmp_path, three_steps
):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    for name in ("step_000001", "step_000002", "final"):
        truncate(out / name / "optimizer.pt", 0.5)
    logs = (out / "metrics.jsonl").read_text()
    message = one_line_exit(aent.main, ["--model", "tiny", "--steps", "3", "--save-every", "1",
                                        "--keep-last", "3", "--out-dir", str(out)])  # fmt: skip
    assert message.startswith(f"error: no checkpoint in {out} can be resumed: ")
    assert "step_000001 (its optimizer.pt is missing or damaged)" in message
    assert (out / "metrics.jsonl").read_text() == logs


def test_a_full_disk_while_saving_is_one_line_that_names_the_kept_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    aent.train(tiny_args(out, "--steps", "2", "--save-every", "1"))
    real_save = torch.save

    def full(obj, path, *a, **kw):
        if "step_000003.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    args = tiny_args(out, "--steps", "4", "--save-every", "1")
    message = one_line_exit(lambda _: aent.train(args), None)
    assert message.startswith(f"error: cannot write {out / 'step_000003'}: ")
    assert f"the last checkpoint is {out / 'final'}" in message  # step 2 of the first run
    assert not (out / "step_000003.tmp").exists() and not (out / "step_000003").exists()
    assert checkpoints.latest_checkpoint(str(out)) == str(out / "final")


@pytest.mark.slow
def test_a_really_full_disk_stops_in_one_line_and_the_run_resumes_once_there_is_room(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a 4 MB tmpfs here (needs root)")
    try:
        out = small / "run"  # a tiny checkpoint is about 1.6 MB: the third does not fit
        flags = ("--model", "tiny", "--steps", "5", "--save-every", "1", "--out-dir", str(out))
        res = run_aent(*flags)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, res.stderr[-2000:]
        assert lines[0].startswith(f"error: cannot write {out / 'step_000003'}: the disk is full")
        assert f"the last checkpoint is {out / 'step_000002'}" in lines[0]
        kept = ["args.json", "metrics.jsonl", "samples.jsonl", "step_000001", "step_000002"]
        assert sorted(os.listdir(out)) == kept  # and no .lock: released as the run ended
        shutil.rmtree(out / "step_000001")  # room for a second checkpoint beside step_000002
        res = run_aent(*flags, "--keep-last", "1")  # and a run of one needs no more than that
        assert res.returncode == 0, res.stderr[-2000:]
        assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_weights_made_non_finite_by_an_update_are_one_line_and_never_saved(tmp_path, monkeypatch):
    real = aent.policy_update

    def overflowing(model, *a, **kw):  # an update that ends with an infinite weight
        out = real(model, *a, **kw)
        with torch.no_grad():
            next(model.parameters())[0, 0] = math.inf
        return out

    monkeypatch.setattr(aent, "policy_update", overflowing)
    out = tmp_path / "run"
    message = one_line_exit(lambda _: aent.train(tiny_args(out, "--save-every", "1")), None)
    assert message.startswith("error: the weights are no longer finite after step 1")
    assert "no checkpoint was written" in message and not checkpoints.latest_checkpoint(str(out))


@pytest.mark.parametrize(
    "state",
    [{"coef": 0.01, "bad_streak": 0}, {"step": "3", "coef": 0.01, "bad_streak": 0},
     {"step": 3.0, "coef": 0.01, "bad_streak": 0}, {"step": torch.tensor(3), "coef": 0.01,
     "bad_streak": 0}, {"step": -3, "coef": 0.01, "bad_streak": 0},
     {"step": 3, "coef": float("nan"), "bad_streak": 0}, [3, 0.01, 0]],
    ids=["no step", "str step", "float step", "tensor step", "negative step", "nan coef", "list"],
)  # fmt: skip
def test_a_trainer_state_that_is_not_one_is_a_damaged_checkpoint(tmp_path, three_steps, state):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    torch.save(state, out / "final" / "trainer_state.pt")
    assert checkpoints.load_state(str(out / "final")) is None
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    assert checkpoints.load_state(str(out / "final"))["step"] == 3  # redone from step 2
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_checkpoint_files_are_all_readable_by_others_as_the_umask_allows(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        aent.train(tiny_args(out, "--steps", "1"))
    finally:
        os.umask(old)
    modes = {f: os.stat(out / "final" / f).st_mode & 0o777 for f in os.listdir(out / "final")}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_set_aside_and_half_deleted_checkpoints_do_not_pile_up(tmp_path, three_steps):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    truncate(out / "final" / "optimizer.pt", 0.5)  # set aside as final.damaged on resume
    shutil.copytree(out / "step_000001", out / "final.old")  # a kill mid-delete of final.old
    os.remove(out / "final.old" / "trainer_state.pt")
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    names = sorted(n for n in os.listdir(out) if not n.endswith((".json", ".jsonl", ".lock")))
    assert names == ["final", "step_000001", "step_000002"]  # final saved: nothing set aside left
