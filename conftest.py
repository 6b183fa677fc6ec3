"""Fixtures and helpers shared by the tests: the tiny model, one-line errors, subprocess runs.
Every test runs offline on the CPU and builds its own models and data."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

import aent
from support.demo import build_tiny


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=0)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = build_tiny(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_line_exit(fn, argv) -> str:
    """The message of the SystemExit that fn(argv) ends with, checked to be a single 'error:' line."""
    with pytest.raises(SystemExit) as stop:
        fn(argv)
    message = str(stop.value.code)
    assert message.startswith("error:") and "\n" not in message
    return message


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def run_aent(*flags):
    return subprocess.run(
        [sys.executable, "aent.py", *flags],
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def tiny_args(out, *flags):
    return aent.parse_args(["--model", "tiny", "--out-dir", str(out), *flags])


def torchrun(*argv, timeout=600, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd.append(str(nproc))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    return subprocess.run(
        cmd + [str(a) for a in argv], cwd=HERE, capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


SHARED = os.path.join(HERE, "..", "shared", "data")  # real data, beside a checkout
QWEN = os.path.join(SHARED, "qwen2.5-math-1.5b")  # the real tokenizer and config


def shared_rows(name):
    path = os.path.join(SHARED, name)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in open(path)]


def truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A finished 3-step tiny run with step_000001/, step_000002/ and final/ (step 3)."""
    out = tmp_path_factory.mktemp("three") / "run"
    aent.train(tiny_args(out, "--steps", "3", "--save-every", "1", "--keep-last", "3"))
    return out
