"""--fsdp: the training state sharded over two processes (FSDP2, gloo on the CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import HERE, run_aent, torchrun

from support import checkpoints

SHARDED = """
import json, sys, torch
import aent
from support import distributed, models
from support.demo import build_tiny

# What each rank holds once sharded, and a rollout of the gathered weights against the same
# model never sharded, from the same seed. The ranks make different numbers of generate calls
# (rank r: r + 1 prompts, 4 rows a call): only weights gathered for the whole rollout let them.
rank, world, _ = distributed.init_distributed()
model, tokenizer = build_tiny(0)
plain = build_tiny(0)[0]
whole = sum(p.numel() * p.element_size() for p in model.parameters())
distributed.shard(model)
gen = aent.generation_config(tokenizer, models.stop_token_ids(model, tokenizer), 6)
prompts = [aent.build_prompt(tokenizer, f"Repeat {d}") for d in range(rank + 1)]
torch.manual_seed(7)
with distributed.gathered(model):
    sharded_roll = aent.rollout(model, tokenizer, prompts, gen, group_size=4, batch_size=4)
torch.manual_seed(7)
plain_roll = aent.rollout(plain, tokenizer, prompts, gen, group_size=4, batch_size=4)

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # one update: gradients and moments
distributed.full_state(model, opt)  # as a checkpoint before any update: AdamW left untouched
untouched = not opt.state
model(sharded_roll["input_ids"]).logits.float().logsumexp(-1).mean().backward()
opt.step()
local = lambda ts: sum(t.to_local().numel() * t.to_local().element_size() for t in ts)
moments = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
json.dump(dict(
    whole=whole,
    weights=local(model.parameters()),
    grads=local(p.grad for p in model.parameters()),
    moments=local(moments),
    moments_whole=2 * whole,
    same_tokens=torch.equal(sharded_roll["input_ids"], plain_roll["input_ids"]),
    resharded=all(type(p).__name__ == "DTensor" for p in model.parameters()),
    untouched=untouched,
), open(f"{sys.argv[1]}.{rank}", "w"))
distributed.barrier()
"""


@pytest.mark.slow
def test_each_rank_holds_half_the_state_and_gathered_rollouts_match_the_plain_model(tmp_path):
    script, report = tmp_path / "sharded.py", tmp_path / "report"
    script.write_text(SHARDED)
    res = torchrun(script, report, timeout=180)  # a rank left waiting would hang, not fail
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.load(open(f"{report}.{r}")) for r in range(2)]
    for r in ranks:  # measured from the local shards: each near half (rows split 50/49 etc.)
        for part, whole in [("weights", "whole"), ("grads", "whole"), ("moments", "moments_whole")]:
            assert 0.45 < r[part] / r[whole] < 0.55, (part, r)
        assert r["same_tokens"] and r["resharded"] and r["untouched"]
    assert sum(r["weights"] for r in ranks) == ranks[0]["whole"]  # every byte held once


def fsdp_command(out, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "aent.py", "--model", "tiny", "--fsdp", "--out-dir", str(out), *flags]  # fmt: skip


@pytest.mark.slow
def test_a_sharded_run_killed_then_rerun_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    flags = ["--steps", "6", "--save-every", "1", "--keep-last", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    straight = subprocess.run(fsdp_command(tmp_path / "straight", *flags), cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed, rng, step = tmp_path / "killed", random.Random(0), 0
    for _ in range(2):  # kill -9 every process of the job, somewhere after a checkpoint
        proc = subprocess.Popen(fsdp_command(killed, *flags), cwd=HERE, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        start = time.time()
        while time.time() - start < 300 and proc.poll() is None:
            latest = checkpoints.latest_checkpoint(str(killed))
            state = checkpoints.load_state(latest) if latest else None
            if state and state["step"] > step:
                step = state["step"]
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < step < 6  # the kills landed mid-run
    rerun = subprocess.run(fsdp_command(killed, *flags), cwd=HERE, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    model = AutoModelForCausalLM.from_pretrained(killed / "final")  # one process, a plain model
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


RESTORED = """
import sys, torch
from support import checkpoints, distributed
from transformers import AutoModelForCausalLM

# A checkpoint saved by 2 ranks, resumed by this many: each takes its shard of the whole state.
rank, world, _ = distributed.init_distributed()
path = sys.argv[1]
model = distributed.shard(AutoModelForCausalLM.from_pretrained(path))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
checkpoints.restore(path, checkpoints.load_state(path), model, opt)
weights, state = distributed.full_state(model, opt)  # gathered back: equal to what was saved
if rank == 0:
    saved = torch.load(f"{path}/optimizer.pt", weights_only=True)
    same = [torch.equal(state["state"][n][k], saved["state"][n][k])
            for n in saved["state"] for k in ("exp_avg", "exp_avg_sq", "step")]
    assert len(same) == 3 * len(list(model.parameters())) and all(same), "optimizer state"
distributed.barrier()
"""


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    res = torchrun("aent.py", "--model", "tiny", "--fsdp", "--steps", "2", "--out-dir", out)
    assert res.returncode == 0, res.stderr[-3000:]
    script = tmp_path / "restored.py"
    script.write_text(RESTORED)
    three = torchrun(script, out / "final", nproc=3)  # 3 ranks: uneven shards
    assert three.returncode == 0, three.stderr[-3000:]
    four = torchrun("aent.py", "--model", "tiny", "--fsdp", "--steps", "3", "--out-dir", out,
                    nproc=4)  # fmt: skip
    assert four.returncode == 0, four.stderr[-3000:]
    assert "resuming from" in four.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


def test_fsdp_outside_torchrun_or_with_lora_is_one_error_line(tmp_path):
    res = run_aent("--model", "tiny", "--fsdp", "--lora-rank", "8", "--out-dir", tmp_path / "r")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: --fsdp shards over processes: run it under torchrun")
    assert "with --lora-rank leave it out" in res.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_sharded_run_logs_what_a_plain_data_parallel_run_logs(tmp_path):
    """The whole loop, sharded or not: a KL reference (sharded too), two PPO epochs (old
    log-probs scored first), masked truncations and held-out scoring on rank 0."""
    flags = ["--model", "tiny", "--steps", "3", "--beta", "0.01", "--ppo-epochs", "2",
             "--mask-truncated", "--eval-every", "2", "--eval-size", "2"]  # fmt: skip
    for name, extra in [("plain", []), ("sharded", ["--fsdp"])]:
        res = torchrun("aent.py", *flags, *extra, "--out-dir", tmp_path / name, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    plain, sharded = ([json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")]
                      for n in ("plain", "sharded"))  # fmt: skip
    timing = ("rollout_time", "step_time")
    for p, s in zip(plain, sharded, strict=True):
        assert p.keys() == s.keys() and ("eval_accuracy" in p) == (p["step"] == 2)
        for k in p.keys() - set(timing):
            assert s[k] == pytest.approx(p[k], rel=1e-5, abs=1e-7), k
