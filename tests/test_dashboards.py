"""--report-to: the scalars of metrics.jsonl in TensorBoard's event files and in an offline W&B
run, the same after a kill and a resume; a missing package is one error line."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import HERE, one_line_exit, run_aent

import aent
from support import dashboards


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def tensorboard_scalars(out) -> dict:
    """{tag: [(step, value)]} as TensorBoard's reader shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def assert_same_scalars(out, scalars):
    lines = metrics(out)
    for key in ("reward", "entropy_clamped", "entropy_full", "dropped_mass", "loss"):
        assert scalars[key] == [(m["step"], pytest.approx(m[key])) for m in lines], key


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_the_args_and_the_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    res = run_aent("--model", "tiny", "--steps", "3", "--report-to", "tensorboard",
                   "--sample-every", "2", "--out-dir", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_scalars(out, tensorboard_scalars(out))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["tensors"]) >= {"args/text_summary", "samples/text_summary"}
    assert [e.step for e in events.Tensors("samples/text_summary")] == [1, 2, 3]


@pytest.mark.slow
def test_tensorboard_shows_each_step_once_after_a_kill_and_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = ["--model", "tiny", "--steps", "8", "--save-every", "3", "--report-to",
             "tensorboard", "--out-dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "aent.py", *flags], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    start = time.time()  # killed once step 5 is logged: steps 4 and 5 come again from step 3
    while time.time() - start < 180 and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 5:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert 5 <= len(metrics(out)) < 8  # the kill landed mid-run
    res = run_aent(*flags)
    assert res.returncode == 0, res.stderr[-2000:]
    scalars = tensorboard_scalars(out)
    assert [step for step, _ in scalars["reward"]] == list(range(1, 9))
    assert_same_scalars(out, scalars)


def wandb_records(path):
    """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB's log
    format (32 KiB blocks of checksum, length, type and data; types 1 full, 2-4 in parts)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_scalars_config_and_samples_and_keeps_its_id(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "aent.py", "--model", "tiny", "--report-to", "wandb",
           "--out-dir", str(out)]  # fmt: skip
    res = subprocess.run([*cmd, "--steps", "2"], cwd=HERE, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    run_id = (out / "wandb_id.txt").read_text().strip()
    files = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    history, config = {}, {}
    for record in wandb_records(files[0]):
        if record.HasField("history"):
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            history[record.history.step.num] = items
        if record.HasField("run"):
            config.update({i.key: i.value_json for i in record.run.config.update})
    for m in metrics(out):
        for key in ("reward", "entropy_clamped", "entropy_full", "dropped_mass", "loss"):
            assert json.loads(history[m["step"]][key]) == pytest.approx(m[key]), key
    assert json.loads(history[1]["samples/_type"]) == "table-file"
    assert json.loads(config["lr"]) == 1e-3 and json.loads(config["model"]) == "tiny"  # args
    res = subprocess.run([*cmd, "--steps", "3"], cwd=HERE, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "wandb_id.txt").read_text().strip() == run_id  # the same run continues


def test_a_dashboard_whose_package_is_missing_is_one_line_before_anything_loads(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(dashboards.PACKAGES, "tensorboard", "no_such_dashboard_package")
    message = one_line_exit(aent.main, ["--model", "tiny", "--report-to", "tensorboard",
                                        "--out-dir", str(tmp_path / "run")])  # fmt: skip
    assert message == (
        "error: --report-to tensorboard needs tensorboard: pip install no_such_dashboard_package"
    )
    assert not (tmp_path / "run").exists()
