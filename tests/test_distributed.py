"""Data parallel under torchrun, two processes with gloo on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import HERE, torchrun

from support.demo import build_tiny


SAME_WEIGHTS = """
import json, sys, torch, torch.distributed as dist
import aent
real, same = aent.policy_update, []

def checked(model, *args, **kwargs):  # after each step's updates: the weights of every rank
    out = real(model, *args, **kwargs)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    same.append(all(torch.equal(parts[0], x) for x in parts))
    return out

aent.policy_update = checked
aent.main(sys.argv[2:])
if dist.get_rank() == 0:
    json.dump(same, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-rank", "8"]], ids=["full", "lora"])
def test_two_processes_train_log_each_step_once_and_keep_identical_weights(tmp_path, lora):
    from transformers import AutoModelForCausalLM

    script, report, out = tmp_path / "same.py", tmp_path / "same.json", tmp_path / "run"
    script.write_text(SAME_WEIGHTS)
    flags = ["--model", "tiny", "--steps", "6", "--save-every", "2", "--out-dir", out, *lora]
    res = torchrun(script, report, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(report)) == [True] * 6  # identical on both ranks after every step
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert res.stdout.count("step    3 |") == 1  # rank 0 alone prints
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


EQUAL_UPDATE = """
import sys, torch
import aent
from support import distributed, models
from support.demo import build_tiny

# One step's update of the same 4 groups x 4 rollouts, on one process or split over two that
# shard the model with argv[3] = "fsdp". argv[2] is --max-grad-norm: 0.05 clips every update
# here (norms 1.7 and 1.4), by the norm over all ranks' gradients; 1e9 clips none, so that
# gradients averaged over the ranks instead of summed would show.
rank, world, _ = distributed.init_distributed()
args = aent.parse_args(["--model", "tiny", "--group-size", "4", "--prompts-per-step", "4",
                        "--mini-batch-prompts", "4", "--micro-batch-size", "3",
                        "--ppo-epochs", "2", "--max-new-tokens", "3",
                        "--max-grad-norm", sys.argv[2]])
model, tokenizer = build_tiny(0)
torch.manual_seed(0)  # the same rollouts on every rank; each takes its own groups
gen = aent.generation_config(tokenizer, models.stop_token_ids(model, tokenizer), 3)
prompts = [aent.build_prompt(tokenizer, f"Repeat {d}") for d in range(4)]
roll = aent.rollout(model, tokenizer, prompts, gen, group_size=4)
rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
adv = aent.group_advantages(rewards, 4)
rows = slice(16 // world * rank, 16 // world * (rank + 1))
part = {k: v[rows] for k, v in roll.items() if torch.is_tensor(v)}
sharded = world > 1 and sys.argv[3] == "fsdp"
if sharded:
    distributed.shard(model)
opt = torch.optim.SGD(model.parameters(), lr=1.0)  # Adam would magnify rounding of tiny grads
torch.manual_seed(1)
upd = aent.policy_update(model, opt, part, part["mask"], adv[rows], 0.01, args)
weights = distributed.full_state(model, opt)[0] if sharded else model.state_dict()
if rank == 0:
    torch.save({"weights": dict(weights), "loss": upd["loss"]}, sys.argv[1])
distributed.barrier()  # no process exits while another still works
"""


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,max_norm", [("plain", "1.0"), ("fsdp", "0.05"), ("fsdp", "1e9")],
                         ids=["plain", "fsdp-clipped", "fsdp-unclipped"])  # fmt: skip
def test_a_two_process_update_equals_a_one_process_update_of_the_whole_batch(
    tmp_path, fsdp, max_norm
):
    script = tmp_path / "equal.py"
    script.write_text(EQUAL_UPDATE)
    res = torchrun(script, tmp_path / "two.pt", max_norm, fsdp, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    cmd = [sys.executable, str(script), str(tmp_path / "one.pt"), max_norm, fsdp]
    env = {**os.environ, "PYTHONPATH": HERE}
    one = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    start = build_tiny(0)[0].state_dict()
    assert two["weights"].keys() == one["weights"].keys()
    for k, w in one["weights"].items():
        assert not torch.equal(w, start[k])  # the update moved every tensor
        torch.testing.assert_close(two["weights"][k], w, rtol=1e-5, atol=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [[], ["--fsdp"]], ids=["plain", "fsdp"])
def test_torchrun_stops_every_rank_at_one_step_on_sigterm_and_resumes(tmp_path, fsdp):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "aent.py", "--model", "tiny", "--steps", "200", "--save-every", "0", "--out-dir", str(out),
           *fsdp]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    start = time.time()
    while time.time() - start < 300 and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(open(out / "metrics.jsonl").readlines()) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "rerun to resume" in last
    stopped = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert [n for n in os.listdir(out) if n.startswith("step_")] == [f"step_{stopped[-1]:06d}"]
    res = torchrun("aent.py", "--model", "tiny", "--steps", stopped[-1] + 2, "--save-every", "0",
                   "--out-dir", out, *fsdp)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, stopped[-1] + 3)) and (out / "final").is_dir()


@pytest.mark.slow
def test_bad_input_under_torchrun_is_one_error_line_from_rank_0(tmp_path):
    res = torchrun("aent.py", "--model", "tiny", "--prompts-per-step", "6", "--mini-batch-prompts",
                   "3", "--out-dir", tmp_path / "run")  # fmt: skip
    assert res.returncode != 0
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --mini-batch-prompts must be a multiple of the 2 processes"]
    assert not (tmp_path / "run").exists()
