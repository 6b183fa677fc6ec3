"""The offline CPU demo learns its toy task."""

import json

import pytest


import aent
from support.demo import TINY_DEMO


@pytest.mark.slow
def test_cpu_demo_learns_its_toy_task(tmp_path):
    """The README's demo, as run there: mean reward over the last 10 steps >= first 10 + 0.3."""
    aent.train(aent.parse_args(["--model", "tiny", "--out-dir", str(tmp_path / "demo")]))
    rewards = [json.loads(line)["reward"] for line in open(tmp_path / "demo" / "metrics.jsonl")]
    assert len(rewards) == TINY_DEMO["steps"]
    assert sum(rewards[-10:]) / 10 >= sum(rewards[:10]) / 10 + 0.3
